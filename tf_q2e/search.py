"""`Retriever`: look products up for query texts, from Python.

One interface over three sources of a trained model:

    Retriever.from_model(model, catalog)   an in-memory model and a catalogue (DataFrame or file):
                                           embeds the catalogue now; exact search, or ScaNN with scann=True
    Retriever.from_run("runs/main/train")  a `q2e train` run: its model and, when `q2e index` ran, its
                                           product vectors and ScaNN searcher (`from_index`: a model and
                                           an index already loaded)
    Retriever.from_saved_model("serving/q2e")   an exported SavedModel (`q2e export`, `tf_q2e.export`):
                                           its signatures, stock TensorFlow only (or `q2e_scann`'s)

and the same methods on each:

    encode_queries(texts, context=None) -> [B, D] float32      the query tower's vectors
    encode_products(catalog) -> [N, D] float32                  the product tower's vectors
    search(texts, k=10, context=None) -> per query, a list of `Hit`s, best first

A `Hit` unpacks as `(product_id, score, title)` and also carries
`engagement_probability`: σ(s_e·(score + b_q) + b), the engagement task's
probability that a shown product is engaged (meaningful for a model trained
with λ > 0; a ranking stage can use it as a feature). `score` is the dot
product that ranks (the cosine, plus the term channel's share when the
model has one).

`context` gives the query context inputs (`query_country`, ...): a mapping of
column name to one string for every query or one per query; a context column
the model has and `context` leaves out is "" (unknown).

Example:
    retriever = tf_q2e.Retriever.from_run("runs/main/train")
    for hit in retriever.search(["grey jute rug"], k=5)[0]:
        print(hit.product_id, round(hit.score, 3), hit.title, round(hit.engagement_probability, 3))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tf_q2e.data import schema as S
from tf_q2e.data.validate import dataset_files
from tf_q2e.errors import InputError
from tf_q2e.filters import Filters, ProductFilter, as_tensors, batch_arrays, exact_filtered_top_k, per_query
from tf_q2e.index import (INDEX_DIR, META_FILE, PAD_SCORE, Index, ScannOptions, ScannTopK, build_searcher, catalog_arrays,
                          embed_catalog, exact_top_k, load_index, product_encoder)


class _HitFields(NamedTuple):
    product_id: str  # the product's id
    score: float  # the ranking score (dot product)
    title: str  # the product's title


class Hit(_HitFields):
    """One search result: a named tuple `(product_id, score, title)` that also carries
    `engagement_probability`, σ(s_e·(score + b_q) + b)."""

    def __new__(cls, product_id: str, score: float, title: str, engagement_probability: float = float("nan")):
        hit = super().__new__(cls, product_id, float(score), title)
        hit.engagement_probability = float(engagement_probability)
        return hit

    def __repr__(self) -> str:
        return (f"Hit(product_id={self.product_id!r}, score={self.score:.4f}, title={self.title!r}, "
                f"engagement_probability={self.engagement_probability:.4f})")


def _texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of query strings, not one string: pass [text]")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
    return texts


def query_features(texts, context: Mapping | None, context_columns: Sequence[str]) -> dict[str, tf.Tensor]:
    """The query tower's inputs: `query` [B] and each context column [B] ("" where `context` has none)."""
    texts = _texts(texts)
    context = dict(context or {})
    unknown = [c for c in context if c not in context_columns]
    if unknown:
        known = ", ".join(context_columns) or "none"
        raise InputError(f"context column {unknown[0]!r} is not one of the model's (its context columns: {known})")
    features = {S.QUERY: tf.constant(texts, tf.string)}
    for c in context_columns:
        value = context.get(c, "")
        values = [value] * len(texts) if isinstance(value, str) else list(value)
        if len(values) != len(texts):
            raise InputError(f"context[{c!r}] has {len(values)} values for {len(texts)} queries; give one string or one per query")
        features[c] = tf.constant([str(v) for v in values], tf.string)
    return features


class Retriever:
    """Products for query texts: a model's query tower plus product vectors, searched exactly or by ScaNN.

    Build one with `from_model`, `from_run` or `from_saved_model` (the module
    docstring). Attributes: `product_ids` [N], `titles` [N] (object arrays),
    `vectors` [N, D] float32 (None for a SavedModel, which holds them
    inside), `exact` (True: brute-force search), `model` (None for a SavedModel).
    """

    def __init__(self, *, query_fn, product_fn, probability_fn, product_ids, titles, vectors=None, scann=None,
                 search_fn=None, exact: bool | None = None, context_columns: Sequence[str] = (), image_dim: int = 0,
                 model=None, k: int | None = None, attributes: dict | None = None, filtered_search_fn=None):
        self._query_fn = query_fn  # features -> (vectors [B, D], biases [B])
        self._product_fn = product_fn  # product features -> [B, D]
        self._probability_fn = probability_fn  # scores [B, k] + biases -> probabilities
        self._search_fn = search_fn  # SavedModel: features -> outputs of a retrieval signature
        self._scann = scann  # ScannTopK over the vectors, or None
        self.product_ids = np.asarray(product_ids, dtype=object)
        self.titles = np.asarray(titles, dtype=object)
        self.vectors = vectors
        self.context_columns = tuple(context_columns)
        self.image_dim = int(image_dim)
        self.model = model
        self.max_k = k  # a SavedModel's fixed K, or the ScaNN searcher's
        self.exact = scann is None if exact is None else exact
        self.attributes = attributes or {}  # filter attribute -> [N] str (tf_q2e.filters)
        self._filtered_search_fn = filtered_search_fn  # SavedModel: features + filter inputs -> outputs
        self._product_filter = None  # a ProductFilter over the products, made on the first filtered search

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, catalog, scann: bool = False, k: int = 100, on_bad_rows: str = "error") -> "Retriever":
        """Embeds `catalog` (a pandas DataFrame or a catalogue file) with `model`'s product tower.

        `scann=True` also builds a ScaNN searcher with the options of
        `model.config.index` for this catalogue's size (exact scoring below
        20,000 products), returning up to `k` products per query.
        """
        ids, titles, vectors, attributes = embed_catalog(model, catalog, model.config.index.batch_size, on_bad_rows)
        searcher = None
        if scann:
            k = min(k, len(ids))
            options = ScannOptions.for_catalog(model.config.index, len(ids), k)
            state = build_searcher(vectors, options, k).serialize_to_module()
            searcher = _scann_top_k(state, ids, options, k)
        return cls._of_model(model, ids, titles, vectors, searcher, attributes)

    @classmethod
    def from_run(cls, run_dir: str, scann: bool = True) -> "Retriever":
        """A trained run's model and its index (`q2e index`): ScaNN when `scann` and the index has a
        searcher, else exact. Without an index the run's catalogue is embedded now (exact search)."""
        from tf_q2e.train import load_model

        model = load_model(run_dir)
        if not os.path.exists(os.path.join(run_dir, INDEX_DIR, META_FILE)):
            if not model.config.data.dir:
                raise InputError(f"{run_dir}: no index and no data set in the run's config; run q2e index --run {run_dir}")
            catalog, _ = dataset_files(model.config.data.dir)
            return cls.from_model(model, catalog, on_bad_rows=model.config.data.on_bad_rows)
        return cls.from_index(model, load_index(run_dir), scann)

    @classmethod
    def from_index(cls, model, index: Index, scann: bool = True) -> "Retriever":
        """A model and a run's loaded index (`tf_q2e.index.load_index`): ScaNN when `scann`, else exact."""
        searcher = None
        if scann:
            searcher = _scann_top_k(index.load_scann_state(), index.product_ids, index.options, index.meta["k"])
        return cls._of_model(model, index.product_ids, index.titles, index.vectors, searcher, index.attributes)

    @classmethod
    def _of_model(cls, model, ids, titles, vectors, searcher, attributes=None) -> "Retriever":
        query = tf.function(lambda features: model.query_tower(features, training=False, return_bias=True),
                            reduce_retracing=True)  # one trace for batches of any size
        return cls(query_fn=query, product_fn=product_encoder(model),
                   probability_fn=lambda scores: model.engagement.probability(scores).numpy(),
                   product_ids=ids, titles=titles, vectors=vectors, scann=searcher, context_columns=model.context_columns,
                   image_dim=model.image_dim, model=model, k=searcher.k if searcher is not None else None,
                   attributes=attributes)

    @classmethod
    def from_saved_model(cls, path: str) -> "Retriever":
        """An exported model (`q2e export`): a version directory (`BASE/q2e/1`) or a model directory
        (`BASE/q2e`: its newest version). Stock TensorFlow suffices for the stock model; the ScaNN
        model (`BASE/q2e_scann`) needs `import scann` (done here). Search returns at most the export's K."""
        path = _version_dir(path)
        if os.path.basename(os.path.dirname(path)).endswith("_scann"):
            import scann  # noqa: F401  (registers ScaNN's ops before the SavedModel loads)
        loaded = tf.saved_model.load(path)
        signatures = loaded.signatures
        name = "retrieval_exact" if "retrieval_exact" in signatures else "retrieval" if "retrieval" in signatures else None
        if name is None:
            raise InputError(f"{path}: no retrieval signature (signatures: {', '.join(signatures)}); is it a tf_q2e export?")
        search = signatures[name]
        filtered = signatures.get(name + "_filtered")
        inputs = search.structured_input_signature[1]
        context_columns = tuple(c for c in inputs if c != S.QUERY)
        k = int(search.structured_outputs["product_ids"].shape[1])
        query_fn = product_fn = None
        if "query_encoder" in signatures:
            encoder = signatures["query_encoder"]
            query_fn = lambda features: (lambda out: (out["embedding"], out["query_bias"]))(encoder(**features))  # noqa: E731
        image_dim = 0
        if "product_encoder" in signatures:
            product = signatures["product_encoder"]
            spec = product.structured_input_signature[1]
            if S.PRODUCT_IMAGE_EMBEDDING in spec:
                image_dim = int(spec[S.PRODUCT_IMAGE_EMBEDDING].shape[1])
            product_fn = lambda features: product(**features)["embedding"]  # noqa: E731
        ids = getattr(loaded, "product_ids", None)
        titles = getattr(loaded, "titles", None)
        return cls(query_fn=query_fn, product_fn=product_fn, probability_fn=None, search_fn=lambda f: search(**f),
                   filtered_search_fn=(lambda f: filtered(**f)) if filtered is not None else None,
                   exact=name == "retrieval_exact",
                   product_ids=ids.numpy().astype(object) if ids is not None else [],
                   titles=titles.numpy().astype(object) if titles is not None else [],
                   context_columns=context_columns, image_dim=image_dim, k=k)

    # -- use -----------------------------------------------------------------------------------------

    def encode_queries(self, texts, context: Mapping | None = None, return_bias: bool = False):
        """`[B, D]` float32 query vectors of `texts` (with `return_bias`, also the query biases `[B]`)."""
        if self._query_fn is None:
            raise InputError("this SavedModel has no query_encoder signature (the ScaNN model has retrieval only); "
                             "load the stock model (BASE/<name>) to encode queries")
        vectors, bias = self._query_fn(query_features(texts, context, self.context_columns))
        vectors, bias = vectors.numpy().astype(np.float32), bias.numpy().astype(np.float32)
        return (vectors, bias) if return_bias else vectors

    def encode_products(self, catalog, on_bad_rows: str = "error") -> np.ndarray:
        """`[N, D]` float32 product vectors of a catalogue (a pandas DataFrame or a file), in its row order."""
        if self._product_fn is None:
            raise InputError("this SavedModel has no product_encoder signature; load the stock model (BASE/<name>)")
        chunks = [self._product_fn({c: tf.constant(v) for c, v in arrays.items() if c != S.PRODUCT_ID}).numpy()
                  for arrays in catalog_arrays(catalog, self.image_dim, on_bad_rows)]
        if not chunks:
            raise InputError("the catalogue has no products")
        return np.concatenate(chunks).astype(np.float32)

    def search(self, texts, k: int = 10, context: Mapping | None = None,
               filters: Filters | Mapping | None = None) -> list[list[Hit]]:
        """The top `k` products of each query text, best first (fewer where the index has fewer).

        `filters` (a `tf_q2e.Filters` or a mapping of its fields, for every query; or a list of one per
        query) restricts the products: allow-lists of categories and countries, product ids to exclude,
        crowding (`tf_q2e.filters`). Fewer than k products pass a restrictive filter: the list is then
        shorter.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        features = query_features(texts, context, self.context_columns)
        if self.max_k is not None and k > self.max_k:
            raise InputError(f"k={k} is more than the {self.max_k} products this "
                             f"{'export' if self._search_fn else 'ScaNN searcher'} returns per query; ask for fewer")
        filters = per_query(filters, len(features[S.QUERY]))
        if self._search_fn is not None:
            if filters is not None:
                if self._filtered_search_fn is None:
                    raise InputError("this SavedModel has no filtered retrieval signature (it was exported before "
                                     "filters existed); export it again")
                out = self._filtered_search_fn({**features, **as_tensors(batch_arrays(filters))})
            else:
                out = self._search_fn(features)
            ids, scores = out["product_ids"].numpy()[:, :k], out["scores"].numpy()[:, :k]
            titles, probability = out["product_titles"].numpy()[:, :k], out["engagement_probability"].numpy()[:, :k]
            ids = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(ids) if ids.size else ids
            titles = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(titles) if titles.size else titles
        else:
            queries, bias = self._query_fn(features)
            if filters is not None:
                scores, rows = (x.numpy() for x in self._search_filtered(queries, k, filters))
            elif self._scann is not None:
                scores, rows = (x.numpy() for x in self._scann.search_indices(queries, k))
            else:
                scores, rows = exact_top_k(self.vectors, queries.numpy(), k)
            probability = self._probability_fn(tf.constant(scores + bias.numpy()[:, None]))
            valid = rows >= 0
            ids = np.where(valid, self.product_ids[np.maximum(rows, 0)], "")
            titles = np.where(valid, self.titles[np.maximum(rows, 0)], "")
        return [[Hit(str(p), float(s), str(t), float(e)) for p, s, t, e in zip(*row) if p]
                for row in zip(ids, scores, titles, probability)]

    def _search_filtered(self, queries: tf.Tensor, k: int, filters: list[Filters]) -> tuple[tf.Tensor, tf.Tensor]:
        """`(scores, rows)` [B, k] of the products each query's `filters` keeps: ScaNN over-fetched, or exact."""
        if self._product_filter is None:
            self._product_filter = (ProductFilter(self.product_ids, self.attributes),
                                    tf.constant(self.vectors, tf.float32))
        product_filter, vectors = self._product_filter
        inputs = as_tensors(batch_arrays(filters))
        k = min(k, len(self.product_ids))
        if self._scann is not None:
            return self._scann.search_filtered(queries, k, inputs, product_filter, vectors)
        return exact_filtered_top_k(queries, vectors, inputs, k, product_filter, PAD_SCORE)

    def export(self, base: str, name: str = "q2e", k: int | None = None, scann: bool | None = None, log=None) -> dict:
        """Writes this retriever's model and products for TensorFlow Serving (`tf_q2e.savedmodels.export`):
        `BASE/<name>/<version>` (stock ops), with `scann` (default: when this retriever searches with
        ScaNN) also `BASE/<name>_scann/<version>`, and `BASE/models.config`."""
        from tf_q2e.savedmodels import export as export_models

        return export_models(self, base, name=name, k=k, scann=self._scann is not None if scann is None else scann,
                             log=log)


def _scann_top_k(state, product_ids, options: ScannOptions, k: int) -> ScannTopK:
    return ScannTopK(state, [str(v) for v in product_ids], options, k=k)


def _version_dir(path: str) -> str:
    """`path` itself when it holds a saved_model.pb, else its newest integer version subdirectory."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted((int(v) for v in os.listdir(path) if v.isdigit()), reverse=True) if os.path.isdir(path) else []
    for v in versions:
        if os.path.exists(os.path.join(path, str(v), "saved_model.pb")):
            return os.path.join(path, str(v))
    raise InputError(f"{path}: not a SavedModel (no saved_model.pb) nor a model directory with integer versions")


__all__ = ["Hit", "Retriever"]
