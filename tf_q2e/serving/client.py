"""`ServingClient`: TensorFlow Serving's gRPC and REST APIs behind one small interface.

It talks to `q2e serve` and to a stock `tensorflow/serving` alike: gRPC through
the `tensorflow-serving-api` stubs, REST through `urllib`. Whatever the
protocol, `predict` takes and returns dicts of NumPy arrays (strings as
`bytes`), and a refused request raises `ServingError` with the server's gRPC
code and message.

Over REST the client first asks for the signature's metadata and then pins
the version it names, so outputs are typed (float32 stays float32) and a
single unnamed output gets its name, as over gRPC.

`predict_with_version` also says which version answered: over gRPC the
`model_spec.version` of the `PredictResponse`; over REST, whose predict
response carries no version (TF Serving's neither), the version the request
was pinned to.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tf_q2e.serving.errors import ServingError, code_of_http_status, code_of_number

FILTERED = "_filtered"  # the suffix of a retrieval signature's twin that takes the filter inputs
from tf_q2e.serving.protos import SIGNATURE_DEF_FIELD
from tf_q2e.serving.rest_json import decode_tensor, encode_tensor

PROTOCOLS = ("grpc", "rest")
SEARCH_OUTPUTS = ("product_ids", "scores", "product_titles")


class ServingClient:
    """A client for one TF Serving endpoint.

    Args:
        target: `host:port` (gRPC port 8500, REST port 8501 by default).
        protocol: "grpc" or "rest".
        timeout: seconds per call.
    """

    def __init__(self, target: str = "127.0.0.1:8500", protocol: str = "grpc", timeout: float = 10.0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.target = target
        self.protocol = protocol
        self.timeout = timeout
        self._channel: grpc.Channel | None = None
        if protocol == "grpc":
            options = [("grpc.max_receive_message_length", -1), ("grpc.enable_http_proxy", 0)]
            self._channel = grpc.insecure_channel(target, options=options)
            self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
            self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        # A loopback development server must not be reached through an HTTP proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def close(self) -> None:
        """Closes the gRPC channel."""
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def predict(
        self,
        model: str,
        inputs: Mapping[str, Any],
        signature: str = "serving_default",
        version: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs a signature on a batch.

        Args:
            model: the model name.
            inputs: input name -> array-like; strings may be `str` or `bytes`.
                Numeric inputs must have the signature's dtype over gRPC (e.g.
                `np.float32`), as with TF Serving.
            signature: the signature name.
            version: a loaded version, or None for the newest.

        Returns:
            Output name -> array (strings as `bytes` in object arrays).
        """
        return self.predict_with_version(model, inputs, signature, version)[0]

    def predict_with_version(
        self,
        model: str,
        inputs: Mapping[str, Any],
        signature: str = "serving_default",
        version: int | None = None,
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """`predict`, and the version of the model that answered.

        Over gRPC the version is the `PredictResponse.model_spec.version` the
        server reports (None if it reports none). TF Serving's REST predict
        response carries no version; over REST this client asks the
        metadata of `version` (None: the newest) first and posts to
        `/v1/models/<model>/versions/<v>:predict`, so the version returned is
        the one the request was pinned to (a server that has unloaded it in
        between answers NOT_FOUND, not another version).

        Returns:
            (outputs as `predict` returns them, version number or None).
        """
        arrays = {name: _as_array(name, value) for name, value in inputs.items()}
        if self.protocol == "grpc":
            return self._predict_grpc(model, arrays, signature, version)
        return self._predict_rest(model, arrays, signature, version)

    def metadata(self, model: str, version: int | None = None) -> dict:
        """The version's signatures.

        Returns:
            `{"model": name, "version": n, "signatures": {signature: {"inputs":
            {name: {"dtype": "string", "shape": [None]}}, "outputs": {...}}}}`.
        """
        if self.protocol == "grpc":
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
            _set_model_spec(request.model_spec, model, version=version)
            response = self._call(self._predictions.GetModelMetadata, request)
            signature_defs = get_model_metadata_pb2.SignatureDefMap()
            response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_defs)
            name, number = response.model_spec.name, response.model_spec.version.value
        else:
            document = self._rest("GET", _model_path(model, version) + "/metadata")
            found = document.get("metadata", {}).get(SIGNATURE_DEF_FIELD, {})
            signature_defs = _parse(found, get_model_metadata_pb2.SignatureDefMap())
            spec = document.get("model_spec", {})
            name, number = spec.get("name", model), int(spec.get("version", 0))
        return {"model": name, "version": number, "signatures": _signatures(signature_defs)}

    def status(self, model: str) -> list[dict]:
        """Every version the server knows of, newest first.

        Returns:
            `[{"version": 2, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}, ...]`.
        """
        if self.protocol == "grpc":
            request = get_model_status_pb2.GetModelStatusRequest()
            _set_model_spec(request.model_spec, model)
            response = self._call(self._models.GetModelStatus, request)
        else:
            response = _parse(self._rest("GET", _model_path(model, None)), get_model_status_pb2.GetModelStatusResponse())
        return [
            {
                "version": row.version,
                "state": get_model_status_pb2.ModelVersionStatus.State.Name(row.state),
                "error_code": code_of_number(row.status.error_code).name,
                "error_message": row.status.error_message,
            }
            for row in sorted(response.model_version_status, key=lambda row: -row.version)
        ]

    def search(
        self,
        model: str,
        queries: Sequence[str],
        k: int,
        signature: str = "retrieval_exact",
        context: Mapping[str, str | Sequence[str]] | None = None,
        filters=None,
    ) -> list[list[dict]]:
        """The top-k products per query from a retrieval signature.

        Args:
            model: the model name (e.g. `q2e`, or `q2e_scann` with `signature="retrieval"`).
            queries: the query texts, one batch row each.
            k: results per query, 1..K where K is fixed when the model is exported.
            signature: a signature with outputs `product_ids`, `scores`, `product_titles`.
            context: more query inputs (e.g. `{"query_country": "US"}`): one string
                for every query, or one per query. A `query_*` input that the
                signature declares and `context` leaves out gets "" (unknown).
            filters: a `tf_q2e.Filters` (or a mapping of its fields) for every query, or a
                list of one per query: the request goes to the signature's `_filtered` twin
                (`retrieval_exact_filtered`, `retrieval_filtered`) with the filter inputs.

        Returns:
            Per query, best first: `{"product_id": str, "title": str, "score": float}`,
            plus `"engagement_probability": float` when the signature has that output;
            places the index could not fill (product id "") are left out.

        Raises:
            ValueError: bad arguments, k above the exported K, or a signature
                without the retrieval outputs.
            ServingError: the server refused the request.
        """
        if isinstance(queries, (str, bytes)) or not queries:
            raise ValueError("queries must be a non-empty list of strings")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        inputs = {"query": list(queries), **_context_inputs(context or {}, len(queries))}
        from tf_q2e.filters import batch_arrays, per_query

        filters = per_query(filters, len(queries))
        if filters is not None:
            signature = signature if signature.endswith(FILTERED) else signature + FILTERED
            inputs.update(batch_arrays(filters))
        declared = self.metadata(model)["signatures"].get(signature, {}).get("inputs", {})
        for name in declared:
            if name.startswith("query_") and name not in inputs:
                inputs[name] = [""] * len(queries)
        outputs = self.predict(model, inputs, signature)
        missing = [name for name in SEARCH_OUTPUTS if name not in outputs]
        if missing:
            raise ValueError(
                f"signature '{signature}' of model '{model}' has no output '{missing[0]}'; "
                f"search needs a retrieval signature with outputs {', '.join(SEARCH_OUTPUTS)}"
            )
        exported_k = outputs["product_ids"].shape[1]
        if k > exported_k:
            raise ValueError(
                f"k={k} is more than the {exported_k} results signature '{signature}' of model '{model}' returns "
                f"(K is fixed at export); ask for k <= {exported_k} or export with a larger K"
            )
        probabilities = outputs.get("engagement_probability")
        results = []
        for row, (ids, titles, scores) in enumerate(zip(outputs["product_ids"], outputs["product_titles"], outputs["scores"])):
            hits = []
            for i in range(min(k, len(ids))):
                if not _text(ids[i]):
                    continue
                hit = {"product_id": _text(ids[i]), "title": _text(titles[i]), "score": float(scores[i])}
                if probabilities is not None:
                    hit["engagement_probability"] = float(probabilities[row][i])
                hits.append(hit)
            results.append(hits)
        return results

    def _predict_grpc(
        self, model: str, arrays: dict[str, np.ndarray], signature: str, version: int | None
    ) -> tuple[dict[str, np.ndarray], int | None]:
        request = predict_pb2.PredictRequest()
        _set_model_spec(request.model_spec, model, signature, version)
        for name, array in arrays.items():
            empty_text = array.dtype == object and array.size == 0  # no element says it is text
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=tf.string if empty_text else None))
        response = self._call(self._predictions.Predict, request)
        answered = response.model_spec.version.value if response.model_spec.HasField("version") else None
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}, answered

    def _predict_rest(
        self, model: str, arrays: dict[str, np.ndarray], signature: str, version: int | None
    ) -> tuple[dict[str, np.ndarray], int | None]:
        metadata = self.metadata(model, version)
        body = {"signature_name": signature, "inputs": {name: encode_tensor(array) for name, array in arrays.items()}}
        document = self._rest("POST", _model_path(model, metadata["version"]) + ":predict", body)
        outputs = metadata["signatures"].get(signature, {}).get("outputs", {})
        named = document.get("outputs")
        if not isinstance(named, dict) or len(outputs) == 1:
            named = {name: named for name in outputs}
        decoded = {name: _decode_output(name, value, outputs[name]) for name, value in named.items()}
        return decoded, metadata["version"] or None

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServingError(e.code(), e.details() or f"gRPC call to {self.target} failed") from None

    def _rest(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"http://{self.target}{path}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise ServingError(code_of_http_status(e.code), _error_message(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(reason, TimeoutError) else grpc.StatusCode.UNAVAILABLE
            raise ServingError(code, f"cannot reach {url}: {reason}") from None


def _as_array(name: str, value: Any) -> np.ndarray:
    """Input values as an array; text as an object array of UTF-8 bytes."""
    array = np.asarray(value)
    if array.dtype.kind not in "OSU":
        return array
    flat = [item.encode("utf-8") if isinstance(item, str) else item for item in array.ravel().tolist()]
    if not all(isinstance(item, bytes) for item in flat):
        raise ValueError(f"input '{name}' mixes strings with other values")
    return np.array(flat, dtype=object).reshape(array.shape)


def _decode_output(name: str, value: Any, spec: dict) -> np.ndarray:
    rank = None if spec["shape"] is None else len(spec["shape"])
    return decode_tensor(name, value, tf.as_dtype(spec["dtype"]), rank)


def _context_inputs(context: Mapping[str, str | Sequence[str]], batch: int) -> dict[str, list[str]]:
    inputs = {}
    for name, value in context.items():
        values = [value] * batch if isinstance(value, str) else list(value)
        if len(values) != batch:
            raise ValueError(f"context '{name}' has {len(values)} values for {batch} queries; give one, or one per query")
        inputs[name] = values
    return inputs


def _set_model_spec(spec: Any, model: str, signature: str = "", version: int | None = None) -> None:
    spec.name = model
    spec.signature_name = signature
    if version is not None:
        spec.version.value = version


def _model_path(model: str, version: int | None) -> str:
    path = f"/v1/models/{urllib.parse.quote(model, safe='')}"
    return path if version is None else f"{path}/versions/{int(version)}"


def _signatures(signature_defs: get_model_metadata_pb2.SignatureDefMap) -> dict:
    def tensors(infos: Mapping[str, Any]) -> dict:
        return {name: {"dtype": tf.as_dtype(info.dtype).name, "shape": _shape(info.tensor_shape)} for name, info in infos.items()}

    return {
        name: {"inputs": tensors(definition.inputs), "outputs": tensors(definition.outputs)}
        for name, definition in signature_defs.signature_def.items()
    }


def _shape(shape: Any) -> list[int | None] | None:
    """A TensorShapeProto as a list, None for unknown sizes; None for an unknown rank."""
    return None if shape.unknown_rank else [dim.size if dim.size >= 0 else None for dim in shape.dim]


def _parse(document: Any, message: Any) -> Any:
    try:
        return json_format.ParseDict(document, message, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise ServingError(grpc.StatusCode.UNKNOWN, f"unexpected answer from the server: {e}") from None


def _error_message(error: urllib.error.HTTPError) -> str:
    body = error.read()
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:500] or f"HTTP {error.code} {error.reason}"


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
