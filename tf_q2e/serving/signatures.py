"""A SavedModel signature as the server sees it, and the checks a request must pass.

TensorFlow Serving checks a request's tensors against the SignatureDef before it
runs the graph, so that a malformed request gets INVALID_ARGUMENT naming the
input instead of an error from deep inside the graph. This module does the same
from what a loaded concrete function declares (`structured_input_signature`,
`structured_outputs`), so the server needs no knowledge of any model: it serves
whatever signatures a SavedModel has.

The checks work on declared dtypes and shapes, before any tensor is built, so a
tiny request that declares a huge shape cannot make the server allocate it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from tf_q2e.serving.errors import invalid, not_found

DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class Limits:
    """Bounds on one request.

    Attributes:
        max_batch: most rows (dimension 0) a request may carry.
        max_request_bytes: most bytes of one request body or message; also the
            most elements one input tensor may declare (every element costs at
            least a byte on the wire, so no honest request needs more).
    """

    max_batch: int
    max_request_bytes: int


@dataclass(frozen=True)
class Signature:
    """One named signature: its inputs and outputs, and the function to call.

    Attributes:
        name: the signature key, e.g. `retrieval_exact`.
        inputs: input name -> `tf.TensorSpec` (dtype and shape, `None` = any).
        outputs: output name -> `tf.TensorSpec`.
        input_tensor_names: input name -> graph tensor name (for metadata).
        output_tensor_names: output name -> graph tensor name (for metadata).
        function: called with the inputs as keyword arguments; returns a dict of
            tensors keyed like `outputs`.
    """

    name: str
    inputs: Mapping[str, tf.TensorSpec]
    outputs: Mapping[str, tf.TensorSpec]
    input_tensor_names: Mapping[str, str]
    output_tensor_names: Mapping[str, str]
    function: Callable[..., Mapping[str, tf.Tensor]]

    @classmethod
    def from_function(cls, name: str, function: Any) -> Signature:
        """Reads a loaded SavedModel's concrete function (`loaded.signatures[name]`)."""
        args, kwargs = function.structured_input_signature
        outputs = function.structured_outputs
        if args or not isinstance(outputs, Mapping):
            raise ValueError(f"signature '{name}' must take and return named tensors (a SavedModel signature does)")
        inputs = {key: tf.TensorSpec(spec.shape, spec.dtype, key) for key, spec in kwargs.items()}
        output_specs = {key: tf.TensorSpec(value.shape, value.dtype, key) for key, value in outputs.items()}
        # A concrete function's `outputs` are its flattened structured outputs: dict keys sorted.
        input_tensor_names = {key: f"{spec.name or key}:0" for key, spec in kwargs.items()}
        output_tensor_names = dict(zip(sorted(outputs), (tensor.name for tensor in function.outputs)))
        return cls(name, inputs, output_specs, input_tensor_names, output_tensor_names, function)


@dataclass(frozen=True)
class Servable:
    """One loaded version of one model, ready to answer requests.

    Attributes:
        model: the model name requests use.
        version: the version number (its directory name).
        path: the SavedModel directory.
        signatures: signature name -> `Signature`.
        saved_model: the object `tf.saved_model.load` returned; holding it keeps
            the variables alive while any request still uses this version.
    """

    model: str
    version: int
    path: str
    signatures: Mapping[str, Signature]
    saved_model: Any

    def signature(self, name: str) -> Signature:
        """The named signature (`serving_default` for an empty name), or NOT_FOUND."""
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise not_found(
                f"model '{self.model}' version {self.version} has no signature '{name}' "
                f"(it has: {_names(self.signatures)})"
            )
        return self.signatures[name]


def check_input_names(signature: Signature, names: Iterable[str]) -> None:
    """INVALID_ARGUMENT unless `names` are exactly the signature's inputs."""
    given = set(names)
    missing = sorted(set(signature.inputs) - given)
    unexpected = sorted(given - set(signature.inputs))
    takes = f"signature '{signature.name}' takes: {_names(signature.inputs)}"
    if missing:
        raise invalid(f"missing input {_names(missing)} ({takes})")
    if unexpected:
        raise invalid(f"unexpected input {_names(unexpected)} ({takes})")


def check_dtype(signature: Signature, name: str, dtype: tf.DType) -> None:
    """INVALID_ARGUMENT unless input `name` is given with the signature's dtype."""
    expected = signature.inputs[name].dtype
    if dtype != expected:
        raise invalid(f"input '{name}' must be {expected.name}, got {dtype.name}")


def check_shapes(signature: Signature, shapes: Mapping[str, Sequence[int]], limits: Limits) -> None:
    """INVALID_ARGUMENT unless every input's shape fits its spec and the batch is sane.

    The batch is dimension 0 of every input of rank >= 1: they must agree, and
    it must be neither empty nor larger than `limits.max_batch`.
    """
    for name, shape in shapes.items():
        _check_shape(name, signature.inputs[name].shape, shape, limits)
    batches = {name: shape[0] for name, shape in shapes.items() if len(shape) > 0}
    if len(set(batches.values())) > 1:
        sizes = ", ".join(f"'{name}' {size}" for name, size in sorted(batches.items()))
        raise invalid(f"inputs have different batch sizes (dimension 0): {sizes}")
    if not batches:
        return
    name, batch = min(batches.items())
    if batch == 0:
        raise invalid(f"empty batch: input '{name}' has 0 rows")
    if batch > limits.max_batch:
        raise invalid(
            f"batch of {batch} rows (input '{name}') is more than this server's limit of {limits.max_batch}; "
            "split the request"
        )


def _check_shape(name: str, spec: tf.TensorShape, shape: Sequence[int], limits: Limits) -> None:
    expected = format_shape(spec)
    if spec.rank is not None and len(shape) != spec.rank:
        raise invalid(f"input '{name}' must have rank {spec.rank} (shape {expected}), got shape {list(shape)}")
    if any(size < 0 for size in shape):
        raise invalid(f"input '{name}' has a negative dimension: shape {list(shape)}")
    if spec.rank is not None:
        for axis, (want, got) in enumerate(zip(spec.as_list(), shape)):
            if want is not None and want != got:
                raise invalid(
                    f"input '{name}' must have shape {expected}, got {list(shape)} (dimension {axis} is {got}, not {want})"
                )
    elements = math.prod(shape)
    if elements > limits.max_request_bytes:
        raise invalid(f"input '{name}' declares {elements} elements, more than this server accepts in one request")


def run(signature: Signature, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calls the signature on checked inputs; any failure becomes INVALID_ARGUMENT."""
    try:
        tensors = {name: tf.constant(array, dtype=signature.inputs[name].dtype) for name, array in arrays.items()}
        outputs = signature.function(**tensors)
        return {name: tensor.numpy() for name, tensor in outputs.items()}
    except Exception as e:  # noqa: BLE001 - whatever the graph raises is the request's problem
        raise invalid(f"signature '{signature.name}' failed: {model_error_message(e)}") from e


_NOISE = re.compile(r"^(Graph execution error:|Detected at node|<stack traces unavailable>|File \"|\[\[)")
_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\]\s*$")


def model_error_message(error: Exception) -> str:
    """The message of an error raised inside a model call, without graph stack traces."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not _NOISE.match(line)]
    return _OP_SUFFIX.sub("", " ".join(kept)) or type(error).__name__


def format_shape(shape: tf.TensorShape) -> str:
    """`[None, 3]`, or `unknown` for an unknown rank."""
    return "unknown" if shape.rank is None else str(shape.as_list())


def _names(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in sorted(names)) or "nothing"
