"""The public data API: impression `tf.data.Dataset`s from a DataFrame, files or a data set directory.

A user's own `model.fit` script needs no directory in a fixed layout:

    import tf_q2e.data as q2d

    train = q2d.from_files(["logs/jan.parquet", "logs/feb.csv"], catalog="products.parquet")
    train = train.shuffle(100_000, seed=0).batch(768, drop_remainder=True)
    schema = q2d.FeatureSchema.of(train)  # image_dim, context columns: what the model is built for

Each element is a dict with the keys and dtypes of `ImpressionPipeline.element_spec`:

| key | spec (a row; batches add a leading `[B]`) |
|---|---|
| `query`, `query_<name>` (context), `product_id`, `product_title`, `product_description`, `product_category` | `[]` string |
| `product_image_embedding` (when the data has one) | `[image_dim]` float32 (zeros: no image) |
| `engaged` | `[]` int32: 1, 0, or -1 (no engagement label) |
| `relevance` (with `with_relevance=True`) | `[]` float32, NaN where ungraded |

Rows are checked by `validate.Validator`, the code and messages of `q2e
validate` and `q2e train`: a bad row is named by its source (the file, or
"DataFrame"), row and column. `on_bad_rows="error"` raises `DataError`;
`"skip"` drops the row. Given a catalogue, each impression's product must be in
it with the same fields. Files are streamed (a file larger than memory is
fine); a DataFrame is validated whole when the dataset is made.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import tensorflow as tf

from tf_q2e.data import schema as S
from tf_q2e.data.columns import to_embedding
from tf_q2e.data.formats import file_format
from tf_q2e.data.frames import CATALOG_DATAFRAME, DATAFRAME, ROW_NUMBERS, check_dataframe, column_array, dataframe_batch
from tf_q2e.data.pipeline import CHUNK_ROWS, ImpressionPipeline, table_to_numpy
from tf_q2e.data.validate import ON_BAD_ROWS, FileReport, Validator, split_file
from tf_q2e.errors import DataError

__all__ = ["FeatureSchema", "from_dir", "from_files", "from_pandas"]


def from_pandas(
    df: pd.DataFrame,
    catalog: pd.DataFrame | str | os.PathLike | None = None,
    *,
    batch_size: int | None = None,
    on_bad_rows: str = "error",
    with_relevance: bool = False,
) -> tf.data.Dataset:
    """Impressions from a pandas DataFrame, validated now.

    Args:
      df: one impression per row, columns named as in the schema (`query`,
        `product_id`, `product_title`, `engaged`, ...; see `schema.py`). Its
        index is not read. Integer product ids become their decimal strings;
        NaN/None are missing values (an ungraded `relevance`, no image).
      catalog: the product catalogue, a DataFrame or a file path; when given,
        each impression's product must be in it with the same fields.
      batch_size: None: single rows (shuffle and batch them yourself); else
        batches of `batch_size` rows in the DataFrame's order, the last one shorter.
      on_bad_rows: "error" raises `DataError` naming the bad rows; "skip" drops them.
      with_relevance: also yield `relevance`.

    Returns:
      A `tf.data.Dataset` of dicts: `[]` (or `[B]`) tensors per column,
      `product_image_embedding` `[image_dim]` (or `[B, image_dim]`).

    Raises:
      DataError: a bad row ("DataFrame: row 3, column query: empty query";
        rows count from 1, so row r is `df.iloc[r - 1]`), a missing required
        column, or no usable rows.

    Example:
      >>> df = pd.DataFrame({"query": ["red sofa"], "product_id": [7], "product_title": ["Sofa"], "engaged": [1]})
      >>> next(iter(from_pandas(df)))["product_id"].numpy()
      b'7'
    """
    _check_options(batch_size, on_bad_rows)
    check_dataframe(df)
    validator = Validator(on_bad_rows=on_bad_rows)
    _read_catalog(validator, catalog)
    report = FileReport(DATAFRAME, "impressions")
    with _dataframe_rows():
        tables = list(validator.iter_batches([dataframe_batch(df, "impressions")], DATAFRAME, "impressions", report,
                                             quarantine=False))
    if not tables:
        dropped = f" ({report.rows_dropped} of {report.rows_read} dropped: {report.problems[0]})" if report.problems else ""
        raise DataError(f"{DATAFRAME}: no usable rows{dropped}")
    table = pa.concat_tables(tables)
    columns = [c for c in table.column_names if with_relevance or c != S.RELEVANCE]
    image_dim = validator.image_dim if S.PRODUCT_IMAGE_EMBEDDING in columns else 0
    dataset = tf.data.Dataset.from_tensor_slices(table_to_numpy(table, columns, image_dim))
    return dataset if batch_size is None else dataset.batch(batch_size)


def from_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    catalog: pd.DataFrame | str | os.PathLike | None = None,
    *,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    on_bad_rows: str = "error",
    with_relevance: bool = False,
) -> tf.data.Dataset:
    """Impressions streamed from files of any supported format (Parquet, CSV, JSONL, TFRecord).

    The files are read by `ImpressionPipeline`: Parquet row group by row
    group, so a file larger than memory streams. Every file must have the
    context columns of the first one.

    Args:
      paths: an impression file, or a list of them; the suffix names the
        format (`.parquet`, `.csv`, `.tsv`, `.jsonl`, `.tfrecord`, ...).
      catalog: the product catalogue, a file path or a DataFrame; when given,
        each impression's product must be in it with the same fields.
      batch_size: None: single rows; else batches of `batch_size` rows, the
        last one shorter.
      shuffle: read the files' parts in a random order with their rows
        permuted, through a shuffle buffer of 100,000 rows; a new order each
        pass (epoch). False: the files' order.
      seed: seed of the shuffle.
      on_bad_rows: "error" raises at a bad row; "skip" drops it (and writes it
        to `quarantine/<file>.quarantine.jsonl` beside the file).
      with_relevance: also yield `relevance`.

    Returns:
      A `tf.data.Dataset` of dicts, as `from_pandas` gives.

    Raises:
      DataError: now, for a missing or unknown file, a bad column, or a bad
        row among the first rows of the first file. A bad row found later,
        while the dataset is read, raises `tf.errors.InvalidArgumentError`
        with the same message ("train.csv: row 80, column query: empty query ...").

    Example:
      >>> ds = from_files("train.parquet", "catalog.parquet", batch_size=768, shuffle=True)
      >>> ds.element_spec["query"]
      TensorSpec(shape=(None,), dtype=tf.string, name=None)
    """
    _check_options(batch_size, on_bad_rows)
    files = _file_list(paths)
    image_dim = None
    if isinstance(catalog, pd.DataFrame):
        validator = Validator(on_bad_rows=on_bad_rows)
        _read_catalog(validator, catalog)
        catalog, image_dim = validator.products, validator.image_dim  # read once, shared by the readers
    elif catalog is not None:
        catalog = _catalog_path(catalog)
    with _dataframe_rows():  # a problem may name a row of a catalogue DataFrame
        pipeline = ImpressionPipeline(files, catalog, on_bad_rows, image_dim=image_dim, with_relevance=with_relevance)
    dataset = pipeline.dataset(CHUNK_ROWS if batch_size is None else batch_size, training=bool(shuffle), seed=seed,
                               drop_remainder=False)
    return dataset.unbatch() if batch_size is None else dataset


def from_dir(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    on_bad_rows: str = "error",
    with_relevance: bool = False,
) -> tf.data.Dataset:
    """Impressions of one split of a data set directory, as `q2e synth` and `q2e prepare` write them.

    The directory holds a catalogue and the splits (`catalog`, `train`,
    `validation`, `test`, each in any supported format); the split's rows are
    checked against the catalogue.

    Args:
      data_dir: the data set directory.
      split: "train", "validation" or "test".
      batch_size: None: single rows; else batches of `batch_size` rows.
      shuffle: None: shuffle the train split only (see `from_files`).
      seed: seed of the shuffle.
      on_bad_rows: "error" or "skip", as in `from_files`.
      with_relevance: also yield `relevance`.

    Returns:
      A `tf.data.Dataset` of dicts, as `from_files` gives.

    Raises:
      DataError: no such directory, no catalogue, or no such split (the
        message names the splits found).

    Example:
      >>> test = from_dir("data/synth", "test", batch_size=1024, with_relevance=True)
    """
    if split not in S.SPLIT_FILES:
        raise ValueError(f"split must be one of {', '.join(S.SPLIT_FILES)}, got {split!r}")
    catalog, path = split_file(os.fspath(data_dir), split)
    return from_files([path], catalog, batch_size=batch_size, shuffle=split == "train" if shuffle is None else shuffle,
                      seed=seed, on_bad_rows=on_bad_rows, with_relevance=with_relevance)


def _check_options(batch_size, on_bad_rows: str) -> None:
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {', '.join(map(repr, ON_BAD_ROWS))}, got {on_bad_rows!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size ({batch_size!r}) must be a positive integer, or None for single rows")


def _file_list(paths) -> list[str]:
    if isinstance(paths, pd.DataFrame):
        raise TypeError("paths is a DataFrame; use from_pandas(df) for rows in memory")
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    try:
        files = [os.fsdecode(p) for p in paths]
    except TypeError:
        raise TypeError(f"paths must be a file path or a list of file paths, got {type(paths).__name__}") from None
    if not files:
        raise DataError("no impression files given (paths is empty)")
    for path in files:
        if os.path.isdir(path):
            raise DataError(f"{path}: a directory, not a file; from_files reads files (for a data set directory "
                            "of catalogue and splits, use from_dir)")
        file_format(path)  # an unknown suffix: names the supported ones
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
    return files


def _catalog_path(catalog) -> str:
    if not isinstance(catalog, (str, bytes, os.PathLike)):
        raise TypeError(f"catalog must be a file path or a pandas DataFrame (or None), got {type(catalog).__name__}")
    return os.fsdecode(catalog)


def _read_catalog(validator: Validator, catalog) -> None:
    """Loads a catalogue (DataFrame or file) into `validator`'s product reference."""
    if catalog is None:
        return
    if isinstance(catalog, pd.DataFrame):
        with _dataframe_rows():
            for _ in validator.iter_batches([dataframe_batch(catalog, "catalog")], CATALOG_DATAFRAME, "catalog",
                                            quarantine=False):
                pass
    else:
        validator.load_catalog(_catalog_path(catalog))


@contextlib.contextmanager
def _dataframe_rows():
    """Adds how DataFrame rows are numbered to an error that names one."""
    try:
        yield
    except DataError as e:
        if re.search(r"DataFrame:? row \d", str(e)):
            raise DataError(f"{e} ({ROW_NUMBERS})") from e
        raise


# -- what a model is built for ------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSchema:
    """The shape of a data set's features that a model is built for.

    Attributes:
      image_dim: length of `product_image_embedding`; 0: the data has none.
      context_columns: the query context columns, e.g. `("query_country",)`,
        in the data's column order.

    Example:
      >>> FeatureSchema.of({"query": tf.TensorSpec([None], tf.string), "query_country": tf.TensorSpec([None], tf.string),
      ...                   "product_image_embedding": tf.TensorSpec([None, 16], tf.float32)})
      FeatureSchema(image_dim=16, context_columns=('query_country',))
    """

    image_dim: int = 0
    context_columns: tuple[str, ...] = ()

    def __post_init__(self):
        dim = self.image_dim
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
            raise ValueError(f"FeatureSchema.image_dim ({dim!r}) must be an integer >= 0 (0: no image embedding)")
        object.__setattr__(self, "image_dim", int(dim))
        if isinstance(self.context_columns, str):
            raise TypeError(f"FeatureSchema.context_columns must be a tuple of column names, e.g. "
                            f"({self.context_columns!r},), not a string")
        columns = tuple(self.context_columns)
        bad = [c for c in columns if not isinstance(c, str) or not S.is_query_context(c)]
        if bad:
            raise ValueError(f"FeatureSchema.context_columns: {bad} are not query context columns; "
                             "name them query_<name>, e.g. query_country")
        if len(set(columns)) != len(columns):
            raise ValueError(f"FeatureSchema.context_columns {columns} names a column twice")
        object.__setattr__(self, "context_columns", columns)

    @classmethod
    def of(cls, x) -> "FeatureSchema":
        """The feature schema of a dataset, an element spec, a DataFrame, or a FeatureSchema.

        Args:
          x: a `tf.data.Dataset` of dicts (rows or batches, as `from_files`
            gives), its `element_spec` (a dict of `tf.TensorSpec`), a pandas
            DataFrame of impressions (the image length is that of its first
            embedding), or a `FeatureSchema` (returned as it is).

        Raises:
          TypeError: `x` is none of these, or its elements are not dicts.
          ValueError: the image embedding has no static length or is not a
            float tensor, or a context column is not a string.
        """
        if isinstance(x, FeatureSchema):
            return x
        if isinstance(x, tf.data.Dataset):
            return cls._of_spec(x.element_spec, "the dataset's element_spec")
        if isinstance(x, pd.DataFrame):
            columns = tuple(dict.fromkeys(c for c in map(str, x.columns) if S.is_query_context(c)))
            return cls(_dataframe_image_dim(x), columns)
        if isinstance(x, Mapping):
            return cls._of_spec(x, "element_spec")
        raise TypeError(f"FeatureSchema.of takes a tf.data.Dataset, its element_spec (a dict of tf.TensorSpec), a pandas "
                        f"DataFrame or a FeatureSchema; got {type(x).__name__}")

    @classmethod
    def _of_spec(cls, spec, where: str) -> "FeatureSchema":
        if not isinstance(spec, Mapping):
            raise TypeError(f"{where} is a {type(spec).__name__}, not a dict of features keyed by column name as "
                            "from_files gives; map (features, label) pairs back to the features dict")
        columns = tuple(c for c in spec if isinstance(c, str) and S.is_query_context(c))
        for c in columns:
            if not isinstance(spec[c], tf.TensorSpec) or spec[c].dtype != tf.string:
                raise ValueError(f"{where}: query context column {c} is {spec[c]}; expected a tf.string tensor")
        image_dim = 0
        if S.PRODUCT_IMAGE_EMBEDDING in spec:
            image = spec[S.PRODUCT_IMAGE_EMBEDDING]
            fix = ("give it a static length, e.g. ds.map(lambda x: {**x, 'product_image_embedding': "
                   "tf.ensure_shape(x['product_image_embedding'], [..., image_dim])})")
            if not isinstance(image, tf.TensorSpec):
                raise ValueError(f"{where}: {S.PRODUCT_IMAGE_EMBEDDING} is {image}, not a dense tensor with a static "
                                 f"length; {fix}")
            if not image.dtype.is_floating:
                raise ValueError(f"{where}: {S.PRODUCT_IMAGE_EMBEDDING} has dtype {image.dtype.name}; expected float32")
            shape = image.shape
            if shape.rank not in (1, 2):
                raise ValueError(f"{where}: {S.PRODUCT_IMAGE_EMBEDDING} has shape {shape}; expected [image_dim] for a "
                                 "row or [batch, image_dim] for a batch")
            if shape[-1] is None or shape[-1] < 1:
                raise ValueError(f"{where}: {S.PRODUCT_IMAGE_EMBEDDING} has shape {shape}, no static length; {fix}")
            image_dim = int(shape[-1])
        return cls(image_dim, columns)


def _dataframe_image_dim(df: pd.DataFrame, rows: int = 4096) -> int:
    """The length of the DataFrame's first non-empty image embedding, as the Validator reads it; 0 if none."""
    names = [str(c) for c in df.columns]
    if S.PRODUCT_IMAGE_EMBEDDING not in names:
        return 0
    series = df.iloc[:, names.index(S.PRODUCT_IMAGE_EMBEDDING)]
    for start in range(0, len(series), rows):
        column = column_array(series.iloc[start : start + rows], S.PRODUCT_IMAGE_EMBEDDING, [])
        _, dim = to_embedding(column, DATAFRAME, None, lambda *problem: None)
        if dim:
            return dim
    return 0
