"""Training with `model.fit`: strategy, data, model, optimizer, callbacks, run directory.

`train(config, data_dir, run_dir)` is what `q2e train` runs. The run directory:

    RUN/config.yaml         the resolved config (defaults filled in, overrides applied)
    RUN/data_report.json    validation of the data set (RUN/quarantine/ holds skipped rows)
    RUN/pseudo_queries.parquet  with `data.pseudo_queries` > 0: the extra training rows made
                            from catalogue titles (`tf_q2e.data.pseudo_queries`)
    RUN/model.json          what the model was built from (data dir, image_dim, context columns)
    RUN/history.json        Keras history: metric name -> one value per epoch, every epoch of
                            the run (rewritten at each epoch end; a resumed run keeps the
                            epochs the killed process finished)
    RUN/checkpoints/        the model's weights after each of the last 3 epochs (epoch-N)
    RUN/model/              the final model (the best epoch's weights when early stopping
                            restored them) as `tf_q2e.save` writes it: model.json and weights.*;
                            `load_model(RUN)` or `tf_q2e.load(RUN/model)` reads it
    RUN/backup/             BackupAndRestore state while a run is in progress: rerun the
                            same command after a crash and it resumes from the last epoch
    RUN/logs/               TensorBoard

Strategies (`train.strategy`): `default` (one device); `mirrored` (all GPUs, or
`train.num_devices` logical CPU devices where there is no GPU — how the
multi-replica path is tested on CPU); `multi_worker`
(`MultiWorkerMirroredStrategy`, cluster from `TF_CONFIG`; only the chief
writes the run directory, other workers write to `RUN/workers/<index>/`).
Across workers each call runs one step (`steps_per_execution` is set to 1:
with several steps per call the cross-worker reduction of the tables' sparse
gradients failed with a collective shape mismatch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import tensorflow as tf

from tf_q2e.callbacks import EarlyStopping, HardNegativeCurriculum
from tf_q2e.config import Config
from tf_q2e.data import schema as S
from tf_q2e.data.mined import MinedNegatives
from tf_q2e.data.pipeline import ImpressionPipeline
from tf_q2e.data.pseudo_queries import PSEUDO_QUERY_FILE, write_pseudo_queries
from tf_q2e.data.validate import bad_rows_error, dataset_files, validate_dataset
from tf_q2e.errors import ConfigError, InputError
from tf_q2e.model import Que2EngageModel
from tf_q2e.optimizers import SparseAdam
from tf_q2e.saving import save

MIXED_PRECISION_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# Under the run directory: a frozen pretrained encoder's vectors (train.text_cache null).
TEXT_CACHE_DIR = "text_cache"
# train.cache: auto keeps a split in memory up to this many rows (about 2 KB a row once hashed).
AUTO_CACHE_ROWS = 1_000_000


def make_strategy(config: Config) -> tf.distribute.Strategy:
    """The distribution strategy that `train.strategy` names.

    `mirrored` without GPUs splits the CPU into `train.num_devices` logical
    devices; that must happen before TensorFlow runs its first op.
    """
    t = config.train
    if t.strategy == "default":
        return tf.distribute.get_strategy()
    if t.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = t.num_devices or len(gpus)
        if count > len(gpus):
            raise ConfigError(f"train.num_devices ({count}) is more than the {len(gpus)} GPU(s) of this machine")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(count)])
    count = t.num_devices or 1
    cpu = tf.config.list_physical_devices("CPU")[0]
    logical = tf.config.get_logical_device_configuration(cpu)  # unlike list_logical_devices, starts nothing
    if len(logical or [None]) != count:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError as e:
            raise RuntimeError(
                f"train.num_devices={count} logical CPU devices must be configured before TensorFlow runs its "
                f"first op, and this process has run one already ({e}); start a new process"
            ) from e
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(count)], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def build_model(config: Config, image_dim: int, context_columns: tuple[str, ...],
                jit_compile: bool | None = None) -> Que2EngageModel:
    """The model, with its variables created (call inside `strategy.scope()`); `jit_compile` None follows
    `train.jit_compile`. (`tf_q2e.build_model` takes a data set or a schema instead.)"""
    jit = config.train.jit_compile if jit_compile is None else jit_compile
    return Que2EngageModel(config, image_dim, context_columns, seed=config.train.seed,
                           jit_compile=jit).build_from_schema()


def split_reading(t, rows: int, model: Que2EngageModel, rows_read: int | None = None) -> dict:
    """`ImpressionPipeline.dataset` arguments for a split of `rows` rows under `train` config `t`.

    Cached in memory after the first pass (`train.cache`), with the text hashed
    before caching; else hashed in the pipeline only with `featurize_in_pipeline`.
    `rows_read` is how many rows one iterator will take (None: all of them):
    `auto` does not cache a split that no iterator reads to the end, since
    tf.data throws such a partial cache away (and warns); it still hashes
    that split in the pipeline.
    """
    auto_cache = t.cache == "auto" and rows <= AUTO_CACHE_ROWS
    whole_pass = rows_read is None or rows_read >= rows
    cached = t.cache == "memory" or (auto_cache and whole_pass)
    hashed = t.cache == "memory" or auto_cache or t.featurize_in_pipeline
    return {"cache": "" if cached else None, "chunk_fn": model.featurize if hashed else None}


def _steps_per_execution(t) -> int:
    """`train.steps_per_execution`, except 1 across workers.

    Under MultiWorkerMirroredStrategy, the collective that reduces the tables'
    sparse gradients (padded to the longest worker's row count inside a
    tf.cond) fails with a shape mismatch when it runs inside the loop of
    several steps per execution; one step per call works.
    """
    if t.strategy == "multi_worker" and t.steps_per_execution != 1:
        _log(f"train.steps_per_execution={t.steps_per_execution} -> 1: several steps per call break the "
             "cross-worker reduction of sparse gradients")
        return 1
    return t.steps_per_execution


def _is_chief(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    chief = resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                              and "chief" not in resolver.cluster_spec().as_dict())
    return chief, int(resolver.task_id or 0)


def train(config: Config, data_dir: str, run_dir: str, verbose: int | None = None) -> dict:
    """Trains the model on `data_dir` and writes `run_dir`; returns the run's history (as history.json).

    A run resumed from its backup returns (and writes) every epoch of the run,
    the killed process's included, not only the epochs this process ran.

    The run's `config.yaml` records `data.dir` as the absolute `data_dir` (and `data.mined_negatives`
    as an absolute path), so later commands (`q2e index`) find the data set the run was trained on.
    """
    mined_file = os.path.abspath(config.data.mined_negatives) if config.data.mined_negatives else None
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, dir=os.path.abspath(data_dir),
                                                                  mined_negatives=mined_file))
    t = config.train
    strategy = make_strategy(config)  # first: logical devices must precede any TF op
    replicas = strategy.num_replicas_in_sync
    if t.global_batch_size % replicas:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by the number of replicas ({replicas})"
        )
    chief, worker_index = _is_chief(strategy)
    out = run_dir if chief else os.path.join(run_dir, "workers", str(worker_index))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config.to_yaml())

    catalog, splits = dataset_files(data_dir)
    report = validate_dataset(
        data_dir, config.data.on_bad_rows, config.data.image_dim, config.data.quarantine_dir or os.path.join(out, "quarantine")
    )
    with open(os.path.join(out, "data_report.json"), "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=2)
    if config.data.on_bad_rows == "error" and report.problem_count:
        raise bad_rows_error([p for r in report.files for p in r.problems], report.problem_count)
    _log(report.format_text())

    pipeline = ImpressionPipeline([splits["train"]], catalog, on_bad_rows=config.data.on_bad_rows, image_dim=config.data.image_dim)
    context_columns = tuple(c for c in pipeline.columns if S.is_query_context(c))
    rows = {r.path: r.rows_kept for r in report.files}
    train_files = [splits["train"]]
    if config.data.pseudo_queries:
        path = os.path.join(out, PSEUDO_QUERY_FILE)
        rows[path] = write_pseudo_queries(pipeline.products, splits["train"], path, config.data.pseudo_queries, t.seed,
                                          context_columns, pipeline.image_dim)
        _log(f"{path}: {rows[path]} pseudo-query rows ({config.data.pseudo_queries} per catalogue product)")
        train_files.append(path)
        pipeline = ImpressionPipeline(train_files, pipeline.products, on_bad_rows=config.data.on_bad_rows,
                                      image_dim=pipeline.image_dim or None)
    train_rows = sum(rows[f] for f in train_files)
    validation = (
        ImpressionPipeline([splits["validation"]], pipeline.products, on_bad_rows=config.data.on_bad_rows,
                           image_dim=pipeline.image_dim or None)
        if "validation" in splits
        else None
    )
    mined = None
    if config.data.mined_negatives:
        mined = MinedNegatives(config.data.mined_negatives, pipeline.products, pipeline.image_dim)
        _log(f"{mined}: {config.model.mined_negatives_per_row} per training row")
    with open(os.path.join(out, "model.json"), "w", encoding="utf-8") as f:
        json.dump({"data_dir": os.path.abspath(data_dir), "image_dim": pipeline.image_dim,
                   "context_columns": list(context_columns)}, f, indent=2)

    tf.keras.utils.set_random_seed(t.seed)
    tf.keras.mixed_precision.set_global_policy(MIXED_PRECISION_POLICIES[t.mixed_precision])
    try:
        with strategy.scope():
            model = build_model(config, pipeline.image_dim, context_columns)
            model.compile(optimizer=SparseAdam(t.learning_rate), steps_per_execution=_steps_per_execution(t))
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")

    if model.pretrained_modalities:
        fill_text_cache(model, t.text_cache or os.path.join(out, TEXT_CACHE_DIR),
                        train_files + [p for split, p in splits.items() if split != "train"], pipeline.products.table)

    steps = t.steps_per_epoch or max(1, train_rows // t.global_batch_size)
    validation_steps = None  # needed with steps_per_execution > 1
    if validation is not None:
        n = rows[splits["validation"]]
        # Several replicas: full global batches only (equal shares on every replica).
        batches = n // t.global_batch_size if replicas > 1 else -(-n // t.global_batch_size)
        if batches < 1:
            raise ConfigError(f"{splits['validation']}: the validation split has {n} rows kept" + (
                f", fewer than one global batch (train.global_batch_size {t.global_batch_size}), which "
                f"{replicas} replicas need to validate on equal shares" if n else ""))
        # A cap beyond the split's batches would run the iterator dry: Keras then logs no val_* metric.
        validation_steps = min(t.validation_steps or batches, batches)
    # fit keeps one iterator over the repeated training data for all epochs, and
    # starts a new validation iterator every epoch.
    rows_read = {"train": steps * t.global_batch_size * t.epochs, "validation": (validation_steps or 0) * t.global_batch_size}

    def reading(split: str) -> dict:
        return split_reading(t, train_rows if split == "train" else rows[splits[split]], model, rows_read[split])

    def train_data(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = context.get_per_replica_batch_size(t.global_batch_size)
        reads = reading("train")
        hashed = reads["chunk_fn"]
        if mined is not None:  # each row's mined products are found before its query text is hashed
            marker = mined.marker()
            reads["chunk_fn"] = marker if hashed is None else (lambda rows: hashed(marker(rows)))
        batches = pipeline.dataset(batch, training=True, shuffle_buffer=t.shuffle_buffer, seed=t.seed,
                                   input_context=context, repeat=True, **reads)
        if mined is None:
            return batches
        # Each input pipeline draws its own negatives; hashed in the pipeline when the rows are.
        return mined.attach(batches, config.model.mined_negatives_per_row, t.seed + context.input_pipeline_id,
                            model.product_tower.featurize if hashed is not None else None)

    def validation_data(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = context.get_per_replica_batch_size(t.global_batch_size)
        # Several replicas: equal batches on every replica (drops < one global batch).
        return validation.dataset(batch, training=False, input_context=context, drop_remainder=replicas > 1,
                                  **reading("validation"))

    history_file = HistoryFile(os.path.join(out, "history.json"))
    callbacks = [
        # Before BackupAndRestore: an epoch is in history.json before the backup says it is done
        # (a kill in between leaves one entry too many, which the resumed run drops).
        history_file,
        # Every worker gets RUN/backup: tf-keras restores all workers from its `chief/`
        # copy, which only the chief writes (a shared file system, as for RUN itself).
        tf.keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup")),
        EpochCheckpoints(os.path.join(out, "checkpoints")),
        tf.keras.callbacks.TensorBoard(os.path.join(out, "logs"), update_freq="epoch"),
    ]
    if config.model.hard_negative_weight:
        callbacks.append(HardNegativeCurriculum())
    if validation is not None and t.early_stopping_patience:
        # Falls back to val_recall_at_1 when the engagement metrics are NaN (no labelled rows).
        callbacks.append(EarlyStopping(t.early_stopping_monitor, patience=t.early_stopping_patience,
                                       restore_best_weights=True, log=_log))
    _log(f"training on {replicas} replica(s), global batch {t.global_batch_size}, {t.epochs} epoch(s) of {steps} steps")
    model.fit(
        strategy.distribute_datasets_from_function(train_data),
        epochs=t.epochs,
        steps_per_epoch=steps,
        validation_data=strategy.distribute_datasets_from_function(validation_data) if validation else None,
        validation_steps=validation_steps,
        callbacks=callbacks,
        verbose=verbose if verbose is not None else (1 if sys.stdout.isatty() else 2),
    )
    save(model, os.path.join(out, "model"))
    return history_file.finish()


def fill_text_cache(model: Que2EngageModel, root: str, impression_files: list[str], products) -> None:
    """`model.fill_text_cache` with the queries of `impression_files` (every split, pseudo-queries
    included) and the catalogue `products` (an Arrow table)."""
    from tf_q2e.data.validate import Validator

    queries, query_modality = None, model.pretrained_modalities.get("query_pretrained")
    if query_modality is not None and query_modality.frozen:
        queries = [q for path in impression_files
                   for table in Validator(on_bad_rows="skip").iter_file(path, "impressions")
                   for q in table.column(S.QUERY).to_pylist()]
    model.fill_text_cache(root, queries, products, log=_log)


class HistoryFile(tf.keras.callbacks.Callback):
    """Keeps `path` (history.json) holding every epoch of the run: metric name -> one value per epoch.

    Rewritten atomically (a temporary file, then `os.replace`) at each epoch
    end, so a SIGKILL leaves the epochs finished so far. When BackupAndRestore
    resumes a killed run at epoch k (the first `on_epoch_begin` sees k > 0),
    the first k values of each metric already in the file are kept and the
    new epochs appended; an epoch the file lacks (e.g. it was deleted) is
    `null`. A run starting at epoch 0 starts a new file. Values are what
    Keras's `History` records (with early stopping's `restore_best_weights`,
    still every epoch run).
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.history: dict[str, list] | None = None  # None until the first epoch of this process begins

    def _read(self) -> dict[str, list]:
        try:
            with open(self.path, encoding="utf-8") as f:
                recorded = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return recorded if isinstance(recorded, dict) else {}

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.history is None:
            kept = self._read() if epoch > 0 else {}
            self.history = {name: (list(values) + [None] * epoch)[:epoch]
                            for name, values in kept.items() if isinstance(values, list)}

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.history is None:
            self.on_epoch_begin(epoch)
        for name, value in (logs or {}).items():
            values = self.history.setdefault(name, [None] * epoch)
            values += [None] * (epoch - len(values))
            values.append(float(value))
        self._write()

    def _write(self) -> None:
        temporary = f"{self.path}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(self.history, f, indent=2)
        os.replace(temporary, self.path)

    def finish(self) -> dict[str, list]:
        """The run's history after `fit`, written to `path` (a run resumed after its last epoch ran none: the file's)."""
        if self.history is None:
            self.history = self._read()
        self._write()
        return self.history


class EpochCheckpoints(tf.keras.callbacks.Callback):
    """Writes the model's weights (no optimizer state) after each epoch; keeps the last `keep`."""

    def __init__(self, directory: str, keep: int = 3):
        super().__init__()
        self.directory = directory
        self.keep = keep
        self.manager = None

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.manager is None:
            self.manager = tf.train.CheckpointManager(self.model.weights_checkpoint(), self.directory, self.keep, checkpoint_name="epoch")
        self.manager.save(checkpoint_number=epoch + 1)


def load_model(run_dir: str, weights: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Que2EngageModel:
    """The trained model of a run directory (the final weights, or a given checkpoint).

    `overrides` (`--set` items) change the run's recorded config, e.g. its
    `index` section; the model's shape comes from the run and must not change.
    """
    from tf_q2e.config import load_config

    missing = [name for name in ("config.yaml", "model.json", os.path.join("model", "weights.index"))
               if not os.path.exists(os.path.join(run_dir, name))]
    if missing and weights is None:
        raise InputError(f"{run_dir}: not a trained run ({', '.join(missing)} missing); train one with q2e train --out {run_dir}")
    config = load_config(os.path.join(run_dir, "config.yaml"), overrides)
    with open(os.path.join(run_dir, "model.json"), encoding="utf-8") as f:
        meta = json.load(f)
    model = build_model(config, meta["image_dim"], tuple(meta["context_columns"]), jit_compile=False)  # serving: no XLA
    model.weights_checkpoint().read(weights or os.path.join(run_dir, "model", "weights")).assert_existing_objects_matched()
    model.attach_text_cache(config.train.text_cache or os.path.join(run_dir, TEXT_CACHE_DIR))
    return model


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
