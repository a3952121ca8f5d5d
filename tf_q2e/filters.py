"""Filters at lookup time: allow-lists of product attributes, excluded products, crowding.

A marketplace never retrieves from the whole catalogue unconditionally
(Que2Search's retrieval runs "AND with location and other constraints"). A
`Filters` holds one query's restricts (a request may give each query its own):

    Filters(categories=("rugs",), countries=("US", "CA"), exclude=("p1", "p7"),
            max_per_category=3, max_per_seller=2)

* an allow-list (`categories`, `countries`) keeps the products whose
  attribute is one of its values; an empty list allows every product; a value
  no product has matches none (the result is then short, never wrong); ""
  is no value (it pads the lists of a batch), so an allow-list cannot ask
  for the products that lack the attribute;
* `exclude` lists product ids never to return (already shown, sold, blocked);
* crowding (`max_per_category`, `max_per_seller`; 0 = off) keeps at most N
  results per category or seller, the best-scored first, and fills the list
  with the next products — as Vertex AI Matching Engine's `crowding_tag`.

The attributes are catalogue columns: `product_category`, and
`product_country` and `product_seller` where the catalogue has them ("" for
each product otherwise). `ProductFilter` holds them as integer codes inside
the graph, so the exported signatures filter with stock TensorFlow ops:
exact search applies `mask` (one `[B, N]` gather per attribute: exact search
costs O(N) anyway), ScaNN checks the restricts at its candidates only
(`keeps`); `crowd` ranks each candidate within its category (a sort of the C
candidates searched); the search widens (doubling C) until every query keeps
k or the candidates run out.

Results fewer than k (a restrictive filter, strict crowding) are padded as
unfiltered ones are: product id "", score `PAD_SCORE`, index -1.

The signature inputs (`FILTER_SPEC`) have the batch dimension first, as every
input of a TensorFlow Serving request must for its batching: `categories`,
`countries`, `exclude_product_ids` [B, M] string ("" pads a row),
`max_per_category`, `max_per_seller` [B] int32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tf_q2e.data import schema as S
from tf_q2e.errors import InputError

# Filter attribute -> catalogue column.
ATTRIBUTES = {"category": S.PRODUCT_CATEGORY, "country": S.PRODUCT_COUNTRY, "seller": S.PRODUCT_SELLER}
# How many candidates a crowded search ranks per result asked for (crowding drops the surplus of a category).
CROWDING_CANDIDATES_PER_RESULT = 10
PAD_INDEX = -1


@dataclass(frozen=True)
class Filters:
    """One request's restricts (see the module docstring); the default filters nothing."""

    categories: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_per_category: int = 0
    max_per_seller: int = 0

    def __post_init__(self):
        for name in ("categories", "countries", "exclude"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)):
                raise InputError(f"filters.{name} must be a list of strings, not one string {values!r}: pass [{values!r}]")
            values = tuple(values)
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise InputError(f"filters.{name}[{bad}] is {type(values[bad]).__name__} {values[bad]!r}, not a string")
            object.__setattr__(self, name, values)
        for name in ("max_per_category", "max_per_seller"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"filters.{name} must be an integer, 0 (no crowding) or more; got {value!r}")

    @property
    def active(self) -> bool:
        return bool(self.categories or self.countries or self.exclude or self.max_per_category or self.max_per_seller)

    def arrays(self, batch: int = 1) -> dict[str, np.ndarray]:
        """This filter for each of `batch` queries, as the inputs of a `*_filtered` signature (`FILTER_SPEC`)."""
        return batch_arrays([self] * batch)

    def inputs(self, batch: int = 1) -> dict[str, tf.Tensor]:
        """`arrays` as tensors."""
        return as_tensors(self.arrays(batch))


def batch_arrays(filters: list[Filters]) -> dict[str, np.ndarray]:
    """One `Filters` per query as the inputs of a `*_filtered` signature (text as objects, rows padded with "")."""
    def rows(name: str) -> np.ndarray:
        lists = [getattr(f, name) for f in filters]
        width = max((len(values) for values in lists), default=0)
        out = np.full((len(lists), width), "", dtype=object)
        for i, values in enumerate(lists):
            out[i, :len(values)] = values
        return out

    return {"categories": rows("categories"), "countries": rows("countries"), "exclude_product_ids": rows("exclude"),
            "max_per_category": np.array([f.max_per_category for f in filters], np.int32),
            "max_per_seller": np.array([f.max_per_seller for f in filters], np.int32)}


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, tf.Tensor]:
    return {name: tf.constant(value, FILTER_SPEC[name].dtype, shape=np.shape(value)) for name, value in arrays.items()}


def per_query(filters, batch: int) -> list[Filters] | None:
    """`batch` `Filters` of None, one `Filters` (or a mapping of its fields) for every query, or a list of one per
    query; None when nothing is filtered."""
    if filters is None:
        return None
    if isinstance(filters, (Filters, Mapping)):
        chosen = [as_filters(filters)] * batch
    elif isinstance(filters, (list, tuple)):
        if len(filters) != batch:
            raise InputError(f"filters has {len(filters)} entries for {batch} queries; give one for every query or one each")
        chosen = [as_filters(f) for f in filters]
    else:
        raise InputError(f"filters must be a tf_q2e.Filters, a mapping of its fields or a list of one per query, "
                         f"not {type(filters).__name__}")
    return chosen if any(f.active for f in chosen) else None


def as_filters(filters) -> Filters:
    """A `Filters` of None (no filter), a `Filters` or a mapping of its fields (a clear error otherwise)."""
    if filters is None or isinstance(filters, Filters):
        return filters or Filters()
    if isinstance(filters, Mapping):
        unknown = [f for f in filters if f not in Filters.__dataclass_fields__]
        if unknown:
            raise InputError(f"filters: unknown field {unknown[0]!r} (fields: {', '.join(Filters.__dataclass_fields__)})")
        return Filters(**filters)
    raise InputError(f"filters must be a tf_q2e.Filters or a mapping of its fields, not {type(filters).__name__}")


# The filter inputs of the `retrieval_filtered` / `retrieval_exact_filtered` signatures.
FILTER_SPEC = {
    "categories": tf.TensorSpec([None, None], tf.string, name="categories"),
    "countries": tf.TensorSpec([None, None], tf.string, name="countries"),
    "exclude_product_ids": tf.TensorSpec([None, None], tf.string, name="exclude_product_ids"),
    "max_per_category": tf.TensorSpec([None], tf.int32, name="max_per_category"),
    "max_per_seller": tf.TensorSpec([None], tf.int32, name="max_per_seller"),
}


def catalogue_attributes(tables_or_columns: dict, n: int) -> dict[str, np.ndarray]:
    """`{attribute: [n] object array of str}` from catalogue columns (absent columns: "" everywhere)."""
    out = {}
    for attribute, column in ATTRIBUTES.items():
        values = tables_or_columns.get(column)
        out[attribute] = (np.full(n, "", dtype=object) if values is None
                          else np.asarray([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], object))
    return out


def _codes(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct values (sorted) and each value's position among them, int32 [N]."""
    vocabulary, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    return [str(v) for v in vocabulary], codes.astype(np.int32)


class ProductFilter(tf.Module):
    """The catalogue's filter attributes in the graph: `mask` and `crowd` with stock ops.

    Args:
      product_ids: [N] the products' ids, row i of the index.
      attributes: `{attribute: [N] str}` (`catalogue_attributes`); missing attributes are "".
    """

    def __init__(self, product_ids, attributes: dict[str, np.ndarray] | None = None, name: str = "product_filter"):
        super().__init__(name=name)
        n = len(product_ids)
        attributes = attributes or {}
        self.size = n
        self.codes, self.tables, self.vocabulary_sizes = {}, {}, {}
        self.counts, self.grouped, self.starts = {}, {}, {}
        for attribute in ATTRIBUTES:
            values = attributes.get(attribute)
            vocabulary, codes = _codes(np.full(n, "", dtype=object) if values is None else values)
            if len(codes) != n:
                raise InputError(f"the {attribute} attribute has {len(codes)} values for {n} products")
            self.codes[attribute] = tf.Variable(codes, trainable=False, name=f"{attribute}_codes")
            self.tables[attribute] = _lookup_table(vocabulary)
            self.vocabulary_sizes[attribute] = len(vocabulary)
            # The products grouped by value (rows of value v: grouped[starts[v]:starts[v + 1]]), and the counts.
            counts = np.bincount(codes, minlength=len(vocabulary)).astype(np.int32)
            self.counts[attribute] = tf.Variable(counts, trainable=False, name=f"{attribute}_counts")
            self.grouped[attribute] = tf.Variable(np.argsort(codes, kind="stable").astype(np.int32), trainable=False,
                                                  name=f"{attribute}_grouped_rows")
            self.starts[attribute] = tf.Variable(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
                                                 trainable=False, name=f"{attribute}_starts")
        self.rows = _lookup_table([str(p) for p in product_ids])

    def mask(self, categories: tf.Tensor, countries: tf.Tensor, exclude_product_ids: tf.Tensor) -> tf.Tensor:
        """`[B, N]` bool: per query, the products its allow-lists keep and its `exclude_product_ids` do not
        name (each input [B, M], "" = no value)."""
        keep = tf.logical_and(self._allowed("category", categories), self._allowed("country", countries))
        excluded = self._scatter(self.rows.lookup(exclude_product_ids), exclude_product_ids, self.size)  # [B, N]
        return tf.logical_and(keep, tf.logical_not(excluded))

    @staticmethod
    def _scatter(codes: tf.Tensor, values: tf.Tensor, size: int) -> tf.Tensor:
        """`[B, size]` bool: True at (b, codes[b, m]) for each given value (not "", known: code >= 0)."""
        present = tf.logical_and(codes >= 0, tf.strings.length(values) > 0)  # [B, M]
        where = tf.where(present)  # [P, 2]: (b, m)
        at = tf.stack([tf.cast(where[:, 0], tf.int32), tf.gather_nd(codes, where)], axis=1)
        hits = tf.scatter_nd(at, tf.ones([tf.shape(at)[0]], tf.int32), tf.stack([tf.shape(codes)[0], size]))
        return hits > 0

    def _allowed(self, attribute: str, values: tf.Tensor) -> tf.Tensor:
        allowed, given = self._flags(attribute, values)  # [B, V], [B]
        return tf.logical_or(tf.logical_not(given)[:, tf.newaxis], tf.gather(allowed, self.codes[attribute], axis=1))

    def _flags(self, attribute: str, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """`([B, V] allowed values, [B] whether an allow-list is given)` of an allow-list input [B, M]."""
        allowed = self._scatter(self.tables[attribute].lookup(values), values, self.vocabulary_sizes[attribute])
        return allowed, tf.reduce_any(tf.strings.length(values) > 0, axis=1)

    def keeps(self, rows: tf.Tensor, categories: tf.Tensor, countries: tf.Tensor,
              exclude_product_ids: tf.Tensor) -> tf.Tensor:
        """`[B, C]` bool: whether each query keeps each of its candidates `rows` [B, C] (-1 = none): `mask`
        at the candidates only, O(B C) instead of O(B N)."""
        keep = rows >= 0
        safe = tf.maximum(rows, 0)
        for attribute, values in (("category", categories), ("country", countries)):
            allowed, given = self._flags(attribute, values)
            hit = tf.gather(allowed, tf.gather(self.codes[attribute], safe), batch_dims=1)  # [B, C]
            keep = tf.logical_and(keep, tf.logical_or(tf.logical_not(given)[:, tf.newaxis], hit))
        excluded = self.rows.lookup(exclude_product_ids)  # [B, M], -1 for "" and unknown ids
        named = tf.reduce_any(tf.equal(safe[:, :, tf.newaxis], excluded[:, tf.newaxis, :]), axis=2)  # [B, C]
        return tf.logical_and(keep, tf.logical_not(named))

    def share(self, categories: tf.Tensor, countries: tf.Tensor, exclude_product_ids: tf.Tensor) -> tf.Tensor:
        """`[B]` float32: the share of the catalogue each query's restricts keep, from the value counts (the two
        allow-lists taken as independent; it sizes the search, never decides what is returned)."""
        share = 1.0
        for attribute, values in (("category", categories), ("country", countries)):
            allowed, given = self._flags(attribute, values)
            kept = tf.reduce_sum(tf.cast(allowed, tf.float32) * tf.cast(self.counts[attribute], tf.float32), axis=1)
            share *= tf.where(given, kept / max(self.size, 1), 1.0)
        excluded = tf.reduce_sum(tf.cast(self.rows.lookup(exclude_product_ids) >= 0, tf.float32), axis=1)
        return tf.maximum(share - excluded / max(self.size, 1), 0.0)

    def candidate_rows(self, categories: tf.Tensor, countries: tf.Tensor) -> tf.Tensor:
        """`[M]` int32: the products of the values some query of the batch allows, through the first
        attribute with an allow-list (the rows grouped by value: no scan of the catalogue); every product
        when no query gives one. A superset of what `keeps` keeps."""
        def of(attribute, values):
            allowed, _ = self._flags(attribute, values)
            codes = tf.cast(tf.where(tf.reduce_any(allowed, axis=0))[:, 0], tf.int32)  # the values allowed
            starts = tf.gather(self.starts[attribute], codes)
            ends = tf.gather(self.starts[attribute], codes + 1)
            return tf.gather(self.grouped[attribute], tf.ragged.range(starts, ends).flat_values)

        every = tf.range(self.size, dtype=tf.int32)
        category_given = tf.reduce_all(tf.reduce_any(tf.strings.length(categories) > 0, axis=1))
        country_given = tf.reduce_all(tf.reduce_any(tf.strings.length(countries) > 0, axis=1))
        return tf.cond(category_given, lambda: of("category", categories),
                       lambda: tf.cond(country_given, lambda: of("country", countries), lambda: every))

    def crowd(self, indices: tf.Tensor, max_per_category: tf.Tensor, max_per_seller: tf.Tensor) -> tf.Tensor:
        """`[B, C]` bool: candidates (`indices` [B, C], best first, -1 = none) kept when each category and
        seller keeps its best `max_per_*` ([B]; 0 = no limit). With both limits, a candidate dropped for its
        seller still counts towards its category's limit."""
        keep = indices >= 0
        for attribute, limit in (("category", max_per_category), ("seller", max_per_seller)):
            def limited(keep=keep, attribute=attribute, limit=tf.reshape(limit, [-1, 1])):  # [B, 1]
                codes = tf.where(keep, tf.gather(self.codes[attribute], tf.maximum(indices, 0)), -1)  # [B, C]
                return tf.logical_and(keep, tf.logical_or(limit <= 0, rank_within_group(codes) < limit))

            keep = tf.cond(tf.reduce_any(limit > 0), limited, lambda keep=keep: keep)  # no sort without a limit
        return keep


def rank_within_group(codes: tf.Tensor) -> tf.Tensor:
    """`[B, C]` int32: how many entries before each one in its row carry the same code (O(C log C))."""
    order = tf.argsort(codes, axis=1, stable=True)  # grouped by code, in row order within a group
    grouped = tf.gather(codes, order, batch_dims=1)
    first = tf.searchsorted(grouped, grouped, side="left", out_type=tf.int32)  # where each group starts
    rank = tf.range(tf.shape(codes)[1])[tf.newaxis, :] - first
    return tf.gather(rank, tf.argsort(order, axis=1), batch_dims=1)  # back to row order


def _lookup_table(keys: list[str]) -> tf.lookup.StaticHashTable:
    keys = keys or [""]  # an empty catalogue still builds a table
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string), tf.range(len(keys), dtype=tf.int32)),
        default_value=-1)


def check_request(max_per_category: tf.Tensor, max_per_seller: tf.Tensor) -> list:
    """Assertions that fail a request with INVALID_ARGUMENT (TensorFlow Serving) on a negative crowding limit."""
    return [tf.debugging.assert_non_negative(max_per_category, message="max_per_category must be 0 (no crowding) or more"),
            tf.debugging.assert_non_negative(max_per_seller, message="max_per_seller must be 0 (no crowding) or more")]


def compact(scores: tf.Tensor, indices: tf.Tensor, keep: tf.Tensor, k: int, pad_score: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The first `k` kept candidates of `(scores, indices)` [B, C] in order, padded to `[B, k]`."""
    c = tf.shape(indices)[1]
    position = tf.range(c)[tf.newaxis, :]
    order = tf.argsort(tf.where(keep, position, position + c), axis=1, stable=True)  # kept first, in order
    # A sentinel column C (dropped) stands in for the places past the candidates (C < k, or C = 0).
    order = tf.pad(order, [[0, 0], [0, tf.maximum(k - c, 0)]], constant_values=c)[:, :k]
    keep = tf.pad(keep, [[0, 0], [0, 1]], constant_values=False)
    kept = tf.gather(keep, order, batch_dims=1)
    scores = tf.where(kept, tf.gather(tf.pad(scores, [[0, 0], [0, 1]]), order, batch_dims=1),
                      tf.constant(pad_score, scores.dtype))
    indices = tf.where(kept, tf.gather(tf.pad(indices, [[0, 0], [0, 1]]), order, batch_dims=1), PAD_INDEX)
    return tf.reshape(scores, [-1, k]), tf.reshape(indices, [-1, k])


def widening_top_k(search, k: int, first: tf.Tensor, limit, crowding: tuple, product_filter: ProductFilter,
                   pad_score: float, widen) -> tuple[tf.Tensor, tf.Tensor]:
    """`(scores, indices)` [B, k]: the first k candidates of `search(c) -> (scores, indices)` [B, <= c]
    (best first, -1 = filtered out) that crowding keeps. `c` starts at `first`; where `widen` (a bool
    tensor) holds it doubles, up to `limit`, while a query keeps fewer than k."""
    def searched(c):  # ScaNN's op declares no shape
        return tuple(tf.ensure_shape(x, [None, None]) for x in search(c))

    c = tf.minimum(first, limit)
    scores, rows = searched(c)

    def short(c, scores, rows):
        found = tf.reduce_sum(tf.cast(product_filter.crowd(rows, *crowding), tf.int32), axis=1)
        return tf.logical_and(tf.logical_and(widen, c < limit), tf.reduce_any(found < k))

    def wider(c, scores, rows):
        c = tf.minimum(2 * c, limit)
        return (c, *searched(c))

    unknown = tf.TensorShape([None, None])
    c, scores, rows = tf.while_loop(short, wider, (c, scores, rows), shape_invariants=(c.shape, unknown, unknown))
    return compact(scores, rows, product_filter.crowd(rows, *crowding), k, pad_score)


def is_crowded(crowding: tuple) -> tf.Tensor:
    """Whether any query of the batch sets a crowding limit."""
    return tf.reduce_any(tf.logical_or(crowding[0] > 0, crowding[1] > 0))


def exact_filtered_top_k(queries: tf.Tensor, vectors: tf.Tensor, filters: dict, k: int, product_filter: ProductFilter,
                         pad_score: float) -> tuple[tf.Tensor, tf.Tensor]:
    """`(scores, indices)` [B, k] of brute-force search over the products each query's `filters` (a
    `*_filtered` signature's filter inputs) keep: its `mask` [B, N], crowded by its limits [B]."""
    mask = product_filter.mask(filters["categories"], filters["countries"], filters["exclude_product_ids"])
    crowding = (filters["max_per_category"], filters["max_per_seller"])
    scores = tf.matmul(queries, vectors, transpose_b=True)  # [B, N]
    scores = tf.where(mask, scores, tf.constant(-np.inf, scores.dtype))

    def search(c):
        top, rows = tf.math.top_k(scores, k=c)
        return top, tf.where(tf.math.is_finite(top), rows, PAD_INDEX)

    crowded = is_crowded(crowding)
    first = tf.where(crowded, k * CROWDING_CANDIDATES_PER_RESULT, k)
    # The mask is exact: k candidates are the top k unless crowding drops some.
    return widening_top_k(search, k, first, product_filter.size, crowding, product_filter, pad_score, crowded)


# ScaNN under a filter. A restrict keeping a share s of the products leaves about s·F of ScaNN's top F
# candidates, so the search asks for F = OVERFETCH × k / s (× the crowding candidates); and since the k
# nearest products that the restrict keeps lie further out than the unrestricted k nearest, a tree searches
# 1/√s times as many leaves (measured at 1M products: 10% kept needed about 3× the leaves and 4× the
# over-fetch for recall 0.95). Where a query still keeps fewer than k (the restrict's products score low for
# it: a sofa query among lamps) F doubles, up to MAX_FETCH. Below EXACT_BELOW_SHARE (or past MAX_FETCH at the
# start) the restrict is too selective for that and its products are scored exactly instead, found through the
# products grouped by value (no scan of the catalogue). The share comes from the value counts, and the
# restricts are checked at the candidates only: nothing here costs O(N) per query.
OVERFETCH = 4.0
EXACT_BELOW_SHARE = 0.02
MAX_FETCH = 20_000


def fetch_size(share: tf.Tensor, wanted: tf.Tensor, n: int) -> tf.Tensor:
    """The ScaNN candidates to ask for when `share` of the products match and `wanted` must remain."""
    fetch = tf.math.ceil(OVERFETCH * tf.cast(wanted, tf.float32) / tf.maximum(share, 1e-9))
    return tf.cast(tf.minimum(fetch, float(min(n, MAX_FETCH))), tf.int32)


def approximate_filtered_top_k(search, queries: tf.Tensor, vectors: tf.Tensor, filters: dict, k: int,
                               product_filter: ProductFilter, pad_score: float) -> tuple[tf.Tensor, tf.Tensor]:
    """`(scores, indices)` [B, k] through an approximate `search(queries, fetch, share) -> (scores, indices)`
    [B, F] (-1 = none; `share` widens the leaves searched) over-fetched by the share the batch's most
    selective query keeps, or exact over the products its allow-lists name when that share is below
    EXACT_BELOW_SHARE (see above). `filters` are a `*_filtered` signature's filter inputs; `vectors` [N, D]
    (float16 will do) serve the exact case."""
    n = product_filter.size
    restricts = (filters["categories"], filters["countries"], filters["exclude_product_ids"])
    crowding = (filters["max_per_category"], filters["max_per_seller"])
    share = tf.reduce_min(product_filter.share(*restricts))
    crowded = is_crowded(crowding)
    wanted = tf.where(crowded, k * CROWDING_CANDIDATES_PER_RESULT, k)
    selective = tf.logical_or(share < EXACT_BELOW_SHARE,
                              OVERFETCH * tf.cast(wanted, tf.float32) / tf.maximum(share, 1e-9) > MAX_FETCH)

    def exact():
        rows = product_filter.candidate_rows(filters["categories"], filters["countries"])  # [M]
        scores = tf.matmul(queries, tf.cast(tf.gather(vectors, rows), queries.dtype), transpose_b=True)  # [B, M]
        keep = product_filter.keeps(tf.broadcast_to(rows, tf.shape(scores)), *restricts)
        scores = tf.where(keep, scores, tf.constant(-np.inf, scores.dtype))

        def subset(c):
            top, positions = tf.math.top_k(scores, k=tf.minimum(c, tf.size(rows)))
            return tf.cast(top, tf.float32), tf.where(tf.math.is_finite(top), tf.gather(rows, positions), PAD_INDEX)

        return widening_top_k(subset, k, wanted, tf.size(rows), crowding, product_filter, pad_score, crowded)

    def approximate():
        def fetched(c):
            scores, rows = search(queries, tf.maximum(fetch_size(share, c, n), c), share)
            rows = tf.cast(rows, tf.int32)
            return tf.cast(scores, tf.float32), tf.where(product_filter.keeps(rows, *restricts), rows, PAD_INDEX)

        return widening_top_k(fetched, k, wanted, min(n, MAX_FETCH), crowding, product_filter, pad_score,
                              tf.constant(True))

    return tf.cond(selective, exact, approximate)
