"""WANDS adapter (`--dataset wands`): Wayfair ANnotation DataSet.

Input: the directory that holds `query.csv`, `product.csv` and `label.csv`, or
their parent with a `dataset/` subdirectory, as in the WANDS repository. The
files are **tab-separated** and UTF-8, with a header row.

| file | columns used | canonical column |
|---|---|---|
| `query.csv` | `query_id`, `query` | `query` (looked up by `query_id`) |
| `product.csv` | `product_id` | `product_id` |
| `product.csv` | `product_name` | `product_title` |
| `product.csv` | `product_description` | `product_description` |
| `product.csv` | `product_class`, `category hierarchy` | `product_category` = `product_class`, or when empty the last `/`-separated part of `category hierarchy` |
| `label.csv` | `query_id`, `product_id`, `label` | one impression row each; `engaged`, `relevance` below |

`query_class`, `product_features`, the rating and review counts, and the `id`
column of `label.csv` are not used. A `query_id` must appear in `query.csv`
only once.

| `label` | `engaged` | `relevance` |
|---|---|---|
| Exact | 1 (engaged) | 2 |
| Partial | -1 (no engagement label) | 1 |
| Irrelevant | 0 (hard negative) | 0 |

The catalogue holds every product in `product.csv` (42,994 in the published one).
"""

from __future__ import annotations

import os
from collections import Counter

import pyarrow as pa

from tf_q2e.data.adapters.canonical import _Source
from tf_q2e.data.adapters.inputs import _csv_rows, _file_info, _map_labels, _require_file
from tf_q2e.data.adapters.text import _collapse
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

WANDS_LABEL_MAPPING = {
    "Exact": {"engaged": ENGAGED_YES, "relevance": 2},
    "Partial": {"engaged": ENGAGED_UNLABELLED, "relevance": 1},
    "Irrelevant": {"engaged": ENGAGED_NO, "relevance": 0},
}
WANDS_QUERY_FILE = "query.csv"
WANDS_PRODUCT_FILE = "product.csv"
WANDS_LABEL_FILE = "label.csv"
WANDS_QUERY_COLUMNS = ("query_id", "query")
WANDS_PRODUCT_COLUMNS = ("product_id", "product_name", "product_class", "category hierarchy", "product_description")
WANDS_LABEL_COLUMNS = ("query_id", "product_id", "label")


def _read_wands(input_path: str) -> _Source:
    fix_dir = "pass the directory holding WANDS's query.csv, product.csv and label.csv (tab-separated)"
    if not os.path.isdir(input_path):
        raise DataError(f"{input_path}: WANDS input must be a directory; {fix_dir}")
    directory = input_path
    nested = os.path.join(input_path, "dataset")
    if not os.path.isfile(os.path.join(directory, WANDS_LABEL_FILE)) and os.path.isdir(nested):
        directory = nested
    paths = {name: os.path.join(directory, name) for name in (WANDS_QUERY_FILE, WANDS_PRODUCT_FILE, WANDS_LABEL_FILE)}
    for name, path in paths.items():
        _require_file(path, f"WANDS {name}", fix_dir)

    query_path = paths[WANDS_QUERY_FILE]
    queries: dict[str, tuple[int, str]] = {}
    with open(query_path, encoding="utf-8-sig", newline="") as stream:
        for row, values in _csv_rows(stream, query_path, "\t", WANDS_QUERY_COLUMNS, _wands_fix(WANDS_QUERY_COLUMNS)):
            query_id = _wands_id(values, "query_id", query_path, row)
            if query_id in queries:
                raise DataError(
                    f"{query_path}: data row {row}, column 'query_id': query_id {query_id!r} appears again "
                    f"(first at data row {queries[query_id][0]}); give each query one row"
                )
            queries[query_id] = (row, values["query"])

    product_path = paths[WANDS_PRODUCT_FILE]
    product_ids, titles, descriptions, categories = [], [], [], []
    with open(product_path, encoding="utf-8-sig", newline="") as stream:
        for row, values in _csv_rows(stream, product_path, "\t", WANDS_PRODUCT_COLUMNS, _wands_fix(WANDS_PRODUCT_COLUMNS)):
            product_ids.append(_wands_id(values, "product_id", product_path, row))
            titles.append(values["product_name"])
            descriptions.append(_collapse(values["product_description"]))
            categories.append(_wands_category(values["product_class"], values["category hierarchy"]))

    label_path = paths[WANDS_LABEL_FILE]
    impression_queries, impression_products, labels = [], [], []
    unknown_query = 0
    labels_read = 0
    label_counts = Counter({name: 0 for name in WANDS_LABEL_MAPPING})
    with open(label_path, encoding="utf-8-sig", newline="") as stream:
        for row, values in _csv_rows(stream, label_path, "\t", WANDS_LABEL_COLUMNS, _wands_fix(WANDS_LABEL_COLUMNS)):
            labels_read += 1
            label = values["label"].strip()
            label_counts[label] += 1
            if label not in WANDS_LABEL_MAPPING:
                raise DataError(
                    f"{label_path}: data row {row}, column 'label': unknown label value {values['label']!r}; "
                    f"expected one of {', '.join(WANDS_LABEL_MAPPING)}; fix or remove the row"
                )
            query_id = _wands_id(values, "query_id", label_path, row)
            product_id = _wands_id(values, "product_id", label_path, row)
            if query_id not in queries:
                unknown_query += 1
                continue
            impression_queries.append(queries[query_id][1])
            impression_products.append(product_id)
            labels.append(label)
    engaged, relevance, _ = _map_labels(pa.array(labels, pa.string()), WANDS_LABEL_MAPPING, label_path, "label")
    impressions = pa.table(
        {
            QUERY: pa.array(impression_queries, type=pa.string()),
            PRODUCT_ID: pa.array(impression_products, type=pa.string()),
            ENGAGED: engaged,
            RELEVANCE: relevance,
        }
    )
    records = pa.table(
        {
            PRODUCT_ID: pa.array(product_ids, type=pa.string()),
            PRODUCT_TITLE: pa.array(titles, type=pa.string()),
            PRODUCT_DESCRIPTION: pa.array(descriptions, type=pa.string()),
            PRODUCT_CATEGORY: pa.array(categories, type=pa.string()),
        }
    )
    info = {
        "dataset": "wands",
        "input_files": [_file_info(paths[name]) for name in (WANDS_QUERY_FILE, WANDS_PRODUCT_FILE, WANDS_LABEL_FILE)],
        "fields": {
            QUERY: "query.csv query (by query_id)",
            PRODUCT_ID: "product_id",
            PRODUCT_TITLE: "product_name",
            PRODUCT_DESCRIPTION: "product_description",
            PRODUCT_CATEGORY: "product_class, else the last part of 'category hierarchy'",
            RELEVANCE: "label",
        },
        "label_mapping": WANDS_LABEL_MAPPING,
        "label_counts": dict(label_counts),
    }
    return _Source(
        impressions,
        records,
        f"product_id not in {WANDS_PRODUCT_FILE}",
        info,
        dropped_impressions={f"query_id not in {WANDS_QUERY_FILE}": unknown_query},
        impressions_read=labels_read,
    )


def _wands_fix(columns) -> str:
    return f"expected WANDS's tab-separated file with columns {', '.join(columns)}"


def _wands_id(values: dict, column: str, label: str, row: int) -> str:
    value = values[column].strip()
    if not value:
        raise DataError(f"{label}: data row {row}, column {column!r} is empty; every row needs one")
    return value


def _wands_category(product_class: str, hierarchy: str) -> str:
    category = _collapse(product_class)
    if category:
        return category
    parts = [p.strip() for p in hierarchy.split("/") if p.strip()]
    return _collapse(parts[-1]) if parts else ""
