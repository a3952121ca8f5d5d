"""tf_q2e: Que2Engage two-tower product search with TensorFlow Recommenders.

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
