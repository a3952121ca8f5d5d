"""TensorFlow Serving's REST encoding of tensors as JSON, both ways.

The rules (TensorFlow Serving's "RESTful API" page):

* Row form: `{"signature_name": S, "instances": [...]}`, one list item per
  batch row; an item is an object naming every input, or, when the signature
  has exactly one input, the bare value. Answered with `{"predictions": [...]}`,
  one item per row: an object naming the outputs, or the bare value of a
  single output.
* Columnar form: `{"signature_name": S, "inputs": {name: batched value}}` (or
  the bare batched value for a single input). Answered with `{"outputs": ...}`,
  named the same way.
* A tensor is a nested list of its rank; strings are JSON strings (UTF-8) or
  `{"b64": "..."}` for arbitrary bytes, which is how bytes that are not UTF-8
  come back.

Decoding checks each value against the signature's dtype and rank as it walks
the list, so a wrong type or rank is reported naming the input.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_q2e.serving.errors import ServingError, invalid
from tf_q2e.serving.signatures import Limits, Signature, check_input_names, check_shapes, format_shape

_REQUEST_KEYS = {"signature_name", "instances", "inputs"}
_MAX_INFERRED_RANK = 32


def parse_json(body: bytes) -> Any:
    """The JSON document in a request body; INVALID_ARGUMENT when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise invalid(f"request body is not valid JSON: {e}") from None


def predict_request(document: Any) -> tuple[str, bool, Any]:
    """Splits a predict request into (signature name, row form?, instances or inputs)."""
    if not isinstance(document, dict):
        raise invalid('a predict request must be a JSON object: {"instances": [...]} or {"inputs": ...}')
    unknown = sorted(set(document) - _REQUEST_KEYS)
    if unknown:
        raise invalid(f"unknown key '{unknown[0]}' in the predict request (known: instances, inputs, signature_name)")
    if ("instances" in document) == ("inputs" in document):
        raise invalid("a predict request needs exactly one of 'instances' (row form) and 'inputs' (columnar form)")
    signature_name = document.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid("'signature_name' must be a string")
    row_format = "instances" in document
    return signature_name, row_format, document["instances" if row_format else "inputs"]


def decode_inputs(signature: Signature, row_format: bool, value: Any, limits: Limits) -> dict[str, np.ndarray]:
    """The request's tensors as arrays, checked against the signature and the limits."""
    named = _rows_to_columns(signature, value) if row_format else _named_inputs(signature, value)
    check_input_names(signature, named)
    arrays = {name: decode_tensor(name, named[name], spec.dtype, spec.shape.rank) for name, spec in signature.inputs.items()}
    check_shapes(signature, {name: array.shape for name, array in arrays.items()}, limits)
    return arrays


def _named_inputs(signature: Signature, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and not _is_b64(value):
        return value
    if len(signature.inputs) == 1:
        return {next(iter(signature.inputs)): value}
    raise invalid(f"'inputs' must be an object naming the inputs of signature '{signature.name}' ({_listing(signature)})")


def _rows_to_columns(signature: Signature, instances: Any) -> dict[str, list]:
    if not isinstance(instances, list):
        raise invalid("'instances' must be a list with one item per batch row")
    if not instances:
        raise invalid("empty batch: 'instances' is an empty list")
    if all(isinstance(row, dict) and not _is_b64(row) for row in instances):
        for index, row in enumerate(instances):
            _check_row_names(signature, index, row)
        return {name: [row[name] for row in instances] for name in instances[0]}
    if len(signature.inputs) == 1:
        return {next(iter(signature.inputs)): instances}
    raise invalid(f"each instance must be an object naming the inputs of signature '{signature.name}' ({_listing(signature)})")


def _check_row_names(signature: Signature, index: int, row: dict) -> None:
    try:
        check_input_names(signature, row)
    except ServingError as e:
        raise invalid(f"instance {index}: {e.message}") from None


def decode_tensor(name: str, value: Any, dtype: tf.DType, rank: int | None) -> np.ndarray:
    """A JSON nested list as an array of `dtype`; INVALID_ARGUMENT naming `name` otherwise."""
    convert = _converter(name, dtype)
    rank = _nesting_depth(name, value) if rank is None else rank
    shape: list[int | None] = [None] * rank
    flat: list = []
    _flatten(name, value, 0, shape, flat, convert)
    array = np.array(flat, dtype=object if dtype == tf.string else dtype.as_numpy_dtype)
    return array.reshape([size or 0 for size in shape])


def _flatten(name: str, value: Any, depth: int, shape: list[int | None], flat: list, convert: Callable[[Any], Any]) -> None:
    if depth == len(shape):
        if isinstance(value, list):
            raise invalid(f"input '{name}' must have rank {len(shape)}, but it nests lists deeper")
        flat.append(convert(value))
        return
    if not isinstance(value, list):
        raise invalid(f"input '{name}' must have rank {len(shape)}, but it has a {_json_type(value)} at depth {depth}")
    if shape[depth] is None:
        shape[depth] = len(value)
    elif shape[depth] != len(value):
        raise invalid(f"input '{name}' is ragged: lists at depth {depth} have lengths {shape[depth]} and {len(value)}")
    for item in value:
        _flatten(name, item, depth + 1, shape, flat, convert)


def _nesting_depth(name: str, value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
        if depth > _MAX_INFERRED_RANK:
            raise invalid(f"input '{name}' nests lists more than {_MAX_INFERRED_RANK} deep")
    return depth + isinstance(value, list)


def _converter(name: str, dtype: tf.DType) -> Callable[[Any], Any]:
    def fail(value: Any) -> Exception:
        return invalid(f"input '{name}' must hold {dtype.name} values, got a {_json_type(value)}: {_preview(value)}")

    def to_bytes(value: Any) -> bytes:
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")  # a lone surrogate passes through as bytes
        if _is_b64(value) and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except binascii.Error:
                raise invalid(f"input '{name}' has a 'b64' value that is not base64") from None
        raise fail(value)

    def to_number(value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (dtype.is_integer and not isinstance(value, int)):
            raise fail(value)
        if dtype.is_integer:
            if not dtype.min <= value <= dtype.max:
                raise invalid(f"input '{name}' value {value} is out of range for {dtype.name}")
            return value
        try:
            return float(value)
        except OverflowError:
            raise invalid(f"input '{name}' value {_preview(value)} is out of range for {dtype.name}") from None

    def to_bool(value: Any) -> bool:
        if not isinstance(value, bool):
            raise fail(value)
        return value

    if dtype == tf.string:
        return to_bytes
    if dtype == tf.bool:
        return to_bool
    if dtype.is_integer or dtype.is_floating:
        return to_number
    raise invalid(f"input '{name}' has dtype {dtype.name}, which this server's REST API does not decode")


def encode_predictions(outputs: Mapping[str, np.ndarray], row_format: bool) -> dict:
    """The response document: `{"predictions": ...}` (row form) or `{"outputs": ...}`."""
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": encode_tensor(next(iter(outputs.values())))}
        return {"outputs": {name: encode_tensor(array) for name, array in outputs.items()}}
    batches = {array.shape[0] if array.ndim else None for array in outputs.values()}
    if len(batches) != 1 or None in batches:
        raise invalid("the row form ('instances') needs outputs that share a batch dimension; send 'inputs' instead")
    columns = {name: encode_tensor(array) for name, array in outputs.items()}
    if len(columns) == 1:
        return {"predictions": next(iter(columns.values()))}
    return {"predictions": [{name: column[row] for name, column in columns.items()} for row in range(batches.pop())]}


def encode_tensor(array: np.ndarray) -> Any:
    """An array as JSON: nested lists; bytes as strings, or `{"b64": ...}` when not UTF-8."""
    if array.dtype.kind in "OSU":
        return _map_leaves(array.tolist(), _encode_bytes)
    return array.tolist()


def _encode_bytes(value: Any) -> Any:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode("ascii")}


def _map_leaves(value: Any, function: Callable[[Any], Any]) -> Any:
    if isinstance(value, list):
        return [_map_leaves(item, function) for item in value]
    return function(value)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _listing(signature: Signature) -> str:
    return ", ".join(f"{name} {spec.dtype.name} {format_shape(spec.shape)}" for name, spec in sorted(signature.inputs.items()))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "null" if value is None else "object"


def _preview(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
