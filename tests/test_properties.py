"""Property-based tests (hypothesis) of the text featurizer and the readers.

The featurizer (`TextHasher`, `hash_strings`, `normalize`) on arbitrary Unicode
text (control characters, emoji, combining marks, very long words; surrogates
excluded): it never raises, ids lie in [0, buckets), the same text always gives
the same ids, a row's ids do not depend on the batch around it, ASCII case and
surrounding white space do not matter.

The readers (`read_batches` through `Validator`) on arbitrary rows (Unicode
text, numbers, NaN, missing values) written as CSV, JSONL and Parquet: they
raise nothing but the package's own `InputError`s, every row is either kept
or reported with its row number, kept rows keep their text exactly, and rows
that are plainly good are kept.

Examples are small and few (`max_examples` 50 or less, no deadline), so the
file runs in well under a minute on two cores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf  # tests/conftest.py imported tf_q2e first: TensorFlow with Keras 2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tf_q2e.data.formats import read_batches
from tf_q2e.data.validate import FileReport, Validator
from tf_q2e.errors import InputError
from tf_q2e.features import TextHasher, hash_strings
from tf_q2e.normalize import normalize

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT32_MAX = float(np.finfo(np.float32).max)
BUCKETS = 1009  # a prime well below the default, so ids out of range would show

# --------------------------------------------------------------------------- text strategies

_SPECIAL = (
    [chr(c) for c in range(0x20)] + ["\x7f", "\x85", "\u00a0", "\u00ad", "\u200b", "\u200d", "\u2028", "\ufeff"]
    + ["\u0301", "\u0308", "\u0327", "\u20dd", "\ufe0f", "\u093f"]  # combining marks, a variation selector, a vowel sign
    + ["👩‍💻", "❤️", "\U0001F600", "🇺🇸", "日本", "Ωμέγα", "ß", "İ", "ǅ", "ﬁ", "ＡＢ", "\U0010FFFD"]
    + list("aZz09 .,-'#:")
)
_ANY_CHAR = st.characters(exclude_categories=("Cs",))
_LONG_WORD = st.text(st.sampled_from("abcxyzéß日Ω"), min_size=40, max_size=250)
_TEXT = st.one_of(
    st.text(_ANY_CHAR, max_size=30),
    st.lists(st.sampled_from(_SPECIAL), max_size=20).map("".join),
    st.lists(st.one_of(_LONG_WORD, st.text(_ANY_CHAR, max_size=8)), max_size=4).map(" ".join),
)
_TEXTS = st.lists(_TEXT, min_size=1, max_size=6)
_WHITESPACE = st.text(st.sampled_from([" ", "\t", "\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2003", "\u3000"]), max_size=3)

_SIGNATURE = [tf.TensorSpec([None], tf.string)]
_hasher = TextHasher(BUCKETS)
_hash_ids = tf.function(_hasher.call, input_signature=_SIGNATURE)
_another_hash_ids = tf.function(TextHasher(BUCKETS).call, input_signature=_SIGNATURE)  # a second layer
_hash_values = tf.function(lambda text: hash_strings(text, BUCKETS), input_signature=_SIGNATURE)
_normalize = tf.function(normalize, input_signature=_SIGNATURE)


def _ids(texts: list[str]) -> list[list[int]]:
    return _hash_ids(tf.constant(texts, tf.string)).to_list()


def _values(texts: list[str]) -> list[int]:
    return _hash_values(tf.constant(texts, tf.string)).numpy().tolist()


def _swap_ascii_case(text: str) -> str:
    return "".join(c.lower() if "A" <= c <= "Z" else c.upper() if "a" <= c <= "z" else c for c in text)


# --------------------------------------------------------------------------- the featurizer


@PROPERTY
@given(_TEXTS)
def test_featurizer_never_raises_and_ids_are_in_range(texts):
    ids = _hash_ids(tf.constant(texts, tf.string))
    assert ids.dtype == tf.int64 and ids.nrows() == len(texts)
    flat = ids.flat_values.numpy()
    assert np.all((flat >= 0) & (flat < BUCKETS))
    values = np.asarray(_values(texts))
    assert values.shape == (len(texts),) and np.all((values >= 0) & (values < BUCKETS))
    for text in _normalize(tf.constant(texts, tf.string)).numpy().tolist():
        text.decode("utf-8")  # valid UTF-8 out


@PROPERTY
@given(_TEXTS)
def test_featurizer_is_deterministic(texts):
    first = _ids(texts)
    assert _ids(texts) == first
    assert _another_hash_ids(tf.constant(texts, tf.string)).to_list() == first
    assert _values(texts) == _values(texts)


@PROPERTY
@given(_TEXTS, st.randoms(use_true_random=False))
def test_featurizer_row_does_not_depend_on_its_batch(texts, random):
    batch = _ids(texts)
    assert [_ids([text])[0] for text in texts] == batch
    order = list(range(len(texts)))
    random.shuffle(order)
    assert _ids([texts[i] for i in order]) == [batch[i] for i in order]
    values = _values(texts)
    assert [_values([text])[0] for text in texts] == values


@PROPERTY
@given(_TEXTS)
def test_featurizer_ignores_ascii_case(texts):
    swapped = [_swap_ascii_case(text) for text in texts]
    assert _ids(swapped) == _ids(texts)
    assert _values(swapped) == _values(texts)


@PROPERTY
@given(st.lists(_TEXT.filter(lambda text: len(text) <= 700), min_size=1, max_size=6), _WHITESPACE, _WHITESPACE)
def test_featurizer_ignores_leading_and_trailing_white_space(texts, lead, trail):
    """Within the window of characters looked at (12 * max_words = 768 by default; these texts fit in it)."""
    padded = [lead + text + trail for text in texts]
    assert _ids(padded) == _ids(texts)
    assert _values(padded) == _values(texts)
    assert _normalize(tf.constant(padded)).numpy().tolist() == _normalize(tf.constant(texts)).numpy().tolist()


_WINDOW = 8
_windowed = tf.function(TextHasher(BUCKETS, max_chars=_WINDOW).call, input_signature=_SIGNATURE)


@settings(max_examples=20, deadline=None)
@given(st.text(st.sampled_from("abc xyz"), min_size=_WINDOW - 1, max_size=_WINDOW - 1), _WHITESPACE.filter(bool))
def test_featurizer_keeps_a_whole_word_that_ends_at_the_window_edge(head, trail):
    text = head + "z"  # exactly max_chars characters, the last one a letter
    assert _windowed(tf.constant([text + trail])).to_list() == _windowed(tf.constant([text])).to_list()


# --------------------------------------------------------------------------- the readers

_CELL_TEXT = st.text(max_size=20)  # any Unicode but surrogates, control characters included
_WORDY_TEXT = st.tuples(_CELL_TEXT, st.sampled_from("aZ9é日ß"), _CELL_TEXT).map("".join)  # holds a letter or digit
_NUMBER = st.one_of(st.integers(-10**6, 10**6), st.floats())  # floats: NaN, infinities, -0.0, tiny, huge
_ANY_ROW = st.fixed_dictionaries({
    "query": st.one_of(_CELL_TEXT, st.none(), _NUMBER),
    "query_country": st.one_of(st.text(max_size=4), st.none()),
    "id": st.text(max_size=6),
    "product_title": st.one_of(_CELL_TEXT, st.none()),
    "product_description": st.one_of(_CELL_TEXT, st.none()),
    "engaged": st.one_of(st.sampled_from([1, 0, -1, 2, -2]), st.none(), _NUMBER),
    "relevance": st.one_of(st.none(), _NUMBER),
})
_GOOD_ROW = st.fixed_dictionaries({
    "query": _WORDY_TEXT,
    "query_country": st.text(max_size=4),
    "id": st.text(max_size=6),
    "product_title": _WORDY_TEXT,
    "product_description": st.one_of(_CELL_TEXT, st.none()),
    "engaged": st.sampled_from([1, 0, -1]),
    "relevance": st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
})
_ROWS = st.lists(st.one_of(_GOOD_ROW, _ANY_ROW), min_size=1, max_size=8)
_TEXT_COLUMNS = ("query", "query_country", "product_id", "product_title", "product_description")


def _records(rows: list[dict], fmt: str) -> list[dict]:
    """The rows as written: a unique product id each; numbers in text columns as text, except in JSONL."""
    records = []
    for i, row in enumerate(rows):
        record = {"query": row["query"], "query_country": row["query_country"], "product_id": f"{i}:{row['id']}",
                  "product_title": row["product_title"], "product_description": row["product_description"],
                  "engaged": row["engaged"], "relevance": row["relevance"]}
        if fmt != "jsonl" and isinstance(record["query"], (int, float)):
            record["query"] = repr(record["query"])
        records.append(record)
    return records


def _write(records: list[dict], path: str, fmt: str, omit_missing: bool) -> None:
    if fmt == "parquet":
        schema = pa.schema([(name, pa.string()) for name in _TEXT_COLUMNS] + [("engaged", pa.float64()), ("relevance", pa.float64())])
        numbers = [{**r, "engaged": None if r["engaged"] is None else float(r["engaged"]),
                    "relevance": None if r["relevance"] is None else float(r["relevance"])} for r in records]
        pq.write_table(pa.Table.from_pylist(numbers, schema=schema), path)
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(records[0])
            writer.writerows(["" if value is None else repr(value) if isinstance(value, float) else value
                              for value in record.values()] for record in records)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                if omit_missing:
                    record = {key: value for key, value in record.items() if value is not None}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _as_written(value) -> str:
    """What a text cell must read back as: the text written, "" where none was (an optional column)."""
    return "" if value is None else value


def _plainly_good(record: dict) -> bool:
    """Good in every format, by rules no reader can read differently."""
    def has_text(value) -> bool:
        return isinstance(value, str) and any(c.isalnum() for c in value)

    relevance = record["relevance"]
    return (has_text(record["query"]) and has_text(record["product_title"]) and isinstance(record["query_country"], str)
            and type(record["engaged"]) is int and record["engaged"] in (1, 0, -1)
            and (relevance is None or abs(relevance) <= FLOAT32_MAX))  # relevance is stored as float32


def _plainly_bad(record: dict) -> bool:
    engaged = record["engaged"]
    return (record["query"] is None or record["product_title"] is None or not isinstance(record["query"], str)
            or engaged is None or (isinstance(engaged, float) and math.isnan(engaged))
            or (type(engaged) is int and engaged not in (1, 0, -1))
            or (record["relevance"] is not None and not abs(record["relevance"]) <= FLOAT32_MAX))  # NaN, inf, 1e300


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_ROWS, omit_missing=st.booleans(), batch_rows=st.sampled_from([2, 3, 65536]))
def test_readers_keep_or_report_every_row_and_keep_text_exactly(fmt, rows, omit_missing, batch_rows):
    records = _records(rows, fmt)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"train.{fmt}")
        _write(records, path, fmt, omit_missing)
        report = FileReport(path, "impressions")
        try:
            tables = list(Validator("collect").iter_file(path, "impressions", report, batch_rows=batch_rows))
        except InputError as e:  # the package's own error is allowed; it names the file
            assert path in str(e)
            return
    kept = pa.concat_tables(tables).to_pylist() if tables else []
    by_id = {row["product_id"]: row for row in kept}
    kept_rows = {int(product_id.split(":")[0]) + 1 for product_id in by_id}
    problem_rows = {problem.row for problem in report.problems}
    assert report.rows_read == len(records) and report.rows_kept == len(kept) == len(by_id)
    assert kept_rows | problem_rows == set(range(1, len(records) + 1)), (kept_rows, problem_rows)
    assert not kept_rows & problem_rows
    for row in kept:
        written = records[int(row["product_id"].split(":")[0])]
        for column in _TEXT_COLUMNS:
            if column in row:
                assert row[column] == _as_written(written[column]), column
        assert row["engaged"] in (1, 0, -1)
    for number, record in enumerate(records, start=1):
        if _plainly_good(record):
            assert number in kept_rows, [str(p) for p in report.problems if p.row == number]
        if _plainly_bad(record):
            assert number in problem_rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.one_of(_CELL_TEXT, st.none()), min_size=1, max_size=9), batch_rows=st.sampled_from([1, 2, 4, 65536]))
def test_read_batches_numbers_rows_and_returns_cells_as_stored(fmt, texts, batch_rows):
    """The raw reader alone: contiguous 1-based row numbers, every cell as written (CSV cells as UTF-8 bytes)."""
    records = [{"query": text, "query_country": "", "product_id": f"P{i}", "product_title": "lamp",
                "product_description": None, "engaged": 1, "relevance": None} for i, text in enumerate(texts)]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"train.{fmt}")
        _write(records, path, fmt, omit_missing=False)
        batches = list(read_batches(path, batch_rows=batch_rows))
    assert [batch.first_row for batch in batches] == list(np.cumsum([1] + [b.data.num_rows for b in batches[:-1]]))
    assert all(batch.data.num_rows <= batch_rows and not batch.problems for batch in batches)
    cells = [cell for batch in batches for cell in batch.data.column("query").to_pylist()]
    if fmt == "csv":  # text formats keep bytes, so a bad byte can be reported per cell; CSV has no null
        cells = [cell.decode("utf-8") for cell in cells]
        texts = ["" if text is None else text for text in texts]
    assert cells == texts
