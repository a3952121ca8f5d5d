"""ESCI adapter (`--dataset esci`): Amazon Shopping Queries.

Input: the directory that holds the published
`shopping_queries_dataset_examples.parquet` and
`shopping_queries_dataset_products.parquet`. A single parquet file of examples
that already holds all the product columns below (a merge of the two on
`product_id` and `product_locale`) is accepted too.

| file | columns used | canonical column |
|---|---|---|
| examples | `query` | `query` |
| examples | `product_locale` (us/es/jp) | `query_locale` (query context) |
| examples | `product_locale`, `product_id` (ASIN) | `product_id` = `"{product_locale}:{product_id}"`, e.g. `us:B07X3Y6B1V` |
| examples | `esci_label` (E/S/C/I) | `engaged`, `relevance` below |
| products | `product_title` | `product_title` |
| products | `product_description`, `product_bullet_point`, `product_brand`, `product_color` | `product_description` below |
| - | - | `product_category` = "" (ESCI has no category) |

An ESCI product id is unique only within a locale: one ASIN can be two
products, with titles in different languages. The canonical id therefore
carries the locale. `example_id`, `query_id`, `small_version`, `large_version`
and `split` are not used.

`product_description` is `"brand: {brand}. color: {color}. {text}"`. Here
`text` is `product_description` with its HTML tags removed, its HTML entities
unescaped and its white space collapsed, or `product_bullet_point` (cleaned the
same way) when the description is empty. A missing brand or colour leaves out
its part, e.g. `"brand: Acme. Soft cotton shirt."`.

| `esci_label` | meaning | `engaged` | `relevance` |
|---|---|---|---|
| E | Exact | 1 (engaged) | 3 |
| S | Substitute | -1 (no engagement label) | 2 |
| C | Complement | -1 (no engagement label) | 1 |
| I | Irrelevant | 0 (hard negative) | 0 |

The catalogue holds every product in the products file, including products no
example uses. For a merged file, it holds every product in the examples.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tf_q2e.data.adapters.canonical import _Source
from tf_q2e.data.adapters.inputs import _file_info, _map_labels, _require_columns, _require_file
from tf_q2e.data.adapters.text import _count_true, _non_blank, _plain_text
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

ESCI_LABEL_MAPPING = {
    "E": {"engaged": ENGAGED_YES, "relevance": 3},
    "S": {"engaged": ENGAGED_UNLABELLED, "relevance": 2},
    "C": {"engaged": ENGAGED_UNLABELLED, "relevance": 1},
    "I": {"engaged": ENGAGED_NO, "relevance": 0},
}
ESCI_EXAMPLES_FILE = "shopping_queries_dataset_examples.parquet"
ESCI_PRODUCTS_FILE = "shopping_queries_dataset_products.parquet"
ESCI_EXAMPLE_COLUMNS = ("query", "product_id", "product_locale", "esci_label")
ESCI_PRODUCT_COLUMNS = (
    "product_id",
    "product_locale",
    "product_title",
    "product_description",
    "product_bullet_point",
    "product_brand",
    "product_color",
)
ESCI_CONTEXT_COLUMN = "query_locale"


def _read_esci(input_path: str) -> _Source:
    merged = not os.path.isdir(input_path)
    if merged:
        examples_path = products_path = input_path
    else:
        examples_path = os.path.join(input_path, ESCI_EXAMPLES_FILE)
        products_path = os.path.join(input_path, ESCI_PRODUCTS_FILE)
        fix = "pass the directory holding both published ESCI parquet files, or one merged parquet file"
        _require_file(examples_path, "ESCI examples file", fix)
        _require_file(products_path, "ESCI products file", fix)
    _require_columns(
        examples_path,
        _parquet_columns(examples_path),
        ESCI_EXAMPLE_COLUMNS + (ESCI_PRODUCT_COLUMNS[2:] if merged else ()),
        "pass the published shopping_queries_dataset_examples.parquet"
        + (" merged with the product columns of shopping_queries_dataset_products.parquet, or the directory holding both" if merged else ""),
    )
    if not merged:
        _require_columns(
            products_path,
            _parquet_columns(products_path),
            ESCI_PRODUCT_COLUMNS,
            "pass the published shopping_queries_dataset_products.parquet",
        )

    examples = pq.read_table(examples_path, columns=list(ESCI_EXAMPLE_COLUMNS))
    locale = _esci_key_column(examples, "product_locale", examples_path)
    asin = _esci_key_column(examples, "product_id", examples_path)
    engaged, relevance, label_counts = _map_labels(examples.column("esci_label"), ESCI_LABEL_MAPPING, examples_path, "esci_label")
    impressions = pa.table(
        {
            QUERY: pc.cast(examples.column("query"), pa.string()),
            ESCI_CONTEXT_COLUMN: locale,
            PRODUCT_ID: pc.binary_join_element_wise(locale, asin, ":"),
            ENGAGED: engaged,
            RELEVANCE: relevance,
        }
    )
    records = _esci_product_records(products_path)
    info = {
        "dataset": "esci",
        "input_files": [_file_info(examples_path)] + ([] if merged else [_file_info(products_path)]),
        "fields": {
            QUERY: "query",
            ESCI_CONTEXT_COLUMN: "product_locale",
            PRODUCT_ID: "f'{product_locale}:{product_id}'",
            PRODUCT_TITLE: "product_title",
            PRODUCT_DESCRIPTION: "'brand: {product_brand}. color: {product_color}. ' + "
            "(product_description without HTML, else product_bullet_point); empty parts left out",
            PRODUCT_CATEGORY: None,
            RELEVANCE: "esci_label",
        },
        "label_mapping": ESCI_LABEL_MAPPING,
        "label_counts": label_counts,
        "notes": [
            "ESCI product ids are unique per locale; the canonical product_id is '{product_locale}:{product_id}'",
            "the examples' split, small_version and large_version columns are not used; rows are split by query",
        ]
        + (["merged input: product records are the example rows"] if merged else []),
    }
    reason = "product not in the examples" if merged else f"product not in {ESCI_PRODUCTS_FILE}"
    return _Source(impressions, records, reason, info, (ESCI_CONTEXT_COLUMN,), impressions_read=examples.num_rows)


def _parquet_columns(path: str) -> list[str]:
    try:
        return pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}); pass the published ESCI parquet files") from e


def _esci_key_column(table: pa.Table, column: str, label: str) -> pa.Array:
    values = pc.cast(table.column(column).combine_chunks(), pa.string())
    blank = pc.invert(_non_blank(values))
    if _count_true(blank):
        row = int(np.flatnonzero(blank.to_numpy(zero_copy_only=False))[0]) + 1
        raise DataError(f"{label}: data row {row}, column {column!r} is empty; every example and product needs one")
    return pc.utf8_trim_whitespace(values)


def _esci_product_records(path: str) -> pa.Table:
    """product_id, title, description, category of each row of an ESCI parquet file."""
    batches = []
    row_offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=list(ESCI_PRODUCT_COLUMNS)):
        data = pa.Table.from_batches([batch])
        try:
            locale = _esci_key_column(data, "product_locale", path)
            asin = _esci_key_column(data, "product_id", path)
        except DataError as e:  # renumber the row from the batch to the file
            raise DataError(_shift_row(str(e), row_offset)) from None
        columns = {name: data.column(name).to_pylist() for name in ESCI_PRODUCT_COLUMNS[3:]}
        descriptions = [
            _esci_description(d, b, brand, color)
            for d, b, brand, color in zip(
                columns["product_description"], columns["product_bullet_point"], columns["product_brand"], columns["product_color"]
            )
        ]
        batches.append(
            pa.table(
                {
                    PRODUCT_ID: pc.binary_join_element_wise(locale, asin, ":"),
                    PRODUCT_TITLE: pc.cast(data.column("product_title").combine_chunks(), pa.string()),
                    PRODUCT_DESCRIPTION: pa.array(descriptions, type=pa.string()),
                    PRODUCT_CATEGORY: pa.array([""] * data.num_rows, type=pa.string()),
                }
            )
        )
        row_offset += data.num_rows
    if not batches:
        return pa.table({c: pa.array([], pa.string()) for c in (PRODUCT_ID, PRODUCT_TITLE, PRODUCT_DESCRIPTION, PRODUCT_CATEGORY)})
    return pa.concat_tables(batches)


def _shift_row(message: str, offset: int) -> str:
    return re.sub(r"data row (\d+)", lambda m: f"data row {int(m.group(1)) + offset}", message, count=1)


def _esci_description(description, bullets, brand, color) -> str:
    """'brand: B. color: C. ' + description without HTML (else the bullet points)."""
    text = _plain_text(description) or _plain_text(bullets)
    brand, color = _plain_text(brand), _plain_text(color)
    parts = [f"brand: {brand}." if brand else "", f"color: {color}." if color else "", text]
    return " ".join(p for p in parts if p)
