"""tf_q2e: Que2Engage two-tower product search with TensorFlow Recommenders.

The public API (each name imported on first use, so `import tf_q2e` stays fast):

    config       Config, load_config(path=None, overrides=())
    data         tf_q2e.data.from_pandas(df), from_files(paths), from_dir(dir, split)
                 -> validated tf.data.Dataset of impression rows; FeatureSchema
    model        build_model(config, dataset_or_schema) -> Que2EngageModel (variables created;
                 with model.text_encoder minilm, model.fill_text_cache(dir, queries, catalog)
                 encodes each text once before fit);
                 QueryTower, ProductTower, ScaledSoftmaxRetrieval, EngagementBCE;
                 SparseAdam (lazy Adam for the hashed tables), EarlyStopping (falls back to
                 val_recall_at_1 when the engagement metrics are NaN: a click-only log),
                 HardNegativeCurriculum (Que2Search's stage 2 from model.hard_negative_from_epoch);
                 tf_q2e.data.with_mined_negatives(batches, file, catalog, per_row) adds `q2e mine`'s
                 negatives to training batches
    saving       save(model, dir), load(dir)
    search       Retriever.from_model / from_run / from_saved_model; .search(texts, k, filters=None) -> Hit
                 lists; Filters (allow-lists, excluded ids, crowding at lookup time)
    serving      export(retriever, base_dir): SavedModels in TensorFlow Serving's layout
    runs         update_index(run_dir, upsert=file, delete=ids): products added, replaced and removed
                 without a rebuild; mine_negatives(run_dir, source): hard negatives of the training
                 queries (what `q2e index --upsert/--delete` and `q2e mine` run)

Example (a user's own training script: examples/fit.py):
    import tf_q2e
    cfg = tf_q2e.load_config("configs/default.yaml")
    train = tf_q2e.data.from_dir("data", split="train")
    model = tf_q2e.build_model(cfg, train)
    model.compile(optimizer=tf_q2e.SparseAdam(cfg.train.learning_rate))
    model.fit(train.shuffle(100_000).batch(768, drop_remainder=True), epochs=2)
    tf_q2e.Retriever.from_model(model, "data/catalog.parquet").search(["grey jute rug"], k=5)

Importing this package makes TensorFlow use Keras 2 (`tf-keras`), which
TensorFlow Recommenders needs: it sets `TF_USE_LEGACY_KERAS=1` before
TensorFlow is first imported. It does not import TensorFlow itself, so the data
commands start fast.

If TensorFlow was already imported with Keras 3 (the environment variable was
unset at that time), the import fails with `ImportError` saying what to do.
"""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"

_LEGACY_KERAS = "TF_USE_LEGACY_KERAS"


def _keras_3_already_active() -> bool:
    """True if TensorFlow is imported and its `tf.keras` is Keras 3."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    # TensorFlow decides between Keras 2 and 3 on its first `tf.keras` access,
    # from the environment variable. Once decided, `tf.keras` names its module.
    os.environ.setdefault(_LEGACY_KERAS, "1")
    keras_module = getattr(getattr(tf, "keras", None), "__name__", "")
    return not keras_module.startswith("tf_keras")


def _ensure_legacy_keras() -> None:
    value = os.environ.get(_LEGACY_KERAS)
    if value is not None and value.strip().lower() not in ("1", "true"):
        raise ImportError(
            f"tf_q2e needs Keras 2 (tf-keras), but {_LEGACY_KERAS}={value!r}. "
            f"Unset it or set {_LEGACY_KERAS}=1 before starting Python."
        )
    if _keras_3_already_active():
        raise ImportError(
            "tf_q2e needs Keras 2 (tf-keras), but TensorFlow was imported with Keras 3 before tf_q2e. "
            f"Import tf_q2e before tensorflow, or set {_LEGACY_KERAS}=1 in the environment before starting Python."
        )
    os.environ[_LEGACY_KERAS] = "1"


_ensure_legacy_keras()


# name -> module of the public API, imported on first access (PEP 562).
_PUBLIC = {
    "Config": "tf_q2e.config",
    "load_config": "tf_q2e.config",
    "Que2EngageModel": "tf_q2e.model",
    "build_model": "tf_q2e.model",
    "QueryTower": "tf_q2e.towers",
    "ProductTower": "tf_q2e.towers",
    "ScaledSoftmaxRetrieval": "tf_q2e.tasks",
    "EngagementBCE": "tf_q2e.tasks",
    "SparseAdam": "tf_q2e.optimizers",
    "EarlyStopping": "tf_q2e.callbacks",
    "HardNegativeCurriculum": "tf_q2e.callbacks",
    "save": "tf_q2e.saving",
    "load": "tf_q2e.saving",
    "Retriever": "tf_q2e.search",
    "Hit": "tf_q2e.search",
    "Filters": "tf_q2e.filters",
    "export": "tf_q2e.savedmodels",
    "update_index": "tf_q2e.updates",
    "mine_negatives": "tf_q2e.mining",
}

__all__ = ["__version__", "data", *_PUBLIC]


def __getattr__(name: str):
    if name == "data":
        import importlib

        return importlib.import_module("tf_q2e.data")
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tf_q2e' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
