"""The step every adapter ends with: what it read becomes a canonical data set directory.

An adapter returns a `_Source`; `_write` resolves each product's fields into one
catalogue row, drops (and counts) impressions with an empty query or no
catalogue product, joins the rest with the catalogue, and writes the data set
and its manifest's `source` section. The rules are in `tf_q2e.data.adapters`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.data.adapters.text import _count_true, _non_blank
from tf_q2e.data.schema import (
    MANIFEST_FILE,
    PRODUCT_CATEGORY,
    PRODUCT_DESCRIPTION,
    PRODUCT_ID,
    PRODUCT_TITLE,
    QUERY,
    DatasetWriter,
)

# Reasons rows are dropped (keys of manifest["source"]["dropped"]).
DROP_EMPTY_QUERY = "empty query"
DROP_PRODUCT_UNTITLED = "product has no non-empty title"
DROP_EMPTY_TITLE = "empty product title"
RESOLVE_RULE = "fields seen in the most rows win; ties go to the first seen"

# Impressions are joined with the catalogue and written in chunks of this many rows.
_CHUNK_ROWS = 262_144
# The manifest lists at most this many resolved product ids.
_MAX_LISTED_IDS = 1000


@dataclass
class _Source:
    """What an adapter read, before products are resolved and joined.

    `impressions` holds `query`, the context columns, `product_id`, `engaged` and
    `relevance`; `product_records` holds `product_id` and the product text fields,
    in input order, one row per record the product fields were read from.
    """

    impressions: pa.Table
    product_records: pa.Table
    missing_product_reason: str
    info: dict
    context_columns: tuple[str, ...] = ()
    dropped_impressions: dict = field(default_factory=dict)
    impressions_read: int = 0


def _write(out_dir: str, source: _Source) -> dict:
    catalog, untitled_ids, dropped_records, resolved = _build_catalog(source.product_records)
    impressions, product_index, dropped = _select_impressions(source, catalog, untitled_ids)
    catalog_fields = catalog.select([PRODUCT_TITLE, PRODUCT_DESCRIPTION, PRODUCT_CATEGORY])
    with DatasetWriter(out_dir, context_columns=source.context_columns) as writer:
        writer.write_catalog(catalog)
        for start in range(0, impressions.num_rows, _CHUNK_ROWS):
            part = impressions.slice(start, _CHUNK_ROWS)
            products = catalog_fields.take(pa.array(product_index[start : start + _CHUNK_ROWS]))
            for name in catalog_fields.column_names:
                part = part.append_column(name, products.column(name))
            writer.write_impressions(part)
        written = sum(counts.rows for counts in writer.counts.values())
        if written + sum(dropped.values()) != source.impressions_read:  # a bug, not an input problem
            raise RuntimeError(f"row accounting failed: read {source.impressions_read}, wrote {written}, dropped {dropped}")
        writer.manifest["source"] = {
            **source.info,
            "rows": {
                "impressions_read": source.impressions_read,
                "impressions_written": written,
                "product_records_read": source.product_records.num_rows,
                "catalog": catalog.num_rows,
            },
            "dropped": {"impressions": dropped, "product_records": dropped_records},
            "resolved": {"product_fields": resolved},
        }
    with open(os.path.join(out_dir, MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)


def _build_catalog(records: pa.Table) -> tuple[pa.Table, pa.Array, dict, dict]:
    """One row per product id, with conflicting fields resolved.

    Returns:
      (catalog, ids whose every record lacks a title, dropped record counts, resolution).
    """
    titled = _non_blank(records.column(PRODUCT_TITLE))
    ids = records.column(PRODUCT_ID).combine_chunks()
    kept = records.filter(titled)
    catalog, resolved = _resolve_products(kept)
    untitled_ids = pc.unique(ids.filter(pc.invert(titled)))
    untitled_ids = untitled_ids.filter(pc.invert(pc.is_in(untitled_ids, value_set=catalog.column(PRODUCT_ID).combine_chunks())))
    dropped = {DROP_EMPTY_TITLE: records.num_rows - kept.num_rows}
    return catalog, untitled_ids, dropped, resolved


def _resolve_products(records: pa.Table) -> tuple[pa.Table, dict]:
    """Keeps one record per product id: its most frequent fields, ties to the first seen.

    The catalogue keeps input order (of each product's chosen record).
    """
    encoded = records.column(PRODUCT_ID).combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy()  # [R]
    counts = np.bincount(codes, minlength=len(encoded.dictionary))  # [P]
    _, chosen = np.unique(codes, return_index=True)  # [P]: first record of each product
    conflicting: list[str] = []
    overridden = 0
    duplicated = np.flatnonzero(counts > 1)
    if duplicated.size:
        rows = np.flatnonzero(np.isin(codes, duplicated))
        fields = records.select([PRODUCT_TITLE, PRODUCT_DESCRIPTION, PRODUCT_CATEGORY]).take(pa.array(rows))
        values = zip(*(fields.column(i).to_pylist() for i in range(fields.num_columns)))
        seen: dict[int, Counter] = {}
        first_row: dict[tuple[int, tuple], int] = {}
        for row, value in zip(rows.tolist(), values):
            code = int(codes[row])
            seen.setdefault(code, Counter())[value] += 1
            first_row.setdefault((code, value), row)
        for code, counter in seen.items():
            if len(counter) > 1:
                winner = max(counter, key=counter.get)  # max keeps the first of equals
                chosen[code] = first_row[(code, winner)]
                conflicting.append(encoded.dictionary[code].as_py())
                overridden += sum(counter.values()) - counter[winner]
    catalog = records.take(pa.array(np.sort(chosen)))
    resolved = {
        "reason": "one product id with different fields in different records",
        "rule": RESOLVE_RULE,
        "count": len(conflicting),
        "product_ids": conflicting[:_MAX_LISTED_IDS],
        "product_ids_listed": min(len(conflicting), _MAX_LISTED_IDS),
        "records_with_other_fields": int(overridden),
    }
    return catalog, resolved


def _select_impressions(source: _Source, catalog: pa.Table, untitled_ids: pa.Array):
    """Drops impressions with an empty query or no catalogue product, counting each reason.

    Returns:
      (kept impressions, their row in the catalogue [N] int64, dropped counts).
    """
    impressions = source.impressions
    dropped = dict(source.dropped_impressions)
    has_query = _non_blank(impressions.column(QUERY))
    dropped[DROP_EMPTY_QUERY] = impressions.num_rows - _count_true(has_query)
    impressions = impressions.filter(has_query)

    index = pc.index_in(impressions.column(PRODUCT_ID), value_set=catalog.column(PRODUCT_ID).combine_chunks())
    found = pc.is_valid(index)
    untitled = pc.and_(pc.invert(found), pc.is_in(impressions.column(PRODUCT_ID), value_set=untitled_ids))
    dropped[DROP_PRODUCT_UNTITLED] = _count_true(untitled)
    dropped[source.missing_product_reason] = impressions.num_rows - _count_true(found) - dropped[DROP_PRODUCT_UNTITLED]
    product_index = pc.filter(index, found).to_numpy(zero_copy_only=False).astype(np.int64)
    return impressions.filter(found), product_index, dropped
