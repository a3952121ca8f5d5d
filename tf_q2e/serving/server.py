"""`ModelServer`: a development server that speaks TensorFlow Serving's APIs.

It serves a TF Serving base directory (as `q2e export` writes it) over TF
Serving's gRPC API (PredictionService, ModelService) and REST API, so the
client code and request formats that work against it work against
`tensorflow/serving` too. Unlike the stock server it also loads models that
need ScaNN's custom ops, and it needs no Docker.

It is for development: it binds the loopback interface unless told otherwise
and has no authentication or TLS. A background thread rescans the base
directory every `poll_seconds` and loads new versions without a restart; a new
version becomes the default once it is loaded and warmed up, and requests in
flight on the old one finish there.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from types import TracebackType

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tf_q2e.errors import InputError
from tf_q2e.serving.grpc_api import ModelServicer, PredictionServicer
from tf_q2e.serving.registry import DEFAULT_MAX_CONCURRENT_LOADS, ModelRegistry
from tf_q2e.serving.rest_api import RestServer
from tf_q2e.serving.signatures import Limits

LOOPBACK = "127.0.0.1"
_GRPC_WORKERS = 8


def log_to_stderr(message: str) -> None:
    """The default log: one timestamped line on stderr."""
    print(f"{time.strftime('%H:%M:%S')} q2e serve: {message}", file=sys.stderr, flush=True)


class ModelServer:
    """Serves every model of a TF Serving base directory over gRPC and REST.

    Example:
        with ModelServer("export/base", grpc_port=0, rest_port=0) as server:
            client = ServingClient(f"127.0.0.1:{server.grpc_port}")

    Args:
        base: the base directory (`BASE/models.config`, `BASE/<model>/<version>/`).
        host: the interface to bind; loopback unless given.
        grpc_port: gRPC port; 0 picks a free one (see `grpc_port` after `start`).
        rest_port: REST port; 0 picks a free one (see `rest_port` after `start`).
        poll_seconds: how often the base directory is rescanned for versions.
        max_batch: most rows one request may carry.
        max_request_bytes: most bytes of one gRPC message or REST body.
        keep_versions: how many of each model's newest versions stay loaded.
        max_concurrent_loads: how many models load at once (the versions of
            one model always load one after another).
        log: where load/unload lines and internal errors go (default stderr).
    """

    def __init__(
        self,
        base: str,
        host: str = LOOPBACK,
        grpc_port: int = 8500,
        rest_port: int = 8501,
        poll_seconds: float = 1.0,
        max_batch: int = 1024,
        max_request_bytes: int = 4 << 20,
        keep_versions: int = 2,
        log: Callable[[str], None] = log_to_stderr,
        max_concurrent_loads: int = DEFAULT_MAX_CONCURRENT_LOADS,
    ) -> None:
        _check_settings(base, grpc_port, rest_port, poll_seconds, max_batch, max_request_bytes, keep_versions,
                        max_concurrent_loads)
        self.host = host
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        self._poll_seconds = poll_seconds
        self._limits = Limits(max_batch=max_batch, max_request_bytes=max_request_bytes)
        self._log = log
        self.registry = ModelRegistry(base, keep_versions, self._limits, log, max_concurrent_loads)
        self._stopped = threading.Event()
        self._grpc: grpc.Server | None = None
        self._rest: RestServer | None = None
        self._threads: list[threading.Thread] = []

    @property
    def grpc_address(self) -> str:
        """`host:port` of the gRPC API (IPv6 hosts in brackets)."""
        return _join(self.host, self.grpc_port)

    @property
    def rest_url(self) -> str:
        """`http://host:port` of the REST API."""
        return f"http://{_join(self.host, self.rest_port)}"

    def start(self) -> ModelServer:
        """Binds both ports, loads the models, then serves and polls; returns self.

        The ports are bound first, so a taken port fails before any model loads,
        and requests are taken only once the models present at start are loaded.

        Raises:
            InputError: a port cannot be bound, or models.config is malformed.
            RuntimeError: the server was started before.
        """
        if self._grpc is not None or self._stopped.is_set():
            raise RuntimeError("a ModelServer starts once; create a new one")
        try:
            self._grpc = self._bind_grpc()
            self._rest = self._bind_rest()
            self.registry.refresh()
        except BaseException:
            self.stop()
            raise
        if not self.registry.model_names():
            self._log(f"no models in {self.registry.base} yet; waiting for version directories to appear")
        self._grpc.start()
        self._spawn(self._rest.serve_forever, "q2e-rest")
        self._spawn(self._poll, "q2e-serving-poll")
        return self

    def stop(self, grace_seconds: float = 1.0) -> None:
        """Stops serving (requests in flight get `grace_seconds`) and unloads the models."""
        self._stopped.set()
        if self._rest is not None:
            if self._threads:  # serve_forever runs: shutdown() waits for it to return
                self._rest.shutdown()
            self._rest.server_close()
            self._rest = None
        if self._grpc is not None:
            self._grpc.stop(grace_seconds).wait()
            self._grpc = None
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self.registry.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until `stop` is called (or `timeout` passes); True once stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _bind_grpc(self) -> grpc.Server:
        options = [
            ("grpc.max_receive_message_length", self._limits.max_request_bytes),
            ("grpc.so_reuseport", 0),  # fail, rather than share, when the port is taken
        ]
        workers = futures.ThreadPoolExecutor(max_workers=_GRPC_WORKERS, thread_name_prefix="q2e-grpc")
        server = grpc.server(workers, options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.registry, self._limits, self._log), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.registry, self._log), server)
        try:
            self.grpc_port = server.add_insecure_port(self.grpc_address)
        except RuntimeError:
            raise InputError(f"cannot bind gRPC to {self.grpc_address} (is the port in use?); pass another --grpc-port") from None
        return server

    def _bind_rest(self) -> RestServer:
        try:
            server = RestServer((self.host, self.rest_port), self.registry, self._limits, self._log)
        except OSError as e:
            raise InputError(f"cannot bind REST to {self.rest_url} ({e.strerror or e}); pass another --rest-port") from None
        self.rest_port = server.server_address[1]
        return server

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll(self) -> None:
        """Rescans the base directory until stopped; a scan that fails keeps what is loaded."""
        last_problem = None
        while not self._stopped.wait(self._poll_seconds):
            try:
                self.registry.refresh()
                last_problem = None
            except Exception as e:  # noqa: BLE001 - the poller must outlive a bad scan
                problem = f"{type(e).__name__}: {e}" if not isinstance(e, InputError) else str(e)
                if problem != last_problem:
                    self._log(f"rescan of {self.registry.base} failed, serving what is loaded: {problem}")
                last_problem = problem


def _check_settings(
    base: str, grpc_port: int, rest_port: int, poll_seconds: float, max_batch: int, max_request_bytes: int, keep_versions: int,
    max_concurrent_loads: int,
) -> None:
    if not os.path.isdir(base):
        raise InputError(f"model base {base} is not a directory; pass the directory `q2e export --out` wrote")
    for name, port in (("grpc_port", grpc_port), ("rest_port", rest_port)):
        if not 0 <= port <= 65535:
            raise InputError(f"{name} must be in 0..65535 (0 picks a free port), got {port}")
    if grpc_port == rest_port != 0:
        raise InputError(f"grpc_port and rest_port are both {grpc_port}; give them different ports")
    for name, value in (("max_batch", max_batch), ("max_request_bytes", max_request_bytes), ("keep_versions", keep_versions),
                        ("max_concurrent_loads", max_concurrent_loads)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if not poll_seconds > 0:
        raise InputError(f"poll_seconds must be positive, got {poll_seconds}")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
