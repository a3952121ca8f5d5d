"""The catalogue index: product vectors, a ScaNN searcher and exact search.

`build_index(run_dir)` embeds the catalogue with the run's product tower
(streamed in batches, so a large catalogue never sits in memory as text),
builds a ScaNN searcher over the vectors (dot product; unit vectors unless
the towers carry a term channel, `tf_q2e.terms`) and writes `RUN/index/`:

    index.json        the ScaNN options, the search-time options, sizes, timings
                      and, after `--tune`, the measured recall/latency table
    products.parquet  product_id, product_title and the filter attributes (product_category, ...):
                      row i is vector i
    vectors.npy       float32 [N, D] product vectors (the exact index; D + K with a term channel)
    scann/            the ScaNN searcher's state (a SavedModel of ScaNN's own
                      `ScannState`: its ops load only after `import scann`)

ScaNN's options (`ScannOptions`) follow the catalogue size unless the config
sets them: brute force below 20,000 products, asymmetric hashing (AH) with
exact reordering below 100,000, a partitioning tree (about sqrt(N) leaves,
assigned anisotropically: `partition_avq`) + AH + reordering above. Two of them are search-time options — leaves searched
and reorder candidates — so `tune()` sweeps them over one built searcher,
measures recall@k against exact search and the latency of one query, and picks
the fastest setting that meets a target recall.

`ScannTopK` is a `tfrs.layers.factorized_top_k.TopK` over that state (TFRS's
own `ScaNN` layer hides the AH threshold, sample size and reordering);
`PAD_SCORE`/`""` fill the places where ScaNN finds fewer than k products
(it pads with NaN), so results never contain NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_q2e.config import IndexConfig
from tf_q2e.data import schema as S
from tf_q2e.data.formats import file_format, parquet_row_groups
from tf_q2e.data.pipeline import table_to_numpy
from tf_q2e.data.validate import Validator, catalog_tables, dataset_files
from tf_q2e.errors import InputError
from tf_q2e.filters import ATTRIBUTES, approximate_filtered_top_k, catalogue_attributes
from tf_q2e.progress import Progress

# Catalogue sizes at which the automatic ScaNN options change (see module docstring).
EXACT_BELOW = 20_000
TREE_FROM = 100_000
# The score of a place with no product (ScaNN found fewer than k): below every cosine. Its id ""
# marks it either way (a term channel's share could, in principle, take a score lower).
PAD_SCORE = -2.0
INDEX_DIR = "index"
SCANN_DIR = "scann"
VECTORS_FILE = "vectors.npy"
PRODUCTS_FILE = "products.parquet"
META_FILE = "index.json"
# Fractions of the leaves and multiples of k that `tune` tries.
TUNE_LEAF_FRACTIONS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
TUNE_REORDER_MULTIPLES = (1, 2, 3, 5, 10, 20, 40)


@dataclass(frozen=True)
class ScannOptions:
    """The options of one ScaNN searcher (build time) and of its searches.

    `leaves_to_search` and `reorder` are search-time options: `tune` changes
    them without rebuilding. `reorder` 0 means no reordering (brute force).
    """

    kind: str  # brute_force | ah | tree_ah
    num_leaves: int = 0
    leaves_to_search: int = 0
    training_sample_size: int = 0
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder: int = 0
    partition_avq: float = 0.0  # tree only; 0 = plain k-means leaves

    @classmethod
    def for_catalog(cls, cfg: IndexConfig, n: int, k: int) -> "ScannOptions":
        """The options for `n` products: the config's where set, else by catalogue size."""
        if n < 1:
            raise InputError("the catalogue has no products to index")
        kind = cfg.kind
        if kind == "auto":
            kind = "brute_force" if n < EXACT_BELOW else "ah" if n < TREE_FROM else "tree_ah"
        if kind == "brute_force":
            return cls(kind="brute_force")
        sample = min(n, cfg.training_sample_size or 100_000)
        reorder = min(n, max(k, cfg.reorder or max(10 * k, 200)))
        leaves = searched = 0
        if kind == "tree_ah":
            leaves = min(cfg.num_leaves or max(2, round(math.sqrt(n))), n)
            searched = min(leaves, cfg.leaves_to_search or max(1, math.ceil(leaves / 10)))
            sample = max(sample, leaves)
        return cls(kind, leaves, searched, sample, cfg.dimensions_per_block, cfg.anisotropic_quantization_threshold, reorder,
                   cfg.partition_avq if kind == "tree_ah" else 0.0)

    def search(self, leaves_to_search: int, reorder: int) -> "ScannOptions":
        return dataclasses.replace(self, leaves_to_search=leaves_to_search, reorder=reorder)


def build_searcher(vectors: np.ndarray, options: ScannOptions, k: int):
    """A ScaNN searcher (TF ops) over unit `vectors` [N, D], scored by dot product."""
    from scann.scann_ops.py import scann_ops

    builder = scann_ops.builder(vectors, k, "dot_product")
    if options.kind == "brute_force":
        builder = builder.score_brute_force()
    else:
        if options.kind == "tree_ah":
            builder = builder.tree(options.num_leaves, options.leaves_to_search, training_sample_size=options.training_sample_size,
                                   avq=options.partition_avq or None)
        builder = builder.score_ah(
            options.dimensions_per_block,
            anisotropic_quantization_threshold=options.anisotropic_quantization_threshold,
            training_sample_size=options.training_sample_size,
        )
        builder = builder.reorder(options.reorder)
    return builder.build()


def search_arguments(options: ScannOptions) -> tuple[int, int]:
    """`(pre_reordering_num_neighbors, leaves_to_search)` for ScaNN's search op; -1 = the built value."""
    return (options.reorder if options.reorder else -1), (options.leaves_to_search if options.leaves_to_search else -1)


def _fill_padding(indices: tf.Tensor, scores: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """ScaNN's short results (NaN score) → index -1, score PAD_SCORE."""
    valid = tf.logical_and(tf.math.is_finite(scores), indices >= 0)
    return tf.where(valid, indices, -1), tf.where(valid, scores, tf.constant(PAD_SCORE, scores.dtype))


def gather_or_empty(values: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """`values[indices]`, with "" where an index is -1 (a padded place)."""
    found = tf.gather(values, tf.maximum(indices, 0))
    return tf.where(indices >= 0, found, tf.zeros_like(found))


class ScannTopK(tfrs.layers.factorized_top_k.TopK):
    """Top-k by ScaNN over a built searcher's state, with every option visible.

    Args:
      state: ScaNN's `ScannState` (from `searcher.serialize_to_module()` or
        `load_index`).
      identifiers: [N] product ids, row i for vector i.
      options: the search-time options used by `call` (`leaves_to_search`,
        `reorder`).
      k: the default number of results.
      query_model: optional model applied to the queries first.

    `call(queries, k)` returns `(scores [B, k], identifiers [B, k])` like
    TFRS's layers; places ScaNN could not fill hold `PAD_SCORE` and "".
    """

    def __init__(self, state: tf.Module, identifiers, options: ScannOptions, k: int = 10, query_model=None, **kwargs):
        super().__init__(k=k, **kwargs)
        self.state = state
        self.query_model = query_model
        self.options = options
        self.identifiers = tf.Variable(identifiers, trainable=False, name="identifiers")

    @property
    def k(self) -> int:
        """The default number of results."""
        return self._k

    def index(self, candidates, identifiers=None):
        raise NotImplementedError("ScannTopK serves a built searcher; build one with tf_q2e.index.build_index")

    def search_indices(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
        """`(scores, row indices)` of the top k; padded places hold PAD_SCORE and -1."""
        from scann.scann_ops.py import scann_ops

        pre, leaves = search_arguments(self.options)
        handle = self.state.recreate_handle()
        result = scann_ops.scann_search_batched(handle, queries, k, pre, leaves, False)
        # ScaNN answers [B, n] with n the most results any query got (n < k when the searched leaves hold
        # fewer products; [0, 0] for an empty batch) and declares no static shape. Pad to [B, k] and say so,
        # so the exported `retrieval` signature declares [None, k] like `retrieval_exact`.
        missing = tf.maximum(k - tf.shape(result.indices)[1], 0)
        indices = tf.reshape(tf.pad(result.indices, [[0, 0], [0, missing]], constant_values=-1), [-1, k])
        scores = tf.reshape(tf.pad(result.distances, [[0, 0], [0, missing]], constant_values=float("nan")), [-1, k])
        indices, scores = _fill_padding(indices, scores)
        return scores, indices

    def search_fetch(self, queries: tf.Tensor, fetch: tf.Tensor, share=1.0) -> tuple[tf.Tensor, tf.Tensor]:
        """`(scores, row indices)` [B, <= fetch] of ScaNN asked for `fetch` (a tensor) neighbours, its
        reordering widened to `fetch` when that is more and a tree's leaves searched to 1/√`share` times as
        many (a restrict keeping that share: `tf_q2e.filters`); padded places hold PAD_SCORE and -1."""
        from scann.scann_ops.py import scann_ops

        pre, leaves = search_arguments(self.options)
        pre = tf.maximum(pre, fetch) if pre > 0 else tf.constant(-1)
        if leaves > 0:
            widened = tf.math.ceil(leaves / tf.sqrt(tf.maximum(tf.cast(share, tf.float32), 1e-6)))
            leaves = tf.cast(tf.minimum(widened, float(self.options.num_leaves)), tf.int32)
        result = scann_ops.scann_search_batched(self.state.recreate_handle(), queries, fetch, pre, leaves, False)
        indices, scores = _fill_padding(result.indices, result.distances)
        return scores, indices

    def search_filtered(self, queries: tf.Tensor, k: int, filters: dict, product_filter,
                        vectors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """`(scores, row indices)` [B, k] of the products each query's `filters` (a `*_filtered` signature's
        filter inputs) keep: over-fetched, or exact over `vectors` when selective
        (`tf_q2e.filters.approximate_filtered_top_k`)."""
        return approximate_filtered_top_k(self.search_fetch, queries, vectors, filters, k, product_filter, PAD_SCORE)

    def call(self, queries, k: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        k = k if k is not None else self._k
        if self.query_model is not None:
            queries = self.query_model(queries)
        scores, indices = self.search_indices(queries, k)
        return scores, gather_or_empty(self.identifiers, indices)

    def is_exact(self) -> bool:
        return self.options.kind == "brute_force"


# -- embedding the catalogue ---------------------------------------------------------------------


def catalog_columns(image_dim: int) -> list[str]:
    return [S.PRODUCT_ID, S.PRODUCT_TITLE, S.PRODUCT_DESCRIPTION, S.PRODUCT_CATEGORY] + (
        [S.PRODUCT_IMAGE_EMBEDDING] if image_dim else [])


def product_spec(image_dim: int) -> dict[str, tf.TensorSpec]:
    """The product tower's inputs: the text fields [B] string, the image embedding [B, image_dim] when present."""
    spec = {c: tf.TensorSpec([None], tf.string, name=c) for c in catalog_columns(0)[1:]}
    if image_dim:
        spec[S.PRODUCT_IMAGE_EMBEDDING] = tf.TensorSpec([None, image_dim], tf.float32, name=S.PRODUCT_IMAGE_EMBEDDING)
    return spec


def product_encoder(model) -> tf.types.experimental.GenericFunction:
    """The product tower as one traced function of product-field tensors (no retracing per batch)."""
    return tf.function(lambda features: model.product_tower(features, training=False),
                       input_signature=[product_spec(model.image_dim)])


def catalog_arrays(catalog, image_dim: int, on_bad_rows: str = "error", batch_rows: int = 4096,
                   attributes: bool = False):
    """Validated batches of a catalogue (a file path or a pandas DataFrame) as NumPy arrays of
    `catalog_columns(image_dim)` (and, with `attributes`, the filter attributes `product_country`,
    `product_seller`), at most `batch_rows` rows each, checked like `q2e validate` checks a catalogue file."""
    columns = catalog_columns(image_dim) + (list(S.PRODUCT_ATTRIBUTE_FIELDS) if attributes else [])
    for table in catalog_tables(catalog, Validator(on_bad_rows, image_dim=image_dim or 0), batch_rows):
        for start in range(0, table.num_rows, batch_rows):
            yield table_to_numpy(table.slice(start, batch_rows), columns, image_dim)


def embed_catalog(model, catalog, batch_size: int = 4096, on_bad_rows: str = "error", progress=None):
    """`(product_ids, titles, vectors, attributes)` of a catalogue (a file or a pandas DataFrame), its rows
    checked like `q2e validate`'s, embedded in batches of `batch_size` rows (`attributes`: the filter
    attributes, `tf_q2e.filters.catalogue_attributes`); `progress(done)` is called after each."""
    encode = product_encoder(model)
    ids, titles, chunks = [], [], []
    attributes = {c: [] for c in ATTRIBUTES.values()}
    for arrays in catalog_arrays(catalog, model.image_dim, on_bad_rows, batch_size, attributes=True):
        ids.append(arrays.pop(S.PRODUCT_ID))
        titles.append(arrays[S.PRODUCT_TITLE])
        for column, values in attributes.items():
            values.append(arrays[column] if column in S.PRODUCT_TEXT_FIELDS else arrays.pop(column))
        chunks.append(encode(arrays).numpy())
        if progress is not None:
            progress(sum(len(c) for c in ids))
    if not chunks:
        where = catalog if isinstance(catalog, (str, os.PathLike)) else "the catalog DataFrame"
        raise InputError(f"{where}: the catalogue has no products to index")
    ids = np.concatenate(ids)
    attributes = catalogue_attributes({c: np.concatenate(v) for c, v in attributes.items()}, len(ids))
    return ids, np.concatenate(titles), np.concatenate(chunks).astype(np.float32), attributes


# -- exact search, recall, tuning ----------------------------------------------------------------


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`(scores [Q, k], indices [Q, k])` by brute force, best first (NumPy, in query chunks)."""
    k = min(k, len(vectors))
    scores_out = np.empty((len(queries), k), np.float32)
    indices_out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        scores_out[start:start + chunk], indices_out[start:start + chunk] = top_k(queries[start:start + chunk] @ vectors.T, k)
    return scores_out, indices_out


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`(scores [Q, k], columns [Q, k])`: the k highest of each row of `scores` [Q, N] (k <= N), best first."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows of indices; -1 in `found` is no result)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]
    return float(np.mean(hits))


class SearchTimer:
    """Runs one searcher with any search-time options, batched or one query at a time."""

    def __init__(self, searcher, k: int):
        from scann.scann_ops.py import scann_ops

        self.k = k
        handle = searcher.searcher_handle

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
        def search(queries, pre, leaves):
            result = scann_ops.scann_search_batched(handle, queries, self.k, pre, leaves, False)
            return _fill_padding(result.indices, result.distances)

        self._search = search

    def indices(self, queries: np.ndarray, options: ScannOptions) -> np.ndarray:
        pre, leaves = search_arguments(options)
        return self._search(queries, pre, leaves)[0].numpy()

    def latencies_ms(self, queries: np.ndarray, options: ScannOptions) -> list[float]:
        """Milliseconds of each query, searched one per call."""
        pre, leaves = search_arguments(options)
        pre, leaves = tf.constant(pre), tf.constant(leaves)
        one = [tf.constant(q[None, :]) for q in queries]
        self._search(one[0], pre, leaves)  # warm-up
        times = []
        for q in one:
            start = time.perf_counter()
            self._search(q, pre, leaves)[0].numpy()
            times.append((time.perf_counter() - start) * 1e3)
        return times


def tune(searcher, options: ScannOptions, vectors: np.ndarray, queries: np.ndarray, k: int, target_recall: float,
         latency_queries: int = 100, rounds: int = 3) -> tuple[ScannOptions, list[dict]]:
    """The fastest search-time options whose recall@k (vs exact search) meets `target_recall`.

    Latency is that of one query per call, measured in `rounds` passes that
    take the settings in turn (so a busy moment of the machine spreads over
    all of them). Settings within 3% of the fastest count as equally fast, and
    the one doing the least work (fewest leaves, then fewest reorder
    candidates) wins. Returns the chosen options and the table of every
    setting tried (recall, p50/p99 ms). When none meets the target, the one
    with the highest recall is chosen (its row says `meets_target: false`).
    """
    timer = SearchTimer(searcher, k)
    _, truth = exact_top_k(vectors, queries, k)
    n = len(vectors)
    if options.kind == "brute_force":
        settings = [options]
    else:
        leaves = sorted({options.leaves_to_search} | {max(1, math.ceil(options.num_leaves * f)) for f in TUNE_LEAF_FRACTIONS}
                        ) if options.kind == "tree_ah" else [0]
        reorders = sorted({options.reorder} | {min(n, k * m) for m in TUNE_REORDER_MULTIPLES})
        settings = [options.search(lv, r) for lv in leaves for r in reorders]
    recalls = [recall_at_k(timer.indices(queries, setting), truth) for setting in settings]
    times: list[list[float]] = [[] for _ in settings]
    for _ in range(rounds):
        for i, setting in enumerate(settings):
            times[i] += timer.latencies_ms(queries[:latency_queries], setting)
    rows = [{"leaves_to_search": s.leaves_to_search, "reorder": s.reorder, "recall": round(r, 4),
             "p50_ms": round(float(np.percentile(t, 50)), 4), "p99_ms": round(float(np.percentile(t, 99)), 4),
             "meets_target": r >= target_recall} for s, r, t in zip(settings, recalls, times)]
    meeting = [i for i, row in enumerate(rows) if row["meets_target"]]
    if meeting:
        fastest = min(rows[i]["p50_ms"] for i in meeting)
        best = min((i for i in meeting if rows[i]["p50_ms"] <= 1.03 * fastest),
                   key=lambda i: (settings[i].leaves_to_search, settings[i].reorder))
    else:
        best = max(range(len(rows)), key=lambda i: rows[i]["recall"])
    rows[best]["chosen"] = True
    return settings[best], rows


def sample_queries(model, data_dir: str | None, titles: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Query vectors for tuning: distinct validation queries, else product titles as queries."""
    rng = np.random.default_rng(seed)
    texts, source = None, "product titles"
    if data_dir:
        try:
            _, splits = dataset_files(data_dir)
        except InputError:
            splits = {}
        path = splits.get("validation") or splits.get("test")
        if path:
            rows = pq.read_table(path, columns=[S.QUERY, *model.context_columns]) if path.endswith(".parquet") else None
            if rows is not None and rows.num_rows:
                distinct = rows.group_by(rows.column_names).aggregate([])
                take = rng.permutation(distinct.num_rows)[:count]
                texts = {c: distinct.column(c).take(pa.array(take)).to_numpy(zero_copy_only=False).astype(object)
                         for c in distinct.column_names}
                source = f"{os.path.basename(path)} queries"
    if texts is None:
        take = rng.permutation(len(titles))[:count]
        texts = {S.QUERY: titles[take]}
        texts.update({c: np.full(len(take), "", dtype=object) for c in model.context_columns})
    vectors = model.query_tower({c: tf.constant(v) for c, v in texts.items()}, training=False).numpy()
    return vectors.astype(np.float32), source


# -- RUN/index -----------------------------------------------------------------------------------


@dataclass
class Index:
    """A run's built index, as `load_index` reads it back."""

    product_ids: np.ndarray  # [N] object (str)
    titles: np.ndarray  # [N] object (str)
    vectors: np.ndarray  # [N, D] float32
    options: ScannOptions
    meta: dict
    scann_dir: str
    attributes: dict = dataclasses.field(default_factory=dict)  # filter attribute -> [N] str (tf_q2e.filters)

    def load_scann_state(self) -> tf.Module:
        """ScaNN's `ScannState` (needs ScaNN's ops: imports scann)."""
        from scann.scann_ops.py import scann_ops  # loads ScaNN's op library before the SavedModel


        loaded = tf.saved_model.load(self.scann_dir)
        names = ["scann_config", "serialized_partitioner", "datapoint_to_token", "ah_codebook", "hashed_dataset",
                 "int8_dataset", "int8_multipliers", "dp_norms", "dataset"]
        return scann_ops.ScannState([getattr(loaded, name).read_value() for name in names])


def build_index(run_dir: str, catalog: str | None = None, tune_recall: float | None = None,
                overrides: list[str] | tuple[str, ...] = (), log=None) -> dict:
    """Embeds the catalogue with the run's product tower and writes `RUN/index/`.

    Args:
      run_dir: a trained run (`q2e train --out RUN`).
      catalog: catalogue file; None = the `catalog.*` of the run's data set.
      tune_recall: when given, `tune` picks the search-time options that meet
        this recall@k fastest, on queries from the validation split.
      overrides: `--set` items over the run's config (`index.k=50`, ...).
      log: a function of one message line (default: stderr).

    Returns the index metadata (also `RUN/index/index.json`).
    """
    from tf_q2e.train import load_model

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    model = load_model(run_dir, overrides=overrides)
    cfg = model.config.index
    data_dir = model.config.data.dir
    if catalog is None:
        if not data_dir:
            raise InputError(f"{run_dir}: the run's config names no data set; pass --catalog FILE")
        catalog, _ = dataset_files(data_dir)
    if not os.path.exists(catalog):
        raise InputError(f"catalogue file {catalog} does not exist")

    total = sum(parquet_row_groups(catalog)) if file_format(catalog) == "parquet" else None
    progress = Progress(total, "products", log, verb="embedded")
    start = time.perf_counter()
    ids, titles, vectors, attributes = embed_catalog(model, catalog, cfg.batch_size, model.config.data.on_bad_rows,
                                                     progress.update)
    embed_seconds = time.perf_counter() - start
    k = min(cfg.k, len(ids))
    options = ScannOptions.for_catalog(cfg, len(ids), k)
    start = time.perf_counter()
    searcher = build_searcher(vectors, options, k)
    build_seconds = time.perf_counter() - start
    log(f"built ScaNN ({options.kind}) over {len(ids)} products in {build_seconds:.1f} s")
    meta = {"products": int(len(ids)), "dim": int(vectors.shape[1]), "k": k, "catalog": os.path.abspath(catalog),
            "embed_seconds": round(embed_seconds, 2), "build_seconds": round(build_seconds, 2)}
    if tune_recall is not None:
        queries, source = sample_queries(model, data_dir, titles, cfg.tune_queries, model.config.train.seed)
        options, table = tune(searcher, options, vectors, queries, k, tune_recall)
        chosen = next(row for row in table if row.get("chosen"))
        meta["tune"] = {"target_recall": tune_recall, "queries": int(len(queries)), "query_source": source,
                        "chosen": chosen, "tried": table}
        log(f"tuned on {len(queries)} {source}: leaves_to_search {chosen['leaves_to_search']}, reorder {chosen['reorder']}: "
            f"recall@{k} {chosen['recall']:.3f}, p50 {chosen['p50_ms']:.3f} ms"
            + ("" if chosen["meets_target"] else f" (target {tune_recall} not met by any setting tried)"))
    meta["scann"] = dataclasses.asdict(options)
    write_index(os.path.join(run_dir, INDEX_DIR), ids, titles, vectors, searcher, meta, attributes)
    return meta


def write_index(out_dir: str, ids, titles, vectors: np.ndarray, searcher, meta: dict,
                attributes: dict[str, np.ndarray] | None = None) -> None:
    """Writes an index directory atomically (a temporary sibling, then a rename); `attributes` are the
    products' filter attributes (`tf_q2e.filters`), kept as their catalogue columns."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    np.save(os.path.join(tmp, VECTORS_FILE), vectors)
    columns = {S.PRODUCT_ID: pa.array(list(ids), pa.string()), S.PRODUCT_TITLE: pa.array(list(titles), pa.string())}
    for attribute, values in (attributes or {}).items():
        columns[ATTRIBUTES[attribute]] = pa.array(list(values), pa.string())
    pq.write_table(pa.table(columns), os.path.join(tmp, PRODUCTS_FILE))
    tf.saved_model.save(searcher.serialize_to_module(), os.path.join(tmp, SCANN_DIR),
                        options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    old = out_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_index(run_dir: str) -> Index:
    """The index of a run (`RUN/index/`), with a clear error when `q2e index` has not run."""
    out_dir = os.path.join(run_dir, INDEX_DIR)
    meta_path = os.path.join(out_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise InputError(f"{run_dir}: no index ({meta_path} is missing); run q2e index --run {run_dir} first")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    products = pq.read_table(os.path.join(out_dir, PRODUCTS_FILE))
    vectors = np.load(os.path.join(out_dir, VECTORS_FILE), allow_pickle=False)
    columns = {c: products.column(c).to_numpy(zero_copy_only=False) for c in ATTRIBUTES.values()
               if c in products.column_names}
    return Index(
        product_ids=products.column(S.PRODUCT_ID).to_numpy(zero_copy_only=False).astype(object),
        attributes=catalogue_attributes(columns, products.num_rows),
        titles=products.column(S.PRODUCT_TITLE).to_numpy(zero_copy_only=False).astype(object),
        vectors=vectors,
        options=ScannOptions(**meta["scann"]),
        meta=meta,
        scann_dir=os.path.join(out_dir, SCANN_DIR),
    )
