"""Mined hard negatives joined to training batches: extra columns of the in-batch softmax.

`q2e mine` (`tf_q2e.mining`) writes, per training query, products ranked
highly for it but never shown for it. `MinedNegatives(file, products)` reads
that file (columns `query` and `product_id`; the rest is ignored), checks each
product against the catalogue and keeps each query's list in the file's order.
`attach(dataset, per_row, seed)` maps batches of impression rows: for each row
it draws `per_row` of its query's mined products at random, without
replacement (a new draw every step, the same for the same seed), and adds them
to the batch under `MINED` as a dict of product features, flattened row-major
to `[B · per_row]` (`product_image_embedding` `[B · per_row, image_dim]`):

    batch[MINED] = {"product_id": ..., "product_title": ..., ...}

A row whose query has fewer than `per_row` mined products (or none: a query
that was not mined, a pseudo-query) is padded with empty products whose
`product_id` is "": the softmax masks them (`ScaledSoftmaxRetrieval`'s
`extra_valid`). The model embeds the mined products with the product tower and
adds them as negatives of every row of the global batch; they never enter the
engagement task. Validation batches get none.

Only the products the file names are held (as tensors in the input
pipeline), so a large catalogue costs the size of its mined part.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tensorflow as tf

from tf_q2e.data import schema as S
from tf_q2e.data.pipeline import table_to_numpy
from tf_q2e.data.products import ProductReference
from tf_q2e.errors import DataError

# The batch key of the mined products' features.
MINED = "mined_negatives"
MINED_COLUMNS = ("query", S.PRODUCT_ID)
# Each row's query's row in the mined matrix, added before the query text is hashed (`mark`).
MINED_ROW = "mined_row"


class MinedNegatives:
    """A mined-negatives file (`q2e mine`'s Parquet) joined to a catalogue, ready to add to batches.

    Args:
      path: the Parquet file (`query`, `product_id` columns; one row per (query, negative)).
      products: the catalogue's products (`ImpressionPipeline.products`, or a catalogue read by a
        `tf_q2e.data.validate.Validator`).
      image_dim: length of `product_image_embedding` (0: the model takes no image).

    Raises `DataError` naming the file, row and value for a missing column, an empty query or
    product id, or a product the catalogue lacks, and for a file without rows.
    """

    def __init__(self, path: str, products: ProductReference, image_dim: int = 0):
        if not os.path.exists(path):
            raise DataError(f"data.mined_negatives: {path} does not exist (write it with q2e mine --run RUN --out {path})")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file of mined negatives ({e})") from e
        missing = [c for c in MINED_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: no {' or '.join(missing)} column (has {', '.join(table.column_names)}); "
                            "write it with q2e mine")
        if not table.num_rows:
            raise DataError(f"{path}: no mined negatives (mine with a larger --depth or --margin, or set "
                            "data.mined_negatives: null)")
        queries = table.column("query").cast(pa.string()).to_pylist()
        ids = table.column(S.PRODUCT_ID).cast(pa.string()).to_pylist()
        for name, values in (("query", queries), (S.PRODUCT_ID, ids)):
            bad = next((i for i, v in enumerate(values) if not v), None)
            if bad is not None:
                raise DataError(f"{path} row {bad}: {name} is empty")
        position = products.lookup(ids)
        unknown = np.flatnonzero(position < 0)
        if len(unknown):
            i = int(unknown[0])
            raise DataError(f"{path} row {i}: product_id {ids[i]!r} is not in the catalogue "
                            f"({len(unknown)} of {len(ids)} rows name unknown products; mine again from this data set)")
        # The distinct mined products (in catalogue order) and each row's index among them.
        distinct, rows = np.unique(position, return_inverse=True)
        self.path = path
        self.image_dim = int(image_dim)
        catalogue = products.table
        columns = [S.PRODUCT_ID] + [c for c in S.PRODUCT_TEXT_FIELDS if c in catalogue.column_names]
        if self.image_dim:
            if S.PRODUCT_IMAGE_EMBEDDING not in catalogue.column_names:
                raise DataError(f"{path}: the model takes image embeddings but the catalogue has none")
            columns.append(S.PRODUCT_IMAGE_EMBEDDING)
        # One empty product after the mined ones: what padding slots gather.
        self._products = table_to_numpy(catalogue.select(columns).take(pa.array(distinct)), columns, self.image_dim)
        for name, values in self._products.items():
            pad = np.zeros((1, self.image_dim), np.float32) if name == S.PRODUCT_IMAGE_EMBEDDING else np.array([""], object)
            self._products[name] = np.concatenate([values, pad])
        # Each query's mined products (file order), as rows of a [Q, K] matrix padded with -1.
        encoded = pc.dictionary_encode(pa.array(queries, pa.string()))
        codes = encoded.indices.to_numpy()
        order = np.argsort(codes, kind="stable")
        self.queries = encoded.dictionary.to_pylist()
        counts = np.bincount(codes, minlength=len(self.queries))
        self.max_per_query = int(counts.max())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sorted_codes = codes[order]
        slot = np.arange(len(order)) - starts[sorted_codes]
        self._candidates = np.full((len(self.queries), self.max_per_query), -1, np.int32)
        self._candidates[sorted_codes, slot] = rows[order]
        self.rows = len(ids)
        self.products = len(distinct)

    def __repr__(self) -> str:
        return (f"MinedNegatives({self.path!r}: {self.rows} negatives of {len(self.queries)} queries, "
                f"{self.products} distinct products, at most {self.max_per_query} per query)")

    def _table(self) -> tf.lookup.StaticHashTable:
        return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(self.queries, tf.string), tf.range(len(self.queries), dtype=tf.int64)), default_value=-1)

    def marker(self):
        """A function of a dict of impression rows (or of one row) that adds `MINED_ROW`, the row of each
        query's mined products (-1: none), for `ImpressionPipeline.dataset`'s `chunk_fn`: `attach` can
        then draw after the raw query was hashed away (`featurize`) and cached."""
        table = self._table()
        return lambda rows: {**rows, MINED_ROW: table.lookup(rows[S.QUERY])}

    def attach(self, dataset: tf.data.Dataset, per_row: int, seed: int = 0, featurize=None) -> tf.data.Dataset:
        """`dataset` (batches of impression rows: `query` `[B]`, or `MINED_ROW` from `marker`) with
        `per_row` mined products of each row's query under `MINED` (see the module docstring);
        `featurize` (e.g. the product tower's) is applied to them in the pipeline."""
        if per_row < 1:
            raise ValueError(f"model.mined_negatives_per_row ({per_row}) must be at least 1 to add mined negatives")
        key = _check_spec(dataset)
        table = self._table() if key == S.QUERY else None
        candidates = tf.constant(self._candidates)
        products = {name: tf.constant(values.astype(np.float32) if name == S.PRODUCT_IMAGE_EMBEDDING else values.tolist(),
                                      tf.float32 if name == S.PRODUCT_IMAGE_EMBEDDING else tf.string)
                    for name, values in self._products.items()}
        padding = len(self._products[S.PRODUCT_ID]) - 1
        draws = min(per_row, self._candidates.shape[1])

        def add(batch: dict, step_seed: tf.Tensor) -> dict:
            out = dict(batch)
            rows = table.lookup(batch[S.QUERY]) if table is not None else out.pop(MINED_ROW)  # [B], -1: none
            picked = tf.gather(candidates, tf.maximum(rows, 0))  # [B, K]
            picked = tf.where(rows[:, tf.newaxis] >= 0, picked, -1)
            noise = tf.random.stateless_uniform(tf.shape(picked), tf.stack([step_seed, tf.constant(seed, tf.int64)]))
            chosen = tf.math.top_k(tf.where(picked >= 0, noise, -1.0), k=draws).indices  # a draw without replacement
            picked = tf.gather(picked, chosen, batch_dims=1)  # [B, draws]
            if draws < per_row:
                picked = tf.pad(picked, [[0, 0], [0, per_row - draws]], constant_values=-1)
            flat = tf.reshape(picked, [-1])
            flat = tf.where(flat >= 0, flat, padding)
            mined = {name: tf.gather(values, flat) for name, values in products.items()}
            out[MINED] = featurize(mined) if featurize is not None else mined
            return out

        steps = tf.data.Dataset.random(seed=seed)
        return tf.data.Dataset.zip((dataset, steps)).map(add, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _check_spec(dataset: tf.data.Dataset) -> str:
    """The key `attach` finds each row's query by (`MINED_ROW` or `query`), after checking the dataset's elements."""
    spec = dataset.element_spec
    key = MINED_ROW if isinstance(spec, dict) and MINED_ROW in spec else S.QUERY
    if not isinstance(spec, dict) or key not in spec:
        raise ValueError("MinedNegatives.attach: the dataset's elements must be dicts of impression rows with a "
                         f"{S.QUERY!r} feature")
    if spec[key].shape.rank != 1:
        raise ValueError(f"MinedNegatives.attach: batch the dataset first (its {key!r} has shape "
                         f"{spec[key].shape}, not [B])")
    return key


def with_mined_negatives(dataset: tf.data.Dataset, path: str, catalog, per_row: int, seed: int = 0,
                         image_dim: int = 0, featurize=None) -> tf.data.Dataset:
    """`MinedNegatives(path, products, image_dim).attach(dataset, per_row, seed, featurize)` for a user's own
    `model.fit` script; `catalog` is a catalogue file or a `ProductReference`.

    Example:
        train = tf_q2e.data.from_dir("data", split="train").shuffle(100_000).batch(768, drop_remainder=True)
        train = tf_q2e.data.with_mined_negatives(train, "runs/hd/mined_negatives.parquet", "data/catalog.parquet",
                                                 per_row=cfg.model.mined_negatives_per_row)
        model.fit(train, epochs=2)
    """
    if not isinstance(catalog, ProductReference):
        from tf_q2e.data.validate import Validator

        validator = Validator(on_bad_rows="skip", image_dim=image_dim or None)
        validator.load_catalog(catalog)
        catalog = validator.products
    return MinedNegatives(path, catalog, image_dim).attach(dataset, per_row, seed, featurize)
