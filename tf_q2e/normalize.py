"""Text normalisation for matching, in the graph with stock TensorFlow ops.

`normalize` folds text character by character through one table over all
code points (`fold_table`) and collapses separators: "Café Crème, 2.5m" ->
"cafe creme 2 5m". What it does:

* removes accents and compatibility forms from Latin, Greek and full-width
  text (one-to-one NFKD base characters: "é" -> "e", "ＡＢＣ" -> "abc");
* removes combining marks, variation selectors and format characters;
* turns punctuation, symbols, separators, control and private-use characters
  into spaces, then collapses runs of spaces and trims;
* case-folds every character whose case fold is one character.

Letters, digits and marks of all other scripts are kept, only case-folded.
What it does not do: full NFKC/NFKD, transliteration, stemming, stop words,
spelling correction, word segmentation of scripts written without spaces, or
keeping symbols that carry meaning ("c++", "$"). The docstring of `normalize`
has the exact rules.

The table is built once per process from Python's `unicodedata` and stored in
the graph as a constant, so a SavedModel folds exactly as it did when it was
saved; at call time only core ops run (`tf.strings`, `tf.ragged`,
`tf.gather`): no `tensorflow_text`, no `tf.py_function`, no NumPy.
`tf_q2e.features` builds its tokens and hashed n-grams on this module.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np
import tensorflow as tf  # tf_q2e/__init__ has selected Keras 2 already
from tensorflow.core.framework import attr_value_pb2

_SPACE = 0x20
_IDENTITY = -1  # fold-table value: the code point stays as it is
_DELETE = -2  # fold-table value: the code point is removed
_PAGE_BITS = 8
_PAGE = 1 << _PAGE_BITS
_MAX_CODE_POINT = 0x10FFFF

# Blocks whose characters become the base character of their NFKD decomposition.
_FOLDED_BLOCKS = (
    (0x0000, 0x036F),  # Basic Latin .. Latin Extended-B, IPA, Spacing Modifier Letters, Combining Marks
    (0x0370, 0x03FF),  # Greek and Coptic
    (0x1E00, 0x1EFF),  # Latin Extended Additional (Vietnamese...)
    (0x1F00, 0x1FFF),  # Greek Extended
    (0x2070, 0x209F),  # Superscripts and Subscripts
    (0x2100, 0x214F),  # Letterlike Symbols (K Kelvin sign -> k, Å Angstrom sign -> a, ℓ -> l)
    (0xFF01, 0xFF5E),  # full-width ASCII
    (0x1D400, 0x1D7FF),  # Mathematical Alphanumeric Symbols ("𝐒𝐨𝐟𝐚" -> "sofa")
)
# Code points removed rather than turned into a space (with all format characters, Cf).
_DELETED_BLOCKS = (
    (0x0300, 0x036F),  # Combining Diacritical Marks
    (0x1AB0, 0x1AFF),  # Combining Diacritical Marks Extended
    (0x1DC0, 0x1DFF),  # Combining Diacritical Marks Supplement
    (0x20D0, 0x20FF),  # Combining Diacritical Marks for Symbols
    (0xFE00, 0xFE0F),  # Variation Selectors
    (0xFE20, 0xFE2F),  # Combining Half Marks
    (0xE0100, 0xE01EF),  # Variation Selectors Supplement
)
_ZERO_WIDTH_SPACE = 0x200B  # a word break in Thai, Khmer...: becomes a space


# --------------------------------------------------------------------------- fold table (Python, built once)


def _in(blocks, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in blocks)


def _fold_char(c: str) -> str:
    """One step of the per-character fold: '' (remove), ' ' (separator) or one character."""
    cp = ord(c)
    if cp == _ZERO_WIDTH_SPACE:
        return " "
    category = unicodedata.category(c)
    if category == "Cn":
        return c  # unassigned in this Unicode version: as it is
    if category == "Cf" or _in(_DELETED_BLOCKS, cp):
        return ""
    if _in(_FOLDED_BLOCKS, cp):
        base = "".join(x for x in unicodedata.normalize("NFKD", c) if unicodedata.category(x) != "Mn")
        if len(base) == 1:  # multi-character expansions (ligatures, "¼", "ǆ"...) keep the character
            c, category = base, unicodedata.category(base)
    if category[0] in "PSZ" or category in ("Cc", "Co", "Cs"):
        return " "
    for folded in (c.casefold(), c.lower()):
        if len(folded) == 1:
            return folded
    return c


@functools.lru_cache(maxsize=1)
def fold_table() -> tuple[np.ndarray, np.ndarray]:
    """The per-code-point fold of `normalize` as a two-level table `(page_index, values)`.

    For a code point `cp`, `v = values[page_index[cp >> 8] * 256 + (cp & 255)]`:
    `v >= 0` is the replacement code point, `-1` keeps `cp`, `-2` removes it.
    Identical pages are stored once (all of Unicode takes ~115 pages, ~115 KiB).
    The table is the fixed point of the per-character fold, so folding twice
    equals folding once. Built once per process (~0.2 s) from Python's
    `unicodedata` (Unicode `unicodedata.unidata_version`).
    """
    n_pages = (_MAX_CODE_POINT >> _PAGE_BITS) + 1
    page_ids: dict[bytes, int] = {}
    pages: list[np.ndarray] = []
    page_index = np.zeros(n_pages, np.int32)
    for p in range(n_pages):
        page = np.full(_PAGE, _IDENTITY, np.int32)
        first = p << _PAGE_BITS
        categories = [unicodedata.category(chr(cp)) for cp in range(first, first + _PAGE)]
        kinds = set(categories)
        if kinds <= {"Cn", "Lo"} and not any(lo < first + _PAGE and first <= hi for lo, hi in _FOLDED_BLOCKS):
            kinds = set()  # unassigned or caseless letters only (CJK, Hangul, Thai...): nothing to fold
        elif kinds == {"Co"}:
            page[:] = _SPACE  # private use
            kinds = set()
        for i in range(_PAGE if kinds else 0):
            cp = first | i
            c = chr(cp)
            if categories[i] in ("Cn", "Lo") and not _in(_FOLDED_BLOCKS, cp):
                continue
            out = _fold_char(c)
            for _ in range(8):  # to the fixed point (one or two steps in practice)
                if len(out) != 1 or _fold_char(out) == out:
                    break
                out = _fold_char(out)
            if out == "":
                page[i] = _DELETE
            elif out != c:
                page[i] = ord(out)
        key = page.tobytes()
        if key not in page_ids:
            page_ids[key] = len(pages)
            pages.append(page)
        page_index[p] = page_ids[key]
    return page_index, np.concatenate(pages)


# --------------------------------------------------------------------------- normalize


def _string_tensor(text, what: str) -> tf.Tensor:
    text = tf.convert_to_tensor(text)
    if text.dtype != tf.string:
        raise TypeError(f"{what} must be a tf.string tensor, got {text.dtype.name}; pass the raw text")
    return text


def _batch(text, what: str) -> tf.Tensor:
    """[B] or [B, 1] strings -> [B] strings."""
    text = _string_tensor(text, what)
    if text.shape.rank is None:
        return tf.reshape(text, [-1])
    if text.shape.rank == 2 and text.shape[1] == 1:
        return tf.squeeze(text, axis=1)
    if text.shape.rank != 1:
        raise ValueError(f"{what} must have shape [B] or [B, 1], got {text.shape}; reshape it to [B]")
    return text


def _fold(code_points: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[N] int32 code points -> ([N] folded code points, [N] bool: kept), through `fold_table`."""
    page_index, values = fold_table()
    cp = tf.minimum(code_points, _MAX_CODE_POINT)  # decoded code points are valid; a guard for the gathers
    page = tf.gather(tf.constant(page_index), tf.bitwise.right_shift(cp, _PAGE_BITS))
    value = tf.gather(tf.constant(values), page * _PAGE + tf.bitwise.bitwise_and(cp, _PAGE - 1))
    return tf.where(tf.equal(value, _IDENTITY), cp, value), tf.not_equal(value, _DELETE)


def _cond(pred, true_fn, false_fn):
    """`tf.cond`, kept in a graph as one functional `If` op rather than lowered to Switch/Merge nodes.

    Inside a `tf.function` (and in a SavedModel) TensorFlow lowers a cond to
    Switch/Merge: each tensor the branches capture goes through a Switch, each
    output through a Merge, and the untaken branch's nodes are still visited,
    as dead. The conds of the text path guard rare, large branches (non-ASCII
    text, cut words) and usually take a trivial one, so running the taken
    branch as a function costs less (timed side by side in TensorFlow's C++
    runtime with `benchmarks/cc/serve_latency.cc`). Eagerly this is `tf.cond`.
    """
    out = tf.cond(pred, true_fn, false_fn)
    if not tf.executing_eagerly():
        for tensor in tf.nest.flatten(out, expand_composites=True):
            op = tensor.op.inputs[0].op if tensor.op.type == "Identity" and tensor.op.inputs else tensor.op
            if op.type in ("If", "StatelessIf"):  # what cond_v2 does for XLA: the attribute TF's lowering pass reads
                op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
                break
    return out


def _folded_code_points(text: tf.Tensor) -> tf.RaggedTensor:
    """[B] strings -> int32 [B, None]: folded code points; separators are spaces, not yet collapsed."""
    decoded = tf.strings.unicode_decode(tf.reshape(text, [-1]), "UTF-8", errors="replace")  # [B, None]
    cp, kept = _fold(decoded.flat_values)  # [N], [N]

    def remove():  # marks and format characters are rare: only then pay for the mask
        removed = tf.ragged.boolean_mask(decoded.with_flat_values(cp), decoded.with_flat_values(kept))
        return removed.flat_values, removed.row_splits

    values, row_splits = _cond(tf.reduce_all(kept), lambda: (cp, decoded.row_splits), remove)
    return tf.RaggedTensor.from_row_splits(values, row_splits, validate=False)


def normalize(text) -> tf.Tensor:
    """Normalises text for matching: tf.string of any shape -> tf.string of the same shape.

    What it does, character by character (UTF-8 in, UTF-8 out):

    1. Bytes that are not valid UTF-8 become U+FFFD, then a space (step 4).
    2. Accents and compatibility forms are removed from Latin, Greek and
       full-width text: in the blocks Basic Latin to Latin Extended-B, IPA
       Extensions, Spacing Modifier Letters, Greek and Coptic, Latin Extended
       Additional, Greek Extended and full-width ASCII (U+FF01-U+FF5E), a
       character becomes the base character of its NFKD decomposition without
       combining marks: "Café Crème" -> "cafe creme", "ＡＢＣ" -> "abc",
       "ǖ" -> "u", "ά" -> "α", "²" -> "2", U+00A0 (no-break space) -> space.
       So do Superscripts and Subscripts ("₂" -> "2"), Letterlike Symbols
       ("ℓ" -> "l") and Mathematical Alphanumeric Symbols ("𝐒𝐨𝐟𝐚" -> "sofa").
       Only one-to-one mappings are applied: a character whose decomposition
       has several base characters is kept as it is (ligatures "ﬁ", "ĳ", "ǆ";
       fractions "¼").
    3. Combining diacritical marks (U+0300-U+036F and the Extended, Supplement,
       for-Symbols and Half-Marks blocks), variation selectors and format
       characters (category Cf: soft hyphen, zero-width joiner and non-joiner,
       bidi marks, byte order mark...) are removed, so decomposed text
       ("e" + U+0301) gives what precomposed text gives. U+200B (zero-width
       space, a word break in Thai and Khmer) becomes a space.
    4. Punctuation, symbols, separators, control and private-use characters
       (Unicode categories P*, S*, Z*, Cc, Co) become spaces: "men's t-shirt,
       2.5m" -> "men s t shirt 2 5m", "c++" -> "c", emoji -> space.
    5. Every character is case-folded when its case fold is one character
       (`str.casefold`, else `str.lower`): "SOFA" -> "sofa", "Straße" ->
       "straße" (not "strasse"), "ΣΟΦΆΣ" -> "σοφασ" (ς folds to σ).
    6. Runs of spaces become one space; leading and trailing spaces go.

    Letters, digits and marks of all other scripts are kept (CJK, Hangul,
    kana, Arabic, Hebrew, Devanagari, Thai, Cyrillic with its "й" and "ё",
    and "ø", "ł", "æ", "ß"), only case-folded.

    What it does not do: full NFKC/NFKD (Hangul syllables, kana voiced sound
    marks, half-width katakana, CJK compatibility ideographs and
    multi-character expansions are left alone), transliteration, stemming,
    stop words, spelling correction, word segmentation of scripts written
    without spaces (CJK, Thai), or keeping symbols that carry meaning
    ("c++", "$", "%").

    The fold is one table over all code points (`fold_table`), built from
    Python's `unicodedata` when first used and stored in the graph as a
    constant: a SavedModel folds exactly as it did when it was saved.
    normalize is idempotent: normalize(normalize(x)) == normalize(x).

    Args:
      text: tf.string tensor of any shape.

    Returns:
      tf.string tensor of the same shape.
    """
    text = _string_tensor(text, "normalize: text")
    flat = tf.reshape(text, [-1])  # [B]
    words = tf.strings.split(tf.strings.unicode_encode(_folded_code_points(flat), "UTF-8"))  # [B, None]
    return tf.reshape(tf.strings.reduce_join(words, axis=-1, separator=" "), tf.shape(text))
