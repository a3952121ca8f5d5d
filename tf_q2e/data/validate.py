"""Validation: raw file batches -> canonical tables, with every bad row accounted for.

`Validator` converts the `RawBatch`es of one file (see `formats.py`) into
tables with the canonical schema (`schema.py`). Each problem names file, row and
column. What happens to a bad row is `on_bad_rows`:

* `error` — raise `DataError` at the first batch that holds one (the message
  lists the first few problems and how many there were);
* `skip` — drop the row, write it with its problem to the quarantine file and
  count it in the report;
* `collect` — drop the row and remember the problem (what `q2e validate` does
  with `error`, so it can list every problem before failing).

Checks per row: missing or wrong-typed value, empty `query` or `product_title`,
non-UTF-8 text, an `engaged` label that is NaN or not 1/0/-1, a `relevance`
that is NaN, infinite or beyond float32, an image embedding that is an empty
list, of the wrong length, or with NaN/inf or a value beyond float32, and a
`product_id` whose fields differ from those seen first for it (the catalogue's,
when a catalogue is given). A missing required column, a repeated column name,
or a Parquet column of a type that cannot hold the field, fails the whole file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.data import schema as S
from tf_q2e.data.formats import SUPPORTED_SUFFIXES, UNREADABLE, UNREADABLE_ROW, RawBatch, read_batches
from tf_q2e.data.columns import to_embedding, to_label, to_relevance, to_string, true_rows
from tf_q2e.data.products import ProductReference
from tf_q2e.errors import DataError, InputError

ON_BAD_ROWS = ("error", "skip")
MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class Problem:
    file: str
    row: int  # 1-based data row (header not counted)
    column: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}, column {self.column}: {self.message}"


@dataclass
class FileReport:
    """What validation saw in one file."""

    path: str
    kind: str  # "catalog" | "impressions"
    rows_read: int = 0
    rows_kept: int = 0
    problem_count: int = 0
    problems: list[Problem] = field(default_factory=list)  # the first few hundred
    notes: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # engaged/not_engaged/unlabelled
    quarantine: str | None = None

    @property
    def rows_dropped(self) -> int:
        return self.rows_read - self.rows_kept

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "problem_count": self.problem_count,
            "problems": [str(p) for p in self.problems],
            "notes": self.notes,
            "labels": self.labels,
            "quarantine": self.quarantine,
        }


class Validator:
    """Converts the raw batches of one data set's files into canonical tables.

    One `Validator` serves a data set: it fixes the image embedding length at
    the first embedding it sees (unless given) and keeps the product reference
    across files, so a product with different fields in two files is found.

    Args:
      on_bad_rows: "error", "skip" or "collect" (see module docstring).
      image_dim: expected length of `product_image_embedding`; None = the
        length of the first one seen.
      context_columns: query context columns to keep; None = every
        `query_*` column of the first impressions file.
      quarantine_dir: where `skip` writes `<file>.quarantine.jsonl`.
    """

    def __init__(
        self,
        on_bad_rows: str = "error",
        image_dim: int | None = None,
        context_columns: tuple[str, ...] | None = None,
        quarantine_dir: str | None = None,
    ):
        if on_bad_rows not in ON_BAD_ROWS + ("collect",):
            raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
        self.on_bad_rows = on_bad_rows
        self.image_dim = image_dim
        self.context_columns = context_columns
        self.quarantine_dir = quarantine_dir
        self.products = ProductReference()
        self.repeated_catalog_rows = 0  # identical repeats of a catalogue product, dropped
        self.has_image = image_dim is not None and image_dim > 0

    # -- whole files -----------------------------------------------------------------

    def iter_file(self, path: str, kind: str, report: FileReport | None = None, **read_kwargs) -> Iterator[pa.Table]:
        """Yields canonical tables of the good rows of `path`, filling `report`."""
        yield from self.iter_batches(read_batches(path, **read_kwargs), path, kind, report)

    def iter_batches(
        self,
        batches: Iterable[RawBatch],
        source: str,
        kind: str,
        report: FileReport | None = None,
        quarantine: bool = True,
    ) -> Iterator[pa.Table]:
        """Yields canonical tables of the good rows of raw batches, filling `report`.

        The entry point for rows that are not in a file (a pandas DataFrame,
        see `frames.py`); `iter_file` feeds it a file's batches.

        Args:
          batches: the `RawBatch`es of one source, in row order.
          source: names the rows in problems (`<source>: row 3, column query: ...`),
            e.g. a file path or "DataFrame".
          kind: "catalog" or "impressions".
          report: filled with counts and problems (a new one if None).
          quarantine: with `on_bad_rows="skip"`, write the dropped rows to
            `<source>.quarantine.jsonl` (in `quarantine_dir`, else beside the file).
        """
        report = report if report is not None else FileReport(source, kind)
        if kind == "catalog" and self.products.frozen:
            raise ValueError("this Validator has read its catalogue already; use a new one for another data set")
        repeated_before = self.repeated_catalog_rows
        quarantine_file = None
        first = True
        try:
            for raw in batches:
                if first:
                    self._check_columns(source, kind, raw.data.schema, report)
                    first = False
                table, problems, bad = self.convert(raw, source, kind)
                report.rows_read += raw.data.num_rows
                report.rows_kept += table.num_rows
                self._count_labels(table, report)
                if problems:
                    report.problem_count += len(problems)
                    room = 200 - len(report.problems)
                    report.problems.extend(problems[: max(room, 0)])
                    if self.on_bad_rows == "error":
                        raise bad_rows_error(problems, report.problem_count)
                    if self.on_bad_rows == "skip" and quarantine:
                        if quarantine_file is None:
                            quarantine_file = self._open_quarantine(source, report)
                        _write_quarantine(quarantine_file, raw, bad, problems)
                if table.num_rows:
                    yield table
        finally:
            if quarantine_file is not None:
                quarantine_file.close()
        if kind == "catalog":
            self.products.frozen = True
            repeated = self.repeated_catalog_rows - repeated_before
            if repeated:
                report.notes.append(f"{repeated} row(s) repeat a product listed earlier with the same fields: dropped")

    def load_catalog(self, path: str) -> FileReport:
        """Reads the catalogue into the product reference (and freezes it)."""
        report = FileReport(path, "catalog")
        for _ in self.iter_file(path, "catalog", report):
            pass
        return report

    def _check_columns(self, path: str, kind: str, arrow_schema: pa.Schema, report: FileReport) -> None:
        names = [n for n in arrow_schema.names if n != UNREADABLE_ROW]
        if len(set(names)) != len(names):  # CSV headers are checked by the reader; Parquet files can repeat a name
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"{path}: duplicate column names {dupes}; keep one column of each name")
        required = S.REQUIRED_CATALOG_COLUMNS if kind == "catalog" else S.REQUIRED_IMPRESSION_COLUMNS
        missing = [c for c in required if c not in names]
        if missing and UNREADABLE_ROW not in arrow_schema.names:
            raise DataError(
                f"{path}: missing required column(s) {', '.join(missing)} (found: {', '.join(names) or 'none'}); "
                f"see the schema in README.md"
            )
        if kind == "impressions":
            found = tuple(c for c in names if S.is_query_context(c))
            if self.context_columns is None:
                self.context_columns = found
            absent = [c for c in self.context_columns if c not in found]
            if absent:
                raise DataError(f"{path}: missing query context column(s) {', '.join(absent)} that the data set uses")
        known = set(S.impression_schema(1, self.context_columns or ()).names) if kind == "impressions" else set(
            S.catalog_schema(1).names
        )
        ignored = [c for c in names if c not in known]
        if ignored:
            report.notes.append(f"ignored column(s) not in the schema: {', '.join(ignored)}")
        for c in (S.PRODUCT_DESCRIPTION, S.PRODUCT_CATEGORY):
            if c not in names:
                report.notes.append(f"no {c} column: empty for every row")
        if S.PRODUCT_IMAGE_EMBEDDING in names:
            self.has_image = True

    def _open_quarantine(self, path: str, report: FileReport):
        directory = self.quarantine_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "quarantine")
        os.makedirs(directory, exist_ok=True)
        report.quarantine = os.path.join(directory, os.path.basename(path) + ".quarantine.jsonl")
        return open(report.quarantine, "w", encoding="utf-8")

    @staticmethod
    def _count_labels(table: pa.Table, report: FileReport) -> None:
        if S.ENGAGED not in table.column_names:
            return
        labels = table.column(S.ENGAGED).to_numpy()
        for name, value in (("engaged", 1), ("not_engaged", 0), ("unlabelled", -1)):
            report.labels[name] = report.labels.get(name, 0) + int((labels == value).sum())

    # -- one batch -------------------------------------------------------------------

    def convert(self, raw: RawBatch, path: str, kind: str) -> tuple[pa.Table, list[Problem], np.ndarray]:
        """Canonical table of the good rows, the problems, and the bad-row mask."""
        data = raw.data
        n = data.num_rows
        found: dict[tuple[int, str], str] = {}  # (row index, column) -> message, first one wins

        def flag(rows: Iterable[int], column: str, message) -> None:
            for i in rows:
                if (int(i), UNREADABLE) not in found:  # an unreadable row has no further problems
                    found.setdefault((int(i), column), message(int(i)) if callable(message) else message)

        for p in raw.problems:
            flag([p.row - raw.first_row], p.column, p.message)
        if UNREADABLE_ROW in data.schema.names:
            columns: dict[str, pa.Array] = {}
        else:
            columns = self._convert_columns(data, path, kind, flag)
        bad = np.zeros(n, dtype=bool)
        for i, _ in found:
            bad[i] = True
        if columns:
            table = self._assemble(columns, n, kind)
            repeated = self.products.check(table, ~bad, path, raw.first_row, kind, flag)
            for i, _ in found:
                bad[i] = True
            repeated &= ~bad
            self.repeated_catalog_rows += int(repeated.sum())
            drop = bad | repeated
            table = table.filter(pa.array(~drop)) if drop.any() else table
        else:
            table = pa.Table.from_batches([], schema=self._schema(kind))
            bad[:] = True
        problems = [Problem(path, raw.first_row + i, column, message) for (i, column), message in sorted(found.items())]
        return table, problems, bad

    def _schema(self, kind: str) -> pa.Schema:
        dim = self.image_dim if self.has_image and self.image_dim else 0
        if kind == "catalog":
            return S.catalog_schema(dim)
        return S.impression_schema(dim, self.context_columns or ())

    def _convert_columns(self, data: pa.RecordBatch, path: str, kind: str, flag) -> dict[str, pa.Array]:
        required = S.REQUIRED_CATALOG_COLUMNS if kind == "catalog" else S.REQUIRED_IMPRESSION_COLUMNS
        for name in required + tuple(self.context_columns or () if kind == "impressions" else ()):
            if name not in data.schema.names:  # a later JSONL batch in which no row has the key
                data = data.append_column(name, pa.nulls(data.num_rows, type=pa.string()))
        names = data.schema.names
        out: dict[str, pa.Array] = {}
        text_columns = [S.PRODUCT_ID, S.PRODUCT_TITLE, S.PRODUCT_DESCRIPTION, S.PRODUCT_CATEGORY]
        if kind == "impressions":
            text_columns = [S.QUERY, *(self.context_columns or ())] + text_columns
        else:
            text_columns += list(S.PRODUCT_ATTRIBUTE_FIELDS)
        for column in text_columns:
            if column in names:
                required = column in (S.QUERY, S.PRODUCT_ID, S.PRODUCT_TITLE) or S.is_query_context(column)
                out[column] = to_string(data.column(column), path, column, required, flag)
        for column in (S.QUERY, S.PRODUCT_TITLE, S.PRODUCT_ID):
            if column in out:
                blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(out[column])), 0)
                flag(true_rows(blank), column, f"empty {column}")
        if S.PRODUCT_IMAGE_EMBEDDING in names:
            out[S.PRODUCT_IMAGE_EMBEDDING], self.image_dim = to_embedding(
                data.column(S.PRODUCT_IMAGE_EMBEDDING), path, self.image_dim, flag
            )
            self.has_image = bool(self.image_dim)
        if kind == "impressions":
            out[S.ENGAGED] = to_label(data.column(S.ENGAGED), path, flag)
            if S.RELEVANCE in names:
                out[S.RELEVANCE] = to_relevance(data.column(S.RELEVANCE), path, flag)
        return out

    def _assemble(self, columns: dict[str, pa.Array], n: int, kind: str) -> pa.Table:
        schema = self._schema(kind)
        arrays = []
        for f in schema:
            if f.name in columns:
                arrays.append(columns[f.name])
            elif f.name in S.OPTIONAL_TEXT_FIELDS:
                arrays.append(pa.array([""] * n, type=pa.string()))
            else:  # relevance, or an image column this file lacks
                arrays.append(pa.nulls(n, type=f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

def catalog_tables(catalog, validator: Validator, batch_rows: int = 4096) -> Iterator[pa.Table]:
    """Canonical tables of the good rows of a catalogue, a file path or a pandas DataFrame, checked as
    `q2e validate` checks a catalogue file (a file is read `batch_rows` rows at a time)."""
    if isinstance(catalog, (str, os.PathLike)):
        path = os.fspath(catalog)
        if not os.path.exists(path):
            raise InputError(f"catalogue file {path} does not exist")
        yield from validator.iter_file(path, "catalog", batch_rows=batch_rows)
        return
    from tf_q2e.data.frames import CATALOG_DATAFRAME, check_dataframe, dataframe_batch

    yield from validator.iter_batches([dataframe_batch(check_dataframe(catalog, "catalog"), "catalog")],
                                      CATALOG_DATAFRAME, "catalog", quarantine=False)


def bad_rows_error(problems: list[Problem], total: int) -> DataError:
    listed = "; ".join(str(p) for p in problems[:MAX_LISTED_PROBLEMS])
    more = f" (and {total - MAX_LISTED_PROBLEMS} more problems)" if total > MAX_LISTED_PROBLEMS else ""
    return DataError(
        f"{listed}{more}. Fix the rows, or set data.on_bad_rows=skip to quarantine them"
    )


def _write_quarantine(f, raw: RawBatch, bad: np.ndarray, problems: list[Problem]) -> None:
    by_row: dict[int, list[Problem]] = {}
    for p in problems:
        by_row.setdefault(p.row, []).append(p)
    rows = raw.data.take(pa.array(np.flatnonzero(bad))).to_pylist()
    for index, values in zip(np.flatnonzero(bad), rows):
        row = raw.first_row + int(index)
        record = {
            "file": os.path.basename(by_row[row][0].file) if row in by_row else None,
            "row": row,
            "problems": [{"column": p.column, "message": p.message} for p in by_row.get(row, [])],
            "values": {k: _jsonable(v) for k, v in values.items()},
        }
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _jsonable(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# -- whole data sets ----------------------------------------------------------------------


@dataclass
class DatasetReport:
    """Validation of a data set directory: one `FileReport` per file."""

    files: list[FileReport] = field(default_factory=list)

    @property
    def problem_count(self) -> int:
        return sum(f.problem_count for f in self.files)

    @property
    def rows_dropped(self) -> int:
        return sum(f.rows_dropped for f in self.files)

    def to_dict(self) -> dict:
        return {
            "problem_count": self.problem_count,
            "rows_dropped": self.rows_dropped,
            "files": [f.to_dict() for f in self.files],
        }

    def format_text(self, max_problems: int = 20) -> str:
        lines = []
        for f in self.files:
            labels = ", ".join(f"{k} {v}" for k, v in f.labels.items())
            line = f"{f.path}: {f.rows_read} rows read, {f.rows_kept} kept"
            if f.rows_dropped:
                line += f", {f.rows_dropped} dropped"
            if labels:
                line += f" ({labels})"
            lines.append(line)
            lines += [f"  note: {n}" for n in f.notes]
            if f.quarantine:
                lines.append(f"  quarantined rows: {f.quarantine}")
        problems = [p for f in self.files for p in f.problems]
        if problems:
            lines.append(f"{self.problem_count} problem(s):")
            lines += [f"  {p}" for p in problems[:max_problems]]
            if self.problem_count > max_problems:
                lines.append(f"  ... and {self.problem_count - max_problems} more")
        return "\n".join(lines)


def dataset_files(data_dir: str) -> tuple[str, dict[str, str]]:
    """The catalogue path and the split paths of a data set directory.

    Each file may be in any supported format: `catalog.csv` serves as well as
    `catalog.parquet`. Two files of one name in different formats are an error.
    """
    expected = (f"catalog and {', '.join(S.SPLIT_FILES)} files ({', '.join(SUPPORTED_SUFFIXES)}; "
                "make one with q2e synth or q2e prepare)")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data set directory (expected {expected})")
    catalog = _find(data_dir, "catalog")
    if catalog is None:
        raise DataError(f"{data_dir}: no catalogue ({S.CATALOG_FILE} or another format); a data set directory "
                        f"holds {expected}")
    splits = {name: path for name in S.SPLIT_FILES if (path := _find(data_dir, name)) is not None}
    if "train" not in splits:
        raise DataError(f"{data_dir}: no {S.SPLIT_FILES['train']}")
    return catalog, splits


def split_file(data_dir: str, split: str) -> tuple[str, str]:
    """The catalogue path and the path of one split (`train`, `validation`, `test`) of a data set directory."""
    catalog, splits = dataset_files(data_dir)
    if split not in splits:
        raise DataError(f"{data_dir}: no {S.SPLIT_FILES.get(split, split)} (splits found: {', '.join(splits)})")
    return catalog, splits[split]


def _find(data_dir: str, stem: str) -> str | None:
    found = [os.path.join(data_dir, stem + suffix) for suffix in SUPPORTED_SUFFIXES
             if os.path.exists(os.path.join(data_dir, stem + suffix))]
    for path in found:
        if not os.path.isfile(path):
            raise DataError(f"{path}: not a regular file (a directory?); the data set's {stem} file must be a file "
                            f"such as {stem}.parquet or {stem}.csv")
    if len(found) > 1:
        raise DataError(f"{data_dir}: more than one {stem} file ({', '.join(map(os.path.basename, found))}); keep one")
    return found[0] if found else None


def validate_dataset(
    data_dir: str,
    on_bad_rows: str = "error",
    image_dim: int | None = None,
    quarantine_dir: str | None = None,
) -> DatasetReport:
    """Validates a data set directory: the catalogue, then each split against it.

    With `on_bad_rows="error"` every problem is collected (nothing raises for
    bad rows); the caller decides from `report.problem_count`.
    """
    catalog, splits = dataset_files(data_dir)
    validator = Validator(
        on_bad_rows="collect" if on_bad_rows == "error" else on_bad_rows,
        image_dim=image_dim,
        quarantine_dir=quarantine_dir,
    )
    report = DatasetReport()
    report.files.append(validator.load_catalog(catalog))
    for path in splits.values():
        file_report = FileReport(path, "impressions")
        for _ in validator.iter_file(path, "impressions", file_report):
            pass
        report.files.append(file_report)
    return report
