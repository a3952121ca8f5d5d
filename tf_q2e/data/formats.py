"""Readers and writers of impression logs and catalogues, chosen by file suffix.

| suffix | format |
|---|---|
| `.parquet`, `.pq` | Apache Parquet (streamed by row group) |
| `.csv`, `.tsv` | comma/tab separated text, UTF-8, header row; lists as `[0.1, 0.2]` or `0.1 0.2` |
| `.jsonl`, `.ndjson` | one JSON object per line, UTF-8 |
| `.tfrecord`, `.tfrecords` | `tf.train.Example` records: strings as `bytes_list`, `engaged` as `int64_list`, floats as `float_list` |

Every reader yields `RawBatch`es: an Arrow record batch of the file's columns as
stored (no type conversion yet), the 1-based row number of its first row, and
the problems the reader itself found (a line that is not JSON, a cell of the
wrong JSON type, a record that is not an Example). `validate.Validator` turns raw
batches into canonical tables. Text formats keep every cell as bytes so that a
non-UTF-8 byte is reported with its row and column instead of failing the file.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from tf_q2e.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
SUPPORTED_SUFFIXES = PARQUET_SUFFIXES + CSV_SUFFIXES + JSONL_SUFFIXES + TFRECORD_SUFFIXES

DEFAULT_BATCH_ROWS = 65_536

# Columns whose cells must be lists of numbers, and those holding numbers, in
# row formats (JSONL, TFRecord). Everything else holds strings.
LIST_COLUMNS = ("product_image_embedding",)
NUMBER_COLUMNS = ("engaged", "relevance")
# Placeholder column of a batch in which no row could be read.
UNREADABLE_ROW = "(unreadable)"
# The column named by a problem with a whole row (a line that is not JSON, ...).
UNREADABLE = "(row)"


@dataclass
class RowProblem:
    """A problem with one row (or one cell) of an input file."""

    row: int  # 1-based data row number in the file
    column: str  # the column, or "(row)" when the row as a whole is unreadable
    message: str


@dataclass
class RawBatch:
    """Rows of a file as stored, before conversion to the canonical types."""

    data: pa.RecordBatch
    first_row: int  # 1-based row number of data's first row in the file
    problems: list[RowProblem] = field(default_factory=list)


def file_format(path: str) -> str:
    """'parquet' | 'csv' | 'jsonl' | 'tfrecord' from the file's suffix."""
    lower = path.lower()
    for suffixes, name in (
        (PARQUET_SUFFIXES, "parquet"),
        (CSV_SUFFIXES, "csv"),
        (JSONL_SUFFIXES, "jsonl"),
        (TFRECORD_SUFFIXES, "tfrecord"),
    ):
        if lower.endswith(suffixes):
            return name
    raise DataError(
        f"{path}: unknown file type; use one of the suffixes {', '.join(SUPPORTED_SUFFIXES)}"
    )


def read_batches(path: str, batch_rows: int = DEFAULT_BATCH_ROWS, row_groups: list[int] | None = None) -> Iterator[RawBatch]:
    """Streams a file as `RawBatch`es of at most about `batch_rows` rows.

    Args:
      path: the file; its suffix picks the format.
      batch_rows: rows per batch (Parquet row groups may be split further).
      row_groups: Parquet only: read just these row groups (for sharding).
    """
    fmt = file_format(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file (a directory?); give the path of a {fmt} file")
    if fmt == "parquet":
        return _read_parquet(path, batch_rows, row_groups)
    if row_groups is not None:
        raise ValueError("row_groups applies to Parquet files only")
    if fmt == "csv":
        return _read_csv(path, batch_rows)
    if fmt == "jsonl":
        return _read_jsonl(path, batch_rows)
    return _read_tfrecord(path, batch_rows)


def parquet_row_groups(path: str) -> list[int]:
    """Number of rows in each row group of a Parquet file."""
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _read_parquet(path: str, batch_rows: int, row_groups: list[int] | None) -> Iterator[RawBatch]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    sizes = parquet_row_groups(path)
    starts = [1]
    for n in sizes:
        starts.append(starts[-1] + n)
    groups = range(len(sizes)) if row_groups is None else row_groups
    for g in groups:
        row = starts[g]
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g]):
                yield RawBatch(batch, row)
                row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"{path}: row group {g} (rows {starts[g]}-{starts[g + 1] - 1}): corrupt data, cannot be read "
                f"({_one_line(e)}); rewrite the file from its source"
            ) from e


def _read_csv(path: str, batch_rows: int) -> Iterator[RawBatch]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, "rb") as f:
        header_line = f.readline()
    if not header_line.strip():
        why = "the file is empty" if not header_line else "the file starts with a blank line"
        raise DataError(f"{path}: row 0 (header): no header row ({why}); "
                        "the first line must name the columns, see the schema in README.md")
    try:
        header = next(csv.reader([header_line.decode("utf-8-sig")], delimiter=delimiter))
    except (UnicodeDecodeError, StopIteration) as e:
        raise DataError(f"{path}: row 0 (header): cannot read the header row as UTF-8 text ({e})") from e
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{path}: header: duplicate column names {dupes}")
    row = 1
    try:
        # open_csv parses the first block already, so it is inside the try too.
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=1 << 22, skip_rows=1, column_names=header),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(column_types={name: pa.binary() for name in header}),
        )
        for batch in reader:
            for start in range(0, batch.num_rows, batch_rows):
                part = batch.slice(start, batch_rows)
                yield RawBatch(part, row)
                row += part.num_rows
    except pa.ArrowInvalid as e:
        found = _find_malformed_csv_row(path, delimiter, len(header))
        if found is not None:
            raise DataError(f"{path}: row {found[0]}: malformed CSV: {found[1]}; fix the row "
                            "(quote cells that hold the delimiter, a quote or a line break)") from e
        raise DataError(f"{path}: near row {row}: malformed CSV ({_one_line(e)})") from e


def _find_malformed_csv_row(path: str, delimiter: str, n_columns: int) -> tuple[int, str] | None:
    """`(row, what is wrong)` of the first data row without `n_columns` cells, read with Python's csv module.

    Only called after Arrow's parser failed, to name the row (Arrow reports a
    block, not a row). Blank lines are not rows, as in Arrow. None if every row
    looks right to Python's parser.
    """
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            records = csv.reader(f, delimiter=delimiter)
            next(records, None)  # the header
            row = 0
            for cells in records:
                if not cells:
                    continue
                row += 1
                if len(cells) != n_columns:
                    unclosed = len(cells) < n_columns and any("\n" in cell or "\r" in cell for cell in cells)
                    hint = " (a quoted cell runs over several lines: is a quote left open?)" if unclosed else ""
                    return row, f"expected {n_columns} columns, got {len(cells)}{hint}"
    except (csv.Error, OSError):
        return None
    finally:
        csv.field_size_limit(limit)
    return None


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (Arrow quotes whole rows)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_jsonl(path: str, batch_rows: int) -> Iterator[RawBatch]:
    def parsed_rows():
        with open(path, "rb") as f:
            lines = (line for line in f if line.strip())  # blank lines are not rows
            for row, line in enumerate(lines, start=1):
                yield _parse_json_line(line, row)

    return _batch_rows(parsed_rows(), batch_rows)


def _batch_rows(parsed_rows, batch_rows: int) -> Iterator[RawBatch]:
    """Groups `(record or None, problem or None)` per row into `RawBatch`es."""
    rows: list[dict | None] = []
    problems: list[RowProblem] = []
    first_row = 1
    for record, problem in parsed_rows:
        rows.append(record)
        if problem:
            problems.append(problem)
        if len(rows) == batch_rows:
            yield _rows_to_batch(rows, first_row, problems)
            first_row += len(rows)
            rows, problems = [], []
    if rows or first_row == 1:
        yield _rows_to_batch(rows, first_row, problems)


def _parse_json_line(line: bytes, row: int) -> tuple[dict | None, RowProblem | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        # Find the field that holds the bad byte so the message can name it.
        try:
            record = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except (ValueError, RecursionError):  # not JSON either: the row as a whole is unreadable
            record = None
        bad = [k for k, v in record.items() if isinstance(v, str) and _has_surrogate(v)] if isinstance(record, dict) else []
        if not bad:
            return None, RowProblem(row, UNREADABLE, "not valid UTF-8 text")
        return {k: v for k, v in record.items() if k not in bad}, RowProblem(row, bad[0], "not valid UTF-8 text")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, RowProblem(row, UNREADABLE, f"not a JSON object ({e.msg} at character {e.pos})")
    except RecursionError:
        return None, RowProblem(row, UNREADABLE, "not readable JSON: nested too deeply")
    except ValueError as e:  # json.loads of an integer longer than Python converts (4300 digits)
        what = "an integer too long to convert" if "integer string conversion" in str(e) else _one_line(e)
        return None, RowProblem(row, UNREADABLE, f"not readable JSON: {what}")
    if not isinstance(record, dict):
        return None, RowProblem(row, UNREADABLE, f"not a JSON object but {type(record).__name__}")
    return record, None


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _rows_to_batch(rows: list[dict | None], first_row: int, problems: list[RowProblem]) -> RawBatch:
    """Columns from row dicts. A cell of the wrong kind becomes null plus a problem."""
    names: list[str] = []
    for record in rows:
        for key in record or ():
            if key not in names:
                names.append(key)
    arrays = [cells_to_array(name, [None if record is None else record.get(name) for record in rows], first_row, problems)
              for name in names]
    if not names:  # no readable row: keep the row count so problems line up
        names, arrays = [UNREADABLE_ROW], [pa.nulls(len(rows))]
    batch = pa.RecordBatch.from_arrays(arrays, names=names)
    problems.sort(key=lambda p: p.row)
    return RawBatch(batch, first_row, problems)


def cells_to_array(name: str, cells: list, first_row: int, problems: list[RowProblem]) -> pa.Array:
    """One column from Python values (None: missing); a value of the wrong kind becomes null plus a problem.

    The kinds: a list of numbers for `product_image_embedding`, a number for
    `engaged` and `relevance`, a string or an integer for `product_id`, a
    string for every other column.
    """
    values = []
    for i, value in enumerate(cells):
        if value is not None and not _cell_kind_ok(name, value):
            problems.append(RowProblem(first_row + i, name, f"expected {_expected_kind(name)}, got {type(value).__name__} {_preview(value)}"))
            value = None
        values.append(value)
    return _to_arrow(name, values, first_row, problems)


def _expected_kind(name: str) -> str:
    if name in LIST_COLUMNS:
        return "a list of numbers"
    if name in NUMBER_COLUMNS:
        return "a number"
    if name == "product_id":
        return "a string or an integer"
    return "a string"


def _cell_kind_ok(name: str, value) -> bool:
    if name in LIST_COLUMNS:
        return isinstance(value, list) and all(_is_number(v) for v in value)
    if name in NUMBER_COLUMNS:
        return _is_number(value)
    if name == "product_id":
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    return isinstance(value, str)


def _is_number(value) -> bool:
    return isinstance(value, (int, float))  # bool is an int: true/false are accepted labels


def _to_arrow(name: str, values: list, first_row: int, problems: list[RowProblem]) -> pa.Array:
    """One column of a row batch; a number too large for a float64 becomes null plus a problem."""
    if name in LIST_COLUMNS:
        try:
            return pa.array(values, type=pa.list_(pa.float64()))
        except (pa.ArrowInvalid, OverflowError):  # an integer beyond int64 or float64
            values = [_floats_or_flag(name, v, first_row + i, problems) for i, v in enumerate(values)]
            return pa.array(values, type=pa.list_(pa.float64()))
    if name in NUMBER_COLUMNS:
        return pa.array([_floats_or_flag(name, v, first_row + i, problems) for i, v in enumerate(values)],
                        type=pa.float64())
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _floats_or_flag(name: str, value, row: int, problems: list[RowProblem]):
    """`value` (a number or a list of numbers) as float(s); None and a problem if one is beyond float64."""
    if value is None:
        return None
    try:
        return [float(v) for v in value] if isinstance(value, list) else float(value)
    except OverflowError:
        problems.append(RowProblem(row, name, f"number too large for a 64-bit float: {_preview(value)}"))
        return None


def _preview(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_tfrecord(path: str, batch_rows: int) -> Iterator[RawBatch]:
    import tensorflow as tf  # only this format needs TensorFlow

    def parsed_rows():
        row = 0
        try:
            for row, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator(), start=1):
                yield _parse_example(tf, record, row)
        except tf.errors.DataLossError as e:
            raise DataError(f"{path}: row {row + 1}: corrupt TFRecord file ({e.message})") from e

    return _batch_rows(parsed_rows(), batch_rows)


def _parse_example(tf, record: bytes, row: int) -> tuple[dict | None, RowProblem | None]:
    try:
        example = tf.train.Example.FromString(record)
    except Exception as e:  # protobuf raises DecodeError, which TF does not re-export
        return None, RowProblem(row, UNREADABLE, f"not a tf.train.Example ({e})")
    parsed: dict = {}
    problem = None
    for name, feature in sorted(example.features.feature.items()):
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        if kind == "bytes_list":
            try:
                values = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError:
                problem = problem or RowProblem(row, name, "not valid UTF-8 text")
                continue
        if name in LIST_COLUMNS:
            parsed[name] = values
        elif len(values) == 1:
            parsed[name] = values[0]
        elif values:
            return None, RowProblem(row, name, f"expected one value, got {len(values)}")
    return parsed, problem


def write_table(table: pa.Table, path: str) -> None:
    """Writes a table in the format its suffix names (for tests and conversions).

    List columns become `[a, b, ...]` cells in CSV, JSON arrays in JSONL and
    `float_list` features in TFRecord.
    """
    fmt = file_format(path)
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd")
    elif fmt == "csv":
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(table.column_names)
            for record in table.to_pylist():
                writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, list) else v for v in record.values()])
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for record in table.to_pylist():
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        write_tfrecord(table.to_pylist(), path)


def write_tfrecord(records: list[dict], path: str) -> None:
    """Writes dicts as `tf.train.Example`s (bytes values are written as they are)."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(_example(tf, record).SerializeToString())


def _example(tf, record: dict):
    feature = {}
    for name, value in record.items():
        if value is None:
            continue
        if isinstance(value, list):
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value))
        elif isinstance(value, (str, bytes)):
            data = value.encode("utf-8") if isinstance(value, str) else value
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
        elif isinstance(value, int):
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature))
