"""Tests of tf_q2e.metrics against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import tf_q2e.metrics as M

from tf_q2e.metrics import (
    bootstrap_ci,
    bootstrap_grouped,
    group_ids,
    mean_defined,
    ndcg_at_k,
    per_query_auc,
    recall_at_k,
    reciprocal_rank,
    roc_auc,
    summary,
)

LOG2_3 = math.log2(3)  # discount of the second place: log2(1 + 2)


# ------------------------------------------------------------------ recall@k


def test_recall_at_k_hand_computed():
    ranked = [["a", "b", "c"], ["x", "y"]]
    relevant = [{"a", "c", "z"}, {"y"}]
    # k=2: q0 top {a, b} ∩ {a, c, z} = {a} → 1/3; q1 top {x, y} ∩ {y} → 1/1
    np.testing.assert_allclose(recall_at_k(ranked, relevant, k=2), [1 / 3, 1.0])
    # k=3: q0 top {a, b, c} ∩ {a, c, z} = {a, c} → 2/3; q1 list has only 2 places → still 1
    np.testing.assert_allclose(recall_at_k(ranked, relevant, k=3), [2 / 3, 1.0])


def test_recall_short_lists_and_empty_places():
    # list shorter than k: 1 of the 2 relevant came back → 1/2 (denominator stays |relevant|)
    assert recall_at_k([["a"]], [{"a", "b"}], k=5)[0] == 0.5
    # "" places fill the list but never match, even when "" is in the relevant set
    assert recall_at_k([["a", "", ""]], [{"a", "b", ""}], k=3)[0] == 0.5
    # an empty place takes a place: with k=1 the top-1 is "" → 0
    assert recall_at_k([["", "a"]], [{"a"}], k=1)[0] == 0.0
    assert recall_at_k([["", "a"]], [{"a"}], k=2)[0] == 1.0


def test_recall_counts_a_repeated_item_once():
    # top-3 {a, a, a} → set {a}; relevant {a, b} → 1/2, not 3/2
    assert recall_at_k([["a", "a", "a"]], [{"a", "b"}], k=3)[0] == 0.5


def test_recall_query_without_relevant_items_is_excluded_from_the_mean():
    ranked = [["a", "b"], ["c", "d"], ["e", "f"]]
    relevant = [{"a"}, {"x"}, set()]
    per_query = recall_at_k(ranked, relevant, k=2)
    # q0 → 1, q1 → 0, q2 has nothing relevant → NaN (not 0, not 1)
    assert per_query[:2].tolist() == [1.0, 0.0]
    assert np.isnan(per_query[2])
    assert mean_defined(per_query) == 0.5  # (1 + 0) / 2, not (1 + 0 + 0) / 3
    # a relevant set holding only the empty string is empty too
    assert np.isnan(recall_at_k([["", "a"]], [{""}], k=2)[0])


def test_recall_accepts_a_bytes_array_from_a_tensorflow_signature():
    ranked = np.array([[b"P1", b"P2", b""], [b"P9", b"", b""]])
    # q0: {P1, P2} ∩ {P2, P3} → 1/2; q1: {P9} ∩ {P4} → 0
    np.testing.assert_allclose(recall_at_k(ranked, [{"P2", "P3"}, {"P4"}], k=3), [0.5, 0.0])


def test_recall_validates_k_and_lengths():
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k([["a"]], [{"a"}], k=0)
    with pytest.raises(ValueError, match="queries"):
        recall_at_k([["a"], ["b"]], [{"a"}], k=1)


# ---------------------------------------------------------- reciprocal rank


def test_reciprocal_rank_hand_computed_and_mrr():
    ranked = [["x", "a", "b"], ["a"], ["x", "y"], ["p"]]
    relevant = [{"b", "a"}, {"a"}, {"z"}, set()]
    rr = reciprocal_rank(ranked, relevant)
    # q0 first relevant "a" at rank 2 → 1/2; q1 rank 1 → 1; q2 none → 0; q3 no relevant → NaN
    np.testing.assert_array_equal(rr[:3], [0.5, 1.0, 0.0])
    assert np.isnan(rr[3])
    assert mean_defined(rr) == 0.5  # MRR = (1/2 + 1 + 0) / 3
    # k=1 cuts q0's hit at rank 2 → 0
    np.testing.assert_array_equal(reciprocal_rank(ranked, relevant, k=1)[:3], [0.0, 1.0, 0.0])


def test_reciprocal_rank_counts_empty_places():
    # "" places take ranks 1 and 2, "a" is at rank 3 → 1/3; with k=2 it is cut off → 0
    assert reciprocal_rank([["", "", "a"]], [{"a"}])[0] == pytest.approx(1 / 3)
    assert reciprocal_rank([["", "", "a"]], [{"a"}], k=2)[0] == 0.0


# ---------------------------------------------------------------------- AUC


def test_roc_auc_with_ties_counts_half():
    # positive 1 vs negatives 1 (tie → 1/2) and 0 (win → 1): (1/2 + 1) / 2 pairs = 0.75
    assert roc_auc([1, 1, 0], [1, 0, 0]) == 0.75


def test_roc_auc_hand_computed_two_positives_three_negatives():
    scores = [0.9, 0.4, 0.5, 0.4, 0.1]
    labels = [1, 1, 0, 0, 0]
    # pos 0.9 beats 0.5, 0.4, 0.1 → 3; pos 0.4 vs 0.5 → 0, vs 0.4 → 1/2, vs 0.1 → 1
    # (3 + 1.5) / (2 · 3) = 0.75
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert roc_auc(scores, np.array(labels, dtype=bool)) == pytest.approx(0.75)


def test_roc_auc_extremes():
    assert roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert roc_auc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5  # all four pairs tied


def test_roc_auc_single_class_is_nan():
    assert math.isnan(roc_auc([0.1, 0.7, 0.3], [1, 1, 1]))
    assert math.isnan(roc_auc([0.1, 0.7], [0, 0]))
    assert math.isnan(roc_auc([], []))


def test_roc_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0.1, 0.2], [-1, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="rows"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Σ over positive–negative pairs of [s_pos > s_neg] + 0.5 · [s_pos = s_neg], / pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_brute_force_pair_count_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=200)
    scores = rng.integers(0, 6, size=200) + 2 * labels  # 8 distinct values: many ties, AUC well above 0.5
    expected = brute_force_auc(scores.astype(float), labels)
    assert 0.55 < expected < 0.95  # not a degenerate case
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    # the grouped version with one group agrees
    assert per_query_auc(scores, labels, np.zeros(200))[0] == pytest.approx(expected, abs=1e-12)


def test_per_query_auc_hand_computed_with_a_single_class_group():
    groups = ["q2", "q1", "q1", "q2", "q3", "q3", "q1"]
    scores = [0.2, 0.9, 0.3, 0.8, 0.5, 0.4, 0.3]
    labels = [1, 1, 0, 0, 1, 1, 1]
    auc = per_query_auc(scores, labels, groups)
    # output order = sorted ids: q1, q2, q3
    assert group_ids(groups).tolist() == ["q1", "q2", "q3"]
    # q1: pos 0.9, 0.3 vs neg 0.3 → 1 + 1/2 = 1.5 over 2 pairs = 0.75
    # q2: pos 0.2 vs neg 0.8 → 0 over 1 pair = 0
    # q3: positives only → NaN
    assert auc[0] == pytest.approx(0.75)
    assert auc[1] == 0.0
    assert np.isnan(auc[2])
    assert mean_defined(auc) == pytest.approx(0.375)  # (0.75 + 0) / 2; q3 excluded


def test_per_query_auc_matches_roc_auc_on_each_group():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 20, size=400)
    labels = rng.integers(0, 2, size=400)
    scores = np.round(rng.normal(size=400) + labels, 1)  # rounded: ties inside groups
    auc = per_query_auc(scores, labels, groups)
    expected = [roc_auc(scores[groups == g], labels[groups == g]) for g in np.unique(groups)]
    np.testing.assert_allclose(auc, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------- NDCG


def test_ndcg_hand_computed_with_k_cut():
    # query "a": 4 judged items; query "b" holds a 0 so the scale bottom is 0 → gain = grade
    scores = [0.9, 0.8, 0.7, 0.1, 0.5, 0.4]
    grades = [1, 3, 0, 2, 2, 0]
    groups = ["a", "a", "a", "a", "b", "b"]
    ndcg = ndcg_at_k(scores, grades, groups, k=3)
    # a, by score: gains 1, 3, 0 (| 2 cut by k=3): DCG = 1/log2(2) + 3/log2(3) + 0/log2(4)
    # ideal gains 3, 2, 1: IDCG = 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 2/log2(3) + 1/2
    expected_a = (1 + 3 / LOG2_3) / (3 + 2 / LOG2_3 + 0.5)  # ≈ 0.6075
    assert ndcg[0] == pytest.approx(expected_a)
    # b: gains 2, 0 already in ideal order → 1
    assert ndcg[1] == pytest.approx(1.0)
    # k=1: a's top item has gain 1, ideal 3 → 1/3
    assert ndcg_at_k(scores, grades, groups, k=1)[0] == pytest.approx(1 / 3)
    # k ≥ group size: all 4 items; DCG adds 2/log2(5), IDCG adds 0/log2(5)
    expected_all = (1 + 3 / LOG2_3 + 2 / math.log2(5)) / (3 + 2 / LOG2_3 + 0.5)
    assert ndcg_at_k(scores, grades, groups, k=10)[0] == pytest.approx(expected_all)


def test_ndcg_gain_is_grade_minus_the_lowest_grade():
    # scale 1..3 (bottom 1): scores put the grade-1 item first
    scores, grades, groups = [2.0, 1.0], [1, 3], [0, 0]
    # gains 0, 2: DCG = 0 + 2/log2(3); IDCG = 2/1 + 0 → 1/log2(3) ≈ 0.631
    assert ndcg_at_k(scores, grades, groups)[0] == pytest.approx(1 / LOG2_3)
    # raw grades as gains (min_grade=0): (1 + 3/log2 3) / (3 + 1/log2 3) ≈ 0.797: closer to 1
    raw = (1 + 3 / LOG2_3) / (3 + 1 / LOG2_3)
    assert ndcg_at_k(scores, grades, groups, min_grade=0)[0] == pytest.approx(raw)
    assert raw > 1 / LOG2_3 + 0.15
    with pytest.raises(ValueError, match="below min_grade"):
        ndcg_at_k(scores, grades, groups, min_grade=2)


def test_ndcg_default_bottom_is_over_all_rows_not_per_query():
    # query 1's lowest grade is 1 but the scale bottom (over all rows) is 0, so its grade-1 item has gain 1
    scores = [1.0, 2.0, 1.0, 2.0]
    grades = [2, 1, 0, 0]
    groups = [1, 1, 2, 2]
    ndcg = ndcg_at_k(scores, grades, groups)
    # query 1 by score: gains 1, 2 → DCG = 1 + 2/log2 3; IDCG = 2 + 1/log2 3
    assert ndcg[0] == pytest.approx((1 + 2 / LOG2_3) / (2 + 1 / LOG2_3))
    # query 2: every item at the bottom → IDCG = 0 → NaN
    assert np.isnan(ndcg[1])


def test_ndcg_all_grades_at_the_lowest_is_nan():
    ndcg = ndcg_at_k([0.3, 0.2, 0.1], [0, 0, 0], ["q", "q", "q"])
    assert ndcg.shape == (1,) and np.isnan(ndcg[0])
    assert math.isnan(mean_defined(ndcg))


def test_ndcg_ties_keep_input_order():
    # equal scores: the grade-0 row comes first in the input, so it is ranked first
    # gains 0, 2: DCG = 2/log2(3); IDCG = 2 → 1/log2(3)
    assert ndcg_at_k([1.0, 1.0], [0, 2], [0, 0])[0] == pytest.approx(1 / LOG2_3)
    # same scores, rows swapped → the grade-2 row is first → ideal → 1
    assert ndcg_at_k([1.0, 1.0], [2, 0], [0, 0])[0] == pytest.approx(1.0)


def test_ndcg_output_follows_sorted_group_ids():
    # group 7 listed first; output is [group 3, group 7]
    ndcg = ndcg_at_k([1.0, 2.0, 1.0, 2.0], [1, 0, 0, 1], [7, 7, 3, 3], k=2)
    # group 3: gains 1, 0 in score order → 1; group 7: score order gains 0, 1 → (1/log2 3) / 1
    np.testing.assert_allclose(ndcg, [1.0, 1 / LOG2_3])


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    few = rng.random(50)
    many = rng.random(5000)
    low_few, high_few = bootstrap_ci(few, n_boot=500)
    low_many, high_many = bootstrap_ci(many, n_boot=500)
    assert low_few < few.mean() < high_few
    assert low_many < many.mean() < high_many
    # width ∝ 1/sqrt(n): 100× the queries → about 1/10 of the width
    ratio = (high_many - low_many) / (high_few - low_few)
    assert 0.05 < ratio < 0.2


def test_bootstrap_ci_width_matches_the_standard_error():
    values = np.random.default_rng(1).random(400)
    low, high = bootstrap_ci(values, n_boot=2000)
    # normal approximation: 2 · 1.96 · sd / sqrt(n)
    expected = 2 * 1.96 * values.std() / math.sqrt(values.size)
    assert (high - low) == pytest.approx(expected, rel=0.1)


def test_bootstrap_ci_is_reproducible_with_a_seed_and_drops_nans():
    values = np.random.default_rng(2).random(100)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    with_nans = np.concatenate([values, [np.nan] * 30])
    assert bootstrap_ci(with_nans, seed=3) == bootstrap_ci(values, seed=3)


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([0.25, 0.25, 0.25]) == (0.25, 0.25)
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    low, high = bootstrap_ci([np.nan, np.nan])
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0.1, 0.2], alpha=1.5)


def test_bootstrap_grouped_known_pooled_auc():
    # query 0: positive 3, negative 2; query 1: positive 1, negative 0
    groups = [0, 0, 1, 1]
    scores = np.array([3.0, 2.0, 1.0, 0.0])
    labels = np.array([1, 0, 1, 0])
    # all rows: positives {3, 1} vs negatives {2, 0}: 3>2, 3>0, 1<2, 1>0 → 3/4
    assert roc_auc(scores, labels) == 0.75
    # a resample draws 2 queries: {0, 0} or {1, 1} → each query alone is separated → AUC 1;
    # {0, 1} → 0.75 (prob 1/2). Percentile interval of {0.75, 1} draws: (0.75, 1)
    seen: list[float] = []

    def pooled_auc(s: np.ndarray, y: np.ndarray) -> float:
        seen.append(roc_auc(s, y))
        return seen[-1]

    assert bootstrap_grouped(pooled_auc, groups, scores, labels, n_boot=400) == (0.75, 1.0)
    assert set(seen) == {0.75, 1.0}
    assert 0.4 < seen.count(0.75) / len(seen) < 0.6  # P({0, 1} drawn) = 1/2


def test_bootstrap_grouped_resamples_whole_groups():
    groups = np.repeat([10, 20, 30], [2, 3, 4])  # group sizes 2, 3, 4
    drawn: list[np.ndarray] = []

    def record(ids: np.ndarray) -> float:
        drawn.append(ids)
        return float(ids.size)

    bootstrap_grouped(record, groups, groups, n_boot=50, seed=1)
    assert len(drawn) == 50
    for ids in drawn:
        values, counts = np.unique(ids, return_counts=True)
        size = {10: 2, 20: 3, 30: 4}
        # each drawn group contributes all its rows, once per draw; 3 draws in total
        assert all(c % size[v] == 0 for v, c in zip(values, counts))
        assert sum(c // size[v] for v, c in zip(values, counts)) == 3


def test_bootstrap_grouped_drops_nan_resamples_and_is_reproducible():
    # query 0 has only a positive, query 1 only a negative: {0,0} and {1,1} resamples are
    # single-class (NaN, dropped); {0,1} gives pos 1 vs neg 0 → 1
    assert bootstrap_grouped(roc_auc, [0, 1], [1.0, 0.0], [1, 0], n_boot=50) == (1.0, 1.0)
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 100, size=1000)
    labels = rng.integers(0, 2, size=1000)
    scores = rng.normal(size=1000) + labels
    a = bootstrap_grouped(roc_auc, groups, scores, labels, n_boot=200, seed=9)
    assert a == bootstrap_grouped(roc_auc, groups, scores, labels, n_boot=200, seed=9)
    assert a[0] < roc_auc(scores, labels) < a[1]


def test_bootstrap_grouped_is_wider_than_a_row_bootstrap_for_correlated_queries():
    # 40 queries; each repeats one (score, label) pattern 10 times, so rows within a query
    # are perfectly correlated and the effective sample is 40 queries, not 400 rows
    rng = np.random.default_rng(3)
    n_queries = 40
    labels = np.repeat(rng.integers(0, 2, size=n_queries), 10)
    scores = np.repeat(rng.normal(size=n_queries), 10) + labels
    groups = np.repeat(np.arange(n_queries), 10)
    grouped = bootstrap_grouped(roc_auc, groups, scores, labels, n_boot=300)
    by_row = bootstrap_grouped(roc_auc, np.arange(groups.size), scores, labels, n_boot=300)
    # ≈ sqrt(10) ≈ 3.2× wider
    assert (grouped[1] - grouped[0]) > 2 * (by_row[1] - by_row[0])


def test_bootstrap_grouped_validates_lengths():
    with pytest.raises(ValueError, match="rows"):
        bootstrap_grouped(roc_auc, [0, 1, 2], [0.1, 0.2], [0, 1])


# ------------------------------------------------------------------ summary


def test_summary_counts_defined_queries_and_is_json_ready():
    per_query = [1.0, 0.0, np.nan, 0.5]
    result = summary(per_query, seed=2)
    assert result["mean"] == 0.5  # (1 + 0 + 0.5) / 3
    assert result["queries"] == 3
    assert result["ci95"] == list(bootstrap_ci([1.0, 0.0, 0.5], seed=2))
    assert result["ci95"][0] <= 0.5 <= result["ci95"][1]
    assert json.loads(json.dumps(result)) == result


def test_summary_with_no_defined_query():
    assert summary([np.nan, np.nan]) == {"mean": None, "ci95": [None, None], "queries": 0}
    json.dumps(summary([]), allow_nan=False)


def test_reliability_curve_and_ece_docstring_example():
    p, y = [0.1, 0.2, 0.9], [0, 1, 1]
    curve = M.reliability_curve(p, y, bins=2)
    assert curve["count"] == [2, 1]
    np.testing.assert_allclose(curve["mean_predicted"], [0.15, 0.9])
    np.testing.assert_allclose(curve["observed"], [0.5, 1.0])
    assert M.expected_calibration_error(p, y, bins=2) == pytest.approx((2 / 3) * 0.35 + (1 / 3) * 0.1)


def test_ece_is_zero_when_each_bin_predicts_its_observed_rate_and_large_when_inverted():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)  # calibrated by construction
    assert M.expected_calibration_error(p, y) < 0.02
    assert M.expected_calibration_error(1 - p, y) > 0.3
    curve = M.reliability_curve([1.0, 0.0], [1, 0], bins=4)  # p = 1 falls in the last bin
    assert curve["count"] == [1, 0, 0, 1] and curve["observed"][1] is None


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.reliability_curve([1.5], [1])
    with pytest.raises(ValueError, match="rows"):
        M.expected_calibration_error([0.5, 0.5], [1])
    assert np.isnan(M.expected_calibration_error([], []))
