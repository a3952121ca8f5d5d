"""`import tf_q2e` makes TensorFlow use Keras 2, or says what to do."""

from __future__ import annotations

import os
import subprocess
import sys


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    environment.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_import_before_tensorflow_gives_keras_2():
    result = _python("import tf_q2e, tensorflow as tf; print(tf.keras.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras")


def test_import_after_tensorflow_with_keras_3_fails_with_the_fix():
    result = _python("import tensorflow as tf; tf.keras.layers; import tf_q2e")
    assert result.returncode != 0
    assert "TensorFlow was imported with Keras 3 before tf_q2e" in result.stderr
    assert "TF_USE_LEGACY_KERAS=1" in result.stderr


def test_environment_variable_set_against_keras_2_fails():
    result = _python("import tf_q2e", TF_USE_LEGACY_KERAS="0")
    assert result.returncode != 0 and "TF_USE_LEGACY_KERAS='0'" in result.stderr


def test_importing_the_package_does_not_import_tensorflow():
    result = _python("import sys, tf_q2e, tf_q2e.cli, tf_q2e.data.validate; print('tensorflow' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
