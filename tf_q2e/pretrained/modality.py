"""`PretrainedText`: a tower modality over a pretrained sentence encoder (`model.text_encoder: minilm`).

    raw text [B] (or several fields, joined with " ")
      → SentenceEncoder (all-MiniLM-L6-v2, the first `layers` blocks) → [B, 384] unit vectors
      → projection (Dense) → [B, D]

The tower fuses its output with the other modalities (attention fusion) and
modality dropout applies to it as to them. A frozen encoder (no
`trainable_layers`) takes no gradient; its vectors can come from a
`TextEmbeddingCache` instead (`attach_cache`): `call` looks each text up
(or takes the rows `featurize` looked up in the input pipeline), gathers the
vectors and encodes only the texts the cache lacks. Without a cache it
encodes every text: that is what an exported tower does (`tf_q2e.export`
detaches the cache), so a SavedModel takes raw strings and holds no cache.

Example:
    modality = PretrainedText(output_dim=64, layers=2)   # builds its own encoder from the installed weights
    modality(tf.constant(["grey jute rug"]))           # [1, 64]
"""

from __future__ import annotations

import tensorflow as tf

from tf_q2e.data import schema as S
from tf_q2e.errors import InputError
from tf_q2e.pretrained.bert import SentenceEncoder
from tf_q2e.pretrained.cache import TextEmbeddingCache, variant_name
from tf_q2e.pretrained.files import MiniLMFiles

serializable = tf.keras.utils.register_keras_serializable(package="tf_q2e")


class _Untracked:
    """Holds an object out of Keras/tf.Module tracking (the cache's table and vectors must stay out of
    checkpoints and SavedModels)."""

    def __init__(self, value=None):
        self.value = value


def joined(texts) -> tf.Tensor:
    """One string `[B]` of a field `[B]` or of several fields (a list), joined with " " (empty fields left out)."""
    if not isinstance(texts, (list, tuple)):
        return texts
    if len(texts) == 1:
        return texts[0]
    stacked = tf.stack([tf.reshape(t, [-1]) for t in texts], axis=1)  # [B, F]
    present = tf.ragged.boolean_mask(stacked, tf.strings.length(tf.strings.strip(stacked)) > 0)
    return tf.strings.reduce_join(present, axis=1, separator=" ")


def product_texts(catalog) -> list[bytes]:
    """The text the product tower's `PretrainedText` encodes of each product of a catalogue (an Arrow table):
    its title and description `joined`."""
    missing = [c for c in (S.PRODUCT_TITLE, S.PRODUCT_DESCRIPTION) if c not in catalog.column_names]
    if missing:
        raise InputError(f"the catalogue table lacks the column(s) {', '.join(missing)}; it has "
                         f"{', '.join(catalog.column_names)}")
    return joined([tf.constant(catalog.column(c).to_pylist(), tf.string)
                   for c in (S.PRODUCT_TITLE, S.PRODUCT_DESCRIPTION)]).numpy().tolist()


def query_texts(queries, batch_rows: int = 4096) -> list:
    """The query strings of `queries`: a list (or a pandas Series, any iterable) of str or bytes, or a
    tf.data.Dataset of impression rows, batched or not (its `query` feature)."""
    if isinstance(queries, (str, bytes)):
        raise TypeError(f"queries must be a list of query strings (or a Series, or a tf.data.Dataset of impression "
                        f"rows), not one string {queries!r}")
    if isinstance(queries, tf.data.Dataset):
        spec = queries.element_spec
        if not isinstance(spec, dict) or S.QUERY not in spec:
            has = ", ".join(spec) if isinstance(spec, dict) else type(spec).__name__
            raise InputError(f"queries: a tf.data.Dataset of impression rows needs a {S.QUERY!r} feature; its "
                             f"elements have {has}")
        column = queries.map(lambda row: row[S.QUERY])
        if spec[S.QUERY].shape.rank == 0:
            column = column.batch(batch_rows)
        return [q for batch in column.as_numpy_iterator() for q in batch.reshape(-1).tolist()]
    texts = list(queries)
    bad = next((i for i, q in enumerate(texts) if not isinstance(q, (str, bytes))), None)
    if bad is not None:
        raise TypeError(f"queries[{bad}] is {type(texts[bad]).__name__} {texts[bad]!r}, not a string")
    return texts


@serializable
class PretrainedText(tf.keras.layers.Layer):
    """Raw text → pretrained sentence encoder (first `layers` blocks) → Dense → `[B, output_dim]`.

    `encoder` is a `SentenceEncoder` (shared by both towers: the model passes
    it) or None, to build one from `minilm_path` (None: the installed package's
    weights) with `max_tokens` and `trainable_layers`. `projection` is a Dense
    layer shared with the other tower's modality (`model.text_sharing:
    encoder`), or None for its own.
    """

    def __init__(self, output_dim: int, layers: int = 6, encoder: SentenceEncoder | None = None,
                 minilm_path: str | None = None, max_tokens: int = 64, trainable_layers: int = 0,
                 projection: tf.keras.layers.Dense | None = None, **kwargs):
        super().__init__(**kwargs)
        self.output_dim, self.layers = int(output_dim), int(layers)
        self.minilm_path, self.max_tokens, self.trainable_layers = minilm_path, int(max_tokens), int(trainable_layers)
        self.encoder = encoder or SentenceEncoder.from_files(MiniLMFiles.locate(minilm_path), max_tokens, trainable_layers)
        self.projection = projection or tf.keras.layers.Dense(self.output_dim, name="projection")
        self._cache = _Untracked()

    @property
    def frozen(self) -> bool:
        """No block this modality runs is trained (the vectors of a text never change)."""
        bert = self.encoder.bert
        return not any(block.trainable for block in bert.blocks[:self.layers])

    @property
    def variant(self) -> str:
        """The cache folder of this modality's vectors: encoder, layers, max tokens."""
        return variant_name(self.layers, self.encoder.tokenizer.max_tokens)

    def attach_cache(self, cache: TextEmbeddingCache | None) -> None:
        """Looks frozen vectors up in `cache` (None: encode every text)."""
        if cache is not None and not self.frozen:
            raise ValueError("a text cache serves a frozen encoder only (model.trainable_layers is above 0)")
        self._cache.value = cache

    @property
    def cache(self) -> TextEmbeddingCache | None:
        return self._cache.value

    def encode(self, texts, training=None) -> tf.Tensor:
        """The encoder's unit vectors `[B, 384]` of raw text (fields joined), float32."""
        vectors = self.encoder(joined(texts), layers=self.layers, training=training)
        return tf.stop_gradient(vectors) if self.frozen else vectors

    def featurize(self, texts) -> tf.Tensor:
        """Each text's cache row `[B]` (-1: not cached), for the input pipeline."""
        return self.cache.rows(joined(texts))

    def cached_vectors(self, texts, rows: tf.Tensor) -> tf.Tensor:
        """The vectors of `rows` of the cache, the texts with row -1 encoded live: `[B, 384]` float32."""
        vectors = tf.cast(tf.gather(self.cache.vectors, tf.maximum(rows, 0)), tf.float32)
        missing = tf.where(rows < 0)  # [M, 1]

        def fill():
            fresh = self.encode(tf.gather(joined(texts), missing[:, 0]))
            return tf.tensor_scatter_nd_update(vectors, missing, fresh)

        return tf.cond(tf.size(missing) > 0, fill, lambda: vectors)

    def unit_vectors(self, texts, rows: tf.Tensor | None = None, training=None) -> tf.Tensor:
        """The encoder's unit vectors `[B, 384]` of raw text (or a list of fields); with a cache attached, from
        the cache (`rows`: `featurize`'s, else looked up here)."""
        if rows is None and self.cache is not None:
            rows = self.featurize(texts)
        return self.encode(texts, training=training) if rows is None else self.cached_vectors(texts, rows)

    def call(self, texts, rows: tf.Tensor | None = None, training=None, return_unit: bool = False):
        """Raw text `[B]` (or a list of fields) → `[B, output_dim]` (and, with `return_unit`, the encoder's
        unit vectors `[B, 384]` it projected)."""
        unit = self.unit_vectors(texts, rows, training=training)
        return (self.projection(unit), unit) if return_unit else self.projection(unit)

    def get_config(self) -> dict:
        return {**super().get_config(), "output_dim": self.output_dim, "layers": self.layers,
                "minilm_path": self.minilm_path, "max_tokens": self.max_tokens, "trainable_layers": self.trainable_layers}
