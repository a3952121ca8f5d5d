"""Mined hard negatives: products ranked highly for a training query but never shown for it.

The negatives that teach a two-tower model the most are the near misses, and
the in-batch softmax rarely meets them: its negatives are the other rows'
products, mostly unrelated (TFRS's `num_hard_negatives` only picks among
those). `mine_negatives(run_dir, source)` (`q2e mine`) ranks the catalogue for
each distinct training query and keeps, per query, up to `per_query`
products that

* were never impressed for the query (any label: shown products are the
  log's own positives and hard negatives);
* are not among the first `skip_top` remaining candidates (the top of a
  ranking holds the most unlabelled true matches);
* score below `margin` × the score of the query's positive (NV-Retriever's
  TopK-PercPos, 0.95 by default; sentence-transformers' `mine_hard_negatives`
  calls it `relative_margin`): a candidate scoring as high as what the user
  engaged with is more likely an unlabelled match than a negative. The
  positive is the query's engaged product scoring lowest (its impressed
  products when none is engaged), the conservative choice with several.

`source` ranks with BM25 over the catalogue (`bm25`: lexical near misses, what
a model trained on clicks confuses least) or with the run's own towers over its
index (`index`: the model's own mistakes, to mine after a first training).
`sampling` takes the best-ranked remaining candidates (`top`) or a seeded
random draw among the first `depth` (`random`); the output is the same for the
same inputs and seed.

The file (Parquet) has one row per (query, negative): `query`, `product_id`,
`rank` (1 = the source's best), `score`, `positive_score`. Training reads it
with `data.mined_negatives` (`tf_q2e.data.mined`).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tf_q2e.data import schema as S
from tf_q2e.data.validate import Validator, split_file
from tf_q2e.errors import InputError

SOURCES = ("bm25", "index")
SAMPLING = ("top", "random")


def query_impressions(path: str) -> dict[str, tuple[set[str], set[str]]]:
    """`{query: (impressed product ids, engaged product ids)}` of an impression file (bad rows skipped)."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    for table in Validator(on_bad_rows="skip").iter_file(path, "impressions"):
        for query, product, engaged in zip(table.column(S.QUERY).to_pylist(), table.column(S.PRODUCT_ID).to_pylist(),
                                           table.column(S.ENGAGED).to_pylist()):
            shown, positives = out.setdefault(query, (set(), set()))
            shown.add(product)
            if engaged == S.ENGAGED_YES:
                positives.add(product)
    return out


class _Ranker:
    """`search(queries, depth) -> (ids [Q, depth], scores)` and `score(queries, ids) -> [P]` of one source."""

    def __init__(self, run_dir: str, source: str, catalog: str, on_bad_rows: str):
        if source == "bm25":
            from tf_q2e.bm25 import BM25Index

            index = BM25Index.from_catalog(catalog, on_bad_rows=on_bad_rows)
            self.search, self.score = index.search, index.score_pairs
            return
        from tf_q2e.index import exact_top_k, load_index
        from tf_q2e.search import Retriever
        from tf_q2e.train import load_model

        index = load_index(run_dir)  # a clear error when q2e index has not run
        retriever = Retriever.from_index(load_model(run_dir), index, scann=False)
        row = {str(p): i for i, p in enumerate(index.product_ids)}
        encoded: dict[str, np.ndarray] = {}  # each query's vector, encoded once for its positives and its search

        def query_vectors(queries):
            new = [q for q in dict.fromkeys(queries) if q not in encoded]
            if new:
                encoded.update(zip(new, retriever.encode_queries(new)))
            return np.stack([encoded[q] for q in queries])

        def search(queries, depth):
            scores, rows = exact_top_k(index.vectors, query_vectors(list(queries)), depth)
            return index.product_ids[rows], scores

        def score(queries, ids):
            vectors = query_vectors(list(queries))
            missing = [p for p in ids if p not in row]
            if missing:
                raise InputError(f"product id {missing[0]!r} of the training split is not in the run's index")
            return np.einsum("ij,ij->i", vectors, index.vectors[[row[p] for p in ids]])

        self.search, self.score = search, score


def mine_negatives(run_dir: str, source: str = "bm25", out: str | None = None, per_query: int = 8, depth: int = 100,
                   margin: float = 0.95, skip_top: int = 0, sampling: str = "top", seed: int = 0, batch: int = 1024,
                   log=None) -> dict:
    """Writes the mined negatives of the run's training queries to `out` (see the module docstring) and
    returns counts: queries, negatives, queries left without any, candidates dropped by each rule."""
    from tf_q2e.config import load_config

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if source not in SOURCES:
        raise InputError(f"--source {source!r}: choose {' or '.join(SOURCES)}")
    if sampling not in SAMPLING:
        raise InputError(f"--sampling {sampling!r}: choose {' or '.join(SAMPLING)}")
    if not 0.0 < margin <= 1.0:
        raise InputError(f"--margin ({margin}) must be in (0, 1] (1 drops only candidates above the positive)")
    for name, value, least in (("--per-query", per_query, 1), ("--depth", depth, 1), ("--skip-top", skip_top, 0)):
        if value < least:
            raise InputError(f"{name} ({value}) must be at least {least}")
    if per_query + skip_top > depth:
        raise InputError(f"--depth ({depth}) must cover --skip-top ({skip_top}) + --per-query ({per_query})")
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        raise InputError(f"{run_dir}: not a run directory (no config.yaml); train one with q2e train --out {run_dir}")
    config = load_config(os.path.join(run_dir, "config.yaml"))
    if not config.data.dir:
        raise InputError(f"{run_dir}: the run's config names no data set to mine the training queries of")
    catalog, train = split_file(config.data.dir, "train")
    out = out or os.path.join(run_dir, "mined_negatives.parquet")
    start = time.perf_counter()
    shown = query_impressions(train)
    queries = sorted(shown)
    ranker = _Ranker(run_dir, source, catalog, config.data.on_bad_rows)
    # The positive each query's candidates are measured against: its lowest-scoring engaged product.
    pairs = [(q, p) for q in queries for p in sorted(shown[q][1] or shown[q][0])]
    pair_scores = np.concatenate([ranker.score([q for q, _ in pairs[i:i + batch]], [p for _, p in pairs[i:i + batch]])
                                  for i in range(0, len(pairs), batch)]) if pairs else np.zeros(0)
    positive = {}
    for (q, _), s in zip(pairs, pair_scores):
        positive[q] = min(positive.get(q, np.inf), float(s))
    rng = np.random.default_rng(seed)
    columns = {"query": [], S.PRODUCT_ID: [], "rank": [], "score": [], "positive_score": []}
    dropped = {"impressed": 0, "skip_top": 0, "margin": 0}
    empty = 0
    for i in range(0, len(queries), batch):
        chunk = queries[i:i + batch]
        ids, scores = ranker.search(chunk, depth)
        for query, row_ids, row_scores in zip(chunk, ids, scores):
            kept, skipped = [], 0
            for rank, (product, score) in enumerate(zip(row_ids, row_scores), start=1):
                product = str(product)
                if not product:  # BM25 pads where nothing more matches
                    break
                if product in shown[query][0]:
                    dropped["impressed"] += 1
                elif skipped < skip_top:
                    skipped += 1
                    dropped["skip_top"] += 1
                elif score >= margin * positive[query]:
                    dropped["margin"] += 1
                else:
                    kept.append((product, rank, float(score)))
            if sampling == "random" and len(kept) > per_query:
                kept = [kept[j] for j in sorted(rng.choice(len(kept), per_query, replace=False))]
            kept = kept[:per_query]
            empty += not kept
            for product, rank, score in kept:
                for name, value in zip(columns, (query, product, rank, score, positive[query])):
                    columns[name].append(value)
    table = pa.table({"query": pa.array(columns["query"], pa.string()),
                      S.PRODUCT_ID: pa.array(columns[S.PRODUCT_ID], pa.string()),
                      "rank": pa.array(columns["rank"], pa.int32()), "score": pa.array(columns["score"], pa.float32()),
                      "positive_score": pa.array(columns["positive_score"], pa.float32())})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    report = {"out": out, "source": source, "queries": len(queries), "negatives": table.num_rows,
              "queries_without_negatives": empty, "dropped": dropped, "seconds": round(time.perf_counter() - start, 1)}
    log(f"mined {table.num_rows} negatives for {len(queries)} training queries ({source}; {empty} without any) into "
        f"{out}; dropped: {dropped['impressed']} impressed, {dropped['skip_top']} top, {dropped['margin']} above "
        f"{margin} x the positive")
    return report


__all__ = ["mine_negatives", "query_impressions"]
