"""BM25: the lexical baseline, searched and scored like the neural models.

`BM25Index` ranks a product catalogue for text queries with Okapi BM25 as
implemented by `bm25s` (sparse, pre-computed per-term scores). It answers the
two questions the evaluator asks a retrieval model:

* `search(queries, k)` -> `(ids [Q, k], scores [Q, k])`, best first, as the
  dense index's top-k does (Recall@k over the catalogue);
* `score_pairs(queries, product_ids)` -> the score of each judged
  (query, product) pair (ROC AUC, NDCG over judged pairs).

It is the lexical bar the dense two-tower models must beat
(`q2e compare --bm25`; its figures are in `benchmarks/RESULTS.md`).

Text analysis (the same for products and queries):

* lower-cased and split into runs of word characters (`\\b\\w+\\b`, as
  Lucene's standard tokenizer roughly does: "1/2 in. x 4 ft." gives "1", "2",
  "x", "4", "ft"; "2x4" stays one token). bm25s's own default, `\\b\\w\\w+\\b`,
  drops single letters and digits, which matter in product search (sizes,
  model numbers);
* English stop words removed (the 33-word Lucene/NLTK set of `bm25s`:
  "a", "the", "for", "with", "in", ...);
* stemmed with the Snowball English stemmer of PyStemmer
  (`Stemmer.Stemmer("english")`): "lamps" and "lamp" are one term.

A product's text is its title, description and category joined with spaces;
`title_weight=n` repeats the title n times (a cheap field boost, default 1),
and `fields` chooses which fields go in. On a titles-only catalogue (such as
Home Depot's train.csv) repeating the title scales tf and every length by n,
which is the same as dividing k1 by n.

Scoring: BM25 with `k1=1.2`, `b=0.75` and the "lucene" variant (idf
`log(1 + (N - df + 0.5) / (df + 0.5))`, term part `tf / (tf + k1 (1 - b + b |d| / avgdl))`)
by default, all configurable. A query's score for a product is the sum over
the query's terms (a repeated query word counts twice). With "lucene" every
score is >= 0, and 0 exactly when the product shares no term with the query.

Result conventions of `search`:

* k is capped at the catalogue size (the arrays have `min(k, N)` columns);
* a product scoring 0 (or less) is not a match and is never returned: the places after
  the last product with a positive score hold the id "" and score 0.0 (so a
  query that is empty, all stop words or all unknown words gives a row of ""
  and 0.0);
* ties are broken by catalogue order (the product listed first ranks first),
  so results are deterministic.

Dependencies: `bm25s` (0.3.x, NumPy only) and `PyStemmer`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from tf_q2e.data import schema as S

DEFAULT_K1 = 1.2
DEFAULT_B = 0.75
DEFAULT_METHOD = "lucene"
DEFAULT_LANGUAGE = "english"  # stemmer and stop words
DEFAULT_FIELDS = S.PRODUCT_TEXT_FIELDS  # title, description, category
DEFAULT_TOKEN_PATTERN = r"(?u)\b\w+\b"  # runs of word characters, single letters and digits included (as Lucene)
EMPTY_ID = ""  # the id of a place that no product fills

# Queries per task when searching with several threads.
_CHUNK = 64


def product_texts(table: pa.Table, fields: Sequence[str] = DEFAULT_FIELDS, title_weight: int = 1) -> list[str]:
    """The text BM25 indexes for each product row of `table`.

    The `fields` present in `table` joined with spaces, in the order given,
    nulls as ""; the title appears `title_weight` times.
    """
    if title_weight < 1 or int(title_weight) != title_weight:
        raise ValueError(f"title_weight must be a positive integer, got {title_weight!r}")
    unknown = [f for f in fields if f not in S.PRODUCT_TEXT_FIELDS]
    if unknown:
        raise ValueError(f"unknown product text field(s) {unknown}; choose from {list(S.PRODUCT_TEXT_FIELDS)}")
    if not fields:
        raise ValueError("fields must name at least one product text field")
    columns = []
    for f in fields:
        if f not in table.column_names:
            if f == S.PRODUCT_TITLE:
                raise ValueError(f"the catalogue has no {S.PRODUCT_TITLE} column (has {table.column_names})")
            continue  # optional fields may be absent
        values = [v or "" for v in table.column(f).to_pylist()]
        columns.extend([values] * (int(title_weight) if f == S.PRODUCT_TITLE else 1))
    return [" ".join(part for part in parts if part) for parts in zip(*columns)]


def read_catalog(path: str, on_bad_rows: str = "error") -> pa.Table:
    """The canonical catalogue table of a catalogue file or data set directory.

    A directory is a data set directory (its `catalog.*` file is read); a file
    may be any supported format. Rows are checked as `q2e validate` checks them.
    """
    from tf_q2e.data.validate import Validator, dataset_files

    if os.path.isdir(path):
        path, _ = dataset_files(path)
    validator = Validator(on_bad_rows)
    tables = list(validator.iter_file(path, "catalog"))
    if not tables:
        raise ValueError(f"{path}: the catalogue has no products to index")
    return pa.concat_tables(tables)


class BM25Index:
    """A BM25 index over a product catalogue (see the module docstring).

    Args:
      product_ids: the products' ids, unique.
      texts: each product's text (see `product_texts`).
      k1, b, method: BM25 parameters and variant ("lucene", "robertson",
        "atire", "bm25l", "bm25+", as `bm25s.BM25` takes them).
      language: the Snowball stemmer and the stop word list ("english").
        `stem=False` / `stopwords=False` turn either off.
      token_pattern: the regular expression whose matches are the tokens.
      n_threads: threads for `search` (0 or 1 = the calling thread only,
        -1 = one per CPU). NumPy releases the GIL for most of the work.
    """

    def __init__(
        self,
        product_ids: Iterable[str],
        texts: Iterable[str],
        k1: float = DEFAULT_K1,
        b: float = DEFAULT_B,
        method: str = DEFAULT_METHOD,
        language: str = DEFAULT_LANGUAGE,
        stem: bool = True,
        stopwords: bool = True,
        token_pattern: str = DEFAULT_TOKEN_PATTERN,
        n_threads: int = 0,
    ):
        import bm25s

        self.product_ids = np.asarray([str(p) for p in product_ids], dtype=object)
        texts = [t if t is not None else "" for t in texts]
        if len(self.product_ids) != len(texts):
            raise ValueError(f"{len(self.product_ids)} product ids but {len(texts)} texts")
        if len(texts) == 0:
            raise ValueError("the catalogue has no products to index")
        self._row = {}
        for i, pid in enumerate(self.product_ids):
            if pid in self._row:
                raise ValueError(f"product id {pid!r} appears more than once in the catalogue")
            self._row[pid] = i
        self.k1, self.b, self.method = float(k1), float(b), method
        self.language = language
        self.n_threads = (os.cpu_count() or 1) if n_threads == -1 else max(int(n_threads), 0)
        self._stopwords = language if stopwords else None
        self._stemmer = _stemmer(language) if stem else None
        self.token_pattern = token_pattern

        corpus = bm25s.tokenize(texts, stopwords=self._stopwords, stemmer=self._stemmer,
                                token_pattern=token_pattern, return_ids=True, show_progress=False)
        self._vocab: dict[str, int] = dict(corpus.vocab)
        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b, method=method)
        if self._vocab:
            self._bm25.index(corpus, create_empty_token=False, show_progress=False)

    @classmethod
    def from_catalog(
        cls,
        path_or_table,
        fields: Sequence[str] = DEFAULT_FIELDS,
        title_weight: int = 1,
        on_bad_rows: str = "error",
        **kwargs,
    ) -> "BM25Index":
        """An index over a catalogue: a `pa.Table`, a catalogue file or a data set directory.

        `fields` and `title_weight` make the product texts (`product_texts`);
        `kwargs` go to `BM25Index` (k1, b, method, ...).
        """
        table = path_or_table if isinstance(path_or_table, pa.Table) else read_catalog(str(path_or_table), on_bad_rows)
        if S.PRODUCT_ID not in table.column_names:
            raise ValueError(f"the catalogue has no {S.PRODUCT_ID} column (has {table.column_names})")
        ids = table.column(S.PRODUCT_ID).cast(pa.string()).to_pylist()
        return cls(ids, product_texts(table, fields, title_weight), **kwargs)

    def __len__(self) -> int:
        return len(self.product_ids)

    @property
    def vocabulary_size(self) -> int:
        return len(self._vocab)

    # -- queries ----------------------------------------------------------------------------

    def analyze(self, queries: Sequence[str]) -> list[list[str]]:
        """The terms of each query after lower-casing, stop words and stemming."""
        import bm25s

        queries = _as_queries(queries)
        if not queries:
            return []
        return bm25s.tokenize(queries, stopwords=self._stopwords, stemmer=self._stemmer,
                              token_pattern=self.token_pattern, return_ids=False, show_progress=False)

    def _term_ids(self, queries: Sequence[str]) -> list[np.ndarray]:
        """Each query's in-vocabulary term ids (out-of-vocabulary terms dropped)."""
        return [np.asarray([self._vocab[t] for t in terms if t in self._vocab], dtype=np.int32)
                for terms in self.analyze(queries)]

    def _scores(self, term_ids: np.ndarray) -> np.ndarray:
        """BM25 score of every product for one query's term ids, float32 [N]."""
        if len(term_ids) == 0:
            return np.zeros(len(self), np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(term_ids), dtype=np.float32)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every product (in catalogue order) for one query, float32 [N]."""
        return self._scores(self._term_ids([query])[0])

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-k products of each query, best first.

        Returns `(ids, scores)`: `ids` [Q, min(k, N)] of product id strings
        (dtype object), `scores` [Q, min(k, N)] float32. Places after the last
        product with a positive score hold "" and 0.0; ties go to the product
        listed first in the catalogue.
        """
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(int(k), len(self))
        term_ids = self._term_ids(queries)
        ids = np.full((len(term_ids), k), EMPTY_ID, dtype=object)
        scores = np.zeros((len(term_ids), k), np.float32)

        def run(start: int) -> None:
            for q in range(start, min(start + _CHUNK, len(term_ids))):
                if len(term_ids[q]):
                    rows, top = _top_k(self._scores(term_ids[q]), k)
                    ids[q, :len(rows)] = self.product_ids[rows]
                    scores[q, :len(rows)] = top

        starts = range(0, len(term_ids), _CHUNK)
        if self.n_threads > 1 and len(term_ids) > _CHUNK:
            with ThreadPoolExecutor(max_workers=self.n_threads) as pool:
                list(pool.map(run, starts))
        else:
            for start in starts:
                run(start)
        return ids, scores

    def score_pairs(self, queries: Sequence[str], product_ids: Sequence[str]) -> np.ndarray:
        """The BM25 score of each (query, product) pair, float32 [P].

        Equal to the score `search` gives the product for the query. Each
        distinct query is scored once. An unknown product id raises `KeyError`
        naming it.
        """
        queries = _as_queries(queries)
        product_ids = [str(p) for p in product_ids]
        if len(queries) != len(product_ids):
            raise ValueError(f"{len(queries)} queries but {len(product_ids)} product ids")
        unknown = sorted({p for p in product_ids if p not in self._row})
        if unknown:
            shown = ", ".join(repr(p) for p in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise KeyError(f"product id(s) not in the BM25 index: {shown}")
        rows = np.fromiter((self._row[p] for p in product_ids), dtype=np.int64, count=len(product_ids))
        distinct, inverse = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        inverse = inverse.reshape(-1)
        out = np.zeros(len(queries), np.float32)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(distinct) + 1))
        for u, term_ids in enumerate(self._term_ids(list(distinct))):
            pairs = order[bounds[u]:bounds[u + 1]]
            if len(term_ids) and len(pairs):
                out[pairs] = self._scores(term_ids)[rows[pairs]]
        return out


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the (at most k) positive scores, best first, ties by row."""
    positive = np.flatnonzero(scores > 0)
    if len(positive) > k:
        candidates = scores[positive]
        kth = np.partition(candidates, len(candidates) - k)[len(candidates) - k]
        above = positive[candidates > kth]
        at = positive[candidates == kth][: k - len(above)]  # the first products listed win ties
        positive = np.concatenate([above, at])
    top = scores[positive]
    order = np.lexsort((positive, -top))
    return positive[order], top[order]


def _as_queries(queries) -> list[str]:
    if isinstance(queries, str):
        raise TypeError("queries must be a list of strings, not one string")
    return ["" if q is None else str(q) for q in queries]


def _stemmer(language: str):
    import Stemmer

    try:
        return Stemmer.Stemmer(language)
    except KeyError as e:
        raise ValueError(f"no Snowball stemmer for language {language!r}; "
                         f"PyStemmer has {', '.join(Stemmer.algorithms())}") from e
