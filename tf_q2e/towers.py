"""The query tower and the product tower.

Each tower turns raw features into one vector per modality φ_i `[B, D]`,
drops whole modalities at random in training (Que2Engage's modality dropout),
fuses them, and L2-normalises the result; with `model.term_dim` > 0 each
tower appends its term channel (`tf_q2e.terms`: query-term coverage as part
of the dot product), so its vectors are [unit vector ; √α · t]:

    query tower:   query_text (hashed n-gram bag → MLP), query_context (hashed
                   embedding of each `query_*` context column, summed),
                   query_pretrained (`model.text_encoder`: a pretrained
                   sentence encoder → Dense; `tf_q2e.pretrained`)
    product tower: title, description (hashed n-gram bags → MLP each),
                   category (hashed embedding), image (MLP), when present,
                   product_pretrained (the encoder over title + description)

With `model.pretrained_weight` β each tower also appends √β × its pretrained
encoder's unit vector after its unit vector (before the term channel).

The query tower also returns the query bias b_q `[B]` when asked
(`query_tower(features, return_bias=True)`; zeros unless `model.query_bias`):
a number that the engagement task adds to the dot product and that ranking
leaves out.

Fusion is Que2Search's attention fusion, `a = softmax([φ_1‖…‖φ_N] W)`,
`f = Σ_i a_i φ_i`. Text is featurized in
the graph (`features.TextHasher`), so the towers take raw strings and an
exported tower serves raw strings.

The n-gram tables are the bulk of the weights (2^18 × 64 each); lookups
gather rows, so their gradients are `IndexedSlices` and a sparse optimizer
(`optimizers.SparseAdam`) updates only the rows a batch touches.

Every layer here has `get_config`/`from_config` (Keras serialization). A
tower rebuilt from its config alone shares its text tables between its own
text modalities as `model.text_sharing` says, but not with the other tower:
sharing across towers is the model's (`Que2EngageModel`).

Example:
    towers = QueryTower(FeaturesConfig(buckets=1024), ModelConfig(embedding_dim=8))
    towers({"query": tf.constant(["red sofa"])})  # [1, 8], unit length
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from tf_q2e.config import PRETRAINED_LAYERS, PRETRAINED_WIDTH, FeaturesConfig, ModelConfig, config_section
from tf_q2e.data import schema as S
from tf_q2e.features import TextHasher, hash_strings, normalized_values
from tf_q2e.terms import TermChannel

# Key suffix of a text feature hashed in the input pipeline (`_Tower.featurize`).
IDS_SUFFIX = "#ids"
# Key suffix (after the modality's name) of a pretrained modality's text cache rows looked up in the input
# pipeline (`_Tower.featurize`).
ROWS_SUFFIX = "#cache_rows"
# Key prefix of a tower's term channel word hashes computed in the input pipeline (`_Tower.featurize`).
TERMS_PREFIX = "#terms:"

serializable = tf.keras.utils.register_keras_serializable(package="tf_q2e")


def _layer(config_or_layer):
    """A layer from its serialized form (`serialize`), or the layer itself."""
    if isinstance(config_or_layer, dict):
        return tf.keras.layers.deserialize(config_or_layer)
    return config_or_layer


def serialize(layer: tf.keras.layers.Layer) -> dict:
    """A layer's serialized form: class name and config (`tf.keras.layers.serialize`)."""
    return tf.keras.layers.serialize(layer)


@serializable
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


@serializable
class TextModality(tf.keras.layers.Layer):
    """Raw text `[B]` → hashed n-grams → embedding bag → MLP → `[B, D]`.

    With `jit_compile` the MLP runs as an XLA cluster (hashing and the bag cannot).
    `hasher` and `bag` are layers or their serialized forms (`get_config`).
    """

    def __init__(self, hasher: TextHasher | dict, bag: EmbeddingBag | dict, hidden_dim: int, output_dim: int,
                 jit_compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hasher = _layer(hasher)
        self.bag = _layer(bag)
        self.hidden_dim, self.output_dim, self.jit_compile = int(hidden_dim), int(output_dim), bool(jit_compile)
        self.mlp = _mlp(hidden_dim, output_dim, name="mlp")
        self._dense = _compiled(self.mlp.__call__, jit_compile)

    def call(self, text_or_ids) -> tf.Tensor:
        """Raw text `[B]`, or the hasher's ids `[B, None]` when featurized in the input pipeline."""
        ids = text_or_ids if isinstance(text_or_ids, tf.RaggedTensor) else self.hasher(text_or_ids)
        return self._dense(self.bag(ids))

    def get_config(self) -> dict:
        return {**super().get_config(), "hasher": serialize(self.hasher), "bag": serialize(self.bag),
                "hidden_dim": self.hidden_dim, "output_dim": self.output_dim, "jit_compile": self.jit_compile}


@serializable
class HashedCategorical(tf.keras.layers.Layer):
    """String values `[B]` → hashed bucket → embedding `[B, D]`.

    With `empty_is_unknown`, an empty value (blank or unreadable once
    normalised, as `hash_strings` normalises) gives zeros: the vector a tower
    sees when modality dropout drops the modality, so an unknown query
    context at serving time (""; `Retriever.search` without `context`) counts
    as no context rather than as a value never seen in training.
    """

    def __init__(self, buckets: int, dim: int, empty_is_unknown: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.buckets, self.dim, self.empty_is_unknown = int(buckets), int(dim), bool(empty_is_unknown)
        self.embedding = tf.keras.layers.Embedding(buckets, dim, embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))

    def call(self, values: tf.Tensor) -> tf.Tensor:
        if not self.empty_is_unknown:
            return self.embedding(hash_strings(values, self.buckets))  # [B, D]
        normalized = normalized_values(values)  # "" for a blank or unreadable value: unknown
        vectors = self.embedding(tf.strings.to_hash_bucket_fast(normalized, self.buckets))  # [B, D], as hash_strings
        known = tf.not_equal(tf.reshape(normalized, [-1]), "")[:, tf.newaxis]  # [B, 1]
        return vectors * tf.cast(known, vectors.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "buckets": self.buckets, "dim": self.dim, "empty_is_unknown": self.empty_is_unknown}


@serializable
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


@serializable
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


class _Tower(tf.keras.layers.Layer):
    """Modalities → modality dropout → fusion → L2 normalisation (float32) [→ term channel appended].

    `features_cfg` and `model_cfg` are `FeaturesConfig`/`ModelConfig` or their dicts (`get_config`).
    """

    def __init__(self, features_cfg: FeaturesConfig | dict, model_cfg: ModelConfig | dict, seed: int | None = None,
                 jit_compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.features_cfg = config_section(FeaturesConfig, features_cfg, "features")
        self.model_cfg = config_section(ModelConfig, model_cfg, "model")
        self.seed = seed
        self.jit_compile = bool(jit_compile)
        self.modality_names: list[str] = []
        self.encoders: dict[str, tf.keras.layers.Layer] = {}
        self.inputs: dict[str, str | list[str]] = {}
        self.dropouts: dict[str, ModalityDropout] = {}
        self.term_channel: TermChannel | None = None
        self.term_inputs: tuple[str, ...] = ()  # the text features whose words the channel takes

    def _text_layers(self, text_bag: "EmbeddingBag | None", text_encoder: "TextModality | None", bag_name: str):
        """`(bag, encoder)`: the ones given (shared by the model), else this tower's own, per `model.text_sharing`
        (`encoder` None: each text modality builds its own on `bag`)."""
        f, m = self.features_cfg, self.model_cfg
        if text_encoder is None and m.text_sharing == "encoder":
            bag = text_bag or EmbeddingBag(f.buckets, m.text_embedding_dim, m.text_pooling, name=bag_name)
            text_encoder = TextModality(TextHasher.from_config_section(f), bag, m.hidden_dim, m.embedding_dim,
                                        self.jit_compile, name="shared_text")
        if text_encoder is not None:
            return text_encoder.bag, text_encoder
        return text_bag or EmbeddingBag(f.buckets, m.text_embedding_dim, m.text_pooling, name=bag_name), None

    def _text(self, name: str, bag: "EmbeddingBag", encoder: "TextModality | None") -> "TextModality":
        f, m = self.features_cfg, self.model_cfg
        return encoder or TextModality(TextHasher.from_config_section(f), bag, m.hidden_dim, m.embedding_dim,
                                       self.jit_compile, name=name)

    def _add_term_channel(self, inputs: tuple[str, ...], pooling: str, learned_weights: bool = False,
                          query_bias: bool = False) -> None:
        m = self.model_cfg
        if m.term_dim:
            self.term_channel = TermChannel(m.term_dim, m.term_weight, pooling, learned_weights, query_bias,
                                            m.word_weight_lr_multiplier, name="term_channel")
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
        self.fusion = AttentionFusion(name="fusion")
        self._head = _compiled(self._fuse, self.jit_compile)

    def _text_modalities(self) -> list[str]:
        return [name for name in self.modality_names if isinstance(self.encoders[name], TextModality)]

    @property
    def embedding_tables(self) -> list[tf.Variable]:
        """The tower's per-bucket rows: its n-gram tables and their pooling importances, its context and
        category embeddings (`model.engagement_trains_tables`)."""
        tables = []
        for encoder in self.encoders.values():
            if isinstance(encoder, TextModality):
                tables += [encoder.bag.table] + ([encoder.bag.importance] if encoder.bag.pooling == "weighted" else [])
            elif isinstance(encoder, HashedCategorical):
                tables.append(encoder.embedding.embeddings)
            elif isinstance(encoder, _Sum):
                tables += [e.embedding.embeddings for e in encoder.encoders]
        return list({id(t): t for t in tables}.values())  # shared bags once

    def _pretrained_modalities(self) -> list[str]:
        return [name for name in self.modality_names if _is_pretrained(self.encoders[name])]

    def _texts(self, name: str, features: dict):
        key = self.inputs[name]
        return features[key] if isinstance(key, str) else [features[k] for k in key]

    def featurize(self, features: dict) -> dict:
        """Hashes the text modalities' features: `key` -> `key + IDS_SUFFIX` (ragged ids); with a text
        cache attached, adds each pretrained modality's cache rows (`name + ROWS_SUFFIX`).

        For the input pipeline (`dataset.map`), so hashing runs beside the
        train step; `call` takes either form and gives the same vectors.
        """
        out = dict(features)
        if self.term_channel is not None and any(k in out for k in self.term_inputs):
            out[self._terms_key] = self._term_hashes(out)
        keep = set()  # raw text a pretrained modality still reads (it encodes the texts its cache lacks)
        for name in self._pretrained_modalities():
            encoder, key = self.encoders[name], self.inputs[name]
            keys = [key] if isinstance(key, str) else key
            if encoder.cache is not None and all(k in out for k in keys):
                out[name + ROWS_SUFFIX] = encoder.featurize(self._texts(name, out))
                keep.update(keys)
        for name in self._text_modalities():
            key = self.inputs[name]
            if key in out:
                out[key + IDS_SUFFIX] = self.encoders[name].hasher(out[key] if key in keep else out.pop(key))
        return out

    def modality_vectors(self, features: dict, training=None) -> tf.Tensor:
        """`[B, N, D]`: each modality's vector, after modality dropout."""
        return self._modality_outputs(features, training)[0]

    def _modality_outputs(self, features: dict, training=None) -> tuple[tf.Tensor, tf.Tensor | None]:
        """`([B, N, D] modality vectors after modality dropout, the pretrained modality's unit vectors
        [B, 384] or None)`."""
        vectors, unit = [], None
        for name in self.modality_names:
            key, encoder = self.inputs[name], self.encoders[name]
            if _is_pretrained(encoder):
                x, unit = encoder(self._texts(name, features), rows=features.get(name + ROWS_SUFFIX), training=training,
                                  return_unit=True)
            else:
                if isinstance(key, str):
                    x = features[key + IDS_SUFFIX] if key + IDS_SUFFIX in features else features[key]
                else:
                    x = [features[k] for k in key]
                x = encoder(x)
            vectors.append(self.dropouts[name](x, training=training))
        return tf.stack(vectors, axis=1), unit

    def _fuse(self, stacked: tf.Tensor) -> tf.Tensor:
        return tf.math.l2_normalize(tf.cast(self.fusion(stacked), tf.float32), axis=-1)  # [B, D] float32

    def call(self, features: dict, training=None, return_bias: bool = False):
        """`[B, D]` unit vectors (`[B, D + P + K]` with the pretrained channel and the term channel); with
        `return_bias`, also the query bias `[B]` (zeros for products and without `model.query_bias`)."""
        stacked, unit = self._modality_outputs(features, training=training)
        vectors = self._head(stacked)
        if self.model_cfg.pretrained_weight:  # the pretrained channel: √β·u, so q·d gains β·cos_pretrained
            vectors = tf.concat([vectors, math.sqrt(self.model_cfg.pretrained_weight) * unit], axis=-1)
        bias = None
        # In training the channel joins only when the engagement task learns a part of it.
        if self.term_channel is not None and not (training and not channel_in_training(self.model_cfg)):
            channel, bias = self.term_channel.pool_with_bias(self._term_hashes(features))
            vectors = tf.concat([vectors, channel], axis=-1)  # [B, D + K]
        if not return_bias:
            return vectors
        return vectors, (tf.zeros_like(vectors[:, 0]) if bias is None else bias)

    def get_config(self) -> dict:
        return {**super().get_config(), "features_cfg": dataclasses.asdict(self.features_cfg),
                "model_cfg": dataclasses.asdict(self.model_cfg), "seed": self.seed, "jit_compile": self.jit_compile}


@serializable
class QueryTower(_Tower):
    """`{"query": [B] string, "query_<context>": [B] string ...}` → `[B, D]` unit vectors
    (`[B, D + K]` with a term channel: the unit vector, then the channel); with `return_bias=True`
    `(vectors, query_bias [B])`.

    `text_bag`/`text_encoder`: an n-gram bag or a whole text encoder shared with the product tower
    (the model passes them per `model.text_sharing`); None builds the tower's own.

    Example:
        tower = QueryTower(FeaturesConfig(buckets=1024), ModelConfig(embedding_dim=8), ("query_country",))
        vectors, bias = tower({"query": tf.constant(["red sofa"]), "query_country": tf.constant(["US"])},
                              return_bias=True)  # [1, 8] unit vectors, [1] zeros (no query bias)
    """

    def __init__(
        self,
        features_cfg: FeaturesConfig | dict,
        model_cfg: ModelConfig | dict,
        context_columns: tuple[str, ...] = (),
        text_bag: EmbeddingBag | None = None,
        seed: int | None = None,
        text_encoder: TextModality | None = None,
        sentence_encoder=None,
        **kwargs,
    ):
        super().__init__(features_cfg, model_cfg, seed, **kwargs)
        f, m = self.features_cfg, self.model_cfg
        self.context_columns = tuple(context_columns)
        bag, encoder = self._text_layers(text_bag, text_encoder, "query_text_bag")
        self._add("query_text", self._text("query_text", bag, encoder), S.QUERY)
        if m.text_encoder != "none":
            self._add("query_pretrained", _pretrained(m, m.query_layers, sentence_encoder, "query_pretrained"), S.QUERY)
        if self.context_columns:
            self.context = {c: HashedCategorical(f.context_buckets, m.embedding_dim, empty_is_unknown=True, name=c)
                            for c in self.context_columns}
            self._add("query_context", _Sum(list(self.context.values()), name="query_context"), list(self.context_columns))
        self._add_term_channel((S.QUERY,), "mean", learned_weights=m.term_weights == "engagement", query_bias=m.query_bias)
        self._finish()

    def get_config(self) -> dict:
        return {**super().get_config(), "context_columns": list(self.context_columns)}


@serializable
class ProductTower(_Tower):
    """Product fields (`product_title`, `product_description`, `product_category`,
    `product_image_embedding`) → `[B, D]` unit vectors (`[B, D + K]` with a term channel).

    Example:
        tower = ProductTower(FeaturesConfig(buckets=1024), ModelConfig(embedding_dim=8))
        tower({"product_title": tf.constant(["Red Sofa"]), "product_description": tf.constant([""]),
               "product_category": tf.constant(["sofa"])})  # [1, 8] unit vectors
    """

    def __init__(
        self,
        features_cfg: FeaturesConfig | dict,
        model_cfg: ModelConfig | dict,
        image_dim: int = 0,
        text_bag: EmbeddingBag | None = None,
        seed: int | None = None,
        text_encoder: TextModality | None = None,
        sentence_encoder=None,
        **kwargs,
    ):
        super().__init__(features_cfg, model_cfg, seed, **kwargs)
        f, m = self.features_cfg, self.model_cfg
        self.image_dim = int(image_dim)
        bag, encoder = self._text_layers(text_bag, text_encoder, "product_text_bag")
        self._add("title", self._text("title", bag, encoder), S.PRODUCT_TITLE)
        self._add("description", self._text("description", bag, encoder), S.PRODUCT_DESCRIPTION)
        if m.text_encoder != "none":
            self._add("product_pretrained", _pretrained(m, None, sentence_encoder, "product_pretrained"),
                      [S.PRODUCT_TITLE, S.PRODUCT_DESCRIPTION])
        self._add("category", HashedCategorical(f.category_buckets, m.embedding_dim, name="category"), S.PRODUCT_CATEGORY)
        if image_dim:
            self._add("image", _mlp(m.hidden_dim, m.embedding_dim, name="image"), S.PRODUCT_IMAGE_EMBEDDING)
        self._add_term_channel((S.PRODUCT_TITLE, S.PRODUCT_DESCRIPTION), "sum")
        self._finish()

    def get_config(self) -> dict:
        return {**super().get_config(), "image_dim": self.image_dim}


def _is_pretrained(layer) -> bool:
    """Whether `layer` is a `PretrainedText` (without importing tensorflow-text when no tower has one)."""
    return type(layer).__name__ == "PretrainedText"


def _pretrained(m: ModelConfig, layers: int | None, sentence_encoder, name: str):
    """The tower's `PretrainedText` modality (`model.text_encoder`), on the model's shared
    `SentenceEncoder` (and, with `model.text_sharing: encoder`, projection: `sentence_encoder` is then
    `(encoder, projection)`) when given."""
    from tf_q2e.pretrained.modality import PretrainedText  # tensorflow-text: only when a tower has one

    encoder, projection = sentence_encoder if isinstance(sentence_encoder, tuple) else (sentence_encoder, None)
    return PretrainedText(m.embedding_dim, layers or PRETRAINED_LAYERS, encoder=encoder, minilm_path=m.minilm_path,
                          max_tokens=m.max_tokens, trainable_layers=m.trainable_layers, projection=projection,
                          name=name)


def engagement_width(model_cfg: ModelConfig) -> int:
    """How many leading entries of the towers' vectors the engagement task scores when the term channel is
    not in training: the unit vector's D, and the pretrained channel's P when there is one (the term
    channel comes after them). The contrastive task scores the first D alone."""
    return model_cfg.embedding_dim + (PRETRAINED_WIDTH if model_cfg.pretrained_weight else 0)


def channel_in_training(model_cfg: ModelConfig) -> bool:
    """Whether the engagement task scores pairs with the term channel: when it learns the channel's
    word weights or the query bias."""
    return bool(model_cfg.term_dim) and (model_cfg.term_weights == "engagement" or model_cfg.query_bias)


@serializable
class _Sum(tf.keras.layers.Layer):
    """Sum of several encoders, each applied to its own input."""

    def __init__(self, encoders: list, **kwargs):
        super().__init__(**kwargs)
        self.encoders = [_layer(e) for e in encoders]

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        return tf.add_n([encoder(x) for encoder, x in zip(self.encoders, inputs)])

    def get_config(self) -> dict:
        return {**super().get_config(), "encoders": [serialize(e) for e in self.encoders]}
