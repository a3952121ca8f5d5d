"""Home Depot adapter (`--dataset homedepot`): Kaggle's Home Depot Product Search Relevance.

Input: Kaggle's "Home Depot Product Search Relevance" `train.csv`, or the
`train.csv.zip` holding it, or a directory holding either of them. The file is
comma-separated, has a header row and double-quoted strings, and is encoded in
**ISO-8859-1 (latin-1)**. It is read as latin-1, so its few bytes above 0x7F
become the latin-1 characters they encode (e.g. `\\xe5` -> `å`).

| input column | type | canonical column |
|---|---|---|
| `id` | int | not used |
| `product_uid` | int | `product_id` = `str(product_uid)` |
| `product_title` | str | `product_title` |
| `search_term` | str | `query` |
| `relevance` | float 1.0-3.0 (mean of >= 3 ratings, rounded to 2 decimals) | `relevance` (the raw rating); `engaged` below |

| `relevance` | `engaged` | `relevance` |
|---|---|---|
| >= 2.67 (2.665 or more) | 1 (engaged) | raw rating |
| 2.0 < r < 2.67 (2.25, 2.33, 2.5) | -1 (no engagement label) | raw rating |
| <= 2.0 | 0 (hard negative) | raw rating |

The ratings are means rounded to 2 decimals, so each threshold is widened by
0.005 (half a unit in the last place): 2.6666... is written 2.67 and counts as
engaged. A relevance outside 1.0-3.0, or one that is not a number, raises
DataError. There is no description, category or image. The catalogue holds
every distinct `product_uid` (54,667 in the real file). Some products appear
with two slightly different titles (15 in the real file): the title seen in the
most rows wins, and the impression rows carry it too.
"""

from __future__ import annotations

import io
import math
import os
import zipfile

import numpy as np
import pyarrow as pa

from tf_q2e.data.adapters.canonical import _Source
from tf_q2e.data.adapters.inputs import _csv_rows, _file_info, _require_file
from tf_q2e.data.schema import (
    ENGAGED,
    ENGAGED_NO,
    ENGAGED_UNLABELLED,
    ENGAGED_YES,
    PRODUCT_CATEGORY,
    PRODUCT_DESCRIPTION,
    PRODUCT_ID,
    PRODUCT_TITLE,
    QUERY,
    RELEVANCE,
)
from tf_q2e.errors import DataError

# Home Depot: ratings are means rounded to 2 decimals; thresholds widened by half a unit.
HOMEDEPOT_ENGAGED_MIN = 2.665
HOMEDEPOT_NOT_ENGAGED_MAX = 2.005
HOMEDEPOT_RELEVANCE_RANGE = (1.0, 3.0)
HOMEDEPOT_LABEL_MAPPING = {
    f"relevance >= {HOMEDEPOT_ENGAGED_MIN}": {"engaged": ENGAGED_YES, "relevance": "raw rating"},
    f"{HOMEDEPOT_NOT_ENGAGED_MAX} < relevance < {HOMEDEPOT_ENGAGED_MIN}": {
        "engaged": ENGAGED_UNLABELLED,
        "relevance": "raw rating",
    },
    f"relevance <= {HOMEDEPOT_NOT_ENGAGED_MAX}": {"engaged": ENGAGED_NO, "relevance": "raw rating"},
}
HOMEDEPOT_FILE = "train.csv"
HOMEDEPOT_COLUMNS = ("product_uid", "product_title", "search_term", "relevance")


def _read_homedepot(input_path: str) -> _Source:
    path = input_path
    if os.path.isdir(input_path):
        candidates = [os.path.join(input_path, n) for n in (HOMEDEPOT_FILE, HOMEDEPOT_FILE + ".zip")]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[1])
        _require_file(path, "Home Depot train.csv or train.csv.zip", "pass Kaggle's train.csv or train.csv.zip as --input")
    fix = "pass Kaggle's Home Depot train.csv (columns id, product_uid, product_title, search_term, relevance)"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = _zip_member(archive, path)
            label = f"{path} (member {member})"
            with archive.open(member) as raw:
                columns = _homedepot_columns(io.TextIOWrapper(raw, encoding="latin-1", newline=""), label, fix)
        info_file = _file_info(path, member=member)
    else:
        with open(path, encoding="latin-1", newline="") as stream:
            columns = _homedepot_columns(stream, path, fix)
        info_file = _file_info(path)
    queries, product_ids, titles, relevance = columns
    relevance = np.asarray(relevance, dtype=np.float64)
    engaged = np.full(len(relevance), ENGAGED_UNLABELLED, dtype=np.int8)
    engaged[relevance >= HOMEDEPOT_ENGAGED_MIN] = ENGAGED_YES
    engaged[relevance <= HOMEDEPOT_NOT_ENGAGED_MAX] = ENGAGED_NO
    ids = pa.array(product_ids, type=pa.string())
    impressions = pa.table(
        {
            QUERY: pa.array(queries, type=pa.string()),
            PRODUCT_ID: ids,
            ENGAGED: pa.array(engaged),
            RELEVANCE: pa.array(relevance.astype(np.float32)),
        }
    )
    empty = pa.array([""] * len(ids), type=pa.string())
    records = pa.table(
        {PRODUCT_ID: ids, PRODUCT_TITLE: pa.array(titles, type=pa.string()), PRODUCT_DESCRIPTION: empty, PRODUCT_CATEGORY: empty}
    )
    values, counts = np.unique(np.round(relevance, 2), return_counts=True)
    info = {
        "dataset": "homedepot",
        "input_files": [info_file],
        "fields": {
            QUERY: "search_term",
            PRODUCT_ID: "str(product_uid)",
            PRODUCT_TITLE: "product_title",
            PRODUCT_DESCRIPTION: None,
            PRODUCT_CATEGORY: None,
            RELEVANCE: "relevance",
        },
        "label_mapping": HOMEDEPOT_LABEL_MAPPING,
        "label_counts": {f"{v:.2f}": int(c) for v, c in zip(values, counts)},
        "notes": ["product records are the impression rows: each row carries its product's title"],
    }
    return _Source(impressions, records, "product not in catalogue", info, impressions_read=len(queries))


def _zip_member(archive: zipfile.ZipFile, path: str) -> str:
    names = [n for n in archive.namelist() if not n.endswith("/")]
    named = [n for n in names if os.path.basename(n) == HOMEDEPOT_FILE]
    csvs = [n for n in names if n.lower().endswith(".csv")]
    if named:
        return named[0]
    if len(csvs) == 1:
        return csvs[0]
    raise DataError(f"{path}: the zip holds {names}, expected one train.csv; pass the zip Kaggle publishes or the CSV itself")


def _homedepot_columns(stream, label: str, fix: str):
    queries, product_ids, titles, relevance = [], [], [], []
    low, high = HOMEDEPOT_RELEVANCE_RANGE
    for row, values in _csv_rows(stream, label, ",", HOMEDEPOT_COLUMNS, fix):
        uid = values["product_uid"].strip()
        if not uid.isascii() or not uid.isdigit():
            raise DataError(
                f"{label}: data row {row}, column 'product_uid': {values['product_uid']!r} is not an integer product id; "
                "fix or remove the row"
            )
        try:
            rating = float(values["relevance"])
        except ValueError:
            rating = math.nan
        if not low - 1e-9 <= rating <= high + 1e-9:  # also rejects NaN
            raise DataError(
                f"{label}: data row {row}, column 'relevance': unknown label value {values['relevance']!r}; "
                f"expected a number from {low} to {high} (the mean rating); fix or remove the row"
            )
        queries.append(values["search_term"])
        product_ids.append(str(int(uid)))
        titles.append(values["product_title"])
        relevance.append(rating)
    return queries, product_ids, titles, relevance
