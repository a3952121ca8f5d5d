"""Builds and runs `serve_latency.cc`: SavedModel signatures timed in TensorFlow's C++ runtime.

`build(out_dir)` compiles the program with the C++ compiler `$CXX` names
(default `g++`) against the installed TensorFlow wheel's headers and
libraries (`tf.sysconfig`, `libtensorflow_cc.so.2`); `run(...)` sends query
strings through signatures, one `Session::Run` per query, as TensorFlow Serving
runs a model, and returns each call's milliseconds, the first query's product
ids and every output of the first queries. A signature's inputs other than
`query` get fixed values: `context` ([1] strings, e.g. `query_country`) and
`inputs` ([1, M] strings or [1] int32, e.g. the filter inputs of
`retrieval_filtered`). `benchmarks/retrieval.py` and `benchmarks/filters.py` time the
exported models with it; `tests/test_export.py` and `tests/test_export_text.py`
check with it that the exported models, ScaNN's and a pretrained text
encoder's included, run outside Python with the same results.

Custom ops are loaded the way a TensorFlow Serving build links them in, with
`TF_LoadLibrary` before the SavedModels load:

* ScaNN's `scann/scann_ops/cc/_scann_ops.so` (`Scann*` ops; the `_scann` model),
  with `scann=True`;
* tensorflow-text's `tensorflow_text/python/ops/_normalize_ops.so`
  (`NormalizeUTF8`) and `_wordpiece_tokenizer.so`
  (`WordpieceTokenizeWithOffsets`), the two ops of the in-graph WordPiece
  tokenizer of `model.text_encoder: minilm` (`tf_q2e/pretrained/tokenizer.py`),
  whenever a SavedModel to run uses one of them (`text_ops=None`, read from
  its `saved_model.pb`). Only these two of tensorflow-text's ~20 op libraries:
  they are the ones the exported graphs use (`TEXT_OPS`; each also registers
  its siblings, e.g. `_normalize_ops.so` CaseFoldUTF8 and
  NormalizeUTF8WithOffsetsMap), and TensorFlow Serving links the same two
  targets (normalize_ops_cc, wordpiece_tokenizer_cc of tensorflow-text's
  `ops_lib`). The files are found in the installed `tensorflow_text` package
  without importing it; a model that needs them when they are missing is a
  `MissingOpLibrary` error that says so before the C++ program runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_latency.cc")

# tensorflow-text's ops in an exported pretrained text encoder, and the library (under
# tensorflow_text/python/ops/) that registers each.
TEXT_OPS = {"NormalizeUTF8": "_normalize_ops.so", "WordpieceTokenizeWithOffsets": "_wordpiece_tokenizer.so"}
TEXT_INSTALL_HINT = "pip install tensorflow-text (the version of the installed TensorFlow, e.g. 2.20.*)"


class MissingOpLibrary(RuntimeError):
    """A SavedModel to run needs a custom-op library that is not installed."""


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


def text_ops_libraries(ops=tuple(TEXT_OPS)) -> list[str]:
    """The paths of the installed tensorflow-text's op libraries that register `ops` (of `TEXT_OPS`),
    found without importing tensorflow_text; `MissingOpLibrary` when the package or a file is missing."""
    spec = importlib.util.find_spec("tensorflow_text")
    if spec is None or not spec.submodule_search_locations:
        raise MissingOpLibrary(f"tensorflow-text's ops {', '.join(sorted(ops))} are needed, but tensorflow_text is not "
                               f"installed: {TEXT_INSTALL_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "python", "ops")
    paths = list(dict.fromkeys(os.path.join(folder, TEXT_OPS[op]) for op in sorted(ops)))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingOpLibrary(f"tensorflow-text's ops {', '.join(sorted(ops))} are needed, but the installed "
                               f"tensorflow_text lacks {', '.join(missing)}: reinstall it ({TEXT_INSTALL_HINT})")
    return paths


def saved_model_ops(path: str) -> set[str]:
    """The op names in a SavedModel's graphs (the graph and every function of its library)."""
    from tensorflow.core.protobuf import saved_model_pb2

    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        model = saved_model_pb2.SavedModel.FromString(f.read())
    ops = set()
    for graph in model.meta_graphs:
        ops.update(node.op for node in graph.graph_def.node)
        ops.update(node.op for function in graph.graph_def.library.function for node in function.node_def)
    return ops


def needed_text_ops(signatures: dict[str, tuple[str, str]]) -> set[str]:
    """The `TEXT_OPS` that the SavedModels of `signatures` ({label: (dir, name)}) use."""
    return {op for path in {p for p, _ in signatures.values()} for op in saved_model_ops(path) & set(TEXT_OPS)}


def run(binary: str, texts: list[str], signatures: dict[str, tuple[str, str]], work: str,
        context: dict[str, str] | None = None, warmup: int = 5, block: int = 25, scann: bool = True,
        text_ops: bool | None = None, record: int = 1, inputs: dict | None = None) -> dict:
    """Times `signatures` ({label: (SavedModel dir, signature name)}) on `texts`, one query per call.

    Returns `{"times_ms": {label: [ms per call]}, "first_product_ids": {label: [ids]},
    "outputs": {label: [{output: np.ndarray}, ...]}, "loaded_ops": {library: [op, ...]}}`:
    product ids for signatures with a `product_ids` output, on `texts[0]`; every
    output of each signature on `texts[:record]`, one query per call.
    `context` gives the other [1] string inputs (e.g. {"query_country": "US"});
    `inputs` gives other inputs by name: a list or tuple of strings is a
    [1, M] string tensor (M = 0 for an empty list; e.g. {"categories":
    ["rugs", "lamps"]}, no value may hold a comma), an integer a [1] int32
    tensor (e.g. {"max_per_category": 3}). A signature takes the values its
    inputs name and ignores the others; a missing one fails the run.
    `scann` loads ScaNN's op library first; `text_ops` loads tensorflow-text's
    (`text_ops_libraries`): None when a SavedModel of `signatures` uses one of
    `TEXT_OPS`, True always, False never. The query file is written in `work`.
    """
    if not texts:
        raise ValueError("serve_latency needs at least one query")
    if any("\n" in t or "\r" in t for t in texts):
        raise ValueError("a query holds a line break; serve_latency reads one query per line")
    libraries = [scann_ops_library()] if scann else []
    if text_ops is None:
        needed = needed_text_ops(signatures)
        if needed:
            try:
                libraries += text_ops_libraries(needed)
            except MissingOpLibrary as e:
                users = sorted(label for label, (path, _) in signatures.items() if saved_model_ops(path) & needed)
                raise MissingOpLibrary(f"{', '.join(users)}: {e} (a model with a pretrained text encoder)") from None
    elif text_ops:
        libraries += text_ops_libraries()
    queries = os.path.join(work, "serve_latency_queries.txt")
    with open(queries, "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")
    command = [binary, queries, str(warmup), str(block), "--record", str(record)]
    for library in libraries:
        command += ["--load-library", library]
    for name, value in (context or {}).items():
        command += ["--context", f"{name}={value}"]
    for name, value in (inputs or {}).items():
        command += _input_flag(name, value)
    command += [f"{label}={path}:{name}" for label, (path, name) in signatures.items()]
    done = subprocess.run(command, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace').strip()[-2000:]}")
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    out["outputs"] = {label: [{name: _array(tensor) for name, tensor in outputs.items()} for outputs in calls]
                      for label, calls in out["outputs"].items()}
    return out


def _input_flag(name: str, value) -> list[str]:
    """serve_latency's flag for a fixed input: `--strings NAME=V1,V2` ([1, M] string) for a list or
    tuple of strings, `--int32 NAME=V` ([1] int32) for an integer."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"input {name}: {value!r} is a bool, not a list of strings or an integer")
    if isinstance(value, (int, np.integer)):
        if not -2**31 <= int(value) < 2**31:
            raise ValueError(f"input {name}: {value} does not fit int32")
        return ["--int32", f"{name}={int(value)}"]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        bad = next((v for v in value if "," in v or "\n" in v or "\r" in v), None)
        if bad is not None:
            raise ValueError(f"input {name}: {bad!r} holds a comma or a line break; serve_latency splits at commas")
        if any(v == "" for v in value) and len(value) == 1:
            raise ValueError(f"input {name}: [''] cannot be told from []; give [] for no value")
        return ["--strings", f"{name}={','.join(value)}"]
    raise ValueError(f"input {name}: {value!r} is neither a list of strings ([1, M] string) nor an integer ([1] int32)")


def _array(tensor: dict | None):
    """serve_latency's {"shape", "values"} as a NumPy array (None for a dtype it does not write)."""
    if tensor is None:
        return None
    values = tensor["values"]
    kind = object if values and isinstance(values[0], str) else None
    return np.array(values, dtype=kind).reshape(tensor["shape"])
