"""TensorFlow Serving's gRPC services: PredictionService and ModelService.

Implemented: `Predict`, `GetModelMetadata` and `GetModelStatus`. The other
methods (`Classify`, `Regress`, `MultiInference`, `HandleReloadConfigRequest`)
answer UNIMPLEMENTED. A refused request aborts with its `ServingError` code;
an unexpected failure is logged here and answered INTERNAL without details,
so no Python traceback reaches a client.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tf_q2e.serving.errors import ServingError
from tf_q2e.serving.protos import metadata_response, predict, requested_version, status_response
from tf_q2e.serving.registry import ModelRegistry
from tf_q2e.serving.signatures import Limits

_Response = TypeVar("_Response")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService`: Predict and GetModelMetadata."""

    def __init__(self, registry: ModelRegistry, limits: Limits, log: Callable[[str], None]) -> None:
        self._registry = registry
        self._limits = limits
        self._log = log

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        def answer() -> predict_pb2.PredictResponse:
            spec = request.model_spec
            servable = self._registry.servable(spec.name, requested_version(spec))
            return predict(servable, request, self._limits)

        return _answer(context, self._log, answer)

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        def answer() -> get_model_metadata_pb2.GetModelMetadataResponse:
            spec = request.model_spec
            servable = self._registry.servable(spec.name, requested_version(spec))
            return metadata_response(servable, list(request.metadata_field))

        return _answer(context, self._log, answer)

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        _unimplemented(context, "Classify")

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:
        _unimplemented(context, "Regress")

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:
        _unimplemented(context, "MultiInference")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService`: GetModelStatus."""

    def __init__(self, registry: ModelRegistry, log: Callable[[str], None]) -> None:
        self._registry = registry
        self._log = log

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        def answer() -> get_model_status_pb2.GetModelStatusResponse:
            spec = request.model_spec
            return status_response(self._registry.statuses(spec.name, requested_version(spec)))

        return _answer(context, self._log, answer)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:
        _unimplemented(context, "HandleReloadConfigRequest (this server rescans the model base by itself)")


def _answer(context: grpc.ServicerContext, log: Callable[[str], None], compute: Callable[[], _Response]) -> _Response:
    try:
        return compute()
    except ServingError as e:
        context.abort(e.code, e.message)
    except Exception:  # noqa: BLE001 - a server thread must answer, not die
        log(f"internal error in a gRPC request:\n{traceback.format_exc()}")
        context.abort(grpc.StatusCode.INTERNAL, "internal server error; the server log has the details")


def _unimplemented(context: grpc.ServicerContext, method: str) -> None:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this development server")
