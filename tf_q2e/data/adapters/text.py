"""Text helpers of the adapters: blank strings in arrow columns, and cleaning free text."""

from __future__ import annotations

import html
import re

import pyarrow as pa
import pyarrow.compute as pc

_HTML_TAG = re.compile(r"<[^>]*>")


def _non_blank(column) -> pa.Array:
    """True where a string is non-null and not only white space."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(column), ""), False)


def _count_true(mask) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def _collapse(text) -> str:
    """White space runs to one space; None -> ""."""
    return " ".join(str(text).split()) if text is not None else ""


def _plain_text(text) -> str:
    """HTML tags removed, entities unescaped, white space collapsed; None -> ""."""
    if text is None:
        return ""
    text = str(text)
    if "<" in text:
        text = _HTML_TAG.sub(" ", text)
    if "&" in text:
        text = html.unescape(text)
    return " ".join(text.split())
