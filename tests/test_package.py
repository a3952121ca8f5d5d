"""`import tf_q2e` makes TensorFlow use Keras 2, or says what to do."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tf_q2e")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    environment.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


@pytest.mark.slow
def test_import_before_tensorflow_gives_keras_2():
    result = _python("import tf_q2e, tensorflow as tf; print(tf.keras.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras")


@pytest.mark.slow
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


# What would run code from data: unpickling (pickle, NumPy's allow_pickle, marshal, shelve, joblib,
# dill), eval/exec, and yaml.load with a loader other than SafeLoader.
UNSAFE = re.compile(r"\bpickle\b|\bmarshal\b|\bshelve\b|\bjoblib\b|\bdill\b|(?<![.\w])(eval|exec)\s*\("
                    r"|yaml\.(load|load_all|unsafe_load|full_load)\s*\(|allow_pickle\s*=\s*True")


def test_the_package_neither_unpickles_nor_evals_its_input():
    """A static check of every module: none of the calls that run code from data, and every np.load says
    allow_pickle=False (its default; said explicitly, so a later change has to remove it)."""
    found, np_loads = [], 0
    for root, _, files in os.walk(PACKAGE):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    code = line.split("#", 1)[0]
                    if UNSAFE.search(code):
                        found.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
                    if re.search(r"\bnp\.load\s*\(", code):
                        np_loads += 1
                        if "allow_pickle=False" not in code:
                            found.append(f"{os.path.relpath(path, PACKAGE)}:{number}: np.load without allow_pickle=False")
    assert found == []
    assert np_loads >= 1  # the check sees the one np.load there is (tf_q2e/index.py)
