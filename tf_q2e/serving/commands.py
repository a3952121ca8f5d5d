"""The `q2e serve` and `q2e query` verbs: argument parsers and runners.

`cli.py` wires them in: `add_*_arguments(parser)` fills a subparser and
`run_*(args)` returns the exit code. Bad arguments raise `InputError`, which
the command line prints as one line and exits 2 on. TensorFlow is imported
only when a verb runs, so `q2e --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from tf_q2e.errors import InputError

DEFAULT_GRPC_PORT = 8500
DEFAULT_REST_PORT = 8501
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The server answered and refused: the request (so the user's input) was at fault.
_USER_ERRORS = ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`q2e serve --model-base BASE [--host H] [--grpc-port P] [--rest-port R] ...`."""
    parser.add_argument("--model-base", required=True, help="TF Serving base directory (what `q2e export --out` wrote)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port, 0 for any free one (default 8500)")
    parser.add_argument("--rest-port", type=int, default=DEFAULT_REST_PORT, help="REST port, 0 for any free one (default 8501)")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="how often to look for new versions (default 1)")
    parser.add_argument("--keep-versions", type=int, default=2, help="newest versions kept loaded per model (default 2)")
    parser.add_argument("--max-batch", type=int, default=1024, help="most rows per request (default 1024)")
    parser.add_argument("--max-concurrent-loads", type=int, default=2,
                        help="models loaded at the same time; one model's versions load in turn (default 2)")


def run_serve(args: argparse.Namespace) -> int:
    """Serves until SIGINT or SIGTERM; prints the bound addresses.

    TensorFlow's C++ INFO lines (one per refused request) are off unless
    `TF_CPP_MIN_LOG_LEVEL` says otherwise.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from tf_q2e.serving.server import ModelServer

    server = ModelServer(
        args.model_base,
        host=args.host,
        grpc_port=args.grpc_port,
        rest_port=args.rest_port,
        poll_seconds=args.poll_seconds,
        max_batch=args.max_batch,
        keep_versions=args.keep_versions,
        max_concurrent_loads=args.max_concurrent_loads,
    )
    if args.host not in _LOOPBACK_HOSTS:
        warning = f"binding {args.host}: reachable from the network, with no authentication or TLS"
        print(f"q2e serve: warning: {warning}", file=sys.stderr)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, _set_event_handler(stop)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        models = ", ".join(server.registry.model_names()) or "none yet"
        print(f"serving {server.registry.base} (models: {models})")
        print(f"  gRPC  {server.grpc_address}")
        print(f"  REST  {server.rest_url}/v1/models/<model>")
        print("stop with Ctrl-C or SIGTERM", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped")
    return 0


def _set_event_handler(event: threading.Event) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        event.set()

    return handler


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    """`q2e query [--server HOST:P] [--rest] [--model q2e] [--signature S] [--k 10] [--category C ...]
    [--country C ...] [--exclude ID ...] [--max-per-category N] [--max-per-seller N] TEXT...`."""
    parser.add_argument("queries", nargs="+", metavar="TEXT", help="query text(s)")
    parser.add_argument("--server", help="HOST:PORT (default 127.0.0.1:8500, or :8501 with --rest)")
    parser.add_argument("--rest", action="store_true", help="use the REST API instead of gRPC")
    parser.add_argument("--model", default="q2e", help="model name (default q2e; q2e_scann with --signature retrieval)")
    parser.add_argument("--signature", default="retrieval_exact", help="retrieval signature (default retrieval_exact)")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10, at most the exported K)")
    parser.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a context input for every query, e.g. query_country=US (repeatable)",
    )
    parser.add_argument("--category", action="append", default=[], metavar="NAME",
                        help="return only products of this category (repeatable: any of them)")
    parser.add_argument("--country", action="append", default=[], metavar="CODE",
                        help="return only products of this country (the catalogue's product_country; repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PRODUCT_ID",
                        help="never return this product (repeatable)")
    parser.add_argument("--max-per-category", type=int, default=0, metavar="N",
                        help="at most N results per category (crowding; default 0: no limit)")
    parser.add_argument("--max-per-seller", type=int, default=0, metavar="N",
                        help="at most N results per seller (the catalogue's product_seller; default 0: no limit)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for the server and model to come up (default 0: fail at once)")


def run_query(args: argparse.Namespace) -> int:
    """Prints per query (as a JSON string) its ranked results: `rank. product_id  score  p(engaged)  title`
    (the engagement probability column when the model exports it)."""
    target = _server_target(args.server, args.rest)
    context = _parse_context(args.context)
    if args.k < 1:
        raise InputError(f"--k must be at least 1, got {args.k}")
    if not args.timeout > 0:
        raise InputError(f"--timeout must be positive, got {args.timeout}")
    from tf_q2e.serving.client import ServingClient
    from tf_q2e.serving.errors import ServingError

    if args.wait < 0:
        raise InputError(f"--wait must be 0 or more seconds, got {args.wait}")
    from tf_q2e.filters import Filters

    filters = Filters(categories=args.category, countries=args.country, exclude=args.exclude,
                      max_per_category=args.max_per_category, max_per_seller=args.max_per_seller)
    with ServingClient(target, "rest" if args.rest else "grpc", args.timeout) as client:
        try:
            _wait_for_model(client, args.model, args.wait)
            results = client.search(args.model, args.queries, args.k, args.signature, context, filters)
        except ValueError as e:
            raise InputError(str(e)) from None
        except ServingError as e:
            if e.code.name in _USER_ERRORS:
                raise InputError(f"server {target} refused the query: {e}") from None
            print(f"q2e: error: server {target}: {e}. Is `q2e serve` running there?", file=sys.stderr)
            return 1
    for query, hits in zip(args.queries, results):
        print(json.dumps(query, ensure_ascii=False))
        if hits and "engagement_probability" in hits[0]:
            print("  rank. product_id  score  p(engaged)  title")
        for rank, hit in enumerate(hits, start=1):
            title = " ".join(hit["title"].split())
            probability = f"  {hit['engagement_probability']:.3f}" if "engagement_probability" in hit else ""
            print(f"  {rank}. {hit['product_id']}  {hit['score']:.4f}{probability}  {title}")
    return 0


def _wait_for_model(client, model: str, seconds: float) -> None:
    """Returns once `model` has an AVAILABLE version, or after `seconds` (the query then reports the error)."""
    import time

    from tf_q2e.serving.errors import ServingError

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if any(v["state"] == "AVAILABLE" for v in client.status(model)):
                return
        except ServingError:
            pass
        time.sleep(0.5)


def _server_target(server: str | None, rest: bool) -> str:
    if server is None:
        return f"127.0.0.1:{DEFAULT_REST_PORT if rest else DEFAULT_GRPC_PORT}"
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise InputError(f"--server must be HOST:PORT (e.g. 127.0.0.1:8500), got {server!r}")
    return server


def _parse_context(items: list[str]) -> dict[str, str]:
    context = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"--context must be NAME=VALUE (e.g. query_country=US), got {item!r}")
        context[name] = value
    return context
