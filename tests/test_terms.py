"""The term channel (`tf_q2e.terms`): light stemming, coverage as a dot product, towers, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import SMALL
from tf_q2e.config import ConfigError, load_config
from tf_q2e.data.synth import generate
from tf_q2e.savedmodels import export_run
from tf_q2e.index import build_index, exact_top_k, load_index
from tf_q2e.terms import WEIGHT_BUCKETS, TermChannel, light_stem
from tf_q2e.train import build_model, load_model, train


def test_light_stem_applies_the_s_stemmer_plural_rules():
    words = ["rugs", "batteries", "boxes", "shoes", "glass", "gas", "ties", "cactus", "series", "as", "s", "sofa"]
    stems = [w.decode() for w in light_stem(tf.constant(words)).numpy()]
    assert stems == ["rug", "battery", "boxe", "shoe", "glass", "ga", "tie", "cactus", "sery", "as", "s", "sofa"]


def _dot(queries, products, dim=4096, weight=1.0):
    q = TermChannel(dim, weight, "mean")(tf.constant(queries)).numpy()
    p = TermChannel(dim, weight, "sum")(tf.constant(products)).numpy()
    return np.einsum("bk,bk->b", q, p), q, p


def test_the_dot_product_of_the_channels_is_the_query_term_coverage():
    dots, q, p = _dot(["Red Sofas", "red sofa", "grey wool rug", "lamp", "", "desk", "red red", "red"],
                      ["red sofa bed", "blue sofa", "Grey-Wool RUGS 5x8", "sofa", "red sofa", "", "red sofa", "red, red"])
    # A word's vector has norm 1 exactly; other words add noise of sd 1/sqrt(K) per pair (K = 4096: 0.016).
    # A word repeated in the query or the product counts once.
    np.testing.assert_allclose(dots, [1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0], atol=0.08)
    assert np.all(q[4] == 0) and np.all(p[5] == 0)  # no words: zeros, not NaN
    np.testing.assert_allclose(np.linalg.norm(q[3]), 1.0, rtol=1e-6)  # one word, mean pooling: e_w itself
    np.testing.assert_allclose(np.linalg.norm(p[3]), 1.0, rtol=1e-6)


def test_word_hashes_keep_each_texts_distinct_stems():
    hashes = TermChannel.word_hashes(tf.constant(["red red sofa", "", "Rugs rug RUG", "rug"]))
    assert hashes.row_lengths().numpy().tolist() == [2, 0, 1, 1]
    assert hashes[2].numpy().tolist() == hashes[3].numpy().tolist()  # "rugs" and "rug": one stem, one hash


def test_weight_scales_the_dot_product_and_signs_are_fixed():
    dots, _, _ = _dot(["oak table"], ["oak table"], dim=256, weight=0.25)
    same, _, _ = _dot(["oak table"], ["oak table"], dim=256, weight=1.0)
    np.testing.assert_allclose(dots, 0.25 * same, rtol=1e-5)
    a = TermChannel(64, 1.0, "sum")(tf.constant(["oak table"])).numpy()
    b = TermChannel(64, 1.0, "sum")(tf.constant(["oak table"])).numpy()
    np.testing.assert_array_equal(a, b)  # two layers (two processes, an export) give the same vectors
    assert set(np.unique(TermChannel(64, 1.0, "mean")(tf.constant(["oak"])).numpy())) <= {-0.125, 0.125}


def test_bad_channel_settings_are_refused():
    with pytest.raises(ValueError, match="pooling"):
        TermChannel(8, 1.0, "max")
    with pytest.raises(ValueError, match="dim"):
        TermChannel(0, 1.0, "sum")
    with pytest.raises(ConfigError, match="model.term_dim"):
        load_config(None, ["model.term_dim=-1"])
    with pytest.raises(ConfigError, match="model.term_weight"):
        load_config(None, ["model.term_weight=0"])


def test_the_contrastive_task_trains_on_the_cosine_alone():
    batch = {"query": tf.constant(["red sofa", "oak lamp", "blue rug"]), "query_country": tf.constant(["US"] * 3),
             "product_id": tf.constant(["a", "b", "c"]), "product_title": tf.constant(["red sofa", "oak lamp", "rug"]),
             "product_description": tf.constant(["", "", ""]), "product_category": tf.constant(["x", "y", "z"]),
             "engaged": tf.constant([1, 0, 1])}
    config = load_config(None, SMALL + ["model.term_dim=64", "model.term_weight=1"])
    model = build_model(config, 0, ("query_country",))
    q, p = model(batch)
    ctr, bce, _ = model.task_losses(batch)
    d = config.model.embedding_dim
    expected = model.retrieval(q[:, :d], p[:, :d], product_ids=batch["product_id"])
    np.testing.assert_allclose(ctr.numpy(), expected.loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(bce.numpy(), model.engagement(q[:, :d], p[:, :d], batch["engaged"]).loss.numpy(), rtol=1e-5)
    assert q.shape[1] == d + 64  # the towers carry the channel at use
    # ... and in training only when the engagement task learns a part of it (not computed otherwise).
    assert model.query_tower(batch, training=True).shape[1] == d
    with pytest.raises(ConfigError, match=r"model.term_in_training \(True\) was removed"):
        load_config(None, ["model.term_in_training=true"])


def test_learned_word_weights_make_the_coverage_a_weighted_share():
    learned = TermChannel(4096, 0.5, "mean", learned_weights=True)
    fixed = TermChannel(4096, 0.5, "mean")
    queries = tf.constant(["red sofa", "grey wool rug", ""])
    np.testing.assert_allclose(learned(queries).numpy(), fixed(queries).numpy(), atol=1e-6)  # started at u = 1
    red, sofa = TermChannel.word_hashes(tf.constant(["red sofa"]))[0].numpy()
    table = learned.word_weights.numpy()
    table[red % WEIGHT_BUCKETS] = np.log(np.expm1(3.0)) / learned.weight_lr_multiplier  # u_red = 3, u_sofa = 1
    learned.word_weights.assign(table)
    q = learned(tf.constant(["red sofa"])).numpy()[0]
    p = TermChannel(4096, 0.5, "sum")(tf.constant(["red lamp"])).numpy()[0]
    e = learned.word_vectors(tf.constant([red, sofa], tf.int64)).numpy()
    # t_q·t_p = α (3 e_red + e_sofa)·(e_red + e_lamp) / 4: about 0.5 · 3/4 (red holds 3 of the 4 weight units).
    e_lamp = learned.word_vectors(TermChannel.word_hashes(tf.constant(["lamp"])).flat_values).numpy()[0]
    expected = 0.5 * (3 * e[0] + e[1]) @ (e[0] + e_lamp) / 4
    np.testing.assert_allclose(q @ p, expected, rtol=1e-5)
    assert abs(expected - 0.375) < 0.05
    with pytest.raises(ValueError, match="mean pooling only"):
        TermChannel(8, 1.0, "sum", learned_weights=True)
    with pytest.raises(ConfigError, match="model.term_weights"):
        load_config(None, ["model.term_weights=engagement"])


def _tiny_model(weight: float, settings: list[str]):
    """A batch of four rows and a compiled model with a 64-d term channel, engagement weight `weight`,
    the BCE off the tables, plus `settings`."""
    batch = {"query": tf.constant(["red sofa", "oak lamp", "blue rug", "red rug"]), "query_country": tf.constant(["US"] * 4),
             "product_id": tf.constant(["a", "b", "c", "d"]),
             "product_title": tf.constant(["red sofa", "oak lamp", "rug", "blue rug"]),
             "product_description": tf.constant([""] * 4), "product_category": tf.constant(["x", "y", "z", "z"]),
             "engaged": tf.constant([1, 0, 1, 0])}
    config = load_config(None, SMALL + ["model.term_dim=64", f"model.engagement_weight={weight}",
                                        "model.engagement_trains_tables=false", *settings])
    model = build_model(config, 0, ("query_country",))
    model.compile(optimizer=tf.keras.optimizers.Adam(0.1))
    return batch, config, model


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_the_engagement_task_alone_trains_the_word_weights(weight):
    batch, config, model = _tiny_model(weight, ["model.term_weight=1", "model.term_weights=engagement"])
    q, p = model(batch)
    d = config.model.embedding_dim
    ctr, bce, _ = model.task_losses(batch)
    # The contrastive task scores with the cosine, the engagement task with the whole dot product.
    np.testing.assert_allclose(ctr.numpy(), model.retrieval(q[:, :d], p[:, :d], product_ids=batch["product_id"]).loss.numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(bce.numpy(), model.engagement(q, p, batch["engaged"]).loss.numpy(), rtol=1e-5)
    assert model.query_tower(batch, training=True).shape[1] == d + 64  # computed in training for the BCE
    assert model.product_tower.term_channel.word_weights is None  # the product's words are not weighted
    before = model.query_tower.term_channel.word_weights.numpy().copy()
    model.train_step(batch)
    changed = np.flatnonzero(model.query_tower.term_channel.word_weights.numpy() != before)
    if weight:  # the rows of the batch's query words moved, by the BCE's gradient (the tables are off the BCE)
        words = TermChannel.word_hashes(batch["query"]).flat_values.numpy() % WEIGHT_BUCKETS
        assert 0 < len(changed) and set(changed) <= set(words)
    else:  # contrastive only: the weights stay at 1, the same model as fixed weights
        assert len(changed) == 0


def test_the_query_bias_is_a_learned_offset_of_each_query():
    query = TermChannel(256, 0.5, "mean", query_bias=True)
    queries = tf.constant(["red sofa", "grey wool rug", ""])
    q, b = query.pool_with_bias(TermChannel.word_hashes(queries))
    assert q.shape == (3, 256) and b.shape == (3,)
    np.testing.assert_array_equal(b.numpy(), 0.0)  # started at 0
    np.testing.assert_allclose(q.numpy(), TermChannel(256, 0.5, "mean")(queries).numpy(), atol=1e-6)  # the plain channel
    red, sofa = TermChannel.word_hashes(tf.constant(["red sofa"]))[0].numpy()
    table = np.zeros(WEIGHT_BUCKETS, np.float32)
    table[red % WEIGHT_BUCKETS], table[sofa % WEIGHT_BUCKETS] = 0.3, -0.1
    query.bias_weights.assign(table)
    query.length_weight.assign(0.05)
    q2, b = query.pool_with_bias(TermChannel.word_hashes(queries))
    # b_q = the mean of the words' r + a log(1 + n); unseen words have r = 0; no words: 0.
    expected = [(0.3 - 0.1) / 2 + 0.05 * np.log(3), 0.05 * np.log(4), 0.0]
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(q2.numpy(), q.numpy())  # the vector does not carry it: no ranking changes
    with pytest.raises(ValueError, match="mean pooling only"):
        TermChannel(8, 1.0, "sum", query_bias=True)
    with pytest.raises(ConfigError, match="model.query_bias"):
        load_config(None, ["model.query_bias=true"])


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_the_engagement_task_alone_trains_the_query_bias(weight):
    batch, config, model = _tiny_model(weight, ["model.query_bias=true", "model.engagement_bias=learned"])
    d = config.model.embedding_dim
    assert model.query_tower(batch, training=True).shape[1] == d + 64  # computed in training for the BCE
    q, p = model(batch)
    assert p.shape[1] == d + 64  # vectors are D + K; the bias is the query tower's second output
    _, b = model.query_tower(batch, return_bias=True)
    ctr, bce, _ = model.task_losses(batch)
    np.testing.assert_allclose(bce.numpy(), model.engagement(q, p, batch["engaged"], query_bias=b).loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ctr.numpy(), model.retrieval(q[:, :d], p[:, :d], product_ids=batch["product_id"]).loss.numpy(),
                               rtol=1e-5)
    channel = model.query_tower.term_channel
    assert channel.bias_weights is not None and model.product_tower.term_channel.bias_weights is None
    model.train_step(batch)
    changed = np.flatnonzero(channel.bias_weights.numpy())
    if weight:  # the rows of the batch's query words moved, by the BCE's gradient (the tables are off the BCE)
        words = TermChannel.word_hashes(batch["query"]).flat_values.numpy() % WEIGHT_BUCKETS
        assert 0 < len(changed) and set(changed) <= set(words)
        assert channel.length_weight.numpy() != 0.0
    else:  # contrastive only: the bias stays 0, the same model as without it
        assert len(changed) == 0 and channel.length_weight.numpy() == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("weights, bias", [("fixed", False), ("engagement", False), ("engagement", True)])
def test_a_model_with_a_term_channel_trains_indexes_and_exports(tmp_path, weights, bias):
    data = str(tmp_path / "data")
    generate(data, products=150, impressions=2000, seed=3, image_dim=0)
    config = load_config(None, SMALL + ["model.term_dim=32", "model.term_weight=0.5", "train.epochs=1",
                                        f"model.term_weights={weights}", f"model.query_bias={str(bias).lower()}"])
    run = str(tmp_path / "run")
    history = train(config, data, run, verbose=0)
    assert np.isfinite(history["loss"][0])
    model = load_model(run)
    dim = config.model.embedding_dim
    queries = {"query": tf.constant(["red sofa", "oak desk lamps"]), "query_country": tf.constant(["US", "US"])}
    vectors, biases = (x.numpy() for x in model.query_tower(queries, return_bias=True))
    assert vectors.shape == (2, dim + 32) and biases.shape == (2,)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, :dim], axis=1), 1.0, rtol=1e-5)  # the towers' unit part
    channel = TermChannel(32, 0.5, "mean")(queries["query"]).numpy()
    if weights == "fixed":
        np.testing.assert_allclose(vectors[:, dim:], channel, atol=1e-6)
    else:  # the trained word weights moved the query's channel away from the plain mean
        assert np.abs(vectors[:, dim:] - channel).max() > 1e-4
    if bias:  # trained away from 0
        assert np.abs(biases).min() > 1e-4
    else:
        np.testing.assert_array_equal(biases, 0.0)
    # The input pipeline's featurized form (channel computed beside the step) gives the same vectors.
    np.testing.assert_allclose(model.query_tower(model.featurize(queries)).numpy(), vectors, atol=1e-5)
    products = {"product_title": tf.constant(["Red Sofa"]), "product_description": tf.constant(["with lamps"]),
                "product_category": tf.constant(["sofa"])}
    p = model.product_tower(products).numpy()
    assert p.shape == (1, dim + 32)
    np.testing.assert_allclose(p[:, dim:], TermChannel(32, 0.5, "sum")(tf.constant(["Red Sofa with lamps"])).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(model.product_tower(model.featurize(products)).numpy(), p, atol=1e-5)

    build_index(run, log=lambda _: None)
    index = load_index(run)
    assert index.vectors.shape[1] == dim + 32
    base = str(tmp_path / "serving")
    result = export_run(run, base, "q2e", log=lambda _: None)
    stock = tf.saved_model.load(os.path.join(base, "q2e", "1"))
    encoded = stock.signatures["query_encoder"](**queries)
    np.testing.assert_allclose(encoded["embedding"].numpy(), vectors, atol=1e-5)
    np.testing.assert_allclose(encoded["query_bias"].numpy(), biases, atol=1e-5)
    exact = stock.signatures["retrieval_exact"](**queries)
    scores, rows = exact_top_k(index.vectors, vectors, result["k"])
    assert [[x.decode() for x in row] for row in exact["product_ids"].numpy()] == index.product_ids[rows].tolist()
    # The engagement probability: the engagement task's σ(s_e·(score + b_q) + b) of each returned product.
    expected = model.engagement.probability(tf.constant(scores + biases[:, None])).numpy()
    np.testing.assert_allclose(exact["engagement_probability"].numpy(), expected, atol=1e-5)
    # Stock TensorFlow alone (no tf_q2e, no ScaNN, no TF_USE_LEGACY_KERAS) serves the channel.
    script = f"""
import os, sys, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
m = tf.saved_model.load({os.path.join(base, "q2e", "1")!r})
q = dict(query=tf.constant(["red sofa", "oak desk lamps"]), query_country=tf.constant(["US", "US"]))
print(json.dumps(m.signatures["query_encoder"](**q)["embedding"].numpy().tolist()))
print(any(name.startswith("tf_q2e") or name == "scann" for name in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    np.testing.assert_allclose(np.array(json.loads(lines[0])), vectors, atol=1e-5)
    assert lines[1] == "False"
