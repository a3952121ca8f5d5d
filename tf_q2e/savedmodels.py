"""SavedModels of a trained run in TensorFlow Serving's layout.

`export(retriever, base)` (`tf_q2e.export`) writes one version of two models of a
`tf_q2e.Retriever` (its model and its products); `export_run(run_dir, base)`,
what `q2e export` runs, does it for a trained and indexed run:

    BASE/<name>/<version>/        stock TensorFlow ops only (serves on the stock
                                  tensorflow/serving image):
                                    query_encoder, product_encoder, retrieval_exact
                                    (serving_default = retrieval_exact)
    BASE/<name>_scann/<version>/  ScaNN's ops (`Scann>...`): retrieval
                                  (serving_default = retrieval); loads only where
                                  ScaNN's op library is linked in or loaded
    BASE/models.config            every model (a ModelServerConfig, text format)
    BASE/models.stock.config      the stock-op models only (for the stock image)

Signatures take raw strings; the towers hash text in the graph, exactly as in
training:

    query_encoder:    query [B] string (+ each query_<context> [B] string)
                      -> embedding [B, D] float32 (unit vectors; [B, D + K]
                         with a term channel, `tf_q2e.terms`),
                         query_bias [B] float32 (b_q; 0 without `model.query_bias`)
    product_encoder:  product_title, product_description, product_category
                      [B] string (+ product_image_embedding [B, I] float32)
                      -> embedding [B, D] float32 (as query_encoder)
    retrieval, retrieval_exact: the query inputs
                      -> product_ids [B, K] string, scores [B, K] float32
                         (dot product: the cosine, plus the term channel's
                         share when there is one; best first),
                         product_titles [B, K] string,
                         engagement_probability [B, K] float32: σ(s_e·(score
                         + b_q) + b), the engagement task's probability that
                         the product is engaged if shown (a feature for a
                         ranking stage; meaningful when the model was trained
                         with λ > 0), 0 at padded places

K is fixed per export (`index.k`, at most the catalogue size). Where ScaNN
finds fewer than K products (it pads with NaN), the places hold product id ""
and score -2.0 (`tf_q2e.index.PAD_SCORE`, below every cosine; the empty id
marks a padded place whatever the scores) and engagement probability 0:
outputs never contain NaN. `retrieval_exact` scores the whole catalogue in the graph.

Versions are integers, one more than the newest under BASE, the same for both
models. Each is written into a temporary directory `BASE/<name>/.tmp-...`
(TensorFlow Serving ignores names that are not integers) and renamed into
place, so a server never sees half a version. Each carries warm-up requests in
`assets.extra/tf_serving_warmup_requests` (TFRecord of `PredictionLog`).
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid

import numpy as np
import tensorflow as tf

from tf_q2e.data import schema as S
from tf_q2e.errors import InputError
from tf_q2e.filters import FILTER_SPEC, Filters, ProductFilter, check_request, exact_filtered_top_k
from tf_q2e.index import (PAD_SCORE, ScannOptions, ScannTopK, build_searcher, catalog_columns, gather_or_empty, load_index,
                          product_spec)

SCANN_SUFFIX = "_scann"
MODELS_CONFIG = "models.config"
STOCK_MODELS_CONFIG = "models.stock.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
STOCK_SIGNATURES = ("query_encoder", "product_encoder", "retrieval_exact", "retrieval_exact_filtered")
SCANN_SIGNATURES = ("retrieval", "retrieval_filtered")


def query_spec(context_columns: tuple[str, ...]) -> dict[str, tf.TensorSpec]:
    return {c: tf.TensorSpec([None], tf.string, name=c) for c in (S.QUERY, *context_columns)}


def _strings(values: np.ndarray) -> tf.Variable:
    return tf.Variable(tf.constant([str(v) for v in values], tf.string), trainable=False)


class StockModule(tf.Module):
    """The towers and an in-graph brute-force index: stock ops only."""

    def __init__(self, model, product_ids, titles, vectors: np.ndarray, k: int, attributes: dict | None = None):
        super().__init__(name="q2e")
        self.query_tower = model.query_tower
        self.product_tower = model.product_tower
        self.engagement = model.engagement
        self.vectors = tf.Variable(vectors, trainable=False, name="product_vectors")
        self.product_filter = ProductFilter(product_ids, attributes)
        self.product_ids = _strings(product_ids)
        self.titles = _strings(titles)
        self.k = k
        self.query_spec = query_spec(model.context_columns)
        self.product_spec = product_spec(model.image_dim)

    def signatures(self) -> dict:
        @tf.function(input_signature=[self.query_spec])
        def query_encoder(features):
            embedding, query_bias = self.query_tower(features, training=False, return_bias=True)
            return {"embedding": embedding, "query_bias": query_bias}

        @tf.function(input_signature=[self.product_spec])
        def product_encoder(features):
            return {"embedding": self.product_tower(features, training=False)}

        @tf.function(input_signature=[self.query_spec])
        def retrieval_exact(features):
            queries, query_bias = self.query_tower(features, training=False, return_bias=True)
            scores, indices = tf.math.top_k(tf.matmul(queries, self.vectors, transpose_b=True), k=self.k)
            return _results(scores, indices, query_bias, self.engagement, self.product_ids, self.titles)

        @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
        def retrieval_exact_filtered(features, filters):
            with tf.control_dependencies(check_request(filters["max_per_category"], filters["max_per_seller"])):
                queries, query_bias = self.query_tower(features, training=False, return_bias=True)
            scores, indices = exact_filtered_top_k(queries, self.vectors, filters, self.k, self.product_filter, PAD_SCORE)
            return _results(scores, indices, query_bias, self.engagement, self.product_ids, self.titles)

        return {"query_encoder": query_encoder, "product_encoder": product_encoder,
                "retrieval_exact": retrieval_exact, "retrieval_exact_filtered": retrieval_exact_filtered,
                "serving_default": retrieval_exact}


class ScannModule(tf.Module):
    """The query tower and ScaNN's searcher (`ScannTopK`): needs ScaNN's ops."""

    def __init__(self, model, top_k: ScannTopK, product_ids, titles, k: int, vectors: np.ndarray,
                 attributes: dict | None = None):
        super().__init__(name="q2e_scann")
        self.query_tower = model.query_tower
        self.engagement = model.engagement
        self.top_k = top_k
        self.titles = _strings(titles)
        self.k = k
        self.query_spec = query_spec(model.context_columns)
        self.product_filter = ProductFilter(product_ids, attributes)
        # A filter too selective for over-fetching scores its products exactly: float16 vectors (N × D × 2 bytes).
        self.vectors = tf.Variable(vectors.astype(np.float16), trainable=False, name="product_vectors_float16")

    def signatures(self) -> dict:
        @tf.function(input_signature=[self.query_spec])
        def retrieval(features):
            queries, query_bias = self.query_tower(features, training=False, return_bias=True)
            scores, indices = self.top_k.search_indices(queries, self.k)
            return _results(scores, indices, query_bias, self.engagement, self.top_k.identifiers, self.titles)

        @tf.function(input_signature=[self.query_spec, FILTER_SPEC])
        def retrieval_filtered(features, filters):
            with tf.control_dependencies(check_request(filters["max_per_category"], filters["max_per_seller"])):
                queries, query_bias = self.query_tower(features, training=False, return_bias=True)
            scores, indices = self.top_k.search_filtered(queries, self.k, filters, self.product_filter, self.vectors)
            return _results(scores, indices, query_bias, self.engagement, self.top_k.identifiers, self.titles)

        return {"retrieval": retrieval, "retrieval_filtered": retrieval_filtered, "serving_default": retrieval}


def _results(scores: tf.Tensor, indices: tf.Tensor, query_bias: tf.Tensor, engagement, product_ids, titles) -> dict:
    """The retrieval outputs of the top k `(scores [B, k], indices [B, k])`, -1 at padded places."""
    indices = tf.cast(indices, tf.int32)
    probability = engagement.probability(scores + query_bias[:, tf.newaxis])  # [B, k]
    return {"product_ids": gather_or_empty(product_ids, indices), "scores": scores,
            "product_titles": gather_or_empty(titles, indices),
            "engagement_probability": tf.where(indices >= 0, probability, tf.zeros_like(probability))}


def next_version(base: str, names: list[str]) -> int:
    """One more than the newest integer version of any of `names` under `base`."""
    versions = [int(v) for name in names if os.path.isdir(os.path.join(base, name))
                for v in os.listdir(os.path.join(base, name)) if v.isdigit()]
    return max(versions, default=0) + 1


def check_model_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "_-" for c in name) or name[0] in "-_":
        raise InputError(f"--name {name!r}: a model name is letters, digits, '_' and '-', starting with a letter or digit")
    return name


def warmup_requests(model_name: str, signatures: tuple[str, ...], queries: list[str], products: dict[str, np.ndarray],
                    context_columns: tuple[str, ...]) -> list[bytes]:
    """Serialized `PredictionLog` records: one `Predict` per signature, on real catalogue text."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    records = []
    for signature in signatures:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        if signature == "product_encoder":
            inputs = products
        else:
            inputs = {S.QUERY: np.array(queries, dtype=object)}
            inputs.update({c: np.array([""] * len(queries), dtype=object) for c in context_columns})
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        if signature.endswith("_filtered"):  # no restrict: the filter code runs all the same
            for key, value in Filters().arrays(len(queries)).items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=FILTER_SPEC[key].dtype, shape=value.shape))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def write_saved_model(module: tf.Module, base: str, name: str, version: int, warmup: list[bytes],
                      options: tf.saved_model.SaveOptions | None = None) -> str:
    """Saves `module` as `base/name/version`, atomically (temporary directory, then rename)."""
    model_dir = os.path.join(base, name)
    os.makedirs(model_dir, exist_ok=True)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise InputError(f"{final} exists already; versions are never overwritten")
    tmp = os.path.join(model_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    logger, level = tf.get_logger(), tf.get_logger().level
    try:
        logger.setLevel("ERROR")  # tf-keras warns about layer configs that a signature-only SavedModel never uses
        tf.saved_model.save(module, tmp, signatures=module.signatures(), options=options)
        logger.setLevel(level)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(tmp, WARMUP_FILE)) as writer:
            for record in warmup:
                writer.write(record)
        os.rename(tmp, final)
    finally:
        logger.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_models_config(base: str, names: list[str], path: str) -> None:
    """A `ModelServerConfig` listing `names` (absolute base paths), written atomically."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for name in names:
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = os.path.abspath(os.path.join(base, name))
        entry.model_platform = "tensorflow"
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text_format.MessageToString(config))
    os.replace(tmp, path)


def _config_models(path: str) -> list[str]:
    """The model names already listed in a models.config (kept when another export adds its own)."""
    if not os.path.exists(path):
        return []
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    with open(path, encoding="utf-8") as f:
        text_format.Parse(f.read(), config)
    return [entry.name for entry in config.model_config_list.config]


def export(retriever, base: str, name: str = "q2e", k: int | None = None, scann: bool = True, log=None) -> dict:
    """Exports a `tf_q2e.Retriever` (its model and products) as one new version under a TF Serving base directory.

    Args:
      retriever: from `Retriever.from_model` or `Retriever.from_run` (not from a SavedModel).
      base: the TensorFlow Serving base directory (created if missing).
      name: the stock model's name; the ScaNN model is `<name>_scann`.
      k: products per query (default: the retriever's ScaNN k, else `index.k` of the model's config;
        at most the catalogue size).
      scann: also export the ScaNN model (with the retriever's searcher, or one built now with the
        options of the model's `index` config).
      log: a function of one message line (default: stderr).

    Returns `{"version": v, "models": {model name: path}, "k": k}`.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    check_model_name(name)
    model = retriever.model
    if model is None:
        raise InputError("a retriever of a SavedModel is exported already; copy its directory instead")
    n = len(retriever.product_ids)
    k = min(k or retriever.max_k or model.config.index.k, n)
    if k < 1:
        raise InputError(f"--k ({k}) must be at least 1")
    names = [name] + ([name + SCANN_SUFFIX] if scann else [])
    os.makedirs(base, exist_ok=True)
    version = next_version(base, names)
    titles = retriever.titles
    queries = [str(t) for t in titles[:3]]
    products = {c: np.array([str(t) for t in titles[:3]] if c == S.PRODUCT_TITLE else [""] * len(queries), dtype=object)
                for c in catalog_columns(0)[1:]}
    if model.image_dim:
        products[S.PRODUCT_IMAGE_EMBEDDING] = np.zeros((len(queries), model.image_dim), np.float32)
    with model.text_cache_detached():  # the towers encode raw text: a SavedModel holds no text cache
        paths = _write_models(retriever, model, base, name, version, k, scann, titles, queries, products, log)
    every = list(dict.fromkeys(_config_models(os.path.join(base, MODELS_CONFIG)) + names))
    write_models_config(base, every, os.path.join(base, MODELS_CONFIG))
    stock_names = [m for m in every if not m.endswith(SCANN_SUFFIX)]
    write_models_config(base, stock_names, os.path.join(base, STOCK_MODELS_CONFIG))
    return {"version": version, "models": paths, "k": k}


def _write_models(retriever, model, base: str, name: str, version: int, k: int, scann: bool, titles, queries,
                  products, log) -> dict:
    """Writes version `version` of the stock model (and the ScaNN model); returns their paths by name."""
    paths = {}
    stock = StockModule(model, retriever.product_ids, titles, retriever.vectors, k, retriever.attributes)
    paths[name] = write_saved_model(stock, base, name, version,
                                    warmup_requests(name, STOCK_SIGNATURES, queries, products, model.context_columns))
    log(f"wrote {paths[name]} ({', '.join(STOCK_SIGNATURES)}; stock ops)")
    if scann:
        scann_name = name + SCANN_SUFFIX
        paths[scann_name] = write_saved_model(
            ScannModule(model, _scann_top_k(retriever, model, k), retriever.product_ids, titles, k, retriever.vectors,
                        retriever.attributes), base, scann_name, version,
            warmup_requests(scann_name, SCANN_SIGNATURES, queries, products, model.context_columns),
            options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
        log(f"wrote {paths[scann_name]} ({', '.join(SCANN_SIGNATURES)}; ScaNN ops)")
    return paths


def _scann_top_k(retriever, model, k: int) -> ScannTopK:
    """A `ScannTopK` of k results over the retriever's ScaNN state, or over a searcher built now."""
    ids = [str(v) for v in retriever.product_ids]
    searcher = retriever._scann
    if searcher is not None:
        return ScannTopK(searcher.state, ids, searcher.options, k=k)
    options = ScannOptions.for_catalog(model.config.index, len(ids), k)
    return ScannTopK(build_searcher(retriever.vectors, options, k).serialize_to_module(), ids, options, k=k)


def export_run(run_dir: str, base: str, name: str = "q2e", k: int | None = None, scann: bool = True, log=None) -> dict:
    """Exports a trained, indexed run as one new version under a TF Serving base directory (`export`).

    Args:
      run_dir: a run with an index (`q2e train`, then `q2e index`).
      base, name, scann, log: as for `export`.
      k: products per query (default: the index's k; at most the catalogue size).
    """
    from tf_q2e.search import Retriever
    from tf_q2e.train import load_model

    check_model_name(name)  # before anything is read
    index = load_index(run_dir)  # a clear error when q2e index has not run
    return export(Retriever.from_index(load_model(run_dir), index, scann), base, name, k, scann, log)
