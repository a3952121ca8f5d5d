"""`Que2EngageModel`: the two towers trained with the two tasks at once.

    L = L_ctr + λ·L_bce

`compute_loss` returns this replica's contribution to L (see `tasks.py`) and
updates the metrics that `fit` logs: `contrastive_loss` (mean ℓ_i over the
epoch's rows), `engagement_loss` (mean ℓ_i over its labelled rows), `loss`
(`contrastive_loss + λ·engagement_loss`, so the three agree even when a
validation pass ends on a short batch), `recall_at_1` (in-batch: the positive
scores highest among the global batch, Que2Search's batch metric) and
`engagement_auc` (ROC AUC of the engagement score q·d + b_q for engaged vs
hard-negative rows, over 1,001 buckets of tanh(score / span)).
`engagement_loss` and `engagement_auc` are NaN while no labelled row (engaged
0 or 1) has been seen, e.g. on a click-only log (every row -1), and `loss`
is then the contrastive loss alone.

λ = 0 (`model.engagement_weight: 0`) is the contrastive-only, Que2Search-style
baseline from the same code.

Two options add to the contrastive task (issue 19): mined hard negatives
(`data.mined_negatives`: a training batch then carries `MINED` products, which
the product tower embeds as extra softmax columns) and Que2Search's curriculum
stage 2 (`model.hard_negative_weight` w > 0): L += w·L_hard, a margin loss on
each row's hardest negative, from epoch `model.hard_negative_from_epoch` on
(`HardNegativeCurriculum` switches it; `fit` logs `hard_negative_loss`, which
the logged `loss` leaves out).

`train_step` replaces `tfrs.Model`'s to add loss scaling for float16 mixed
precision, to keep the BCE's gradient out of the embedding tables when
`model.engagement_trains_tables` is false (a second backward pass, of L_ctr
alone, gives the tables' gradients) and to log the global loss: under `MirroredStrategy` each replica's
loss is only its share of the global batch's.

Example:
    model = Que2EngageModel(load_config(), context_columns=("query_country",))
    model.build_from_schema()      # variables created, ready for compile/fit or loading weights
    model.get_config()             # {"config": {...}, "image_dim": 0, "context_columns": [...], ...}
"""

from __future__ import annotations

import contextlib

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tf_q2e.config import Config
from tf_q2e.data import schema as S
from tf_q2e.data.mined import MINED
from tf_q2e.features import TextHasher
from tf_q2e.tasks import EngagementBCE, ScaledSoftmaxRetrieval, global_sum
from tf_q2e.towers import EmbeddingBag, ProductTower, QueryTower, TextModality, channel_in_training, engagement_width

# Buckets of the engagement AUC metric over (1 + tanh(score / span)) / 2, in (0, 1).
AUC_THRESHOLDS = 1001


@tf.keras.utils.register_keras_serializable(package="tf_q2e")
class Que2EngageModel(tfrs.Model):
    """Query tower + product tower + scaled softmax retrieval + engagement BCE.

    Args:
      config: the resolved configuration (features, model), or its dict (`Config.to_dict`).
      image_dim: length of `product_image_embedding` (0: the data has none).
      context_columns: the query context columns of the data, e.g. `("query_country",)`.
      seed: seed of modality dropout.
      jit_compile: XLA-compile the towers' dense parts (`train.jit_compile`).

    `tf_q2e.build_model(config, dataset)` builds one with its variables created.
    """

    def __init__(
        self,
        config: Config | dict,
        image_dim: int = 0,
        context_columns: tuple[str, ...] = (),
        seed: int | None = None,
        jit_compile: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        config = config if isinstance(config, Config) else Config.from_dict(config)
        f, m = config.features, config.model
        self.config = config
        self.image_dim = int(image_dim)
        self.context_columns = tuple(context_columns)
        self.seed = seed
        self.jit_compile = bool(jit_compile)
        shared_bag = EmbeddingBag(f.buckets, m.text_embedding_dim, m.text_pooling, name="shared_text_bag") \
            if m.text_sharing != "none" else None
        encoder = TextModality(TextHasher.from_config_section(f), shared_bag, m.hidden_dim, m.embedding_dim, jit_compile,
                               name="shared_text") if m.text_sharing == "encoder" else None
        sentence_encoder = None
        if m.text_encoder != "none":  # one pretrained encoder; the query tower runs its first query_layers blocks
            from tf_q2e.pretrained.bert import SentenceEncoder
            from tf_q2e.pretrained.files import MiniLMFiles

            sentence_encoder = SentenceEncoder.from_files(MiniLMFiles.locate(m.minilm_path), m.max_tokens,
                                                          m.trainable_layers)
            if m.text_sharing == "encoder":  # a siamese path: query and product texts share the projection too
                sentence_encoder = (sentence_encoder,
                                    tf.keras.layers.Dense(m.embedding_dim, name="shared_pretrained_projection"))
        self.query_tower = QueryTower(f, m, self.context_columns, text_bag=shared_bag, seed=seed, text_encoder=encoder,
                                      sentence_encoder=sentence_encoder, jit_compile=jit_compile, name="query_tower")
        self.product_tower = ProductTower(f, m, image_dim, text_bag=shared_bag, seed=seed, text_encoder=encoder,
                                          sentence_encoder=sentence_encoder, jit_compile=jit_compile,
                                          name="product_tower")
        self.retrieval = ScaledSoftmaxRetrieval(m.scale, m.remove_accidental_hits, m.cross_replica_negatives,
                                                margin=m.hard_negative_margin, name="retrieval")
        engagement_scale = m.scale if m.engagement_scale is None else m.engagement_scale
        self.engagement = EngagementBCE(engagement_scale, learned_bias=m.engagement_bias == "learned",
                                        bias_lr_multiplier=m.engagement_bias_lr_multiplier, name="engagement")
        self.engagement_weight = float(m.engagement_weight)
        self.contrastive_loss = tf.keras.metrics.Mean(name="contrastive_loss")
        self.engagement_loss = _LabelledMean(name="engagement_loss")
        self.loss_tracker = _WeightedSum(self.contrastive_loss, self.engagement_loss, self.engagement_weight, name="loss")
        self.recall_at_1 = tf.keras.metrics.Mean(name="recall_at_1")
        self.hard_negative_weight = float(m.hard_negative_weight)
        self.hard_negative_loss = tf.keras.metrics.Mean(name="hard_negative_loss")
        # 1.0 while the curriculum's stage 2 runs (`HardNegativeCurriculum` sets it at each epoch's start).
        self.hard_negative_switch = tf.Variable(float(m.hard_negative_from_epoch == 0), trainable=False,
                                                dtype=tf.float32, name="hard_negative_switch")
        # AUC is rank-based, so the AUC of the score is that of σ(s·score + b); but σ(20·c) saturates: every
        # c > 0.27 falls in the top one of Keras's 200 probability buckets, so a contrastive-only model
        # showed an AUC near 0.5 whatever its ranking. The metric buckets (1 + tanh(score / span)) / 2 instead.
        self.engagement_auc = _LabelledAUC(name="engagement_auc", num_thresholds=AUC_THRESHOLDS)

    def get_config(self) -> dict:
        return {"config": self.config.to_dict(), "image_dim": self.image_dim, "context_columns": list(self.context_columns),
                "seed": self.seed, "jit_compile": self.jit_compile, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> "Que2EngageModel":
        return cls(**config)

    def get_build_config(self) -> dict:
        return {"placeholder_rows": 1}  # Keras's own records input shapes, which string inputs defeat

    def build_from_config(self, config: dict) -> None:
        """Creates the variables when Keras loads a `.keras` file (`tf.keras.models.load_model`)."""
        self.build_from_schema()

    def example_features(self, rows: int = 1) -> dict[str, tf.Tensor]:
        """A batch of `rows` placeholder rows of every input the model takes (for building its variables)."""
        example = {S.QUERY: tf.constant(["red sofa"] * rows), **{c: tf.constant([""] * rows) for c in self.context_columns},
                   S.PRODUCT_ID: tf.constant(["p"] * rows), S.PRODUCT_TITLE: tf.constant(["red sofa"] * rows),
                   S.PRODUCT_DESCRIPTION: tf.constant([""] * rows), S.PRODUCT_CATEGORY: tf.constant([""] * rows)}
        if self.image_dim:
            example[S.PRODUCT_IMAGE_EMBEDDING] = tf.zeros([rows, self.image_dim])
        return example

    def build_from_schema(self) -> "Que2EngageModel":
        """Creates every variable (the towers run once on placeholder rows); returns the model."""
        self(self.example_features())
        return self

    def featurize(self, features: dict) -> dict:
        """Hashes the text features of a batch (for `dataset.map`; see `_Tower.featurize`)."""
        return self.product_tower.featurize(self.query_tower.featurize(features))

    @property
    def pretrained_modalities(self) -> dict:
        """The towers' `PretrainedText` modalities by name (`query_pretrained`, `product_pretrained`), or {}."""
        return {name: tower.encoders[name] for tower in (self.query_tower, self.product_tower)
                for name in tower._pretrained_modalities()}

    def open_text_caches(self, root: str) -> dict:
        """`{variant: TextEmbeddingCache}` under `root` (`tf_q2e.pretrained.cache`) of the frozen pretrained
        modalities, each variant's folder read once (the query and product modalities of a 6-block query
        tower share one)."""
        from tf_q2e.pretrained.cache import TextEmbeddingCache

        variants = {m.variant for m in self.pretrained_modalities.values() if m.frozen}
        return {variant: TextEmbeddingCache.open(root, variant) for variant in sorted(variants)}

    def attach_text_cache(self, root_or_caches: str | dict | None) -> None:
        """Frozen pretrained modalities look their vectors up in the caches under a directory, or in
        `open_text_caches`'s, where one holds vectors; None detaches them: every text is encoded."""
        caches = self.open_text_caches(root_or_caches) if isinstance(root_or_caches, str) else root_or_caches or {}
        for modality in self.pretrained_modalities.values():
            if modality.frozen:
                cache = caches.get(modality.variant)
                modality.attach_cache(cache if cache is not None and len(cache) else None)

    def fill_text_cache(self, root: str, queries=None, catalog=None, on_bad_rows: str = "error", log=None) -> dict:
        """Encodes, once, each text the frozen pretrained encoder will see that the caches under `root` lack,
        and attaches the caches, so training, evaluation and indexing look vectors up instead of running
        the encoder on every row (`q2e train` does this itself before the first epoch).

        Args:
          root: the caches' folder (a subfolder per encoder variant, e.g. `minilm-L6-T64`); runs over
            the same texts can share it, and a second fill encodes nothing.
          queries: the queries training and evaluation will see: a list or pandas Series of strings,
            or a tf.data.Dataset of impression rows, batched or not (e.g. `tf_q2e.data.from_dir`'s).
          catalog: the products: a catalogue file or a pandas DataFrame (checked as `q2e validate`
            checks a catalogue, `on_bad_rows` saying what a bad row does), or a checked Arrow table.
          log: a function of one line (progress, then the count); None writes to stderr.

        Returns:
          `{modality name: texts encoded now}` for the modalities given texts.

        Texts left out are encoded when first met, at the encoder's speed (~55-100 texts/s on 2 CPU cores).
        """
        from tf_q2e.data.validate import Validator, catalog_tables
        from tf_q2e.pretrained.modality import product_texts, query_texts

        if not self.pretrained_modalities:
            raise ValueError("fill_text_cache: the model has no pretrained text encoder (model.text_encoder is none)")
        frozen = {name: m for name, m in self.pretrained_modalities.items() if m.frozen}
        texts = {}
        if "query_pretrained" in frozen and queries is not None:
            texts["query_pretrained"] = (query_texts(queries), "distinct queries")
        if "product_pretrained" in frozen and catalog is not None:
            tables = [catalog] if hasattr(catalog, "column_names") else \
                catalog_tables(catalog, Validator(on_bad_rows, image_dim=self.image_dim))
            texts["product_pretrained"] = ([t for table in tables for t in product_texts(table)], "product texts")
        caches = self.open_text_caches(root)
        encoded = {}
        for name, (values, what) in texts.items():
            modality = frozen[name]
            encode = tf.function(lambda batch, m=modality: m.encode(batch), input_signature=[tf.TensorSpec([None], tf.string)])
            encoded[name] = caches[modality.variant].fill(values, encode, what, log)
        self.attach_text_cache(caches)  # the caches just filled: their folders are not read again
        return encoded

    @contextlib.contextmanager
    def text_cache_detached(self):
        """A context in which every pretrained modality encodes its texts (`tf_q2e.export` traces the
        towers in it, so a SavedModel holds no cache)."""
        modalities = list(self.pretrained_modalities.values())
        caches = [m.cache for m in modalities]
        for modality in modalities:
            modality.attach_cache(None)
        try:
            yield self
        finally:
            for modality, cache in zip(modalities, caches):
                modality.attach_cache(cache)

    def weights_checkpoint(self) -> tf.train.Checkpoint:
        """A checkpoint of the model's weights alone (no optimizer slots): a third of the size."""
        return tf.train.Checkpoint(query_tower=self.query_tower, product_tower=self.product_tower, engagement=self.engagement)

    @property
    def embedding_tables(self) -> list[tf.Variable]:
        """The per-bucket rows of both towers (n-gram tables and pooling importances, context and category
        embeddings): without `model.engagement_trains_tables` only the contrastive task trains them."""
        tables = self.query_tower.embedding_tables + self.product_tower.embedding_tables
        return list({id(t): t for t in tables}.values())

    @property
    def metrics(self) -> list[tf.keras.metrics.Metric]:
        metrics = [self.loss_tracker, self.contrastive_loss, self.engagement_loss, self.recall_at_1, self.engagement_auc]
        return metrics + ([self.hard_negative_loss] if self.hard_negative_weight else [])

    def call(self, features: dict, training=None) -> tuple[tf.Tensor, tf.Tensor]:
        """`(query vectors [B, D], product vectors [B, D])` of impression rows (`[B, D + K]` each with a
        term channel; see `tf_q2e.towers`)."""
        queries, _, products = self.encode(features, training=training)
        return queries, products

    def encode(self, features: dict, training=None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`(query vectors, query biases [B], product vectors)` of impression rows: what the tasks score."""
        queries, query_bias = self.query_tower(features, training=training, return_bias=True)
        return queries, query_bias, self.product_tower(features, training=training)

    def engagement_probability(self, scores: tf.Tensor, query_bias: tf.Tensor) -> tf.Tensor:
        """σ(s_e·(score + b_q) + b): the engagement task's probability of pairs with dot products `scores`
        `[B, ...]` and the queries' biases `query_bias` `[B]`."""
        bias = tf.reshape(tf.cast(query_bias, tf.float32), [-1] + [1] * (len(scores.shape) - 1))
        return self.engagement.probability(tf.cast(scores, tf.float32) + bias)

    def compute_loss(self, features: dict, training: bool = False) -> tf.Tensor:
        ctr_loss, bce_loss, hard_loss = self.task_losses(features, training)
        return ctr_loss + self.engagement_weight * bce_loss + hard_loss

    def task_losses(self, features: dict, training: bool = False) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """This replica's contributions to L_ctr, L_bce and w·L_hard (0 while the curriculum's stage 2 is
        off), and the metrics' updates. A batch's `MINED` products join the softmax as negatives."""
        queries, query_bias, products = self.encode(features, training=training)
        m = self.config.model
        extra = {}
        if MINED in features:
            mined = features[MINED]
            valid = tf.not_equal(mined[S.PRODUCT_ID], "")
            if not self.jit_compile:  # only the filled slots through the tower (XLA would recompile per count)
                filled = tf.where(valid)[:, 0]
                mined = {name: tf.gather(values, filled) for name, values in mined.items()}
                valid = tf.ones_like(filled, tf.bool)
            extra = {"extra_embeddings": self.product_tower(mined, training=training)[:, :m.embedding_dim],
                     "extra_ids": mined[S.PRODUCT_ID], "extra_valid": valid}
        # The contrastive task scores with the cosine alone; the engagement task with the cosine and the
        # pretrained channel (β·MiniLM's cosine), and with the whole dot product (the term channel's part
        # too) and the query bias when it learns a part of the term channel.
        cosine = queries[:, :m.embedding_dim], products[:, :m.embedding_dim]
        with_channel = channel_in_training(m)
        width = engagement_width(m)
        bce_pair = (queries, products) if with_channel else (queries[:, :width], products[:, :width])
        ctr = self.retrieval(*cosine, product_ids=features[S.PRODUCT_ID], **extra)
        bce = self.engagement(*bce_pair, features[S.ENGAGED], query_bias=query_bias if m.query_bias else None)
        self.contrastive_loss.update_state(ctr.row_losses)
        self.engagement_loss.update_state(bce.row_losses, sample_weight=bce.labelled)
        self.recall_at_1.update_state(ctr.hits_at_1)
        engaged = tf.maximum(tf.cast(features[S.ENGAGED], tf.float32), 0.0)
        score = tf.reduce_sum(tf.cast(bce_pair[0], tf.float32) * tf.cast(bce_pair[1], tf.float32), axis=1)
        score += tf.cast(query_bias, tf.float32) if m.query_bias else 0.0
        # The cosine is in [-1, 1]; the pretrained channel adds β·[-1, 1], a term channel about
        # α · coverage (coverage ~ [0, 1]), a query bias any real number: tanh maps the score into the
        # buckets' (0, 1) without clipping ties.
        span = 1.0 + m.pretrained_weight + (m.term_weight if with_channel else 0.0)
        self.engagement_auc.update_state(engaged, 0.5 + 0.5 * tf.math.tanh(score / span), sample_weight=bce.labelled)
        hard_loss = tf.constant(0.0)
        if self.hard_negative_weight:
            self.hard_negative_loss.update_state(ctr.margin_losses)
            rows = global_sum(tf.cast(tf.shape(ctr.margin_losses)[0], tf.float32))
            hard_loss = (self.hard_negative_weight * self.hard_negative_switch
                         * tf.reduce_sum(ctr.margin_losses) / tf.maximum(rows, 1.0))
        return ctr.loss, bce.loss, hard_loss

    def train_step(self, features: dict) -> dict:
        optimizer = self.optimizer
        scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        # Without `engagement_trains_tables` the BCE's gradient reaches the dense layers only: the
        # embedding tables (sparse gradients) learn from the contrastive task alone.
        split = not self.config.model.engagement_trains_tables and self.engagement_weight > 0
        with tf.GradientTape(persistent=split) as tape:
            ctr_loss, bce_loss, hard_loss = self.task_losses(features, training=True)
            regularisation = (tf.add_n(self.losses) / tf.distribute.get_strategy().num_replicas_in_sync
                              if self.losses else 0.0)  # split over replicas like the loss
            loss = ctr_loss + self.engagement_weight * bce_loss + hard_loss + regularisation
            target = optimizer.get_scaled_loss(loss) if scaled else loss
            if split:
                ctr_target = ctr_loss + hard_loss + regularisation
                ctr_target = optimizer.get_scaled_loss(ctr_target) if scaled else ctr_target
        gradients = tape.gradient(target, self.trainable_variables)
        if split:
            ctr_gradients = tape.gradient(ctr_target, self.trainable_variables)
            # The embedding tables take the contrastive task's gradient alone. (The term channel's word
            # weights and query bias, the engagement task's own, are not among them and keep its gradient.)
            tables = {id(v) for v in self.embedding_tables}
            gradients = [c if id(v) in tables else g for g, c, v in zip(gradients, ctr_gradients, self.trainable_variables)]
            del tape
        if scaled:
            gradients = optimizer.get_unscaled_gradients(gradients)
        self._scale_encoder_learning_rate(optimizer)
        # No gradient: the word weights or query bias with λ = 0, or a task that does not reach a variable.
        optimizer.apply_gradients([(g, v) for g, v in zip(gradients, self.trainable_variables) if g is not None])
        return {metric.name: metric.result() for metric in self.metrics}

    @property
    def encoder_variables(self) -> list[tf.Variable]:
        """The pretrained encoder's fine-tuned variables (`model.trainable_layers`), or []."""
        variables = [v for m in self.pretrained_modalities.values() for v in m.encoder.trainable_variables]
        return list({id(v): v for v in variables}.values())

    def _scale_encoder_learning_rate(self, optimizer) -> None:
        """Gives the fine-tuned encoder blocks `model.encoder_lr_multiplier` x the learning rate (at trace
        time, so a user's own `compile` and `fit` get it too)."""
        multiplier = self.config.model.encoder_lr_multiplier
        variables = self.encoder_variables
        if not variables or multiplier == 1.0:
            return
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # under a LossScaleOptimizer
        if not hasattr(inner, "scale_learning_rate"):
            raise TypeError(f"model.encoder_lr_multiplier ({multiplier}) needs an optimizer with scale_learning_rate, "
                            f"such as tf_q2e.SparseAdam, not {type(inner).__name__}; or set "
                            "model.encoder_lr_multiplier=1 (the encoder then learns at the towers' rate)")
        inner.scale_learning_rate(variables, multiplier)

    def test_step(self, features: dict) -> dict:
        self.compute_loss(features, training=False)
        return {metric.name: metric.result() for metric in self.metrics}


class _LabelledMean(tf.keras.metrics.Mean):
    """A weighted mean that is NaN, not 0, while its weights sum to 0 (no labelled row seen)."""

    def result(self) -> tf.Tensor:
        return tf.where(self.count > 0, tf.math.divide_no_nan(self.total, self.count), float("nan"))


class _LabelledAUC(tf.keras.metrics.AUC):
    """ROC AUC that is NaN, not 0, until both an engaged and a not-engaged labelled row were seen."""

    def result(self) -> tf.Tensor:
        positives = self.true_positives[0] + self.false_negatives[0]
        negatives = self.true_negatives[0] + self.false_positives[0]
        return tf.where((positives > 0) & (negatives > 0), super().result(), float("nan"))


class _WeightedSum(tf.keras.metrics.Metric):
    """`first + weight · second` of two other metrics' results (`second` counts 0 while NaN); no state of
    its own (they hold it)."""

    def __init__(self, first: tf.keras.metrics.Metric, second: tf.keras.metrics.Metric, weight: float, **kwargs):
        super().__init__(**kwargs)

        def results():  # a closure: the metrics are not tracked as sub-metrics
            value = second.result()
            return first.result() + weight * tf.where(tf.math.is_nan(value), tf.zeros_like(value), value)

        self._results = results

    def update_state(self, *args, **kwargs) -> None:
        pass

    def result(self) -> tf.Tensor:
        return self._results()

    def reset_state(self) -> None:
        pass


def build_model(config: Config | str | dict | None = None, schema_or_dataset=None, *, seed: int | None = None,
                jit_compile: bool | None = None) -> Que2EngageModel:
    """A `Que2EngageModel` with its variables created, for the data that `schema_or_dataset` describes.

    Args:
      config: a `Config`, a YAML path, a dict of sections, or None (the defaults).
      schema_or_dataset: what the model's inputs are: a `tf.data.Dataset` of impression rows or
        batches (`tf_q2e.data.from_pandas` ...), its `element_spec`, a pandas DataFrame, or a
        `tf_q2e.data.FeatureSchema`; None = no image embedding and no query context.
      seed: seed of modality dropout (default `train.seed`).
      jit_compile: XLA-compile the towers' dense parts (default `train.jit_compile`).

    Call it inside `strategy.scope()` to train on several devices. The
    caller passes no batch: the towers run once on placeholder rows.

    Example:
        train = tf_q2e.data.from_dir("data", split="train")
        model = tf_q2e.build_model("configs/default.yaml", train)
        model.compile(optimizer=tf_q2e.SparseAdam(7e-4))
    """
    from tf_q2e.config import load_config
    from tf_q2e.data.datasets import FeatureSchema

    if config is None or isinstance(config, str):
        config = load_config(config)
    elif isinstance(config, dict):
        config = Config.from_dict(config)
    schema = FeatureSchema.of(schema_or_dataset) if schema_or_dataset is not None else FeatureSchema()
    model = Que2EngageModel(config, schema.image_dim, schema.context_columns,
                            seed=config.train.seed if seed is None else seed,
                            jit_compile=config.train.jit_compile if jit_compile is None else jit_compile)
    return model.build_from_schema()
