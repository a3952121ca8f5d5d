"""A pandas DataFrame as a `RawBatch`: the in-memory reader beside the file readers of `formats.py`.

`dataframe_batch` hands a DataFrame's columns to `validate.Validator` as they
are, as a file reader does; the Validator converts and checks them with the
same code and messages as for files, the DataFrame's source name ("DataFrame")
standing in for the file path. Rows are numbered from 1, as in files: row r
is `df.iloc[r - 1]`, whatever the DataFrame's index.

A column converts to Arrow as pandas would (`pa.array(series, from_pandas=True)`:
NaN, None, `pd.NA` are missing values; integer product ids are read as their
decimal strings by the Validator). A column of mixed Python types (an object
column holding strings and an integer) is checked cell by cell, as JSONL rows
are: each cell of the wrong kind is a problem of its row (`expected a string,
got int 123`). Columns the schema does not know are not converted (the
Validator ignores them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from tf_q2e.data import schema as S
from tf_q2e.data.formats import LIST_COLUMNS, NUMBER_COLUMNS, RawBatch, RowProblem, cells_to_array

# The source name of a DataFrame's rows in problems: "DataFrame: row 3, column query: empty query".
DATAFRAME = "DataFrame"
CATALOG_DATAFRAME = "catalog DataFrame"
# How the rows of a DataFrame are numbered, appended to errors that name a DataFrame's rows.
ROW_NUMBERS = "DataFrame rows count from 1, as in files: row r is df.iloc[r - 1]"


def check_dataframe(df, what: str = "df") -> pd.DataFrame:
    """`df` if it is a pandas DataFrame, else a TypeError naming `what` and the type given."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    return df


def dataframe_batch(df: pd.DataFrame, kind: str) -> RawBatch:
    """The DataFrame's rows as one `RawBatch` (first row 1), for `Validator.iter_batches`.

    Args:
      df: the rows, one column per field (its index is not read).
      kind: "impressions" or "catalog": which columns are the schema's.

    Returns:
      A `RawBatch` of the DataFrame's columns, with a problem for each cell of
      the wrong kind in a column of mixed types.

    Example:
      >>> raw = dataframe_batch(pd.DataFrame({"product_id": [7], "product_title": ["lamp"]}), "catalog")
      >>> raw.data.column("product_id").type
      DataType(int64)
    """
    check_dataframe(df)
    names = [str(c) for c in df.columns]
    problems: list[RowProblem] = []
    arrays = []
    for position, name in enumerate(names):
        if _in_schema(name, kind):
            arrays.append(column_array(df.iloc[:, position], name, problems))
        else:  # ignored by the Validator (it notes the name): not worth converting
            arrays.append(pa.nulls(len(df)))
    batch = pa.RecordBatch.from_arrays(arrays, names=names) if names else pa.RecordBatch.from_pydict({})
    problems.sort(key=lambda p: p.row)
    return RawBatch(batch, 1, problems)


def _in_schema(name: str, kind: str) -> bool:
    if kind == "catalog":
        return name in S.catalog_schema(1).names
    return name in S.impression_schema(1).names or S.is_query_context(name)


def column_array(series: pd.Series, name: str, problems: list[RowProblem], first_row: int = 1) -> pa.Array:
    """One DataFrame column as an Arrow array; a column of mixed types checked cell by cell."""
    try:
        array = pa.array(series, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return cells_to_array(name, [_cell(v) for v in series.tolist()], first_row, problems)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):  # a categorical column
        array = array.dictionary_decode()
    if pa.types.is_null(array.type):  # no value at all (or no row): the type a file reader gives such a column
        array = array.cast(pa.list_(pa.float64()) if name in LIST_COLUMNS else pa.float64() if name in NUMBER_COLUMNS
                           else pa.string())
    return array


def _cell(value):
    """A pandas cell as a plain Python value; None when missing (None, NaN, pd.NA, NaT)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return None
    return value
