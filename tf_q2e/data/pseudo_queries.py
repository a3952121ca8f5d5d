"""Pseudo-queries: catalogue titles turned into extra training rows.

A product that no logged query reached is known to the towers only through
the n-grams it shares with products that were reached. On a small log the
towers learn the logged pairs by heart and miss plain lexical matches that
BM25 finds, and most products a held-out query engages with may never occur
in the training split.

A pseudo-query is a random subset of one product's title words, kept in title
order and lower-cased ("Delta Vero 1-Handle Shower Only Faucet Trim Kit in
Chrome" -> "shower faucet chrome"); its word count is drawn from the word
counts of the training split's queries (its first 100,000; at most the title's). Each becomes an
impression row `(pseudo-query, product)` with `engaged = -1`: a positive of
the contrastive task, masked in the engagement task, which it says nothing
about. This is the inverse cloze task of Lee et al. (ACL 2019) cut down to
titles: it teaches every product's title n-grams, not only the logged ones.

`q2e train` writes the rows to `RUN/pseudo_queries.parquet` when
`data.pseudo_queries` (rows per catalogue product) is above 0; the same seed
writes the same rows, so a resumed run reads what the killed one read.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tf_q2e.data import schema as S
from tf_q2e.data.products import ProductReference
from tf_q2e.data.validate import Validator

PSEUDO_QUERY_FILE = "pseudo_queries.parquet"
# Training queries whose word counts are drawn from (read from the start of the training split).
LENGTH_SAMPLE = 100_000


def title_words(title: str) -> list[str]:
    """The lower-cased words of a title that hold a letter or digit ("&" and "-" stay out)."""
    return [w for w in title.lower().split() if any(ch.isalnum() for ch in w)]


def pseudo_queries(titles: list[str], per_product: int, query_lengths: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """`per_product` pseudo-queries of each title: (index of the title of each, the queries).

    `query_lengths` holds word counts (each at least 1) to draw from; a title
    without a usable word gets none.
    """
    lengths = np.asarray(query_lengths, dtype=np.int64)
    if per_product < 1:
        return np.zeros(0, np.int64), []
    if lengths.size == 0 or lengths.min() < 1:
        raise ValueError("query_lengths must be non-empty word counts of at least 1")
    drawn = rng.choice(lengths, size=(len(titles), per_product))
    rows, queries = [], []
    for i, title in enumerate(titles):
        words = title_words(title)
        if not words:
            continue
        for k in drawn[i]:
            pick = np.sort(rng.permutation(len(words))[: min(int(k), len(words))])
            queries.append(" ".join(words[j] for j in pick))
            rows.append(i)
    return np.asarray(rows, np.int64), queries


def write_pseudo_queries(products: ProductReference, train_file: str, out_path: str, per_product: int, seed: int,
                         context_columns: tuple[str, ...] = (), image_dim: int = 0) -> int:
    """Writes the pseudo-query rows of every catalogue product to `out_path` (Parquet); returns their count.

    `products` is the validated catalogue as a training pipeline holds it
    (`ImpressionPipeline.products`, frozen), so it is not read again. The rows
    follow the canonical impression schema of the training split
    (`context_columns` empty, `relevance` null) and carry each product's
    catalogue fields. Bad rows of the training file are left out of the
    query-length sample: the caller has validated the data set and decided
    about them already.
    """
    validator = Validator(on_bad_rows="collect", image_dim=image_dim or None)
    validator.products = products  # frozen: the training rows are checked against it, not added to it
    catalogue = products.table
    lengths: list[int] = []
    for table in validator.iter_file(train_file, "impressions"):  # a sample of the log is enough
        lengths += [n for q in table.column(S.QUERY).to_pylist() if (n := len(q.split())) > 0]
        if len(lengths) >= LENGTH_SAMPLE:
            break
    rows, queries = pseudo_queries(catalogue.column(S.PRODUCT_TITLE).to_pylist(), per_product, np.asarray(lengths or [1]),
                                   np.random.default_rng(seed))
    schema = S.impression_schema(image_dim, context_columns)
    picked = catalogue.take(pa.array(rows))
    n = len(queries)
    columns = {S.QUERY: pa.array(queries, pa.string()), S.ENGAGED: pa.array(np.full(n, S.ENGAGED_UNLABELLED, np.int8)),
               S.RELEVANCE: pa.nulls(n, pa.float32()), **{c: pa.array([""] * n, pa.string()) for c in context_columns}}
    table = pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else picked.column(f.name).cast(f.type) for f in schema], schema=schema)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=S.ROW_GROUP_SIZE, compression="zstd")
    os.replace(tmp, out_path)  # a killed run leaves no half-written file under the real name
    return n
