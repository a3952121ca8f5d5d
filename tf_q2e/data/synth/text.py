"""Vectorised text over PyArrow string arrays: vocabulary look-ups, null-aware joins, capitalisation.

Titles, descriptions and queries are built a whole column at a time from these.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _word_title(s: str) -> str:
    """Capitalise the first letter of each white-space word ("3-seater" stays)."""
    return " ".join(w[:1].upper() + w[1:] for w in s.split(" "))


def _tokens(vocab: list[str], ids: np.ndarray) -> pa.Array:
    """`vocab[ids]` as a string array, null where `ids < 0`."""
    ids = np.asarray(ids)
    return pa.array(vocab, type=pa.string()).take(pa.array(ids, mask=ids < 0))


def _keep(values: pa.Array, keep: np.ndarray) -> pa.Array:
    """`values` with nulls where `keep` is False."""
    return pc.if_else(pa.array(keep), values, pa.scalar(None, pa.string()))


def _join(sep: str, *parts) -> pa.Array:
    """Join the non-null parts with `sep`; null if all parts are null.

    (Built pairwise: PyArrow 26's `binary_join_element_wise(null_handling="skip")`
    drops rows in which every input is null.)
    """
    result = None
    for part in parts:
        if isinstance(part, str):
            part = pa.scalar(part, pa.string())
        if result is None:
            result = part
            continue
        both = pc.binary_join_element_wise(result, part, sep, null_handling="emit_null")
        result = pc.coalesce(both, result, part)
    return result


def _cat(*parts) -> pa.Array:
    """Concatenate the parts; null if any part is null."""
    return pc.binary_join_element_wise(*parts, "", null_handling="emit_null")


def _capitalize_first(values: pa.Array) -> pa.Array:
    return _cat(pc.utf8_upper(pc.utf8_slice_codeunits(values, 0, 1)), pc.utf8_slice_codeunits(values, 1))
