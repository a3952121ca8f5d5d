"""Saving and loading a model without a run directory: its Keras config and its weights.

    tf_q2e.save(model, "my_model")    # my_model/model.json, my_model/weights.*
    model = tf_q2e.load("my_model")   # a Que2EngageModel with its weights, ready for search, export or fit

`model.json` holds `{"format": "tf_q2e.model/1", "model": model.get_config()}`
(the resolved `Config`, `image_dim`, the context columns, the seed): plain
JSON, checked like a YAML config when read. The weights are a
`tf.train.Checkpoint` of the towers and the engagement task (no optimizer
slots; compile again to train further). Nothing is unpickled. `q2e train`
writes `RUN/model/` in this layout, so `tf_q2e.load("RUN/model")` loads a
run's final model.

A loaded model is rebuilt from its config and traced afresh, so it is the same
Python class with the same methods, not a SavedModel's restored functions
(for stock TensorFlow Serving, export it: `tf_q2e.export`).
"""

from __future__ import annotations

import json
import os

from tf_q2e.errors import InputError

FORMAT = "tf_q2e.model/1"
CONFIG_FILE = "model.json"
WEIGHTS = "weights"


def save(model, directory: str) -> str:
    """Writes `model` (a built `Que2EngageModel`) to `directory` (created if missing); returns it.

    Example:
        tf_q2e.save(model, "my_model")
        same = tf_q2e.load("my_model")  # same outputs as `model`
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "model": model.get_config()}, f, indent=2)
    model.weights_checkpoint().write(os.path.join(directory, WEIGHTS))
    os.replace(temporary, path)  # last: a directory with model.json has its weights
    return directory


def load(directory: str, jit_compile: bool = False):
    """The `Que2EngageModel` saved in `directory` (by `save`, or a run's `RUN/model/`), weights read.

    `jit_compile` XLA-compiles the towers' dense parts (for training on GPUs); off by default, as for serving.
    Raises `InputError` naming the path when the directory holds no saved model.
    """
    from tf_q2e.model import Que2EngageModel

    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        hint = (f"; a run directory's model is in {os.path.join(directory, 'model')}"
                if os.path.exists(os.path.join(directory, "config.yaml")) else "")
        raise InputError(f"{directory}: no saved model ({path} is missing){hint}")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise InputError(f"{path}: format {found!r} is not {FORMAT!r}; save the model with tf_q2e.save")
    config = dict(saved["model"], jit_compile=jit_compile)
    model = Que2EngageModel.from_config(config).build_from_schema()
    weights = os.path.join(directory, WEIGHTS)
    if not os.path.exists(weights + ".index"):
        raise InputError(f"{directory}: the weights ({weights}.index) are missing")
    model.weights_checkpoint().read(weights).assert_existing_objects_matched().expect_partial()
    return model
