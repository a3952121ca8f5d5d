"""Impression data: the schema, readers, validation, adapters, the synthetic marketplace, `tf.data` pipelines.

The public data API for a user's own `model.fit` script (see `datasets.py`):

    from tf_q2e.data import FeatureSchema, from_dir, from_files, from_pandas
    from tf_q2e.data import with_mined_negatives   # mined hard negatives (`q2e mine`) on batches

These names are imported on first use, so `import tf_q2e.data` (and the data
commands, such as `q2e synth`) do not import TensorFlow.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "FeatureSchema": "tf_q2e.data.datasets",
    "from_dir": "tf_q2e.data.datasets",
    "from_files": "tf_q2e.data.datasets",
    "from_pandas": "tf_q2e.data.datasets",
    "MinedNegatives": "tf_q2e.data.mined",
    "with_mined_negatives": "tf_q2e.data.mined",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
