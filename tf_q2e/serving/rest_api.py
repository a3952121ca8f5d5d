"""TensorFlow Serving's REST API over the standard library's HTTP server.

Routes (TensorFlow Serving's):

* `POST /v1/models/<name>[/versions/<n>]:predict` - row or columnar JSON;
* `GET /v1/models/<name>[/versions/<n>]` - version status;
* `GET /v1/models/<name>[/versions/<n>]/metadata` - signatures.

Errors are answered as TensorFlow Serving does, `{"error": "..."}` with the HTTP
status of the gRPC code (400 INVALID_ARGUMENT, 404 NOT_FOUND, ...); a body over
`max_request_bytes` gets 413 before it is read into memory. An unexpected
failure is logged here and answered 500 without details. The model name in a
URL is only ever a dictionary key.
"""

from __future__ import annotations

import json
import re
import socket
import traceback
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from tf_q2e.serving.errors import ServingError, not_found
from tf_q2e.serving.protos import metadata_json, status_response, to_json
from tf_q2e.serving.registry import ModelRegistry
from tf_q2e.serving.rest_json import decode_inputs, encode_predictions, parse_json, predict_request
from tf_q2e.serving.signatures import Limits, run

_ROUTE = re.compile(r"/v1/models/(?P<model>[^/:]+)(?:/versions/(?P<version>[0-9]{1,18}))?(?P<action>:[a-z]+|/metadata)?")
_DISCARD_LIMIT = 64 << 20  # bytes of an oversized body read and dropped so the client sees the 413
_CHUNK = 1 << 16


class _HttpError(Exception):
    """An HTTP-level refusal with no gRPC equivalent (wrong method, no length)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RestServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, holding what handlers need."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], registry: ModelRegistry, limits: Limits, log: Callable[[str], None]
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.limits = limits
        self.log = log
        super().__init__(address, RestHandler)


class RestHandler(BaseHTTPRequestHandler):
    """Answers one connection's requests; every answer is JSON."""

    server: RestServer
    protocol_version = "HTTP/1.1"
    server_version = "tf_q2e-serving"
    timeout = 30  # seconds a client may stall mid-request before its connection is dropped

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET  # wrong methods get a JSON 405

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the server logs model loads and failures, not every request."""

    def _dispatch(self) -> None:
        method = self.command
        try:
            # The body is read first, whatever the route, so a refused request
            # leaves no unread bytes on a kept-alive connection.
            status, payload = 200, self._route(method, self._read_body())
        except ServingError as e:
            status, payload = e.http_status, {"error": e.message}
        except _HttpError as e:
            status, payload = e.status, {"error": e.message}
        except OSError:  # the client went away or stalled: nobody to answer
            self.close_connection = True
            return
        except Exception:  # noqa: BLE001 - a server thread must answer, not die
            self.server.log(f"internal error in {method} {self.path}:\n{traceback.format_exc()}")
            status, payload = 500, {"error": "internal server error; the server log has the details"}
        self._send_json(status, payload)

    def _route(self, method: str, body: bytes) -> dict:
        path = urllib.parse.urlsplit(self.path).path
        match = _ROUTE.fullmatch(path)
        if match is None:
            routes = "/v1/models/<name>[/versions/<n>][:predict|/metadata]"
            raise not_found(f"no such endpoint: {path} (this server answers {routes})")
        model = urllib.parse.unquote(match["model"])
        version = int(match["version"]) if match["version"] else None
        action = match["action"] or ""
        if action not in ("", ":predict", "/metadata"):
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"'{action}' is not implemented by this development server")
        expected = "POST" if action == ":predict" else "GET"
        if method != expected:
            raise _HttpError(405, f"use {expected} for {path}")
        registry = self.server.registry
        if action == "":
            return to_json(status_response(registry.statuses(model, version)))
        servable = registry.servable(model, version)
        if action == "/metadata":
            return metadata_json(servable)
        signature_name, row_format, value = predict_request(parse_json(body))
        signature = servable.signature(signature_name)
        arrays = decode_inputs(signature, row_format, value, self.server.limits)
        return encode_predictions(run(signature, arrays), row_format)

    def _read_body(self) -> bytes:
        """The request body (empty when there is none), refused when over the limit."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HttpError(411, "chunked request bodies are not supported; send a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _HttpError(400, f"bad Content-Length: {self.headers['Content-Length']!r}")
        limit = self.server.limits.max_request_bytes
        if length > limit:
            self._discard(length)
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body of {length} bytes is more than this server's limit of {limit} bytes; send smaller batches",
            )
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        """Reads and drops an oversized body (up to a bound) so the client can read the 413."""
        self.close_connection = True
        remaining = min(length, _DISCARD_LIMIT)
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _CHUNK))
                if not chunk:
                    return
                remaining -= len(chunk)
        except OSError:
            return

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True
