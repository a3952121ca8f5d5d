"""The product reference: each product id's fields, to find conflicting rows."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.data import schema as S
from tf_q2e.data.columns import embedding_matrix, short


class ProductReference:
    """The fields of each product id as first seen (or as in the catalogue).

    Used to find a product id whose fields differ between rows.
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._chunks: list[pa.Table] = []
        self._table: pa.Table | None = None
        self._origins: list[tuple[str, int]] = []  # (file, row) of each product's first row
        self.frozen = False

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, product_id: str) -> bool:
        return product_id in self._index

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = pa.concat_tables(self._chunks) if self._chunks else None
            self._chunks = [self._table] if self._table is not None else []
        return self._table

    def lookup(self, ids: list[str]) -> np.ndarray:
        """Reference position of each id, -1 when unknown."""
        get = self._index.get
        return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def add(self, products: pa.Table, file: str, rows: np.ndarray) -> None:
        """Adds products (distinct ids not yet known) with their origin rows."""
        if self.frozen:
            raise RuntimeError("the product reference is frozen")
        start = len(self._index)
        for offset, pid in enumerate(products.column(S.PRODUCT_ID).to_pylist()):
            self._index[pid] = start + offset
        self._origins.extend((file, int(r)) for r in rows)
        self._chunks.append(products)
        self._table = None

    def origin(self, position: int) -> str:
        file, row = self._origins[position]
        return f"{os.path.basename(file)} row {row}"

    def check(self, table: pa.Table, ok: np.ndarray, path: str, first_row: int, kind: str, flag) -> np.ndarray:
        """Flags rows (among `ok` ones) whose product fields differ from the reference's.

        While not frozen, ids not seen yet are added first (their first row
        becomes the reference). Once frozen (a catalogue was read), an unknown
        id is flagged. Returns the mask of catalogue rows that repeat a product
        already listed.
        """
        ids = table.column(S.PRODUCT_ID).to_pylist()
        position = self.lookup(ids)
        repeated = np.zeros(len(ids), dtype=bool)
        if not self.frozen:
            firsts: dict[str, int] = {}
            for i in np.flatnonzero((position < 0) & ok):
                firsts.setdefault(ids[i], int(i))
            chosen = np.fromiter(firsts.values(), dtype=np.int64, count=len(firsts))
            if len(chosen):
                product_columns = [c for c in S.catalog_schema(1).names if c in table.column_names]
                self.add(table.select(product_columns).take(pa.array(chosen)), path, chosen + first_row)
                position = self.lookup(ids)
            if kind == "catalog":
                repeated = ok & (position >= 0)
                repeated[chosen] = False
        else:
            unknown = np.flatnonzero((position < 0) & ok)
            flag(unknown, S.PRODUCT_ID, lambda i: f"product_id {ids[i]!r} is not in the catalogue")
        known = np.flatnonzero((position >= 0) & ok)
        if not len(known):
            return repeated
        reference = self.table.take(pa.array(position[known]))
        rows = table.take(pa.array(known))
        for column in S.PRODUCT_TEXT_FIELDS:
            differs = pc.not_equal(rows.column(column), reference.column(column)).to_numpy(zero_copy_only=False)
            for j in np.flatnonzero(differs):
                i = known[j]
                flag(
                    [i],
                    column,
                    f"product_id {ids[i]!r} has {column} {short(rows.column(column)[j].as_py())} here but "
                    f"{short(reference.column(column)[j].as_py())} in {self.origin(int(position[i]))}",
                )
        image = S.PRODUCT_IMAGE_EMBEDDING
        if image in reference.column_names and image in rows.column_names:
            here = embedding_matrix(rows.column(image))
            there = embedding_matrix(reference.column(image))
            if here.shape == there.shape:
                differs = ~np.all((here == there) | (np.isnan(here) & np.isnan(there)), axis=1)
                for j in np.flatnonzero(differs):
                    i = known[j]
                    origin = self.origin(int(position[i]))
                    flag([i], image, f"product_id {ids[i]!r} has a different image embedding in {origin}")
        return repeated
