"""Reading and checking adapter input: files, columns, CSV rows and label values.

Every problem raises `tf_q2e.errors.DataError` naming the file, the 1-based data
row and the column, and saying how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.errors import DataError


def _file_info(path: str, **extra) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": os.path.basename(path), **extra, "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _require_file(path: str, what: str, fix: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found; {fix}")


def _require_columns(label: str, present, required, fix: str) -> dict[str, int]:
    """Position of each required column; DataError naming the missing ones."""
    present = list(present)
    missing = [c for c in required if c not in present]
    if missing:
        raise DataError(
            f"{label}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)} "
            f"(found {', '.join(repr(c) for c in present)}); {fix}"
        )
    return {c: present.index(c) for c in required}


def _csv_rows(stream, label: str, delimiter: str, required, fix: str):
    """Yields (data row number from 1, {column: value}) for the required columns.

    A record with the wrong number of fields raises DataError naming the row, its
    line and the first missing column.
    """
    reader = csv.reader(stream, delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{label}: the file is empty; expected a header row with {', '.join(required)}")
        header = [h.strip().lstrip("\ufeff") for h in header]
        positions = _require_columns(label, header, required, fix)
        row_number = 0
        for record in reader:
            if not record:  # a blank line is no record
                continue
            row_number += 1
            if len(record) != len(header):
                where = f"column {header[len(record)]!r} is missing" if len(record) < len(header) else "extra fields"
                raise DataError(
                    f"{label}: data row {row_number} (line {reader.line_num}) has {len(record)} fields, "
                    f"expected {len(header)} ({where}); check the delimiter and quoting"
                )
            yield row_number, {c: record[i] for c, i in positions.items()}
    except csv.Error as e:
        raise DataError(f"{label}: data row after line {reader.line_num} is not valid CSV ({e}); {fix}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not valid UTF-8 near line {reader.line_num} ({e}); save the file as UTF-8") from e


def _map_labels(labels, mapping: dict, label: str, column: str):
    """(engaged int8, relevance float32, rows per label) of a label column; DataError on unknown values."""
    labels = pc.cast(labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels, pa.string())
    if labels.null_count:
        row = int(np.flatnonzero(pc.is_null(labels).to_numpy(zero_copy_only=False))[0]) + 1
        raise DataError(f"{label}: data row {row}, column {column!r}: the label is empty; expected one of {', '.join(mapping)}")
    encoded = labels.dictionary_encode()
    names = encoded.dictionary.to_pylist()
    for name in names:
        if name not in mapping:
            row = pc.index(labels, name).as_py() + 1
            raise DataError(
                f"{label}: data row {row}, column {column!r}: unknown label value {name!r}; "
                f"expected one of {', '.join(mapping)}; fix or remove the row"
            )
    codes = encoded.indices.to_numpy()
    engaged = np.array([mapping[n]["engaged"] for n in names], dtype=np.int8)[codes]
    relevance = np.array([mapping[n]["relevance"] for n in names], dtype=np.float32)[codes]
    counts = np.bincount(codes, minlength=len(names))
    return pa.array(engaged), pa.array(relevance), {n: int(counts[names.index(n)]) if n in names else 0 for n in mapping}
