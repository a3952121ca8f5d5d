"""Builds and runs `serve_latency.cc`: SavedModel signatures timed in TensorFlow's C++ runtime.

`build(out_dir)` compiles the program with the C++ compiler `$CXX` names
(default `g++`) against the installed TensorFlow wheel's headers and
libraries (`tf.sysconfig`, `libtensorflow_cc.so.2`); `run(...)` sends query
strings through signatures, one `Session::Run` per query, as TensorFlow Serving
runs a model, and returns each call's milliseconds and the first query's
product ids. `benchmarks/retrieval.py` times the exported models with it;
`tests/test_export.py` checks with it that the exported models, ScaNN's
included, run outside Python with the same results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_latency.cc")


def build(out_dir: str) -> tuple[str | None, str]:
    """Compiles the program into `out_dir`: (path of the binary, "") or (None, why it could not)."""
    import tensorflow as tf

    name = os.environ.get("CXX", "g++")
    compiler = shutil.which(name)
    if compiler is None:
        return None, f"no C++ compiler ({name} not found; set CXX or install g++)"
    binary = os.path.join(out_dir, "serve_latency")
    command = [compiler, "-O2", "-w", *tf.sysconfig.get_compile_flags(), SOURCE, "-o", binary,
               *tf.sysconfig.get_link_flags(), "-l:libtensorflow_cc.so.2", f"-Wl,-rpath,{tf.sysconfig.get_lib()}"]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if done.returncode:
        return None, f"{SOURCE} did not compile ({' '.join(command)}): {done.stderr.strip()[-2000:]}"
    return binary, ""


def scann_ops_library() -> str:
    """The path of ScaNN's TensorFlow op library, the one `scann.scann_ops.py.scann_ops` loads."""
    from scann.scann_ops.py import scann_ops

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(scann_ops.__file__))), "cc", "_scann_ops.so")


def run(binary: str, texts: list[str], signatures: dict[str, tuple[str, str]], work: str,
        context: dict[str, str] | None = None, warmup: int = 5, block: int = 25, scann: bool = True) -> dict:
    """Times `signatures` ({label: (SavedModel dir, signature name)}) on `texts`, one query per call.

    Returns `{"times_ms": {label: [ms per call]}, "first_product_ids": {label: [ids]}}`
    (the second for signatures with a `product_ids` output, on `texts[0]`).
    `context` gives the other string inputs (e.g. {"query_country": "US"});
    `scann` loads ScaNN's op library first. The query file is written in `work`.
    """
    if not texts:
        raise ValueError("serve_latency needs at least one query")
    if any("\n" in t or "\r" in t for t in texts):
        raise ValueError("a query holds a line break; serve_latency reads one query per line")
    queries = os.path.join(work, "serve_latency_queries.txt")
    with open(queries, "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")
    command = [binary, queries, str(warmup), str(block)]
    if scann:
        command += ["--load-library", scann_ops_library()]
    for name, value in (context or {}).items():
        command += ["--context", f"{name}={value}"]
    command += [f"{label}={path}:{name}" for label, (path, name) in signatures.items()]
    done = subprocess.run(command, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace').strip()[-2000:]}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])
