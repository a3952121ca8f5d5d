"""The query tower and the product tower.

Each tower turns raw features into one vector per modality φ_i `[B, D]`,
drops whole modalities at random in training (Que2Engage's modality dropout),
fuses them, and L2-normalises the result; with `model.term_dim` > 0 each
tower appends its term channel (`tf_q2e.terms`: query-term coverage as part
of the dot product), so its vectors are [unit vector ; √α · t]:

    query tower:   query_text (hashed n-gram bag → MLP), query_context (hashed
                   embedding of each `query_*` context column, summed)
    product tower: title, description (hashed n-gram bags → MLP each),
                   category (hashed embedding), image (MLP), when present

Fusion is Que2Search's attention fusion, `a = softmax([φ_1‖…‖φ_N] W)`,
`f = Σ_i a_i φ_i`, or concatenation followed by an MLP. Text is featurized in
the graph (`features.TextHasher`), so the towers take raw strings and an
exported tower serves raw strings.

The n-gram tables are the bulk of the weights (2^18 × 64 each); lookups
gather rows, so their gradients are `IndexedSlices` and a sparse optimizer
(`optimizers.SparseAdam`) updates only the rows a batch touches.
"""

from __future__ import annotations

import tensorflow as tf

from tf_q2e.config import FeaturesConfig, ModelConfig
from tf_q2e.data import schema as S
from tf_q2e.features import TextHasher, hash_strings
from tf_q2e.terms import TermChannel

# Key suffix of a text feature hashed in the input pipeline (`_Tower.featurize`).
IDS_SUFFIX = "#ids"
# Key prefix of a tower's term channel word hashes computed in the input pipeline (`_Tower.featurize`).
TERMS_PREFIX = "#terms:"


class EmbeddingBag(tf.keras.layers.Layer):
    """Pooled table rows of each row's ids: ragged `[B, None]` int64 → `[B, E]`.

    `pooling="mean"` averages the rows. `pooling="weighted"` learns one
    importance `w` per bucket as well and takes `Σ_i e^{w_i}·row_i / Σ_i e^{w_i}`
    (w starts at 0, i.e. at the mean; clipped to [-5, 5]): the towers can learn
    that a model number or a brand says more than "in" or "with", as BM25's IDF
    does. Rows with no ids give zeros. The lookups are `tf.gather`s, so the
    tables' gradients are sparse.
    """

    POOLINGS = ("mean", "weighted")

    def __init__(self, buckets: int, dim: int, pooling: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {self.POOLINGS}, got {pooling!r}")
        self.buckets = buckets
        self.dim = dim
        self.pooling = pooling

    def build(self, input_shape) -> None:
        self.table = self.add_weight(
            name="table",
            shape=(self.buckets, self.dim),
            initializer=tf.keras.initializers.RandomNormal(stddev=0.05),
            dtype=tf.float32,
        )
        if self.pooling == "weighted":
            self.importance = self.add_weight(name="importance", shape=(self.buckets,), initializer="zeros",
                                              dtype=tf.float32)
        super().build(input_shape)

    def call(self, ids: tf.RaggedTensor) -> tf.Tensor:
        rows = ids.nrows()
        # Common n-grams repeat across a batch: read (and later update) each table row once.
        unique_ids, position = tf.unique(ids.flat_values)
        vectors = tf.gather(tf.gather(self.table, unique_ids), position)  # [T, E]
        row_ids = ids.value_rowids()
        if self.pooling == "weighted":
            weights = tf.exp(tf.clip_by_value(tf.gather(tf.gather(self.importance, unique_ids), position), -5.0, 5.0))
            sums = tf.math.unsorted_segment_sum(vectors * weights[:, tf.newaxis], row_ids, num_segments=rows)
            norms = tf.math.unsorted_segment_sum(weights, row_ids, num_segments=rows)[:, tf.newaxis]
            return tf.cast(tf.math.divide_no_nan(sums, norms), self.compute_dtype)
        sums = tf.math.unsorted_segment_sum(vectors, row_ids, num_segments=rows)  # [B, E]
        counts = tf.cast(ids.row_lengths(), vectors.dtype)[:, tf.newaxis]
        return tf.cast(sums / tf.maximum(counts, 1.0), self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "buckets": self.buckets, "dim": self.dim, "pooling": self.pooling}


def _mlp(hidden: int, out: int, name: str) -> tf.keras.Sequential:
    return tf.keras.Sequential(
        [tf.keras.layers.Dense(hidden, activation="relu"), tf.keras.layers.Dense(out)], name=name
    )


def _compiled(fn, jit_compile: bool):
    """`fn` as an XLA-compiled function when `jit_compile`, else `fn` itself."""
    return tf.function(fn, jit_compile=True, reduce_retracing=True) if jit_compile else fn


class TextModality(tf.keras.layers.Layer):
    """Raw text `[B]` → hashed n-grams → embedding bag → MLP → `[B, D]`.

    With `jit_compile` the MLP runs as an XLA cluster (hashing and the bag cannot).
    """

    def __init__(self, hasher: TextHasher, bag: EmbeddingBag, hidden_dim: int, output_dim: int,
                 jit_compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hasher = hasher
        self.bag = bag
        self.mlp = _mlp(hidden_dim, output_dim, name="mlp")
        self._dense = _compiled(self.mlp.__call__, jit_compile)

    def call(self, text_or_ids) -> tf.Tensor:
        """Raw text `[B]`, or the hasher's ids `[B, None]` when featurized in the input pipeline."""
        ids = text_or_ids if isinstance(text_or_ids, tf.RaggedTensor) else self.hasher(text_or_ids)
        return self._dense(self.bag(ids))


class HashedCategorical(tf.keras.layers.Layer):
    """String values `[B]` → hashed bucket → embedding `[B, D]`."""

    def __init__(self, buckets: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.buckets = buckets
        self.embedding = tf.keras.layers.Embedding(buckets, dim, embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))

    def call(self, values: tf.Tensor) -> tf.Tensor:
        return self.embedding(hash_strings(values, self.buckets))


class ModalityDropout(tf.keras.layers.Layer):
    """Zeroes a whole modality vector of a row with probability `rate`, in training only.

    Unlike ordinary dropout nothing is rescaled: the tower must learn to do
    without the modality (Que2Engage).
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = seed

    def call(self, vectors: tf.Tensor, training=None) -> tf.Tensor:
        if not training or self.rate == 0.0:
            return vectors
        keep = tf.random.uniform([tf.shape(vectors)[0], 1], seed=self.seed) >= self.rate
        return vectors * tf.cast(keep, vectors.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


class AttentionFusion(tf.keras.layers.Layer):
    """Que2Search's attention fusion: `a = softmax([φ_1‖…‖φ_N] W)`, `f = Σ_i a_i φ_i`.

    Input `[B, N, D]`; W is `[N·D, N]`. Output `[B, D]`. `attention(stacked)`
    gives the weights a `[B, N]` for inspection.
    """

    def build(self, input_shape) -> None:
        self.modalities, self.dim = int(input_shape[1]), int(input_shape[2])
        self.w = tf.keras.layers.Dense(self.modalities, use_bias=False, name="w")
        self.w.build((None, self.modalities * self.dim))
        # One modality: the weight is 1 whatever W is, so W is kept (checkpoints) but not trained.
        self.w.trainable = self.modalities > 1
        super().build(input_shape)

    def attention(self, stacked: tf.Tensor) -> tf.Tensor:
        """The weights a `[B, N]` (float32) of each row's modalities."""
        flat = tf.reshape(stacked, [-1, self.modalities * self.dim])  # [B, N·D]
        return tf.nn.softmax(tf.cast(self.w(flat), tf.float32), axis=-1)

    def call(self, stacked: tf.Tensor) -> tf.Tensor:
        if self.modalities == 1:  # softmax over one modality is 1: f = φ_1 (fewer ops for a one-modality tower)
            return stacked[:, 0]
        weights = self.attention(stacked)  # [B, N]
        return tf.einsum("bn,bnd->bd", tf.cast(weights, stacked.dtype), stacked)


class ConcatFusion(tf.keras.layers.Layer):
    """Concatenate the modality vectors and map them to D with an MLP."""

    def __init__(self, hidden_dim: int, output_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.mlp = _mlp(hidden_dim, output_dim, name="mlp")

    def call(self, stacked: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(stacked)
        return self.mlp(tf.reshape(stacked, [shape[0], stacked.shape[1] * stacked.shape[2]]))


class _Tower(tf.keras.layers.Layer):
    """Modalities → modality dropout → fusion → L2 normalisation (float32) [→ term channel appended]."""

    def __init__(self, model_cfg: ModelConfig, seed: int | None, jit_compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.model_cfg = model_cfg
        self.seed = seed
        self.jit_compile = jit_compile
        self.modality_names: list[str] = []
        self.encoders: dict[str, tf.keras.layers.Layer] = {}
        self.inputs: dict[str, str | list[str]] = {}
        self.dropouts: dict[str, ModalityDropout] = {}
        self.term_channel: TermChannel | None = None
        self.term_inputs: tuple[str, ...] = ()  # the text features whose words the channel takes

    def _add_term_channel(self, inputs: tuple[str, ...], pooling: str, learned_weights: bool = False) -> None:
        m = self.model_cfg
        if m.term_dim:
            self.term_channel = TermChannel(m.term_dim, m.term_weight, pooling, learned_weights, m.query_bias,
                                            name="term_channel")
            self.term_inputs = inputs

    @property
    def _terms_key(self) -> str:
        return TERMS_PREFIX + self.name

    def _term_hashes(self, features: dict) -> tf.RaggedTensor:
        """The distinct word hashes of the `term_inputs` present (joined with spaces), or the pipeline's."""
        if self._terms_key in features:
            return features[self._terms_key]
        texts = [features[k] for k in self.term_inputs if k in features]
        return self.term_channel.word_hashes(texts[0] if len(texts) == 1 else tf.strings.join(texts, separator=" "))

    def _add(self, name: str, encoder: tf.keras.layers.Layer, inputs) -> None:
        """Adds a modality that encodes feature `inputs` (a key, or a list of keys)."""
        self.modality_names.append(name)
        self.encoders[name] = encoder
        self.inputs[name] = inputs
        rate = self.model_cfg.modality_dropout.get(name, 0.0)
        seed = None if self.seed is None else self.seed + len(self.modality_names)
        self.dropouts[name] = ModalityDropout(rate, seed=seed, name=f"{name}_dropout")

    def _finish(self) -> None:
        m = self.model_cfg
        self.fusion = AttentionFusion(name="fusion") if m.fusion == "attention" else ConcatFusion(m.hidden_dim, m.embedding_dim, name="fusion")
        self._head = _compiled(self._fuse, self.jit_compile)

    def _text_modalities(self) -> list[str]:
        return [name for name in self.modality_names if isinstance(self.encoders[name], TextModality)]

    def featurize(self, features: dict) -> dict:
        """Hashes the text modalities' features: `key` -> `key + IDS_SUFFIX` (ragged ids).

        For the input pipeline (`dataset.map`), so hashing runs beside the
        train step; `call` takes either form and gives the same vectors.
        """
        out = dict(features)
        if self.term_channel is not None and any(k in out for k in self.term_inputs):
            out[self._terms_key] = self._term_hashes(out)
        for name in self._text_modalities():
            key = self.inputs[name]
            if key in out:
                out[key + IDS_SUFFIX] = self.encoders[name].hasher(out.pop(key))
        return out

    def modality_vectors(self, features: dict, training=None) -> tf.Tensor:
        """`[B, N, D]`: each modality's vector, after modality dropout."""
        vectors = []
        for name in self.modality_names:
            key = self.inputs[name]
            if isinstance(key, str):
                x = features[key + IDS_SUFFIX] if key + IDS_SUFFIX in features else features[key]
            else:
                x = [features[k] for k in key]
            vectors.append(self.dropouts[name](self.encoders[name](x), training=training))
        return tf.stack(vectors, axis=1)

    def _fuse(self, stacked: tf.Tensor) -> tf.Tensor:
        return tf.math.l2_normalize(tf.cast(self.fusion(stacked), tf.float32), axis=-1)  # [B, D] float32

    def call(self, features: dict, training=None) -> tf.Tensor:
        vectors = self._head(self.modality_vectors(features, training=training))
        if self.term_channel is None or (training and not channel_in_training(self.model_cfg)):
            return vectors  # training without the channel in the tasks: [B, D]
        return tf.concat([vectors, self.term_channel.pool(self._term_hashes(features))], axis=-1)  # [B, D + K (+ 1)]


class QueryTower(_Tower):
    """`{"query": [B] string, "query_<context>": [B] string ...}` → `[B, D]` unit vectors
    (`[B, D + K]` with a term channel: the unit vector, then the channel; `[B, D + K + 1]` with
    the query bias b_q last)."""

    def __init__(
        self,
        features_cfg: FeaturesConfig,
        model_cfg: ModelConfig,
        context_columns: tuple[str, ...] = (),
        text_bag: EmbeddingBag | None = None,
        seed: int | None = None,
        text_encoder: TextModality | None = None,
        **kwargs,
    ):
        super().__init__(model_cfg, seed, **kwargs)
        self.context_columns = tuple(context_columns)
        bag = text_bag or EmbeddingBag(features_cfg.buckets, model_cfg.text_embedding_dim, model_cfg.text_pooling,
                                       name="query_text_bag")
        hasher = TextHasher.from_config_section(features_cfg)
        text = text_encoder or TextModality(hasher, bag, model_cfg.hidden_dim, model_cfg.embedding_dim, self.jit_compile, name="query_text")
        self._add("query_text", text, S.QUERY)
        if self.context_columns:
            self.context = {
                c: HashedCategorical(features_cfg.context_buckets, model_cfg.embedding_dim, name=c) for c in self.context_columns
            }
            self._add("query_context", _Sum(list(self.context.values()), name="query_context"), list(self.context_columns))
        self._add_term_channel((S.QUERY,), "mean", learned_weights=model_cfg.term_weights == "engagement")
        self._finish()


class ProductTower(_Tower):
    """Product fields (`product_title`, `product_description`, `product_category`,
    `product_image_embedding`) → `[B, D]` unit vectors (`[B, D + K]` with a term channel, `[B, D + K + 1]`
    with a query bias: its product side, 1, last)."""

    def __init__(
        self,
        features_cfg: FeaturesConfig,
        model_cfg: ModelConfig,
        image_dim: int = 0,
        text_bag: EmbeddingBag | None = None,
        seed: int | None = None,
        text_encoder: TextModality | None = None,
        **kwargs,
    ):
        super().__init__(model_cfg, seed, **kwargs)
        self.image_dim = image_dim
        bag = text_bag or EmbeddingBag(features_cfg.buckets, model_cfg.text_embedding_dim, model_cfg.text_pooling,
                                       name="product_text_bag")
        hasher = TextHasher.from_config_section(features_cfg)
        h, d = model_cfg.hidden_dim, model_cfg.embedding_dim
        self._add("title", text_encoder or TextModality(hasher, bag, h, d, self.jit_compile, name="title"), S.PRODUCT_TITLE)
        self._add("description", text_encoder or TextModality(hasher, bag, h, d, self.jit_compile, name="description"),
                  S.PRODUCT_DESCRIPTION)
        self._add("category", HashedCategorical(features_cfg.category_buckets, d, name="category"), S.PRODUCT_CATEGORY)
        if image_dim:
            self._add("image", _mlp(h, d, name="image"), S.PRODUCT_IMAGE_EMBEDDING)
        self._add_term_channel((S.PRODUCT_TITLE, S.PRODUCT_DESCRIPTION), "sum")
        self._finish()


def channel_in_training(model_cfg: ModelConfig) -> bool:
    """Whether a training task scores pairs with the term channel (the contrastive one with
    `term_in_training`, the engagement one with learned word weights or a query bias as well)."""
    return bool(model_cfg.term_dim) and (model_cfg.term_in_training or model_cfg.term_weights == "engagement"
                                         or model_cfg.query_bias)


class _Sum(tf.keras.layers.Layer):
    """Sum of several encoders, each applied to its own input."""

    def __init__(self, encoders: list[tf.keras.layers.Layer], **kwargs):
        super().__init__(**kwargs)
        self.encoders = encoders

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        return tf.add_n([encoder(x) for encoder, x in zip(self.encoders, inputs)])
