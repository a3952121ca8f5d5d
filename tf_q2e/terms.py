"""The term channel: query-term coverage as a part of the two towers' dot product.

On Home Depot the towers' cosine misses a plain lexical signal: the share of
the query's words found in the product's text (its *query-term coverage*).
Hard negatives are often products that match all of a query's words but one
(a colour, a size, a part), which moves a pooled n-gram vector little.
`benchmarks/engagement_probe.py` measures it: cos + 0.35 · coverage raises the
pooled engagement AUC of a trained run from 0.713 to 0.731 and, as one
retrieval score, Recall@100 from 0.757 to about 0.80.

`TermChannel` puts that sum into the towers' vectors, so it stays one dot
product that ScaNN and TF Serving handle like any other:

    words(t)  = the words of normalize(t) (`tf_q2e.normalize`), each lightly
                stemmed (`light_stem`: the S-stemmer's plural rules)
    e_w       = (±1, ..., ±1) / √K, signs from a hash of w (fixed, not trained)
    query:    t_q = (1 / |words(q)|) Σ_{w ∈ words(q)} e_w        (zeros if none)
    product:  t_p = Σ_{w ∈ words(title + " " + description)} e_w
              (words(t): the set of the text's distinct stemmed words)
    tower output [unit vector ; √α · t]:  q'·p' = cos(q, p) + α · t_q·t_p

e_w·e_w = 1 and e_w·e_v for w ≠ v is a sum of K random signs / K (mean 0,
standard deviation 1/√K), so t_q·t_p is the coverage plus noise of standard deviation about
√(|words(p)| / (|words(q)| K)): 0.08 for a 3-word query and a 10-word title at
K = 512. The signs are e_w[d] = 1 − 2·((h(w)·a_d + b_d) mod P mod 2), h the
FarmHash fingerprint of w (`tf.strings.to_hash_bucket_fast`) below the prime
P = 2^31 − 1 and (a_d, b_d) fixed constants: integer arithmetic only, the same
on every machine, in a SavedModel on stock TensorFlow Serving. Stemming is a
light, rule-based one because TensorFlow has no stemmer op; on Home Depot it
recovers what Snowball's does for this feature (unstemmed words: AUC 0.713
and Recall@100 0.784 instead of 0.730 and 0.799, simulated at K = 1024).

α (`model.term_weight`) is a fixed weight, K (`model.term_dim`, 0 = off) the
channel's size. The training tasks see the channel only with
`model.term_in_training`; by default the towers train on the cosine alone
and the channel joins when they are used (evaluate, index, export).

With learned word weights (`model.term_weights: engagement`, the query
tower's channel only), each query word w gets a weight
u_w = softplus(10 · v[h(w) mod 2^18]) from a table started at u = 1, and

    query:    t_q = Σ_w u_w e_w / Σ_w u_w

so t_q·t_p is the weighted coverage Σ u_w [w in p] / Σ u_w, still at most 1.
Only the engagement task trains v (the contrastive task keeps the cosine):
it learns which query words an engaged product must contain.

With a query bias (`model.query_bias`), each tower's channel gets one more
entry: b_q for the query, 1 for every product, so the dot product gains b_q,

    b_q = Σ_w r[h(w) mod 2^18] / |words(q)| + a · log(1 + |words(q)|)

from a second hashed table r and a scalar a, both started at 0 and learning
at the towers' rate (at 10x, like the word weights, r learned Home Depot's
training queries by heart: the held-out AUC fell from the first epoch on,
in a simulation on a trained run's frozen scores). It moves all
of a query's products alike, so it changes no ranking (retrieval, NDCG and
each query's own AUC stay), and the in-batch softmax cannot learn it (a
constant per row leaves the softmax unchanged): it is the engagement task's
own, what a user bias is to matrix factorisation. It lets the score say how
likely any impressed product of the query is to be engaged (Home Depot's
longer queries have fewer engaged products; the rest varies with the words).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf  # tf_q2e/__init__ has selected Keras 2 already

from tf_q2e.normalize import normalize

PRIME = 2**31 - 1  # h(w) < P and a_d < P, so h(w) · a_d + b_d < 2^62 fits int64
SIGN_SEED = 20230222  # the constants (a_d, b_d): fixed, so every run and every export agree

POOLINGS = ("mean", "sum")
WEIGHT_BUCKETS = 2**18  # rows of the learned word-weight table (h(w) mod this)
# u_w = softplus(WEIGHT_RATE · v): the weights move 10x faster than a plain variable under the towers'
# optimizer (Home Depot: at Adam's 0.002, plain weights had barely moved when early stopping kept
# epoch 2, and the validation AUC stayed at contrastive-only's; at 10x it rose by +0.011).
WEIGHT_RATE = 10.0


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


class TermChannel(tf.keras.layers.Layer):
    """`[B]` strings → `[B, K]` float32: √weight · (pooled fixed random sign vectors of the texts' words).

    Args:
      dim: K, the channel's size.
      weight: α, the weight of t_q·t_p in the towers' dot product (the layer
        scales its output by √α; both towers carry one).
      pooling: "mean" for the query tower, "sum" for the product tower.
      learned_weights: "mean" pooling only: a weighted mean with learned word
        weights u_w = softplus(WEIGHT_RATE · v[h(w) mod WEIGHT_BUCKETS]), v
        started at u = 1 (the module docstring).
      query_bias: one more output entry, `[B, K + 1]`: with "mean" pooling the
        query bias b_q (learned, started at 0; the module docstring), with
        "sum" pooling 1 (the product side of the bias).
    """

    def __init__(self, dim: int, weight: float, pooling: str, learned_weights: bool = False, query_bias: bool = False,
                 **kwargs):
        learned_bias = bool(query_bias) and pooling == "mean"  # the product side of the bias is a constant 1
        super().__init__(trainable=learned_weights or learned_bias, **kwargs)
        if dim < 1:
            raise ValueError(f"TermChannel dim must be at least 1, got {dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if learned_weights and pooling != "mean":
            raise ValueError("learned word weights are for the query's mean pooling only")
        self.dim = int(dim)
        self.weight = float(weight)
        self.pooling = pooling
        self.learned_weights = bool(learned_weights)
        a, b = _sign_constants(self.dim)
        self._a, self._b = tf.constant(a), tf.constant(b)
        # Created here, not in build(): the optimizer must see the table when the model is built.
        self.word_weights = self.add_weight(
            name="word_weights", shape=(WEIGHT_BUCKETS,), dtype=tf.float32,
            initializer=tf.keras.initializers.Constant(float(np.log(np.expm1(1.0))) / WEIGHT_RATE)) if learned_weights else None
        self.query_bias = bool(query_bias)
        self.bias_weights = self.add_weight(name="bias_weights", shape=(WEIGHT_BUCKETS,), dtype=tf.float32,
                                            initializer="zeros") if learned_bias else None
        self.length_weight = self.add_weight(name="length_weight", shape=(), dtype=tf.float32,
                                             initializer="zeros") if learned_bias else None

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

    def pool(self, hashes: tf.RaggedTensor) -> tf.Tensor:
        """Ragged `[B, None]` word hashes (`word_hashes`) → `[B, K]`: √α · the mean (weighted mean
        with learned weights) or sum of their e_w (`[B, K + 1]` with the query bias's entry)."""
        vectors = self.word_vectors(hashes.flat_values)
        rows = hashes.value_rowids()
        learned = self.word_weights is not None or self.bias_weights is not None
        buckets = tf.math.floormod(hashes.flat_values, WEIGHT_BUCKETS) if learned else None  # the tables' rows
        u = None
        if self.word_weights is not None:
            u = tf.nn.softplus(WEIGHT_RATE * tf.gather(self.word_weights, buckets))
            vectors *= u[:, tf.newaxis]
        pooled = tf.math.unsorted_segment_sum(vectors, rows, hashes.nrows())
        if self.pooling == "mean":  # the words' count, or their summed weights
            n = tf.cast(hashes.row_lengths(), tf.float32)  # also the query bias's (mean pooling only)
            counts = n if u is None else tf.math.unsorted_segment_sum(u, rows, hashes.nrows())
            pooled = tf.math.divide_no_nan(pooled, counts[:, tf.newaxis])
        pooled *= np.float32(np.sqrt(self.weight))
        if not self.query_bias:
            return pooled
        if self.bias_weights is None:  # the product side: 1
            return tf.concat([pooled, tf.ones_like(pooled[:, :1])], axis=-1)
        r = tf.gather(self.bias_weights, buckets)
        mean_r = tf.math.divide_no_nan(tf.math.unsorted_segment_sum(r, rows, hashes.nrows()), n)
        bias = mean_r + self.length_weight * tf.math.log1p(n)
        return tf.concat([pooled, bias[:, tf.newaxis]], axis=-1)

    def call(self, text: tf.Tensor) -> tf.Tensor:
        return self.pool(self.word_hashes(text))  # [B, K]

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "weight": self.weight, "pooling": self.pooling,
                "learned_weights": self.learned_weights, "query_bias": self.query_bias}
