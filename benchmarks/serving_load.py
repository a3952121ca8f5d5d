"""The development server under load, across a version swap.

What it does:

1. Makes a small trained and indexed run (a synthetic marketplace of 5,000
   products and 30,000 impressions, `configs/smoke.yaml` cut to one epoch of
   30 steps, `q2e index` defaults: brute-force ScaNN below 20,000 products,
   K = 100) — or takes `--run RUN`, an existing indexed run — and exports
   version 1 into a fresh TF Serving base directory (`export_run`).
2. Starts `q2e serve --model-base BASE --grpc-port P --rest-port R` as a
   separate process (free loopback ports), so the load generator does not
   share the server's GIL, and waits until `GetModelStatus` says AVAILABLE.
3. Sends `--requests` (10,000) single-query Predict requests from `--clients`
   (16) concurrent clients, spread over `--processes` client processes (each
   runs clients/processes threads, one gRPC channel -- its own TCP
   connection -- or one keep-alive HTTP connection per thread). Every request
   is one query string with its context columns, drawn (seeded) from the
   validation and test splits of the run's data set. Default: gRPC, model
   `q2e_scann`, signature `retrieval` (ScaNN); `--model q2e --signature
   retrieval_exact` and `--protocol rest` are the alternatives. The load is
   closed-loop: each client sends its next request when the previous one is
   answered.
4. When about a third of the requests are answered (`--swap-at`), it runs
   `q2e export --run RUN --out BASE` as a subprocess (version 2 of both
   models), and records when the export finished, when the version directory
   appeared, when the server's status first showed the new version LOADING and
   AVAILABLE (GetModelStatus polled every 50 ms), and from which version every
   response came: over gRPC the `PredictResponse.model_spec.version` the server
   reports per request; over REST, where a predict response carries no
   version, each request first asks `GET /v1/models/<m>` for the newest
   AVAILABLE version and then POSTs to `/v1/models/<m>/versions/<v>:predict`
   (two HTTP calls, both in the latency). Results are compared too: every
   query answered by both versions should get the same products (both
   versions come from the same run). If the new version is not serving yet
   when `--requests` are done, the load goes on until it is, and then for
   another third of `--requests` (at most `--max-seconds`); the total says so.
5. Reports total requests, errors (every distinct message with its count),
   QPS, latency p50/p90/p99/max overall and per window (before the export;
   while the export runs; from its end until the server shows the new version
   AVAILABLE; after), the swap timeline, the server's peak RSS (VmHWM of
   /proc/<pid>/status) and its RSS before and after the swap, the CPU used by
   the server and by each client process (a client process near 100% of one
   core is limited by its own GIL), and PASS/MISS for: 0 errors; >= 10,000
   requests from >= 16 concurrent clients; the new version served under load.

The server process is stopped with SIGTERM (SIGKILL after 30 s) in a finally
block, whatever happens; client processes and the export subprocess too.

Usage:
  .venv/bin/python benchmarks/serving_load.py [--requests 10000] [--clients 16] [--processes 1]
      [--protocol grpc|rest] [--model q2e_scann] [--signature retrieval] [--run RUN]
      [--swap-at 0.33] [--timeout 30] [--max-seconds 900] [--out DIR] [--keep] [--json FILE] [--seed 0]

The work directory (`--out`, default a new temporary directory) holds the
data, the run, the base directory and the logs of the server and the export;
it is removed at the end unless `--keep` (a `--out` that existed before is
never removed). Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf_q2e  # noqa: E402,F401  (Keras 2 before TensorFlow; light: does not import TensorFlow)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = os.path.join(REPO, "configs", "smoke.yaml")
# The smoke config, shortened: the benchmark needs a trained model, not a good one.
TRAIN_OVERRIDES = ["train.epochs=1", "train.steps_per_epoch=30", "train.validation_steps=5"]
PRODUCTS, IMPRESSIONS = 5000, 30000
STATUS_POLL_SECONDS = 0.05
RSS_POLL_SECONDS = 0.5
SERVER_START_SECONDS = 300
TARGET_REQUESTS, TARGET_CLIENTS = 10_000, 16
WINDOWS = ("before", "export", "load", "after")
WINDOW_TITLES = {
    "before": "before the export",
    "export": "export running",
    "load": "export done -> new version AVAILABLE",
    "after": "after the swap",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def q2e_executable() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "q2e")
    return beside if os.path.exists(beside) else (shutil.which("q2e") or "q2e")


# -- the run, its queries and the base directory --------------------------------------------------


def make_run(work: str) -> str:
    """A synthetic data set, a short smoke training and the index; returns the run directory."""
    from tf_q2e.config import load_config
    from tf_q2e.data.synth import generate
    from tf_q2e.index import build_index
    from tf_q2e.train import train

    data, run = os.path.join(work, "data"), os.path.join(work, "run")
    start = time.perf_counter()
    generate(data, products=PRODUCTS, impressions=IMPRESSIONS, seed=0)
    log(f"synthetic data: {PRODUCTS} products, {IMPRESSIONS} impressions in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    train(load_config(SMOKE_CONFIG, TRAIN_OVERRIDES), data, run, verbose=0)
    log(f"trained {os.path.relpath(SMOKE_CONFIG, REPO)} ({', '.join(TRAIN_OVERRIDES)}) in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    meta = build_index(run, log=lambda message: None)
    log(f"indexed {meta['products']} products ({meta['scann']['kind']}, k {meta['k']}) in {time.perf_counter() - start:.1f} s")
    return run


def load_queries(run: str, limit: int = 5000, seed: int = 0) -> list[dict[str, str]]:
    """Distinct query rows (query + query_* context) of the run's validation and test splits (Parquet)."""
    import pyarrow.parquet as pq

    from tf_q2e.data import schema as S
    from tf_q2e.data.validate import dataset_files

    with open(os.path.join(run, "model.json"), encoding="utf-8") as f:
        data_dir = json.load(f).get("data_dir")
    rows: dict[tuple, dict[str, str]] = {}
    try:
        _, splits = dataset_files(data_dir)
        for split in ("validation", "test", "train"):
            if split not in splits or len(rows) >= limit or not splits[split].endswith(".parquet"):
                continue
            table = pq.read_table(splits[split])
            columns = [c for c in table.column_names if c == S.QUERY or S.is_query_context(c)]
            for row in table.select(columns).to_pylist():
                row = {k: "" if v is None else str(v) for k, v in row.items()}
                rows.setdefault(tuple(sorted(row.items())), row)
    except Exception as e:  # noqa: BLE001 - an existing run may have lost its data set: fall back to titles
        log(f"no queries from the run's data set ({type(e).__name__}: {e}); using catalogue titles as queries")
    if not rows:
        from tf_q2e.index import load_index

        return [{S.QUERY: str(t)} for t in load_index(run).titles[:limit]]
    found = list(rows.values())
    random.Random(seed).shuffle(found)
    return found[:limit]


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def process_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (KiB) of a process, from /proc/<pid>/status."""
    found = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# -- the server process ---------------------------------------------------------------------------


class ServerProcess:
    """`q2e serve` in its own process; `stop` sends SIGTERM (SIGKILL after 30 s)."""

    def __init__(self, base: str, log_path: str) -> None:
        self.base = base
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.grpc_port = self.rest_port = 0
        self.started_at = 0.0

    def start(self, model: str, attempts: int = 3) -> None:
        for attempt in range(attempts):
            self.grpc_port, self.rest_port = free_ports(2)
            command = [q2e_executable(), "serve", "--model-base", self.base,
                       "--grpc-port", str(self.grpc_port), "--rest-port", str(self.rest_port)]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1")  # the server's own default: warnings and errors stay in its log
            with open(self.log_path, "a", encoding="utf-8") as out:
                self.started_at = time.monotonic()
                self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL)
            log(f"started q2e serve (pid {self.proc.pid}) on gRPC 127.0.0.1:{self.grpc_port}, REST :{self.rest_port}")
            if self.wait_available(model):
                return
            if "cannot bind" not in self.log_tail() or attempt == attempts - 1:
                raise RuntimeError(f"q2e serve did not serve '{model}'; the end of its log:\n{self.log_tail()}")
            log("a port was taken meanwhile; retrying with other ports")

    def wait_available(self, model: str) -> bool:
        from tf_q2e.serving.client import ServingClient
        from tf_q2e.serving.errors import ServingError

        deadline = time.monotonic() + SERVER_START_SECONDS
        with ServingClient(f"127.0.0.1:{self.grpc_port}", "grpc", timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if any(v["state"] == "AVAILABLE" for v in client.status(model)):
                        log(f"'{model}' AVAILABLE {time.monotonic() - self.started_at:.1f} s after the server started")
                        return True
                except ServingError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"q2e serve did not make '{model}' AVAILABLE within {SERVER_START_SECONDS} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log(f"q2e serve (pid {self.proc.pid}) ignored SIGTERM for 30 s; killing it")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- the clients (worker processes; started with "spawn", so they import only what they need) -----


def client_process(index: int, settings: dict, queries: list[dict[str, str]], issued, done, limit,
                   start_event, results) -> None:
    """One client process: `settings["threads"]` closed-loop clients; puts its records on `results`."""
    try:
        import tf_q2e  # noqa: F401

        records: list[list] = []
        lock = threading.Lock()
        senders = [_make_sender(settings, queries) for _ in range(settings["threads"])]
        results.put(("ready", index, os.getpid()))
        start_event.wait()
        cpu0, wall0 = os.times(), time.monotonic()

        def run(thread: int) -> None:
            rng = random.Random(settings["seed"] * 1000 + index * 100 + thread)
            send = senders[thread]
            mine = []
            while True:
                with issued.get_lock():
                    if issued.value >= limit.value:
                        break
                    issued.value += 1
                q = rng.randrange(len(queries))
                start = time.monotonic()
                try:
                    version, digest = send(q)
                    error = None
                except Exception as e:  # noqa: BLE001 - every failure is a counted error
                    version, digest, error = 0, 0, _error_text(e)
                end = time.monotonic()
                with done.get_lock():
                    done.value += 1
                mine.append([start, end, q, version, digest, error, index * 1000 + thread])
            with lock:
                records.extend(mine)

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(settings["threads"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu1 = os.times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        results.put(("result", index, records, cpu, time.monotonic() - wall0))
    except BaseException:  # noqa: BLE001 - the coordinator must hear of it, not wait forever
        results.put(("crash", index, traceback.format_exc()))


def _error_text(error: Exception) -> str:
    import grpc

    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _make_sender(settings: dict, queries: list[dict[str, str]]):
    """A function of a query index -> (served version, digest of the outputs), for one client thread."""
    if settings["protocol"] == "grpc":
        return _grpc_sender(settings, queries)
    return _rest_sender(settings, queries)


def _grpc_sender(settings: dict, queries: list[dict[str, str]]):
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    # One channel per client thread, on its own TCP connection (no shared subchannel pool).
    options = [("grpc.max_receive_message_length", -1), ("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
    channel = grpc.insecure_channel(settings["target"], options=options)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    requests = []
    for row in queries:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = settings["model"]
        request.model_spec.signature_name = settings["signature"]
        for name in settings["inputs"]:
            value = row.get(name, "").encode("utf-8")
            request.inputs[name].CopyFrom(tf.make_tensor_proto(np.array([value], dtype=object)))
        requests.append(request)
    timeout = settings["timeout"]

    def send(q: int) -> tuple[int, int]:
        response = stub.Predict(requests[q], timeout=timeout)
        digest = 0
        for name in sorted(response.outputs):
            digest = zlib.crc32(response.outputs[name].SerializeToString(deterministic=True), digest)
        return response.model_spec.version.value, digest

    return send


def _rest_sender(settings: dict, queries: list[dict[str, str]]):
    import http.client
    import urllib.parse

    host, port = settings["target"].rsplit(":", 1)
    model_path = f"/v1/models/{urllib.parse.quote(settings['model'], safe='')}"
    bodies = [json.dumps({"signature_name": settings["signature"],
                          "inputs": {name: [row.get(name, "")] for name in settings["inputs"]}}).encode("utf-8")
              for row in queries]
    state = {"connection": None}

    class HttpError(Exception):
        pass

    def call(method: str, path: str, body: bytes | None = None):
        for attempt in (0, 1):  # a kept-alive connection the server closed is reopened once
            if state["connection"] is None:
                state["connection"] = http.client.HTTPConnection(host, int(port), timeout=settings["timeout"])
            connection = state["connection"]
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                connection.close()
                state["connection"] = None
                if attempt:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                state["connection"] = None
            if response.status != 200:
                try:
                    message = json.loads(data)["error"]
                except (ValueError, KeyError, TypeError):
                    message = data[:300].decode("utf-8", "replace")
                raise HttpError(f"HTTP {response.status} from {method} {path.split('/versions')[0]}...: {message}")
            return data
        raise AssertionError("unreachable")

    def send(q: int) -> tuple[int, int]:
        status = json.loads(call("GET", model_path))
        versions = [int(row["version"]) for row in status.get("model_version_status", []) if row.get("state") == "AVAILABLE"]
        if not versions:
            raise HttpError(f"no AVAILABLE version in the status: {status}")
        version = max(versions)
        data = call("POST", f"{model_path}/versions/{version}:predict", bodies[q])
        outputs = json.loads(data).get("outputs")
        return version, zlib.crc32(json.dumps(outputs, sort_keys=True).encode("utf-8"))

    return send


# -- the coordinator's monitor: status, version directory, RSS ------------------------------------


class Monitor(threading.Thread):
    """Polls GetModelStatus of each model (every 50 ms), the new version's directories and the server's RSS.

    `models` lists the model under load first; the others (the second model
    every export writes) are watched for the timeline only.
    """

    def __init__(self, target: str, models: list[str], base: str, old_version: int, server_pid: int) -> None:
        super().__init__(name="monitor", daemon=True)
        self.target, self.models, self.base = target, models, base
        self.old_version = old_version
        self.new_version = old_version + 1
        self.pid = server_pid
        self.stopped = threading.Event()
        # model -> (version, state) -> when first seen
        self.first_seen: dict[str, dict[tuple[int, str], float]] = {m: {} for m in models}
        self.dir_seen: dict[str, float] = {}
        self.status_errors: Counter = Counter()
        self.rss: list[tuple[float, int]] = []
        self.polls = 0

    def run(self) -> None:
        from tf_q2e.serving.client import ServingClient
        from tf_q2e.serving.errors import ServingError

        version_dirs = {m: os.path.join(self.base, m, str(self.new_version), "saved_model.pb") for m in self.models}
        last_rss = 0.0
        with ServingClient(self.target, "grpc", timeout=5.0) as client:
            while not self.stopped.is_set():
                now = time.monotonic()
                for model in self.models:
                    try:
                        rows = client.status(model)
                        seen = time.monotonic()
                        for row in rows:
                            self.first_seen[model].setdefault((row["version"], row["state"]), seen)
                    except ServingError as e:
                        self.status_errors[f"{model}: {e}"] += 1
                    if model not in self.dir_seen and os.path.exists(version_dirs[model]):
                        self.dir_seen[model] = time.monotonic()
                self.polls += 1
                if now - last_rss >= RSS_POLL_SECONDS:
                    rss = process_status(self.pid).get("VmRSS")
                    if rss is not None:
                        self.rss.append((now, rss))
                    last_rss = now
                self.stopped.wait(max(0.0, STATUS_POLL_SECONDS - (time.monotonic() - now)))

    def seen(self, version: int, state: str, model: str | None = None) -> float | None:
        return self.first_seen[model or self.models[0]].get((version, state))


# -- the load, the swap and the report ------------------------------------------------------------


def run_load(args, server: ServerProcess, run: str, base: str, work: str, queries, inputs, old_version: int,
             exported_models: list[str]) -> dict:
    """Runs the clients, the swap in the middle and the monitor; returns the raw measurements."""
    ctx = mp.get_context("spawn")
    target_port = server.grpc_port if args.protocol == "grpc" else server.rest_port
    settings = {"target": f"127.0.0.1:{target_port}", "protocol": args.protocol, "model": args.model,
                "signature": args.signature, "inputs": inputs, "timeout": args.timeout, "seed": args.seed}
    threads_per_process = [args.clients // args.processes + (1 if i < args.clients % args.processes else 0)
                           for i in range(args.processes)]
    # `issued` and `done` are locked counters; `limit` is a plain shared integer (one aligned 8-byte word,
    # written only here), read by the clients while they hold `issued`'s lock: never two locks nested.
    issued, done, limit = ctx.Value("q", 0), ctx.Value("q", 0), ctx.RawValue("q", args.requests)
    start_event, results = ctx.Event(), ctx.Queue()
    workers = []
    export_proc = None
    others = [m for m in exported_models if m != args.model]
    monitor = Monitor(f"127.0.0.1:{server.grpc_port}", [args.model, *others], base, old_version, server.proc.pid)
    try:
        for i, threads in enumerate(threads_per_process):
            p = ctx.Process(target=client_process, name=f"client-{i}",
                            args=(i, dict(settings, threads=threads), queries, issued, done, limit, start_event, results))
            p.start()
            workers.append(p)
        ready = 0
        deadline = time.monotonic() + 300
        while ready < len(workers):
            message = _next_message(results, workers, deadline)
            if message[0] == "crash":
                raise RuntimeError(f"client process {message[1]} failed:\n{message[2]}")
            ready += message[0] == "ready"
        log(f"{len(workers)} client process(es) ready ({'+'.join(map(str, threads_per_process))} threads); load starts")
        monitor.start()
        server_cpu0 = process_cpu_seconds(server.proc.pid)
        t0 = time.monotonic()
        start_event.set()

        swap_at = max(1, round(args.requests * args.swap_at))
        export = {"started": None, "finished": None, "returncode": None, "done_at_start": None}
        extended, after_set = False, False
        outputs: dict[int, tuple] = {}
        export_log = os.path.join(work, "export-v2.log")
        while len(outputs) < len(workers):
            try:
                message = results.get(timeout=0.05)
            except queue.Empty:
                message = None
            if message is not None:
                if message[0] == "crash":
                    raise RuntimeError(f"client process {message[1]} failed:\n{message[2]}")
                if message[0] == "result":
                    outputs[message[1]] = message[2:]
            for p in workers:
                if p.exitcode not in (None, 0) and p.name not in [f"client-{i}" for i in outputs]:
                    raise RuntimeError(f"{p.name} exited with code {p.exitcode}")
            if server.proc.poll() is not None:
                raise RuntimeError(f"q2e serve exited with code {server.proc.returncode} under load:\n{server.log_tail()}")
            now = time.monotonic()
            if now - t0 > args.max_seconds + 2 * args.timeout + 30:
                raise RuntimeError(f"the clients did not finish within --max-seconds {args.max_seconds} (+ two timeouts)")
            if export["started"] is None and done.value >= swap_at:
                export["started"], export["done_at_start"] = now, done.value
                log(f"{done.value} requests answered: exporting version {old_version + 1} (q2e export, a subprocess)")
                with open(export_log, "w", encoding="utf-8") as out:
                    export_proc = subprocess.Popen([q2e_executable(), "export", "--run", run, "--out", base],
                                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if export_proc is not None and export["finished"] is None and export_proc.poll() is not None:
                export["finished"], export["returncode"] = now, export_proc.returncode
                log(f"export finished (exit code {export_proc.returncode}) after {now - export['started']:.1f} s")
            available = monitor.seen(old_version + 1, "AVAILABLE")
            failed = export["returncode"] not in (None, 0) or monitor.seen(old_version + 1, "END") is not None
            if now - t0 > args.max_seconds:
                limit.value = min(limit.value, issued.value)
            elif available is not None and not after_set:
                after_set = True
                limit.value = max(args.requests, done.value + math.ceil(args.requests / 3))
                extended = limit.value > args.requests
                log(f"'{args.model}' version {old_version + 1} AVAILABLE; load runs to {limit.value} requests")
            elif available is None and not failed and not after_set:
                issued_now = issued.value  # keep the load going until the new version serves
                if limit.value - issued_now < 500:
                    limit.value = issued_now + 1000
                    extended = True
            elif failed and not after_set:
                after_set = True
                limit.value = max(args.requests, issued.value)
        t_end = time.monotonic()
        server_cpu = process_cpu_seconds(server.proc.pid) - server_cpu0
        monitor.stopped.set()
        monitor.join(10)
        for p in workers:
            p.join(30)
    finally:
        monitor.stopped.set()
        start_event.set()
        limit.value = 0
        for p in workers:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
        if export_proc is not None and export_proc.poll() is None:
            export_proc.terminate()
            try:
                export_proc.wait(30)
            except subprocess.TimeoutExpired:
                export_proc.kill()
                export_proc.wait()
    records = [r for i in sorted(outputs) for r in outputs[i][0]]
    clients_cpu = [(outputs[i][1], outputs[i][2], threads_per_process[i]) for i in sorted(outputs)]
    return {"t0": t0, "t_end": t_end, "records": records, "clients_cpu": clients_cpu, "server_cpu": server_cpu,
            "export": export, "export_log": export_log, "monitor": monitor, "extended": extended,
            "threads_per_process": threads_per_process, "swap_at": swap_at}


def _next_message(results, workers, deadline: float):
    while True:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in workers if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode} before it was ready") from None
            if time.monotonic() > deadline:
                raise RuntimeError("client processes were not ready within 300 s") from None


def latency_summary(latencies_ms: list[float], seconds: float | None = None) -> dict:
    import numpy as np

    if not latencies_ms:
        return {"requests": 0}
    values = np.asarray(latencies_ms, np.float64)
    out = {"requests": int(values.size), "p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
           "p99_ms": float(np.percentile(values, 99)), "max_ms": float(values.max())}
    if seconds:
        out["seconds"] = seconds
        out["qps"] = values.size / seconds
    return out


def analyse(raw: dict, old_version: int) -> dict:
    records, monitor, export = raw["records"], raw["monitor"], raw["export"]
    new_version = old_version + 1
    t0 = min(r[0] for r in records)
    t_last = max(r[1] for r in records)
    rel = lambda t: None if t is None else round(t - t0, 3)  # noqa: E731
    errors = Counter(r[5] for r in records if r[5] is not None)
    versions = Counter(r[3] for r in records if r[5] is None)
    new_ok = [r for r in records if r[5] is None and r[3] == new_version]
    old_ok = [r for r in records if r[5] is None and r[3] == old_version]
    t_available = monitor.seen(new_version, "AVAILABLE")
    first_new = min(new_ok, key=lambda r: r[1]) if new_ok else None
    last_old = max(old_ok, key=lambda r: r[1]) if old_ok else None
    # The first start time after which every answered request came from the new version.
    all_new_from = None
    if new_ok:
        last_old_start = max((r[0] for r in old_ok), default=t0)
        later_new = [r[0] for r in new_ok if r[0] > last_old_start]
        all_new_from = min(later_new) if later_new else None

    bounds = {"before": (t0, export["started"]), "export": (export["started"], export["finished"]),
              "load": (export["finished"], t_available), "after": (t_available, t_last)}
    windows = {}
    for name in WINDOWS:
        lo, hi = bounds[name]
        if lo is None:
            windows[name] = {"requests": 0}
            continue
        hi = t_last if hi is None else hi
        if name == "load" and t_available is None:
            hi = t_last
        chosen = [r for r in records if lo <= r[0] < hi] if name != "after" else [r for r in records if r[0] >= lo]
        ok = [(r[1] - r[0]) * 1000 for r in chosen if r[5] is None]
        completed = sum(1 for r in records if lo <= r[1] < hi) if name != "after" else sum(1 for r in records if r[1] >= lo)
        summary = latency_summary(ok)
        summary.update({"requests": len(chosen), "errors": sum(1 for r in chosen if r[5] is not None),
                        "from": rel(lo), "to": rel(hi), "seconds": hi - lo,
                        "qps": completed / (hi - lo) if hi > lo else None,
                        "versions": dict(Counter(r[3] for r in chosen if r[5] is None))})
        windows[name] = summary
    overall = latency_summary([(r[1] - r[0]) * 1000 for r in records if r[5] is None])
    overall.update({"requests": len(records), "errors": sum(errors.values()), "seconds": t_last - t0,
                    "qps": len(records) / (t_last - t0)})

    # Results of the same query from both versions.
    by_query: dict[int, dict[int, set]] = {}
    for r in records:
        if r[5] is None:
            by_query.setdefault(r[2], {}).setdefault(r[3], set()).add(r[4])
    both = [q for q, v in by_query.items() if old_version in v and new_version in v]
    same = sum(1 for q in both if by_query[q][old_version] == by_query[q][new_version])
    unstable = sum(1 for v in by_query.values() for digests in v.values() if len(digests) > 1)

    rss = monitor.rss
    rss_before = [kb for t, kb in rss if export["started"] is None or t < export["started"]]
    rss_after = [kb for t, kb in rss if t_available is not None and t >= t_available]
    timeline = {
        "export_started": rel(export["started"]),
        "answered_at_export_start": export["done_at_start"],
        "version_dir_appeared": rel(monitor.dir_seen.get(monitor.models[0])),
        "export_finished": rel(export["finished"]),
        "export_returncode": export["returncode"],
        "status_loading_first_seen": rel(monitor.seen(new_version, "LOADING")),
        "status_available_first_seen": rel(t_available),
        "status_end_first_seen": rel(monitor.seen(new_version, "END")),
        "first_response_from_new_version": rel(first_new[1]) if first_new else None,
        "first_request_answered_by_new_version_started": rel(first_new[0]) if first_new else None,
        "last_response_from_old_version": rel(last_old[1]) if last_old else None,
        "all_responses_from_new_version_for_requests_started_after": rel(all_new_from),
        "old_version_responses_after_available": sum(1 for r in old_ok if t_available is not None and r[1] >= t_available),
        "other_models": {m: {"version_dir_appeared": rel(monitor.dir_seen.get(m)),
                             "status_loading_first_seen": rel(monitor.seen(new_version, "LOADING", m)),
                             "status_available_first_seen": rel(monitor.seen(new_version, "AVAILABLE", m)),
                             "status_end_first_seen": rel(monitor.seen(new_version, "END", m))}
                         for m in monitor.models[1:]},
        "status_polls": monitor.polls,
        "status_poll_errors": dict(monitor.status_errors),
    }
    return {"overall": overall, "windows": windows, "timeline": timeline, "errors": dict(errors.most_common()),
            "responses_by_version": {str(k): v for k, v in sorted(versions.items())},
            "result_check": {"queries_answered_by_both_versions": len(both), "identical_results": same,
                             "queries_with_differing_results_within_one_version": unstable},
            "server_rss_mb": {"before_swap_max": max(rss_before) / 1024 if rss_before else None,
                              "after_swap_max": max(rss_after) / 1024 if rss_after else None},
            "clients": len({r[6] for r in records})}


def server_log_events(path: str) -> list[str]:
    keep = ("loaded model", "unloaded model", "could not load", "rescan", "internal error", "Traceback", "Error")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip() for line in f if "q2e serve:" in line and any(k in line for k in keep)
                    or line.startswith("Traceback")]
    except OSError:
        return []


def fmt(value, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def print_report(args, setup: dict, result: dict, raw: dict) -> None:
    overall, timeline = result["overall"], result["timeline"]
    print("== q2e serve under load, across a version swap ==")
    print(f"run {setup['run']}{' (made here)' if setup['made_run'] else ''}; base {setup['base']}")
    print(f"server: q2e serve (pid {setup['server_pid']}), separate process; {setup['queries']} distinct query rows "
          f"(inputs {', '.join(setup['inputs'])})")
    print(f"load: {args.protocol} Predict, model '{args.model}', signature '{args.signature}', 1 query per request, "
          f"closed loop; {args.clients} clients = {args.processes} process(es) x "
          f"{'+'.join(map(str, raw['threads_per_process']))} threads")
    print(f"swap: q2e export of version {setup['old_version'] + 1} started after {timeline['answered_at_export_start']} "
          f"answered requests (--swap-at {args.swap_at:.3g})")
    print()
    extended = " (load extended until the new version served, then +1/3)" if raw["extended"] else ""
    print(f"requests   {overall['requests']}{extended}")
    print(f"errors     {overall['errors']}")
    for message, count in result["errors"].items():
        print(f"  {count:6d} x {message}")
    print(f"duration   {overall['seconds']:.1f} s")
    print(f"QPS        {overall['qps']:.0f}")
    print("responses by served version: " + ", ".join(f"v{k}: {v}" for k, v in result["responses_by_version"].items()))
    print()
    print(f"{'latency (ms)':<40} {'reqs':>6} {'errs':>5} {'QPS':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8}")
    rows = [("overall", overall)] + [(f"{WINDOW_TITLES[n]} [{fmt(w.get('from'), 1)}-{fmt(w.get('to'), 1)} s]", w)
                                     for n, w in result["windows"].items()]
    for title, w in rows:
        if not w.get("requests"):
            print(f"{title:<40} {0:>6}")
            continue
        print(f"{title:<40} {w['requests']:>6} {w['errors']:>5} {fmt(w.get('qps'), 0):>6} {fmt(w.get('p50_ms'), 2):>7} "
              f"{fmt(w.get('p90_ms'), 2):>7} {fmt(w.get('p99_ms'), 2):>7} {fmt(w.get('max_ms'), 1):>8}")
    print()
    print("swap timeline (seconds from the first request):")
    lines = [
        ("export started (q2e export subprocess)", timeline["export_started"]),
        (f"version directory {args.model}/{setup['old_version'] + 1} appeared", timeline["version_dir_appeared"]),
        (f"export finished (exit code {timeline['export_returncode']})", timeline["export_finished"]),
        ("status first showed the new version LOADING", timeline["status_loading_first_seen"]),
        ("status first showed the new version AVAILABLE", timeline["status_available_first_seen"]),
        ("first response from the new version (request sent at "
         f"{fmt(timeline['first_request_answered_by_new_version_started'], 3)})", timeline["first_response_from_new_version"]),
        ("last response from the old version", timeline["last_response_from_old_version"]),
        ("every request sent from here on: new version", timeline["all_responses_from_new_version_for_requests_started_after"]),
    ]
    if timeline["status_end_first_seen"] is not None:
        lines.append(("status showed the new version END (failed)", timeline["status_end_first_seen"]))
    for other, events in timeline["other_models"].items():
        lines += [(f"  (other model) {other}/{setup['old_version'] + 1} directory appeared", events["version_dir_appeared"]),
                  (f"  (other model) {other} new version LOADING", events["status_loading_first_seen"]),
                  (f"  (other model) {other} new version AVAILABLE", events["status_available_first_seen"])]
        if events["status_end_first_seen"] is not None:
            lines.append((f"  (other model) {other} new version END (failed)", events["status_end_first_seen"]))
    lines.sort(key=lambda item: float("inf") if item[1] is None else item[1])
    for title, value in lines:
        print(f"  {fmt(value, 3):>9}  {title}")
    print(f"  old-version responses after AVAILABLE: {timeline['old_version_responses_after_available']}; "
          f"status polls {timeline['status_polls']}"
          + (f", status poll errors {timeline['status_poll_errors']}" if timeline["status_poll_errors"] else ""))
    check = result["result_check"]
    print(f"  results: {check['identical_results']} of {check['queries_answered_by_both_versions']} queries answered by both "
          f"versions got identical outputs")
    events = setup.get("server_log_events") or []
    if events:
        print("server log (load/unload lines):")
        for line in events:
            print(f"  {line}")
    print()
    rss = result["server_rss_mb"]
    print(f"server peak RSS (VmHWM) {setup['server_vmhwm_mb']:.0f} MB; RSS max before the swap {fmt(rss['before_swap_max'], 0)} MB, "
          f"after {fmt(rss['after_swap_max'], 0)} MB")
    wall = overall["seconds"]
    print(f"CPU during the load ({wall:.1f} s wall, 2 cores shared): server {raw['server_cpu']:.1f} s "
          f"({raw['server_cpu'] / wall * 100:.0f}% of one core)")
    for i, (cpu, seconds, threads) in enumerate(raw["clients_cpu"]):
        print(f"  client process {i} ({threads} threads): {cpu:.1f} s ({cpu / seconds * 100:.0f}% of one core)")
    print()
    for name, ok in setup["checks"].items():
        print(f"{'PASS' if ok else 'MISS'}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=TARGET_REQUESTS, help="requests to send (default 10000)")
    parser.add_argument("--clients", type=int, default=TARGET_CLIENTS, help="concurrent clients (default 16)")
    parser.add_argument("--processes", type=int, default=1,
                        help="client processes the clients are spread over (default 1: 16 threads in one process "
                             "use ~10-20%% of a core, far from the client's GIL limit)")
    parser.add_argument("--protocol", choices=("grpc", "rest"), default="grpc")
    parser.add_argument("--model", default="q2e_scann", help="model (default q2e_scann; q2e for the stock-op model)")
    parser.add_argument("--signature", default="retrieval", help="signature (default retrieval; retrieval_exact on q2e)")
    parser.add_argument("--run", help="an existing trained and indexed run (default: make a small one)")
    parser.add_argument("--swap-at", type=float, default=1 / 3, help="fraction of --requests answered before the export")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="longest the load may run (default 900)")
    parser.add_argument("--out", help="work directory (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.clients < 1 or args.requests < 1 or not 1 <= args.processes <= args.clients:
        parser.error("--requests and --clients must be >= 1, and 1 <= --processes <= --clients")
    if not 0 < args.swap_at < 1:
        parser.error("--swap-at must be between 0 and 1")
    existed = args.out is not None and os.path.exists(args.out)
    work = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="q2e-serving-load-")
    os.makedirs(work, exist_ok=True)
    server = ServerProcess(os.path.join(work, "serving"), os.path.join(work, "server.log"))
    wall0 = time.perf_counter()
    try:
        run = os.path.abspath(args.run) if args.run else make_run(work)
        from tf_q2e.savedmodels import export_run

        base = os.path.join(work, "serving")
        if os.path.exists(base):
            shutil.rmtree(base)
        start = time.perf_counter()
        exported = export_run(run, base, log=lambda message: None)
        old_version = exported["version"]
        log(f"exported version {old_version} ({', '.join(exported['models'])}, k {exported['k']}) in "
            f"{time.perf_counter() - start:.1f} s")
        queries = load_queries(run, seed=args.seed)
        server.start(args.model)

        from tf_q2e.serving.client import ServingClient

        with ServingClient(f"127.0.0.1:{server.grpc_port}", "grpc", timeout=10.0) as client:
            signatures = client.metadata(args.model)["signatures"]
        if args.signature not in signatures:
            raise SystemExit(f"model '{args.model}' has no signature '{args.signature}' (it has: {', '.join(sorted(signatures))})")
        inputs = sorted(signatures[args.signature]["inputs"])
        raw = run_load(args, server, run, base, work, queries, inputs, old_version, list(exported["models"]))
        vmhwm = process_status(server.proc.pid).get("VmHWM", 0) / 1024
        result = analyse(raw, old_version)
        checks = {
            "0 errors": result["overall"]["errors"] == 0,
            f">= {TARGET_REQUESTS:,} requests from >= {TARGET_CLIENTS} concurrent clients":
                result["overall"]["requests"] >= TARGET_REQUESTS and result["clients"] >= TARGET_CLIENTS,
            "the new version served under load (status AVAILABLE and responses from it)":
                result["timeline"]["status_available_first_seen"] is not None
                and result["timeline"]["first_response_from_new_version"] is not None,
        }
        setup = {"run": run, "made_run": not args.run, "base": base, "server_pid": server.proc.pid, "queries": len(queries),
                 "inputs": inputs, "old_version": old_version, "server_vmhwm_mb": vmhwm, "checks": checks}
        returncode = server.stop()
        setup["server_log_events"] = server_log_events(server.log_path)
        setup["server_returncode"] = returncode
        print_report(args, setup, result, raw)
        total = time.perf_counter() - wall0
        print(f"\nwall time of the whole benchmark: {total:.0f} s (server stopped with SIGTERM, exit code {returncode})")
        if args.json:
            document = {"settings": vars(args), "setup": setup, **result, "server_cpu_seconds": raw["server_cpu"],
                        "client_processes": [{"cpu_seconds": c, "seconds": s, "threads": t} for c, s, t in raw["clients_cpu"]],
                        "extended": raw["extended"], "wall_seconds": total}
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=2, default=str)
        return 0 if all(checks.values()) else 1
    finally:
        server.stop()
        if not args.keep and not existed:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            log(f"kept the work directory {work}")


if __name__ == "__main__":
    sys.exit(main())
