"""Loading one SavedModel version: ScaNN's ops, the signatures, warm-up replay.

A version is ready to serve only once it is loaded *and* warmed up: TensorFlow
Serving replays the `PredictionLog` records in
`assets.extra/tf_serving_warmup_requests` before a version takes traffic, so the
first real requests do not pay for tracing and lazy initialisation. A version
whose warm-up fails does not serve, as in TensorFlow Serving.

Models need custom TensorFlow ops beyond TensorFlow's own: ScaNN's (a ScaNN
index), registered by importing `scann`, and tensorflow-text's classic
WordPiece ops (a pretrained text encoder, `model.text_encoder: minilm`),
registered by importing `tensorflow_text`, which TensorFlow Serving's model
server links too. When an import fails the other models still load; a model
needing the missing ops then fails with a message that says so.
"""

from __future__ import annotations

import functools
import importlib
import os

import grpc
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import prediction_log_pb2

from tf_q2e.serving.errors import ServingError, code_of_number
from tf_q2e.serving.protos import predict
from tf_q2e.serving.signatures import Limits, Servable, Signature, model_error_message

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TensorFlow Serving's limit


class LoadError(ServingError):
    """A version that cannot serve; its message goes into the model's status."""


def load_servable(model: str, version: int, path: str, limits: Limits) -> tuple[Servable, int]:
    """Loads and warms up one version.

    Returns:
        The servable and the number of warm-up requests replayed.

    Raises:
        LoadError: the SavedModel does not load, has no usable signature, or a
            warm-up request fails.
    """
    scann_problem = _register_ops()
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:  # noqa: BLE001 - any load failure is reported in the status
        raise _load_failure(e, scann_problem) from e
    try:
        signatures = {name: Signature.from_function(name, fn) for name, fn in loaded.signatures.items()}
    except ValueError as e:
        raise LoadError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
    if not signatures:
        raise LoadError(grpc.StatusCode.INVALID_ARGUMENT, f"the SavedModel at {path} has no signatures")
    servable = Servable(model, version, path, signatures, loaded)
    return servable, replay_warmup(servable, limits)


# The modules whose import registers the custom ops an exported model may use.
OP_MODULES = ("scann", "tensorflow_text")


@functools.cache
def _register_ops() -> str | None:
    """Imports scann and tensorflow_text, which register their TF ops; returns why one could not, or None."""
    problems = []
    for module in OP_MODULES:
        try:
            importlib.import_module(module)  # for its side effect: registering its ops
        except Exception as e:  # noqa: BLE001 - a broken install must not stop the other models
            problems.append(f"`import {module}` failed ({type(e).__name__}: {e})")
    return "; ".join(problems) or None


def _load_failure(error: Exception, scann_problem: str | None) -> LoadError:
    code = code_of_number(getattr(error, "error_code", None))
    message = f"tf.saved_model.load failed: {model_error_message(error)}"
    if "Op type not registered" in message:
        reason = scann_problem or "they are not registered"
        message += (f". This model needs custom ops (ScaNN's for a ScaNN index, tensorflow-text's for a pretrained "
                    f"text encoder) but {reason}; install scann[tf] and tensorflow-text")
    return LoadError(code, message)


def replay_warmup(servable: Servable, limits: Limits) -> int:
    """Replays the version's warm-up `PredictionLog`s (TFRecord); returns how many."""
    path = os.path.join(servable.path, WARMUP_FILE)
    if not os.path.isfile(path):
        return 0
    number = 0
    try:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            number += 1
            if number > MAX_WARMUP_RECORDS:
                raise LoadError(grpc.StatusCode.INVALID_ARGUMENT, f"{WARMUP_FILE} has more than {MAX_WARMUP_RECORDS} records")
            _replay(servable, number, record, limits)
    except tf.errors.OpError as e:
        raise LoadError(
            grpc.StatusCode.DATA_LOSS,
            f"{WARMUP_FILE} is not a readable TFRecord file after record {number}: {model_error_message(e)}",
        ) from e
    return number


def _replay(servable: Servable, number: int, record: bytes, limits: Limits) -> None:
    where = f"warm-up record {number} of {WARMUP_FILE}"
    try:
        log = prediction_log_pb2.PredictionLog.FromString(record)
    except DecodeError as e:
        raise LoadError(grpc.StatusCode.INVALID_ARGUMENT, f"{where} is not a PredictionLog") from e
    kind = log.WhichOneof("log_type")
    if kind != "predict_log":
        raise LoadError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{where} is a {kind or 'empty'} record; this server replays predict_log only"
        )
    try:
        predict(servable, log.predict_log.request, limits)
    except ServingError as e:
        raise LoadError(e.code, f"{where} failed: {e.message}") from e
