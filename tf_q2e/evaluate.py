"""The multitask evaluation: does retrieval return what people engage with, and stay relevant?

`evaluate_run(RUN)` scores a held-out split (by query) of a data set with a
retriever and writes `RUN/eval/report.json`, `report.md` and plots. A
retriever is anything with `search` and `score_pairs` (`DenseRetriever` for a
trained run, `BM25Retriever` for the lexical baseline over `tf_q2e.bm25`,
`HybridRetriever` for both fused by reciprocal rank fusion), so every model
goes through the same code and the same metrics:

* retrieval: full-catalogue Recall@K (K = 10, 100, 1000) of each query's
  engaged products (Que2Search's KNN recall), averaged over queries with at
  least one engaged product; MRR of the first engaged product in the top 1000;
* engagement: ROC AUC of the score for engaged vs hard-negative pairs, pooled
  over all pairs and averaged per query (queries with both classes);
* relevance, where graded labels exist: NDCG@10 over each query's judged
  products with gain = grade − the scale's lowest grade, and ROC AUC of
  relevant (grade above the scale's midpoint) vs irrelevant pairs;
* in-batch recall@1 (Que2Search's batch metric; dense models only): the split
  in batches of `train.global_batch_size` rows in a seeded random order, each
  row's query against the batch's products, same-product copies masked;
* 95% bootstrap intervals over queries (pooled figures resample whole
  queries; in-batch recall resamples batches).

Dense retrieval is exact search over the product vectors (the index's, when
`q2e index` ran on the same catalogue): it measures the model, not ScaNN,
whose recall against exact search `q2e index --tune` reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e import metrics as M
from tf_q2e.data import schema as S
from tf_q2e.data.validate import Validator, dataset_files
from tf_q2e.errors import InputError

EVAL_DIR = "eval"
RECALL_KS = (10, 100, 1000)
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
NDCG_K = 10


@dataclass
class Judged:
    """A labelled split grouped by query: distinct queries, and one entry per judged row."""

    queries: list[str]  # distinct query texts
    contexts: dict[str, list[str]]  # query context column -> value per distinct query
    row_query: np.ndarray  # [R] index into `queries`
    row_product: np.ndarray  # [R] product id (object)
    engaged: np.ndarray  # [R] 1, 0 or -1
    relevance: np.ndarray  # [R] float, NaN when not graded
    path: str

    @property
    def engaged_sets(self) -> list[set[str]]:
        sets: list[set[str]] = [set() for _ in self.queries]
        for q, p in zip(self.row_query[self.engaged == 1], self.row_product[self.engaged == 1]):
            sets[q].add(p)
        return sets


def load_judged(path: str, context_columns: tuple[str, ...] = (), image_dim: int | None = None) -> Judged:
    """Reads a split file (checked as in `q2e validate`) into a `Judged`; queries keyed by text + context."""
    validator = Validator("error", image_dim=image_dim, context_columns=tuple(context_columns))
    columns = [S.QUERY, *context_columns, S.PRODUCT_ID, S.ENGAGED]
    tables = []
    for table in validator.iter_file(path, "impressions"):
        keep = columns + ([S.RELEVANCE] if S.RELEVANCE in table.column_names else [])
        tables.append(table.select(keep))
    if not tables:
        raise InputError(f"{path}: no rows to evaluate")
    table = pa.concat_tables(tables, promote_options="default")
    keys = table.select([S.QUERY, *context_columns])
    distinct = keys.group_by(keys.column_names).aggregate([]).sort_by([(c, "ascending") for c in keys.column_names])
    index = {tuple(row.values()): i for i, row in enumerate(distinct.to_pylist())}
    row_query = np.fromiter((index[tuple(r.values())] for r in keys.to_pylist()), dtype=np.int64, count=table.num_rows)
    relevance = (table.column(S.RELEVANCE).to_numpy(zero_copy_only=False).astype(np.float64)
                 if S.RELEVANCE in table.column_names else np.full(table.num_rows, np.nan))
    return Judged(
        queries=distinct.column(S.QUERY).to_pylist(),
        contexts={c: distinct.column(c).to_pylist() for c in context_columns},
        row_query=row_query,
        row_product=table.column(S.PRODUCT_ID).to_numpy(zero_copy_only=False).astype(object),
        engaged=pc.cast(table.column(S.ENGAGED), pa.int32()).to_numpy(),
        relevance=relevance,
        path=path,
    )


class DenseRetriever:
    """A trained run's towers: exact search over the catalogue's product vectors."""

    def __init__(self, model, product_ids: np.ndarray, vectors: np.ndarray, name: str = "dense"):
        import tensorflow as tf

        self.name = name
        self.model = model
        self.product_ids = np.asarray(product_ids, dtype=object)
        self.vectors = vectors
        self.position = {p: i for i, p in enumerate(self.product_ids)}
        self._tf = tf
        self._cached: tuple[Judged, np.ndarray] | None = None  # the last split's query vectors

    def query_vectors(self, judged: Judged, batch: int = 1024) -> np.ndarray:
        tf = self._tf
        out = []
        for start in range(0, len(judged.queries), batch):
            features = {S.QUERY: tf.constant(judged.queries[start:start + batch])}
            features.update({c: tf.constant(v[start:start + batch]) for c, v in judged.contexts.items()})
            out.append(self.model.query_tower(features, training=False).numpy())
        return np.concatenate(out).astype(np.float32)

    def search(self, judged: Judged, k: int) -> np.ndarray:
        from tf_q2e.index import exact_top_k

        _, rows = exact_top_k(self.vectors, self._queries(judged), k)
        return self.product_ids[rows]

    def score_pairs(self, judged: Judged) -> np.ndarray:
        rows = self._rows(judged.row_product)
        return np.einsum("rd,rd->r", self._queries(judged)[judged.row_query], self.vectors[rows])

    def random_pair_scores(self, judged: Judged, rng: np.random.Generator) -> np.ndarray:
        products = rng.integers(0, len(self.vectors), size=len(judged.row_query))
        return np.einsum("rd,rd->r", self._queries(judged)[judged.row_query], self.vectors[products])

    def catalogue_scores(self, judged: Judged, start: int, stop: int) -> np.ndarray:
        """The cosine of every catalogue product (in `product_ids` order) for the split's distinct
        queries `start:stop`, float32 [stop - start, N]."""
        return self._queries(judged)[start:stop] @ self.vectors.T

    def in_batch_recall_at_1(self, judged: Judged, batch_size: int, seed: int = 0) -> np.ndarray:
        """Per batch: the share of rows whose own product scores highest among the batch's products."""
        order = np.random.default_rng(seed).permutation(len(judged.row_query))
        queries = self._queries(judged)
        rows = self._rows(judged.row_product)
        values = []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            b = order[start:start + batch_size]
            scores = queries[judged.row_query[b]] @ self.vectors[rows[b]].T
            ids = judged.row_product[b]
            same = ids[:, None] == ids[None, :]
            np.fill_diagonal(same, False)
            scores[same] = -np.inf  # accidental hits: another copy of the row's product is not a negative
            values.append(np.mean(np.argmax(scores, axis=1) == np.arange(len(b))))
        return np.array(values)

    def _queries(self, judged: Judged) -> np.ndarray:
        """The split's query vectors, computed once for search, pair scores and in-batch recall."""
        if self._cached is None or self._cached[0] is not judged:
            self._cached = (judged, self.query_vectors(judged))
        return self._cached[1]

    def _rows(self, product_ids: np.ndarray) -> np.ndarray:
        try:
            return np.fromiter((self.position[p] for p in product_ids), dtype=np.int64, count=len(product_ids))
        except KeyError as e:
            raise InputError(f"product {e.args[0]!r} of the evaluated split is not in the catalogue") from None


class BM25Retriever:
    """The lexical baseline (`tf_q2e.bm25.BM25Index`) behind the evaluator's interface.

    The query context plays no part (BM25 sees the query text only).
    """

    def __init__(self, index, name: str = "bm25"):
        self.name = name
        self.index = index

    @classmethod
    def for_data(cls, data_dir: str, on_bad_rows: str = "error") -> "BM25Retriever":
        from tf_q2e.bm25 import BM25Index

        catalog, _ = dataset_files(data_dir)
        return cls(BM25Index.from_catalog(catalog, on_bad_rows=on_bad_rows))

    @property
    def product_ids(self) -> np.ndarray:
        return self.index.product_ids

    def search(self, judged: Judged, k: int) -> np.ndarray:
        return self.index.search(judged.queries, k)[0]

    def score_pairs(self, judged: Judged) -> np.ndarray:
        return self.index.score_pairs([judged.queries[q] for q in judged.row_query], list(judged.row_product))

    def random_pair_scores(self, judged: Judged, rng: np.random.Generator) -> np.ndarray:
        ids = self.index.product_ids
        products = [ids[i] for i in rng.integers(0, len(ids), size=len(judged.row_query))]
        return self.index.score_pairs([judged.queries[q] for q in judged.row_query], products)

    def catalogue_scores(self, judged: Judged, start: int, stop: int) -> np.ndarray:
        """The BM25 score of every catalogue product (in `product_ids` order) for the split's distinct
        queries `start:stop`, float32 [stop - start, N] (`BM25Index.scores`, one query at a time)."""
        n = len(self.index)
        return np.stack([self.index.scores(q) for q in judged.queries[start:stop]]) if stop > start \
            else np.zeros((0, n), np.float32)


RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009)
_FUSE_CHUNK = 256  # queries fused at a time
_RANK_CHUNK = 64  # queries whose full-catalogue scores are held at a time: [64, N] floats
_COMPARE_PAIRS = 32  # pairs of one query up to which each is compared with all N scores (else one sort of N)


def reciprocal_rank_fusion(rankings, k: int, k_rrf: float = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Fuses several ranked lists per query into one by reciprocal rank fusion (RRF).

    `score(q, p) = Σ_r 1 / (k_rrf + rank_r(q, p))` over the lists r that hold
    p for q, ranks from 1 (Cormack, Clarke and Büttcher, SIGIR 2009): a
    product in one list only gets that list's term. Ties go to the better
    rank in the first list (a product absent from a list ranks after all its
    products), then in the second list, ..., then to the smaller product id,
    so the result is deterministic. Terms are added in list order in float64.

    Example (k_rrf = 60): lists [A, B, C] and [B, D] give B (1/62 + 1/61),
    A (1/61), D (1/62), C (1/63); lists [A, B] and [B, A] tie A and B at
    1/61 + 1/62, and A, first in the first list, comes first.

    Args:
      rankings: R arrays [Q, D_r] of product ids, best first, one per list,
        their rows the same Q queries; "" is an empty place. A list holds a
        product at most once.
      k: places of the fused lists.
      k_rrf: RRF's constant (>= 0).

    Returns:
      `(ids [Q, k] object, scores [Q, k] float64)`, best first; the places
      after the last product hold "" and 0.0.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not k_rrf >= 0:
        raise ValueError(f"k_rrf ({k_rrf!r}) must be >= 0")
    rankings = [np.asarray(r, dtype=object) for r in rankings]
    if not rankings or any(r.ndim != 2 or len(r) != len(rankings[0]) for r in rankings):
        raise ValueError(f"rankings must be one or more [Q, D] arrays of the same Q, got shapes {[r.shape for r in rankings]}")
    k, n_queries = int(k), len(rankings[0])
    code_of: dict[str, int] = {}  # product id -> code, in order of first appearance
    coded = [np.fromiter((-1 if p == M.EMPTY else code_of.setdefault(p, len(code_of)) for p in r.ravel()),
                         dtype=np.int64, count=r.size).reshape(r.shape) for r in rankings]  # R x [Q, D_r]
    distinct = np.empty(len(code_of), dtype=object)
    distinct[:] = list(code_of)
    id_order = np.empty(len(distinct), np.int64)  # code -> position of its id in sorted order
    id_order[sorted(range(len(distinct)), key=distinct.__getitem__)] = np.arange(len(distinct))
    base = len(distinct) + 1  # key of a (query row, product) = row * base + code

    ids_out = np.full((n_queries, k), M.EMPTY, dtype=object)
    scores_out = np.zeros((n_queries, k), np.float64)
    for start in range(0, n_queries, _FUSE_CHUNK):
        stop = min(start + _FUSE_CHUNK, n_queries)
        keys, terms, places = [], [], []
        for c in coded:  # list order: the first list's term is added first
            rows, place = np.nonzero(c[start:stop] >= 0)
            keys.append(rows * base + c[start:stop][rows, place])
            terms.append(1.0 / (k_rrf + (place + 1.0)))
            places.append(place + 1)
        unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        inverse = inverse.reshape(-1)
        fused = np.bincount(inverse, weights=np.concatenate(terms), minlength=len(unique))  # [U]
        ranks = np.full((len(coded), len(unique)), np.iinfo(np.int64).max)  # [R, U], absent: last
        offset = 0
        for r, rank in enumerate(places):
            ranks[r, inverse[offset:offset + len(rank)]] = rank
            offset += len(rank)
        row, code = unique // base, unique % base
        order = np.lexsort((id_order[code], *ranks[::-1], -fused, row))  # by row, then score, ranks, id
        row, code, fused = row[order], code[order], fused[order]
        first = np.concatenate(([0], np.cumsum(np.bincount(row, minlength=stop - start))[:-1]))
        place = np.arange(len(row)) - first[row]
        keep = place < k
        ids_out[start + row[keep], place[keep]] = distinct[code[keep]]
        scores_out[start + row[keep], place[keep]] = fused[keep]
    return ids_out, scores_out


def catalogue_ranks(retriever, judged: Judged, columns: np.ndarray) -> np.ndarray:
    """Each judged row's full-catalogue rank under `retriever`, int64 [R].

    `rank = 1 + |{catalogue products scoring strictly higher for the row's
    query}|` (equal scores share the better rank). `columns` [R] holds each
    row's product as a column of `retriever.catalogue_scores`, which gives
    [C, N] scores of C distinct queries; queries are taken `_RANK_CHUNK` at a
    time, so memory is O(_RANK_CHUNK · N). A query with at most
    `_COMPARE_PAIRS` rows compares each row's score with the N scores, one with
    more sorts its N scores once.
    """
    row_query = np.asarray(judged.row_query)
    order = np.argsort(row_query, kind="stable")
    bounds = np.searchsorted(row_query[order], np.arange(len(judged.queries) + 1))
    ranks = np.empty(len(row_query), np.int64)
    for start in range(0, len(judged.queries), _RANK_CHUNK):
        stop = min(start + _RANK_CHUNK, len(judged.queries))
        if bounds[start] == bounds[stop]:
            continue  # no rows of these queries
        scores = retriever.catalogue_scores(judged, start, stop)  # [C, N]
        for q in range(start, stop):
            rows = order[bounds[q]:bounds[q + 1]]
            if not len(rows):
                continue
            catalogue = scores[q - start]  # [N]
            own = catalogue[columns[rows]]  # [n]
            if len(rows) <= _COMPARE_PAIRS:
                higher = np.count_nonzero(catalogue[None, :] > own[:, None], axis=1)
            else:
                higher = len(catalogue) - np.searchsorted(np.sort(catalogue), own, side="right")
            ranks[rows] = 1 + higher
    return ranks


class HybridRetriever:
    """Lexical + dense retrieval: a dense run and BM25 fused by reciprocal rank fusion (RRF).

    `score(q, p) = 1 / (k_rrf + rank_dense(q, p)) + 1 / (k_rrf + rank_bm25(q, p))`,
    ranks from 1, `k_rrf = 60` by default (Cormack, Clarke and Büttcher,
    SIGIR 2009). It needs no score calibration: only ranks enter.

    * `search(judged, k)`: each retriever's top `max(depth, k)` products per
      query fused by `reciprocal_rank_fusion`: a product in one list only gets
      that list's term (BM25 lists only products sharing a term with the
      query). Ties go to the better dense rank, then the better BM25 rank,
      then the smaller product id. `[Q, min(k, N)]` ids, as the other
      retrievers return, "" after the last fused product.
    * `score_pairs` / `random_pair_scores`: the same formula with each
      product's **full-catalogue** rank under each retriever (`catalogue_ranks`:
      1 + the number of catalogue products scoring strictly higher for the
      query, so equal scores share a rank, e.g. every product BM25 scores 0).
      This is RRF without the depth cut-off: a product below `depth` in a
      list, or absent from BM25's list because it scores 0 there, still gets
      that retriever's (small) term, where `search` gives it none. Floats
      are added dense term first, as `search` adds them, so a pair's score
      equals its `search` score when the product is in both lists at untied
      ranks.

    Cost: `search` is the two searches at `max(depth, k)` plus the fusion
    (about Q · 2 · depth dict look-ups and one sort). `score_pairs` needs every
    product's score for every query with judged rows, under both retrievers:
    dense `[64, N] = queries @ vectors.T` per 64 queries, BM25 one
    `BM25Index.scores` (bm25s `get_scores_from_ids`, a sum of the query terms'
    sparse score columns into [N]) per query; then an O(N) comparison per
    judged row (a sort of N for a query with more than 32 rows). Memory is
    O(64 · N) floats. `random_pair_scores` costs the same again. On the Home
    Depot test split (1,209 queries, 7,820 rows, N = 54,667; 2 CPUs): the
    searches at depth 1000 1.2 s, their fusion 1.4 s, the full-catalogue
    ranks of the rows 0.3 s (BM25, about 0.25 ms a query) and 0.25 s (dense),
    the whole `evaluate` 4.4 s.

    Args:
      dense: a retriever with `search`, `product_ids` and `catalogue_scores`
        (`DenseRetriever`).
      bm25: the same for the lexical side (`BM25Retriever`), over the same
        catalogue (the same product ids).
      k_rrf: RRF's constant (>= 0).
      depth: places taken from each retriever's list in `search`.
      name: the report's model name (default `hybrid(<dense name>)`).
    """

    def __init__(self, dense, bm25, k_rrf: float = RRF_K, depth: int = 1000, name: str | None = None):
        if not k_rrf >= 0:
            raise ValueError(f"k_rrf ({k_rrf!r}) must be >= 0")
        if int(depth) != depth or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        self.dense, self.bm25 = dense, bm25
        self.k_rrf, self.depth = k_rrf, int(depth)
        self.name = name or f"hybrid({dense.name})"
        self.product_ids = np.asarray(dense.product_ids, dtype=object)
        self._columns = [{p: i for i, p in enumerate(r.product_ids)} for r in (dense, bm25)]
        if self._columns[0].keys() != self._columns[1].keys():
            raise ValueError(f"the dense retriever ({len(self._columns[0])} products) and BM25 "
                             f"({len(self._columns[1])} products) index different catalogues; build both from the same one")

    def search(self, judged: Judged, k: int) -> np.ndarray:
        depth = max(self.depth, int(k))
        rankings = [self.dense.search(judged, depth), self.bm25.search(judged, depth)]
        return reciprocal_rank_fusion(rankings, min(int(k), len(self.product_ids)), self.k_rrf)[0]

    def score_pairs(self, judged: Judged) -> np.ndarray:
        return self._pair_scores(judged, judged.row_product)

    def random_pair_scores(self, judged: Judged, rng: np.random.Generator) -> np.ndarray:
        products = self.product_ids[rng.integers(0, len(self.product_ids), size=len(judged.row_query))]
        return self._pair_scores(judged, products)

    def _pair_scores(self, judged: Judged, product_ids: np.ndarray) -> np.ndarray:
        """RRF of each row's (query, product) from full-catalogue ranks, float64 [R]."""
        scores = np.zeros(len(judged.row_query), np.float64)
        for retriever, column in zip((self.dense, self.bm25), self._columns):
            try:
                columns = np.fromiter((column[p] for p in product_ids), dtype=np.int64, count=len(product_ids))
            except KeyError as e:
                raise InputError(f"product {e.args[0]!r} of the evaluated split is not in the catalogue") from None
            scores += 1.0 / (self.k_rrf + catalogue_ranks(retriever, judged, columns))
        return scores


def evaluate(retriever, judged: Judged, ks=RECALL_KS, n_boot: int = 1000, seed: int = 0,
             in_batch_size: int | None = None) -> dict:
    """Every metric of the module docstring for one retriever on one split, with 95% bootstrap intervals."""
    rng = np.random.default_rng(seed)
    report: dict = {"model": retriever.name, "split_file": judged.path, "queries": len(judged.queries),
                    "rows": int(len(judged.row_query)), "metrics": {}}
    m = report["metrics"]
    start = time.perf_counter()
    max_k = max(max(ks), max(CURVE_KS))
    ranked = retriever.search(judged, max_k)
    engaged = judged.engaged_sets
    with_engaged = np.array([bool(s) for s in engaged])
    report["queries_with_engaged"] = int(with_engaged.sum())
    for k in ks:
        m[f"recall@{k}"] = M.summary(M.recall_at_k(ranked, engaged, k), n_boot=n_boot, seed=seed)
    m["mrr"] = M.summary(M.reciprocal_rank(ranked, engaged), n_boot=n_boot, seed=seed)
    report["recall_curve"] = {"k": list(CURVE_KS),
                              "recall": [M.mean_defined(M.recall_at_k(ranked, engaged, k)) for k in CURVE_KS]}
    report["search_seconds"] = round(time.perf_counter() - start, 2)

    scores = retriever.score_pairs(judged)
    labelled = judged.engaged >= 0
    s, y, g = scores[labelled], judged.engaged[labelled], judged.row_query[labelled]
    m["engagement_auc_pooled"] = {**_pooled_auc(s, y, g, n_boot, seed), "pairs": int(labelled.sum())}
    m["engagement_auc_per_query"] = M.summary(M.per_query_auc(s, y, g), n_boot=n_boot, seed=seed)

    graded = ~np.isnan(judged.relevance)
    if graded.any():
        grades, gq, gs = judged.relevance[graded], judged.row_query[graded], scores[graded]
        low, high = float(grades.min()), float(grades.max())
        m[f"ndcg@{NDCG_K}"] = M.summary(M.ndcg_at_k(gs, grades, gq, k=NDCG_K, min_grade=low), n_boot=n_boot, seed=seed)
        middle = (low + high) / 2
        rel = (grades > middle).astype(np.int32)
        m["relevance_auc"] = {**_pooled_auc(gs, rel, gq, n_boot, seed), "relevant_above": middle, "grades": [low, high]}

    hists = {"engaged": scores[judged.engaged == 1], "hard_negative": scores[judged.engaged == 0]}
    if hasattr(retriever, "random_pair_scores"):
        hists["random"] = retriever.random_pair_scores(judged, rng)
    report["_histograms"] = hists
    if in_batch_size and hasattr(retriever, "in_batch_recall_at_1"):
        per_batch = retriever.in_batch_recall_at_1(judged, in_batch_size, seed)
        if len(per_batch):
            m["in_batch_recall@1"] = {"mean": float(per_batch.mean()), "ci95": list(M.bootstrap_ci(per_batch, n_boot=n_boot, seed=seed)),
                                      "batch_size": in_batch_size, "batches": int(len(per_batch))}
    return report


def _pooled_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """ROC AUC over all pairs, its interval resampling whole queries; None where undefined (one class)."""
    auc = M.roc_auc(scores, labels)
    low, high = M.bootstrap_grouped(M.roc_auc, groups, scores, labels, n_boot=n_boot, seed=seed)
    return {"mean": _finite(auc), "ci95": [_finite(low), _finite(high)]}


def _finite(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def dense_retriever_for_run(run_dir: str, data_dir: str | None = None, log=None):
    """`(retriever, data_dir, model)` of a run: its product vectors from `RUN/index/` when that index
    covers the data set's catalogue, else embedded now."""
    from tf_q2e.index import INDEX_DIR, META_FILE, embed_catalog, load_index
    from tf_q2e.train import load_model

    model = load_model(run_dir)
    data_dir = data_dir or model.config.data.dir
    if not data_dir:
        raise InputError(f"{run_dir}: the run's config names no data set; pass --data DIR")
    catalog, _ = dataset_files(data_dir)
    index = load_index(run_dir) if os.path.exists(os.path.join(run_dir, INDEX_DIR, META_FILE)) else None
    if index is not None and index.meta.get("catalog") == os.path.abspath(catalog):
        ids, vectors = index.product_ids, index.vectors
    else:
        (log or _log)(f"embedding the catalogue {catalog} (no index of it in {run_dir})")
        ids, _, vectors = embed_catalog(model, catalog, model.config.index.batch_size, model.config.data.on_bad_rows)
    name = os.path.basename(os.path.normpath(run_dir))
    return DenseRetriever(model, ids, vectors, name=name), data_dir, model


def evaluate_run(run_dir: str, data_dir: str | None = None, split: str = "test", n_boot: int = 1000,
                 seed: int = 0, log=None) -> dict:
    """Evaluates a trained run on a split and writes `RUN/eval/` (report.json, report.md, plots)."""
    log = log or _log
    retriever, data_dir, model = dense_retriever_for_run(run_dir, data_dir, log)
    judged = load_judged(_split_path(data_dir, split), model.context_columns, model.image_dim or None)
    report = evaluate(retriever, judged, n_boot=n_boot, seed=seed, in_batch_size=model.config.train.global_batch_size)
    report.update({"run": os.path.abspath(run_dir), "data": os.path.abspath(data_dir), "split": split,
                   "engagement_weight": model.config.model.engagement_weight})
    write_report(report, os.path.join(run_dir, EVAL_DIR))
    return report


def compare(runs: list[str], data_dir: str | None = None, split: str = "test", bm25: bool = False,
            out_dir: str | None = None, n_boot: int = 1000, seed: int = 0, hybrid: bool = False) -> str:
    """One table of several runs (each evaluated on the same data and split); with `bm25`, the
    BM25 baseline; with `hybrid`, one `HybridRetriever` row per run (the run's dense retrieval and
    BM25 fused by RRF, named `hybrid(<run>)`). A run's `RUN/eval/report.json` is reused when it is
    of the same data and split; the BM25 index is built once for both."""
    if hybrid and not runs:
        raise InputError("--hybrid needs run directories: it fuses each run's dense retrieval with BM25")
    reports = []
    for run in runs:
        report = _saved_report(run, data_dir, split)
        if report is None:
            report = evaluate_run(run, data_dir, split, n_boot=n_boot, seed=seed)
        data_dir = data_dir or report.get("data")
        reports.append(report)
    lexical = None
    if bm25 or hybrid:
        if not data_dir:
            flag = "--bm25" if bm25 else "--hybrid"
            raise InputError(f"{flag} without runs needs --data DIR" if not runs else
                             f"{flag} needs --data DIR (the runs' reports name no data set)")
        lexical = BM25Retriever.for_data(data_dir)
    if bm25:
        judged = load_judged(_split_path(data_dir, split), ())
        report = evaluate(lexical, judged, n_boot=n_boot, seed=seed)
        report.update({"data": os.path.abspath(data_dir), "split": split})
        reports.append(report)
    if hybrid:
        for run in runs:
            dense, _, model = dense_retriever_for_run(run, data_dir)
            judged = load_judged(_split_path(data_dir, split), model.context_columns, model.image_dim or None)
            report = evaluate(HybridRetriever(dense, lexical), judged, n_boot=n_boot, seed=seed)
            report.update({"run": os.path.abspath(run), "data": os.path.abspath(data_dir), "split": split})
            reports.append(report)
    table = comparison_table(reports)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "compare.json"), "w", encoding="utf-8") as f:
            json.dump([public(r) for r in reports], f, indent=2)
        with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
            f.write(f"# {split} split of {data_dir}\n\n95% bootstrap intervals over queries.\n\n{table}")
        plot_recall_curves(reports, os.path.join(out_dir, "recall_at_k.png"))
    return table


def _saved_report(run_dir: str, data_dir: str | None, split: str) -> dict | None:
    path = os.path.join(run_dir, EVAL_DIR, "report.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    same_data = data_dir is None or report.get("data") == os.path.abspath(data_dir)
    return report if same_data and report.get("split") == split else None


def _split_path(data_dir: str, split: str) -> str:
    _, splits = dataset_files(data_dir)
    if split not in splits:
        raise InputError(f"{data_dir}: no {split} split (found: {', '.join(splits)})")
    return splits[split]


# -- reports ---------------------------------------------------------------------------------------


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def write_report(report: dict, out_dir: str) -> None:
    """`report.json`, `report.md`, `recall_at_k.png` and `score_histograms.png` in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(public(report), f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# Evaluation of {report['model']} on {report.get('split', 'the split')}\n\n")
        f.write(f"{report['queries']} queries ({report['queries_with_engaged']} with an engaged product), "
                f"{report['rows']} judged rows; 95% bootstrap intervals over queries.\n\n")
        f.write(comparison_table([report]))
    plot_recall_curves([report], os.path.join(out_dir, "recall_at_k.png"))
    if "_histograms" in report:
        plot_histograms(report["_histograms"], report["model"], os.path.join(out_dir, "score_histograms.png"))


TABLE_METRICS = ("recall@10", "recall@100", "recall@1000", "mrr", "engagement_auc_pooled", "engagement_auc_per_query",
                 f"ndcg@{NDCG_K}", "relevance_auc", "in_batch_recall@1")


def comparison_table(reports: list[dict]) -> str:
    """A Markdown table: one row per model, one column per metric (mean [95% interval])."""
    present = [m for m in TABLE_METRICS if any(m in r["metrics"] for r in reports)]
    lines = ["| model | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for r in reports:
        cells = []
        for name in present:
            value = r["metrics"].get(name)
            cells.append(_cell(value))
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: dict | None) -> str:
    if value is None or value["mean"] is None:
        return "–"
    if value["ci95"][0] is None:
        return f"{value['mean']:.4f}"
    return f"{value['mean']:.4f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"


def plot_recall_curves(reports: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        ax.plot(r["recall_curve"]["k"], r["recall_curve"]["recall"], marker="o", label=r["model"])
    ax.set(xscale="log", xlabel="K", ylabel="Recall@K of engaged products", title="Full-catalogue Recall@K", ylim=(0, 1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(histograms: dict[str, np.ndarray], model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in histograms.items():
        if len(values):
            ax.hist(values, bins=50, density=True, histtype="step", linewidth=1.5, label=f"{name} ({len(values)})")
    ax.set(xlabel="score", ylabel="density", title=f"Scores of {model}: engaged, hard-negative, random pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
