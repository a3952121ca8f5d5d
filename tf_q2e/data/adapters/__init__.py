"""Adapters that turn public product-search data sets into the canonical data set.

`prepare(dataset, input_path, out_dir)` reads one public data set and writes a
canonical data set directory (see `tf_q2e.data.schema`): `catalog.parquet`,
`train.parquet`, `validation.parquet`, `test.parquet` (split by query with
`query_split`) and `manifest.json`. It is what `q2e prepare --dataset NAME
--input PATH --out DIR` runs.

None of these data sets logs engagement. Each has human relevance grades
instead, and the adapters map them to `engaged`: the best grade counts as
engaged (1), and the lowest grades count as hard negatives (0): pairs that
were shown but judged irrelevant. Grades in between get -1: the contrastive
task still uses them as positives, and the engagement BCE masks them. `relevance` keeps the
graded judgement for evaluation.

Rules for all adapters:

* Every input row becomes one impression row or is counted, with its reason,
  in `manifest["source"]["dropped"]`. Rows are dropped for an empty query, for
  a query or product id that the data set's query or product file lacks, or for
  a product with no title. Malformed input raises instead (see below).
* A product has one set of fields everywhere. If the input gives a product id
  different fields, the fields seen in the most rows win, and a tie goes to the
  first seen. The catalogue and every impression row carry the winning fields,
  and `manifest["source"]["resolved"]` lists the resolved ids.
* The data set's own train/test split is ignored. Rows are split by query with
  `query_split`, as for every canonical data set.
* `query` and `product_title` are kept as given. Descriptions have their white
  space runs collapsed to one space.
* Input problems raise `tf_q2e.errors.DataError`, with a message that names the
  file, the 1-based data row (the header is not a data row) and the column, and
  says how to fix it. These problems are: a missing file or column, an unknown
  label value, a malformed row, or a missing product id.

`manifest["source"]` records: `dataset`; `input_files` (name, size and SHA-256 of
each file); `fields` (which input column fills each canonical column);
`label_mapping`; `label_counts` (rows read per raw label value); `rows` (counts
read and written); `dropped` (for `impressions` and for `product_records`, the
rows the product fields were read from: reason -> rows); and `resolved`
(products whose fields were resolved, with their ids).

## Data sets

Each data set's input, column mapping and label mapping are described in the
docstring of its module:

* `--dataset homedepot`: Kaggle's Home Depot Product Search Relevance, in
  `tf_q2e.data.adapters.homedepot`.
* `--dataset esci`: Amazon Shopping Queries (ESCI), in `tf_q2e.data.adapters.esci`.
* `--dataset wands`: Wayfair WANDS, in `tf_q2e.data.adapters.wands`.

The steps they share: `canonical` turns what an adapter read into the data set
directory (product resolution, drops, manifest), `inputs` checks and reads input
files, and `text` holds the text helpers.
"""

from __future__ import annotations

import difflib
import os

from tf_q2e.data.adapters.canonical import (
    DROP_EMPTY_QUERY,
    DROP_EMPTY_TITLE,
    DROP_PRODUCT_UNTITLED,
    RESOLVE_RULE,
    _write,
)
from tf_q2e.data.adapters.esci import (
    ESCI_CONTEXT_COLUMN,
    ESCI_EXAMPLE_COLUMNS,
    ESCI_EXAMPLES_FILE,
    ESCI_LABEL_MAPPING,
    ESCI_PRODUCT_COLUMNS,
    ESCI_PRODUCTS_FILE,
    _read_esci,
)
from tf_q2e.data.adapters.homedepot import (
    HOMEDEPOT_COLUMNS,
    HOMEDEPOT_ENGAGED_MIN,
    HOMEDEPOT_FILE,
    HOMEDEPOT_LABEL_MAPPING,
    HOMEDEPOT_NOT_ENGAGED_MAX,
    HOMEDEPOT_RELEVANCE_RANGE,
    _read_homedepot,
)
from tf_q2e.data.adapters.wands import (
    WANDS_LABEL_COLUMNS,
    WANDS_LABEL_FILE,
    WANDS_LABEL_MAPPING,
    WANDS_PRODUCT_COLUMNS,
    WANDS_PRODUCT_FILE,
    WANDS_QUERY_COLUMNS,
    WANDS_QUERY_FILE,
    _read_wands,
)
from tf_q2e.errors import DataError

__all__ = [
    "DATASETS",
    "prepare",
    "DROP_EMPTY_QUERY",
    "DROP_EMPTY_TITLE",
    "DROP_PRODUCT_UNTITLED",
    "RESOLVE_RULE",
    "ESCI_CONTEXT_COLUMN",
    "ESCI_EXAMPLE_COLUMNS",
    "ESCI_EXAMPLES_FILE",
    "ESCI_LABEL_MAPPING",
    "ESCI_PRODUCT_COLUMNS",
    "ESCI_PRODUCTS_FILE",
    "HOMEDEPOT_COLUMNS",
    "HOMEDEPOT_ENGAGED_MIN",
    "HOMEDEPOT_FILE",
    "HOMEDEPOT_LABEL_MAPPING",
    "HOMEDEPOT_NOT_ENGAGED_MAX",
    "HOMEDEPOT_RELEVANCE_RANGE",
    "WANDS_LABEL_COLUMNS",
    "WANDS_LABEL_FILE",
    "WANDS_LABEL_MAPPING",
    "WANDS_PRODUCT_COLUMNS",
    "WANDS_PRODUCT_FILE",
    "WANDS_QUERY_COLUMNS",
    "WANDS_QUERY_FILE",
]

DATASETS = ("esci", "wands", "homedepot")


def prepare(dataset: str, input_path: str, out_dir: str) -> dict:
    """Converts a public data set into a canonical data set directory.

    Args:
      dataset: one of `DATASETS`: "esci", "wands" or "homedepot".
      input_path: the data set's file or directory (see the docstring of the data set's module).
      out_dir: the directory to write; created if missing. Its data set files are replaced.

    Returns:
      The manifest, as written to `out_dir/manifest.json`.

    Raises:
      DataError: unknown data set, missing file or column, unknown label value or
        malformed row. The input is checked before anything is written.
    """
    adapters = {"esci": _read_esci, "wands": _read_wands, "homedepot": _read_homedepot}
    if dataset not in adapters:
        close = difflib.get_close_matches(str(dataset), DATASETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}{hint}")
    if not os.path.exists(input_path):
        raise DataError(f"{dataset} input {input_path!r} does not exist: pass the data set's file or directory as --input")
    return _write(out_dir, adapters[dataset](input_path))
