"""The evaluator end to end on a tiny synthetic marketplace, and its plumbing against hand-made cases."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tf_q2e.cli import main
from tf_q2e.errors import InputError
from tf_q2e.evaluate import comparison_table, evaluate, evaluate_run, ground_truth_metrics
from tf_q2e.judged import GroundTruth, Judged, load_ground_truth, load_judged, split_ground_truth
from tf_q2e.retrievers import BM25Retriever, HybridRetriever, catalogue_ranks, reciprocal_rank_fusion

from conftest import train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory)


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


@pytest.mark.slow
def test_q2e_evaluate_writes_the_report_and_plots(run, capsys):
    run_dir, data = run
    assert main(["evaluate", "--run", run_dir, "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "recall@100" in out and "in_batch_recall@1" in out
    eval_dir = os.path.join(run_dir, "eval")
    assert sorted(os.listdir(eval_dir)) == ["recall_at_k.png", "reliability.png", "report.json", "report.md",
                                            "score_histograms.png"]
    with open(os.path.join(eval_dir, "report.json")) as f:
        report = json.load(f)
    m = report["metrics"]
    for name in ("recall@10", "recall@100", "recall@1000", "mrr", "engagement_auc_pooled", "engagement_auc_per_query",
                 "engagement_ece", "ndcg@10", "relevance_auc", "in_batch_recall@1"):
        low, high = m[name]["ci95"]
        assert low <= m[name]["mean"] <= high, name
    # 300 products: the top 1000 is the whole catalogue, so every engaged product is found.
    assert m["recall@1000"]["mean"] == 1.0
    assert m["recall@10"]["mean"] <= m["recall@100"]["mean"] <= 1.0
    assert report["split"] == "test" and report["queries_with_engaged"] > 0
    # Calibration of the engagement probability: ECE over the reliability curve's bins of the labelled pairs.
    curve = report["reliability"]
    assert sum(curve["count"]) == m["engagement_ece"]["pairs"] == m["engagement_auc_pooled"]["pairs"]
    ece = sum(c * abs(o - p) for c, o, p in zip(curve["count"], curve["observed"], curve["mean_predicted"]) if c)
    assert m["engagement_ece"]["mean"] == pytest.approx(ece / sum(curve["count"]))
    with open(os.path.join(eval_dir, "recall_at_k.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_validation_report_goes_beside_the_test_report(run, capsys):
    run_dir, data = run
    assert main(["evaluate", "--run", run_dir, "--bootstrap", "20"]) == 0
    assert main(["evaluate", "--run", run_dir, "--split", "validation", "--bootstrap", "20"]) == 0
    assert "eval-validation" in capsys.readouterr().out
    reports = {}
    for name in ("eval", "eval-validation"):
        with open(os.path.join(run_dir, name, "report.json")) as f:
            reports[name] = json.load(f)
    assert reports["eval"]["split"] == "test" and reports["eval-validation"]["split"] == "validation"
    assert reports["eval"]["queries"] != reports["eval-validation"]["queries"]


@pytest.mark.slow
def test_dense_scores_are_the_towers_cosines_and_probabilities_the_engagement_tasks(run):
    from tf_q2e.retrievers import dense_retriever_for_run

    run_dir, data = run
    retriever, _, model = dense_retriever_for_run(run_dir)
    judged = load_judged(os.path.join(data, "test.parquet"), model.context_columns)
    scores = retriever.score_pairs(judged)
    assert np.all(np.abs(scores) <= 1.0 + 1e-5)
    ranked = retriever.search(judged, 5)
    q, bias = retriever.query_vectors(judged)
    np.testing.assert_array_equal(bias, 0.0)  # no query bias in this model
    best = retriever.product_ids[np.argmax(q @ retriever.vectors.T, axis=1)]
    assert list(ranked[:, 0]) == list(best)
    expected = 1 / (1 + np.exp(-model.engagement.scale * scores))  # σ(s·cos), the paper's form: no bias
    np.testing.assert_allclose(retriever.engagement_probabilities(judged), expected, rtol=1e-4)
    per_batch = retriever.in_batch_recall_at_1(judged, 32)
    assert len(per_batch) == len(judged.row_query) // 32 and np.all((0 <= per_batch) & (per_batch <= 1))


@pytest.mark.slow
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
    assert reports[1]["ground_truth_queries"] == 5 and "gt_ndcg@10" in reports[1]["metrics"]  # BM25 too
    assert sorted(os.listdir(out)) == ["compare.json", "compare.md", "recall_at_k.png"]


@pytest.mark.slow
def test_bm25_retriever_scores_judged_pairs(run):
    run_dir, data = run
    retriever = BM25Retriever.for_data(data)
    judged = load_judged(os.path.join(data, "test.parquet"), ("query_country",))
    scores = retriever.score_pairs(judged)
    assert scores.shape == judged.row_query.shape and np.all(scores >= 0)
    ids = retriever.search(judged, 3)
    assert ids.shape == (len(judged.queries), 3)


@pytest.mark.slow
def test_bad_arguments(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(["compare"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert main(["evaluate", "--run", run_dir, "--bootstrap", "1"]) == 2
    assert main(["evaluate", "--run", str(tmp_path / "none")]) == 2
    assert main(["compare", "--bm25"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["compare", "--hybrid"]) == 2
    assert "needs runs" in capsys.readouterr().err
    assert main(["compare", "--bm25", "--hybrid", "--data", "unused"]) == 2
    assert "--hybrid needs run directories" in capsys.readouterr().err


# -- the hybrid retriever (BM25 + dense by reciprocal rank fusion) ---------------------------------


class StubRetriever:
    """A retriever over a tiny catalogue with hand-set scores [Q, N] of each distinct query.

    `search` lists the products scoring above `floor` (as BM25 lists only products sharing a
    term with the query), best first, ties by catalogue order, "" after them.
    """

    def __init__(self, name, product_ids, scores, floor=-np.inf):
        self.name, self.floor = name, floor
        self.product_ids = np.array(product_ids, dtype=object)
        self.scores = np.asarray(scores, dtype=np.float32)

    def search(self, judged, k):
        k = min(k, len(self.product_ids))
        out = np.full((len(self.scores), k), "", dtype=object)
        for q, row in enumerate(self.scores):
            order = [i for i in np.lexsort((np.arange(len(row)), -row)) if row[i] > self.floor][:k]
            out[q, :len(order)] = self.product_ids[order]
        return out

    def catalogue_scores(self, judged, start, stop):
        return self.scores[start:stop]

    def score_pairs(self, judged):
        column = {p: i for i, p in enumerate(self.product_ids)}
        return self.scores[judged.row_query, [column[p] for p in judged.row_product]].astype(np.float64)


def _judged(rows, engaged=None):
    """A split of (query index, product id) rows; queries "q0", "q1", ..."""
    queries = [f"q{i}" for i in range(max(q for q, _ in rows) + 1)]
    return Judged(queries=queries, contexts={}, row_query=np.array([q for q, _ in rows]),
                  row_product=np.array([p for _, p in rows], dtype=object),
                  engaged=np.array(engaged if engaged is not None else [-1] * len(rows)),
                  relevance=np.full(len(rows), np.nan), path="split")


def test_reciprocal_rank_fusion_matches_hand_computed_values():
    dense = np.array([["A", "B", "C", "D"], ["E", "D", "A", "B"]], dtype=object)
    bm25 = np.array([["C", "E", "", ""], ["D", "E", "", ""]], dtype=object)
    ids, scores = reciprocal_rank_fusion([dense, bm25], k=5, k_rrf=60)
    # q0: C in both (1/63 + 1/61); A, B, D dense only; E BM25 only, tied with B at 1/62: B has a dense rank, E none.
    # q1: E (1/61 + 1/62) and D (1/62 + 1/61) tie: E is first in the dense list. C is in neither list: "" and 0.
    assert ids.tolist() == [["C", "A", "B", "E", "D"], ["E", "D", "A", "B", ""]]
    np.testing.assert_array_equal(scores, [[1 / 63 + 1 / 61, 1 / 61, 1 / 62, 1 / 62, 1 / 64],
                                           [1 / 61 + 1 / 62, 1 / 62 + 1 / 61, 1 / 63, 1 / 64, 0.0]])
    ids, scores = reciprocal_rank_fusion([dense, bm25], k=2, k_rrf=0)  # k_rrf = 0: 1 / rank
    assert ids.tolist() == [["C", "A"], ["E", "D"]]
    np.testing.assert_array_equal(scores, [[1 / 3 + 1 / 1, 1 / 1], [1 / 1 + 1 / 2, 1 / 2 + 1 / 1]])


def test_hybrid_search_fuses_each_retrievers_top_depth():
    ids = ["A", "B", "C", "D", "E"]
    dense = StubRetriever("dense", ids, [[0.9, 0.8, 0.7, 0.6, 0.5], [0.6, 0.5, 0.2, 0.8, 0.9]])
    bm25 = StubRetriever("bm25", ids, [[0, 0, 2, 0, 1], [0, 0, 0, 3, 2]], floor=0)
    judged = _judged([(0, "A"), (1, "A")])
    hybrid = HybridRetriever(dense, bm25)
    assert hybrid.name == "hybrid(dense)"
    # q0: C 1/63 + 1/61, E 1/65 + 1/62, A 1/61, B 1/62, D 1/64; q1: E and D tie at 1/61 + 1/62 (E is first in
    # the dense list), then A, B, C from the dense list only. k = 8 is capped at the catalogue's 5 products.
    assert hybrid.search(judged, 8).tolist() == [["C", "E", "A", "B", "D"], ["E", "D", "A", "B", "C"]]
    # depth 1, k 2: each list's top 2 (= max(depth, k)); q0's A (dense 1) and C (BM25 1) tie at 1/61.
    assert HybridRetriever(dense, bm25, depth=1).search(judged, 2).tolist() == [["A", "C"], ["E", "D"]]


def test_hybrid_finds_what_either_retriever_finds():
    # A and F are both engaged for q0: the dense model ranks A first and F last; BM25 matches F only.
    ids = ["A", "B", "C", "D", "E", "F"]
    dense = StubRetriever("dense", ids, [[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1, 0.9, 0.2, 0.3, 0.4, 0.5]])
    bm25 = StubRetriever("bm25", ids, [[0, 0, 0, 0, 0, 2.0], [0, 1.0, 0, 0, 0, 0]], floor=0)
    judged = _judged([(0, "A"), (0, "F"), (0, "C"), (1, "B"), (1, "A")], engaged=[1, 1, 0, 1, 0])
    recall = {r.name: evaluate(r, judged, ks=(2,), n_boot=20)["metrics"]["recall@2"]["mean"]
              for r in (dense, bm25, HybridRetriever(dense, bm25, name="hybrid"))}
    assert recall == {"dense": 0.75, "bm25": 0.75, "hybrid": 1.0}  # q0: A or F alone (1/2); q1: B (1)
    assert HybridRetriever(dense, bm25).search(judged, 2)[0].tolist() == ["F", "A"]  # F 1/66 + 1/61, A 1/61


def test_hybrid_pair_scores_use_full_catalogue_ranks():
    ids = ["A", "B", "C", "D", "E"]
    # q0, dense: A 1, E 2, B and C share 3 (equal scores), D 5. BM25: B 1, D 2, A, C, E share 3 (score 0).
    dense = StubRetriever("dense", ids, [[0.9, 0.5, 0.5, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4, 0.5]])
    bm25 = StubRetriever("bm25", ids, [[0, 2.0, 0, 1.0, 0], [0, 0, 0, 0, 0]], floor=0)
    hybrid = HybridRetriever(dense, bm25, depth=1)  # the depth plays no part in pair scores
    judged = _judged([(0, "A"), (0, "C"), (0, "D"), (1, "E"), (1, "A")])
    np.testing.assert_array_equal(hybrid.score_pairs(judged), [
        1 / 61 + 1 / 63, 1 / 63 + 1 / 63, 1 / 65 + 1 / 62,
        1 / 61 + 1 / 61, 1 / 65 + 1 / 61])  # q1: BM25 scores all 0, so every product has BM25 rank 1
    random = hybrid.random_pair_scores(judged, np.random.default_rng(3))
    drawn = np.array(ids, dtype=object)[np.random.default_rng(3).integers(0, 5, size=5)]
    np.testing.assert_array_equal(random, hybrid.score_pairs(_judged(list(zip(judged.row_query, drawn)))))


def test_catalogue_ranks_compare_or_sort_alike():
    # 40 rows of q1 take the sorting path (more than 32 rows of one query), 3 rows of q0 the comparing one.
    scores = np.array([[0.3, 0.1, 0.3, 0.2], [0.5, 0.5, 0.4, 0.9]], dtype=np.float32)
    stub = StubRetriever("s", ["A", "B", "C", "D"], scores)
    rows = [(0, 0), (0, 1), (0, 3)] + [(1, i % 4) for i in range(40)]
    judged = _judged([(q, "ABCD"[c]) for q, c in rows])
    expected = [1, 4, 3] + [[2, 2, 4, 1][i % 4] for i in range(40)]
    np.testing.assert_array_equal(catalogue_ranks(stub, judged, np.array([c for _, c in rows])), expected)


def test_hybrid_needs_one_catalogue():
    dense = StubRetriever("dense", ["A", "B"], [[1, 0]])
    with pytest.raises(ValueError, match="different catalogues"):
        HybridRetriever(dense, StubRetriever("bm25", ["A", "C"], [[1, 0]]))
    with pytest.raises(ValueError, match="k_rrf"):
        HybridRetriever(dense, dense, k_rrf=-1)


@pytest.mark.slow
def test_q2e_compare_with_hybrid(run, tmp_path, capsys):
    run_dir, data = run
    out = tmp_path / "cmp"
    assert main(["compare", run_dir, "--bm25", "--hybrid", "--out", str(out), "--bootstrap", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    name = os.path.basename(run_dir)
    assert [line.split("|")[1].strip() for line in lines[2:5]] == [name, "bm25", f"hybrid({name})"]
    with open(out / "compare.json") as f:
        reports = json.load(f)
    hybrid = reports[2]
    assert hybrid["model"] == f"hybrid({name})" and hybrid["run"] == os.path.abspath(run_dir)
    assert hybrid["metrics"]["recall@1000"]["mean"] == 1.0  # 300 products: the dense list holds them all
    assert "engagement_auc_pooled" in hybrid["metrics"] and "in_batch_recall@1" not in hybrid["metrics"]
    assert 0.0 <= hybrid["metrics"]["gt_recall@100"]["mean"] <= 1.0


# -- ground truth (the synthetic marketplace's manifest) ------------------------------------------


class ByQueryRetriever(FixedRetriever):
    """A `FixedRetriever` whose hand-set rankings are per query text; it keeps each search's `Judged` and depth."""

    def __init__(self, ranked: dict, scores=()):
        super().__init__(ranked, scores)
        self.searches = []

    def search(self, judged, k):
        self.searches.append((judged, k))
        return np.array([(self.ranked.get(q, [])[:k] + [""] * k)[:k] for q in judged.queries], dtype=object)


def _truth():
    """q0: 12 true products P0..P11, gains 0.9, 0.85, ...; q1: a list of 2; q2: a list of 1."""
    ids0 = [f"P{i}" for i in range(12)]
    return GroundTruth(queries=["q0", "q1", "q2"], countries=["US", "GB", "DE"],
                       product_ids=[ids0, ["A", "B"], ["C"]],
                       gains=[0.9 - 0.05 * np.arange(12), np.array([0.5, 0.25]), np.array([0.4])],
                       split="test", path="manifest.json")


def test_ground_truth_metrics_match_hand_computed_values():
    retriever = ByQueryRetriever({"q0": ["P1", "X", "P0", "P10", "P5"], "q1": ["B", "Z", "A"], "q2": ["Y"]})
    m = ground_truth_metrics(retriever, _truth(), n_boot=20, context_columns=("query_country", "query_locale"))
    # Recall: q0 finds P1, P0, P5 of its true best 10 (P10 is 11th); q1 both of its 2; q2 none of its 1.
    assert m["gt_recall@100"]["mean"] == pytest.approx((3 / 10 + 1 + 0) / 3) and m["gt_recall@100"]["queries"] == 3
    d = 1 / np.log2(np.arange(10) + 2)  # discounts of places 1..10
    g0 = 0.9 - 0.05 * np.arange(12)
    ndcg0 = (g0[1] * d[0] + g0[0] * d[2] + g0[10] * d[3] + g0[5] * d[4]) / (g0[:10] @ d)  # P10 gains though not in the top 10
    ndcg1 = (0.25 * d[0] + 0.5 * d[2]) / (0.5 * d[0] + 0.25 * d[1])
    assert m["gt_ndcg@10"]["mean"] == pytest.approx((ndcg0 + ndcg1 + 0) / 3)
    low, high = m["gt_ndcg@10"]["ci95"]
    assert low <= m["gt_ndcg@10"]["mean"] <= high
    # One search at depth 100, each query with its ground-truth country; other context columns empty.
    (judged, k), = retriever.searches
    assert k == 100 and judged.queries == ["q0", "q1", "q2"]
    assert judged.contexts == {"query_country": ["US", "GB", "DE"], "query_locale": ["", "", ""]}


def test_ground_truth_metrics_of_a_retriever_that_finds_nothing():
    m = ground_truth_metrics(ByQueryRetriever({"q1": ["X"], "q2": ["", "Y"]}), _truth(), n_boot=20)
    for name in ("gt_recall@100", "gt_ndcg@10"):
        assert m[name] == {"mean": 0.0, "ci95": [0.0, 0.0], "queries": 3}


def _write_manifest(directory, **sections):
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"format": "tf_q2e", **sections}, f)
    return str(directory)


def test_load_ground_truth_is_none_without_the_section(tmp_path):
    assert load_ground_truth(str(tmp_path)) is None  # no manifest
    assert load_ground_truth(_write_manifest(tmp_path)) is None
    assert load_ground_truth(_write_manifest(tmp_path, ground_truth={"split": "test", "queries": []})) is None


def test_load_ground_truth_reads_the_section(tmp_path):
    entries = [{"query": "red sofa", "query_country": "GB", "product_ids": ["P2", "P1"], "expected_engagement": [0.5, 0.25]},
               {"query": "bike", "product_ids": ["P3", "P4", "P5"]}]  # no gains, no country
    truth = load_ground_truth(_write_manifest(tmp_path, ground_truth={"split": "test", "queries": entries}))
    assert truth.queries == ["red sofa", "bike"] and truth.countries == ["GB", ""] and truth.split == "test"
    assert truth.product_ids == [["P2", "P1"], ["P3", "P4", "P5"]]
    np.testing.assert_array_equal(truth.gains[0], [0.5, 0.25])
    np.testing.assert_array_equal(truth.gains[1], [1, 1 / 2, 1 / 3])  # no expected engagement: 1 / rank
    entries[0]["expected_engagement"] = [0.5]
    _write_manifest(tmp_path, ground_truth={"queries": entries})
    with pytest.raises(InputError, match=r"ground_truth.queries\[0\] is invalid"):
        load_ground_truth(str(tmp_path))


def test_evaluate_adds_ground_truth_metrics_only_with_truth():
    judged = Judged(queries=["q0"], contexts={}, row_query=np.array([0, 0]), row_product=np.array(["A", "B"], dtype=object),
                    engaged=np.array([1, 0]), relevance=np.full(2, np.nan), path="split")
    retriever = ByQueryRetriever({"q0": ["A", "B"], "q1": ["B", "A"], "q2": ["C"]}, scores=[0.9, 0.1])
    plain = evaluate(retriever, judged, ks=(1,), n_boot=20)
    assert not any(name.startswith("gt_") for name in plain["metrics"]) and "ground_truth_queries" not in plain
    report = evaluate(retriever, judged, ks=(1,), n_boot=20, truth=_truth())
    assert report["ground_truth_queries"] == 3
    # The split's q0 finds A first; the ground truth's q0 (P0..P11) nothing, q1 and q2 their whole lists.
    assert report["metrics"]["recall@1"]["mean"] == 1.0
    assert report["metrics"]["gt_recall@100"]["mean"] == pytest.approx((0 + 1 + 1) / 3)
    assert "gt_recall@100" in comparison_table([report]).splitlines()[0]


@pytest.mark.slow
def test_evaluate_run_reports_ground_truth_metrics(run, tmp_path):
    run_dir, data = run
    with open(os.path.join(data, "manifest.json")) as f:
        section = json.load(f)["ground_truth"]
    assert section["split"] == "test" and len(section["queries"]) == 5  # the fixture's ground_truth_queries
    report = evaluate_run(run_dir, n_boot=20)
    assert report["ground_truth_queries"] == 5
    for name in ("gt_recall@100", "gt_ndcg@10"):
        value = report["metrics"][name]
        assert value["queries"] == 5 and 0.0 <= value["ci95"][0] <= value["mean"] <= value["ci95"][1] <= 1.0, name
    assert split_ground_truth(data, "validation") is None  # the ground truth is of the test split

