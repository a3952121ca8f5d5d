"""The queries an evaluation scores: a split's judged (query, product) pairs, and a data set's exact ground truth.

`load_judged(path)` reads one split (by query) into `Judged`: its distinct
queries with their context, and one row per impressed pair with its
engagement label (1 engaged, 0 hard negative, -1 unlabelled) and graded
relevance where the data set has it. `load_ground_truth(DATA_DIR)` reads the
`ground_truth` section `q2e synth` writes into `manifest.json` (per sampled
test query: the searchers' most common country and the exactly relevant
products with the highest expected engagement under the generator's hidden
model, best first). `tf_q2e.evaluate` scores retrievers on both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.data import schema as S
from tf_q2e.data.validate import Validator, dataset_files
from tf_q2e.errors import InputError

GT_QUERY_COUNTRY = "query_country"  # the context column set to the ground truth's searcher country


@dataclass
class Judged:
    """A labelled split grouped by query: distinct queries, and one entry per judged row."""

    queries: list[str]  # distinct query texts
    contexts: dict[str, list[str]]  # query context column -> value per distinct query
    row_query: np.ndarray  # [R] index into `queries`
    row_product: np.ndarray  # [R] product id (object)
    engaged: np.ndarray  # [R] 1, 0 or -1
    relevance: np.ndarray  # [R] float, NaN when not graded
    path: str

    @property
    def engaged_sets(self) -> list[set[str]]:
        sets: list[set[str]] = [set() for _ in self.queries]
        for q, p in zip(self.row_query[self.engaged == 1], self.row_product[self.engaged == 1]):
            sets[q].add(p)
        return sets


def load_judged(path: str, context_columns: tuple[str, ...] = (), image_dim: int | None = None) -> Judged:
    """Reads a split file (checked as in `q2e validate`) into a `Judged`; queries keyed by text + context."""
    validator = Validator("error", image_dim=image_dim, context_columns=tuple(context_columns))
    columns = [S.QUERY, *context_columns, S.PRODUCT_ID, S.ENGAGED]
    tables = []
    for table in validator.iter_file(path, "impressions"):
        keep = columns + ([S.RELEVANCE] if S.RELEVANCE in table.column_names else [])
        tables.append(table.select(keep))
    if not tables:
        raise InputError(f"{path}: no rows to evaluate")
    table = pa.concat_tables(tables, promote_options="default")
    keys = table.select([S.QUERY, *context_columns])
    distinct = keys.group_by(keys.column_names).aggregate([]).sort_by([(c, "ascending") for c in keys.column_names])
    index = {tuple(row.values()): i for i, row in enumerate(distinct.to_pylist())}
    row_query = np.fromiter((index[tuple(r.values())] for r in keys.to_pylist()), dtype=np.int64, count=table.num_rows)
    relevance = (table.column(S.RELEVANCE).to_numpy(zero_copy_only=False).astype(np.float64)
                 if S.RELEVANCE in table.column_names else np.full(table.num_rows, np.nan))
    return Judged(
        queries=distinct.column(S.QUERY).to_pylist(),
        contexts={c: distinct.column(c).to_pylist() for c in context_columns},
        row_query=row_query,
        row_product=table.column(S.PRODUCT_ID).to_numpy(zero_copy_only=False).astype(object),
        engaged=pc.cast(table.column(S.ENGAGED), pa.int32()).to_numpy(),
        relevance=relevance,
        path=path,
    )


@dataclass
class GroundTruth:
    """A data set's exact ground truth (the manifest's `ground_truth` section): per query, the
    searcher country and the products with the highest expected engagement, best first."""

    queries: list[str]  # distinct query texts
    countries: list[str]  # the query's most common searcher country, per query
    product_ids: list[list[str]]  # the true list per query, best first
    gains: list[np.ndarray]  # per query, float [len(list)]: the gain of each listed product in gt_ndcg@10
    split: str  # the split the queries come from
    path: str

    def judged(self, context_columns: tuple[str, ...] = ()) -> Judged:
        """The queries as a `Judged` for `retriever.search`: `query_country` = the ground truth's country
        (any other context column ""); one row per listed product (engaged -1, relevance not graded)."""
        lengths = [len(ids) for ids in self.product_ids]
        return Judged(
            queries=list(self.queries),
            contexts={c: list(self.countries) if c == GT_QUERY_COUNTRY else [""] * len(self.queries)
                      for c in context_columns},
            row_query=np.repeat(np.arange(len(self.queries), dtype=np.int64), lengths),
            row_product=np.array([p for ids in self.product_ids for p in ids], dtype=object),
            engaged=np.full(sum(lengths), -1, np.int32),
            relevance=np.full(sum(lengths), np.nan),
            path=self.path,
        )


def load_ground_truth(data_dir: str) -> GroundTruth | None:
    """The `ground_truth` section of `DATA_DIR/manifest.json` (`q2e synth` writes it), or None when
    the data set has no manifest, no such section or no query in it.

    Gains are the section's `expected_engagement` (the exact probability that a searcher of the
    query's country engages), or 1 / (1-based rank in the list) where it gives none.
    """
    path = os.path.join(data_dir, S.MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            section = json.load(f).get("ground_truth")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: not a readable JSON object ({e}); rewrite it with q2e synth or q2e prepare") from None
    if not section or not section.get("queries"):
        return None
    queries, countries, product_ids, gains = [], [], [], []
    for i, entry in enumerate(section["queries"]):
        try:
            ids = [str(p) for p in entry["product_ids"]]
            gain = (np.asarray(entry["expected_engagement"], dtype=np.float64) if "expected_engagement" in entry
                    else 1.0 / np.arange(1, len(ids) + 1))
            if gain.shape != (len(ids),) or not np.all(np.isfinite(gain)) or np.any(gain < 0):
                raise ValueError(f"expected_engagement must be {len(ids)} finite non-negative numbers")
            queries.append(str(entry["query"]))
            countries.append(str(entry.get(GT_QUERY_COUNTRY) or ""))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: ground_truth.queries[{i}] is invalid ({type(e).__name__}: {e}); "
                             "regenerate the data set with q2e synth") from None
        product_ids.append(ids)
        gains.append(gain)
    return GroundTruth(queries, countries, product_ids, gains, str(section.get("split", "test")), path)


def split_ground_truth(data_dir: str, split: str) -> GroundTruth | None:
    """The data set's `GroundTruth` (`load_ground_truth`) when it is of `split`, else None."""
    truth = load_ground_truth(data_dir) if data_dir else None
    return truth if truth is not None and truth.split == split else None


def split_path(data_dir: str, split: str) -> str:
    _, splits = dataset_files(data_dir)
    if split not in splits:
        raise InputError(f"{data_dir}: no {split} split (found: {', '.join(splits)})")
    return splits[split]
