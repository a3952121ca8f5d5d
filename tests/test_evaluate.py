"""The evaluator end to end on a tiny synthetic marketplace, and its plumbing against hand-made cases."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tf_q2e.cli import main
from tf_q2e.config import load_config
from tf_q2e.data.synth import generate
from tf_q2e.evaluate import BM25Retriever, Judged, comparison_table, evaluate, load_judged
from tf_q2e.train import train

TINY = [
    "features.buckets=2048", "features.category_buckets=64", "features.context_buckets=32", "features.max_words=16",
    "model.embedding_dim=16", "model.text_embedding_dim=16", "model.hidden_dim=16",
    "train.global_batch_size=64", "train.shuffle_buffer=1000", "train.learning_rate=0.01",
    "train.early_stopping_patience=0", "train.steps_per_execution=1", "train.epochs=1", "train.steps_per_epoch=20",
    "train.validation_steps=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    generate(data, products=300, impressions=3000, seed=7, image_dim=0, ground_truth_queries=5)
    run_dir = str(tmp_path_factory.mktemp("run"))
    train(load_config(None, TINY), data, run_dir, verbose=0)
    return run_dir, data


class FixedRetriever:
    """A retriever with hand-set rankings and scores, to check the evaluator's plumbing."""

    name = "fixed"

    def __init__(self, ranked, scores):
        self.ranked, self.scores = ranked, scores

    def search(self, judged, k):
        return np.array([row[:k] + [""] * (k - len(row[:k])) for row in self.ranked], dtype=object)

    def score_pairs(self, judged):
        return np.asarray(self.scores, dtype=np.float64)


def test_evaluate_combines_the_metrics_as_specified():
    # Query 0: engaged A, hard negative B, unlabelled C; query 1: hard negative A only (no engaged product).
    judged = Judged(queries=["q0", "q1"], contexts={}, row_query=np.array([0, 0, 0, 1]),
                    row_product=np.array(["A", "B", "C", "A"], dtype=object), engaged=np.array([1, 0, -1, 0]),
                    relevance=np.array([3.0, 1.0, 2.0, 1.0]), path="split")
    retriever = FixedRetriever([["B", "A"], ["A"]], scores=[0.9, 0.1, 0.5, 0.2])
    report = evaluate(retriever, judged, ks=(1, 2), n_boot=50)
    m = report["metrics"]
    assert report["queries_with_engaged"] == 1  # q1 has no engaged product: out of recall and MRR
    assert m["recall@1"]["mean"] == 0.0 and m["recall@2"]["mean"] == 1.0  # A is second for q0
    assert m["mrr"]["mean"] == 0.5
    # Labelled pairs (C is unlabelled): positives {0.9}, negatives {0.1, 0.2} -> AUC 1.
    assert m["engagement_auc_pooled"]["mean"] == 1.0 and m["engagement_auc_pooled"]["pairs"] == 3
    assert m["engagement_auc_per_query"]["queries"] == 1  # q1 has one class only
    # NDCG@10 of q0 ranks A (gain 2), C (1), B (0): ideal; q1 has only the lowest grade -> undefined.
    assert m["ndcg@10"]["mean"] == pytest.approx(1.0) and m["ndcg@10"]["queries"] == 1
    # Relevant = grade above the midpoint 2 of the scale [1, 3]: A (0.9) vs B, A@q1 (0.1, 0.2); C (2.0) is irrelevant.
    assert m["relevance_auc"]["mean"] == pytest.approx(1.0)
    assert report["recall_curve"]["k"][0] == 1
    header, _, row = comparison_table([report]).splitlines()
    assert header.split("|")[2].strip() == "mrr"  # recall@1 and @2 are not table columns
    assert row.startswith("| fixed | 0.5000")


def test_q2e_evaluate_writes_the_report_and_plots(run, capsys):
    run_dir, data = run
    assert main(["evaluate", "--run", run_dir, "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "recall@100" in out and "in_batch_recall@1" in out
    eval_dir = os.path.join(run_dir, "eval")
    assert sorted(os.listdir(eval_dir)) == ["recall_at_k.png", "report.json", "report.md", "score_histograms.png"]
    with open(os.path.join(eval_dir, "report.json")) as f:
        report = json.load(f)
    m = report["metrics"]
    for name in ("recall@10", "recall@100", "recall@1000", "mrr", "engagement_auc_pooled", "engagement_auc_per_query",
                 "ndcg@10", "relevance_auc", "in_batch_recall@1"):
        low, high = m[name]["ci95"]
        assert low <= m[name]["mean"] <= high, name
    # 300 products: the top 1000 is the whole catalogue, so every engaged product is found.
    assert m["recall@1000"]["mean"] == 1.0
    assert m["recall@10"]["mean"] <= m["recall@100"]["mean"] <= 1.0
    assert report["split"] == "test" and report["queries_with_engaged"] > 0
    with open(os.path.join(eval_dir, "recall_at_k.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dense_scores_are_the_towers_cosines(run):
    from tf_q2e.evaluate import dense_retriever_for_run

    run_dir, data = run
    retriever, _, model = dense_retriever_for_run(run_dir)
    judged = load_judged(os.path.join(data, "test.parquet"), model.context_columns)
    scores = retriever.score_pairs(judged)
    assert np.all(np.abs(scores) <= 1.0 + 1e-5)
    ranked = retriever.search(judged, 5)
    q = retriever.query_vectors(judged)
    best = retriever.product_ids[np.argmax(q @ retriever.vectors.T, axis=1)]
    assert list(ranked[:, 0]) == list(best)
    per_batch = retriever.in_batch_recall_at_1(judged, 32)
    assert len(per_batch) == len(judged.row_query) // 32 and np.all((0 <= per_batch) & (per_batch <= 1))


def test_q2e_compare_with_bm25(run, tmp_path, capsys):
    run_dir, data = run
    out = tmp_path / "cmp"
    assert main(["compare", run_dir, "--bm25", "--out", str(out), "--bootstrap", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == [os.path.basename(run_dir), "bm25"]
    with open(out / "compare.json") as f:
        reports = json.load(f)
    assert [r["model"] for r in reports] == [os.path.basename(run_dir), "bm25"]
    assert "in_batch_recall@1" not in reports[1]["metrics"]  # a dense-only metric
    assert sorted(os.listdir(out)) == ["compare.json", "compare.md", "recall_at_k.png"]


def test_bm25_retriever_scores_judged_pairs(run):
    run_dir, data = run
    retriever = BM25Retriever.for_data(data)
    judged = load_judged(os.path.join(data, "test.parquet"), ("query_country",))
    scores = retriever.score_pairs(judged)
    assert scores.shape == judged.row_query.shape and np.all(scores >= 0)
    ids = retriever.search(judged, 3)
    assert ids.shape == (len(judged.queries), 3)


def test_bad_arguments(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(["compare"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert main(["evaluate", "--run", run_dir, "--bootstrap", "1"]) == 2
    assert main(["evaluate", "--run", str(tmp_path / "none")]) == 2
    assert main(["compare", "--bm25"]) == 2
    assert "needs --data" in capsys.readouterr().err
