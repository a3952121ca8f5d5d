"""`tf_q2e.Retriever` from a model, a run and a SavedModel; the examples a user runs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import tf_q2e
from conftest import SMALL
from tf_q2e.config import load_config
from tf_q2e.data.synth import generate
from tf_q2e.errors import InputError
from tf_q2e.index import build_index, exact_top_k, load_index
from tf_q2e.search import Hit
from tf_q2e.train import load_model, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES = ["brown couch", "mountain bike red", "lamp"]
US = {"query_country": "US"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    generate(data, products=500, impressions=3000, seed=7, image_dim=4, ground_truth_queries=5)
    run_dir = str(tmp_path_factory.mktemp("run"))
    config = load_config(None, SMALL + ["model.term_dim=16", "model.query_bias=true", "model.engagement_bias=learned",
                                        "train.epochs=1", "train.steps_per_epoch=10", "index.k=20"])
    train(config, data, run_dir, verbose=0)
    build_index(run_dir, overrides=["index.kind=ah"], log=lambda _: None)  # AH + reordering, not brute force
    return run_dir, data


@pytest.mark.slow
def test_search_from_a_model_is_exact_search_with_the_engagement_probability(run):
    run_dir, data = run
    model = load_model(run_dir)
    catalog = pd.read_parquet(os.path.join(data, "catalog.parquet"))
    retriever = tf_q2e.Retriever.from_model(model, catalog)
    np.testing.assert_allclose(retriever.vectors, load_index(run_dir).vectors, atol=1e-5)  # the product tower's
    np.testing.assert_allclose(retriever.encode_products(catalog.head(7)), retriever.vectors[:7], atol=1e-5)
    results = retriever.search(QUERIES, k=5, context=US)
    queries, bias = retriever.encode_queries(QUERIES, context=US, return_bias=True)
    scores, rows = exact_top_k(retriever.vectors, queries, 5)
    for hits, s, r, b in zip(results, scores, rows, bias):
        assert [h.product_id for h in hits] == list(retriever.product_ids[r])
        product_id, score, title = hits[0]  # a hit unpacks as (product_id, score, title)
        assert title == retriever.titles[r[0]] and score == pytest.approx(s[0], abs=1e-5)
        expected = model.engagement.probability(tf.constant(s + b)).numpy()
        np.testing.assert_allclose([h.engagement_probability for h in hits], expected, atol=1e-5)
    assert np.abs(bias).max() > 0  # the query bias moved in training: the probability uses it
    # ScaNN over a small catalogue (brute force below 20,000 products) finds the same products.
    scann = tf_q2e.Retriever.from_model(model, os.path.join(data, "catalog.parquet"), scann=True, k=10)
    assert [[h.product_id for h in hits] for hits in scann.search(QUERIES, k=5, context=US)] == \
        [[h.product_id for h in hits] for hits in results]


@pytest.mark.slow
def test_search_from_a_run_uses_its_scann_index_and_from_an_export_the_signatures(run, tmp_path):
    run_dir, _ = run
    exact = tf_q2e.Retriever.from_run(run_dir, scann=False)
    scann = tf_q2e.Retriever.from_run(run_dir)
    assert exact.exact and not scann.exact
    truth = [[h.product_id for h in hits] for hits in exact.search(QUERIES, k=10, context=US)]
    found = [[h.product_id for h in hits] for hits in scann.search(QUERIES, k=10, context=US)]
    overlap = np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])
    assert overlap >= 0.8  # AH + reordering against exact search
    with pytest.raises(InputError, match="k=21 is more than the 20"):
        scann.search(QUERIES, k=21)
    result = tf_q2e.export(scann, str(tmp_path / "serving"), log=lambda _: None)
    assert result["k"] == 20 and set(result["models"]) == {"q2e", "q2e_scann"}
    stock = tf_q2e.Retriever.from_saved_model(str(tmp_path / "serving" / "q2e"))  # the newest version
    served = stock.search(QUERIES, k=10, context=US)
    assert [[h.product_id for h in hits] for hits in served] == truth
    for mine, theirs in zip(exact.search(QUERIES, k=10, context=US), served):
        np.testing.assert_allclose([h.engagement_probability for h in theirs], [h.engagement_probability for h in mine],
                                   atol=1e-5)
    np.testing.assert_allclose(stock.encode_queries(QUERIES, US), exact.encode_queries(QUERIES, US), atol=1e-5)
    served_scann = tf_q2e.Retriever.from_saved_model(str(tmp_path / "serving" / "q2e_scann" / "1"))
    assert [[h.product_id for h in hits] for hits in served_scann.search(QUERIES, k=10, context=US)] == found


@pytest.mark.slow
def test_search_input_errors_name_the_fix(run):
    retriever = tf_q2e.Retriever.from_run(run[0], scann=False)
    with pytest.raises(TypeError, match="not one string"):
        retriever.search("lamp")
    with pytest.raises(InputError, match="'query_city' is not one of the model's"):
        retriever.search(["lamp"], context={"query_city": "Paris"})
    with pytest.raises(InputError, match="2 values for 1 queries"):
        retriever.search(["lamp"], context={"query_country": ["US", "DE"]})
    with pytest.raises(InputError, match="k must be a positive integer"):
        retriever.search(["lamp"], k=0)
    with pytest.raises(InputError, match="not a SavedModel"):
        tf_q2e.Retriever.from_saved_model(run[0])


def test_a_hit_is_a_three_tuple_with_the_probability_beside():
    hit = Hit("P1", 0.5, "red sofa", 0.25)
    product_id, score, title = hit
    assert (product_id, score, title) == ("P1", 0.5, "red sofa") and len(hit) == 3
    assert hit.engagement_probability == 0.25 and "engagement_probability=0.2500" in repr(hit)


@pytest.mark.slow
def test_the_examples_train_search_and_serve_with_stock_tensorflow(tmp_path):
    out = str(tmp_path / "example")
    fit = subprocess.run([sys.executable, os.path.join(REPO, "examples", "fit.py"), "--out", out, "--products", "200",
                          "--impressions", "2500", "--epochs", "2"], capture_output=True, text=True, timeout=900)
    assert fit.returncode == 0, fit.stderr[-3000:]
    lines = fit.stdout.splitlines()
    for query in ("grey jute rug", "white laptop", "sofa 3-seater"):
        at = lines.index(query)
        assert all("p(engaged)" in line for line in lines[at + 1:at + 6])  # five products each
    assert os.path.exists(os.path.join(out, "model", "model.json"))
    assert tf_q2e.load(os.path.join(out, "model")).context_columns == ("query_country",)
    # Stock TensorFlow alone: no tf_q2e, no tf-keras switch.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    search = subprocess.run([sys.executable, os.path.join(REPO, "examples", "search.py"),
                             os.path.join(out, "serving", "q2e"), "grey jute rug", "--country", "US", "--k", "5"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert search.returncode == 0, search.stderr[-3000:]
    at = lines.index("grey jute rug")
    assert search.stdout.splitlines()[:6] == lines[at:at + 6]  # the same products, scores and probabilities


@pytest.mark.slow
def test_the_readme_quickstart_runs(tmp_path):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    generate(str(tmp_path / "data"), products=200, impressions=2500, seed=1, image_dim=0, ground_truth_queries=0)
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    (tmp_path / "quickstart.py").write_text(code)
    out = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.strip().splitlines()) >= 5  # five products printed for "grey jute rug"
    assert tf_q2e.load(str(tmp_path / "my_model")).config.train.epochs == 2
    assert os.path.exists(tmp_path / "serving" / "q2e" / "1" / "saved_model.pb")
    assert os.path.exists(tmp_path / "serving" / "models.config")
