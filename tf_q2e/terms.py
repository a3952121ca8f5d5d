"""The term channel: query-term coverage as a part of the two towers' dot product.

A pooled n-gram vector moves little when a product matches all of a query's
words but one (a colour, a size, a part), and such near misses are typical
hard negatives. The plain lexical signal the towers' cosine misses is the
share of the query's words found in the product's text, its *query-term
coverage*. `TermChannel` puts it into the towers' vectors, so the score stays
one dot product that ScaNN and TF Serving handle like any other:

    words(t)  = the words of normalize(t) (`tf_q2e.normalize`), each lightly
                stemmed (`light_stem`: the S-stemmer's plural rules)
    e_w       = (±1, ..., ±1) / √K, signs from a hash of w (fixed, not trained)
    query:    t_q = (1 / |words(q)|) Σ_{w ∈ words(q)} e_w        (zeros if none)
    product:  t_p = Σ_{w ∈ words(title + " " + description)} e_w
              (words(t): the set of the text's distinct stemmed words)
    tower output [unit vector ; √α · t]:  q'·p' = cos(q, p) + α · t_q·t_p

e_w·e_w = 1 and e_w·e_v for w ≠ v is a sum of K random signs / K (mean 0,
standard deviation 1/√K), so t_q·t_p is the coverage plus noise of standard
deviation about √(|words(p)| / (|words(q)| K)): 0.08 for a 3-word query and a
10-word title at K = 512. The signs are e_w[d] = 1 − 2·((h(w)·a_d + b_d) mod P
mod 2), h the FarmHash fingerprint of w (`tf.strings.to_hash_bucket_fast`)
below the prime P = 2^31 − 1 and (a_d, b_d) fixed constants: integer
arithmetic only, the same on every machine, in a SavedModel on stock
TensorFlow Serving. Stemming is a light, rule-based one because TensorFlow
has no stemmer op.

α (`model.term_weight`) is a fixed weight, K (`model.term_dim`, 0 = off) the
channel's size. The contrastive task trains the towers on the cosine alone;
the channel joins when the towers are used (evaluate, index, export) and in
the engagement task when it learns one of the two parts below.

Learned word weights (`model.term_weights: engagement`, the query side only):
each query word w gets a weight u_w = softplus(m · v[h(w) mod 2^18]) from a
table started at u = 1 (m: `model.word_weight_lr_multiplier`), and

    query:    t_q = Σ_w u_w e_w / Σ_w u_w

so t_q·t_p is the weighted coverage Σ u_w [w in p] / Σ u_w, still at most 1.
Only the engagement task trains v: it learns which query words an engaged
product must contain.

The query bias (`model.query_bias`, the query side only), a number per query
returned beside the vector (`TermChannel.pool_with_bias`):

    b_q = Σ_w r[h(w) mod 2^18] / |words(q)| + a · log(1 + |words(q)|)

from a second hashed table r and a scalar a, both started at 0 and learning
at the towers' rate. The engagement task scores a pair with q·p + b_q. It
moves all of a query's products alike, so it changes no ranking, and the
in-batch softmax cannot learn it (a constant per row leaves the softmax
unchanged): it is the engagement task's own, what a user bias is to matrix
factorisation, and it lets the engagement probability say how likely any
impressed product of the query is to be engaged.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf  # tf_q2e/__init__ has selected Keras 2 already

from tf_q2e.normalize import normalize

PRIME = 2**31 - 1  # h(w) < P and a_d < P, so h(w) · a_d + b_d < 2^62 fits int64
SIGN_SEED = 20230222  # the constants (a_d, b_d): fixed, so every run and every export agree

POOLINGS = ("mean", "sum")
WEIGHT_BUCKETS = 2**18  # rows of the learned word-weight table (h(w) mod this)


def light_stem(words: tf.Tensor) -> tf.Tensor:
    """The S-stemmer's plural rules (Harman 1991), on a string tensor of lower-case words.

    "...ies" -> "...y" (not "eies", "aies"); else "...es" -> "...e" (not "aes",
    "ees", "oes"); else "...s" -> "..." (not "us", "ss"); each rule needs two
    characters before its suffix ("as", "is", "pies" -> "pie" by the second).
    Crude stems ("gas" -> "ga") are harmless: queries and products go through
    the same rules.
    Example: ["rugs", "batteries", "boxes", "shoes", "glass", "gas", "ties"] ->
    ["rug", "battery", "boxe", "shoe", "glass", "ga", "tie"].
    """
    ies = tf.strings.regex_full_match(words, r".+[^ae]ies")
    es = ~ies & tf.strings.regex_full_match(words, r".+[^aeo]es")
    s = ~ies & ~es & tf.strings.regex_full_match(words, r".+[^us]s")
    stem = tf.where(ies, tf.strings.regex_replace(words, r"ies$", "y"), words)
    stem = tf.where(es | s, tf.strings.regex_replace(words, r"s$", ""), stem)
    return stem


def _sign_constants(dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SIGN_SEED)
    return rng.integers(1, PRIME, size=dim, dtype=np.int64), rng.integers(0, PRIME, size=dim, dtype=np.int64)


@tf.keras.utils.register_keras_serializable(package="tf_q2e")
class TermChannel(tf.keras.layers.Layer):
    """`[B]` strings → `[B, K]` float32: √weight · (pooled fixed random sign vectors of the texts' words).

    Args:
      dim: K, the channel's size.
      weight: α, the weight of t_q·t_p in the towers' dot product (the layer
        scales its output by √α; both towers carry one).
      pooling: "mean" for the query tower, "sum" for the product tower.
      learned_weights: "mean" pooling only: a weighted mean with learned word
        weights u_w = softplus(m · v[h(w) mod WEIGHT_BUCKETS]), v started at
        u = 1 (the module docstring).
      query_bias: "mean" pooling only: also learn the query bias b_q (started
        at 0; the module docstring), which `pool_with_bias` returns.
      weight_lr_multiplier: m, how many times faster than a plain variable the
        word weights move under Adam.

    Example: `TermChannel(512, 0.35, "mean")(tf.constant(["red sofa"]))` is
    `[1, 512]`; its dot product with the product side's vector of "red sofa
    cover" is 0.35 · (1 + noise).
    """

    def __init__(self, dim: int, weight: float, pooling: str, learned_weights: bool = False, query_bias: bool = False,
                 weight_lr_multiplier: float = 10.0, **kwargs):
        kwargs.pop("trainable", None)  # from get_config: it follows from the two options
        super().__init__(trainable=bool(learned_weights or query_bias), **kwargs)
        if dim < 1:
            raise ValueError(f"TermChannel dim must be at least 1, got {dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if (learned_weights or query_bias) and pooling != "mean":
            raise ValueError("learned word weights and the query bias are for the query's mean pooling only")
        self.dim = int(dim)
        self.weight = float(weight)
        self.pooling = pooling
        self.learned_weights = bool(learned_weights)
        self.query_bias = bool(query_bias)
        self.weight_lr_multiplier = float(weight_lr_multiplier)
        a, b = _sign_constants(self.dim)
        self._a, self._b = tf.constant(a), tf.constant(b)
        # Created here, not in build(): the optimizer must see the tables when the model is built.
        self.word_weights = self.add_weight(
            name="word_weights", shape=(WEIGHT_BUCKETS,), dtype=tf.float32,
            initializer=tf.keras.initializers.Constant(float(np.log(np.expm1(1.0))) / self.weight_lr_multiplier),
        ) if self.learned_weights else None
        self.bias_weights = self.add_weight(name="bias_weights", shape=(WEIGHT_BUCKETS,), dtype=tf.float32,
                                            initializer="zeros") if self.query_bias else None
        self.length_weight = self.add_weight(name="length_weight", shape=(), dtype=tf.float32,
                                             initializer="zeros") if self.query_bias else None

    def word_vectors(self, hashes: tf.Tensor) -> tf.Tensor:
        """`[n]` word hashes h(w) → `[n, K]` sign vectors e_w (±1/√K)."""
        x = tf.math.floormod(hashes[:, tf.newaxis] * self._a[tf.newaxis, :] + self._b[tf.newaxis, :], PRIME)
        return (1.0 - 2.0 * tf.cast(tf.math.floormod(x, 2), tf.float32)) / np.sqrt(self.dim).astype(np.float32)

    @staticmethod
    def word_hashes(text: tf.Tensor) -> tf.RaggedTensor:
        """`[B]` strings → ragged `[B, None]` int64: the hashes h(w) of each text's distinct stemmed words.

        For the input pipeline (`_Tower.featurize`): a few integers a row to
        keep, where the pooled vectors would be K floats.
        """
        text = tf.reshape(tf.convert_to_tensor(text, tf.string), [-1])
        words = tf.strings.split(normalize(text))  # ragged [B, None]
        hashes = tf.strings.to_hash_bucket_fast(light_stem(words.flat_values), PRIME)  # int64 in [0, P)
        # Distinct words of each text: one key per (row, word), row * P + h(w) < 2^63 for any batch.
        # tf.unique keeps first occurrences in order, so the rows stay sorted.
        keys, _ = tf.unique(words.value_rowids() * PRIME + hashes)
        rows = keys // PRIME
        return tf.RaggedTensor.from_value_rowids(keys - rows * PRIME, rows, nrows=tf.shape(text, tf.int64)[0])

    def pool_with_bias(self, hashes: tf.RaggedTensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Ragged `[B, None]` word hashes (`word_hashes`) → `([B, K], [B])`: √α · the mean (weighted
        mean with learned weights) or sum of their e_w, and the query bias b_q (zeros without one)."""
        vectors = self.word_vectors(hashes.flat_values)
        rows, nrows = hashes.value_rowids(), hashes.nrows()
        learned = self.word_weights is not None or self.bias_weights is not None
        buckets = tf.math.floormod(hashes.flat_values, WEIGHT_BUCKETS) if learned else None  # the tables' rows
        u = None
        if self.word_weights is not None:
            u = tf.nn.softplus(self.weight_lr_multiplier * tf.gather(self.word_weights, buckets))
            vectors *= u[:, tf.newaxis]
        pooled = tf.math.unsorted_segment_sum(vectors, rows, nrows)
        n = tf.cast(hashes.row_lengths(), tf.float32)  # the words of each text
        if self.pooling == "mean":  # the words' count, or their summed weights
            counts = n if u is None else tf.math.unsorted_segment_sum(u, rows, nrows)
            pooled = tf.math.divide_no_nan(pooled, counts[:, tf.newaxis])
        pooled *= np.float32(np.sqrt(self.weight))
        if self.bias_weights is None:
            return pooled, tf.zeros_like(n)
        r = tf.gather(self.bias_weights, buckets)
        mean_r = tf.math.divide_no_nan(tf.math.unsorted_segment_sum(r, rows, nrows), n)
        return pooled, mean_r + self.length_weight * tf.math.log1p(n)

    def pool(self, hashes: tf.RaggedTensor) -> tf.Tensor:
        """Ragged `[B, None]` word hashes → `[B, K]` (`pool_with_bias` without the bias)."""
        return self.pool_with_bias(hashes)[0]

    def call(self, text: tf.Tensor) -> tf.Tensor:
        return self.pool(self.word_hashes(text))  # [B, K]

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "weight": self.weight, "pooling": self.pooling,
                "learned_weights": self.learned_weights, "query_bias": self.query_bias,
                "weight_lr_multiplier": self.weight_lr_multiplier}
