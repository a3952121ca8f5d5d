"""Vectorised samplers: weighted per-category id lists, and catalogue products grouped by a key."""

from __future__ import annotations

import numpy as np


class _PerCategory:
    """A weighted list of global ids per category, sampled vectorised.

    `table[c, j]` is the j-th id of category c (-1 padding), `cdf[c, j]` its
    cumulative weight (padding 2.0 so that `u < 1` never passes it).
    """

    def __init__(self, lists: list[list[int]], exponent: float):
        width = max(1, max(len(ids) for ids in lists))
        self.table = np.full((len(lists), width), -1, dtype=np.int64)
        self.cdf = np.full((len(lists), width), 2.0)
        self.count = np.array([len(ids) for ids in lists], dtype=np.int64)
        for c, ids in enumerate(lists):
            if ids:
                w = 1.0 / np.arange(1, len(ids) + 1) ** exponent
                cdf = np.cumsum(w / w.sum())
                cdf[-1] = 1.0
                self.table[c, : len(ids)] = ids
                self.cdf[c, : len(ids)] = cdf

    def sample(self, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
        j = (u[:, None] >= self.cdf[cat]).sum(axis=1)
        j = np.minimum(j, np.maximum(self.count[cat] - 1, 0))
        return self.table[cat, j]


class _Groups:
    """Products sorted by an int64 group key; draws uniform members of a group vectorised."""

    def __init__(self, keys: np.ndarray):
        self.order = np.argsort(keys, kind="stable")
        self.keys, self.start, self.size = np.unique(keys[self.order], return_index=True, return_counts=True)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, size) of each key's group; size 0 if the group is empty."""
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[pos] == keys
        return np.where(found, self.start[pos], 0), np.where(found, self.size[pos], 0)

    def sample(self, keys: np.ndarray, u: np.ndarray) -> np.ndarray:
        """A member per key (`u` in [0, 1), shape [n] or [n, m]); -1 for empty groups."""
        start, size = self.lookup(keys)
        if u.ndim == 2:
            start, size = start[:, None], size[:, None]
        offset = np.minimum((u * size).astype(np.int64), np.maximum(size - 1, 0))
        return np.where(size > 0, self.order[start + offset], -1)

    def members(self, key: int) -> np.ndarray:
        start, size = self.lookup(np.array([key], dtype=np.int64))
        return self.order[start[0]: start[0] + size[0]]
