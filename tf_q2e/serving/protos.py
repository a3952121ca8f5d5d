"""TensorFlow Serving's protocol buffers in and out: Predict, metadata and status.

The gRPC services answer with these messages, the REST API renders the same
messages as JSON (as TensorFlow Serving does), and warm-up replays logged
`PredictRequest`s through `predict`, so all three share one code path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from google.protobuf.message import Message
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from tf_q2e.serving.errors import ServingError, invalid
from tf_q2e.serving.signatures import Limits, Servable, Signature, check_dtype, check_input_names, check_shapes, run

PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_FIELD = "signature_def"


@dataclass(frozen=True)
class VersionStatus:
    """One row of a model's status.

    Attributes:
        version: the version number.
        state: a `ModelVersionStatus.State` name: LOADING, AVAILABLE or END.
        error: why the version is not serving, when it failed to load.
    """

    version: int
    state: str
    error: ServingError | None = None


def requested_version(spec: model_pb2.ModelSpec) -> int | None:
    """The version a request names, or None for the newest."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        raise invalid("version labels are not supported by this server; name a version number")
    return spec.version.value if choice == "version" else None


def predict(servable: Servable, request: predict_pb2.PredictRequest, limits: Limits) -> predict_pb2.PredictResponse:
    """Checks a PredictRequest against the signature, runs it, and builds the response."""
    signature = servable.signature(request.model_spec.signature_name)
    arrays = arrays_from_protos(signature, request.inputs, limits)
    unknown = sorted(set(request.output_filter) - set(signature.outputs))
    if unknown:
        raise invalid(f"output_filter names '{unknown[0]}', which signature '{signature.name}' does not output")
    outputs = run(signature, arrays)
    response = predict_pb2.PredictResponse()
    _fill_model_spec(response.model_spec, servable, signature.name)
    for name in request.output_filter or outputs:
        response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
    return response


def arrays_from_protos(
    signature: Signature, protos: Mapping[str, tensor_pb2.TensorProto], limits: Limits
) -> dict[str, np.ndarray]:
    """Request TensorProtos as arrays, after checking names, dtypes and declared shapes."""
    check_input_names(signature, protos)
    for name, proto in protos.items():
        check_dtype(signature, name, _dtype_of(name, proto))
    check_shapes(signature, {name: _shape_of(name, proto) for name, proto in protos.items()}, limits)
    return {name: _to_array(name, proto) for name, proto in protos.items()}


def _dtype_of(name: str, proto: tensor_pb2.TensorProto) -> tf.DType:
    try:
        return tf.dtypes.as_dtype(proto.dtype)
    except TypeError:
        raise invalid(f"input '{name}' has no valid dtype (enum value {proto.dtype})") from None


def _shape_of(name: str, proto: tensor_pb2.TensorProto) -> tuple[int, ...]:
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"input '{name}' has an unknown rank; give its shape")
    return tuple(dim.size for dim in proto.tensor_shape.dim)


def _to_array(name: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # noqa: BLE001 - any malformed content is the request's problem
        raise invalid(f"input '{name}' is not a valid TensorProto: {e}") from None


def metadata_response(servable: Servable, fields: Sequence[str]) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadata: the version's signatures as a `SignatureDefMap`, like TF Serving."""
    if not fields:
        raise invalid(f"GetModelMetadataRequest must name a metadata_field ('{SIGNATURE_DEF_FIELD}')")
    for field in fields:
        if field != SIGNATURE_DEF_FIELD:
            raise invalid(f"metadata field '{field}' is not supported; ask for '{SIGNATURE_DEF_FIELD}'")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    _fill_model_spec(response.model_spec, servable)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map(servable))
    return response


def metadata_json(servable: Servable) -> dict:
    """The REST metadata document: TF Serving's JSON rendering of GetModelMetadataResponse."""
    model_spec = model_pb2.ModelSpec()
    _fill_model_spec(model_spec, servable)
    return {"model_spec": to_json(model_spec), "metadata": {SIGNATURE_DEF_FIELD: to_json(signature_def_map(servable))}}


def signature_def_map(servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
    """Every signature of a version as SignatureDefs (dtype and shape per tensor)."""
    result = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in sorted(servable.signatures.items()):
        definition = result.signature_def[name]
        definition.method_name = PREDICT_METHOD
        for key, spec in signature.inputs.items():
            definition.inputs[key].CopyFrom(_tensor_info(spec, signature.input_tensor_names[key]))
        for key, spec in signature.outputs.items():
            definition.outputs[key].CopyFrom(_tensor_info(spec, signature.output_tensor_names.get(key, "")))
    return result


def _tensor_info(spec: tf.TensorSpec, tensor_name: str) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(
        name=tensor_name, dtype=spec.dtype.as_datatype_enum, tensor_shape=spec.shape.as_proto()
    )


def status_response(statuses: Iterable[VersionStatus]) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus: one row per version, with the load error where there is one."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in statuses:
        row = response.model_version_status.add()
        row.version = status.version
        row.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
        row.status.SetInParent()  # error_code OK, as TF Serving reports a healthy version
        if status.error is not None:
            row.status.error_code = status.error.code.value[0]
            row.status.error_message = status.error.message
    return response


def to_json(message: Message) -> dict:
    """A message as TensorFlow Serving's REST API renders it (field names kept, defaults shown)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _fill_model_spec(spec: model_pb2.ModelSpec, servable: Servable, signature_name: str = "") -> None:
    spec.name = servable.model
    spec.version.value = servable.version
    spec.signature_name = signature_name
