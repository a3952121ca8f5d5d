"""Filtered retrieval at catalogue scale: recall@100 and latency of `retrieval_filtered` (issue 19).

On the synthetic catalogue of `benchmarks/retrieval.py` (default 1,000,000
products, 64-d unit vectors in 2,000 topic clusters, an untrained default
model; its `make_catalogue`, `make_queries`, `write_run` and timing helpers are
imported from there), each product gets filter attributes:

* `product_category`: one of 100 categories ("c00".."c99") uniformly at
  random (seeded), independent of the vectors; an allow-list of 50, 10 or 1
  categories then keeps ~50%, ~10% or ~1% of the catalogue (the uniform
  restricts, issue 19's target);
* `product_country`: the product's topic id % 100 ("t00".."t99"), a stand-in
  for an attribute tied to what a product is: the "correlated" stress
  restrict allows 10 of these (~10% of the catalogue, the share depends on the
  Zipf-like topic sizes). Most queries' own topic is then outside the
  restrict, so the products it keeps lie far from the query, outside the
  leaves ScaNN searches first, and the search widens. It goes through the
  country allow-list so that one export serves both variants; the code path
  (an allow-list gather of the attribute's codes) is the category's.

The catalogue is built, tuned (`tf_q2e.index.tune`, target recall 0.95,
unfiltered, as `retrieval.py` does), written as an index with its attributes
(`write_index(..., attributes)`) and exported with `export_run`, so the
signatures measured are the shipped ones: `retrieval`,
`retrieval_filtered` (ScaNN, `tf_q2e.filters.approximate_filtered_top_k`:
the share the restrict keeps from the per-value counts, ScaNN asked for
F = OVERFETCH·k/share candidates with 1/sqrt(share) times the exported
leaves_to_search, the restrict checked at those candidates only
(`ProductFilter.keeps`), F doubling while a query keeps fewer than k; below
EXACT_BELOW_SHARE of the catalogue, exact over the restrict's products
gathered through the rows grouped by value, `ProductFilter.candidate_rows`)
and `retrieval_exact_filtered` (in-graph brute force under the `[B, N]`
`ProductFilter.mask`). The constants are read from `tf_q2e.filters` and
printed. Then, for each restrict (the same restrict for every query):

1. recall@100 of `retrieval_filtered` against `retrieval_exact_filtered`
   (same query strings, same filter), the mean over `--queries` queries:
   one query per call (as a request of one query is served; the figure the
   target is judged on) and in batches of 50 (where one short query widens
   the whole batch's search, so batches recall a little more);
   `retrieval_exact_filtered` is itself checked against NumPy brute force
   over the restrict's vectors;
2. restrict violations: every product id any call returned (ScaNN and exact,
   batched, one per call and the C++ runtime's recorded outputs) is looked up
   in the catalogue; a product whose attribute is not in the allow-list is a
   violation (must be 0). Short results (fewer than 100 products) are
   counted too;
3. latency (p50/p99) of ONE query string -> top 100, query tower included,
   in TensorFlow's C++ runtime as TensorFlow Serving runs a model
   (`benchmarks/cc/serve_latency.cc`: `LoadSavedModel`, one `Session::Run`
   per query, the filter inputs fixed per run with `--strings`/`--int32`):
   one run per restrict times `retrieval` (unfiltered), `retrieval_filtered`
   and `retrieval_exact_filtered` in the same rotating blocks of 25 queries,
   so the ratio filtered / unfiltered is measured side by side. As a
   breakdown, in the same blocks, from a SavedModel of the benchmark's own
   (`breakdown`, class `Breakdown`, built from the same `tf_q2e` calls):
   `query_encoder` (the query tower alone), `filter_share` (the share and
   the first fetch alone) and, where ScaNN serves the restrict,
   `scann_fetch` (query tower + share + ScaNN's op at the first fetch F with
   the widened leaves: `retrieval_filtered`'s first search),
   `scann_fetch_unwidened` (the same at the exported leaves: the cost of the
   wider leaves apart from the bigger fetch), `keeps_at_fetch` (share +
   `keeps` at F random rows, alone) and `first_fetch_filtered` (the whole
   ScaNN path with one fetch, without the `tf.cond`, the widening
   `while_loop` and crowding's checks: it answers as `retrieval_filtered`
   wherever the first fetch keeps 100, checked on the recorded calls); the
   p50 excess of `retrieval_filtered` over `retrieval` is split from these
   into the bigger fetch, the wider leaves, the checks at the candidates and
   the control flow. Where the restrict is served exactly: `candidate_rows`
   (the restrict's rows gathered, alone) and `exact_subset` (query tower +
   those rows' float16 vectors scored + `keeps` + top k, no control flow;
   checked against `retrieval_filtered` too). With `--no-cc` (or no C++
   compiler) the same calls are timed in Python on the loaded signatures.

Also printed per restrict: how many queries' first over-fetch keeps fewer
than 100 matching products (these widen: another ScaNN search at twice the
fetch, up to MAX_FETCH), from the breakdown's `scann_fetch` in Python; and,
for the restricts ScaNN serves, a sweep of ScaNN's op alone on the query
vectors at 1, 2, 4 and 8x the exported leaves_to_search and at the
1/sqrt(share) times that `retrieval_filtered` searches, each at 2, 4 and 8x
k/share over-fetch (reorder widened to the fetch): recall@100 of the first
100 matching products against the exact filtered top 100, and the op's p50
(eager, one query vector per call): where the recall is lost and what
getting it back costs.

Targets (issue 19): recall@100 >= 0.95 at each of the 50%, 10%, 1% uniform
restricts (one query per call); no returned product violates its restrict;
p50 of `retrieval_filtered` <= 2x `retrieval`'s at each of them (C++
runtime; Python with `--no-cc`). The correlated restrict is reported, with no
target. The machine's load average is printed at the start and end of the
run and before each latency run: the machine is shared and the latencies move
with its load.

The 1M-product measurement (~12-15 minutes on 2 cores; peak RSS ~6 GB), and
its latency part again later on the kept work directory (e.g. once the
shared machine is quieter; the models there keep the constants they were
exported with):

  .venv/bin/python benchmarks/filters.py --out /tmp/q2e-filters --keep --json runs/filters_1m.json | tee runs/filters_1m.txt
  .venv/bin/python benchmarks/filters.py --retime /tmp/q2e-filters --json runs/filters_1m_retime.json

Usage:
  .venv/bin/python benchmarks/filters.py [--products 1000000] [--dim 64] [--queries 1000]
      [--latency-queries 300] [--out DIR] [--keep] [--json FILE] [--seed 0] [--no-cc] [--no-correlated]
  .venv/bin/python benchmarks/filters.py --retime DIR [--latency-queries 300] [--json FILE]

The work directory (`--out`, default a new temporary directory) holds the run,
its index, the exported models, the breakdown model and `retime.json` (the
restricts and latency queries, for `--retime`); it is removed at the end
unless `--keep`. Exit code 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf_q2e  # noqa: E402,F401  (Keras 2 before TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_q2e.config import load_config  # noqa: E402
from tf_q2e.data import schema as S  # noqa: E402
from tf_q2e.filters import (  # noqa: E402
    EXACT_BELOW_SHARE, FILTER_SPEC, MAX_FETCH, OVERFETCH, PAD_INDEX, Filters, ProductFilter, compact, fetch_size,
)
from tf_q2e.index import (  # noqa: E402
    INDEX_DIR, PAD_SCORE, ScannOptions, ScannTopK, build_searcher, exact_top_k, tune, write_index,
)
from tf_q2e.savedmodels import _results, export_run, query_spec  # noqa: E402
from tf_q2e.train import build_model  # noqa: E402

from cc import serve_latency  # noqa: E402  (benchmarks/cc/serve_latency.py, next to this script)
from retrieval import (  # noqa: E402  (benchmarks/retrieval.py, next to this script)
    QUERY_CHUNK, add_catalogue_arguments, add_work_arguments, encode_queries, id_recall, in_process_call, interleaved_latencies, log,
    make_catalogue, make_queries, peak_rss_mb, percentile, run_in_work_dir, write_json, write_run,
)

K = 100
TARGET_RECALL = 0.95
TARGET_RATIO = 2.0
CATEGORIES = 100
UNIFORM_RESTRICTS = (50, 10, 1)  # categories allowed of CATEGORIES: ~50%, 10%, 1% of the catalogue
CORRELATED_RESTRICT = 10  # topic groups allowed of CATEGORIES
MODEL_NAME = "q2e"
SWEEP_LEAVES = (1, 2, 4, 8)  # multiples of the exported leaves_to_search in the ScaNN sweep (+ retrieval_filtered's)
SWEEP_OVERFETCH = (2, 4, 8)  # over-fetch factors (fetch = factor x k / share), in the ScaNN sweep
RETIME_FILE = "retime.json"  # in the work directory: the restricts and latency queries, for --retime
RECORD = 20  # queries whose outputs the C++ runtime returns (checked for violations, compared with Python)


# -- the attributes and the restricts ------------------------------------------------------------


def make_attributes(topic_of: np.ndarray, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """`(attributes for write_index, category codes [N], topic group codes [N])`: a uniform random category
    of `CATEGORIES` ("c00".."c99") and the topic's group (topic % CATEGORIES, "t00".."t99", as the country)."""
    rng = np.random.default_rng(seed + 19)
    category = rng.integers(0, CATEGORIES, size=len(topic_of)).astype(np.int32)
    group = (topic_of % CATEGORIES).astype(np.int32)
    names = np.array([f"c{i:02d}" for i in range(CATEGORIES)], dtype=object)
    groups = np.array([f"t{i:02d}" for i in range(CATEGORIES)], dtype=object)
    return {"category": names[category], "country": groups[group]}, category, group


@dataclasses.dataclass
class Restrict:
    name: str
    kind: str  # "uniform" (categories) or "correlated" (topic groups, through the country allow-list)
    filters: Filters
    codes: np.ndarray  # [N] the attribute's code of each product
    allowed: np.ndarray  # the allowed codes
    share: float = 0.0

    def matches(self) -> np.ndarray:
        return np.isin(self.codes, self.allowed)

    def graph_share(self) -> np.float32:
        """The share as `ProductFilter.share` computes it (float32 count / N): it sizes the fetch and the leaves."""
        return np.float32(self.matches().sum()) / np.float32(len(self.codes))

    def inputs(self) -> dict:
        """The filter inputs of one query, as `serve_latency.run(inputs=...)` takes them."""
        f = self.filters
        return {"categories": list(f.categories), "countries": list(f.countries), "exclude_product_ids": list(f.exclude),
                "max_per_category": f.max_per_category, "max_per_seller": f.max_per_seller}


def make_restricts(category: np.ndarray, group: np.ndarray, seed: int, correlated: bool) -> list[Restrict]:
    rng = np.random.default_rng(seed + 20)
    order = rng.permutation(CATEGORIES)
    out = []
    for m in UNIFORM_RESTRICTS:
        allowed = np.sort(order[:m])
        out.append(Restrict(f"uniform {m}/{CATEGORIES} categories", "uniform",
                            Filters(categories=tuple(f"c{i:02d}" for i in allowed)), category, allowed))
    if correlated:
        allowed = np.sort(rng.permutation(CATEGORIES)[:CORRELATED_RESTRICT])
        out.append(Restrict(f"correlated {CORRELATED_RESTRICT}/{CATEGORIES} topic groups", "correlated",
                            Filters(countries=tuple(f"t{i:02d}" for i in allowed)), group, allowed))
    for r in out:
        r.share = float(r.matches().mean())
    return out


def first_fetch(share, n: int, factor: float = OVERFETCH) -> int:
    """What `retrieval_filtered` asks ScaNN for first (`tf_q2e.filters.fetch_size` for k results, in float32 as
    the graph computes it; at least k), or with another over-fetch `factor`."""
    fetch = np.ceil(np.float32(factor) * np.float32(K) / max(np.float32(share), np.float32(1e-9)))
    return int(max(min(float(fetch), min(n, MAX_FETCH)), K))


def widened_leaves(options: ScannOptions, share) -> int:
    """The leaves `ScannTopK.search_fetch` searches under `share` (float32 as in the graph: the exported
    leaves_to_search / sqrt(share), at most every leaf); -1 (the built value) without a tree."""
    if options.kind != "tree_ah" or not options.leaves_to_search:
        return -1
    widened = np.ceil(np.float32(options.leaves_to_search) / np.sqrt(max(np.float32(share), np.float32(1e-6))))
    return int(min(float(widened), options.num_leaves))


def is_scann_path(restrict: Restrict) -> bool:
    """Whether `retrieval_filtered` serves the restrict by ScaNN (else: exact over its products)."""
    return bool(restrict.graph_share() >= EXACT_BELOW_SHARE) and \
        OVERFETCH * K / max(float(restrict.graph_share()), 1e-9) <= MAX_FETCH


# -- the breakdown SavedModel ----------------------------------------------------------------------


class Breakdown(tf.Module):
    """Pieces of `retrieval_filtered`, each a signature of its own (the inputs as `retrieval_filtered`'s), built
    from the same `tf_q2e` calls as `ScannTopK.search_filtered` / `approximate_filtered_top_k`:

    * `filter_share`: `ProductFilter.share` of the restrict (the batch's minimum) and the first fetch
      `fetch_size(share, k)`, alone (no query tower);
    * `scann_fetch`: query tower + share + ScaNN's op at the first fetch F with the widened leaves
      (`search_fetch(queries, F, share)`: leaves_to_search / sqrt(share), reorder widened to F), exactly
      the first search of `retrieval_filtered`; `scann_fetch_unwidened`: the same with the exported
      leaves (share 1 for the leaves), so the cost of the wider leaves shows apart from the bigger fetch;
    * `keeps_at_fetch`: share + `ProductFilter.keeps` at F candidates alone (fixed random rows of the
      catalogue standing in for ScaNN's, no query tower, no search);
    * `first_fetch_filtered`: the whole ScaNN path with ONE fetch: query tower, share, the widened search,
      `keeps`, `compact` and the outputs, without `tf.cond`, the widening `while_loop` and crowding's
      checks; it returns what `retrieval_filtered` does wherever the first fetch keeps k (checked);
    * `candidate_rows`: `ProductFilter.candidate_rows` alone (the rows grouped by value, gathered);
    * `exact_subset`: the exact path with no widening: query tower, `candidate_rows`, the float16 vectors
      gathered and scored, `keeps`, top k, the outputs (what `retrieval_filtered` returns below
      EXACT_BELOW_SHARE without crowding; checked).
    """

    def __init__(self, model, searcher, options: ScannOptions, product_ids, titles, vectors: np.ndarray,
                 attributes: dict, seed: int = 0):
        super().__init__(name="breakdown")
        self.query_tower = model.query_tower
        self.engagement = model.engagement
        self.top_k = ScannTopK(searcher.serialize_to_module(), [str(p) for p in product_ids], options, k=K)
        self.product_filter = ProductFilter(product_ids, attributes)
        self.titles = tf.Variable(tf.constant([str(t) for t in titles], tf.string), trainable=False)
        self.vectors = tf.Variable(vectors.astype(np.float16), trainable=False)  # as ScannModule's
        n = len(product_ids)
        self.n = n
        rows = np.random.default_rng(seed + 21).integers(0, n, size=min(n, MAX_FETCH)).astype(np.int32)
        self.sample_rows = tf.Variable(rows, trainable=False)  # stand-ins for ScaNN's candidates (keeps_at_fetch)
        self.query_spec = query_spec(model.context_columns)
        self._signatures = None

    def signatures(self) -> dict:
        if self._signatures is None:
            self._signatures = self._make_signatures()
        return self._signatures

    def _first(self, filters: dict):
        """`(restricts, share, fetch)` as `approximate_filtered_top_k` computes them for k results."""
        restricts = (filters["categories"], filters["countries"], filters["exclude_product_ids"])
        share = tf.reduce_min(self.product_filter.share(*restricts))
        return restricts, share, tf.maximum(fetch_size(share, K, self.n), K)

    def _make_signatures(self) -> dict:
        pf = self.product_filter

        @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
        def filter_share(features, filters):
            _, share, fetch = self._first(filters)
            return {"share": share, "fetch": fetch, "queries": tf.size(features[S.QUERY])}

        def fetch_signature(widen: bool):
            @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
            def scann_fetch(features, filters):
                queries = self.query_tower(features, training=False)
                _, share, fetch = self._first(filters)
                scores, indices = self.top_k.search_fetch(queries, fetch, share if widen else 1.0)
                return {"scores": scores, "indices": indices, "fetch": fetch, "share": share}
            return scann_fetch

        @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
        def keeps_at_fetch(features, filters):
            restricts, _, fetch = self._first(filters)
            batch = tf.size(features[S.QUERY])
            rows = tf.broadcast_to(self.sample_rows[tf.newaxis, :fetch], tf.stack([batch, fetch]))
            return {"kept": tf.reduce_sum(tf.cast(pf.keeps(rows, *restricts), tf.int32), axis=1)}

        @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
        def first_fetch_filtered(features, filters):
            queries, query_bias = self.query_tower(features, training=False, return_bias=True)
            restricts, share, fetch = self._first(filters)
            scores, rows = self.top_k.search_fetch(queries, fetch, share)
            rows = tf.cast(rows, tf.int32)
            scores, indices = compact(tf.cast(scores, tf.float32), rows, pf.keeps(rows, *restricts), K, PAD_SCORE)
            return _results(scores, indices, query_bias, self.engagement, self.top_k.identifiers, self.titles)

        @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
        def candidate_rows(features, filters):
            rows = pf.candidate_rows(filters["categories"], filters["countries"])
            return {"rows": tf.size(rows), "queries": tf.size(features[S.QUERY])}

        @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
        def exact_subset(features, filters):
            queries, query_bias = self.query_tower(features, training=False, return_bias=True)
            restricts = (filters["categories"], filters["countries"], filters["exclude_product_ids"])
            rows = pf.candidate_rows(filters["categories"], filters["countries"])  # [M]
            scores = tf.matmul(queries, tf.cast(tf.gather(self.vectors, rows), queries.dtype), transpose_b=True)
            keep = pf.keeps(tf.broadcast_to(rows, tf.shape(scores)), *restricts)
            scores = tf.where(keep, scores, tf.constant(-np.inf, scores.dtype))
            top, positions = tf.math.top_k(scores, k=tf.minimum(K, tf.size(rows)))
            found = tf.where(tf.math.is_finite(top), tf.gather(rows, positions), PAD_INDEX)
            scores, indices = compact(tf.cast(top, tf.float32), found, found >= 0, K, PAD_SCORE)
            return _results(scores, indices, query_bias, self.engagement, self.top_k.identifiers, self.titles)

        return {"filter_share": filter_share, "scann_fetch": fetch_signature(True),
                "scann_fetch_unwidened": fetch_signature(False), "keeps_at_fetch": keeps_at_fetch,
                "first_fetch_filtered": first_fetch_filtered, "candidate_rows": candidate_rows,
                "exact_subset": exact_subset}


def save_breakdown(module: Breakdown, path: str) -> str:
    logger, level = tf.get_logger(), tf.get_logger().level
    try:
        logger.setLevel("ERROR")
        tf.saved_model.save(module, path, signatures=module.signatures(),
                            options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
    finally:
        logger.setLevel(level)
    return path


# -- measuring -----------------------------------------------------------------------------------


def filtered_call(fn, texts: list[str], restrict: Restrict) -> dict[str, np.ndarray]:
    out = fn(query=tf.constant(texts), **restrict.filters.inputs(len(texts)))
    return {name: value.numpy() for name, value in out.items()}


def run_batched(fn, texts: list[str], restrict: Restrict | None, batch: int = QUERY_CHUNK) -> dict[str, np.ndarray]:
    outputs = [filtered_call(fn, texts[i:i + batch], restrict) if restrict else
               {n: v.numpy() for n, v in fn(query=tf.constant(texts[i:i + batch])).items()}
               for i in range(0, len(texts), batch)]
    return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}


def product_rows(ids: np.ndarray) -> np.ndarray:
    """Row of each product id "p0001234" (bytes or str; "" -> -1)."""
    flat = [(v.decode() if isinstance(v, bytes) else str(v)) for v in np.ravel(ids)]
    return np.array([int(v[1:]) if v else -1 for v in flat], np.int64).reshape(np.shape(ids))


def audit(ids: np.ndarray, restrict: Restrict) -> dict:
    """Violations (returned products outside the restrict), short rows (fewer than K products)."""
    rows = product_rows(ids)
    found = rows >= 0
    outside = found & ~np.isin(restrict.codes[np.maximum(rows, 0)], restrict.allowed)
    return {"violations": int(outside.sum()), "short_rows": int((found.sum(axis=1) < K).sum()), "rows": len(rows),
            "products": int(found.sum())}


def merge_audits(*audits: dict) -> dict:
    return {key: sum(a[key] for a in audits) for key in ("violations", "short_rows", "rows", "products")}


def per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([len(set(f.tolist()) - {b""} & set(t.tolist())) / len(t) for f, t in zip(found, truth)])


def measure_quality(restrict: Restrict, sigs: dict, texts: list[str], query_vectors: np.ndarray, catalogue,
                    breakdown, nearest_topic: np.ndarray) -> dict:
    """recall@K and audits of one restrict (Python, the loaded signatures)."""
    start = time.perf_counter()
    exact = run_batched(sigs["retrieval_exact_filtered"], texts, restrict)["product_ids"]
    batched = run_batched(sigs["retrieval_filtered"], texts, restrict)["product_ids"]
    single = np.concatenate([filtered_call(sigs["retrieval_filtered"], [t], restrict)["product_ids"] for t in texts])
    # NumPy brute force over the restrict's vectors: retrieval_exact_filtered's own check.
    rows = np.flatnonzero(restrict.matches())
    _, top = exact_top_k(catalogue.vectors[rows], query_vectors, K)
    numpy_ids = np.vectorize(lambda i: catalogue.product_ids[i].encode(), otypes=[object])(rows[top])
    recall_single = per_query_recall(single, exact)
    # How many queries widen: the first over-fetch keeps fewer than K of the restrict's products.
    widen = None
    if is_scann_path(restrict):
        fn = breakdown.signatures()["scann_fetch"]  # retrieval_filtered's first search (widened leaves)
        kept, fetches = [], set()
        for i in range(0, len(texts), QUERY_CHUNK):
            chunk = texts[i:i + QUERY_CHUNK]
            out = fn({S.QUERY: tf.constant(chunk)}, restrict.filters.inputs(len(chunk)))
            got = out["indices"].numpy()
            fetches.add(int(out["fetch"].numpy()))
            ok = got >= 0
            kept.append((ok & np.isin(restrict.codes[np.maximum(got, 0)], restrict.allowed)).sum(axis=1))
        kept = np.concatenate(kept)
        widen = {"first_fetch": first_fetch(restrict.graph_share(), len(catalogue.vectors)),
                 "first_fetch_in_graph": sorted(fetches), "queries_widening": int((kept < K).sum()),
                 "kept_after_first_fetch_p50": float(np.median(kept)), "kept_after_first_fetch_min": int(kept.min())}
    in_restrict = np.isin(nearest_topic % CATEGORIES, restrict.allowed) if restrict.kind == "correlated" else None
    out = {
        "share": round(restrict.share, 4),
        "path": ("ScaNN over-fetch" if is_scann_path(restrict)
                 else f"exact over the restrict (share < {EXACT_BELOW_SHARE:g})"),
        "recall_single": round(float(recall_single.mean()), 4),
        "recall_single_p1": round(float(np.percentile(recall_single, 1)), 3),
        "recall_single_min": round(float(recall_single.min()), 3),
        "recall_batched": round(id_recall(batched, exact), 4),
        "exact_vs_numpy": round(id_recall(exact, numpy_ids), 4),
        "audit": {"retrieval_filtered (1 per call)": audit(single, restrict),
                  f"retrieval_filtered (batches of {QUERY_CHUNK})": audit(batched, restrict),
                  "retrieval_exact_filtered": audit(exact, restrict)},
        "widening": widen,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if in_restrict is not None:
        out["queries_own_topic_in_restrict"] = int(in_restrict.sum())
        out["recall_single_own_topic_in"] = round(float(recall_single[in_restrict].mean()), 4) if in_restrict.any() else None
        out["recall_single_own_topic_out"] = round(float(recall_single[~in_restrict].mean()), 4) if (~in_restrict).any() else None
    out["_reference"] = single[:RECORD]
    out["_truth_rows"] = rows[top]
    return out


def scann_sweep(searcher, options: ScannOptions, query_vectors: np.ndarray, restrict: Restrict, truth_rows: np.ndarray,
                n: int, timed: int = 100) -> list[dict]:
    """recall@K under `restrict` of ScaNN's op alone (the exported index) at multiples of the exported
    leaves_to_search (`SWEEP_LEAVES`, and the 1/sqrt(share) times that `retrieval_filtered` searches) and of
    the over-fetch (`SWEEP_OVERFETCH`; reorder max(reorder, fetch), as `search_fetch` asks), the first K
    matching products of each query's fetch kept (what `retrieval_filtered` keeps when it does not widen),
    against the exact filtered top K (`truth_rows`); and the p50 of the op on one query vector (eager,
    `timed` queries): where the recall goes and what it costs."""
    from scann.scann_ops.py import scann_ops

    handle, matches = searcher.searcher_handle, restrict.matches()
    share = restrict.graph_share()
    out = []
    # Without a tree (kind "ah", small catalogues) every product is scored: no leaves to vary (-1).
    widened = widened_leaves(options, share)
    leaf_settings = (sorted({min(options.num_leaves, options.leaves_to_search * m) for m in SWEEP_LEAVES} | {widened})
                     if options.kind == "tree_ah" else [-1])
    for leaves in leaf_settings:
        for over in SWEEP_OVERFETCH:
            fetch = first_fetch(share, n, over)
            pre = max(options.reorder, fetch) if options.reorder else -1
            recalls = []
            for i in range(0, len(query_vectors), QUERY_CHUNK):
                got = scann_ops.scann_search_batched(handle, tf.constant(query_vectors[i:i + QUERY_CHUNK]), fetch, pre,
                                                     leaves, False).indices.numpy()
                for row, truth in zip(got, truth_rows[i:i + QUERY_CHUNK]):
                    row = row[row >= 0]
                    kept = row[matches[row]][:K]
                    recalls.append(len(set(kept.tolist()) & set(truth.tolist())) / K)
            times = []
            for v in query_vectors[:timed]:
                start = time.perf_counter()
                scann_ops.scann_search_batched(handle, tf.constant(v[None, :]), fetch, pre, leaves, False).indices.numpy()
                times.append((time.perf_counter() - start) * 1e3)
            out.append({"leaves_to_search": leaves, "leaves_factor": (round(leaves / options.leaves_to_search, 2)
                                                                       if leaves > 0 else None),
                        "overfetch": over, "fetch": fetch, "reorder": pre,
                        "recall": round(float(np.mean(recalls)), 4), "p50_ms": round(percentile(times, 50), 3),
                        "retrieval_filtered_first_fetch": bool(leaves == widened and over == OVERFETCH)})
    base = scann_ops.scann_search_batched  # the unfiltered search with the exported options, for the times' scale
    leaves = options.leaves_to_search if options.kind == "tree_ah" else -1
    times = []
    for v in query_vectors[:timed]:
        start = time.perf_counter()
        base(handle, tf.constant(v[None, :]), K, options.reorder or -1, leaves, False).indices.numpy()
        times.append((time.perf_counter() - start) * 1e3)
    out.append({"unfiltered": True, "leaves_to_search": leaves, "fetch": K, "reorder": options.reorder,
                "p50_ms": round(percentile(times, 50), 3)})
    return out


def latency_summary(times: dict[str, list[float]]) -> dict:
    out = {name: {"p50_ms": round(percentile(t, 50), 3), "p99_ms": round(percentile(t, 99), 3),
                  "mean_ms": round(float(np.mean(t)), 3), "calls": len(t)} for name, t in times.items()}
    out["ratio_p50"] = round(out["retrieval_filtered"]["p50_ms"] / out["retrieval"]["p50_ms"], 2)
    out["ratio_p99"] = round(out["retrieval_filtered"]["p99_ms"] / out["retrieval"]["p99_ms"], 2)
    return out


# The breakdown's signatures timed beside the shipped ones: for every restrict, and by the path
# retrieval_filtered takes for it. Each (label: breakdown signature) takes the restrict's filter inputs.
BREAKDOWN_ALWAYS = ("filter_share",)
BREAKDOWN_SCANN = ("scann_fetch", "scann_fetch_unwidened", "keeps_at_fetch", "first_fetch_filtered")
BREAKDOWN_EXACT = ("candidate_rows", "exact_subset")
# Breakdown signatures that return what retrieval_filtered does (wherever no query widens).
SAME_AS_FILTERED = ("first_fetch_filtered", "exact_subset")


def breakdown_names(restrict: Restrict) -> tuple[str, ...]:
    return BREAKDOWN_ALWAYS + (BREAKDOWN_SCANN if is_scann_path(restrict) else BREAKDOWN_EXACT)


def cc_latency(binary: str, work: str, dirs: dict, restrict: Restrict, texts: list[str], n: int,
               options: ScannOptions) -> dict:
    """One C++ runtime run for `restrict`: the unfiltered and filtered signatures and the breakdown, side by side."""
    signatures = {"retrieval": (dirs["scann"], "retrieval"),
                  "retrieval_filtered": (dirs["scann"], "retrieval_filtered"),
                  "retrieval_exact_filtered": (dirs["stock"], "retrieval_exact_filtered"),
                  "query_encoder": (dirs["stock"], "query_encoder")}
    signatures.update({name: (dirs["breakdown"], name) for name in breakdown_names(restrict)})
    load = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    out = serve_latency.run(binary, texts, signatures, work, inputs=restrict.inputs(), record=RECORD)
    summary = latency_summary(out["times_ms"])
    summary["load_average_1min_before"] = load
    summary["seconds"] = round(time.perf_counter() - start, 1)
    recorded = {name: np.concatenate([o["product_ids"] for o in out["outputs"][name]])
                for name in ("retrieval_filtered", "retrieval_exact_filtered") + SAME_AS_FILTERED if name in signatures}
    summary["audit"] = {name: audit(ids, restrict) for name, ids in recorded.items()}
    for name in SAME_AS_FILTERED:  # the same where no recorded query widens
        if name in recorded:
            summary[f"{name}_same_ids"] = float(np.mean([np.array_equal(a, b) for a, b in zip(
                recorded[name], recorded["retrieval_filtered"])]))
    graph = out["outputs"]["filter_share"][0]
    summary["graph_share"] = round(float(np.ravel(graph["share"])[0]), 5)
    summary["graph_fetch"] = int(np.ravel(graph["fetch"])[0])
    if is_scann_path(restrict):
        summary["fetch"] = summary["graph_fetch"]
        summary["fetch_as_python_computes_it"] = first_fetch(restrict.graph_share(), n)
        summary["leaves"] = widened_leaves(options, restrict.graph_share())
        summary["exported_leaves"] = options.leaves_to_search
    else:
        summary["candidate_rows_count"] = int(np.ravel(out["outputs"]["candidate_rows"][0]["rows"])[0])
    summary["_recorded"] = recorded["retrieval_filtered"]
    return summary


def python_latency(sigs: dict, breakdown_sigs: dict, restrict: Restrict, texts: list[str], n: int,
                   options: ScannOptions) -> dict:
    """The C++ runtime's calls, in Python on the loaded signatures (`--no-cc`, or no C++ compiler)."""
    one = restrict.filters.inputs(1)
    calls = {"retrieval": in_process_call(sigs["retrieval"]),
             "retrieval_filtered": _numpy(lambda t: sigs["retrieval_filtered"](query=tf.constant([t]), **one)),
             "retrieval_exact_filtered": _numpy(lambda t: sigs["retrieval_exact_filtered"](query=tf.constant([t]), **one)),
             "query_encoder": in_process_call(sigs["query_encoder"])}
    for name in breakdown_names(restrict):
        calls[name] = _numpy(lambda t, fn=breakdown_sigs[name]: fn(query=tf.constant([t]), **one))
    load = round(os.getloadavg()[0], 2)
    summary = latency_summary(interleaved_latencies(calls, texts))
    summary["load_average_1min_before"] = load
    if is_scann_path(restrict):
        summary["fetch"] = first_fetch(restrict.graph_share(), n)
        summary["leaves"] = widened_leaves(options, restrict.graph_share())
        summary["exported_leaves"] = options.leaves_to_search
    return summary


def _numpy(call):
    """`call` with its outputs fetched as NumPy (as `in_process_call` does)."""
    def run(text):
        return {name: value.numpy() for name, value in call(text).items()}
    return run


# -- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_catalogue_arguments(parser, latency_help="single-query calls per signature and restrict")
    add_work_arguments(parser)
    parser.add_argument("--no-cc", action="store_true", help="time in Python instead of the C++ runtime (needs g++ or $CXX)")
    parser.add_argument("--no-correlated", action="store_true", help="skip the correlated stress restrict")
    parser.add_argument("--retime", metavar="DIR",
                        help="only time again (part 3, C++ runtime) the models of an earlier run's kept work directory")
    args = parser.parse_args(argv)
    if args.retime:
        wall = time.perf_counter()
        figures = retime(args)
        figures["wall_seconds"] = round(time.perf_counter() - wall, 1)
        figures["setup"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        print(f"\nFiltered retrieval benchmark, latency again (--retime {args.retime}): {figures['setup']['products']:,} "
              f"products, {figures['setup']['cpu_cores']} CPU cores, TensorFlow {figures['setup']['tensorflow']}")
        print(f"  machine load average (1/5/15 min): {figures['setup']['load_average_start']} at start, "
              f"{figures['setup']['load_average_end']} at end")
        print_latency(figures)
        print_targets(figures)
        write_json(args.json, figures)
        return 0 if all(t["pass"] for t in figures["targets"].values()) else 1
    if args.products < 10_000 or args.queries < 10 or args.latency_queries < 10:
        parser.error("--products >= 10000 (a 1% restrict keeps 100), --queries >= 10 and --latency-queries >= 10")
    figures = run_in_work_dir(parser, args, run, "q2e-filters-bench-")
    figures["setup"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print_report(figures)
    write_json(args.json, figures)
    return 0 if all(t["pass"] for t in figures["targets"].values()) else 1


def run(args, work: str) -> dict:
    fig: dict = {"setup": {"products": args.products, "dim": args.dim, "k": K, "queries": args.queries,
                           "latency_queries": args.latency_queries, "topics": args.topics, "seed": args.seed,
                           "categories": CATEGORIES, "cpu_cores": os.cpu_count(), "tensorflow": tf.__version__,
                           "load_average_start": [round(v, 2) for v in os.getloadavg()],
                           "filter_constants": {"OVERFETCH": OVERFETCH, "EXACT_BELOW_SHARE": EXACT_BELOW_SHARE,
                                                "MAX_FETCH": MAX_FETCH}}}
    run_dir, base = os.path.join(work, "run"), os.path.join(work, "export")

    # The model (default config, untrained) and its run directory; the catalogue, its attributes and the queries.
    config = load_config(None, [f"model.embedding_dim={args.dim}", f"index.k={K}", f"train.seed={args.seed}"])
    tf.keras.utils.set_random_seed(args.seed)
    model = build_model(config, 0, ())
    write_run(run_dir, config, model)
    start = time.perf_counter()
    catalogue = make_catalogue(model, args.products, args.dim, args.topics, args.seed)
    texts, _ = make_queries(catalogue, args.queries, args.seed)
    query_vectors = encode_queries(model, texts)
    nearest_topic = np.argmax(query_vectors @ encode_queries(model, catalogue.topics).T, axis=1)
    attributes, category, group = make_attributes(catalogue.topic_of, args.seed)
    restricts = make_restricts(category, group, args.seed, not args.no_correlated)
    log(f"catalogue of {args.products:,} x {args.dim}, attributes and {len(texts)} queries in "
        f"{time.perf_counter() - start:.1f} s")
    fig["setup"]["catalogue"] = (
        f"{args.products:,} unit vectors in {args.topics} clusters (benchmarks/retrieval.py's make_catalogue); "
        f"product_category uniform over {CATEGORIES} categories; product_country = topic % {CATEGORIES}")
    fig["setup"]["restricts"] = {r.name: {"filter": dataclasses.asdict(r.filters), "share": round(r.share, 4)}
                                 for r in restricts}

    # ScaNN: build and tune (unfiltered, as retrieval.py), the index with its attributes, the export.
    options = ScannOptions.for_catalog(config.index, args.products, K)
    start = time.perf_counter()
    searcher = build_searcher(catalogue.vectors, options, K)
    build_seconds = time.perf_counter() - start
    log(f"built ScaNN {options} in {build_seconds:.1f} s")
    start = time.perf_counter()
    chosen, table = tune(searcher, options, catalogue.vectors, query_vectors, K, TARGET_RECALL,
                         latency_queries=min(args.tune_latency_queries, len(texts)))
    row = next(r for r in table if r.get("chosen"))
    log(f"tuned in {time.perf_counter() - start:.0f} s: leaves_to_search {chosen.leaves_to_search}, reorder {chosen.reorder}")
    fig["index"] = {"options": dataclasses.asdict(chosen), "build_seconds": round(build_seconds, 1),
                    "tune_seconds": round(time.perf_counter() - start, 1), "tuned": row}
    start = time.perf_counter()
    meta = {"products": args.products, "dim": args.dim, "k": K, "catalog": "synthetic (benchmarks/filters.py)",
            "build_seconds": round(build_seconds, 2), "scann": dataclasses.asdict(chosen),
            "tune": {"target_recall": TARGET_RECALL, "queries": len(texts), "chosen": row, "tried": table}}
    write_index(os.path.join(run_dir, INDEX_DIR), catalogue.product_ids, catalogue.titles, catalogue.vectors, searcher,
                meta, attributes)
    fig["index"]["write_index_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    export_run(run_dir, base, MODEL_NAME, k=K, log=log)
    fig["index"]["export_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    breakdown = Breakdown(model, searcher, chosen, catalogue.product_ids, catalogue.titles, catalogue.vectors, attributes,
                          args.seed)
    dirs = {"stock": os.path.join(base, MODEL_NAME, "1"), "scann": os.path.join(base, MODEL_NAME + "_scann", "1"),
            "breakdown": save_breakdown(breakdown, os.path.join(work, "breakdown"))}
    log(f"exported in {fig['index']['export_seconds']:.0f} s; breakdown model saved in {time.perf_counter() - start:.0f} s")
    latency_texts = texts[:args.latency_queries]
    with open(os.path.join(work, RETIME_FILE), "w", encoding="utf-8") as f:  # what --retime needs
        json.dump({"products": args.products, "latency_texts": latency_texts,
                   "restricts": [{"name": r.name, "kind": r.kind, "filters": dataclasses.asdict(r.filters),
                                  "allowed": r.allowed.tolist()} for r in restricts]}, f)

    import scann  # noqa: F401  (registers the Scann* ops)

    stock = tf.saved_model.load(dirs["stock"])
    scann_model = tf.saved_model.load(dirs["scann"])
    sigs = {"retrieval": scann_model.signatures["retrieval"], "retrieval_filtered": scann_model.signatures["retrieval_filtered"],
            "retrieval_exact_filtered": stock.signatures["retrieval_exact_filtered"],
            "query_encoder": stock.signatures["query_encoder"]}

    # 1-2. recall and violations, in Python through the loaded signatures.
    fig["quality"] = {}
    for r in restricts:
        fig["quality"][r.name] = measure_quality(r, sigs, texts, query_vectors, catalogue, breakdown, nearest_topic)
        q = fig["quality"][r.name]
        log(f"{r.name}: share {r.share:.4f}, recall@{K} {q['recall_single']:.4f} (1 per call), "
            f"{q['recall_batched']:.4f} (batched), {q['seconds']} s")
    # Where the recall goes: ScaNN's op alone under each restrict it serves, at more leaves and more over-fetch.
    fig["sweep"] = {}
    for r in restricts:
        if is_scann_path(r):
            start = time.perf_counter()
            fig["sweep"][r.name] = scann_sweep(searcher, chosen, query_vectors, r, fig["quality"][r.name]["_truth_rows"],
                                               args.products)
            log(f"{r.name}: ScaNN sweep in {time.perf_counter() - start:.0f} s")
    for q in fig["quality"].values():
        del q["_truth_rows"]
    unfiltered = run_batched(sigs["retrieval"], texts, None)["product_ids"]
    unfiltered_exact = run_batched(stock.signatures["retrieval_exact"], texts, None)["product_ids"]
    fig["unfiltered_recall"] = round(id_recall(unfiltered, unfiltered_exact), 4)
    del unfiltered, unfiltered_exact

    # 3. latency, one query string per call: the C++ runtime (one process per restrict), else Python.
    fig["latency"] = {}
    binary, why = (None, "--no-cc") if args.no_cc else serve_latency.build(work)
    fig["latency_runtime"] = "C++ runtime" if binary else f"Python (C++ runtime skipped: {why})"
    if binary is None:
        breakdown_sigs = tf.saved_model.load(dirs["breakdown"]).signatures
    del stock, scann_model
    for r in restricts:
        if binary:
            lat = cc_latency(binary, work, dirs, r, latency_texts, args.products, chosen)
            recorded = lat.pop("_recorded")
            reference = fig["quality"][r.name]["_reference"][:len(recorded)]
            lat["same_ids_as_python"] = float(np.mean([np.array_equal(a.astype(object), np.array([b.decode() for b in c],
                                                                                              dtype=object))
                                                        for a, c in zip(recorded, reference)]))
        else:
            lat = python_latency(sigs, breakdown_sigs, r, latency_texts, args.products, chosen)
        fig["latency"][r.name] = lat
        log(f"{r.name}: p50 retrieval {lat['retrieval']['p50_ms']:.2f} ms, retrieval_filtered "
            f"{lat['retrieval_filtered']['p50_ms']:.2f} ms ({lat['ratio_p50']:.2f}x), load {lat['load_average_1min_before']}")
    for q in fig["quality"].values():
        del q["_reference"]
    fig["process_peak_rss_mb"] = round(peak_rss_mb())

    # The targets: the uniform restricts.
    fig["targets"] = {}
    for r in restricts:
        if r.kind != "uniform":
            continue
        recall = fig["quality"][r.name]["recall_single"]
        fig["targets"][f"recall@100 >= {TARGET_RECALL}, {r.name} ({r.share:.1%})"] = {
            "value": recall, "pass": recall >= TARGET_RECALL}
    fig["targets"].update(ratio_targets(fig, restricts))
    violations = sum(a["violations"] for q in fig["quality"].values() for a in q["audit"].values()) + \
        sum(a["violations"] for lat in fig["latency"].values() for a in lat.get("audit", {}).values())
    fig["targets"]["no returned product violates its restrict (every restrict, every call)"] = {
        "value": violations, "pass": violations == 0}
    return fig


def ratio_targets(fig: dict, restricts: list[Restrict]) -> dict:
    out = {}
    for r in restricts:
        if r.kind == "uniform":
            ratio = fig["latency"][r.name]["ratio_p50"]
            out[f"p50 retrieval_filtered / retrieval <= {TARGET_RATIO:g}, {r.name} "
                f"({fig['latency_runtime'].split(' (')[0]})"] = {"value": ratio, "pass": ratio <= TARGET_RATIO}
    return out


def retime(args) -> dict:
    """Part 3 (latency in the C++ runtime) again on the work directory of an earlier `--keep` run: its
    exported models, breakdown model, restricts and latency queries (`retime.json`), e.g. once the shared
    machine is quieter. The audits use the attributes of its index."""
    import pyarrow.parquet as pq

    work = args.retime
    with open(os.path.join(work, RETIME_FILE), encoding="utf-8") as f:
        saved = json.load(f)
    products = pq.read_table(os.path.join(work, "run", INDEX_DIR, "products.parquet"),
                             columns=[S.PRODUCT_CATEGORY, "product_country"])
    codes = {kind: np.array([int(v[1:]) for v in products.column(column).to_pylist()], np.int32)
             for kind, column in (("uniform", S.PRODUCT_CATEGORY), ("correlated", "product_country"))}
    restricts = []
    for r in saved["restricts"]:
        filters = Filters(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["filters"].items()})
        restrict = Restrict(r["name"], r["kind"], filters, codes[r["kind"]], np.array(r["allowed"]))
        restrict.share = float(restrict.matches().mean())
        restricts.append(restrict)
    texts = saved["latency_texts"][:args.latency_queries]
    fig: dict = {"setup": {"retime": work, "products": saved["products"], "latency_queries": len(texts),
                           "cpu_cores": os.cpu_count(), "tensorflow": tf.__version__,
                           "load_average_start": [round(v, 2) for v in os.getloadavg()]}}
    binary, why = serve_latency.build(work)
    if binary is None:
        raise SystemExit(f"--retime needs the C++ runtime: {why}")
    fig["latency_runtime"] = "C++ runtime"
    dirs = {"stock": os.path.join(work, "export", MODEL_NAME, "1"), "scann": os.path.join(work, "export", MODEL_NAME + "_scann", "1"),
            "breakdown": os.path.join(work, "breakdown")}
    fig["latency"] = {}
    with open(os.path.join(work, "run", INDEX_DIR, "index.json"), encoding="utf-8") as f:
        options = ScannOptions(**json.load(f)["scann"])
    for r in restricts:
        lat = cc_latency(binary, work, dirs, r, texts, saved["products"], options)
        del lat["_recorded"]
        fig["latency"][r.name] = lat
        log(f"{r.name}: p50 retrieval {lat['retrieval']['p50_ms']:.2f} ms, retrieval_filtered "
            f"{lat['retrieval_filtered']['p50_ms']:.2f} ms ({lat['ratio_p50']:.2f}x), load {lat['load_average_1min_before']}")
    fig["targets"] = ratio_targets(fig, restricts)
    violations = sum(a["violations"] for lat in fig["latency"].values() for a in lat["audit"].values())
    fig["targets"]["no returned product violates its restrict (the C++ runtime's recorded calls)"] = {
        "value": violations, "pass": violations == 0}
    return fig


# -- the report ----------------------------------------------------------------------------------


def print_report(f: dict) -> None:
    s, ix = f["setup"], f["index"]
    o = ix["options"]
    p = print
    p(f"\nFiltered retrieval benchmark: {s['products']:,} products x {s['dim']}-d, k={s['k']}, {s['cpu_cores']} CPU cores, "
      f"TensorFlow {s['tensorflow']}")
    p(f"  machine load average (1/5/15 min): {s['load_average_start']} at start, {s['load_average_end']} at end "
      "(the machine is shared: latencies move with it)")
    p(f"  catalogue: {s['catalogue']}")
    p(f"  ScaNN: {o['kind']} {o['num_leaves']} leaves, tuned (unfiltered, target {TARGET_RECALL}) to leaves_to_search "
      f"{o['leaves_to_search']}, reorder {o['reorder']}; unfiltered recall@100 of retrieval vs retrieval_exact "
      f"{f['unfiltered_recall']:.4f}")
    p(f"  filtered search: over-fetch {s['filter_constants']['OVERFETCH']:g}·k/share, a tree's leaves x 1/sqrt(share), "
      f"widen x2 up to {s['filter_constants']['MAX_FETCH']:,}, exact below share "
      f"{s['filter_constants']['EXACT_BELOW_SHARE']:g}")

    p(f"\nrecall@100 of retrieval_filtered vs retrieval_exact_filtered ({s['queries']} query strings, the same restrict "
      "for every query)")
    p(f"  {'restrict':<36} {'share':>7} {'path':<18} {'1/call':>7} {'worst1%':>7} {'batch50':>7} {'exact=np':>8} "
      f"{'viol.':>5} {'short':>5} {'widen':>6}")
    for name, q in f["quality"].items():
        viol = sum(a["violations"] for a in q["audit"].values())
        short = q["audit"]["retrieval_filtered (1 per call)"]["short_rows"]
        widen = f"{q['widening']['queries_widening']:>6}" if q["widening"] else f"{'-':>6}"
        path = "ScaNN" if q["path"].startswith("ScaNN") else "exact subset"
        p(f"  {name:<36} {q['share']:>7.2%} {path:<18} {q['recall_single']:>7.4f} {q['recall_single_p1']:>7.3f} "
          f"{q['recall_batched']:>7.4f} {q['exact_vs_numpy']:>8.4f} {viol:>5} {short:>5} {widen}")
        if "queries_own_topic_in_restrict" in q:
            p(f"    {q['queries_own_topic_in_restrict']} of {s['queries']} queries' nearest topic is inside the restrict: "
              f"recall {q['recall_single_own_topic_in']} for them, {q['recall_single_own_topic_out']} for the others")
        if q["widening"]:
            w = q["widening"]
            graph = "" if w["first_fetch_in_graph"] == [w["first_fetch"]] else f" (the graph's: {w['first_fetch_in_graph']})"
            p(f"    first fetch {w['first_fetch']:,}{graph}: restrict products kept p50 {w['kept_after_first_fetch_p50']:.0f}, "
              f"min {w['kept_after_first_fetch_min']}; {w['queries_widening']} queries keep < {K} and widen")
    p("  (1/call: one query per call, judged; worst1%: the 1st percentile of per-query recall; batch50: batches of 50, "
      "where a short query widens its whole batch; exact=np: retrieval_exact_filtered vs NumPy brute force; viol.: "
      "returned products outside the restrict, over every call; short: 1-per-call results with < 100 products)")

    print_latency(f)
    if f.get("sweep"):
        print_sweep(f)
    p(f"\nother: ScaNN build {ix['build_seconds']} s, tune {ix['tune_seconds']} s, write_index {ix['write_index_seconds']} s, "
      f"export {ix['export_seconds']} s; process peak RSS {f['process_peak_rss_mb']:,} MB; wall time "
      f"{f['wall_seconds']:.0f} s; work dir {f['work_dir']}")
    print_targets(f)


def print_latency(f: dict) -> None:
    p = print
    p(f"\nlatency of one query string -> top 100, {f['latency_runtime']}; "
      f"{f['setup']['latency_queries']} queries, one run per restrict, signatures in rotating blocks of 25")
    p(f"  {'restrict':<36} {'load':>5} {'retrieval':>17} {'retrieval_filtered':>19} {'ratio':>11} {'exact_filtered':>17}")
    for name, lat in f["latency"].items():
        p(f"  {name:<36} {lat['load_average_1min_before']:>5} "
          f"{lat['retrieval']['p50_ms']:>7.2f} / {lat['retrieval']['p99_ms']:>6.2f} "
          f"{lat['retrieval_filtered']['p50_ms']:>8.2f} / {lat['retrieval_filtered']['p99_ms']:>7.2f} "
          f"{lat['ratio_p50']:>5.2f} / {lat['ratio_p99']:>5.2f} "
          f"{lat['retrieval_exact_filtered']['p50_ms']:>7.2f} / {lat['retrieval_exact_filtered']['p99_ms']:>6.2f}")
    p("  (ms, p50 / p99; ratio: retrieval_filtered / retrieval, p50 / p99; load: 1-min load average before the run)")

    def ms(lat, name):
        return lat[name]["p50_ms"] if name in lat else None

    scann = {name: lat for name, lat in f["latency"].items() if "scann_fetch" in lat}
    exact = {name: lat for name, lat in f["latency"].items() if "exact_subset" in lat}
    p("  breakdown, p50 ms in the same blocks (the benchmark's `breakdown` SavedModel):")
    if scann:
        p("  restricts served by ScaNN:")
        p(f"  {'restrict':<36} {'fetch':>6} {'leaves':>9} {'encoder':>7} {'share':>6} {'keeps':>6} {'scann_fetch':>11} "
          f"{'unwidened':>9} {'1st_fetch':>9} {'filtered':>8} {'retrieval':>9}")
        for name, lat in scann.items():
            leaves = f"{lat['exported_leaves']:>4}->{lat['leaves']:<4}" if lat["leaves"] > 0 else f"{'-':>9}"
            p(f"  {name:<36} {lat['fetch']:>6,} {leaves} "
              f"{ms(lat, 'query_encoder'):>7.2f} {ms(lat, 'filter_share'):>6.2f} {ms(lat, 'keeps_at_fetch'):>6.2f} "
              f"{ms(lat, 'scann_fetch'):>11.2f} {ms(lat, 'scann_fetch_unwidened'):>9.2f} "
              f"{ms(lat, 'first_fetch_filtered'):>9.2f} {ms(lat, 'retrieval_filtered'):>8.2f} {ms(lat, 'retrieval'):>9.2f}")
        p("  (fetch: the first over-fetch F; leaves: exported leaves_to_search -> the 1/sqrt(share) widened leaves "
          "searched; encoder: query_encoder; share: the share and F alone; keeps: share + `keeps` at F random rows "
          "alone; scann_fetch: query tower + share + ScaNN's op at F with the widened leaves (retrieval_filtered's "
          "first search); unwidened: the same at the exported leaves; 1st_fetch: the whole ScaNN path with one fetch "
          "and no cond / while_loop / crowding checks; filtered: retrieval_filtered; retrieval: unfiltered)")
        p("  p50 over retrieval's, split (ms): bigger fetch/reorder = unwidened - retrieval; wider leaves = scann_fetch "
          "- unwidened; keeps+compact+share = 1st_fetch - scann_fetch; cond/loop/crowd checks (+ widening) = "
          "filtered - 1st_fetch")
        for name, lat in scann.items():
            parts = [ms(lat, "scann_fetch_unwidened") - ms(lat, "retrieval"),
                     ms(lat, "scann_fetch") - ms(lat, "scann_fetch_unwidened"),
                     ms(lat, "first_fetch_filtered") - ms(lat, "scann_fetch"),
                     ms(lat, "retrieval_filtered") - ms(lat, "first_fetch_filtered")]
            p(f"  {name:<36} total {ms(lat, 'retrieval_filtered') - ms(lat, 'retrieval'):+6.2f} = fetch {parts[0]:+6.2f}, "
              f"leaves {parts[1]:+6.2f}, keeps etc. {parts[2]:+6.2f}, cond/loop {parts[3]:+6.2f}")
    if exact:
        p("  restricts served exactly over their products (share < EXACT_BELOW_SHARE):")
        p(f"  {'restrict':<36} {'rows':>7} {'encoder':>7} {'share':>6} {'cand_rows':>9} {'exact_subset':>12} "
          f"{'filtered':>8} {'retrieval':>9}")
        for name, lat in exact.items():
            rows = f"{lat['candidate_rows_count']:,}" if "candidate_rows_count" in lat else "-"
            p(f"  {name:<36} {rows:>7} {ms(lat, 'query_encoder'):>7.2f} "
              f"{ms(lat, 'filter_share'):>6.2f} {ms(lat, 'candidate_rows'):>9.2f} {ms(lat, 'exact_subset'):>12.2f} "
              f"{ms(lat, 'retrieval_filtered'):>8.2f} {ms(lat, 'retrieval'):>9.2f}")
        p("  (rows: the products candidate_rows gathers; cand_rows: candidate_rows alone; exact_subset: query tower + "
          "candidate_rows + their float16 vectors scored + keeps + top k, no cond / while_loop)")
    if f["latency_runtime"] == "C++ runtime":
        same = [f"{name.split(' ')[0]} {name.split(' ')[1]}: " + ", ".join(
            f"{label} {lat[label + '_same_ids']:.0%}" for label in SAME_AS_FILTERED if label + "_same_ids" in lat)
            + (f", Python {lat['same_ids_as_python']:.0%}" if "same_ids_as_python" in lat else "")
            for name, lat in f["latency"].items()]
        p(f"  on the first {RECORD} queries, share of calls whose ids equal the C++ runtime's retrieval_filtered's: "
          + "; ".join(same))
        p("  the graph's share / first fetch: " + "; ".join(
            f"{lat['graph_share']:.4f} / " + (f"{lat['graph_fetch']:,}" if "scann_fetch" in lat else "(exact)")
            for lat in f["latency"].values()))


def print_sweep(f: dict) -> None:
    p = print
    if f.get("sweep"):
        p("\nScaNN's op alone under each restrict (exported index; eager, one query vector per call, p50 over 100): "
          "recall@100 of the first 100 matching products of the fetch, vs the exact filtered top 100")
        for name, rows in f["sweep"].items():
            base = next(r for r in rows if r.get("unfiltered"))
            p(f"  {name} (the unfiltered search, {base['leaves_to_search']} leaves / reorder {base['reorder']}: "
              f"{base['p50_ms']:.2f} ms)")
            p(f"    {'leaves':>7} {'factor':>6} {'over-fetch':>10} {'fetch':>7} {'reorder':>7} {'recall':>7} {'p50 ms':>7}")
            for r in rows:
                if not r.get("unfiltered"):
                    factor = f"{r['leaves_factor']:.2f}" if r.get("leaves_factor") else "-"
                    p(f"    {r['leaves_to_search']:>7} {factor:>6} {r['overfetch']:>9}x {r['fetch']:>7,} "
                      f"{r['reorder']:>7,} {r['recall']:>7.4f} {r['p50_ms']:>7.2f}"
                      + ("   <- retrieval_filtered's first fetch" if r.get("retrieval_filtered_first_fetch") else ""))


def print_targets(f: dict) -> None:
    p = print
    p("\ntargets")
    for name, target in f["targets"].items():
        p(f"  {name:<90} {target['value']:>8}   {'PASS' if target['pass'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
