"""The retrievers an evaluation compares, behind one interface.

A retriever has a `name`, `search(judged, k)` (the top k product ids of each
query, "" where it has fewer), `score_pairs(judged)` (a score per judged
pair, for the AUCs and NDCG) and `random_pair_scores(judged, rng)`:

* `DenseRetriever`: a trained run's towers, exact search over the product
  vectors (`dense_retriever_for_run` builds one from a run directory);
* `BM25Retriever`: the lexical baseline (`tf_q2e.bm25`);
* `HybridRetriever`: both fused by reciprocal rank fusion
  (`reciprocal_rank_fusion`, full-catalogue ranks from `catalogue_ranks`);
* `PretrainedRetriever`: zero-shot all-MiniLM-L6-v2, exact search by the
  cosine of the query's and the product text's sentence vectors;
* `LateFusionRetriever`: a run and zero-shot MiniLM, scores added:
  q·d + w × cosine.

`DenseRetriever` and `PretrainedRetriever` are `VectorRetriever`s (exact
search over product vectors); the fused ones score the whole catalogue
through their parts' `catalogue_scores`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from tf_q2e import metrics as M
from tf_q2e.data import schema as S
from tf_q2e.data.validate import dataset_files
from tf_q2e.errors import InputError
from tf_q2e.judged import Judged

class _PairsByProduct:
    """`score_pairs` and `random_pair_scores` of a retriever that scores any (query, product id) pairs of a
    split with `pair_scores(judged, product_ids [R])` (one per judged row) and has `product_ids`."""

    def score_pairs(self, judged: Judged) -> np.ndarray:
        return self.pair_scores(judged, judged.row_product)

    def random_pair_scores(self, judged: Judged, rng: np.random.Generator) -> np.ndarray:
        """Each judged row's query with a product drawn uniformly from the catalogue."""
        products = self.product_ids[rng.integers(0, len(self.product_ids), size=len(judged.row_query))]
        return self.pair_scores(judged, products)


class VectorRetriever(_PairsByProduct):
    """Exact search over a catalogue's product vectors [N, D] by the dot product with query vectors.

    Subclasses give `query_vectors(judged)`: `(vectors [Q, D], biases [Q])` of
    the split's distinct queries. Search ranks by q·d; pair scores (the
    engagement AUCs, NDCG) are q·d + b_q.
    """

    def __init__(self, product_ids: np.ndarray, vectors: np.ndarray, name: str):
        self.name = name
        self.product_ids = np.asarray(product_ids, dtype=object)
        self.vectors = vectors
        self.position = {p: i for i, p in enumerate(self.product_ids)}
        self._cached: tuple[Judged, np.ndarray, np.ndarray] | None = None  # the last split's query vectors, biases

    def query_vectors(self, judged: Judged) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def search(self, judged: Judged, k: int) -> np.ndarray:
        from tf_q2e.index import exact_top_k

        _, rows = exact_top_k(self.vectors, self._queries(judged), k)
        return self.product_ids[rows]

    def pair_vectors(self, judged: Judged) -> tuple[np.ndarray, np.ndarray]:
        """The query and product vector of each judged pair: float32 [R, D] each."""
        return self._queries(judged)[judged.row_query], self.vectors[self._rows(judged.row_product)]

    def pair_scores(self, judged: Judged, product_ids: np.ndarray) -> np.ndarray:
        """q·d + b_q of each judged row's query with `product_ids` [R], float32 [R]."""
        return (np.einsum("rd,rd->r", self._queries(judged)[judged.row_query], self.vectors[self._rows(product_ids)])
                + self._biases(judged)[judged.row_query])

    def catalogue_scores(self, judged: Judged, start: int, stop: int) -> np.ndarray:
        """q·d of every catalogue product (in `product_ids` order) for the split's distinct queries
        `start:stop`, float32 [stop - start, N]."""
        return self._queries(judged)[start:stop] @ self.vectors.T

    def _queries(self, judged: Judged) -> np.ndarray:
        """The split's query vectors, computed once for search, pair scores and in-batch recall."""
        if self._cached is None or self._cached[0] is not judged:
            self._cached = (judged, *self.query_vectors(judged))
        return self._cached[1]

    def _biases(self, judged: Judged) -> np.ndarray:
        """The split's query biases b_q [Q] (zeros without `model.query_bias`, and for MiniLM)."""
        self._queries(judged)
        return self._cached[2]

    def _rows(self, product_ids: np.ndarray) -> np.ndarray:
        return catalogue_rows(self.position, product_ids)


class DenseRetriever(VectorRetriever):
    """A trained run's towers: exact search over the catalogue's product vectors.

    Search ranks by the dot product q·d; pair scores (the engagement AUCs,
    NDCG) are the engagement task's score q·d + b_q, b_q the query bias (0
    without `model.query_bias`), and `engagement_probabilities` its σ(s_e·score + b).
    """

    def __init__(self, model, product_ids: np.ndarray, vectors: np.ndarray, name: str = "dense"):
        import tensorflow as tf

        super().__init__(product_ids, vectors, name)
        self.model = model
        self._tf = tf

    def query_vectors(self, judged: Judged, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """`(vectors [Q, D] float32, query biases [Q] float32)` of the split's distinct queries."""
        tf = self._tf
        vectors, biases = [], []
        for start in range(0, len(judged.queries), batch):
            features = {S.QUERY: tf.constant(judged.queries[start:start + batch])}
            features.update({c: tf.constant(v[start:start + batch]) for c, v in judged.contexts.items()})
            v, b = self.model.query_tower(features, training=False, return_bias=True)
            vectors.append(v.numpy())
            biases.append(b.numpy())
        return np.concatenate(vectors).astype(np.float32), np.concatenate(biases).astype(np.float32)

    def engagement_probabilities(self, judged: Judged) -> np.ndarray:
        """σ(s_e·(q·d + b_q) + b) of each judged pair: the engagement task's probability, float32 [R]."""
        return self.model.engagement.probability(self._tf.constant(self.score_pairs(judged))).numpy()

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


def catalogue_positions(*retrievers) -> list[dict]:
    """`{product id: row}` of each retriever's `product_ids`; ValueError unless all hold the same products."""
    positions = [{p: i for i, p in enumerate(r.product_ids)} for r in retrievers]
    if any(p.keys() != positions[0].keys() for p in positions[1:]):
        sizes = ", ".join(f"{r.name} {len(p)} products" for r, p in zip(retrievers, positions))
        raise ValueError(f"the retrievers index different catalogues ({sizes}); build them from the same one")
    return positions


def catalogue_rows(position: dict, product_ids) -> np.ndarray:
    """int64 [R]: each product id's row in a catalogue (`position`: id -> row); InputError for an unknown id."""
    try:
        return np.fromiter((position[p] for p in product_ids), dtype=np.int64, count=len(product_ids))
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


class HybridRetriever(_PairsByProduct):
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
    O(64 · N) floats. `random_pair_scores` costs the same again.

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
        self._positions = catalogue_positions(dense, bm25)

    def search(self, judged: Judged, k: int) -> np.ndarray:
        depth = max(self.depth, int(k))
        rankings = [self.dense.search(judged, depth), self.bm25.search(judged, depth)]
        return reciprocal_rank_fusion(rankings, min(int(k), len(self.product_ids)), self.k_rrf)[0]

    def pair_scores(self, judged: Judged, product_ids: np.ndarray) -> np.ndarray:
        """RRF of each judged row's query with `product_ids` [R] from full-catalogue ranks, float64 [R]."""
        scores = np.zeros(len(judged.row_query), np.float64)
        for retriever, position in zip((self.dense, self.bm25), self._positions):
            scores += 1.0 / (self.k_rrf + catalogue_ranks(retriever, judged, catalogue_rows(position, product_ids)))
        return scores


PRETRAINED_NAME = "minilm (zero-shot)"
MINILM_MAX_TOKENS = 64  # model.max_tokens' default


class _MiniLM:
    """all-MiniLM-L6-v2 as one traced function `[n]` strings → `[n, 384]` unit vectors, loaded on first call
    (a text cache that holds every text needs no encoder)."""

    def __init__(self, max_tokens: int, path: str | None = None):
        self.max_tokens, self.path = max_tokens, path
        self._encode = None

    def __call__(self, texts):
        if self._encode is None:
            import tensorflow as tf

            from tf_q2e.pretrained.bert import SentenceEncoder
            from tf_q2e.pretrained.files import MiniLMFiles

            encoder = SentenceEncoder.from_files(MiniLMFiles.locate(self.path), self.max_tokens)
            self._encode = tf.function(lambda batch: encoder(batch), input_signature=[tf.TensorSpec([None], tf.string)])
        return self._encode(texts)


class PretrainedRetriever(VectorRetriever):
    """Zero-shot all-MiniLM-L6-v2 (`tf_q2e.pretrained`): exact search by the cosine of the sentence
    encoder's vectors of the raw query and of the product's text (title and description joined with
    " ", as the product tower's `PretrainedText` forms it). Pair scores are the same cosine (no bias).

    The vectors go through a `TextEmbeddingCache` (`text_vectors(texts, what)`; `for_data`): one on
    disk, shared with trained runs (`train.text_cache`) and later comparisons, or one in memory. Either
    keeps float16 vectors, normalised again when read, so a cache directory changes the time only.
    """

    def __init__(self, product_ids: np.ndarray, vectors: np.ndarray, text_vectors, name: str = PRETRAINED_NAME):
        super().__init__(product_ids, vectors, name)
        self.text_vectors = text_vectors

    @classmethod
    def for_data(cls, data_dir: str, max_tokens: int = MINILM_MAX_TOKENS, cache_root: str | None = None,
                 minilm_path: str | None = None, on_bad_rows: str = "error", log=None) -> "PretrainedRetriever":
        """The retriever over a data set's catalogue, its product texts encoded now (those `cache_root`'s
        `minilm-L6-T<max_tokens>` cache lacks; every one without `cache_root`); `log` gets progress lines."""
        from tf_q2e.bm25 import read_catalog
        from tf_q2e.pretrained.cache import TextEmbeddingCache, variant_name
        from tf_q2e.pretrained.files import ARCHITECTURE
        from tf_q2e.pretrained.modality import product_texts

        catalog = read_catalog(dataset_files(data_dir)[0], on_bad_rows)
        cache = (TextEmbeddingCache.open(cache_root, variant_name(ARCHITECTURE["layers"], max_tokens)) if cache_root
                 else TextEmbeddingCache.in_memory(ARCHITECTURE["width"]))
        encode, log = _MiniLM(max_tokens, minilm_path), log or _stderr

        def text_vectors(texts, what: str) -> np.ndarray:
            cache.fill(texts, encode, what, log)
            vectors = cache.lookup(texts)
            return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

        ids = catalog.column(S.PRODUCT_ID).to_pylist()
        return cls(ids, text_vectors(product_texts(catalog), "product texts"), text_vectors)

    def query_vectors(self, judged: Judged) -> tuple[np.ndarray, np.ndarray]:
        """`(unit vectors [Q, 384] float32, zeros [Q])` of the split's distinct queries (their context plays no part)."""
        return self.text_vectors(judged.queries, "queries"), np.zeros(len(judged.queries), np.float32)


class LateFusionRetriever(_PairsByProduct):
    """A trained run and zero-shot MiniLM, their scores added: `score(q, p) = q·d + w × cos(q, p)`.

    * `search(judged, k)`: exact search over the whole catalogue by
      `q·d + w × cos` (both retrievers' `catalogue_scores`, `_RANK_CHUNK`
      queries at a time: memory O(_RANK_CHUNK · N)); `search_weights` does it
      for several w at once, each chunk's scores computed once.
    * `score_pairs` / `random_pair_scores`: `q·d + b_q + w × cos`, the run's
      pair score (its engagement score) plus w × the cosine.

    w = 0 is the run's own ranking; as w grows it tends to zero-shot MiniLM's.

    Args:
      dense: the run's `DenseRetriever` (anything with `product_ids`,
        `catalogue_scores` and `pair_scores`).
      pretrained: a `PretrainedRetriever` over the same catalogue.
      weight: w (>= 0).
      name: the report's model name (default `late fusion: <run> + <w> × minilm`).
    """

    def __init__(self, dense, pretrained, weight: float, name: str | None = None):
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"the fusion weight ({weight!r}) must be a finite number >= 0")
        self.dense, self.pretrained, self.weight = dense, pretrained, float(weight)
        self.name = name or f"late fusion: {dense.name} + {weight:g} × minilm"
        self.product_ids = np.asarray(dense.product_ids, dtype=object)
        self._columns = catalogue_rows(catalogue_positions(dense, pretrained)[1], self.product_ids)

    def search(self, judged: Judged, k: int) -> np.ndarray:
        return self.search_weights(judged, k, [self.weight])[0]

    def search_weights(self, judged: Judged, k: int, weights) -> list[np.ndarray]:
        """`search` with each fusion weight of `weights`: one `[Q, min(k, N)]` array of ids per weight."""
        from tf_q2e.index import top_k

        k = min(int(k), len(self.product_ids))
        found = [np.empty((len(judged.queries), k), dtype=object) for _ in weights]
        for start in range(0, len(judged.queries), _RANK_CHUNK):
            stop = min(start + _RANK_CHUNK, len(judged.queries))
            dense, text = self._catalogue_parts(judged, start, stop)
            for ids, weight in zip(found, weights):
                ids[start:stop] = self.product_ids[top_k(dense + np.float32(weight) * text, k)[1]]
        return found

    def catalogue_scores(self, judged: Judged, start: int, stop: int) -> np.ndarray:
        """`q·d + w × cos` of every catalogue product (in `product_ids` order) for the split's distinct
        queries `start:stop`, float32 [stop - start, N]."""
        dense, text = self._catalogue_parts(judged, start, stop)
        return dense + np.float32(self.weight) * text

    def pair_scores(self, judged: Judged, product_ids: np.ndarray) -> np.ndarray:
        """`q·d + b_q + w × cos` of each judged row's query with `product_ids` [R]."""
        return (self.dense.pair_scores(judged, product_ids)
                + np.float32(self.weight) * self.pretrained.pair_scores(judged, product_ids))

    def _catalogue_parts(self, judged: Judged, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The run's q·d and MiniLM's cosine of the queries `start:stop`, both [C, N] in `product_ids` order."""
        return (self.dense.catalogue_scores(judged, start, stop),
                self.pretrained.catalogue_scores(judged, start, stop)[:, self._columns])


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def dense_retriever_for_run(run_dir: str, data_dir: str | None = None, log=None):
    """`(retriever, data_dir, model)` of a run: its product vectors from `RUN/index/` when that index
    covers the data set's catalogue, else embedded now (said through `log`, when given)."""
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
        if log is not None:
            log(f"embedding the catalogue {catalog} (no index of it in {run_dir})")
        ids, _, vectors, _ = embed_catalog(model, catalog, model.config.index.batch_size, model.config.data.on_bad_rows)
    name = os.path.basename(os.path.normpath(run_dir))
    return DenseRetriever(model, ids, vectors, name=name), data_dir, model

