"""A frozen text encoder's vectors, computed once per distinct text and looked up by hash.

On 2 CPU cores all-MiniLM-L6-v2 encodes a few hundred short texts a second,
and a training epoch shows the same queries and titles again and again (Home
Depot: ~0.5M impression rows over ~55k titles and ~0.4M distinct queries,
pseudo-queries included). A frozen encoder gives the same vector for the same
text every time, so `q2e train` encodes each distinct text once, before the
first epoch, and training, evaluation and `q2e index` look the vectors up.

The cache is a directory (default `RUN/text_cache/`; `train.text_cache` shares
one between runs, `q2e compare --text-cache` reads and fills it too) with one
folder per encoder variant (`variant_name`: `minilm-L6-T64` for 6 layers, 64
max tokens) of parts, each two `.npy` files (read with `allow_pickle=False`):
`part-<time>-<random>.keys.npy` (int64 hashes of the texts' UTF-8 bytes,
`tf.strings.to_hash_bucket_fast(text, 2**63 - 1)`, FarmHash Fingerprint64)
and `part-<time>-<random>.vectors.npy` (float16 `[n, 384]`; the encoder's unit
vectors, rounded: < 1e-3 from the float32 ones). `update` encodes only the
texts no part holds yet and appends a part, so a second run over the same data
encodes nothing. Runs filling one cache at the same time write parts of their
own (each file renamed into place whole); a text two of them encoded is read
once.

In the graph, `rows(texts)` maps texts to rows of `vectors` (-1 for a text the
cache lacks: `PretrainedText` encodes those live); in NumPy, `lookup(texts)`
gives their vectors. `TextEmbeddingCache.in_memory()` is the same cache with
no directory: `update` keeps the new vectors in memory only.

Example:
    cache = TextEmbeddingCache.open("runs/x/text_cache", "minilm-L6-T64")
    cache.update(["grey jute rug", "red sofa"], encode_fn)   # encodes what is new, writes a part
    cache.rows(tf.constant(["red sofa", "never seen"]))       # [1, -1]
"""

from __future__ import annotations

import glob
import os
import sys
import time
import uuid

import numpy as np
import tensorflow as tf

from tf_q2e.progress import Progress

HASH_BUCKETS = 2**63 - 1
# Texts per call of the encoder while filling the cache (sorted by length: little padding).
ENCODE_BATCH = 256


def variant_name(layers: int, max_tokens: int) -> str:
    """The cache folder of all-MiniLM-L6-v2's vectors through its first `layers` blocks, `max_tokens` tokens."""
    return f"minilm-L{int(layers)}-T{int(max_tokens)}"


def text_keys(texts) -> np.ndarray:
    """The int64 hash of each text (str or bytes), as `rows` computes it in the graph."""
    return tf.strings.to_hash_bucket_fast(tf.constant(list(texts), tf.string), HASH_BUCKETS).numpy()


class TextEmbeddingCache:
    """Vectors of texts by hash, in a directory of `.npy` parts (see the module docstring)."""

    def __init__(self, directory: str | None, keys: np.ndarray, vectors: np.ndarray):
        self.directory = directory  # None: in memory only
        self.keys = keys
        self.vectors_np = vectors
        self._graph = None
        self._row_of: dict | None = None  # key -> row, for `lookup`

    @classmethod
    def open(cls, root: str, variant: str, width: int = 384) -> "TextEmbeddingCache":
        """The cache of encoder `variant` under `root` (empty when there is none yet)."""
        directory = os.path.join(root, variant)
        keys, vectors = [np.zeros([0], np.int64)], [np.zeros([0, width], np.float16)]
        for path in sorted(glob.glob(os.path.join(directory, "part-*.keys.npy"))):
            part_keys = np.load(path, allow_pickle=False)
            part_vectors = np.load(path.replace(".keys.npy", ".vectors.npy"), allow_pickle=False)
            if part_keys.ndim != 1 or part_vectors.shape != (len(part_keys), width):
                raise ValueError(f"{path}: {part_keys.shape} keys and {part_vectors.shape} vectors do not match "
                                 f"(expected [n] and [n, {width}]); delete {directory} to rebuild the cache")
            keys.append(part_keys.astype(np.int64))
            vectors.append(part_vectors.astype(np.float16))
        keys, vectors = np.concatenate(keys), np.concatenate(vectors)
        # Runs filling one cache at the same time may each encode a text: keep its first row (the same vector).
        _, first = np.unique(keys, return_index=True)
        if len(first) < len(keys):
            first.sort()
            keys, vectors = keys[first], vectors[first]
        return cls(directory, keys, vectors)

    @classmethod
    def in_memory(cls, width: int = 384) -> "TextEmbeddingCache":
        """An empty cache that writes nothing: `update` keeps its parts in memory."""
        return cls(None, np.zeros([0], np.int64), np.zeros([0, width], np.float16))

    def __len__(self) -> int:
        return len(self.keys)

    def missing(self, texts) -> list:
        """The distinct texts of `texts` that the cache lacks (first-seen order)."""
        unique = list(dict.fromkeys(texts))
        if not unique:
            return []
        known = np.isin(text_keys(unique), self.keys)
        return [t for t, k in zip(unique, known) if not k]

    def update(self, texts, encode, batch_size: int = ENCODE_BATCH, what: str = "texts", log=None) -> int:
        """Encodes the texts the cache lacks with `encode` (a `[n]` string tensor → `[n, W]` vectors), writes
        them as a new part and returns how many there were; `log` (a function of a line) reports progress."""
        todo = self.missing(texts)
        if not todo:
            return 0
        todo.sort(key=lambda t: len(t if isinstance(t, bytes) else t.encode("utf-8")))  # alike lengths batch together
        progress = Progress(len(todo), what, log or (lambda line: print(line, file=sys.stderr)), verb="encoded")
        parts = []
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            parts.append(np.asarray(encode(tf.constant(batch, tf.string)), np.float32).astype(np.float16))
            progress.update(start + len(batch))
        vectors, keys = np.concatenate(parts), text_keys(todo)
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            # A name no other process writing to the cache at the same time picks, each file renamed into
            # place whole; the keys last: a part counts once its keys exist.
            stem = os.path.join(self.directory, f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")
            for suffix, array in ((".vectors.npy", vectors), (".keys.npy", keys)):
                with open(stem + suffix + ".tmp", "wb") as f:
                    np.save(f, array, allow_pickle=False)
                os.replace(stem + suffix + ".tmp", stem + suffix)
        self.keys, self.vectors_np = np.concatenate([self.keys, keys]), np.concatenate([self.vectors_np, vectors])
        self._graph = self._row_of = None
        return len(todo)

    def fill(self, texts, encode, what: str, log=None) -> int:
        """`update`, then one line through `log`: the cache's size and how many texts were encoded now."""
        start = time.perf_counter()
        log = log or (lambda line: print(line, file=sys.stderr))
        added = self.update(texts, encode, what=what, log=log)
        log(f"text cache {self.directory or '(in memory)'}: {len(self)} vectors, {added} encoded now"
            + (f" in {time.perf_counter() - start:.0f} s" if added else ""))
        return added

    def lookup(self, texts) -> np.ndarray:
        """The vectors of `texts` (str or bytes), float32 `[n, W]`; KeyError for a text the cache lacks."""
        if self._row_of is None:
            self._row_of = {k: i for i, k in enumerate(self.keys.tolist())}
        if not len(texts):
            return np.zeros([0, self.vectors_np.shape[1]], np.float32)
        try:
            rows = [self._row_of[k] for k in text_keys(texts).tolist()]
        except KeyError:
            raise KeyError(f"the text cache lacks {len(self.missing(texts))} of the texts; update it first") from None
        return self.vectors_np[rows].astype(np.float32)

    def _tables(self):
        """The hash table (text hash → row) and the vectors as a tensor, made eagerly on first use (even
        when first asked inside a traced function, such as a tf.data map)."""
        if self._graph is None:
            with tf.init_scope():
                table = tf.lookup.StaticHashTable(
                    tf.lookup.KeyValueTensorInitializer(tf.constant(self.keys, tf.int64),
                                                        tf.range(len(self.keys), dtype=tf.int64)), default_value=-1)
                self._graph = (table, tf.constant(self.vectors_np))
        return self._graph

    @property
    def vectors(self) -> tf.Tensor:
        """All vectors `[N, W]` float16, row i for `keys[i]`."""
        return self._tables()[1]

    def rows(self, texts: tf.Tensor) -> tf.Tensor:
        """The row of each text `[B]` in `vectors`, -1 where the cache lacks it (int32)."""
        table, _ = self._tables()
        return tf.cast(table.lookup(tf.strings.to_hash_bucket_fast(texts, HASH_BUCKETS)), tf.int32)
