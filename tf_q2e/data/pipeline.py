"""The `tf.data` input pipeline: files -> validated rows -> shuffled batches.

Text stays raw strings: featurization happens inside the model graph, so a
SavedModel takes the same raw strings at serving time.

Flow per input pipeline (one per worker under multi-worker training):

    work units (Parquet row groups, or whole files of other formats)
      -> shard units across input pipelines (rows, when there are fewer units)
      -> shuffle unit order every epoch (training)
      -> interleave: stream each unit through `Validator` (bad rows dropped or
         raised); in training its rows are permuted (a new order every epoch)
         and cut into chunks of CHUNK_ROWS rows
      -> shuffle chunks (buffer of `shuffle_buffer` rows) -> rebatch to the
         batch size (drop_remainder for training) -> prefetch

Shuffling moves chunks of rows and `rebatch` cuts batches out of chunks, so
no step of the pipeline handles rows one at a time: a row-level
unbatch/shuffle/batch was the bottleneck of training on 2 cores. A batch then
holds a random sample of the rows of one or two row groups (65,536 rows each
in files that `DatasetWriter` writes): if the rows of a row group are alike
(a file sorted by category, say), shuffle the file once before training.

A Parquet file far larger than memory streams: at most `cycle_length` row
groups are read at a time, plus the shuffle buffer.

Each element is a dict of `[B]` string tensors (`query`, `query_<context>`,
`product_id`, `product_title`, `product_description`, `product_category`),
`product_image_embedding` `[B, image_dim]` float32 when the data has images,
`engaged` `[B]` int32 (1, 0, or -1 for no engagement label) and, when asked
for, `relevance` `[B]` float32 (NaN where ungraded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import tensorflow as tf

from tf_q2e.data import schema as S
from tf_q2e.data.formats import file_format, parquet_row_groups
from tf_q2e.data.products import ProductReference
from tf_q2e.data.validate import Validator, split_file
from tf_q2e.errors import DataError


# Rows per element between reading and batching: shuffling and batching move chunks, not rows.
CHUNK_ROWS = 256


@dataclass(frozen=True)
class _Unit:
    path: str
    row_group: int | None  # None: the whole file


def _units(files: list[str]) -> list[_Unit]:
    units = []
    for path in files:
        if file_format(path) == "parquet":
            units += [_Unit(path, g) for g in range(len(parquet_row_groups(path)))]
        else:
            units.append(_Unit(path, None))
    return units


class ImpressionPipeline:
    """Builds `tf.data.Dataset`s of impression batches from canonical files.

    Args:
      files: impression files (any supported format); Parquet is streamed by row group.
      catalog: the catalogue file, or the `products` of another pipeline over
        the same catalogue (read once, shared); when given, impression rows are
        checked against it (unknown product, conflicting fields).
      on_bad_rows: "error" raises `DataError` at a bad row; "skip" drops it
        (run `q2e validate` or `validate_dataset` first to record what is dropped).
      image_dim: expected image embedding length (None: as in the data).
      with_relevance: also yield `relevance`.
    """

    def __init__(
        self,
        files: list[str],
        catalog: str | ProductReference | None = None,
        on_bad_rows: str = "error",
        image_dim: int | None = None,
        with_relevance: bool = False,
    ):
        if not files:
            raise DataError("no impression files given")
        self.files = list(files)
        self.on_bad_rows = on_bad_rows
        self.with_relevance = with_relevance
        self._template = Validator(on_bad_rows=on_bad_rows, image_dim=image_dim)
        if isinstance(catalog, ProductReference):
            self._template.products = catalog
        elif catalog is not None:
            self._template.load_catalog(catalog)
        # Fix the context columns and the image length from the first file.
        first_rows = next(self._template.iter_file(self.files[0], "impressions", batch_rows=64), None)
        if first_rows is None:
            raise DataError(f"{self.files[0]}: no usable rows")
        self.columns = [c for c in first_rows.column_names if with_relevance or c != S.RELEVANCE]
        self.image_dim = self._template.image_dim if S.PRODUCT_IMAGE_EMBEDDING in self.columns else 0
        self.units = _units(self.files)

    @property
    def products(self) -> ProductReference:
        """The catalogue's products as read by this pipeline (frozen when a catalogue was given)."""
        return self._template.products

    @property
    def element_spec(self) -> dict[str, tf.TensorSpec]:
        """Spec of one row (unbatched)."""
        spec = {}
        for c in self.columns:
            if c == S.PRODUCT_IMAGE_EMBEDDING:
                spec[c] = tf.TensorSpec([self.image_dim], tf.float32)
            elif c == S.ENGAGED:
                spec[c] = tf.TensorSpec([], tf.int32)
            elif c == S.RELEVANCE:
                spec[c] = tf.TensorSpec([], tf.float32)
            else:
                spec[c] = tf.TensorSpec([], tf.string)
        return spec

    def _validator(self) -> Validator:
        v = Validator(on_bad_rows=self.on_bad_rows, image_dim=self._template.image_dim,
                      context_columns=self._template.context_columns)
        v.has_image = self._template.has_image
        # A frozen catalogue is read-only, so threads share it; without one each unit checks itself.
        v.products = self.products if self.products.frozen else ProductReference()
        return v

    def _read_unit(self, index, seed) -> "iter":
        """Chunks of CHUNK_ROWS rows of one unit; with seed >= 0 its rows in a random order."""
        unit = self.units[int(index)]
        kwargs = {} if unit.row_group is None else {"row_groups": [unit.row_group]}
        validator = self._validator()
        rng = np.random.default_rng(int(seed)) if seed >= 0 else None
        for table in validator.iter_file(unit.path, "impressions", **kwargs):
            arrays = table_to_numpy(table, self.columns, self.image_dim)
            if rng is not None:
                order = rng.permutation(table.num_rows)
                arrays = {k: v[order] for k, v in arrays.items()}
            for start in range(0, table.num_rows, CHUNK_ROWS):
                yield {k: v[start : start + CHUNK_ROWS] for k, v in arrays.items()}

    def dataset(
        self,
        batch_size: int,
        training: bool,
        shuffle_buffer: int = 100_000,
        seed: int = 0,
        input_context: tf.distribute.InputContext | None = None,
        cycle_length: int = 2,
        drop_remainder: bool | None = None,
        repeat: bool = False,
        chunk_fn=None,
        cache: str | None = None,
    ) -> tf.data.Dataset:
        """Batches of rows.

        Args:
          batch_size: rows per batch (per input pipeline: with
            `distribute_datasets_from_function` pass the per-replica size,
            `input_context.get_per_replica_batch_size(global)`).
          training: shuffle every epoch and drop the last short batch.
          shuffle_buffer: rows in the shuffle buffer (training only; 0 = off).
          seed: seed of the shuffles.
          input_context: shards the work across input pipelines (workers).
          drop_remainder: drop the last short batch; None = `training`
            (evaluation on several replicas wants True: equal batches everywhere).
          repeat: pass over the data forever (each pass in a new shuffled
            order), for `fit` with `steps_per_epoch`.
          chunk_fn: a function applied to each chunk of rows before caching
            and shuffling (e.g. `Que2EngageModel.featurize`).
          cache: keep the chunks after the first pass: "" in memory, or a
            file name prefix on disk; None reads and validates every pass.
            Later passes shuffle the cached chunks (rows within a chunk stay
            together, in the first pass's random order).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be at least 1")
        num_pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline_id = input_context.input_pipeline_id if input_context else 0
        indices = np.arange(len(self.units))
        shard_rows = num_pipelines > 1 and len(self.units) < num_pipelines
        if num_pipelines > 1 and not shard_rows:
            indices = indices[pipeline_id::num_pipelines]
        batch_spec = {k: tf.TensorSpec([None, *v.shape], v.dtype) for k, v in self.element_spec.items()}

        ds = tf.data.Dataset.from_tensor_slices(indices)
        if training:
            ds = ds.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
        if repeat and cache is None:
            ds = ds.repeat()
        # Each read of a unit gets its own seed for the order of its rows (-1: file order).
        seeds = tf.data.Dataset.random(seed=seed).map(lambda r: r % (2**31)) if training else tf.data.Dataset.from_tensors(
            tf.constant(-1, tf.int64)).repeat()
        ds = tf.data.Dataset.zip((ds, seeds)).interleave(
            lambda i, s: tf.data.Dataset.from_generator(self._read_unit, args=(i, s), output_signature=batch_spec),
            cycle_length=max(1, min(cycle_length, len(indices))),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if chunk_fn is not None:
            ds = ds.map(chunk_fn, num_parallel_calls=tf.data.AUTOTUNE)
        if cache is not None:
            ds = ds.cache(cache)
            if repeat:
                ds = ds.repeat()
        drop = training if drop_remainder is None else drop_remainder
        if shard_rows:  # fewer units than pipelines: deal out rows
            return ds.unbatch().shard(num_pipelines, pipeline_id).batch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)
        if training and shuffle_buffer > 0:
            ds = ds.shuffle(-(-shuffle_buffer // CHUNK_ROWS), seed=seed, reshuffle_each_iteration=True)
        return ds.rebatch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)


def table_to_numpy(table: pa.Table, columns: list[str], image_dim: int) -> dict[str, np.ndarray]:
    """The `columns` of a canonical table as NumPy arrays (text as object, embeddings [N, image_dim] float32)."""
    out = {}
    for c in columns:
        column = table.column(c)
        if c == S.PRODUCT_IMAGE_EMBEDDING:
            column = column.combine_chunks()
            filled = column.fill_null(pa.scalar([0.0] * image_dim, type=column.type)) if column.null_count else column
            out[c] = filled.flatten().to_numpy().astype(np.float32).reshape(-1, image_dim)
        elif c == S.ENGAGED:
            out[c] = column.to_numpy().astype(np.int32)
        elif c == S.RELEVANCE:
            out[c] = column.to_numpy(zero_copy_only=False).astype(np.float32)
        else:
            out[c] = column.to_numpy(zero_copy_only=False).astype(object)
    return out


def dataset_from_dir(
    data_dir: str,
    split: str,
    batch_size: int,
    training: bool,
    on_bad_rows: str = "error",
    with_relevance: bool = False,
    **dataset_kwargs,
) -> tf.data.Dataset:
    """Batches of one split (`train`, `validation`, `test`) of a data set directory.

    `dataset_kwargs` go to `ImpressionPipeline.dataset` (shuffle_buffer, seed, input_context).
    """
    catalog, path = split_file(data_dir, split)
    pipeline = ImpressionPipeline([path], catalog, on_bad_rows, with_relevance=with_relevance)
    return pipeline.dataset(batch_size, training, **dataset_kwargs)
