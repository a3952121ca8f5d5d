"""The canonical schema of an impression log and a product catalogue.

An impression log row is one (query, product) pair that a search system showed:

| column | type | required | meaning |
|---|---|---|---|
| `query` | string | yes | the search text as typed, non-empty |
| `query_<name>` | string | no | query context, e.g. `query_country` |
| `product_id` | string | yes | the product's id (integers are read as their decimal string) |
| `product_title` | string | yes | non-empty |
| `product_description` | string | no | missing/null -> "" |
| `product_category` | string | no | missing/null -> "" |
| `product_image_embedding` | list<float32> | no | fixed length across the data set; null -> no image |
| `engaged` | int8 | yes | 1 engaged, 0 shown but not engaged (a hard negative), -1 no engagement label |
| `relevance` | float32 | no | graded relevance for evaluation; null -> ungraded |

A catalogue row is `product_id` plus the `product_*` fields; each product id
appears once. Each product id carries the same fields wherever it appears.
A catalogue may also carry the filter attributes (`tf_q2e.filters`), which
impression rows do not:

| column | type | required | meaning |
|---|---|---|---|
| `product_country` | string | no | where the item is (an allow-list filters on it); missing/null -> "" |
| `product_seller` | string | no | who sells it (crowding per seller); missing/null -> "" |

Data sets on disk are a directory with `catalog.parquet`, `train.parquet`,
`validation.parquet`, `test.parquet` and `manifest.json`, split by query with
`query_split` (so no query is in two splits).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

QUERY = "query"
QUERY_CONTEXT_PREFIX = "query_"
PRODUCT_ID = "product_id"
PRODUCT_TITLE = "product_title"
PRODUCT_DESCRIPTION = "product_description"
PRODUCT_CATEGORY = "product_category"
PRODUCT_IMAGE_EMBEDDING = "product_image_embedding"
PRODUCT_COUNTRY = "product_country"
PRODUCT_SELLER = "product_seller"
ENGAGED = "engaged"
RELEVANCE = "relevance"

# Label values of `engaged`.
ENGAGED_YES = 1
ENGAGED_NO = 0
ENGAGED_UNLABELLED = -1

# Product fields besides the id, in canonical order.
PRODUCT_TEXT_FIELDS = (PRODUCT_TITLE, PRODUCT_DESCRIPTION, PRODUCT_CATEGORY)
PRODUCT_FIELDS = PRODUCT_TEXT_FIELDS + (PRODUCT_IMAGE_EMBEDDING,)
# Catalogue-only string columns that lookups filter on (`tf_q2e.filters`); "" when absent.
PRODUCT_ATTRIBUTE_FIELDS = (PRODUCT_COUNTRY, PRODUCT_SELLER)
OPTIONAL_TEXT_FIELDS = (PRODUCT_DESCRIPTION, PRODUCT_CATEGORY) + PRODUCT_ATTRIBUTE_FIELDS

REQUIRED_IMPRESSION_COLUMNS = (QUERY, PRODUCT_ID, PRODUCT_TITLE, ENGAGED)
REQUIRED_CATALOG_COLUMNS = (PRODUCT_ID, PRODUCT_TITLE)

# Names of the files of a data set directory.
CATALOG_FILE = "catalog.parquet"
SPLIT_FILES = {
    "train": "train.parquet",
    "validation": "validation.parquet",
    "test": "test.parquet",
}
MANIFEST_FILE = "manifest.json"

# Rows per Parquet row group: the unit of streaming and of sharding across workers.
ROW_GROUP_SIZE = 65_536


def is_query_context(column: str) -> bool:
    """True for a query context column such as `query_country`."""
    return column.startswith(QUERY_CONTEXT_PREFIX) and len(column) > len(QUERY_CONTEXT_PREFIX)


def impression_schema(image_dim: int = 0, context_columns: tuple[str, ...] = ()) -> pa.Schema:
    """Arrow schema of a canonical impression log.

    Args:
      image_dim: length of `product_image_embedding`; 0 leaves the column out.
      context_columns: query context columns, e.g. `("query_country",)`.
    """
    fields = [pa.field(QUERY, pa.string(), nullable=False)]
    fields += [pa.field(c, pa.string(), nullable=False) for c in context_columns]
    fields += _product_fields(image_dim)
    fields += [
        pa.field(ENGAGED, pa.int8(), nullable=False),
        pa.field(RELEVANCE, pa.float32(), nullable=True),
    ]
    return pa.schema(fields)


def catalog_schema(image_dim: int = 0) -> pa.Schema:
    """Arrow schema of a canonical product catalogue: the product fields and the filter attributes."""
    return pa.schema(_product_fields(image_dim) + [pa.field(c, pa.string(), nullable=False)
                                                   for c in PRODUCT_ATTRIBUTE_FIELDS])


def _product_fields(image_dim: int) -> list[pa.Field]:
    fields = [pa.field(PRODUCT_ID, pa.string(), nullable=False)]
    fields += [pa.field(c, pa.string(), nullable=False) for c in PRODUCT_TEXT_FIELDS]
    if image_dim:
        fields.append(pa.field(PRODUCT_IMAGE_EMBEDDING, pa.list_(pa.float32(), image_dim), nullable=True))
    return fields


def normalize_query_for_split(query: str) -> bytes:
    """The split key of a query: lower-cased, white space runs collapsed, UTF-8."""
    return " ".join(query.lower().split()).encode("utf-8")


def query_bucket(query: str) -> int:
    """`int(sha1(key).hexdigest(), 16) mod 10` of the query's split key."""
    return int(hashlib.sha1(normalize_query_for_split(query)).hexdigest(), 16) % 10


def query_split(query: str) -> str:
    """Which split a query belongs to: bucket 0 -> test, 1 -> validation, 2-9 -> train.

    The rule depends on the query text only, so anyone can reproduce it and no
    query lands in two splits.
    """
    bucket = query_bucket(query)
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def query_splits(queries) -> np.ndarray:
    """`query_split` of each query, as an array of split names (dtype object).

    Distinct queries are hashed once, so long logs with repeated queries are cheap.
    """
    queries = pa.array(queries, type=pa.string()) if not isinstance(queries, (pa.Array, pa.ChunkedArray)) else queries
    encoded = queries.dictionary_encode() if isinstance(queries, pa.Array) else queries.combine_chunks().dictionary_encode()
    names = np.array([query_split(q) for q in encoded.dictionary.to_pylist()], dtype=object)
    return names[encoded.indices.to_numpy(zero_copy_only=False)]


@dataclass
class SplitCounts:
    rows: int = 0
    engaged: int = 0
    not_engaged: int = 0
    unlabelled: int = 0

    def add(self, table: pa.Table) -> None:
        labels = table.column(ENGAGED).to_numpy()
        self.rows += len(labels)
        self.engaged += int((labels == ENGAGED_YES).sum())
        self.not_engaged += int((labels == ENGAGED_NO).sum())
        self.unlabelled += int((labels == ENGAGED_UNLABELLED).sum())


class DatasetWriter:
    """Writes a canonical data set directory, streaming, with deterministic bytes.

    Impressions are appended in chunks and routed to train/validation/test by
    `query_split`. The same calls with the same tables give byte-identical files.

    Usage:
      with DatasetWriter(out_dir, image_dim=16, context_columns=("query_country",)) as w:
          w.write_catalog(catalog_table)
          for chunk in chunks:
              w.write_impressions(chunk)
          w.manifest.update({"generator": {...}})
    """

    def __init__(self, out_dir: str, image_dim: int = 0, context_columns: tuple[str, ...] = ()):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.image_dim = image_dim
        self.context_columns = tuple(context_columns)
        self.impression_schema = impression_schema(image_dim, self.context_columns)
        self.catalog_schema = catalog_schema(image_dim)
        self.manifest: dict = {}
        self.counts = {name: SplitCounts() for name in SPLIT_FILES}
        self.catalog_rows = 0
        self._catalog_writer = self._open(CATALOG_FILE, self.catalog_schema)
        self._writers = {name: self._open(f, self.impression_schema) for name, f in SPLIT_FILES.items()}

    def _open(self, name: str, schema: pa.Schema) -> pq.ParquetWriter:
        return pq.ParquetWriter(os.path.join(self.out_dir, name), schema, compression="zstd")

    def write_catalog(self, table: pa.Table) -> None:
        table = _conform(table, self.catalog_schema)
        self._catalog_writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        self.catalog_rows += table.num_rows

    def write_impressions(self, table: pa.Table) -> None:
        table = _conform(table, self.impression_schema)
        splits = query_splits(table.column(QUERY))
        for name, writer in self._writers.items():
            part = table.filter(pa.array(splits == name))
            if part.num_rows:
                writer.write_table(part, row_group_size=ROW_GROUP_SIZE)
                self.counts[name].add(part)

    def close(self) -> None:
        self._catalog_writer.close()
        for writer in self._writers.values():
            writer.close()
        manifest = {
            "schema_version": 1,
            "image_dim": self.image_dim,
            "query_context_columns": list(self.context_columns),
            "split_rule": "bucket = int(sha1(' '.join(query.lower().split()).encode('utf-8')).hexdigest(), 16) % 10;"
            " 0 -> test, 1 -> validation, 2-9 -> train",
            "files": {"catalog": CATALOG_FILE, **SPLIT_FILES},
            "counts": {"catalog": self.catalog_rows, **{k: vars(v) for k, v in self.counts.items()}},
            **self.manifest,
        }
        with open(os.path.join(self.out_dir, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=False, ensure_ascii=False)
            f.write("\n")

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written data set that looks complete
            self._catalog_writer.close()
            for writer in self._writers.values():
                writer.close()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema` (missing optional text -> "")."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            if not column.type.equals(field.type):
                column = column.cast(field.type)
        elif field.name in OPTIONAL_TEXT_FIELDS:
            column = pa.array([""] * table.num_rows, type=pa.string())
        elif field.name == RELEVANCE:
            column = pa.nulls(table.num_rows, type=pa.float32())
        else:
            raise ValueError(f"table lacks column {field.name!r} (has {table.column_names})")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)
