"""Incremental index updates at catalogue scale: 10k upserts into a 1M index against a rebuild, and recall after churn.

Issue 19's targets: "10k upserts into a 1M index at least 10x faster than a
rebuild" and "after 20% churn recall@100 vs exact stays >= 0.95". On the
synthetic catalogue of `benchmarks/retrieval.py` (default 1,000,000 products,
64-d unit vectors in topic clusters; its functions are imported, not copied)
it measures, in one process:

1. the base run: the default model (untrained weights) written as a run
   directory, the ScaNN searcher built over the catalogue vectors with the
   options `ScannOptions.for_catalog` picks (`index.kind=tree_ah`, so a small
   `--products` exercises the tree too; about sqrt(N) leaves, AVQ
   partitioning), `tf_q2e.index.tune` (target recall@100 0.95) picking the
   search-time options, which stay fixed from then on, and `RUN/index/`
   written by `write_index` as `retrieval.py` does. The build time here is
   figure (ii) below: "build_searcher alone";
2. the update: `tf_q2e.updates.update_index(RUN, upsert=delta.parquet)` itself,
   the code path of `q2e index --run RUN --upsert delta.parquet`, with a delta
   of `--delta` products: half new ids, half existing ids whose vector moved
   (an edited listing: cosine ~0.9 to its old vector). The delta is a real
   catalogue file (title, description, category, country, seller) and
   `update_index` embeds it with the run's product tower as it would any
   delta; the one substitution: `tf_q2e.updates.embed_catalog` is wrapped so
   that, after the real embedding (timed), the vectors it returns are the
   synthetic ones of those products (the synthetic catalogue's vectors do not
   come from the tower, and recall is measured against them). Every other
   step is the real one, each timed by a wrapper around it: `load_index`,
   `load_model`, loading the ScaNN SavedModel, the TF state -> pybind searcher
   conversion (`pybind_searcher`, of which `state_to_assets`), `delete`,
   `upsert`, `rebalance` (when it runs), the conversion back
   (`searcher_state`, of which `assets_to_state`), the index rows picked with
   NumPy (pandas get_indexer) and anything else (the remainder) and `write_index`. The process's resident set size
   is sampled every 20 ms during the update. Run `--repeats` times from the
   same base index before the rebuild of step 3 and `--repeats` times after
   it (the run of median time reported); the updated index is checked (product
   count, the moved vectors stored, every new product found first by its own
   vector);
3. the rebuild it is compared with, (i): `tf_q2e.index.build_index` on a run
   copy, which is what `q2e index` does: load the model, embed the whole
   catalogue after the delta (N + new products, from a catalogue file like
   the delta's) through the product tower, build ScaNN, write the index; and
   (ii): `build_searcher` alone over the N synthetic vectors (step 1). With
   `--rebuild-sample M` (M < N) only M products are embedded and the
   embedding time is extrapolated linearly to N (said so in the report; the
   tower's fixed start-up, ~1 s, is scaled too: an overestimate for a small
   M); the default embeds all of them;
4. churn: `--churn` (20%) of the catalogue replaced in `--churn-steps` (4)
   updates through `update_index`, each deleting `churn/steps/2` of the
   original products (uniformly at random) and adding as many new products,
   run once per `--modes` value of `rebalance` (`never`, `auto`, `always`),
   each from the same base index with the same deltas. After every step:
   recall@100 of the updated ScaNN searcher (the written `RUN/index/scann`,
   the fixed search options) against exact search (NumPy) over the index's
   current vectors on the `--queries` benchmark queries; the index's
   `churn_since_rebalance` (products upserted + deleted since the partitions
   were trained, which `auto` compares with `REBALANCE_CHURN` x the index's
   products) and whether the update rebalanced. ScaNN's health statistics are
   not measured (`update_index` no longer computes them). After the `never` run: one more `update_index` with
   `rebalance="always"` and nothing to change (the rebalance alone, timed),
   and, for reference, the recall of a searcher built afresh over the same
   vectors. Two churn scenarios: "same" (new products drawn like the
   catalogue: more products of its topics) and, unless `--no-shift`, "shift"
   (new products of `--shift-topics` topics the catalogue never had, so every
   one lands in the few leaves nearest them: the case rebalancing is for);
   "shift" also measures recall on queries of the new topics.

Targets: update (embedding of the delta included) >= 10x faster than the
rebuild (i); recall@100 >= 0.95 after 20% churn with `rebalance="never"` and
with the default `"auto"` (the "same" scenario; "shift" is reported beside it).
The update's speed against (ii) is printed too, without a target.

Reproduce (the 1M-product figures; on a machine with other work running the
timings move with its load, printed at start and end). The full run (3 repeats
each side, 3 modes, both scenarios) took about 21 minutes and 8 GB of process
peak RSS on 2 cores before update_index changed (not re-run); the shorter one below took 8 minutes (wall 495 s, peak
RSS 8.0 GB, load average ~2.7 from other work):

  .venv/bin/python benchmarks/updates.py --json runs/updates_1M.json
  .venv/bin/python benchmarks/updates.py --repeats 2 --modes never,auto --no-shift --json runs/updates_1M.json

Usage:
  .venv/bin/python benchmarks/updates.py [--products 1000000] [--delta 10000] [--queries 1000] [--out DIR]
      [--keep] [--json FILE] [--seed 0] [--repeats 3] [--churn 0.2] [--churn-steps 4]
      [--modes never,auto,always] [--no-shift] [--shift-topics 100] [--rebuild-sample M] [--topics 2000]

The work directory (`--out`, default a new temporary directory) holds the run,
its index and the rebuilt run; it is removed at the end unless `--keep`.
Exit code 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf_q2e  # noqa: E402,F401  (Keras 2 before TensorFlow)
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_q2e.index as index_module  # noqa: E402
import tf_q2e.train as train_module  # noqa: E402
import tf_q2e.updates as updates  # noqa: E402
from tf_q2e.config import load_config  # noqa: E402
from tf_q2e.data import schema as S  # noqa: E402
from tf_q2e.index import (  # noqa: E402
    INDEX_DIR, Index, ScannOptions, build_index, build_searcher, exact_top_k, load_index, recall_at_k,
    search_arguments, tune, write_index,
)
from tf_q2e.train import build_model  # noqa: E402

# benchmarks/retrieval.py, next to this script: its synthetic catalogue, queries and run directory.
from retrieval import (  # noqa: E402
    add_work_arguments, current_rss_mb, encode_queries, log, make_catalogue, make_queries, peak_rss_mb,
    run_in_work_dir, write_json, write_run,
)

K = 100
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0
MODES = ("never", "auto", "always")
_COUNTRIES = ("US", "CA", "GB", "DE", "FR", "AU", "NZ", "IE")
_CITIES = ("Springfield", "Riverside", "Fairview", "Madison", "Georgetown", "Salem", "Franklin", "Clinton")
_CONDITIONS = ("like new", "good condition", "barely used", "some wear", "brand new in box", "needs a little love")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# -- timing the steps of update_index ------------------------------------------------------------


class Phases:
    """Seconds spent in each wrapped function since `reset()` (a wrapped call inside another counts in both)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        wrapped.__wrapped__ = fn
        return wrapped


class SyntheticVectors:
    """What the wrapped `embed_catalog` returns in place of the tower's vectors: the synthetic vector of each
    product id (set before each update). The real embedding runs first and is timed."""

    def __init__(self):
        self.row: dict[str, int] = {}
        self.vectors = np.zeros((0, 0), np.float32)

    def set(self, ids, vectors: np.ndarray) -> None:
        self.row = {str(p): i for i, p in enumerate(ids)}
        self.vectors = vectors


PHASES = Phases()
# The steps of update_index and build_index in the order they run ("  of which": inside the step above it).
PHASE_ORDER = ("load_index", "load_model", "embed (product tower)", "load ScaNN SavedModel", "TF state -> pybind searcher",
               "  of which TF state -> asset files", "delete", "upsert", "rebalance",
               "pybind searcher -> TF state", "  of which asset files -> TF state", "build_searcher",
               "index rows (NumPy) and other", "other", "write_index")


def ordered(phases: dict[str, float], total: float, rest: str) -> dict[str, float]:
    """The phases in the order they run, with `rest` = what no wrapped step accounts for."""
    accounted = sum(s for name, s in phases.items() if not name.startswith("  "))
    phases = dict(phases, **{rest: total - accounted})
    return {name: round(phases[name], 3) for name in PHASE_ORDER if name in phases}
SYNTHETIC = SyntheticVectors()


def install_timers() -> None:
    """Wraps the steps of `update_index` (and of `build_index`) in timers; `embed_catalog` as `update_index`
    calls it also swaps the tower's vectors for the synthetic ones (see the module docstring)."""
    from scann.scann_ops.py import scann_ops_pybind

    real_embed = index_module.embed_catalog

    def embed(model, catalog, batch_size=4096, on_bad_rows="error", progress=None):
        start = time.perf_counter()
        ids, titles, vectors, attributes = real_embed(model, catalog, batch_size, on_bad_rows, progress)
        PHASES.seconds["embed (product tower)"] = time.perf_counter() - start
        rows = np.array([SYNTHETIC.row[str(p)] for p in ids], np.int64)
        return ids, titles, SYNTHETIC.vectors[rows].astype(np.float32), attributes

    updates.embed_catalog = embed
    updates.load_index = PHASES.wrap("load_index", updates.load_index)
    train_module.load_model = PHASES.wrap("load_model", train_module.load_model)
    Index.load_scann_state = PHASES.wrap("load ScaNN SavedModel", Index.load_scann_state)
    updates.state_to_assets = PHASES.wrap("  of which TF state -> asset files", updates.state_to_assets)
    updates.pybind_searcher = PHASES.wrap("TF state -> pybind searcher", updates.pybind_searcher)
    updates.assets_to_state = PHASES.wrap("  of which asset files -> TF state", updates.assets_to_state)
    updates.searcher_state = PHASES.wrap("pybind searcher -> TF state", updates.searcher_state)
    updates.write_index = PHASES.wrap("write_index", updates.write_index)
    index_module.write_index = PHASES.wrap("write_index", index_module.write_index)
    index_module.embed_catalog = PHASES.wrap("embed (product tower)", index_module.embed_catalog)
    index_module.build_searcher = PHASES.wrap("build_searcher", index_module.build_searcher)
    searcher = scann_ops_pybind.ScannSearcher
    for method, name in (("delete", "delete"), ("upsert", "upsert"), ("rebalance", "rebalance")):
        setattr(searcher, method, PHASES.wrap(name, getattr(searcher, method)))


class RssSampler:
    """The process's peak resident set size while the `with` block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.before = current_rss_mb()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())
        self.after = current_rss_mb()
        return False


# -- the catalogue files -------------------------------------------------------------------------


@dataclasses.dataclass
class Products:
    """Products of the synthetic catalogue with the text columns of a catalogue file."""

    ids: np.ndarray  # [n] object
    titles: np.ndarray
    descriptions: np.ndarray
    categories: np.ndarray
    countries: np.ndarray
    sellers: np.ndarray
    vectors: np.ndarray  # [n, D] float32

    def take(self, rows) -> "Products":
        return Products(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(parts: list["Products"]) -> "Products":
        return Products(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Products)))

    def __len__(self) -> int:
        return len(self.ids)

    def attributes(self) -> dict[str, np.ndarray]:
        return {"category": self.categories, "country": self.countries, "seller": self.sellers}

    def write(self, path: str) -> str:
        pq.write_table(pa.table({
            S.PRODUCT_ID: pa.array(list(self.ids), pa.string()),
            S.PRODUCT_TITLE: pa.array(list(self.titles), pa.string()),
            S.PRODUCT_DESCRIPTION: pa.array(list(self.descriptions), pa.string()),
            S.PRODUCT_CATEGORY: pa.array(list(self.categories), pa.string()),
            S.PRODUCT_COUNTRY: pa.array(list(self.countries), pa.string()),
            S.PRODUCT_SELLER: pa.array(list(self.sellers), pa.string()),
        }), path)
        return path


def products_of(catalogue, rows: np.ndarray, id_prefix: str, rng: np.random.Generator) -> Products:
    """Rows of a `retrieval.Catalogue` as products with a description like a listing's (~20 words), the
    topic's last word as category, a country and a seller."""
    n = len(rows)
    topic_of = catalogue.topic_of[rows].tolist()
    topics = catalogue.topics
    prices = rng.integers(5, 2000, n).tolist()
    cities = rng.integers(0, len(_CITIES), n).tolist()
    conditions = rng.integers(0, len(_CONDITIONS), n).tolist()
    descriptions = [f"Selling my {topics[t]}, {_CONDITIONS[c]}. Price: ${p} or best offer, pick up in {_CITIES[y]}. "
                    f"Smoke-free home, no holds."
                    for t, p, y, c in zip(topic_of, prices, cities, conditions)]
    return Products(
        ids=np.array([f"{id_prefix}{r:07d}" for r in rows.tolist()], dtype=object),
        titles=catalogue.titles[rows],
        descriptions=np.array(descriptions, dtype=object),
        categories=np.array([topics[t].split()[-1] for t in topic_of], dtype=object),
        countries=np.array(_COUNTRIES, dtype=object)[rng.integers(0, len(_COUNTRIES), n)],
        sellers=np.array([f"seller{s}" for s in rng.integers(0, 20_000, n).tolist()], dtype=object),
        vectors=catalogue.vectors[rows],
    )


def moved(vectors: np.ndarray, rng: np.random.Generator, noise: float = 0.5) -> np.ndarray:
    """Each unit vector moved by Gaussian noise of norm ~`noise` (cosine to the old one ~0.9), unit again."""
    out = vectors + rng.standard_normal(vectors.shape, dtype=np.float32) * (noise / np.sqrt(vectors.shape[1]))
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


# -- measuring an index --------------------------------------------------------------------------


def evaluate(run_dir: str, queries: dict[str, np.ndarray], options: ScannOptions, searcher=None) -> dict:
    """Recall@K of the run's ScaNN searcher (or `searcher`, a built one) with `options` against exact search
    over the index's vectors, per query set."""
    from scann.scann_ops.py import scann_ops

    index = load_index(run_dir)
    state = index.load_scann_state() if searcher is None else None  # held: recreate_handle binds it weakly
    handle = searcher.searcher_handle if searcher is not None else state.recreate_handle()
    pre, leaves = search_arguments(options)
    out = {}
    for name, q in queries.items():
        found = np.concatenate([scann_ops.scann_search_batched(handle, q[i:i + 200], K, pre, leaves, False).indices.numpy()
                                for i in range(0, len(q), 200)])
        _, truth = exact_top_k(index.vectors, q, K)
        out[name] = round(recall_at_k(found, truth), 4)
    out["products"] = int(len(index.product_ids))
    return out


def timed_update(run_dir: str, upsert: str | None, delete: list[str] | None, rebalance: str,
                 synthetic: Products | None = None) -> dict:
    """`update_index` once, with the seconds of each of its steps and the process's RSS during it."""
    if synthetic is not None:
        SYNTHETIC.set(synthetic.ids, synthetic.vectors)
    PHASES.reset()
    load = load_average()
    with RssSampler() as rss:
        start = time.perf_counter()
        meta = updates.update_index(run_dir, upsert=upsert, delete=delete, rebalance=rebalance, log=log)
        total = time.perf_counter() - start
    record = meta["updates"][-1]
    phases = ordered(PHASES.seconds, total, "index rows (NumPy) and other")
    return {"seconds": round(total, 3), "phases": phases, "record": {k: v for k, v in record.items() if k != "time"},
            "churn_since_rebalance": int(meta.get("churn_since_rebalance", 0)),
            "rss_before_mb": round(rss.before), "rss_peak_mb": round(rss.peak), "rss_after_mb": round(rss.after),
            "rss_peak_growth_mb": round(rss.peak - rss.before), "load_average_1min": load}


def restore(run_dir: str, base_index: str) -> None:
    target = os.path.join(run_dir, INDEX_DIR)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(base_index, target)


# -- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--delta", type=int, default=10_000, help="products upserted (half new ids, half moved)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for tuning and recall")
    parser.add_argument("--topics", type=int, default=2000, help="clusters of the catalogue")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times the delta update is run (from the same base) before the rebuild, and again after it")
    parser.add_argument("--churn", type=float, default=0.2, help="share of the catalogue replaced by the churn runs")
    parser.add_argument("--churn-steps", type=int, default=4, help="updates the churn is spread over")
    parser.add_argument("--modes", default=",".join(MODES), help="rebalance modes of the churn runs (comma-separated)")
    parser.add_argument("--no-shift", action="store_true", help="skip the churn scenario of new topics")
    parser.add_argument("--shift-topics", type=int, default=100, help="new topics of the 'shift' churn scenario")
    parser.add_argument("--rebuild-sample", type=int, default=0,
                        help="embed only this many products in the rebuild and extrapolate (0: embed all)")
    parser.add_argument("--tune-latency-queries", type=int, default=100, help="queries timed per setting by tune()")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= set(MODES) or not args.modes:
        parser.error(f"--modes: a comma-separated subset of {','.join(MODES)}")
    if args.products < 10_000 or args.queries < 10 or not 2 <= args.delta <= args.products // 2:
        parser.error("--products >= 10000, --queries >= 10, 2 <= --delta <= products / 2")
    if not 0 < args.churn < 1 or args.churn_steps < 1:
        parser.error("0 < --churn < 1 and --churn-steps >= 1")
    figures = run_in_work_dir(parser, args, run, "q2e-updates-bench-")
    figures["setup"]["load_average_1min_end"] = load_average()
    figures["setup"]["process_peak_rss_mb"] = round(peak_rss_mb())
    print_report(figures)
    write_json(args.json, figures)
    return 0 if all(t["pass"] for t in figures["targets"].values()) else 1


def run(args, work: str) -> dict:
    n, dim = args.products, 64
    fig: dict = {"setup": {"products": n, "dim": dim, "k": K, "delta": args.delta, "queries": args.queries,
                           "topics": args.topics, "seed": args.seed, "repeats": args.repeats, "churn": args.churn,
                           "churn_steps": args.churn_steps, "modes": args.modes, "cpu_cores": os.cpu_count(),
                           "tensorflow": tf.__version__, "load_average_1min_start": load_average()}}
    install_timers()
    run_dir = os.path.join(work, "run")
    rng = np.random.default_rng(args.seed + 7)

    # The model (default config, untrained weights) and its run directory, as retrieval.py writes them.
    config = load_config(None, [f"model.embedding_dim={dim}", f"index.k={K}", f"train.seed={args.seed}",
                                "index.kind=tree_ah"])
    tf.keras.utils.set_random_seed(args.seed)
    model = build_model(config, 0, ())
    write_run(run_dir, config, model)

    # The catalogue (N products) and a pool of products drawn the same way (later rows of one draw: the rows
    # are independent) that the delta and the churn add.
    half = args.delta // 2
    per_step = max(1, round(n * args.churn / args.churn_steps / 2))
    pool = max(half, per_step * args.churn_steps)
    start = time.perf_counter()
    drawn = make_catalogue(model, n + pool, dim, args.topics, args.seed)
    catalogue = products_of(drawn, np.arange(n), "p", rng)
    new_products = products_of(drawn, np.arange(n, n + pool), "p", rng)
    texts, _ = make_queries(drawn, args.queries, args.seed)
    queries = {"catalogue queries": encode_queries(model, texts)}
    del drawn
    shift = None
    if not args.no_shift:  # new products of topics the catalogue never had (another draw: other brands)
        other = make_catalogue(model, pool, dim, args.shift_topics, args.seed + 1000)
        shift = products_of(other, np.arange(pool), "s", rng)
        shift_texts, _ = make_queries(other, max(100, args.queries // 2), args.seed + 1000)
        queries["new-topic queries"] = encode_queries(model, shift_texts)
        del other
    log(f"catalogue of {n:,} + pool of {pool:,} products and {sum(len(q) for q in queries.values())} queries "
        f"in {time.perf_counter() - start:.1f} s")

    # 1. The base index: build (= figure ii), tune, write.
    options = ScannOptions.for_catalog(config.index, n, K)
    with RssSampler() as rss:
        start = time.perf_counter()
        searcher = build_searcher(catalogue.vectors, options, K)
        build_seconds = time.perf_counter() - start
    log(f"built ScaNN {options} in {build_seconds:.1f} s")
    start = time.perf_counter()
    chosen, table = tune(searcher, options, catalogue.vectors, queries["catalogue queries"], K, TARGET_RECALL,
                         latency_queries=min(args.tune_latency_queries, args.queries))
    row = next(r for r in table if r.get("chosen"))
    log(f"tuned in {time.perf_counter() - start:.0f} s: leaves_to_search {chosen.leaves_to_search}, reorder {chosen.reorder}, "
        f"recall {row['recall']}")
    meta = {"products": n, "dim": dim, "k": K, "catalog": "synthetic (benchmarks/updates.py)",
            "build_seconds": round(build_seconds, 2), "scann": dataclasses.asdict(chosen),
            "tune": {"target_recall": TARGET_RECALL, "queries": args.queries, "chosen": row}}
    start = time.perf_counter()
    write_index(os.path.join(run_dir, INDEX_DIR), catalogue.ids, catalogue.titles, catalogue.vectors,
                            searcher, meta, catalogue.attributes())
    write_seconds = time.perf_counter() - start
    base_index = os.path.join(work, "index.base")
    shutil.copytree(os.path.join(run_dir, INDEX_DIR), base_index)
    del searcher
    fig["base"] = {"build_options": dataclasses.asdict(options), "build_searcher_seconds": round(build_seconds, 2),
                   "build_rss_peak_growth_mb": round(rss.peak - rss.before), "tuned": row,
                   "write_index_seconds": round(write_seconds, 2),
                   "index_mb_on_disk": round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(base_index)
                                                 for f in fs) / 2**20)}

    # 2. The delta: half new products, half existing ones moved; a catalogue file like any delta.
    existing = rng.choice(n, size=args.delta - half, replace=False)
    changed = catalogue.take(existing)
    changed.vectors = moved(changed.vectors, rng)
    changed.titles = np.array([f"{t} (price drop)" for t in changed.titles], dtype=object)
    delta = Products.concat([new_products.take(np.arange(half)), changed])
    delta_file = delta.write(os.path.join(work, "delta.parquet"))
    # Run --repeats times before the rebuild and --repeats times after it, so that a change in the shared
    # machine's load during the benchmark falls on both sides.
    runs = []

    def delta_updates(when: str) -> None:
        for _ in range(args.repeats):
            if runs:
                restore(run_dir, base_index)
            runs.append(dict(timed_update(run_dir, delta_file, None, "auto", delta), when=when))
            log(f"delta update {len(runs)} ({when}): {runs[-1]['seconds']:.1f} s")

    delta_updates("before the rebuild")
    fig["update"] = {"check": check_update(run_dir, catalogue, delta, half),
                     "recall_after": evaluate(run_dir, {"catalogue queries": queries["catalogue queries"]}, chosen)}

    # 3. The rebuild: build_index on a copy of the run over the catalogue after the delta (i).
    fig["rebuild"] = rebuild(work, run_dir, Products.concat([catalogue, new_products.take(np.arange(half))]),
                             args.rebuild_sample, args.seed)
    shutil.rmtree(os.path.join(work, "rebuild"), ignore_errors=True)
    delta_updates("after the rebuild")
    fig["update"].update(runs=runs, median=median_run(runs))

    # 4. Churn.
    order = rng.permutation(n)
    deletes = [[str(p) for p in catalogue.ids[order[s * per_step:(s + 1) * per_step]]] for s in range(args.churn_steps)]
    scenarios = {"same": new_products}
    if shift is not None:
        scenarios["shift"] = shift
    fig["churn"] = {}
    for scenario, adds in scenarios.items():
        steps = [adds.take(np.arange(s * per_step, (s + 1) * per_step)) for s in range(args.churn_steps)]
        files = [p.write(os.path.join(work, f"churn-{scenario}-{s}.parquet")) for s, p in enumerate(steps)]
        asked = queries if scenario == "shift" else {"catalogue queries": queries["catalogue queries"]}
        restore(run_dir, base_index)
        base_recall = evaluate(run_dir, asked, chosen)
        out = {"per_step_deleted": per_step, "per_step_added": per_step, "before": base_recall, "modes": {}}
        for mode in args.modes:
            restore(run_dir, base_index)
            rows = []
            for s in range(args.churn_steps):
                update = timed_update(run_dir, files[s], deletes[s], mode, steps[s])
                recall = evaluate(run_dir, asked, chosen)
                rows.append({"step": s + 1, "churn": round((s + 1) * 2 * per_step / n, 4), "recall": recall,
                             "rebalanced": update["record"]["rebalanced"], "seconds": update["seconds"],
                             "rebalance_seconds": update["phases"].get("rebalance", 0.0),
                             "phases": update["phases"], "load_average_1min": update["load_average_1min"],
                             "churn_since_rebalance": update["churn_since_rebalance"]})
                log(f"churn {scenario}/{mode} step {s + 1}: recall {recall}, rebalanced {rows[-1]['rebalanced']}, "
                    f"churn since rebalance {rows[-1]['churn_since_rebalance']:,}, {update['seconds']:.1f} s")
            out["modes"][mode] = {"steps": rows}
            if mode == "never":  # the rebalance alone, through update_index; and a searcher built afresh
                update = timed_update(run_dir, None, ["(no such product)"], "always")
                out["modes"][mode]["rebalance_only"] = {
                    "seconds": update["seconds"], "phases": update["phases"],
                    "churn_since_rebalance": update["churn_since_rebalance"],
                    "recall": evaluate(run_dir, asked, chosen)}
                log(f"churn {scenario}: rebalance alone {update['seconds']:.1f} s -> "
                    f"{out['modes'][mode]['rebalance_only']['recall']}")
                final = load_index(run_dir)
                fresh = build_searcher(final.vectors, options, K)  # the module's own name: not timed
                out["modes"][mode]["fresh_build"] = {"recall": evaluate(run_dir, asked, chosen, searcher=fresh)}
                del fresh, final
        fig["churn"][scenario] = out

    fig["targets"] = targets(fig, args)
    return fig


def median_run(runs: list[dict]) -> dict:
    """The run of median total time."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def check_update(run_dir: str, catalogue: Products, delta: Products, added: int) -> dict:
    """The updated index holds N + added products, the moved products' new vectors, and each new product is
    found first by its own vector."""
    from scann.scann_ops.py import scann_ops

    index = load_index(run_dir)
    row = {str(p): i for i, p in enumerate(index.product_ids)}
    stored = np.stack([index.vectors[row[str(p)]] for p in delta.ids])
    state = index.load_scann_state()  # held: recreate_handle binds it weakly
    handle = state.recreate_handle()
    new = delta.take(np.arange(added))
    found = np.concatenate([scann_ops.scann_search_batched(handle, new.vectors[i:i + 500], 1, -1, -1, False).indices.numpy()
                            for i in range(0, len(new), 500)])[:, 0]
    expected = np.array([row[str(p)] for p in new.ids])
    return {"products": int(len(index.product_ids)), "expected_products": len(catalogue) + added,
            "vectors_stored": bool(np.array_equal(stored, delta.vectors)),
            "new_products_found_first_by_own_vector": round(float(np.mean(found == expected)), 4),
            "attributes_stored": bool(all(index.attributes["seller"][row[str(p)]] == s for p, s in
                                          zip(delta.ids[:100], delta.sellers[:100])))}


def rebuild(work: str, run_dir: str, products: Products, sample: int, seed: int) -> dict:
    """`build_index` (what `q2e index` runs) on a copy of the run, over a catalogue file of `products`; with
    `sample` < len(products), over a sample of it, the embedding time extrapolated to all."""
    rebuild_dir = os.path.join(work, "rebuild")
    os.makedirs(rebuild_dir)
    for name in ("config.yaml", "model.json"):
        shutil.copy(os.path.join(run_dir, name), rebuild_dir)
    shutil.copytree(os.path.join(run_dir, "model"), os.path.join(rebuild_dir, "model"))
    n = len(products)
    sampled = 0 < sample < n
    file = os.path.join(work, "catalog.parquet")
    start = time.perf_counter()
    (products.take(np.random.default_rng(seed).choice(n, sample, replace=False)) if sampled else products).write(file)
    log(f"wrote the rebuild's catalogue file ({sample if sampled else n:,} products) in {time.perf_counter() - start:.0f} s")
    PHASES.reset()
    load = load_average()
    with RssSampler() as rss:
        start = time.perf_counter()
        meta = build_index(rebuild_dir, catalog=file, log=log)
        total = time.perf_counter() - start
    phases = ordered(PHASES.seconds, total, "other")
    out = {"products": n, "embedded": sample if sampled else n, "seconds_measured": round(total, 2), "phases": phases,
           "embed_seconds": meta["embed_seconds"], "build_seconds": meta["build_seconds"],
           "rss_peak_growth_mb": round(rss.peak - rss.before), "load_average_1min": load}
    if sampled:  # only the embedding scales with the products not embedded; the build ran on the sample
        out["embed_seconds_extrapolated"] = round(meta["embed_seconds"] * n / sample, 2)
        out["extrapolated"] = (f"embedding of {sample:,} products measured ({meta['embed_seconds']:.1f} s) and scaled "
                               f"to {n:,}; build_searcher of the rebuild taken from the base build over {n:,}")
    out["products_per_second"] = round((sample if sampled else n) / meta["embed_seconds"])
    out["seconds"] = None if sampled else round(total, 2)  # sampled: filled in by targets()
    return out


def targets(fig: dict, args) -> dict:
    update = fig["update"]["median"]["seconds"]
    rb = fig["rebuild"]
    if rb["seconds"] is None:  # sampled: embedding extrapolated, the rest as measured at full size
        rb["seconds"] = round(rb["embed_seconds_extrapolated"] + fig["base"]["build_searcher_seconds"]
                              + rb["phases"].get("load_model", 0.0) + fig["base"]["write_index_seconds"], 2)
    speedup = round(rb["seconds"] / update, 1)
    phases = fig["update"]["median"]["phases"]
    without_embedding = update - phases.get("embed (product tower)", 0.0) - phases.get("load_model", 0.0)
    fig["speedups"] = {
        "rebuild_i_over_update": speedup,
        "build_searcher_ii_over_update": round(fig["base"]["build_searcher_seconds"] / update, 2),
        "build_searcher_ii_over_update_without_embedding_and_model": round(fig["base"]["build_searcher_seconds"]
                                                                           / without_embedding, 2),
        "update_without_embedding_and_model_seconds": round(without_embedding, 2),
    }
    out = {f"{args.delta:,} upserts into {args.products:,}: >= {TARGET_SPEEDUP:g}x faster than a rebuild (q2e index)":
           {"value": speedup, "pass": speedup >= TARGET_SPEEDUP}}
    same = fig["churn"]["same"]["modes"]
    for mode in ("never", "auto"):
        if mode in same:
            value = same[mode]["steps"][-1]["recall"]["catalogue queries"]
            out[f"recall@100 >= {TARGET_RECALL} after {args.churn:.0%} churn, rebalance={mode}"] = {
                "value": value, "pass": value >= TARGET_RECALL}
    return out


# -- the report ----------------------------------------------------------------------------------


# The update's steps grouped by what they are for.
PHASE_GROUPS = {"embedding (model + tower)": ("load_model", "embed (product tower)"),
                "index files (read + write)": ("load_index", "load ScaNN SavedModel", "write_index"),
                "TF <-> pybind conversion": ("TF state -> pybind searcher", "pybind searcher -> TF state"),
                "ScaNN's update": ("delete", "upsert", "rebalance"),
                "index rows and other": ("index rows (NumPy) and other",)}


def times(runs: list[dict], when: str) -> str:
    return ", ".join(format(x["seconds"], ".1f") for x in runs if x["when"] == when)


def joined(recall: dict, sets: list[str]) -> str:
    return " | ".join(format(recall[k], ".4f") for k in sets)


def print_report(f: dict) -> None:
    p = print
    s, b, u, rb = f["setup"], f["base"], f["update"], f["rebuild"]
    o = b["build_options"]
    p(f"\nIndex update benchmark: {s['products']:,} products x {s['dim']}-d, k={s['k']}, delta {s['delta']:,}, "
      f"{s['cpu_cores']} CPU cores, TensorFlow {s['tensorflow']}")
    p(f"  machine load (1-min load average): {s['load_average_1min_start']} at start, {s['load_average_1min_end']} at end "
      "(the machine is shared: timings move with it)")
    p(f"  ScaNN {o['kind']}: {o['num_leaves']} leaves, AVQ {o['partition_avq']}, AH {o['dimensions_per_block']} dims/block; "
      f"tuned: leaves_to_search {b['tuned']['leaves_to_search']}, reorder {b['tuned']['reorder']} "
      f"(recall@100 {b['tuned']['recall']}); fixed from then on")
    p(f"  base index: build_searcher {b['build_searcher_seconds']:.1f} s (RSS +{b['build_rss_peak_growth_mb']:,} MB at peak), "
      f"write_index {b['write_index_seconds']:.1f} s, {b['index_mb_on_disk']:,} MB on disk")

    m = u["median"]
    r = m["record"]
    p(f"\nupdate_index: {r['added']:,} added + {r['replaced']:,} replaced, the run of median time of {len(u['runs'])} "
      f"(before the rebuild: {times(u['runs'], 'before the rebuild')} s; after it: {times(u['runs'], 'after the rebuild')} s)")
    for name, seconds in m["phases"].items():
        p(f"  {name:<44} {seconds:8.2f} s")
    p("  grouped: " + ", ".join(f"{group} {sum(m['phases'].get(x, 0.0) for x in names):.1f} s"
                               for group, names in PHASE_GROUPS.items()))
    p(f"  {'total':<44} {m['seconds']:8.2f} s   (update_index's own figures: embed {r['embed_seconds']} s, "
      f"searcher work {r['update_seconds']} s)")
    p(f"  RSS during the update: {m['rss_before_mb']:,} MB before, peak {m['rss_peak_mb']:,} MB "
      f"(+{m['rss_peak_growth_mb']:,} MB), {m['rss_after_mb']:,} MB after; load average {m['load_average_1min']}")
    p(f"  rebalanced: {r['rebalanced']}; churn since rebalance after it: {m['churn_since_rebalance']:,} "
      f"(auto rebalances at {updates.REBALANCE_CHURN:.0%} of the index)")
    c = u["check"]
    p(f"  check: {c['products']:,} products (expected {c['expected_products']:,}); moved vectors stored: {c['vectors_stored']}; "
      f"attributes stored: {c['attributes_stored']}; new products found first by their own vector: "
      f"{c['new_products_found_first_by_own_vector']:.2%}; recall@100 after: {u['recall_after']['catalogue queries']}")

    p(f"\nrebuild (i): build_index (q2e index) over {rb['products']:,} products, embedding {rb['embedded']:,}")
    for name, seconds in rb["phases"].items():
        p(f"  {name:<44} {seconds:8.2f} s")
    p(f"  {'total measured':<44} {rb['seconds_measured']:8.2f} s   ({rb['products_per_second']:,} products/s through the tower; "
      f"RSS +{rb['rss_peak_growth_mb']:,} MB at peak; load average {rb['load_average_1min']})")
    if "extrapolated" in rb:
        p(f"  EXTRAPOLATED: {rb['extrapolated']} -> {rb['seconds']:.1f} s")
    sp = f["speedups"]
    p(f"\nspeedups (rebuild / update, median update {m['seconds']:.2f} s)")
    p(f"  (i)  q2e index rebuild {rb['seconds']:.1f} s / update                             {sp['rebuild_i_over_update']:8.1f}x")
    p(f"  (ii) build_searcher alone {b['build_searcher_seconds']:.1f} s / update                         "
      f"{sp['build_searcher_ii_over_update']:8.2f}x")
    p(f"  (ii) build_searcher alone / update without embedding and load_model ({sp['update_without_embedding_and_model_seconds']:.1f} s)"
      f" {sp['build_searcher_ii_over_update_without_embedding_and_model']:6.2f}x")

    for scenario, ch in f["churn"].items():
        what = ("new products drawn like the catalogue" if scenario == "same"
                else "new products of topics the catalogue never had")
        sets = [k for k in ch["before"] if k != "products"]
        p(f"\nchurn '{scenario}' ({what}): per step {ch['per_step_deleted']:,} deleted + {ch['per_step_added']:,} added; "
          f"recall@100 vs exact ({' | '.join(sets)})")
        p(f"  {'mode':<8} {'step':>4} {'churn':>6} {'recall':>16} {'churn since rebal.':>18} {'rebal.':>6} {'seconds':>8}")
        p(f"  {'-':<8} {0:>4} {0:>6.0%} {joined(ch['before'], sets):>16}")
        for mode, res in ch["modes"].items():
            for row in res["steps"]:
                p(f"  {mode:<8} {row['step']:>4} {row['churn']:>6.0%} {joined(row['recall'], sets):>16} "
                  f"{row['churn_since_rebalance']:>18,} {str(row['rebalanced']):>6} {row['seconds']:>8.1f}")
            if "rebalance_only" in res:
                ro = res["rebalance_only"]
                p(f"  {'':<8} then rebalance alone (update_index, rebalance=always): {ro['seconds']:.1f} s "
                  f"(rebalance {ro['phases'].get('rebalance', 0):.1f} s) -> recall "
                  f"{joined(ro['recall'], sets)}")
                p(f"  {'':<8} a searcher built afresh over the same vectors: recall "
                  f"{joined(res['fresh_build']['recall'], sets)}")
    p(f"\nprocess peak RSS {s['process_peak_rss_mb']:,} MB; wall time {f['wall_seconds']:.0f} s; work dir {f['work_dir']}")
    p("\ntargets")
    for name, target in f["targets"].items():
        p(f"  {name:<72} {target['value']:>8}   {'PASS' if target['pass'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
