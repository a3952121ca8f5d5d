"""Evaluation metrics: recall@k, reciprocal rank, ROC AUC, NDCG@k, calibration, bootstrap intervals.

Pure NumPy. Conventions shared by every function:

* **Per-query metrics return NaN for undefined queries** (a query with no
  relevant item, a query group with a single class, a query whose items all sit
  at the lowest grade). The caller never filters by hand: `mean_defined`,
  `bootstrap_ci` and `summary` drop the NaNs, so an undefined query counts
  neither as 0 nor as 1.
* **Grouped metrics** (`per_query_auc`, `ndcg_at_k`) take one row per judged
  (query, item) pair and a `groups` array of query ids (ints or strings). They
  return one value per group, in the order of `np.unique(groups)` (sorted ids);
  use `group_ids(groups)` to get that order.
* Inputs are validated: mismatched lengths, NaN scores or grades, non-binary
  labels and `k < 1` raise `ValueError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

EMPTY = ""  # an empty place in a ranked list (fewer results than k)
_MAX_BOOT_CELLS = 4_000_000  # bootstrap index cells drawn per chunk (memory bound)


# ------------------------------------------------------------------ helpers


def mean_defined(values: Sequence[float] | np.ndarray) -> float:
    """Mean over the defined (non-NaN) values; NaN when there are none.

    `mean_defined([1.0, nan, 0.0]) == 0.5`. Unlike `np.nanmean`, an all-NaN
    or empty input gives NaN without a RuntimeWarning.
    """
    defined = _defined(values)
    return float(defined.mean()) if defined.size else float("nan")


def group_ids(groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    """The group ids in the order the grouped metrics return them: `np.unique(groups)`."""
    return np.unique(np.asarray(groups))


def _defined(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """The values as a flat float array with NaNs dropped."""
    array = np.asarray(values, dtype=float).ravel()
    return array[~np.isnan(array)]


def _item(value: Any) -> str:
    """A ranked-list entry as `str` (TensorFlow string tensors come back as bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_k(k: int | None, allow_none: bool = False) -> None:
    if k is None and allow_none:
        return
    if k is None or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_pairs(ranked: Sequence[Sequence[Any]] | np.ndarray, relevant: Sequence[Iterable[Any]]) -> None:
    if len(ranked) != len(relevant):
        raise ValueError(f"ranked has {len(ranked)} queries but relevant has {len(relevant)}")


def _relevant_set(items: Iterable[Any]) -> set[str]:
    """The relevant items as strings; the empty string is never relevant."""
    return {_item(item) for item in items} - {EMPTY}


def _float_array(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


def _binary_labels(labels: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Labels as a bool array; they must be bool or numbers in {0, 1}."""
    array = np.asarray(labels).ravel()
    if array.dtype == bool:
        return array
    numeric = np.asarray(array, dtype=float)
    if not np.isin(numeric, (0.0, 1.0)).all():
        raise ValueError("labels must be bool or 0/1")
    return numeric == 1.0


def _group_index(groups: Sequence[Any] | np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """(index of each row's group in `np.unique(groups)`, number of groups)."""
    array = np.asarray(groups).ravel()
    if array.size != n:
        raise ValueError(f"groups has {array.size} rows but the other inputs have {n}")
    unique, inverse = np.unique(array, return_inverse=True)
    return inverse.ravel(), unique.size


def _position_in_group(sorted_group: np.ndarray, n_groups: int) -> np.ndarray:
    """0-based position of each row inside its group, for rows sorted by group."""
    counts = np.bincount(sorted_group, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.arange(sorted_group.size) - starts[sorted_group]


# ------------------------------------------------------------ ranked lists


def recall_at_k(ranked: Sequence[Sequence[Any]] | np.ndarray, relevant: Sequence[Iterable[Any]], k: int) -> np.ndarray:
    """Recall@k per query: |top-k ∩ relevant| / |relevant|.

    `ranked[q]` lists query q's retrieved item ids, best first (a list of
    lists, or a 2-D array of str or bytes); `relevant[q]` is the set of its
    relevant ids. Top-k is the first k *places* of the list:

    * a list shorter than k simply has fewer places (the denominator stays
      |relevant|, so recall@k < 1 when fewer than |relevant| items came back);
    * empty places `""` occupy a place but never match;
    * an item repeated in the top k counts once (set intersection).

    Returns a float array of length len(ranked) with NaN for queries whose
    relevant set is empty (after dropping `""`); average with `mean_defined`.
    """
    _check_k(k)
    _check_pairs(ranked, relevant)
    out = np.full(len(ranked), np.nan)
    for q, (row, rel) in enumerate(zip(ranked, relevant)):
        wanted = _relevant_set(rel)
        if wanted:
            top = {_item(item) for item in list(row)[:k]}
            out[q] = len(top & wanted) / len(wanted)
    return out


def reciprocal_rank(
    ranked: Sequence[Sequence[Any]] | np.ndarray, relevant: Sequence[Iterable[Any]], k: int | None = None
) -> np.ndarray:
    """Reciprocal rank per query: 1 / rank of the first relevant item (rank 1 = first place).

    Places are counted as in `recall_at_k` (an empty place `""` takes a rank
    but never matches). The value is 0 when no relevant item appears in the
    first k places (`k=None`: the whole list). NaN for queries with no
    relevant item; MRR = `mean_defined(reciprocal_rank(...))`.
    """
    _check_k(k, allow_none=True)
    _check_pairs(ranked, relevant)
    out = np.full(len(ranked), np.nan)
    for q, (row, rel) in enumerate(zip(ranked, relevant)):
        wanted = _relevant_set(rel)
        if not wanted:
            continue
        places = list(row) if k is None else list(row)[:k]
        out[q] = next((1.0 / (rank + 1) for rank, item in enumerate(places) if _item(item) in wanted), 0.0)
    return out


# --------------------------------------------------------------------- AUC


def per_query_auc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[Any] | np.ndarray, groups: Sequence[Any] | np.ndarray
) -> np.ndarray:
    """ROC AUC within each query group, in `np.unique(groups)` order.

    For a group with P positives and N negatives (labels bool or 0/1):

        AUC = (R_pos − P(P+1)/2) / (P·N)

    where R_pos is the sum of the positives' ranks among the group's scores
    (1-based, ascending; tied scores share their average rank). This is the
    Mann–Whitney statistic: the fraction of positive–negative pairs with
    s_pos > s_neg, a tie counting 1/2. NaN for a group with P = 0 or N = 0.
    One sort of all rows: O(n log n). Mean over defined groups: `mean_defined`.
    """
    score = _float_array("scores", scores)
    positive = _binary_labels(labels)
    if positive.size != score.size:
        raise ValueError(f"scores has {score.size} rows but labels has {positive.size}")
    group, n_groups = _group_index(groups, score.size)
    if score.size == 0:
        return np.full(n_groups, np.nan)
    ranks = _average_ranks_in_group(score, group, n_groups)
    n_pos = np.bincount(group, weights=positive, minlength=n_groups)
    n_neg = np.bincount(group, minlength=n_groups) - n_pos
    rank_sum = np.bincount(group, weights=ranks * positive, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _average_ranks_in_group(score: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """1-based ascending rank of each row's score within its group; ties get the average rank."""
    order = np.lexsort((score, group))  # by group, then score
    s, g = score[order], group[order]
    position = _position_in_group(g, n_groups)
    new_block = np.empty(s.size, dtype=bool)
    new_block[0] = True
    new_block[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    block = np.cumsum(new_block) - 1
    first = position[new_block]  # in-group position of each tie block's first row
    last = first + np.bincount(block) - 1  # ... and of its last row
    ranks = np.empty(s.size)
    ranks[order] = (first[block] + last[block]) / 2 + 1
    return ranks


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[Any] | np.ndarray) -> float:
    """Pooled ROC AUC over all rows (Mann–Whitney, ties count 1/2), O(n log n).

    Same formula as `per_query_auc` with a single group:
    AUC = (R_pos − P(P+1)/2) / (P·N), average ranks for ties.
    Example: scores [1, 1, 0], labels [1, 0, 0] → pairs (pos vs neg) score
    1 vs 1 (tie, 1/2) and 1 vs 0 (1): AUC = 1.5 / 2 = 0.75.
    NaN when either class is missing (including empty input).
    """
    score = _float_array("scores", scores)
    positive = _binary_labels(labels)
    if positive.size != score.size:
        raise ValueError(f"scores has {score.size} rows but labels has {positive.size}")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="stable")
    s = score[order]
    new_block = np.concatenate(([True], s[1:] != s[:-1]))
    first = np.flatnonzero(new_block)  # 0-based position of each tie block's first row
    sizes = np.diff(np.append(first, s.size))
    average_rank = first + (sizes + 1) / 2  # 1-based average rank of each block
    rank_sum = average_rank[np.cumsum(new_block) - 1][positive[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ------------------------------------------------------------- calibration

CALIBRATION_BINS = 15


def reliability_curve(probabilities: Sequence[float] | np.ndarray, labels: Sequence[Any] | np.ndarray,
                      bins: int = CALIBRATION_BINS) -> dict[str, list]:
    """Equal-width bins of predicted probability: per bin its rows, mean prediction and observed rate.

    Bin b holds the rows with p in [b/bins, (b+1)/bins) (p = 1 in the last).
    Returns `{"edges": [bins + 1], "count": [bins], "mean_predicted": [bins],
    "observed": [bins]}`, the last two None for an empty bin.
    Example: p [0.1, 0.2, 0.9], y [0, 1, 1], bins 2 → count [2, 1],
    mean_predicted [0.15, 0.9], observed [0.5, 1.0].
    """
    p = _float_array("probabilities", probabilities)
    y = _binary_labels(labels).astype(np.float64)
    if p.size != y.size:
        raise ValueError(f"probabilities has {p.size} rows but labels has {y.size}")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    predicted = np.bincount(which, weights=p, minlength=bins)
    observed = np.bincount(which, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted, rate = predicted / count, observed / count
    return {"edges": np.linspace(0.0, 1.0, bins + 1).tolist(), "count": count.tolist(),
            "mean_predicted": [None if c == 0 else float(v) for c, v in zip(count, mean_predicted)],
            "observed": [None if c == 0 else float(v) for c, v in zip(count, rate)]}


def expected_calibration_error(probabilities: Sequence[float] | np.ndarray, labels: Sequence[Any] | np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE = Σ_b (n_b / n) · |observed rate_b − mean prediction_b| over `reliability_curve`'s bins.

    0 is perfectly calibrated. NaN for empty input.
    Example: p [0.1, 0.2, 0.9], y [0, 1, 1], bins 2 → (2/3)·|0.5 − 0.15| + (1/3)·|1 − 0.9| = 0.26667.
    """
    curve = reliability_curve(probabilities, labels, bins)
    n = sum(curve["count"])
    if n == 0:
        return float("nan")
    return float(sum(c / n * abs(o - m) for c, o, m in zip(curve["count"], curve["observed"], curve["mean_predicted"])
                     if c))


# -------------------------------------------------------------------- NDCG


def ndcg_at_k(
    scores: Sequence[float] | np.ndarray,
    grades: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    k: int = 10,
    min_grade: float | None = None,
) -> np.ndarray:
    """NDCG@k per query group over its judged items, in `np.unique(groups)` order.

    Each group's rows are ranked by score, highest first; **equal scores keep
    their input order** (stable sort), so ties are not broken in the
    model's favour. With gain_i = grade_i − min_grade (linear gain) at
    0-based position i:

        DCG@k  = Σ_{i<k} gain_i / log2(i + 2)
        IDCG@k = the same sum with the rows sorted by gain, highest first
        NDCG@k = DCG@k / IDCG@k

    `min_grade` defaults to the lowest grade over *all* rows (the bottom of the
    scale), so an item at the bottom contributes nothing; using the raw grades
    as gains would make NDCG close to 1 even for random scores. A grade below
    an explicit `min_grade` raises `ValueError`. NaN when IDCG = 0, i.e. no
    item of the group is above `min_grade`. A group with fewer than k items
    uses all of them.
    """
    _check_k(k)
    score = _float_array("scores", scores)
    grade = _float_array("grades", grades)
    if grade.size != score.size:
        raise ValueError(f"scores has {score.size} rows but grades has {grade.size}")
    group, n_groups = _group_index(groups, score.size)
    if score.size == 0:
        return np.full(n_groups, np.nan)
    bottom = grade.min() if min_grade is None else float(min_grade)
    if (grade < bottom).any():
        raise ValueError(f"a grade is below min_grade={bottom}")
    gain = grade - bottom
    dcg = _dcg_in_group(gain, np.lexsort((-score, group)), group, n_groups, k)
    idcg = _dcg_in_group(gain, np.lexsort((-gain, group)), group, n_groups, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = dcg / idcg
    ndcg[idcg == 0] = np.nan
    return ndcg


def _dcg_in_group(gain: np.ndarray, order: np.ndarray, group: np.ndarray, n_groups: int, k: int) -> np.ndarray:
    """Σ_{i<k} gain_i / log2(i + 2) per group, rows taken in `order` (sorted by group first)."""
    g = group[order]
    position = _position_in_group(g, n_groups)
    weight = np.where(position < k, 1.0 / np.log2(position + 2.0), 0.0)
    return np.bincount(g, weights=gain[order] * weight, minlength=n_groups)


# --------------------------------------------------------------- bootstrap


def _check_bootstrap(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _percentile_interval(statistics: np.ndarray, alpha: float) -> tuple[float, float]:
    """(alpha/2, 1 − alpha/2) quantiles of the defined bootstrap statistics; NaNs if none."""
    defined = _defined(statistics)
    if not defined.size:
        return float("nan"), float("nan")
    low, high = np.quantile(defined, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    per_query: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a per-query metric.

    NaNs (undefined queries) are dropped first; the n defined values are then
    resampled n at a time with replacement, `n_boot` times, and the interval is
    the (alpha/2, 1 − alpha/2) quantiles of the resampled means (linear
    interpolation). (NaN, NaN) when no query is defined; a single query gives
    (v, v). Deterministic for a given `seed`.
    """
    _check_bootstrap(n_boot, alpha)
    values = _defined(per_query)
    if not values.size:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_BOOT_CELLS // values.size)
    means = np.concatenate([
        values[rng.integers(0, values.size, size=(min(chunk, n_boot - start), values.size))].mean(axis=1)
        for start in range(0, n_boot, chunk)
    ])
    return _percentile_interval(means, alpha)


def bootstrap_grouped(
    metric_fn: Callable[..., float],
    groups: Sequence[Any] | np.ndarray,
    *arrays: Sequence[Any] | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a pooled metric, resampling whole query groups.

    Each resample draws G groups with replacement from the G distinct ids of
    `groups`, takes all rows of every drawn group (a group drawn twice
    contributes its rows twice) and computes `metric_fn(*arrays_resampled)`,
    e.g. `bootstrap_grouped(roc_auc, query_ids, scores, labels)` for the pooled
    AUC. Resampling queries rather than rows keeps a query's correlated rows
    together. Interval: (alpha/2, 1 − alpha/2) quantiles of the statistics;
    resamples where `metric_fn` returns NaN (e.g. only one class drawn) are
    dropped, and (NaN, NaN) is returned if all are.

    The group ids themselves are not passed to `metric_fn`; for a mean of a
    per-query metric use `bootstrap_ci` on the per-query values instead.
    Row indices are built without a Python loop over groups, so the cost is
    dominated by `metric_fn`.
    """
    _check_bootstrap(n_boot, alpha)
    columns = [np.asarray(array) for array in arrays]
    group, n_groups = _group_index(groups, len(columns[0]) if columns else np.asarray(groups).size)
    for column in columns:
        if len(column) != group.size:
            raise ValueError(f"an array has {len(column)} rows but groups has {group.size}")
    if n_groups == 0:
        return float("nan"), float("nan")
    rows_by_group = np.argsort(group, kind="stable")  # rows of group 0, then group 1, ...
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rng = np.random.default_rng(seed)
    statistics = np.empty(n_boot)
    for b in range(n_boot):
        rows = rows_by_group[_concatenated_ranges(starts, counts, rng.integers(0, n_groups, size=n_groups))]
        statistics[b] = metric_fn(*(column[rows] for column in columns))
    return _percentile_interval(statistics, alpha)


def _concatenated_ranges(starts: np.ndarray, counts: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Concatenation of range(starts[c], starts[c] + counts[c]) for c in `chosen`, vectorised."""
    lengths = counts[chosen]
    offsets = np.cumsum(lengths) - lengths  # where each chosen range begins in the output
    return np.arange(lengths.sum()) + np.repeat(starts[chosen] - offsets, lengths)


def summary(
    per_query: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, float | list[float] | int | None]:
    """`{"mean", "ci95": [low, high], "queries"}` of a per-query metric, JSON-ready.

    `mean` is `mean_defined`, `ci95` the 95 % `bootstrap_ci` (alpha = 0.05),
    `queries` the number of defined (non-NaN) queries. With no defined query
    `mean` is None and `ci95` is [None, None] (JSON has no NaN).
    """
    values = _defined(per_query)
    if not values.size:
        return {"mean": None, "ci95": [None, None], "queries": 0}
    low, high = bootstrap_ci(values, n_boot=n_boot, alpha=0.05, seed=seed)
    return {"mean": float(values.mean()), "ci95": [low, high], "queries": int(values.size)}
