"""In-graph text featurization with stock TensorFlow ops (Que2Search's hashed n-grams).

A text is normalised (`normalize`, from `tf_q2e.normalize`; also importable
from here), cut into words, and turned into n-gram tokens (`tokens`):
character trigrams of each word with `#` marking the word's start and end,
words, and pairs of adjacent words. Each kind carries its own
prefix, so kinds never collide: `"3:#re"`, `"1:red"`, `"2:red sofa"`.
`TextHasher` hashes the tokens into `[0, buckets)` with
`tf.strings.to_hash_bucket_fast` (FarmHash Fingerprint64: the same ids in
every process, on every machine), ready for an embedding bag.

Everything runs in the graph with core TensorFlow ops only (`tf.strings`,
`tf.ragged`, `tf.gather`, arithmetic): no `tensorflow_text`, no
`tf.py_function`, no NumPy at call time. A SavedModel holding these functions
takes raw strings and runs on stock TensorFlow Serving, so training and
serving featurize text identically.

Two implementations of the same tokens: `tokens` is the plain one (strings all
the way: split, `ngrams`); `TextHasher` is the fast one used in training and
serving. It never builds most trigram strings: on a grid of code points it
looks the ids of trigrams of `[a-z0-9#]` up in a table of their precomputed
hashes and builds strings only for words and for trigrams of other
characters. The tests check that its ids equal
`to_hash_bucket_fast(tokens(text), buckets)`.

Example:
    >>> tokens(tf.constant(["Red sofa"])).to_list()
    [[b'3:#re', b'3:red', b'3:ed#', b'3:#so', b'3:sof', b'3:ofa', b'3:fa#',
      b'1:red', b'1:sofa', b'2:red sofa']]
    >>> TextHasher(buckets=2**18)(tf.constant(["Red sofa", ""]))  # int64 [2, None]; row 1 empty
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf  # tf_q2e/__init__ has selected Keras 2 already

from tf_q2e.normalize import (  # fold_table and normalize stay importable from here
    _DELETE,
    _IDENTITY,
    _PAGE,
    _SPACE,
    _batch,
    _cond,
    _folded_code_points,
    _string_tensor,
    fold_table,
    normalize,
)

TRIGRAM_PREFIX = "3:"
UNIGRAM_PREFIX = "1:"
BIGRAM_PREFIX = "2:"
CHARS_PER_WORD = 12  # default max_chars = CHARS_PER_WORD * max_words
# Characters after the window looked at to tell whether its last word goes on (past removed marks).
_LOOKAHEAD = 4

_MARK = 0x23  # '#': word start/end in char trigrams; never in a normalised word

# Trigram symbols: 0 = '#' (word edge), 1..36 = [0-9a-z], 37 = any other word character.
_ALPHABET = "#0123456789abcdefghijklmnopqrstuvwxyz"
_OTHER = len(_ALPHABET)
_BASE = _OTHER + 1


# --------------------------------------------------------------------------- trigram tables (Python, built once)


@functools.lru_cache(maxsize=1)
def _symbol_table() -> np.ndarray:
    """[256] int32: folded code point (255: any non-ASCII) -> trigram symbol (0 '#', 1..36, 37 other)."""
    page_index, values = fold_table()
    table = np.full(256, _OTHER, np.int32)
    for cp in range(128):
        v = values[page_index[0] * _PAGE + cp]
        folded = chr(cp if v == _IDENTITY else v) if v != _DELETE else " "
        table[cp] = _ALPHABET.index(folded) if folded in _ALPHABET[1:] else 0
    return table


@functools.lru_cache(maxsize=8)
def _trigram_id_table(buckets: int) -> np.ndarray:
    """[38**3] int32: trigram code (l*38 + m)*38 + r -> to_hash_bucket_fast("3:" + chars), or -1.

    Only trigrams of `[0-9a-z]` with '#' at the edges have an id here; the others
    (a character outside the alphabet, symbol 37) are -1 and hashed as strings.
    """
    codes, texts = [], []
    for l_ in range(_OTHER):
        for m in range(1, _OTHER):
            for r in range(_OTHER):
                codes.append((l_ * _BASE + m) * _BASE + r)
                texts.append(TRIGRAM_PREFIX + _ALPHABET[l_] + _ALPHABET[m] + _ALPHABET[r])
    with tf.init_scope():  # eager, even when the layer is built inside a graph
        ids = tf.strings.to_hash_bucket_fast(tf.constant(texts), buckets).numpy()
    table = np.full(_BASE**3, -1, np.int32)  # 214 KiB; ids < buckets <= 2**31 - 1
    table[np.asarray(codes)] = ids
    return table


def hash_strings(values, buckets: int) -> tf.Tensor:
    """Hashes whole values (categories, query context such as country): tf.string -> int64 ids.

    Each value is normalised first, so "US", " us " and "ＵＳ" share an id:
    `tf.strings.to_hash_bucket_fast(normalize(values), buckets)`, in
    `[0, buckets)`, with the shape of `values` ([B] -> [B]).
    """
    if int(buckets) < 1:
        raise ValueError(f"hash_strings: buckets ({buckets}) must be at least 1")
    return tf.strings.to_hash_bucket_fast(normalized_values(values), int(buckets))


def normalized_values(values) -> tf.Tensor:
    """The normalised whole values that `hash_strings` hashes ("" for a blank or unreadable value)."""
    return normalize(_string_tensor(values, "hash_strings: values"))


# --------------------------------------------------------------------------- tokens (plain implementation)


def _options(char_trigrams, word_unigrams, word_bigrams, max_words, max_chars, what: str) -> tuple:
    if not (char_trigrams or word_unigrams or word_bigrams):
        raise ValueError(f"{what}: char_trigrams, word_unigrams and word_bigrams are all False; enable at least one")
    if int(max_words) < 1:
        raise ValueError(f"{what}: max_words ({max_words}) must be at least 1")
    max_chars = CHARS_PER_WORD * int(max_words) if max_chars is None else int(max_chars)
    if max_chars < 1:
        raise ValueError(f"{what}: max_chars ({max_chars}) must be at least 1 (or None: {CHARS_PER_WORD} * max_words)")
    return bool(char_trigrams), bool(word_unigrams), bool(word_bigrams), int(max_words), max_chars


def _window(text: tf.Tensor, max_chars: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """[B] -> [B] the first max_chars characters, [B] the next (up to) _LOOKAHEAD characters, [B] bool: more follow."""
    window = tf.strings.substr(text, 0, max_chars, unit="UTF8_CHAR")
    start = tf.strings.length(window)  # bytes; _LOOKAHEAD characters take at most 4 bytes each
    after = tf.strings.substr(tf.strings.substr(text, start, tf.fill(tf.shape(start), 4 * _LOOKAHEAD)),
                              0, _LOOKAHEAD, unit="UTF8_CHAR")
    return window, after, start + tf.strings.length(after) < tf.strings.length(text)


def _first_is_word(folded_after: tf.RaggedTensor, beyond: tf.Tensor) -> tf.Tensor:
    """[B] bool: the text goes on after the window with a word character, so the window's last word is cut.

    `folded_after` [B, None] is the characters after the window folded: its
    first code point is the first one `normalize` keeps. If it keeps none
    (they are marks or format characters, or there are none), the word counts
    as cut when the text goes on `beyond` the lookahead, not when it ends.
    """
    first = tf.gather(tf.concat([folded_after.flat_values, [_SPACE]], 0), folded_after.row_starts())
    return tf.where(folded_after.row_lengths() > 0, tf.not_equal(first, _SPACE), beyond)


def tokens(text, char_trigrams: bool = True, word_unigrams: bool = True, word_bigrams: bool = True,
           max_words: int = 64, max_chars: int | None = None) -> tf.RaggedTensor:
    """The n-gram tokens of each text: [B] raw tf.string -> tf.string RaggedTensor [B, None].

    The text is normalised (`normalize`) and cut into words at spaces. Only the
    first `max_words` words are used, taken from the first `max_chars`
    characters of the raw text (default 12 * max_words = 768: room for 64
    words of 11 letters; a word cut at that limit, i.e. followed by a word
    character, is dropped), so the cost of a long text is bounded. A row
    holds, in this order:

    * char trigrams of each word, `#` marking the word's start and end, prefix
      "3:": "red" -> "3:#re", "3:red", "3:ed#" (one per character; a one-letter
      word "a" -> "3:#a#"). Characters, not bytes: "ωμ" -> "3:#ωμ", "3:ωμ#";
    * words, prefix "1:": "1:red";
    * pairs of adjacent words joined by a space, prefix "2:": "2:red sofa".

    Kinds never collide: each has its own prefix, and ':' and '#' never occur
    in a normalised word. A blank text gives an empty row.

    This is the plain implementation, written for reading and testing;
    `TextHasher` computes `to_hash_bucket_fast(tokens(...))` several times faster.

    Args:
      text: tf.string [B] (or [B, 1]).
      char_trigrams, word_unigrams, word_bigrams: which kinds to produce.
      max_words: words used per text (at least 1).
      max_chars: characters of the raw text looked at; None = 12 * max_words.

    Returns:
      tf.string RaggedTensor [B, None].
    """
    trigrams, unigrams, bigrams, max_words, max_chars = _options(
        char_trigrams, word_unigrams, word_bigrams, max_words, max_chars, "tokens")
    window, after, beyond = _window(_batch(text, "tokens: text"), max_chars)
    n_rows = tf.shape(window, out_type=tf.int64)[0]
    both = _folded_code_points(tf.concat([window, after], 0))  # [2B, None]: one fold for both
    folded = both[:n_rows]  # [B, None]
    words = tf.strings.split(tf.strings.unicode_encode(folded, "UTF-8"))  # [B, W]
    # A cut text whose window ends inside a word (a word character follows) loses that word.
    n_cps = folded.row_lengths()
    last_cp = tf.gather(tf.concat([folded.flat_values, [_SPACE]], 0), tf.maximum(folded.row_limits() - 1, 0))
    ends_in_word = tf.logical_and(n_cps > 0, tf.not_equal(last_cp, _SPACE))
    cut_word = tf.logical_and(ends_in_word, _first_is_word(both[n_rows:], beyond))
    limit = tf.minimum(tf.cast(max_words, tf.int64), words.row_lengths() - tf.cast(cut_word, tf.int64))  # [B]
    words = tf.ragged.boolean_mask(words, tf.ragged.range(words.row_lengths()) < limit[:, None])
    groups = []
    if trigrams:
        chars = tf.strings.unicode_split("#" + words + "#", "UTF-8")  # [B, W, C]
        groups.append(TRIGRAM_PREFIX + tf.strings.ngrams(chars, 3, separator="").merge_dims(1, 2))
    if unigrams:
        groups.append(UNIGRAM_PREFIX + words)
    if bigrams:
        groups.append(BIGRAM_PREFIX + tf.strings.ngrams(words, 2, separator=" "))
    return groups[0] if len(groups) == 1 else tf.concat(groups, axis=1)


# --------------------------------------------------------------------------- TextHasher (fast implementation)


def _code_point_grid(window: tf.Tensor, after: tf.Tensor, beyond: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """The folded windows on a grid of trigram symbols, with byte offsets into a source string.

    Returns:
      symbol: int32 [B, C]: column 0 is '#' (0), columns 1..n are the folded
        characters of the row (0 for a separator, 1..36 for [0-9a-z], 37 for
        any other word character), then '#' up to C = (longest row in bytes) + 3.
      offset: int32 [B, C]: byte offset of each column's character in `source`
        (-1 for column 0 of a byte-path row, whose source has no leading '#').
      source: tf.string [B]: the row (lower-cased), or for a row put on the grid
        character by character '#' + the row + '#'; words (and trigrams with a
        character outside [0-9a-z]) are substrings of it at `offset`.
      n_chars: int32 [B]: n, the number of folded characters.
      has_other: bool []: some symbol is 37 (only rows with non-ASCII text have those).
      next_is_word: bool [B]: `after` (the characters after the window) starts
        with a word character once folded (`_first_is_word`; `beyond`: the
        text goes on after `after`).

    Rows in ASCII (most rows of most catalogues) go straight from bytes to the
    grid. The other rows are decoded and folded through `fold_table` first;
    those that are ASCII once folded ("Café" -> "cafe") then take the same
    byte path, and only rows that keep non-ASCII characters ("Größe", "日本")
    are put on the grid character by character.
    """
    non_ascii = tf.where(~tf.strings.regex_full_match(window, "[\\x00-\\x7f]*"))[:, :1]  # [G, 1]
    symbols = tf.constant(_symbol_table())  # [256]
    # The character after the window: an ASCII one is looked up (0 = separator; "" gives byte 0, a
    # separator too); the rows where it is not ASCII are folded with the non-ASCII windows.
    after_byte = tf.cast(tf.io.decode_raw(after, tf.uint8, fixed_length=1)[:, 0], tf.int32)  # [B]
    wide_after = tf.where(after_byte >= 0x80)[:, :1]  # [A, 1]
    ascii_next_is_word = tf.gather(symbols, after_byte) > 0  # [B]

    def fold_non_ascii_rows():
        n_windows = tf.shape(non_ascii, out_type=tf.int64)[0]
        both = _folded_code_points(tf.concat([tf.gather(window, non_ascii[:, 0]), tf.gather(after, wide_after[:, 0])],
                                             0))  # [G + A, None]
        folded = both[:n_windows]  # [G, None]
        encoded = tf.strings.unicode_encode(folded, "UTF-8")  # [G]
        wide = tf.where(tf.cast(tf.strings.length(encoded), tf.int64) > folded.row_lengths())[:, 0]  # [O] still wide
        wide_next_is_word = _first_is_word(both[n_windows:], tf.gather(beyond, wide_after[:, 0]))  # [A]
        next_is_word = tf.tensor_scatter_nd_update(ascii_next_is_word, wide_after, wide_next_is_word)
        return (tf.tensor_scatter_nd_update(window, non_ascii, encoded), tf.gather(folded, wide),
                tf.gather(non_ascii, wide), next_is_word)

    # [B]: ASCII rows as they are, the others folded; [O, None]; [O, 1]; [B]
    text, wide_folded, wide, next_is_word = _cond(
        tf.size(non_ascii) + tf.size(wide_after) > 0, fold_non_ascii_rows,
        lambda: (window, tf.RaggedTensor.from_row_splits(tf.zeros([0], tf.int32), tf.zeros([1], tf.int64), validate=False),
                 tf.zeros([0, 1], tf.int64), ascii_next_is_word))
    n_rows = tf.shape(text)[0]
    n_bytes = tf.strings.length(text)  # [B]
    width = tf.maximum(tf.reduce_max(tf.concat([n_bytes, [0]], 0)), 1)
    raw = tf.cast(tf.io.decode_raw(text, tf.uint8, fixed_length=width), tf.int32)  # [B, width]
    symbol = tf.pad(tf.gather(symbols, raw), [[0, 0], [1, 2]])  # [B, C]
    offset = tf.broadcast_to(tf.range(-1, width + 2), [n_rows, width + 3])  # [B, C]
    source = tf.strings.lower(text)  # [B]

    def put_wide_rows():  # the rows still not ASCII once folded, character by character
        cp = tf.where(tf.equal(wide_folded.flat_values, _SPACE), _MARK, wide_folded.flat_values)  # [N]
        w_source = "#" + tf.strings.unicode_encode(wide_folded.with_flat_values(cp), "UTF-8") + "#"  # [O]
        shape = tf.stack([wide_folded.nrows(), tf.cast(width, tf.int64)])  # [O, width]
        w_symbol = wide_folded.with_flat_values(tf.gather(symbols, tf.minimum(cp, 255))).to_tensor(0, shape=shape)
        utf8_bytes = 1 + sum(tf.cast(cp >= limit, tf.int32) for limit in (0x80, 0x800, 0x10000))  # [N]
        w_n_bytes = wide_folded.with_flat_values(utf8_bytes).to_tensor(1, shape=shape)
        w_offset = tf.cumsum(tf.pad(w_n_bytes, [[0, 0], [1, 2]], constant_values=1), axis=1, exclusive=True)
        return (tf.tensor_scatter_nd_update(symbol, wide, tf.pad(w_symbol, [[0, 0], [1, 2]])),
                tf.tensor_scatter_nd_update(offset, wide, w_offset),
                tf.tensor_scatter_nd_update(source, wide, w_source),
                tf.tensor_scatter_nd_update(n_bytes, wide, tf.cast(wide_folded.row_lengths(), tf.int32)),
                tf.constant(True))

    grid = _cond(tf.size(wide) > 0, put_wide_rows, lambda: (symbol, offset, source, n_bytes, tf.constant(False)))
    return (*grid, next_is_word)


def _row_counts(rows: tf.Tensor, n_rows, dtype=tf.int64) -> tf.Tensor:
    """[B]: how many of `rows` (int64 [K], row indices) fall in each of the n_rows rows."""
    return tf.math.unsorted_segment_sum(tf.ones_like(rows, dtype), rows, n_rows)


def _flat_substrings(source: tf.Tensor, rows: tf.Tensor, counts: tf.Tensor, start: tf.Tensor, end: tf.Tensor,
                     n_rows) -> tf.Tensor:
    """Substrings source[rows[i]][start[i]:end[i]]: tf.string [K], for `rows` int64 [K] in non-decreasing order
    (`counts` [B] = `_row_counts(rows, n_rows)`).

    They are cut from `source` broadcast over a [B, K_max] grid (row, i-th
    substring of the row) rather than from a gathered copy of the source string
    of each substring, which would copy a long text once per word.
    """
    column = tf.range(tf.size(rows, out_type=tf.int64)) - tf.gather(tf.cumsum(counts, exclusive=True), rows)  # [K]
    at = tf.stack([rows, column], axis=1)  # [K, 2]
    shape = tf.stack([n_rows, tf.reduce_max(tf.concat([counts, [0]], 0))])

    def dense(values):
        return tf.raw_ops.SparseToDense(sparse_indices=at, output_shape=shape, sparse_values=values,
                                        default_value=tf.zeros([], values.dtype), validate_indices=False)

    return tf.gather_nd(tf.strings.substr(source[:, None], dense(start), dense(end - start)), at)


def _rows_in_order(groups: list[tuple[tf.Tensor, tf.Tensor]], n_rows) -> tf.RaggedTensor:
    """One RaggedTensor [B, None] from groups of (values [K_g], rows [K_g] non-decreasing):
    row r holds group 0's values of row r, then group 1's, ... (`tf.concat(axis=1)` of the groups).

    The values are gathered by one `tf.ragged.range` over the (row, group)
    runs, and the result keeps its row ids (the embedding bag's segment ids):
    about a third of the ops of concatenating RaggedTensors, which is most of
    the cost for one query.
    """
    if len(groups) == 1:
        values, rows = groups[0]
        return tf.RaggedTensor.from_value_rowids(values, rows, n_rows, validate=False)
    counts, starts, base = [], [], tf.constant(0, tf.int64)
    for values, rows in groups:
        count = _row_counts(rows, n_rows)  # [B]
        counts.append(count)
        starts.append(tf.cumsum(count, exclusive=True) + base)  # [B]: where row r's run starts in the group's values
        base += tf.size(values, out_type=tf.int64)
    starts, counts = tf.reshape(tf.stack(starts, 1), [-1]), tf.reshape(tf.stack(counts, 1), [-1])  # [B * G] row-major
    order = tf.ragged.range(starts, starts + counts).flat_values
    values = tf.gather(tf.concat([v for v, _ in groups], 0), order)
    rows = tf.gather(tf.concat([r for _, r in groups], 0), order)
    return tf.RaggedTensor.from_value_rowids(values, rows, n_rows, validate=False)


def _hashed_ngrams(text: tf.Tensor, buckets: int, trigrams: bool, unigrams: bool, bigrams: bool,
                   max_words: int, max_chars: int) -> tf.RaggedTensor:
    """[B] strings -> int64 [B, None]: to_hash_bucket_fast(tokens(text), buckets), computed on a grid."""
    window, after, beyond = _window(text, max_chars)
    symbol, offset, source, n_chars, has_other, next_is_word = _code_point_grid(
        window, after, beyond)  # [B, C], [B, C], [B], [B], [], [B]
    n_rows = tf.shape(symbol, out_type=tf.int64)[0]
    n_columns = tf.shape(symbol, out_type=tf.int64)[1]
    is_word = symbol > 0  # [B, C]
    starts = tf.logical_and(is_word[:, 1:], ~is_word[:, :-1])  # [B, C-1]: j is true if column j+1 starts a word
    first = tf.where(starts)  # [W, 2] (row, j) of every word's first character, row-major
    last = tf.where(tf.logical_and(is_word[:, 1:-1], ~is_word[:, 2:]))  # [W, 2] ... and of its last character
    n_words = _row_counts(first[:, 0], n_rows, tf.int32)  # [B]
    ends_in_word = tf.gather(is_word, n_chars, batch_dims=1)  # [B] the window's last character is a word's
    cut_word = tf.logical_and(ends_in_word, next_is_word)  # [B] ... and the text's next character too
    limit = tf.clip_by_value(n_words - tf.cast(cut_word, tf.int32), 0, max_words)  # [B]

    def keep_first_words():  # the first `limit` words of each row; the grid cropped after them
        row = first[:, 0]  # [W]
        first_word = tf.cast(tf.cumsum(n_words, exclusive=True), tf.int64)  # [B] index in `first` of a row's word 1
        kept = tf.range(tf.size(row, out_type=tf.int64)) - tf.gather(first_word, row) < tf.cast(
            tf.gather(limit, row), tf.int64)  # [W]
        cut_at = tf.gather(tf.concat([first[:, 1], [n_columns]], 0),
                           tf.where(limit < n_words, first_word + tf.cast(limit, tf.int64), tf.size(row, tf.int64)))
        keep = tf.logical_and(is_word[:, 1:], tf.range(n_columns - 1)[None, :] < cut_at[:, None])  # [B, C-1]
        kept_last = tf.boolean_mask(last, kept)
        # Columns 0 .. j+3 suffice: the last kept character (column j+1), its right neighbour, the offset after it.
        width = tf.reduce_max(tf.concat([kept_last[:, 1], [-1]], 0)) + 4
        return (keep[:, :width - 1], symbol[:, :width], offset[:, :width], tf.boolean_mask(first, kept), kept_last)

    keep, symbol, offset, first, last = _cond(  # keep: [B, C-1]; first, last: [W, 2] of the kept words
        tf.reduce_any(limit < n_words), keep_first_words, lambda: (is_word[:, 1:], symbol, offset, first, last))
    groups = []  # (ids int64 [K], rows int64 [K]) of each kind of token, row-major
    if trigrams:
        middle = keep[:, :-1]  # [B, C-2] columns 1..C-2
        code = (symbol[:, :-2] * _BASE + symbol[:, 1:-1]) * _BASE + symbol[:, 2:]  # [B, C-2]
        ids = tf.gather(tf.constant(_trigram_id_table(buckets)), code)  # int32 [B, C-2]; -1: not in the table

        def hash_other_trigrams():  # trigrams with a character outside [0-9a-z#]
            where = tf.where(tf.logical_and(middle, ids < 0))  # [K, 2]: (row, j), the trigram of column j + 1
            strings = _flat_substrings(source, where[:, 0], _row_counts(where[:, 0], n_rows),
                                       tf.gather_nd(offset, where), tf.gather_nd(offset, where + [0, 3]), n_rows)  # [K]
            hashed = tf.cast(tf.strings.to_hash_bucket_fast(TRIGRAM_PREFIX + strings, buckets), tf.int32)
            return tf.tensor_scatter_nd_update(ids, where, hashed)

        ids = _cond(has_other, hash_other_trigrams, lambda: ids)
        at = tf.where(middle)  # [T, 2]
        groups.append((tf.cast(tf.gather_nd(ids, at), tf.int64), at[:, 0]))
    if unigrams or bigrams:
        rows = first[:, 0]  # [W]
        words_per_row = _row_counts(rows, n_rows)  # [B]
        words = _flat_substrings(source, rows, words_per_row, tf.gather_nd(offset, first + [0, 1]),
                                 tf.gather_nd(offset, last + [0, 2]), n_rows)  # [W]
        if unigrams:
            groups.append((tf.strings.to_hash_bucket_fast(UNIGRAM_PREFIX + words, buckets), rows))
        if bigrams:
            splits = tf.concat([[0], tf.cumsum(words_per_row)], 0)
            pairs, _ = tf.raw_ops.StringNGrams(  # what tf.strings.ngrams(words, 2, " ") runs, on flat words
                data=words, data_splits=splits, separator=" ", ngram_widths=[2], left_pad="", right_pad="",
                pad_width=0, preserve_short_sequences=False)  # [P]: words i and i + 1 of a row, row-major
            pair_rows = tf.gather(rows, tf.where(tf.equal(rows[1:], rows[:-1]))[:, 0])  # [P]
            groups.append((tf.strings.to_hash_bucket_fast(BIGRAM_PREFIX + pairs, buckets), pair_rows))
    return _rows_in_order(groups, n_rows)


@tf.keras.utils.register_keras_serializable(package="tf_q2e")
class TextHasher(tf.keras.layers.Layer):
    """Raw text -> hashed n-gram ids for an embedding bag (Que2Search's text features).

    `call(text)`: tf.string [B] (or [B, 1]) -> int64 RaggedTensor [B, None]:
    `tf.strings.to_hash_bucket_fast(tokens(text, ...), buckets)`, ids in
    `[0, buckets)`, in the order of `tokens` (trigrams, words, word pairs).
    An empty or blank text gives an empty row. The layer has no weights; the
    ids are the same in every process and on every machine (FarmHash).

    Example:
        hasher = TextHasher(buckets=2**18)
        ids = hasher(tf.constant(["Red sofa", ""]))  # [[10 ids], []]
        bag = tf.nn.safe_embedding_lookup_sparse(table, ids.to_sparse(), combiner="sum")

    How: rows in ASCII (and rows that are ASCII once folded, "Café" -> "cafe")
    go from bytes to a grid of trigram symbols; the ids of trigrams of
    `[0-9a-z#]` are looked up in a table of their hashes (`buckets`-specific,
    built at construction); only words, word pairs and trigrams with another
    character become strings. Other rows (Cyrillic, CJK, "ß"...) are folded
    character by character first, which costs about twice as much. The graph
    holds two constant tables (~330 KiB) per call site. Speed: see
    `benchmarks/featurize_speed.py`.

    Args:
      buckets: number of hash buckets (rows of the embedding table), 1 to 2**31 - 1.
      char_trigrams, word_unigrams, word_bigrams, max_words, max_chars: as in `tokens`.
    """

    def __init__(self, buckets: int, char_trigrams: bool = True, word_unigrams: bool = True,
                 word_bigrams: bool = True, max_words: int = 64, max_chars: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(buckets) < 1:
            raise ValueError(f"TextHasher: buckets ({buckets}) must be at least 1")
        if int(buckets) > 2**31 - 1:
            raise ValueError(f"TextHasher: buckets ({buckets}) must be at most 2**31 - 1")
        self.buckets = int(buckets)
        (self.char_trigrams, self.word_unigrams, self.word_bigrams, self.max_words,
         self.max_chars) = _options(char_trigrams, word_unigrams, word_bigrams, max_words, max_chars, "TextHasher")
        if self.char_trigrams:
            _trigram_id_table(self.buckets)  # built now, eagerly, rather than inside the first trace

    @classmethod
    def from_config_section(cls, features_cfg, **kwargs) -> "TextHasher":
        """A hasher for the text fields, from `tf_q2e.config.FeaturesConfig`."""
        return cls(buckets=features_cfg.buckets, char_trigrams=features_cfg.char_trigrams,
                   word_unigrams=features_cfg.word_unigrams, word_bigrams=features_cfg.word_bigrams,
                   max_words=features_cfg.max_words, **kwargs)

    def call(self, text) -> tf.RaggedTensor:
        return _hashed_ngrams(_batch(text, f"{self.name}: text"), self.buckets, self.char_trigrams,
                              self.word_unigrams, self.word_bigrams, self.max_words, self.max_chars)

    def get_config(self) -> dict:
        return {**super().get_config(), "buckets": self.buckets, "char_trigrams": self.char_trigrams,
                "word_unigrams": self.word_unigrams, "word_bigrams": self.word_bigrams,
                "max_words": self.max_words, "max_chars": self.max_chars}
