"""The two tasks of Que2Engage: scaled in-batch softmax and engagement BCE.

Both take L2-normalised query vectors `q` `[b, D]` and product vectors `d`
`[b, D]` of the rows a replica holds (b rows of a global batch of N over R
replicas) and return that replica's *contribution* to the loss: its rows' sum
divided by the global count. Keras sums gradients over replicas, so the summed
contributions are exactly the loss of the global batch, whatever R is — one
device and two replicas give the same loss and the same gradients.

Scores and losses are computed in float32 whatever the towers' dtype (mixed
precision), so `exp(20·cos)` and the masking constant cannot overflow.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

# Logit of a masked (accidental-hit) candidate: exp() of it is exactly 0 in float32.
MASKED_LOGIT = -1e9
# String product ids are compared through 63-bit fingerprints (a collision needs ~3e9 distinct ids).
ID_FINGERPRINT_BUCKETS = 2**63 - 1


class RetrievalOutput(NamedTuple):
    loss: tf.Tensor  # scalar: this replica's contribution, Σ_local ℓ_i / N
    row_losses: tf.Tensor  # [b] ℓ_i
    hits_at_1: tf.Tensor  # [b] 1.0 where the positive has the highest logit of the (global) batch's products
    margin_losses: tf.Tensor  # [b] max(0, m − cos(q_i, d_i) + max_j cos(q_i, d_j)) over the unmasked negatives j


class EngagementOutput(NamedTuple):
    loss: tf.Tensor  # scalar: this replica's contribution, Σ_local labelled ℓ_i / N_labelled
    row_losses: tf.Tensor  # [b] ℓ_i (0 for unlabelled rows)
    logits: tf.Tensor  # [b] c_i
    labelled: tf.Tensor  # [b] float 1.0 where engaged is 0 or 1


def _replica_context():
    """The replica context when running on more than one replica, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def global_sum(value: tf.Tensor) -> tf.Tensor:
    """Sum of a (gradient-free) value over all replicas (the value itself on one)."""
    context = _replica_context()
    value = tf.stop_gradient(value)
    return value if context is None else context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _fingerprints(ids: tf.Tensor | None) -> tf.Tensor | None:
    """String product ids as 64-bit fingerprints (cheap [b, N] comparisons); other ids as they are."""
    if ids is not None and ids.dtype == tf.string:
        return tf.strings.to_hash_bucket_fast(ids, ID_FINGERPRINT_BUCKETS)
    return ids


@tf.keras.utils.register_keras_serializable(package="tf_q2e")
class ScaledSoftmaxRetrieval(tf.keras.layers.Layer):
    """Contrastive retrieval: softmax over the global batch (Que2Search eq. 2).

    Formula, for row i of the global batch of N rows, with `s` the scale:

        z_ij = s·cos(q_i, d_j) − [logQ] log p_j              j = 1..N
        z_ij = −1e9   if product_id_j == product_id_i and j ≠ i   (accidental hit)
        ℓ_i  = −log( exp(z_ii) / Σ_j exp(z_ij) )
        L_ctr = (1/N) Σ_i ℓ_i

    Every impressed row is a positive (engaged or not); the other rows' products
    are its negatives. p_j is the product's frequency in the training data
    (sampling-bias correction, Yi et al. 2019), applied to every logit.

    Extra negatives (mined hard negatives, `tf_q2e.data.mined`): M more
    product vectors e_k are extra columns of every row's softmax, never a
    positive, without logQ correction (they were not sampled by frequency):

        z_i,N+k = s·cos(q_i, e_k)                                   k = 1..M
        z_i,N+k = −1e9   if e_k is padding or product_id(e_k) == product_id_i

    Hardest negative (Que2Search's curriculum stage 2): `margin_losses` holds
    max(0, m − cos(q_i, d_i) + max_j cos(q_i, d_j)) with j over the columns not
    masked, in-batch and extra; 0 for a row without any. The model weighs it.

    Replicas: with `cross_replica=True` each replica gathers all replicas'
    product vectors (and ids, log p) with `ReplicaContext.all_gather` — whose
    gradient flows back to the replica that made each vector — so a query sees
    the whole global batch; its positive sits at its replica's offset. Each
    replica returns Σ_{its rows} ℓ_i / N. With `cross_replica=False` the
    negatives are the replica's own rows, as in TFRS's `Retrieval`.

    Reference: Liu et al., "Que2Search", KDD 2021, eq. 2 (s = 20);
    Yi et al., "Sampling-bias-corrected neural modeling", RecSys 2019 (logQ).

    Example (checked by a test): q = d = the identity rows e_1, e_2 (D = 2),
    s = 1: z = [[1, 0], [0, 1]], ℓ_i = log(1 + e^-1) = 0.31326, L_ctr = 0.31326.
    """

    def __init__(self, scale: float = 20.0, remove_accidental_hits: bool = True, cross_replica: bool = True,
                 margin: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.remove_accidental_hits = remove_accidental_hits
        self.cross_replica = cross_replica
        self.margin = float(margin)

    def call(
        self,
        query_embeddings: tf.Tensor,
        product_embeddings: tf.Tensor,
        product_ids: tf.Tensor | None = None,
        product_log_q: tf.Tensor | None = None,
        extra_embeddings: tf.Tensor | None = None,
        extra_ids: tf.Tensor | None = None,
        extra_valid: tf.Tensor | None = None,
    ) -> RetrievalOutput:
        """`extra_embeddings` `[m, D]`: this replica's extra negatives (gathered across replicas like the
        products), with their `extra_ids` `[m]` (for the accidental-hit mask) and `extra_valid` `[m]`
        (False: padding, masked for every row)."""
        q = tf.cast(query_embeddings, tf.float32)  # [b, D]
        d = tf.cast(product_embeddings, tf.float32)  # [b, D]
        local_rows = tf.shape(q)[0]
        offset = 0
        product_ids, extra_ids = (_fingerprints(ids) for ids in (product_ids, extra_ids))
        if extra_embeddings is not None:
            extra_embeddings = tf.cast(extra_embeddings, tf.float32)  # [m, D]
            if extra_valid is None:
                extra_valid = tf.ones(tf.shape(extra_embeddings)[:1], tf.bool)
        context = _replica_context()
        if context is not None and self.cross_replica:
            sizes = context.all_gather(tf.reshape(local_rows, [1]), axis=0)  # [R]
            offset = tf.reduce_sum(sizes[: context.replica_id_in_sync_group])
            d, product_ids, product_log_q, extra_embeddings, extra_ids, extra_valid = (
                None if x is None else context.all_gather(x, axis=0)
                for x in (d, product_ids, product_log_q, extra_embeddings, extra_ids, extra_valid))
        products = tf.shape(d)[0]  # N
        cosines = tf.matmul(q, d, transpose_b=True)  # [b, N]
        logits = self.scale * cosines
        if product_log_q is not None:
            logits -= tf.cast(product_log_q, tf.float32)[tf.newaxis, :]
        positives = offset + tf.range(local_rows)  # [b]
        columns = tf.range(products)[tf.newaxis, :]
        masked = tf.zeros_like(cosines, tf.bool)  # [b, N(+M)]
        if self.remove_accidental_hits:
            if product_ids is None:
                raise ValueError("remove_accidental_hits needs product_ids")
            own_ids = tf.gather(product_ids, positives)  # [b]
            masked = tf.equal(own_ids[:, tf.newaxis], product_ids[tf.newaxis, :]) & tf.not_equal(
                positives[:, tf.newaxis], columns)
        if extra_embeddings is not None:
            extra_cosines = tf.matmul(q, extra_embeddings, transpose_b=True)  # [b, M]
            extra_masked = tf.logical_not(extra_valid)[tf.newaxis, :] & tf.ones_like(extra_cosines, tf.bool)
            if self.remove_accidental_hits:
                if extra_ids is None:
                    raise ValueError("remove_accidental_hits needs extra_ids")
                extra_masked |= tf.equal(own_ids[:, tf.newaxis], extra_ids[tf.newaxis, :])
            cosines = tf.concat([cosines, extra_cosines], axis=1)
            logits = tf.concat([logits, self.scale * extra_cosines], axis=1)
            masked = tf.concat([masked, extra_masked], axis=1)
        logits = tf.where(masked, MASKED_LOGIT, logits)
        row_losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)  # [b]
        global_rows = global_sum(tf.cast(local_rows, tf.float32))
        loss = tf.reduce_sum(row_losses) / tf.maximum(global_rows, 1.0)
        positive_logits = tf.gather(logits, positives, axis=1, batch_dims=1)  # [b]
        in_batch = logits[:, :products]  # the metric stays comparable with and without extra negatives
        hits = tf.cast(tf.reduce_all(in_batch <= positive_logits[:, tf.newaxis], axis=1), tf.float32)
        # The hardest negative: the highest cosine among the columns neither masked nor the positive.
        negative = tf.logical_not(masked) & tf.not_equal(positives[:, tf.newaxis], tf.range(tf.shape(cosines)[1])[tf.newaxis, :])
        hardest = tf.reduce_max(tf.where(negative, cosines, -2.0), axis=1)  # -2: no negative (cosines >= -1)
        positive_cosines = tf.gather(cosines, positives, axis=1, batch_dims=1)
        margin_losses = tf.where(tf.reduce_any(negative, axis=1),
                                 tf.nn.relu(self.margin - positive_cosines + hardest), 0.0)
        return RetrievalOutput(loss, row_losses, hits, margin_losses)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "scale": self.scale,
            "remove_accidental_hits": self.remove_accidental_hits,
            "cross_replica": self.cross_replica,
            "margin": self.margin,
        }


@tf.keras.utils.register_keras_serializable(package="tf_q2e")
class EngagementBCE(tf.keras.layers.Layer):
    """Engagement task: engaged vs impressed-but-unengaged (hard negative) pairs.

    Formula, with y_i = engaged ∈ {1, 0} (rows with −1, no engagement label,
    are masked out), s the scale, b_q an optional bias of the query (the query
    tower's `query_bias`; 0 without one) and b an optional learned offset (0 in
    the paper's form):

        c_i = s·(q_i·d_i + b_q) + b,    b = m·β (β the variable, m `bias_lr_multiplier`:
                                                 under Adam b moves m times faster)
        ℓ_i = −[ y_i log σ(c_i) + (1 − y_i) log(1 − σ(c_i)) ]
        L_bce = Σ_{i labelled} ℓ_i / max(1, N_labelled)

    Reduction: by the number of labelled rows of the global batch, so λ means
    the same whatever share of rows carries a label. Each replica returns its
    labelled rows' Σ ℓ_i divided by the global count (an all-reduce of the
    count), so contributions sum to L_bce.

    With b = 0 (the paper), a hard negative asks for cos < 0 while the
    contrastive task asks the same pair for a high cos; `learned_bias=True`
    lets the model move the decision boundary instead.

    Reference: Que2Engage, WWW'23 Companion (arXiv 2302.11052).

    Example (checked by a test): cos = [1, 0, 0], y = [1, 0, −1], s = 1, b = 0:
    ℓ = [log(1 + e^-1), log 2, –] = [0.31326, 0.69315], L_bce = 0.50320.
    """

    def __init__(self, scale: float = 20.0, learned_bias: bool = False, bias_lr_multiplier: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.learned_bias = bool(learned_bias)
        self.bias_lr_multiplier = float(bias_lr_multiplier)
        # Created here, not in build(): the model is built (and the optimizer learns its variables)
        # by calling the towers only, before any loss runs.
        self.bias = self.add_weight(name="bias", shape=(), initializer="zeros", dtype=tf.float32) if learned_bias else None

    def logits(self, scores: tf.Tensor) -> tf.Tensor:
        """c = s·scores + b of any shape; `scores` are q·d + b_q (float32)."""
        logits = self.scale * tf.cast(scores, tf.float32)
        if self.bias is not None:
            logits += self.bias_lr_multiplier * self.bias
        return logits

    def probability(self, scores: tf.Tensor) -> tf.Tensor:
        """σ(c): the engagement probability of pairs with `scores` q·d + b_q (any shape)."""
        return tf.nn.sigmoid(self.logits(scores))

    def call(self, query_embeddings: tf.Tensor, product_embeddings: tf.Tensor, engaged: tf.Tensor,
             query_bias: tf.Tensor | None = None) -> EngagementOutput:
        q = tf.cast(query_embeddings, tf.float32)  # [b, D]
        d = tf.cast(product_embeddings, tf.float32)  # [b, D]
        scores = tf.reduce_sum(q * d, axis=1)  # [b]
        if query_bias is not None:
            scores += tf.cast(query_bias, tf.float32)
        logits = self.logits(scores)
        engaged = tf.cast(engaged, tf.float32)
        labelled = tf.cast(engaged >= 0.0, tf.float32)  # -1: no engagement label
        labels = tf.maximum(engaged, 0.0)
        row_losses = labelled * tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        global_labelled = global_sum(tf.reduce_sum(labelled))
        loss = tf.reduce_sum(row_losses) / tf.maximum(global_labelled, 1.0)
        return EngagementOutput(loss, row_losses, logits, labelled)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale, "learned_bias": self.learned_bias,
                "bias_lr_multiplier": self.bias_lr_multiplier}
