"""A BERT encoder in tf-keras, loaded from all-MiniLM-L6-v2's weights, and the sentence encoder around it.

`BertEncoder` is the transformer (post-LayerNorm, exact-erf GELU, absolute
positions): token ids and mask `[B, T]` → hidden states `[B, T, W]`. It can
stop after its first `layers` blocks (`call(..., layers=L)`): the query tower
uses the bottom L of the same blocks the product tower runs in full
(`model.query_layers`; Que2Search ran a 2-layer encoder over queries for
latency), so both towers hold one copy of the weights.

`SentenceEncoder` is sentence-transformers' all-MiniLM-L6-v2 pipeline in the
graph: raw strings → `BertTokenizer` (tensorflow-text's classic WordPiece
ops, which TensorFlow Serving links) → `BertEncoder` → mean of the token
states over the mask → L2 normalisation: `[B]` strings → `[B, 384]` unit vectors.

`trainable_layers` N fine-tunes the top N blocks; the rest (and the token,
position and type embeddings, 12M of the 22M weights) stay frozen. Dropout
(0.1, BERT's) applies in training to the trainable blocks only, so a frozen
encoder gives the same vectors in training as at serving time.

Example:
    encoder = SentenceEncoder.from_files(MiniLMFiles.locate(), max_tokens=128)
    encoder(tf.constant(["grey jute rug"]))           # [1, 384], unit length
    encoder(tf.constant(["grey jute rug"]), layers=2)  # the first 2 blocks only
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tf_q2e.pretrained.files import ARCHITECTURE, MiniLMFiles, PretrainedFilesError
from tf_q2e.pretrained.tokenizer import BertTokenizer

serializable = tf.keras.utils.register_keras_serializable(package="tf_q2e")
_NEG = -1e9  # added to the attention logits of padding: exp() of it is 0 in float32


def _gelu(x: tf.Tensor) -> tf.Tensor:
    return 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))  # BERT's exact GELU


class _Block(tf.keras.layers.Layer):
    """One transformer block: self-attention, then the feed-forward part, each with a residual and a LayerNorm."""

    def __init__(self, width: int, heads: int, intermediate: int, epsilon: float, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.dropout = width, heads, dropout
        self.query = tf.keras.layers.Dense(width, name="query")
        self.key = tf.keras.layers.Dense(width, name="key")
        self.value = tf.keras.layers.Dense(width, name="value")
        self.attention_output = tf.keras.layers.Dense(width, name="attention_output")
        self.attention_norm = tf.keras.layers.LayerNormalization(epsilon=epsilon, name="attention_norm")
        self.intermediate = tf.keras.layers.Dense(intermediate, name="intermediate")
        self.output_dense = tf.keras.layers.Dense(width, name="output")
        self.output_norm = tf.keras.layers.LayerNormalization(epsilon=epsilon, name="output_norm")

    def _drop(self, x: tf.Tensor, training) -> tf.Tensor:
        return tf.nn.dropout(x, rate=self.dropout) if training and self.trainable and self.dropout else x

    def call(self, x: tf.Tensor, attention_bias: tf.Tensor, training=None) -> tf.Tensor:
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        head_dim = self.width // self.heads

        def heads(t):  # [B, T, W] -> [B, H, T, W/H]
            return tf.transpose(tf.reshape(t, [batch, length, self.heads, head_dim]), [0, 2, 1, 3])

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = tf.matmul(q, k, transpose_b=True) / math.sqrt(head_dim) + attention_bias  # [B, H, T, T]
        weights = self._drop(tf.nn.softmax(logits, axis=-1), training)
        context = tf.reshape(tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3]), [batch, length, self.width])
        x = self.attention_norm(x + self._drop(self.attention_output(context), training))
        hidden = self.output_dense(_gelu(self.intermediate(x)))
        return self.output_norm(x + self._drop(hidden, training))


@serializable
class BertEncoder(tf.keras.layers.Layer):
    """Token ids, mask `[B, T]` int32 → hidden states `[B, T, W]` (float32), through the first `layers` blocks.

    `load(weights)` copies a Hugging Face BERT checkpoint's tensors
    (`MiniLMFiles.weights()`; PyTorch's `[out, in]` kernels transposed) and
    checks every shape. `trainable_layers` of the top blocks are trainable.
    """

    def __init__(self, layers: int = ARCHITECTURE["layers"], width: int = ARCHITECTURE["width"],
                 heads: int = ARCHITECTURE["heads"], intermediate: int = ARCHITECTURE["intermediate"],
                 vocab: int = ARCHITECTURE["vocab"], positions: int = ARCHITECTURE["positions"],
                 types: int = ARCHITECTURE["types"], epsilon: float = ARCHITECTURE["layer_norm_epsilon"],
                 trainable_layers: int = 0, dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= trainable_layers <= layers:
            raise ValueError(f"trainable_layers ({trainable_layers}) must be in [0, {layers}]")
        self.arch = {"layers": int(layers), "width": int(width), "heads": int(heads), "intermediate": int(intermediate),
                     "vocab": int(vocab), "positions": int(positions), "types": int(types), "epsilon": float(epsilon)}
        self.trainable_layers, self.dropout = int(trainable_layers), float(dropout)
        self.embedding_norm = tf.keras.layers.LayerNormalization(epsilon=epsilon, name="embedding_norm")
        self.blocks = [_Block(width, heads, intermediate, epsilon, dropout, name=f"block_{i}") for i in range(layers)]
        for i, block in enumerate(self.blocks):
            block.trainable = i >= layers - trainable_layers
        self.embedding_norm.trainable = False

    def build(self, input_shape) -> None:
        a = self.arch

        def init(shape, dtype=None):  # BERT's; `load` overwrites it
            return tf.random.truncated_normal(shape, stddev=0.02, dtype=dtype or tf.float32)

        self.word_embeddings = self.add_weight(name="word_embeddings", shape=(a["vocab"], a["width"]), initializer=init,
                                               trainable=False)
        self.position_embeddings = self.add_weight(name="position_embeddings", shape=(a["positions"], a["width"]),
                                                   initializer=init, trainable=False)
        self.type_embeddings = self.add_weight(name="type_embeddings", shape=(a["types"], a["width"]), initializer=init,
                                               trainable=False)
        self.embedding_norm.build((None, None, a["width"]))
        for block in self.blocks:
            block.build((None, None, a["width"]))
            for dense, n in ((block.query, a["width"]), (block.key, a["width"]), (block.value, a["width"]),
                             (block.attention_output, a["width"]), (block.intermediate, a["width"]),
                             (block.output_dense, a["intermediate"])):
                dense.build((None, None, n))
            block.attention_norm.build((None, None, a["width"]))
            block.output_norm.build((None, None, a["width"]))
        super().build(input_shape)

    def call(self, token_ids: tf.Tensor, mask: tf.Tensor, layers: int | None = None, training=None) -> tf.Tensor:
        layers = self.arch["layers"] if layers is None else layers
        positions = tf.range(tf.shape(token_ids)[1])
        x = (tf.gather(self.word_embeddings, token_ids) + tf.gather(self.position_embeddings, positions)[tf.newaxis]
             + self.type_embeddings[0])
        x = self.embedding_norm(x)
        attention_bias = (1.0 - tf.cast(mask, tf.float32))[:, tf.newaxis, tf.newaxis, :] * _NEG  # [B, 1, 1, T]
        for block in self.blocks[:layers]:
            x = block(x, attention_bias, training=training)
        return x

    def load(self, weights: dict[str, np.ndarray]) -> "BertEncoder":
        """Copies a Hugging Face BERT checkpoint's tensors into the variables (building them first)."""
        if not self.built:
            self.build(None)
        pairs = [(self.word_embeddings, "embeddings.word_embeddings.weight", False),
                 (self.position_embeddings, "embeddings.position_embeddings.weight", False),
                 (self.type_embeddings, "embeddings.token_type_embeddings.weight", False),
                 (self.embedding_norm.gamma, "embeddings.LayerNorm.weight", False),
                 (self.embedding_norm.beta, "embeddings.LayerNorm.bias", False)]
        for i, block in enumerate(self.blocks):
            p = f"encoder.layer.{i}."
            for dense, name in ((block.query, "attention.self.query"), (block.key, "attention.self.key"),
                                (block.value, "attention.self.value"), (block.attention_output, "attention.output.dense"),
                                (block.intermediate, "intermediate.dense"), (block.output_dense, "output.dense")):
                pairs += [(dense.kernel, p + name + ".weight", True), (dense.bias, p + name + ".bias", False)]
            for norm, name in ((block.attention_norm, "attention.output.LayerNorm"), (block.output_norm, "output.LayerNorm")):
                pairs += [(norm.gamma, p + name + ".weight", False), (norm.beta, p + name + ".bias", False)]
        for variable, name, transpose in pairs:
            if name not in weights:
                raise PretrainedFilesError(f"the checkpoint has no tensor {name}: not a BERT of this shape")
            value = weights[name].T if transpose else weights[name]
            if tuple(value.shape) != tuple(variable.shape):
                raise PretrainedFilesError(f"the checkpoint's {name} is {tuple(weights[name].shape)}, the encoder "
                                           f"expects {tuple(variable.shape)}: not all-MiniLM-L6-v2's shape")
            variable.assign(value)
        return self

    def get_config(self) -> dict:
        return {**super().get_config(), **self.arch, "trainable_layers": self.trainable_layers, "dropout": self.dropout}


def mean_pool(states: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """The mean of `states` `[B, T, W]` over the tokens where `mask` `[B, T]` is 1: `[B, W]`."""
    weights = tf.cast(mask, states.dtype)[:, :, tf.newaxis]
    return tf.reduce_sum(states * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1e-9)


@serializable
class SentenceEncoder(tf.keras.layers.Layer):
    """Raw strings `[B]` → tokenizer → BERT → mean pooling → L2 norm: `[B, W]` unit vectors (all-MiniLM-L6-v2).

    `from_files` builds one with the pretrained weights loaded. Its config
    holds the vocabulary and the architecture, not the weights (a checkpoint or
    `load` supplies them).
    """

    def __init__(self, tokenizer: BertTokenizer | dict, bert: BertEncoder | dict, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer if isinstance(tokenizer, tf.keras.layers.Layer) else tf.keras.layers.deserialize(tokenizer)
        self.bert = bert if isinstance(bert, tf.keras.layers.Layer) else tf.keras.layers.deserialize(bert)

    @classmethod
    def from_files(cls, files: MiniLMFiles, max_tokens: int = 128, trainable_layers: int = 0,
                   name: str = "sentence_encoder") -> "SentenceEncoder":
        encoder = cls(BertTokenizer(files.vocabulary(), max_tokens, name="tokenizer"),
                      BertEncoder(trainable_layers=trainable_layers, name="bert"), name=name)
        encoder.bert.load(files.weights())
        return encoder

    @property
    def width(self) -> int:
        return self.bert.arch["width"]

    def call(self, texts: tf.Tensor, layers: int | None = None, training=None) -> tf.Tensor:
        token_ids, mask = self.tokenizer(texts)
        states = self.bert(token_ids, mask, layers=layers, training=training)
        return tf.math.l2_normalize(mean_pool(states, mask), axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "tokenizer": tf.keras.layers.serialize(self.tokenizer),
                "bert": tf.keras.layers.serialize(self.bert)}
