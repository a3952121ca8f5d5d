"""`Que2EngageModel`: the two towers trained with the two tasks at once.

    L = L_ctr + λ·L_bce

`compute_loss` returns this replica's contribution to L (see `tasks.py`) and
updates the metrics that `fit` logs: `contrastive_loss` (mean ℓ_i over the
epoch's rows), `engagement_loss` (mean ℓ_i over its labelled rows), `loss`
(`contrastive_loss + λ·engagement_loss`, so the three agree even when a
validation pass ends on a short batch), `recall_at_1` (in-batch: the positive
scores highest among the global batch, Que2Search's batch metric) and
`engagement_auc` (ROC AUC of c_i for engaged vs hard-negative rows, over
1,001 buckets of tanh(c_i / span), c_i the cosine, or the dot product when
the towers' term channel is in training).

λ = 0 (`model.engagement_weight: 0`) is the contrastive-only, Que2Search-style
baseline from the same code.

`train_step` replaces `tfrs.Model`'s to add loss scaling for float16 mixed
precision, to keep the BCE's gradient out of the embedding tables when
`model.engagement_trains_tables` is false (a second backward pass, of L_ctr
alone, gives the tables' gradients) and to log the global loss: under `MirroredStrategy` each replica's
loss is only its share of the global batch's.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_q2e.config import Config
from tf_q2e.data import schema as S
from tf_q2e.tasks import EngagementBCE, ScaledSoftmaxRetrieval
from tf_q2e.features import TextHasher
from tf_q2e.towers import EmbeddingBag, ProductTower, QueryTower, TextModality, channel_in_training

# Buckets of the engagement AUC metric over (1 + tanh(score / span)) / 2, in (0, 1).
AUC_THRESHOLDS = 1001


class Que2EngageModel(tfrs.Model):
    """Query tower + product tower + scaled softmax retrieval + engagement BCE.

    Args:
      config: the resolved configuration (features, model).
      image_dim: length of `product_image_embedding` (0: the data has none).
      context_columns: the query context columns of the data, e.g. `("query_country",)`.
      product_log_q: for logQ correction, a `tf.lookup` table from product id
        to the log of its training frequency (`model.logq_correction`).
      seed: seed of modality dropout.
      jit_compile: XLA-compile the towers' dense parts (`train.jit_compile`).
    """

    def __init__(
        self,
        config: Config,
        image_dim: int = 0,
        context_columns: tuple[str, ...] = (),
        product_log_q: tf.lookup.StaticHashTable | None = None,
        seed: int | None = None,
        jit_compile: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        f, m = config.features, config.model
        if m.logq_correction and product_log_q is None:
            raise ValueError("model.logq_correction needs product_log_q (product frequencies of the training data)")
        self.config = config
        self.image_dim = image_dim
        self.context_columns = tuple(context_columns)
        shared = EmbeddingBag(f.buckets, m.text_embedding_dim, m.text_pooling, name="shared_text_bag") \
            if m.share_text_tables or m.share_text_encoder else None
        encoder = TextModality(TextHasher.from_config_section(f), shared, m.hidden_dim, m.embedding_dim, jit_compile,
                               name="shared_text") if m.share_text_encoder else None
        self.query_tower = QueryTower(f, m, self.context_columns, text_bag=shared, seed=seed, text_encoder=encoder,
                                      jit_compile=jit_compile, name="query_tower")
        self.product_tower = ProductTower(f, m, image_dim, text_bag=shared, seed=seed, text_encoder=encoder,
                                          jit_compile=jit_compile, name="product_tower")
        self.retrieval = ScaledSoftmaxRetrieval(m.scale, m.remove_accidental_hits, m.cross_replica_negatives, name="retrieval")
        engagement_scale = m.scale if m.engagement_scale is None else m.engagement_scale
        self.engagement = EngagementBCE(engagement_scale, learned_bias=m.engagement_bias == "learned", name="engagement")
        self.engagement_weight = float(m.engagement_weight)
        self.product_log_q = product_log_q if m.logq_correction else None
        self.contrastive_loss = tf.keras.metrics.Mean(name="contrastive_loss")
        self.engagement_loss = tf.keras.metrics.Mean(name="engagement_loss")
        self.loss_tracker = _WeightedSum(self.contrastive_loss, self.engagement_loss, self.engagement_weight, name="loss")
        self.recall_at_1 = tf.keras.metrics.Mean(name="recall_at_1")
        # AUC is rank-based, so the AUC of c_i is that of σ(s·c_i + b); but σ(20·c) saturates: every
        # c > 0.27 falls in the top one of Keras's 200 probability buckets, so a contrastive-only model
        # showed an AUC near 0.5 whatever its ranking. The metric buckets (1 + tanh(c / span)) / 2 instead.
        self.engagement_auc = tf.keras.metrics.AUC(name="engagement_auc", num_thresholds=AUC_THRESHOLDS)

    def featurize(self, features: dict) -> dict:
        """Hashes the text features of a batch (for `dataset.map`; see `_Tower.featurize`)."""
        return self.product_tower.featurize(self.query_tower.featurize(features))

    def weights_checkpoint(self) -> tf.train.Checkpoint:
        """A checkpoint of the model's weights alone (no optimizer slots): a third of the size."""
        return tf.train.Checkpoint(query_tower=self.query_tower, product_tower=self.product_tower, engagement=self.engagement)

    @property
    def engagement_tables(self) -> list[tf.Variable]:
        """Tables that only the engagement task trains: the query term channel's learned word weights
        and query bias."""
        channel = self.query_tower.term_channel
        tables = [] if channel is None else [channel.word_weights, channel.bias_weights]
        return [t for t in tables if t is not None]

    @property
    def metrics(self) -> list[tf.keras.metrics.Metric]:
        return [self.loss_tracker, self.contrastive_loss, self.engagement_loss, self.recall_at_1, self.engagement_auc]

    def call(self, features: dict, training=None) -> tuple[tf.Tensor, tf.Tensor]:
        """`(query vectors [B, D], product vectors [B, D])` of impression rows."""
        return self.query_tower(features, training=training), self.product_tower(features, training=training)

    def compute_loss(self, features: dict, training: bool = False) -> tf.Tensor:
        ctr_loss, bce_loss = self.task_losses(features, training)
        return ctr_loss + self.engagement_weight * bce_loss

    def task_losses(self, features: dict, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """This replica's contributions to L_ctr and L_bce (and the metrics' updates)."""
        queries, products = self(features, training=training)
        m = self.config.model
        # Each task scores with the cosine or with the whole dot product (the term channel's part too):
        # the contrastive task with the channel only if term_in_training, the engagement task also
        # when it learns the channel's word weights or query bias. At inference the channel always joins.
        cosine = queries[:, :m.embedding_dim], products[:, :m.embedding_dim]
        ctr_pair = (queries, products) if m.term_in_training else cosine
        bce_pair = (queries, products) if channel_in_training(m) else cosine
        log_q = self.product_log_q.lookup(features[S.PRODUCT_ID]) if self.product_log_q is not None else None
        ctr = self.retrieval(*ctr_pair, product_ids=features[S.PRODUCT_ID], product_log_q=log_q)
        bce = self.engagement(*bce_pair, features[S.ENGAGED])
        self.contrastive_loss.update_state(ctr.row_losses)
        self.engagement_loss.update_state(bce.row_losses, sample_weight=bce.labelled)
        self.recall_at_1.update_state(ctr.hits_at_1)
        engaged = tf.maximum(tf.cast(features[S.ENGAGED], tf.float32), 0.0)
        score = tf.reduce_sum(tf.cast(bce_pair[0], tf.float32) * tf.cast(bce_pair[1], tf.float32), axis=1)
        # The cosine is in [-1, 1]; a term channel adds about α · coverage (coverage ~ [0, 1]), a query
        # bias any real number: tanh maps the score into the buckets' (0, 1) without clipping ties.
        span = 1.0 + (m.term_weight if channel_in_training(m) else 0.0)
        self.engagement_auc.update_state(engaged, 0.5 + 0.5 * tf.math.tanh(score / span), sample_weight=bce.labelled)
        return ctr.loss, bce.loss

    def train_step(self, features: dict) -> dict:
        optimizer = self.optimizer
        scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        # Without `engagement_trains_tables` the BCE's gradient reaches the dense layers only: the
        # embedding tables (sparse gradients) learn from the contrastive task alone.
        split = not self.config.model.engagement_trains_tables and self.engagement_weight > 0
        with tf.GradientTape(persistent=split) as tape:
            ctr_loss, bce_loss = self.task_losses(features, training=True)
            regularisation = (tf.add_n(self.losses) / tf.distribute.get_strategy().num_replicas_in_sync
                              if self.losses else 0.0)  # split over replicas like the loss
            loss = ctr_loss + self.engagement_weight * bce_loss + regularisation
            target = optimizer.get_scaled_loss(loss) if scaled else loss
            if split:
                ctr_target = ctr_loss + regularisation
                ctr_target = optimizer.get_scaled_loss(ctr_target) if scaled else ctr_target
        gradients = tape.gradient(target, self.trainable_variables)
        if split:
            ctr_gradients = tape.gradient(ctr_target, self.trainable_variables)
            # The term channel's word weights and query bias are the engagement task's own: they keep its gradient.
            own = {id(v) for v in self.engagement_tables}
            gradients = [c if isinstance(g, tf.IndexedSlices) and id(v) not in own else g
                         for g, c, v in zip(gradients, ctr_gradients, self.trainable_variables)]
            del tape
        if scaled:
            gradients = optimizer.get_unscaled_gradients(gradients)
        # No gradient: the word weights or query bias with λ = 0, or a task that does not reach a variable.
        optimizer.apply_gradients([(g, v) for g, v in zip(gradients, self.trainable_variables) if g is not None])
        return {metric.name: metric.result() for metric in self.metrics}

    def test_step(self, features: dict) -> dict:
        self.compute_loss(features, training=False)
        return {metric.name: metric.result() for metric in self.metrics}


class _WeightedSum(tf.keras.metrics.Metric):
    """`first + weight · second` of two other metrics' results; no state of its own (they hold it)."""

    def __init__(self, first: tf.keras.metrics.Metric, second: tf.keras.metrics.Metric, weight: float, **kwargs):
        super().__init__(**kwargs)
        self._results = lambda: first.result() + weight * second.result()  # a lambda: not tracked as sub-metrics

    def update_state(self, *args, **kwargs) -> None:
        pass

    def result(self) -> tf.Tensor:
        return self._results()

    def reset_state(self) -> None:
        pass
