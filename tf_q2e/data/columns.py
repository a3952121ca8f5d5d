"""Column converters: a file's column as stored -> the canonical Arrow type.

Each converter takes the column, the file path (for whole-column type errors,
raised as `DataError`) and `flag(rows, column, message)`, which records a
problem for rows of the batch; flagged rows are dropped or reported by the
caller (`validate.Validator`). Text formats hand over cells as bytes, so a
non-UTF-8 byte is flagged per row instead of failing the file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.data import schema as S
from tf_q2e.errors import DataError

LABEL_TOKENS = {"1": 1, "0": 0, "-1": -1, "1.0": 1, "0.0": 0, "-1.0": -1, "true": 1, "false": 0}


def true_rows(mask) -> np.ndarray:
    return np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))


def to_string(column: pa.Array, path: str, name: str, required: bool, flag) -> pa.Array:
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.dictionary_decode(), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        column = column.cast(pa.string())
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            column = column.cast(pa.string())
        except pa.ArrowInvalid:
            values = column.to_pylist()
            bad = {i for i, v in enumerate(values) if v is not None and not _is_utf8(v)}
            flag(sorted(bad), name, "not valid UTF-8 text")
            column = pa.array(
                [None if v is None or i in bad else v.decode("utf-8") for i, v in enumerate(values)], type=pa.string()
            )
    elif name == S.PRODUCT_ID and pa.types.is_integer(t):
        column = column.cast(pa.string())
    else:
        expected = "string or integer" if name == S.PRODUCT_ID else "string"
        raise DataError(f"{path}: column {name} (every row) has type {t}; expected {expected}")
    nulls = column.is_null()
    if required:
        flag(true_rows(nulls), name, "missing value")
    return column.fill_null("")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _text_cells(column: pa.Array, name: str, flag) -> pa.Array:
    """Text cells (from CSV) as a string array; non-UTF-8 cells flagged and nulled."""
    if pa.types.is_string(column.type):
        return column
    return to_string(column, "", name, required=False, flag=flag)


def to_label(column: pa.Array, path: str, flag) -> pa.Array:
    name = S.ENGAGED
    t = column.type
    if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_lower(pc.utf8_trim_whitespace(_text_cells(column, name, flag)))
        tokens = list(LABEL_TOKENS)
        code = pc.index_in(text, value_set=pa.array(tokens))
        values = np.array([LABEL_TOKENS[k] for k in tokens], dtype=np.int8)
        idx = code.to_numpy(zero_copy_only=False)
        known = ~np.isnan(idx.astype(np.float64))
        texts = text.to_pylist()
        for i in np.flatnonzero(~known):
            cell = texts[i]
            problem = "missing value" if cell == "" else "NaN label" if cell == "nan" else f"not a label: {cell!r}"
            flag([i], name, f"{problem}; {_LABEL_HELP}")
        labels = np.zeros(len(idx), dtype=np.int8)
        labels[known] = values[idx[known].astype(np.int64)]
        return pa.array(labels, type=pa.int8())
    if pa.types.is_boolean(t):
        flag(true_rows(column.is_null()), name, "missing value")
        return column.fill_null(False).cast(pa.int8())
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise DataError(f"{path}: column {name} (every row) has type {t}; expected integers 1/0/-1 or booleans")
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    flag(np.flatnonzero(nulls), name, "missing value")
    nan = np.isnan(values) & ~nulls
    flag(np.flatnonzero(nan), name, f"NaN label; {_LABEL_HELP}")
    finite = np.nan_to_num(values, nan=0.0)
    other = ~np.isin(finite, (1.0, 0.0, -1.0)) & ~nan & ~nulls
    flag(np.flatnonzero(other), name, lambda i: f"not a label: {values[i]:g}; {_LABEL_HELP}")
    return pa.array(np.where(other, 0, finite).astype(np.int8), type=pa.int8())


_LABEL_HELP = "engaged must be 1 (engaged), 0 (shown, not engaged) or -1 (no engagement label)"


def to_relevance(column: pa.Array, path: str, flag) -> pa.Array:
    name = S.RELEVANCE
    t = column.type
    if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_trim_whitespace(_text_cells(column, name, flag))
        cells = text.to_pylist()
        values = np.full(len(cells), np.nan)
        nulls = np.zeros(len(cells), dtype=bool)
        for i, cell in enumerate(cells):
            if cell is None or cell == "":
                nulls[i] = True
                continue
            try:
                values[i] = float(cell)
            except ValueError:
                flag([i], name, f"not a number: {short(cell)}")
                nulls[i] = True
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        nulls = column.is_null().to_numpy(zero_copy_only=False)
    else:
        raise DataError(f"{path}: column {name} (every row) has type {t}; expected numbers")
    flag(np.flatnonzero(np.isnan(values) & ~nulls), name, "NaN relevance; leave the cell empty (null) for an ungraded pair")
    with np.errstate(over="ignore"):
        grades = values.astype(np.float32)
    infinite = np.isinf(values) & ~nulls
    flag(np.flatnonzero(infinite), name, lambda i: f"relevance {values[i]:g}; give a finite grade, or leave the cell "
         "empty (null) for an ungraded pair")
    too_large = np.isinf(grades) & np.isfinite(values) & ~nulls
    flag(np.flatnonzero(too_large), name, lambda i: f"relevance {values[i]:g} is too large for a 32-bit float "
         f"(at most {np.finfo(np.float32).max:.4g}); give the grade on a smaller scale")
    return pa.array(grades, mask=nulls | ~np.isfinite(grades), type=pa.float32())


def parse_list_cells(column: pa.Array, path: str, flag) -> pa.Array:
    """`[0.1, 0.2]` or `0.1 0.2` text cells -> list<float64>; empty -> null."""
    name = S.PRODUCT_IMAGE_EMBEDDING
    cells = _text_cells(column, name, flag).to_pylist()
    out: list = []
    for i, cell in enumerate(cells):
        text = (cell or "").strip().strip("[]").replace(",", " ")
        if not text:
            out.append(None)
            continue
        try:
            out.append([float(x) for x in text.split()])
        except ValueError:
            flag([i], name, f"not a list of numbers: {short(cell)}")
            out.append(None)
    return pa.array(out, type=pa.list_(pa.float64()))


def embedding_matrix(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = column.type.list_size
    values = column.cast(pa.list_(pa.float32(), dim)).flatten().to_numpy(zero_copy_only=False) if column.null_count == 0 else None
    if values is not None:
        return values.reshape(len(column), dim)
    rows = [np.full(dim, np.nan, dtype=np.float32) if v is None else np.asarray(v, dtype=np.float32) for v in column.to_pylist()]
    return np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def to_embedding(column: pa.Array, path: str, dim: int | None, flag) -> tuple[pa.Array, int | None]:
    """Image embeddings -> fixed-size list<float32>; `dim` None takes the first length seen.

    Returns the array (rows of the wrong length nulled, and flagged) and the length.
    """
    name = S.PRODUCT_IMAGE_EMBEDDING
    if pa.types.is_binary(column.type) or pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = parse_list_cells(column, path, flag)
    elif not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)):
        raise DataError(f"{path}: column {name} (every row) has type {column.type}; expected a list of floats")
    elif not (pa.types.is_floating(column.type.value_type) or pa.types.is_integer(column.type.value_type)):
        raise DataError(f"{path}: column {name} (every row) has type {column.type}; expected a list of floats")
    # Integers beyond 2**24 fail a safe cast to float32: go through float64, unchecked (float64 -> float32 is not
    # checked either; values beyond float32 are flagged below).
    column = column.cast(pa.list_(pa.float32() if pa.types.is_float32(column.type.value_type) else pa.float64()),
                         safe=False)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    valid = ~np.isnan(lengths.astype(np.float64))  # null embeddings (no image) have null length
    if dim is None:
        first = np.flatnonzero(valid & (np.nan_to_num(lengths) > 0))
        if len(first):
            dim = int(lengths[first[0]])
    size = dim or 0
    # An empty list is never an embedding (not even when no row has one): null is how a row says "no image".
    empty = valid & (np.nan_to_num(lengths) == 0)
    values_wanted = f"its {size} values" if size else "its values"
    flag(np.flatnonzero(empty), name,
         f"image embedding is an empty list; give {values_wanted}, or null (no value) for no image")
    wrong = (valid & (np.nan_to_num(lengths) != size)) | empty
    flag(np.flatnonzero(wrong), name, lambda i: f"image embedding has length {int(lengths[i])}, expected {size}")
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    if len(values) and not np.isfinite(values).all():
        row_of_value = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)  # right for slices too
        flag(np.unique(row_of_value[~np.isfinite(values)]), name, "image embedding holds NaN or infinity")
    if values.dtype == np.float64 and len(values):
        too_large = np.abs(np.nan_to_num(values, posinf=0.0, neginf=0.0)) > np.finfo(np.float32).max
        if too_large.any():
            row_of_value = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            flag(np.unique(row_of_value[too_large]), name,
                 "image embedding holds a value too large for a 32-bit float (more than 3.4e38)")
        column = column.cast(pa.list_(pa.float32()))
    # Rows that are flagged are dropped later; make the column castable to fixed size now.
    fixed = pa.list_(pa.float32(), size or 1)
    keep = pa.array(~wrong)
    safe = pc.if_else(keep, column, pa.scalar(None, type=column.type))
    return safe.cast(fixed), dim
