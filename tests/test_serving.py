"""The development server and its client: both protocols, version swaps, bad requests.

The tests build tiny SavedModels themselves: a 5-product catalogue in 2-d whose
query vector is `[len(query) + len(query_country), 1]`, retrieving K=3 by dot
product, so every expected result comes from a NumPy reference here.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tensorflow as tf  # conftest imported tf_q2e first, so this is TF with Keras 2
from scann.scann_ops.py import scann_ops
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from tf_q2e.errors import InputError
from tf_q2e.serving import commands, loader, registry as registry_module
from tf_q2e.serving.client import ServingClient
from tf_q2e.serving.errors import ServingError
from tf_q2e.serving.registry import ModelRegistry
from tf_q2e.serving.server import ModelServer
from tf_q2e.serving.signatures import Limits

PRODUCT_VECTORS = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [-1.0, 3.0], [0.5, 0.5]], np.float32)
TITLES = [b"red sofa", b"blue bike", b"desk lamp", b"oak table", b"caf\xe9 chair"]  # the last is not UTF-8
K = 3
MAX_BATCH = 8
MAX_REQUEST_BYTES = 64 << 10
QUERY = tf.TensorSpec([None], tf.string, name="query")


class TinyQ2E(tf.Module):
    """The exported signatures of a Que2Engage model, over a 5-product catalogue."""

    def __init__(self, id_prefix: str) -> None:
        super().__init__()
        self.product_vectors = tf.Variable(PRODUCT_VECTORS)
        self.product_ids = tf.constant([f"{id_prefix}{i}" for i in range(len(TITLES))])
        self.product_titles = tf.constant(TITLES)
        self.calls = tf.Variable(0, dtype=tf.int64)

    def _query_vectors(self, query: tf.Tensor, extra_length: tf.Tensor | int = 0) -> tf.Tensor:
        length = tf.cast(tf.strings.length(query) + extra_length, tf.float32)
        return tf.stack([length, tf.ones_like(length)], axis=1)  # [B, 2]

    def _top_k(self, query_vectors: tf.Tensor) -> dict[str, tf.Tensor]:
        self.calls.assign_add(1)
        top = tf.math.top_k(tf.matmul(query_vectors, self.product_vectors, transpose_b=True), k=K)
        return {
            "product_ids": tf.gather(self.product_ids, top.indices),  # [B, K]
            "scores": top.values,  # [B, K]
            "product_titles": tf.gather(self.product_titles, top.indices),  # [B, K]
        }

    @tf.function(input_signature=[QUERY])
    def query_encoder(self, query: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"embedding": self._query_vectors(query)}

    @tf.function(input_signature=[QUERY])
    def retrieval_exact(self, query: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._top_k(self._query_vectors(query))

    @tf.function(input_signature=[QUERY, tf.TensorSpec([None], tf.string, name="query_country")])
    def retrieval_context(self, query: tf.Tensor, query_country: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._top_k(self._query_vectors(query, tf.strings.length(query_country)))

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="product_title"),
            tf.TensorSpec([None], tf.string, name="product_description"),
            tf.TensorSpec([None], tf.string, name="product_category"),
            tf.TensorSpec([None, 2], tf.float32, name="product_image_embedding"),
        ]
    )
    def product_encoder(self, product_title, product_description, product_category, product_image_embedding):
        image = tf.debugging.check_numerics(product_image_embedding, "product_image_embedding has NaN or Inf")
        length = tf.cast(tf.strings.length(product_title + product_description + product_category), tf.float32)
        return {"embedding": image * length[:, None]}  # [B, 2]

    @tf.function(input_signature=[QUERY])
    def call_count(self, query: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"count": tf.fill(tf.shape(query), self.calls.read_value())}


def save_model(path: str, id_prefix: str) -> str:
    module = TinyQ2E(id_prefix)
    signatures = {
        "serving_default": module.retrieval_exact,
        "retrieval_exact": module.retrieval_exact,
        "retrieval_context": module.retrieval_context,
        "query_encoder": module.query_encoder,
        "product_encoder": module.product_encoder,
        "call_count": module.call_count,
    }
    tf.saved_model.save(module, path, signatures=signatures)
    return path


class TinyScannQ2E(tf.Module):
    """The ScaNN retrieval model: the same catalogue behind a brute-force ScaNN searcher."""

    def __init__(self) -> None:
        super().__init__()
        self.searcher = scann_ops.builder(PRODUCT_VECTORS, K, "dot_product").score_brute_force().build().serialize_to_module()
        self.product_ids = tf.constant([f"P{i}" for i in range(len(TITLES))])
        self.product_titles = tf.constant(TITLES)

    @tf.function(input_signature=[QUERY])
    def retrieval(self, query: tf.Tensor) -> dict[str, tf.Tensor]:
        length = tf.cast(tf.strings.length(query), tf.float32)
        query_vectors = tf.stack([length, tf.ones_like(length)], axis=1)  # [B, 2]
        indices, scores = scann_ops.searcher_from_module(self.searcher).search_batched(query_vectors)
        return {
            "product_ids": tf.gather(self.product_ids, indices),
            "scores": scores,
            "product_titles": tf.gather(self.product_titles, indices),
        }


def save_scann_model(path: str) -> str:
    module = TinyScannQ2E()
    signatures = {"serving_default": module.retrieval, "retrieval": module.retrieval}
    tf.saved_model.save(module, path, signatures=signatures, options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
    return path


def expected(query: str, id_prefix: str = "P", country: str = "") -> tuple[list[bytes], np.ndarray]:
    """NumPy reference: the top-K product ids and scores."""
    scores = PRODUCT_VECTORS @ np.array([len(query.encode()) + len(country.encode()), 1.0], np.float32)
    order = np.argsort(-scores, kind="stable")[:K]
    return [f"{id_prefix}{i}".encode() for i in order], scores[order]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("saved_models")
    models = {prefix: save_model(str(root / prefix), prefix) for prefix in ("P", "Q")}
    return {**models, "scann": save_scann_model(str(root / "scann"))}


def add_version(base, model: str, version: int, source: str) -> str:
    """Copies a SavedModel into place the way an export does: temp dir, then rename."""
    model_dir = os.path.join(base, model)
    os.makedirs(model_dir, exist_ok=True)
    temporary = os.path.join(model_dir, f".tmp-{version}")
    shutil.copytree(source, temporary)
    os.rename(temporary, os.path.join(model_dir, str(version)))
    return os.path.join(model_dir, str(version))


def make_server(base, **kwargs) -> tuple[ModelServer, list[str]]:
    """A server on free ports (not started), and the list its log lines go to."""
    lines: list[str] = []
    settings = {"grpc_port": 0, "rest_port": 0, "max_batch": MAX_BATCH, "max_request_bytes": MAX_REQUEST_BYTES}
    return ModelServer(str(base), log=lines.append, **{**settings, **kwargs}), lines


@pytest.fixture(scope="module")
def served(tmp_path_factory, saved_models):
    """One server for the request tests: q2e version 1, and directories it must ignore."""
    base = tmp_path_factory.mktemp("base")
    add_version(base, "q2e", 1, saved_models["P"])
    shutil.copytree(saved_models["Q"], base / "q2e" / ".tmp-5")  # an export still being written
    shutil.copytree(saved_models["Q"], base / "q2e" / "latest")
    with make_server(base)[0] as server:
        yield server


@pytest.fixture(scope="module")
def grpc_client(served):
    with ServingClient(f"127.0.0.1:{served.grpc_port}") as client:
        yield client


@pytest.fixture(scope="module")
def rest_client(served):
    with ServingClient(f"127.0.0.1:{served.rest_port}", protocol="rest") as client:
        yield client


def rest_call(server: ModelServer, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    """One REST call without the client: (HTTP status, JSON body)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    url = f"http://127.0.0.1:{server.rest_port}{path}"
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def raw_predict(
    server: ModelServer, inputs: dict, signature: str = "retrieval_exact", model: str = "q2e", version: int | None = None
) -> predict_pb2.PredictResponse:
    """A gRPC Predict with hand-made TensorProtos."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)


def strings(*values: str) -> tf.Tensor:
    return tf.make_tensor_proto(np.array([v.encode() for v in values], dtype=object))


def assert_still_serving(client: ServingClient) -> None:
    ids, _ = expected("ab")
    assert client.predict("q2e", {"query": ["ab"]})["product_ids"].tolist() == [ids]


# --- round trips -----------------------------------------------------------------------------


def test_grpc_predict_matches_the_numpy_reference(grpc_client):
    outputs = grpc_client.predict("q2e", {"query": ["ab", "", "longer query"]}, signature="retrieval_exact")
    for row, query in enumerate(["ab", "", "longer query"]):
        ids, scores = expected(query)
        assert outputs["product_ids"][row].tolist() == ids
        np.testing.assert_allclose(outputs["scores"][row], scores, rtol=1e-6)
    assert outputs["scores"].dtype == np.float32 and outputs["scores"].shape == (3, K)
    assert outputs["product_titles"][0].tolist() == [TITLES[2], TITLES[0], TITLES[4]]


def test_grpc_default_signature_and_named_version(grpc_client):
    default = grpc_client.predict("q2e", {"query": ["ab"]})
    named = grpc_client.predict("q2e", {"query": ["ab"]}, signature="retrieval_exact", version=1)
    assert default["product_ids"].tolist() == named["product_ids"].tolist() == [expected("ab")[0]]


def test_grpc_float_input_and_output_filter(served, grpc_client):
    inputs = {
        "product_title": ["ab"],
        "product_description": ["c"],
        "product_category": [""],
        "product_image_embedding": np.array([[1.0, -2.0]], np.float32),
    }
    embedding = grpc_client.predict("q2e", inputs, signature="product_encoder")["embedding"]
    np.testing.assert_allclose(embedding, [[3.0, -6.0]])
    request = predict_pb2.PredictRequest(output_filter=["scores"])
    request.model_spec.name, request.model_spec.signature_name = "q2e", "retrieval_exact"
    request.inputs["query"].CopyFrom(strings("ab"))
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert list(response.outputs) == ["scores"]
    assert (response.model_spec.name, response.model_spec.version.value) == ("q2e", 1)


def test_rest_row_form_bare_and_named_instances(served):
    status, body = rest_call(served, "/v1/models/q2e:predict", {"signature_name": "retrieval_exact", "instances": ["ab", ""]})
    assert status == 200
    first, second = body["predictions"]
    assert first["product_ids"] == [i.decode() for i in expected("ab")[0]]
    np.testing.assert_allclose(second["scores"], expected("")[1], rtol=1e-6)
    # Titles that are not UTF-8 come back as {"b64": ...}.
    assert first["product_titles"][2] == {"b64": base64.b64encode(TITLES[4]).decode()}
    status, named = rest_call(served, "/v1/models/q2e/versions/1:predict", {"instances": [{"query": "ab"}, {"query": ""}]})
    assert status == 200 and named == body


def test_rest_columnar_form_named_bare_and_b64(served):
    request = {"signature_name": "retrieval_context", "inputs": {"query": ["ab"], "query_country": ["US"]}}
    status, body = rest_call(served, "/v1/models/q2e:predict", request)
    assert status == 200
    assert body["outputs"]["product_ids"] == [[i.decode() for i in expected("ab", country="US")[0]]]
    # A single input may be bare, a single output comes back unnamed, and b64 strings are accepted.
    b64 = {"b64": base64.b64encode(b"ab").decode()}
    status, body = rest_call(served, "/v1/models/q2e:predict", {"signature_name": "query_encoder", "inputs": [b64, "xyz"]})
    assert status == 200 and body == {"outputs": [[2.0, 1.0], [3.0, 1.0]]}


def test_rest_client_gives_what_the_grpc_client_gives(grpc_client, rest_client):
    for signature in ("retrieval_exact", "query_encoder"):
        over_grpc = grpc_client.predict("q2e", {"query": ["ab", "q"]}, signature=signature)
        over_rest = rest_client.predict("q2e", {"query": ["ab", "q"]}, signature=signature)
        assert sorted(over_rest) == sorted(over_grpc)
        for name in over_grpc:
            assert over_rest[name].dtype == over_grpc[name].dtype
            assert over_rest[name].tolist() == over_grpc[name].tolist()


def test_search_slices_the_exported_k_over_both_protocols(grpc_client, rest_client):
    for client in (grpc_client, rest_client):
        results = client.search("q2e", ["ab", ""], k=2)
        assert [[hit["product_id"] for hit in hits] for hits in results] == [
            [i.decode() for i in expected(q)[0][:2]] for q in ("ab", "")
        ]
        assert results[0][0] == {"product_id": "P2", "title": "desk lamp", "score": pytest.approx(3.0)}
    with_country = grpc_client.search("q2e", ["ab"], k=3, signature="retrieval_context", context={"query_country": "USA"})
    assert [hit["product_id"] for hit in with_country[0]] == [i.decode() for i in expected("ab", country="USA")[0]]


@pytest.mark.parametrize("k", [0, K + 1, 2.5])
def test_search_k_out_of_range_is_a_value_error(grpc_client, k):
    with pytest.raises(ValueError, match="k"):
        grpc_client.search("q2e", ["ab"], k=k)
    assert_still_serving(grpc_client)


# --- metadata and status ---------------------------------------------------------------------


def test_grpc_metadata_is_a_signature_def_map(served, grpc_client):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "q2e"
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=10)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_defs)
    retrieval = signature_defs.signature_def["retrieval_exact"]
    assert retrieval.method_name == "tensorflow/serving/predict"
    assert retrieval.inputs["query"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in retrieval.outputs["product_ids"].tensor_shape.dim] == [-1, K]
    assert len({info.name for info in retrieval.outputs.values()}) == 3
    metadata = grpc_client.metadata("q2e")
    assert metadata["version"] == 1
    assert set(metadata["signatures"]) == {
        "serving_default", "retrieval_exact", "retrieval_context", "query_encoder", "product_encoder", "call_count"
    }
    image_input = metadata["signatures"]["product_encoder"]["inputs"]["product_image_embedding"]
    assert image_input == {"dtype": "float32", "shape": [None, 2]}


def test_grpc_and_rest_status(grpc_client, rest_client, served):
    for client in (grpc_client, rest_client):
        assert client.status("q2e") == [{"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]
    assert rest_call(served, "/v1/models/q2e") == (
        200,
        {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]},
    )
    assert rest_call(served, "/v1/models/q2e/versions/1")[0] == 200


def test_rest_metadata_json_like_tf_serving(served, rest_client, grpc_client):
    status, body = rest_call(served, "/v1/models/q2e/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "q2e", "signature_name": "", "version": "1"}
    query_info = body["metadata"]["signature_def"]["signature_def"]["query_encoder"]["inputs"]["query"]
    assert query_info["dtype"] == "DT_STRING" and query_info["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert rest_client.metadata("q2e") == grpc_client.metadata("q2e")


def test_directories_that_are_not_integers_are_ignored(served, grpc_client):
    assert [row["version"] for row in grpc_client.status("q2e")] == [1]
    with pytest.raises(ServingError) as error:
        grpc_client.predict("q2e", {"query": ["ab"]}, version=5)
    assert error.value.code == grpc.StatusCode.NOT_FOUND


# --- malformed requests ------------------------------------------------------------------------

@dataclass(frozen=True)
class BadRequest:
    """One malformed request, sent over gRPC (TensorProtos) and REST (JSON), and what it must get."""

    name: str
    grpc_inputs: dict[str, object]  # input name -> TensorProto
    rest_body: dict
    code: grpc.StatusCode
    http_status: int
    words: str  # in the error message
    signature: str = "retrieval_exact"
    model: str = "q2e"
    version: int | None = None

    @property
    def rest_path(self) -> str:
        versions = "" if self.version is None else f"/versions/{self.version}"
        return f"/v1/models/{self.model}{versions}:predict"


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PRODUCT_TEXT = {"product_title": "a", "product_description": "a", "product_category": "a"}


def product_protos(image_embedding: list) -> dict[str, object]:
    protos = {name: strings(value) for name, value in PRODUCT_TEXT.items()}
    return {**protos, "product_image_embedding": tf.make_tensor_proto(image_embedding, tf.float32)}


BAD_REQUESTS = [
    BadRequest("unknown model", {"query": strings("a")}, {"instances": ["a"]}, NOT_FOUND, 404, "model 'nope'", model="nope"),
    BadRequest("unknown version", {"query": strings("a")}, {"instances": ["a"]}, NOT_FOUND, 404, "version 7", version=7),
    BadRequest(
        "unknown signature", {"query": strings("a")}, {"signature_name": "nope", "instances": ["a"]}, NOT_FOUND, 404,
        "signature 'nope'", signature="nope",
    ),
    BadRequest(
        "wrong dtype", {"query": tf.make_tensor_proto([1.5], tf.float32)}, {"inputs": {"query": [1.5]}}, INVALID, 400,
        "input 'query' must",
    ),
    BadRequest(
        "wrong rank", {"query": tf.make_tensor_proto([[b"a"]], tf.string)}, {"inputs": {"query": [["a"]]}}, INVALID, 400,
        "input 'query' must have rank 1",
    ),
    BadRequest(
        "wrong shape", product_protos([[1.0, 2.0, 3.0]]),
        {"signature_name": "product_encoder", "instances": [{**PRODUCT_TEXT, "product_image_embedding": [1.0, 2.0, 3.0]}]},
        INVALID, 400, "input 'product_image_embedding' must have shape [None, 2]", signature="product_encoder",
    ),
    BadRequest(
        "missing input", {"query": strings("a")}, {"signature_name": "retrieval_context", "inputs": {"query": ["a"]}},
        INVALID, 400, "missing input 'query_country'", signature="retrieval_context",
    ),
    BadRequest(
        "unexpected input", {"query": strings("a"), "extra": strings("a")}, {"inputs": {"query": ["a"], "extra": ["a"]}},
        INVALID, 400, "unexpected input 'extra'",
    ),
    BadRequest(
        "inconsistent batch", {"query": strings("a", "b"), "query_country": strings("US")},
        {"signature_name": "retrieval_context", "inputs": {"query": ["a", "b"], "query_country": ["US"]}},
        INVALID, 400, "different batch sizes", signature="retrieval_context",
    ),
    BadRequest(
        "empty batch", {"query": tf.make_tensor_proto([], tf.string, shape=[0])}, {"inputs": {"query": []}}, INVALID, 400,
        "empty batch",
    ),
    BadRequest(
        "batch too big", {"query": strings(*["a"] * (MAX_BATCH + 1))}, {"instances": ["a"] * (MAX_BATCH + 1)},
        INVALID, 400, f"limit of {MAX_BATCH}",
    ),
    BadRequest(
        "error inside the model", product_protos([[np.nan, 2.0]]),
        {
            "signature_name": "product_encoder",
            "inputs": {**{name: [value] for name, value in PRODUCT_TEXT.items()}, "product_image_embedding": [[float("nan"), 2.0]]},
        },
        INVALID, 400, "product_image_embedding has NaN or Inf", signature="product_encoder",
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case.name for case in BAD_REQUESTS])
def test_bad_grpc_request_gets_its_code_and_a_message(served, grpc_client, case):
    with pytest.raises(grpc.RpcError) as error:
        raw_predict(served, case.grpc_inputs, case.signature, case.model, case.version)
    assert error.value.code() == case.code
    assert case.words in error.value.details()
    assert "Traceback" not in error.value.details() and 'File "' not in error.value.details()
    assert_still_serving(grpc_client)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case.name for case in BAD_REQUESTS])
def test_bad_rest_request_gets_its_status_and_a_json_error(served, rest_client, case):
    status, answer = rest_call(served, case.rest_path, case.rest_body)
    assert status == case.http_status
    assert list(answer) == ["error"] and case.words in answer["error"]
    assert_still_serving(rest_client)


def test_client_raises_serving_error_with_code_over_both_protocols(grpc_client, rest_client):
    for client in (grpc_client, rest_client):
        with pytest.raises(ServingError) as error:
            client.predict("q2e", {"query": ["a"], "extra": ["b"]})
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unexpected input 'extra'" in error.value.message


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"instances": ["a"], "inputs": ["a"]}', "exactly one of"),
        (b'{"instance": ["a"]}', "unknown key 'instance'"),
        (b'{"instances": [{"b64": "***"}]}', "not base64"),
        (b'{"inputs": {"query": ["a", ["b"]]}}', "rank 1"),
    ],
)
def test_malformed_rest_body_is_400(served, rest_client, raw, words):
    status, answer = rest_call(served, "/v1/models/q2e:predict", raw=raw)
    assert status == 400 and words in answer["error"]
    assert_still_serving(rest_client)


def test_a_refused_request_leaves_a_kept_alive_connection_usable(served):
    connection = http.client.HTTPConnection("127.0.0.1", served.rest_port, timeout=10)
    try:
        for path, method, body, status in [
            ("/v1/models/nope:predict", "POST", b'{"instances": ["a"]}', 404),
            ("/v1/models/q2e", "POST", b'{"instances": ["a"]}', 405),
            ("/v1/models/q2e:predict", "POST", b'{"instances": ["ab"]}', 200),
            ("/v1/models/q2e", "GET", None, 200),
        ]:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            assert (response.status, "error" in json.loads(response.read())) == (status, status != 200)
    finally:
        connection.close()


def test_oversized_requests_are_refused(served, grpc_client, rest_client):
    big = ["x" * 1000] * (MAX_REQUEST_BYTES // 1000 + 8)
    with pytest.raises(grpc.RpcError) as error:
        raw_predict(served, {"query": strings(*big)})
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, answer = rest_call(served, "/v1/models/q2e:predict", {"instances": big})
    assert status == 413 and "limit of 65536 bytes" in answer["error"]
    with pytest.raises(ServingError) as client_error:
        rest_client.predict("q2e", {"query": big})
    assert client_error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(grpc_client)
    assert_still_serving(rest_client)


def test_unimplemented_methods_and_unknown_routes(served, grpc_client):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "q2e"
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert rest_call(served, "/v1/models/q2e:classify", {"instances": ["a"]})[0] == 501
    assert rest_call(served, "/v1/nothing/here")[0] == 404
    assert rest_call(served, "/v1/models/q2e/metadata", {"instances": ["a"]})[0] == 405
    assert_still_serving(grpc_client)


# --- versions ----------------------------------------------------------------------------------


def test_new_version_is_picked_up_without_failing_a_request(tmp_path, saved_models):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    server, lines = make_server(tmp_path, poll_seconds=0.05)
    failures: list[BaseException] = []
    seen: set[bytes] = set()
    stop = threading.Event()

    def hammer(client: ServingClient) -> None:
        while not stop.is_set():
            try:
                seen.add(client.predict("q2e", {"query": ["ab"]})["product_ids"][0, 0])
            except Exception as e:  # noqa: BLE001 - asserted on below
                failures.append(e)
                return

    with server, ServingClient(f"127.0.0.1:{server.grpc_port}") as client:
        threads = [threading.Thread(target=hammer, args=(client,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.2)
            add_version(tmp_path, "q2e", 2, saved_models["Q"])
            wait_for(lambda: client.predict("q2e", {"query": ["ab"]})["product_ids"][0, 0] == b"Q2")
            time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert failures == []
        assert seen == {b"P2", b"Q2"}
        assert [(row["version"], row["state"]) for row in client.status("q2e")] == [(2, "AVAILABLE"), (1, "AVAILABLE")]
        assert client.predict("q2e", {"query": ["ab"]}, version=1)["product_ids"][0, 0] == b"P2"
    assert any("loaded model 'q2e' version 2" in line for line in lines)


def test_only_the_newest_versions_on_disk_stay_loaded(tmp_path, saved_models):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    add_version(tmp_path, "q2e", 2, saved_models["Q"])
    server, lines = make_server(tmp_path, poll_seconds=0.05)
    with server, ServingClient(f"127.0.0.1:{server.grpc_port}") as client:
        add_version(tmp_path, "q2e", 3, saved_models["P"])  # keep_versions=2: version 1 goes
        wait_for(lambda: [row["version"] for row in client.status("q2e")] == [3, 2])
        shutil.rmtree(tmp_path / "q2e" / "3")  # a version directory that disappears is unloaded ...
        wait_for(lambda: [row["version"] for row in client.status("q2e")] == [2, 1])  # ... and 1 is newest-2 again
        assert client.predict("q2e", {"query": ["ab"]})["product_ids"][0, 0] == b"Q2"
    assert any("unloaded model 'q2e' version 1 (keeping the newest 2)" in line for line in lines)
    assert any("unloaded model 'q2e' version 3 (its directory is gone)" in line for line in lines)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def write_warmup(version_dir: str, requests: list[predict_pb2.PredictRequest]) -> None:
    os.makedirs(os.path.join(version_dir, "assets.extra"))
    with tf.io.TFRecordWriter(os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def warmup_request(**inputs: tf.Tensor) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "q2e", "retrieval_exact"
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    return request


def test_warmup_requests_are_replayed_before_serving(tmp_path, saved_models):
    version_dir = add_version(tmp_path / "staging", "q2e", 1, saved_models["P"])
    write_warmup(version_dir, [warmup_request(query=strings("a", "b")) for _ in range(3)])
    shutil.move(str(tmp_path / "staging" / "q2e"), str(tmp_path / "base" / "q2e"))
    server, lines = make_server(tmp_path / "base")
    with server, ServingClient(f"127.0.0.1:{server.grpc_port}") as client:
        assert client.predict("q2e", {"query": ["x"]}, signature="call_count")["count"].tolist() == [3]
    assert any("3 warm-up requests replayed" in line for line in lines)


def test_a_failing_warmup_keeps_the_version_out_of_service(tmp_path, saved_models):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    version_dir = add_version(tmp_path / "staging", "q2e", 2, saved_models["Q"])
    write_warmup(version_dir, [warmup_request(wrong=strings("a"))])
    os.rename(version_dir, tmp_path / "q2e" / "2")
    server, _ = make_server(tmp_path)
    with server, ServingClient(f"127.0.0.1:{server.grpc_port}") as client:
        rows = client.status("q2e")
        assert [(row["version"], row["state"]) for row in rows] == [(2, "END"), (1, "AVAILABLE")]
        assert "warm-up record 1" in rows[0]["error_message"] and "missing input 'query'" in rows[0]["error_message"]
        assert rows[0]["error_code"] == "INVALID_ARGUMENT"
        assert client.predict("q2e", {"query": ["ab"]})["product_ids"][0, 0] == b"P2"


def test_predict_with_version_reports_the_version_that_answered(tmp_path, saved_models):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    add_version(tmp_path, "q2e", 2, saved_models["Q"])
    server, _ = make_server(tmp_path)
    with server:
        for protocol, port in (("grpc", server.grpc_port), ("rest", server.rest_port)):
            with ServingClient(f"127.0.0.1:{port}", protocol=protocol) as client:
                outputs, version = client.predict_with_version("q2e", {"query": ["ab"]}, "retrieval_exact")
                assert version == 2 and outputs["product_ids"][0, 0] == b"Q2", protocol
                outputs, version = client.predict_with_version("q2e", {"query": ["ab"]}, "retrieval_exact", version=1)
                assert version == 1 and outputs["product_ids"][0, 0] == b"P2", protocol
                assert client.predict("q2e", {"query": ["ab"]}, "retrieval_exact")["product_ids"][0, 0] == b"Q2"


def test_models_load_at_the_same_time_and_a_failing_one_does_not_stop_the_other(tmp_path, saved_models, monkeypatch):
    """Two models' first loads meet at a Barrier(2): a registry that loaded one model after the other would
    time out there (BrokenBarrierError: both loads fail). One model then fails to load; the other serves.
    A model's own versions still load one at a time, newest first."""
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    add_version(tmp_path, "q2e", 2, saved_models["Q"])
    add_version(tmp_path, "broken", 1, saved_models["P"])
    barrier = threading.Barrier(2, timeout=20)
    lock = threading.Lock()
    order: list[tuple[str, int]] = []
    running: dict[str, int] = {"q2e": 0, "broken": 0}
    most_running: dict[str, int] = {"q2e": 0, "broken": 0}
    real_load = registry_module.load_servable

    def load(model: str, version: int, path: str, limits: Limits):
        with lock:
            order.append((model, version))
            running[model] += 1
            most_running[model] = max(most_running[model], running[model])
        try:
            if (model, version) in (("q2e", 2), ("broken", 1)):  # each model's first load
                barrier.wait()
            if model == "broken":
                raise loader.LoadError(grpc.StatusCode.INVALID_ARGUMENT, "the SavedModel is broken")
            return real_load(model, version, path, limits)
        finally:
            with lock:
                running[model] -= 1

    monkeypatch.setattr(registry_module, "load_servable", load)
    lines: list[str] = []
    registry = ModelRegistry(str(tmp_path), keep_versions=2, limits=Limits(MAX_BATCH, MAX_REQUEST_BYTES),
                             log=lines.append, max_concurrent_loads=2)
    try:
        registry.refresh()
        assert [(s.version, s.state) for s in registry.statuses("q2e")] == [(2, "AVAILABLE"), (1, "AVAILABLE")], lines
        [broken] = registry.statuses("broken")
        assert broken.state == "END" and "the SavedModel is broken" in broken.error.message
        assert any("could not load model 'broken' version 1" in line for line in lines)
        assert registry.servable("q2e").version == 2
        assert [entry for entry in order if entry[0] == "q2e"] == [("q2e", 2), ("q2e", 1)]  # newest first
        assert most_running == {"q2e": 1, "broken": 1}  # one version of a model at a time
    finally:
        registry.close()


def test_max_concurrent_loads_is_a_server_option_and_a_serve_flag(tmp_path):
    parser = argparse.ArgumentParser()
    commands.add_serve_arguments(parser)
    assert parser.parse_args(["--model-base", "b"]).max_concurrent_loads == 2
    assert parser.parse_args(["--model-base", "b", "--max-concurrent-loads", "1"]).max_concurrent_loads == 1
    assert ModelServer(str(tmp_path), max_concurrent_loads=1).registry._max_concurrent_loads == 1
    with pytest.raises(InputError, match="max_concurrent_loads must be at least 1"):
        ModelServer(str(tmp_path), max_concurrent_loads=0)


# --- the model base, models.config, binding ----------------------------------------------------


def write_config(base, *entries: tuple[str, str]) -> None:
    configs = "".join(
        f'  config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" }}\n' for name, path in entries
    )
    (base / "models.config").write_text(f"model_config_list {{\n{configs}}}\n")


def test_models_config_serves_the_listed_models_including_scann(tmp_path, saved_models):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    add_version(tmp_path, "q2e_scann", 1, saved_models["scann"])
    add_version(tmp_path, "unlisted", 1, saved_models["P"])
    write_config(tmp_path, ("q2e", str(tmp_path / "q2e")), ("q2e_scann", "q2e_scann"))
    server, _ = make_server(tmp_path)
    with server, ServingClient(f"127.0.0.1:{server.grpc_port}") as client:
        assert server.registry.model_names() == ["q2e", "q2e_scann"]
        rest = ServingClient(f"127.0.0.1:{server.rest_port}", protocol="rest")  # nothing to close
        exact = client.search("q2e", ["ab", ""], k=K)
        assert client.search("q2e_scann", ["ab", ""], k=K, signature="retrieval") == exact
        assert rest.search("q2e_scann", ["ab", ""], k=K, signature="retrieval") == exact
        with pytest.raises(ServingError, match="model 'unlisted' is not served"):
            client.predict("unlisted", {"query": ["ab"]})


def test_a_model_that_cannot_load_says_why_and_the_others_keep_serving(tmp_path, saved_models, monkeypatch):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    add_version(tmp_path, "q2e_scann", 1, saved_models["scann"])
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    # As if `import scann` had failed: the ScaNN model's ops are then not registered.
    real_load = tf.saved_model.load

    def load_without_scann(path: str, *args, **kwargs):
        if "q2e_scann" in path:
            raise RuntimeError("Op type not registered 'Scann>TensorsToScann' in binary running on this host.")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(loader.tf.saved_model, "load", load_without_scann)
    monkeypatch.setattr(loader, "_register_ops", lambda: "`import scann` failed (ModuleNotFoundError: No module named 'scann')")
    server, lines = make_server(tmp_path)
    with server, ServingClient(f"127.0.0.1:{server.grpc_port}") as client:
        [row] = client.status("q2e_scann")
        assert row["state"] == "END"
        assert "`import scann` failed (ModuleNotFoundError: No module named 'scann')" in row["error_message"]
        assert "install scann[tf]" in row["error_message"]
        assert "tf.saved_model.load failed" in client.status("broken")[0]["error_message"]
        with pytest.raises(ServingError, match="version 1 failed to load") as error:
            client.predict("q2e_scann", {"query": ["ab"]}, signature="retrieval")
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert_still_serving(client)
    assert any("could not load model 'q2e_scann' version 1" in line for line in lines)


@pytest.mark.parametrize("base_path", ["../elsewhere", "/tmp", "."])
def test_models_config_base_path_outside_the_base_is_rejected(tmp_path, saved_models, base_path):
    base = tmp_path / "base"
    add_version(base, "q2e", 1, saved_models["P"])
    write_config(base, ("q2e", base_path))
    with pytest.raises(InputError, match="not a directory inside the model base"):
        ModelServer(str(base), grpc_port=0, rest_port=0, log=lambda line: None).start()


def test_models_config_base_path_through_a_symlink_out_of_the_base_is_rejected(tmp_path, saved_models):
    base = tmp_path / "base"
    add_version(tmp_path / "elsewhere", "q2e", 1, saved_models["P"])
    base.mkdir()
    os.symlink(tmp_path / "elsewhere" / "q2e", base / "q2e")  # inside the base by name, outside once resolved
    write_config(base, ("q2e", "q2e"))
    with pytest.raises(InputError, match="not a directory inside the model base"):
        ModelServer(str(base), grpc_port=0, rest_port=0, log=lambda line: None).start()


@pytest.mark.parametrize("model", ["../q2e", "q2e/1", "/q2e", "..", ""])
def test_request_model_names_are_looked_up_never_joined_into_paths(served, grpc_client, model):
    with pytest.raises(grpc.RpcError) as error:
        raw_predict(served, {"query": strings("a")}, model=model)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and f"model '{model}' is not served" in error.value.details()
    with pytest.raises(ServingError) as status_error:
        grpc_client.status(model)
    assert status_error.value.code == grpc.StatusCode.NOT_FOUND
    assert_still_serving(grpc_client)


def test_binds_loopback_by_default(served):
    assert ModelServer.__init__.__defaults__[0] == "127.0.0.1"
    assert served.host == "127.0.0.1"
    listening = listening_addresses()
    if listening is None:
        pytest.skip("no /proc/net/tcp here")
    assert listening[served.grpc_port] == "127.0.0.1"
    assert listening[served.rest_port] == "127.0.0.1"


def listening_addresses() -> dict[int, str] | None:
    """Port -> address of the listening TCP sockets (Linux /proc/net/tcp*); v4-mapped IPv6 as IPv4."""
    tables = [path for path in ("/proc/net/tcp", "/proc/net/tcp6") if os.path.exists(path)]
    if not tables:
        return None
    found = {}
    for path in tables:
        with open(path) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    address, port = fields[1].split(":")
                    # The kernel prints each 32-bit word of the address in host (little-endian) order.
                    packed = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
                    ip = ipaddress.ip_address(packed)
                    found[int(port, 16)] = str(getattr(ip, "ipv4_mapped", None) or ip)
    return found


@pytest.mark.parametrize(
    "settings, words",
    [({"grpc_port": 70000}, "grpc_port"), ({"max_batch": 0}, "max_batch"), ({"grpc_port": 9000, "rest_port": 9000}, "different")],
)
def test_bad_server_settings_are_input_errors(tmp_path, settings, words):
    with pytest.raises(InputError, match=words):
        ModelServer(str(tmp_path), **settings)


def test_a_taken_port_is_an_input_error_before_any_model_loads(tmp_path, saved_models):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server, lines = make_server(tmp_path, rest_port=taken.getsockname()[1])
        with pytest.raises(InputError, match="cannot bind REST"):
            server.start()
    assert not any("loaded model" in line for line in lines)


def test_importing_the_commands_does_not_load_tensorflow():
    code = "import sys, tf_q2e.serving, tf_q2e.serving.commands; print(sorted({'tensorflow', 'grpc'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_a_missing_base_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        ModelServer(str(tmp_path / "missing"))


# --- the q2e serve / q2e query commands --------------------------------------------------------


def query_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.add_query_arguments(parser)
    return parser.parse_args(argv)


def test_query_prints_ranked_lines(served, capsys):
    for protocol, port in (([], served.grpc_port), (["--rest"], served.rest_port)):
        code = commands.run_query(query_args("--server", f"127.0.0.1:{port}", *protocol, "--k", "2", "ab", ""))
        out = capsys.readouterr().out
        assert code == 0
        assert out.splitlines() == [
            '"ab"', "  1. P2  3.0000  desk lamp", "  2. P0  2.0000  red sofa",
            '""', "  1. P3  3.0000  oak table", "  2. P1  1.0000  blue bike",
        ]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--server", "nohost", "a"], "HOST:PORT"),
        (["--k", "0", "a"], "--k"),
        (["--k", str(K + 1), "a"], f"k={K + 1} is more than the {K}"),
        (["--model", "nope", "a"], "model 'nope' is not served"),
        (["--context", "query_country", "a"], "NAME=VALUE"),
    ],
)
def test_query_bad_arguments_are_input_errors(served, argv, words):
    argv = ["--server", f"127.0.0.1:{served.grpc_port}", *argv] if "--server" not in argv else argv
    with pytest.raises(InputError, match=words):
        commands.run_query(query_args(*argv))


def test_query_without_a_server_exits_1_with_one_line(capsys, tmp_path):
    with make_server(tmp_path)[0] as server:  # an empty base, just to find a port nobody will listen on
        port = server.grpc_port
    assert commands.run_query(query_args("--server", f"127.0.0.1:{port}", "--timeout", "2", "a")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("q2e: error: server 127.0.0.1:") and "UNAVAILABLE" in err[0]


def test_serve_warns_when_it_binds_beyond_loopback(tmp_path, monkeypatch, capsys):
    from tf_q2e.serving import server as server_module

    class Stop(Exception):
        pass

    def no_start(self):
        raise Stop  # bind nothing: the warning comes before start

    monkeypatch.setattr(server_module.ModelServer, "start", no_start)
    parser = argparse.ArgumentParser()
    commands.add_serve_arguments(parser)
    assert parser.parse_args(["--model-base", str(tmp_path)]).host == "127.0.0.1"
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        with pytest.raises(Stop):
            commands.run_serve(parser.parse_args(["--model-base", str(tmp_path), "--host", host]))
        err = capsys.readouterr().err
        assert ("reachable from the network, with no authentication or TLS" in err) is warned, host


def test_serve_runs_until_sigterm(tmp_path, saved_models, capsys):
    add_version(tmp_path, "q2e", 1, saved_models["P"])
    parser = argparse.ArgumentParser()
    commands.add_serve_arguments(parser)
    args = parser.parse_args(["--model-base", str(tmp_path), "--grpc-port", "0", "--rest-port", "0"])
    done = threading.Event()

    def keep_signalling() -> None:  # until run_serve's handler is in place and it returns
        while not done.wait(0.2):
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    sender = threading.Thread(target=keep_signalling)
    sender.start()
    try:
        code = commands.run_serve(args)
    finally:
        done.set()
        sender.join()
        signal.signal(signal.SIGTERM, previous)
    out = capsys.readouterr().out
    assert code == 0
    assert "models: q2e" in out and "gRPC  127.0.0.1:" in out and "REST  http://127.0.0.1:" in out
    assert out.rstrip().endswith("stopped")
