"""Malformed input through every entry point: each gets a clear error (or is clearly accepted), never a crash.

Entry points and what "clear" means for each:

* the readers, through `q2e validate --data DIR` on tiny data sets written here:
  exit 2 and one line on stderr naming the file (and the row and column where
  there is one); or exit 0 where the package accepts the input;
* config files and `--set`, through `q2e validate`: exit 2, one line naming the
  config file or the dotted field;
* command-line arguments: exit 2 naming the argument;
* the exported signatures of a tiny trained model, called in process: a
  TensorFlow error naming the input or the tower, or a well-shaped answer;
* the development server (`ModelServer`) through gRPC, REST and
  `ServingClient`: the gRPC code / HTTP status and a message naming the input;
  afterwards the server still answers a good request. Only what
  tests/test_serving.py does not cover already.

Cases that show a bug in the package are `xfail(strict=True)` with the cause in
the reason; they assert the correct behaviour.
"""

from __future__ import annotations

import base64
import http.client
import importlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from conftest import good_impressions, product, write_dataset
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)
from test_serving import raw_predict, rest_call, strings

from tf_q2e.cli import main
from tf_q2e.config import load_config
from tf_q2e.data.synth import generate
from tf_q2e.savedmodels import export_run
from tf_q2e.index import build_index
from tf_q2e.serving.client import ServingClient
from tf_q2e.serving.errors import ServingError
from tf_q2e.serving.server import ModelServer
from tf_q2e.train import train

ONE_MB_QUERY = "grey jute rug " * 75_000  # 1,050,000 characters
BAD_ROW = 3  # the 1-based data row a reader case spoils


# =========================================================================== command-line cases


@dataclass(frozen=True)
class CliCase:
    """One malformed input given to `q2e`, and what the command must answer.

    argv builds the arguments (writing any files under tmp_path); words must
    appear on stderr (exit 2) or stdout (exit 0).
    """

    name: str
    argv: Callable[[str], list[str]]
    code: int
    words: tuple[str, ...]
    one_line: bool = True  # argparse's own errors print the usage line first
    bug: str | None = None


def _param(case: CliCase):
    marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.name, marks=marks)


def _run_case(case: CliCase, tmp_path, capsys) -> None:
    argv = case.argv(str(tmp_path))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == case.code, f"exit {code} for q2e {' '.join(argv)[:300]}\nstdout: {out[-1500:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    text = err if case.code else out
    for words in case.words:
        assert words in text, f"{words!r} not in:\n{text[-3000:]}"
    if case.code == 2:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("q2e"), err
        if case.one_line:
            assert len(lines) == 1 and lines[0].startswith("q2e: error: "), err


# --------------------------------------------------------------------------- readers: q2e validate --data DIR


def _dataset(root: str, suffix: str = ".parquet", rows: list[dict] | None = None, catalog: list[dict] | None = None,
             edit: Callable[[str], None] | None = None) -> str:
    """A tiny data set (5 products, 6 impressions); `edit` then spoils DIR/train<suffix>."""
    data = write_dataset(os.path.join(root, "d"), rows if rows is not None else good_impressions(6), suffix, catalog)
    if edit is not None:
        edit(os.path.join(data, "train" + suffix))
    return data


def _validate(**kwargs) -> Callable[[str], list[str]]:
    return lambda root: ["validate", "--data", _dataset(root, **kwargs)]


def _rows_with(column: str, value) -> list[dict]:
    rows = good_impressions(6)
    rows[BAD_ROW - 1] = {**rows[BAD_ROW - 1], column: value}
    return rows


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _empty(path: str) -> None:
    open(path, "wb").close()


def _corrupt_pages(path: str) -> None:
    """Flips bytes after the magic number: the footer still parses, the first data pages do not."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for i in range(20, 200):
        data[i] ^= 0x5A
    with open(path, "wb") as f:
        f.write(bytes(data))


def _edit_lines(change: Callable[[list[bytes]], list[bytes]]) -> Callable[[str], None]:
    def edit(path: str) -> None:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        with open(path, "wb") as f:
            f.write(b"".join(change(lines)))

    return edit


def _set_line(number: int, line: bytes) -> Callable[[str], None]:
    """Replaces line `number` (0 = the header of a CSV; data row r is line r in CSV, r - 1 in JSONL)."""
    return _edit_lines(lambda lines: lines[:number] + [line] + lines[number + 1:])


def _prepend_bom(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)


def _bom_dataset(suffix: str, catalog: bool) -> Callable[[str], list[str]]:
    def argv(root: str) -> list[str]:
        data = _dataset(root, suffix, edit=_prepend_bom)
        if catalog:
            _prepend_bom(os.path.join(data, "catalog" + suffix))
        return ["validate", "--data", data]

    return argv


def _replace_bytes(old: bytes, new: bytes) -> Callable[[str], None]:
    def edit(path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        assert old in data
        with open(path, "wb") as f:
            f.write(data.replace(old, new, 1))

    return edit


def _duplicate_parquet_column(path: str) -> None:
    table = pa.Table.from_pylist(good_impressions(6))
    table = pa.Table.from_arrays(table.columns + [table.column("query")], names=table.column_names + ["query"])
    pq.write_table(table, path)


def _typed_parquet(column: str, values: list, type_: pa.DataType) -> Callable[[str], None]:
    def edit(path: str) -> None:
        table = pa.Table.from_pylist(good_impressions(6))
        index = table.column_names.index(column)
        pq.write_table(table.set_column(index, column, pa.array(values, type_)), path)

    return edit


def _train_is_a_directory(root: str) -> list[str]:
    data = _dataset(root, ".csv")
    os.remove(os.path.join(data, "train.csv"))
    os.mkdir(os.path.join(data, "train.csv"))
    return ["validate", "--data", data]


def _random_tfrecord(path: str) -> None:
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(300))


def _without_images(rows: list[dict]) -> list[dict]:
    return [{**row, "product_image_embedding": []} for row in rows]


def _empty_catalogue_id() -> list[dict]:
    catalog = [product(i) for i in range(5)]
    catalog[1]["product_id"] = ""
    return catalog


def _jsonl_row(**changes) -> Callable[[str], None]:
    """Rewrites row BAD_ROW of a JSONL file as written by json.dumps, so a value may be of any JSON type."""
    return _set_line(BAD_ROW - 1, json.dumps({**good_impressions(6)[BAD_ROW - 1], **changes}).encode() + b"\n")


_NESTED_LINE = b"[" * 100_000 + b"]" * 100_000 + b"\n"
# Python's int <-> str conversion stops at 4300 digits, so the line is spliced as text.
_LONG_LABEL_LINE = json.dumps(good_impressions(6)[BAD_ROW - 1]).replace('"engaged": -1', '"engaged": ' + "1" * 5000).encode() + b"\n"

READER_CASES = [
    CliCase("parquet truncated", _validate(edit=_truncate), 2,
            ("train.parquet: not a readable Parquet file",)),
    CliCase("parquet of zero bytes", _validate(edit=_empty), 2,
            ("train.parquet: not a readable Parquet file",)),
    CliCase("parquet corrupt data page", _validate(edit=_corrupt_pages), 2, ("train.parquet",)),
    CliCase("parquet duplicate column names", _validate(edit=_duplicate_parquet_column), 2,
            ("train.parquet", "duplicate")),
    CliCase("parquet image embedding of strings",
            _validate(edit=_typed_parquet("product_image_embedding", [["a", "b", "c"]] * 6, pa.list_(pa.string()))), 2,
            ("train.parquet: column product_image_embedding (every row) has type list<element: string>",)),
    CliCase("parquet image embedding of integers beyond float32's exact range",
            _validate(edit=_typed_parquet("product_image_embedding", [[2**40, 0, -1]] * 6, pa.list_(pa.int64()))), 2,
            ("train.parquet: row 1, column product_image_embedding: product_id 'P0' has a different image embedding",)),
    CliCase("parquet image embedding too large for float32",
            _validate(edit=_typed_parquet("product_image_embedding", [[1e300, 0.5, -1.0]] * 6, pa.list_(pa.float64()))), 2,
            ("train.parquet: row 1, column product_image_embedding: image embedding holds a value too large",)),
    CliCase("parquet relevance too large for float32", _validate(rows=_rows_with("relevance", 1e300)), 2,
            (f"train.parquet: row {BAD_ROW}, column relevance: relevance 1e+300 is too large for a 32-bit float",)),
    CliCase("parquet empty product id", _validate(rows=_rows_with("product_id", "")), 2,
            (f"train.parquet: row {BAD_ROW}, column product_id: empty product_id",)),
    CliCase("csv ragged row", _validate(suffix=".csv", edit=_set_line(BAD_ROW, b"a,b,c\n")), 2,
            (f"train.csv: row {BAD_ROW}: malformed CSV: expected 9 columns, got 3",)),
    CliCase("csv unclosed quote", _validate(suffix=".csv", edit=_edit_lines(lambda lines: lines + [b'"query 9,US,P1\n'])),
            2, ("train.csv: row 7: malformed CSV: expected 9 columns, got 1", "is a quote left open?")),
    CliCase("csv of zero bytes", _validate(suffix=".csv", edit=_empty), 2,
            ("train.csv: row 0 (header): no header row (the file is empty)",)),
    CliCase("csv header only", _validate(suffix=".csv", edit=_edit_lines(lambda lines: lines[:1])), 0,
            ("train.csv: 0 rows read, 0 kept",)),
    CliCase("csv header not UTF-8", _validate(suffix=".csv", edit=_replace_bytes(b"query,", b"qu\xffery,")), 2,
            ("train.csv: row 0 (header): cannot read the header row as UTF-8",)),
    CliCase("csv duplicate column names",
            _validate(suffix=".csv", edit=_replace_bytes(b"product_category", b"query")), 2,
            ("train.csv: header: duplicate column names ['query']",)),
    CliCase("csv BOM-prefixed header", _bom_dataset(".csv", catalog=True), 0,
            ("catalog.csv: 5 rows read, 5 kept", "train.csv: 6 rows read, 6 kept")),
    CliCase("csv 1 MB query", _validate(suffix=".csv", rows=_rows_with("query", ONE_MB_QUERY)), 0,
            ("train.csv: 6 rows read, 6 kept",)),
    CliCase("csv image embedding with a string inside",
            _validate(suffix=".csv", rows=_rows_with("product_image_embedding", [7.0, 7.5, 7.25]),
                      edit=_replace_bytes(b"[7.0, 7.5, 7.25]", b"[7.0, x, 7.25]")), 2,
            (f"train.csv: row {BAD_ROW}, column product_image_embedding: not a list of numbers: '[7.0, x, 7.25]'",)),
    CliCase("csv catalogue with an empty product id", _validate(suffix=".csv", catalog=_empty_catalogue_id()), 2,
            ("catalog.csv: row 2, column product_id: empty product_id",)),
    CliCase("csv split file that is a directory", _train_is_a_directory, 2, ("train.csv",)),
    CliCase("jsonl line that is a JSON array",
            _validate(suffix=".jsonl", edit=_set_line(BAD_ROW - 1, json.dumps(list(good_impressions(1)[0].values())).encode() + b"\n")),
            2, (f"train.jsonl: row {BAD_ROW}, column (row): not a JSON object but list",)),
    CliCase("jsonl line nested 100,000 deep", _validate(suffix=".jsonl", edit=_set_line(BAD_ROW - 1, _NESTED_LINE)), 2,
            (f"train.jsonl: row {BAD_ROW}",)),
    CliCase("jsonl label of 5000 digits",
            _validate(suffix=".jsonl", edit=_set_line(BAD_ROW - 1, _LONG_LABEL_LINE)), 2,
            (f"train.jsonl: row {BAD_ROW}",)),
    CliCase("jsonl label too large for a float", _validate(suffix=".jsonl", edit=_jsonl_row(engaged=10**400)), 2,
            (f"train.jsonl: row {BAD_ROW}, column engaged",)),
    CliCase("jsonl image embedding with an integer too large for a float",
            _validate(suffix=".jsonl", edit=_jsonl_row(product_image_embedding=[10**400, 1, 2])), 2,
            (f"train.jsonl: row {BAD_ROW}, column product_image_embedding: number too large for a 64-bit float",)),
    CliCase("jsonl infinite relevance", _validate(suffix=".jsonl", edit=_jsonl_row(relevance=float("inf"))), 2,
            (f"train.jsonl: row {BAD_ROW}, column relevance: relevance inf; give a finite grade",)),
    CliCase("jsonl image embedding with a string inside",
            _validate(suffix=".jsonl", edit=_jsonl_row(product_image_embedding=[1.0, "x", 2.0])), 2,
            (f"train.jsonl: row {BAD_ROW}, column product_image_embedding: expected a list of numbers",)),
    CliCase("jsonl image embeddings that are all empty lists",
            _validate(suffix=".jsonl", rows=_without_images(good_impressions(6)),
                      catalog=_without_images([product(i) for i in range(5)])), 2,
            ("catalog.jsonl: row 1, column product_image_embedding",)),
    CliCase("jsonl BOM-prefixed file", _bom_dataset(".jsonl", catalog=False), 2,
            ("train.jsonl: row 1, column (row): not a JSON object", "BOM")),
    CliCase("jsonl of zero bytes", _validate(suffix=".jsonl", edit=_empty), 0, ("train.jsonl: 0 rows read, 0 kept",)),
    CliCase("tfrecord of random bytes", _validate(suffix=".tfrecord", edit=_random_tfrecord), 2,
            ("train.tfrecord: row 1: corrupt TFRecord file",)),
]


@pytest.mark.parametrize("case", [_param(c) for c in READER_CASES])
def test_reader_bad_input(case, tmp_path, capsys):
    _run_case(case, tmp_path, capsys)


# --------------------------------------------------------------------------- config files and --set


def _config(text: str | bytes, *extra: str) -> Callable[[str], list[str]]:
    def argv(root: str) -> list[str]:
        path = os.path.join(root, "c.yaml")
        with open(path, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        return ["validate", "--config", path, *extra]

    return argv


def _overrides(*items: str) -> Callable[[str], list[str]]:
    return lambda root: ["validate", *[arg for item in items for arg in ("--set", item)]]


def _config_directory(root: str) -> list[str]:
    os.mkdir(os.path.join(root, "conf.d"))
    return ["validate", "--config", os.path.join(root, "conf.d")]


CONFIG_CASES = [
    CliCase("config file that is a YAML list", _config("- data\n- train\n"), 2,
            ("c.yaml must hold a mapping of sections, not list",)),
    CliCase("config with an unknown section", _config("trainer:\n  epochs: 3\n"), 2,
            ("unknown config key trainer; did you mean train?",)),
    CliCase("config section that is a list", _config("train:\n  - 1\n"), 2, ("train must be a mapping of fields",)),
    CliCase("config with a tab", _config("train:\n\tepochs: 3\n"), 2, ("c.yaml", "line 2, column 1", "indent with spaces")),
    CliCase("config with a YAML syntax error", _config("train: {epochs: 3\n"), 2, ("c.yaml", "not valid YAML")),
    CliCase("config file not UTF-8", _config(b"train:\n  seed: \xff\xfe\n"), 2, ("c.yaml",)),
    CliCase("config path that is a directory", _config_directory, 2, ("conf.d is a directory",)),
    CliCase("config with a NUL character", _config("train:\n  seed: 1\x00\n"), 2,
            ("c.yaml: line 2, column 10: not valid YAML: character #x0000 is not allowed",)),
    CliCase("--set a value that is not YAML", _overrides("train.seed=[1"), 2,
            ("--set 'train.seed=[1': the value is not valid YAML (expected ',' or ']'",)),
    CliCase("--set train.epochs=abc", _overrides("train.epochs=abc"), 2, ("train.epochs ('abc') must be a whole number",)),
    CliCase("--set negative batch", _overrides("train.global_batch_size=-8"), 2,
            ("train.global_batch_size (-8) must be at least 1",)),
    CliCase("--set without =", _overrides("train.epochs"), 2, ("--set 'train.epochs': expected KEY=VALUE",)),
    CliCase("--set a non-existent nested key", _overrides("data.source.path=x"), 2,
            ("unknown config key data.source; known fields: dir, on_bad_rows",)),
    CliCase("--set below a scalar field", _overrides("train.cache.size=1"), 2,
            ("train.cache ({'size': 1}) must be one of auto, memory, none",)),
    CliCase("--set an unknown modality", _overrides("model.modality_dropout.nose=0.1"), 2,
            ("model.modality_dropout has an unknown modality 'nose'",)),
    CliCase("--set index.k=0", _overrides("index.k=0"), 2, ("index.k (0) must be at least 1",)),
    CliCase("--set index.reorder below index.k", _overrides("index.k=50", "index.reorder=20"), 2,
            ("index.reorder (20) must be at least index.k (50)",)),
    CliCase("--set train.learning_rate=.nan", _overrides("train.learning_rate=.nan"), 2, ("train.learning_rate",)),
    CliCase("--set model.scale=.nan", _overrides("model.scale=.nan"), 2, ("model.scale",)),
    CliCase("--set features.buckets above 2**31-1", _overrides("features.buckets=4294967296"), 2,
            ("features.buckets (4294967296) must be at most 2**31 - 1",)),
    CliCase("--set features.category_buckets above 2**31-1", _overrides("features.category_buckets=2147483648"), 2,
            ("features.category_buckets (2147483648) must be at most 2**31 - 1",)),
    CliCase("--set model.engagement_weight=.nan", _overrides("model.engagement_weight=.nan"), 2,
            ("model.engagement_weight (nan) must be a number, 0 (contrastive only) or more",)),
    CliCase("--set train.learning_rate=.inf", _overrides("train.learning_rate=.inf"), 2,
            ("train.learning_rate (inf) must be a positive number",)),
    CliCase("--set index.anisotropic_quantization_threshold=.nan", _overrides("index.anisotropic_quantization_threshold=.nan"),
            2, ("index.anisotropic_quantization_threshold (nan) must be a number in [0, 1)",)),
    CliCase("--set index.partition_avq=0.5", _overrides("index.partition_avq=0.5"), 2,
            ("index.partition_avq (0.5) must be 0 (off) or a number of at least 1",)),
    CliCase("--set model.modality_dropout.image=.nan", _overrides("model.modality_dropout.image=.nan"), 2,
            ("model.modality_dropout.image (nan) must be in [0, 1)",)),
]


@pytest.mark.parametrize("case", [_param(c) for c in CONFIG_CASES])
def test_config_bad_input(case, tmp_path, capsys):
    _run_case(case, tmp_path, capsys)


# --------------------------------------------------------------------------- command-line arguments


def _argv(*args: str) -> Callable[[str], list[str]]:
    return lambda root: [arg.replace("{tmp}", root) for arg in args]


def _report_into_missing_directory(root: str) -> list[str]:
    data = _dataset(root)
    return ["validate", "--data", data, "--report", os.path.join(root, "no-such-dir", "report.json")]


ARGUMENT_CASES = [
    CliCase("unknown verb", _argv("trian"), 2, ("invalid choice: 'trian'",), one_line=False),
    CliCase("missing required flag", _argv("export", "--run", "{tmp}"), 2,
            ("q2e export: error: the following arguments are required: --out",), one_line=False),
    CliCase("argument of the wrong type", _argv("query", "--k", "abc", "lamp"), 2,
            ("argument --k: invalid int value: 'abc'",), one_line=False),
    CliCase("index --target-recall 2 --tune", _argv("index", "--run", "{tmp}", "--target-recall", "2", "--tune"), 2,
            ("--target-recall (2.0) must be in (0, 1]",)),
    CliCase("index --target-recall nan --tune", _argv("index", "--run", "{tmp}", "--target-recall", "nan", "--tune"), 2,
            ("--target-recall (nan) must be in (0, 1]",)),
    CliCase("export --name ../x", _argv("export", "--run", "{tmp}", "--out", "{tmp}/base", "--name", "../x"), 2,
            ("--name '../x': a model name is letters, digits",)),
    CliCase("query --server nohostport", _argv("query", "--server", "nohostport", "lamp"), 2,
            ("--server must be HOST:PORT (e.g. 127.0.0.1:8500), got 'nohostport'",)),
    CliCase("query --k 0", _argv("query", "--k", "0", "lamp"), 2, ("--k must be at least 1, got 0",)),
    CliCase("query --timeout 0", _argv("query", "--timeout", "0", "lamp"), 2, ("--timeout must be positive",)),
    CliCase("query --wait -1", _argv("query", "--wait", "-1", "lamp"), 2, ("--wait must be 0 or more seconds, got -1.0",)),
    CliCase("serve --model-base of a missing directory", _argv("serve", "--model-base", "{tmp}/missing-base"), 2,
            ("missing-base is not a directory; pass the directory `q2e export --out` wrote",)),
    CliCase("serve --grpc-port 70000", _argv("serve", "--model-base", "{tmp}", "--grpc-port", "70000"), 2,
            ("grpc_port must be in 0..65535",)),
    CliCase("serve --poll-seconds nan", _argv("serve", "--model-base", "{tmp}", "--poll-seconds", "nan"), 2,
            ("poll_seconds must be positive, got nan",)),
    CliCase("evaluate --bootstrap 5", _argv("evaluate", "--run", "{tmp}", "--bootstrap", "5"), 2,
            ("--bootstrap (5) must be at least 10 resamples",)),
    CliCase("validate --report into a missing directory", _report_into_missing_directory, 2, ("no-such-dir",)),
]


@pytest.mark.parametrize("case", [_param(c) for c in ARGUMENT_CASES])
def test_argument_bad_input(case, tmp_path, capsys):
    _run_case(case, tmp_path, capsys)


# =========================================================================== a tiny trained and exported model

EMBEDDING_DIM = 8
IMAGE_DIM = 3
TINY_RUN = [
    "features.buckets=512",
    "features.category_buckets=16",
    "features.context_buckets=8",
    "features.max_words=8",
    f"model.embedding_dim={EMBEDDING_DIM}",
    "model.text_embedding_dim=8",
    "model.hidden_dim=8",
    "train.global_batch_size=32",
    "train.shuffle_buffer=100",
    "train.early_stopping_patience=0",
    "train.steps_per_execution=1",
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "train.validation_steps=1",
    "index.k=5",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[str, int]:
    """One tiny run (60 products, 1 step), indexed and exported with both models: (base, K)."""
    root = tmp_path_factory.mktemp("tiny_model")
    data, run, base = (str(root / name) for name in ("data", "run", "base"))
    generate(data, products=60, impressions=600, seed=3, image_dim=IMAGE_DIM, ground_truth_queries=2)
    train(load_config(None, TINY_RUN), data, run, verbose=0)
    build_index(run, log=lambda _: None)
    result = export_run(run, base, "q2e", log=lambda _: None)
    return base, result["k"]


@pytest.fixture(scope="module")
def stock(exported):
    base, _ = exported
    return tf.saved_model.load(os.path.join(base, "q2e", "1"))


@pytest.fixture(scope="module")
def scann_model(exported):
    importlib.import_module("scann")  # registers ScaNN's ops
    base, _ = exported
    return tf.saved_model.load(os.path.join(base, "q2e_scann", "1"))


def _text(*values) -> tf.Tensor:
    return tf.constant(list(values), tf.string)


def _query(*values) -> dict[str, tf.Tensor]:
    return {"query": _text(*values), "query_country": _text(*[""] * len(values))}


def _products(n: int = 1, image: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    fields = {name: _text(*["lamp"] * n) for name in ("product_title", "product_description", "product_category")}
    return {**fields, "product_image_embedding": tf.zeros([n, IMAGE_DIM]) if image is None else image}


def _assert_results(outputs: dict, rows: int, k: int) -> None:
    assert set(outputs) == {"product_ids", "scores", "product_titles", "engagement_probability"}
    for name, tensor in outputs.items():
        assert tuple(tensor.shape) == (rows, k), f"{name} has shape {tensor.shape}, not {(rows, k)}"
    scores = outputs["scores"].numpy()
    assert np.isfinite(scores).all() and np.all(np.abs(scores) <= 1.0 + 1e-5)
    probability = outputs["engagement_probability"].numpy()
    assert np.all((0 <= probability) & (probability <= 1))


# --------------------------------------------------------------------------- exported signatures, in process


@pytest.mark.slow
def test_signature_wrong_dtype_int_query(stock):
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a string tensor but is a int32 tensor"):
        stock.signatures["query_encoder"](query=tf.constant([1, 2]), query_country=_text("", ""))


@pytest.mark.slow
def test_signature_wrong_rank_b_by_1_query(stock):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        stock.signatures["retrieval_exact"](query=tf.constant([["lamp"], ["rug"]]), query_country=_text("", ""))
    assert "query_text" in str(error.value) and "[2,1]" in str(error.value)  # the query's text tower, the shape


@pytest.mark.slow
def test_signature_missing_input_is_named(stock):
    with pytest.raises(TypeError, match="missing a required argument: 'query_country'"):
        stock.signatures["query_encoder"](query=_text("lamp"))


@pytest.mark.slow
def test_signature_inputs_with_different_batch_sizes(stock):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Shapes of all inputs must match: values\[0\].shape = \[2,\d+\] != values\[1\].shape = \[1,\d+\]"):
        stock.signatures["retrieval_exact"](query=_text("lamp", "rug"), query_country=_text("US"))


@pytest.mark.slow
@pytest.mark.parametrize("signature", ["retrieval_exact", "query_encoder", "product_encoder"])
def test_signature_empty_batch_gives_empty_outputs(stock, exported, signature):
    _, k = exported
    empty = tf.zeros([0], tf.string)
    if signature == "product_encoder":
        outputs = stock.signatures[signature](**{**{n: empty for n in _products()}, "product_image_embedding": tf.zeros([0, IMAGE_DIM])})
    else:
        outputs = stock.signatures[signature](query=empty, query_country=empty)
    if signature == "retrieval_exact":
        _assert_results(outputs, 0, k)
    else:
        assert tuple(outputs["embedding"].shape) == (0, EMBEDDING_DIM)
        if signature == "query_encoder":
            assert tuple(outputs["query_bias"].shape) == (0,)


@pytest.mark.slow
def test_signature_empty_batch_scann_retrieval_gives_b_by_k(scann_model, stock, exported):
    _, k = exported
    empty = tf.zeros([0], tf.string)
    _assert_results(scann_model.signatures["retrieval"](query=empty, query_country=empty), 0, k)
    for function in (scann_model.signatures["retrieval"], stock.signatures["retrieval_exact"]):  # declared [None, K]
        assert {name: spec.shape.as_list() for name, spec in function.structured_outputs.items()} == {
            name: [None, k] for name in ("product_ids", "scores", "product_titles", "engagement_probability")}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["stock", "scann"])
def test_signature_empty_string_query(stock, scann_model, exported, model):
    _, k = exported
    function = stock.signatures["retrieval_exact"] if model == "stock" else scann_model.signatures["retrieval"]
    outputs = function(**_query(""))
    _assert_results(outputs, 1, k)
    assert all(outputs["product_ids"].numpy()[0])  # 60 products: every place is filled


@pytest.mark.slow
def test_signature_non_utf8_bytes_are_read_as_separators(stock, exported):
    _, k = exported
    encoder = stock.signatures["query_encoder"]
    bad = encoder(query=tf.constant([b"\xff\xfegrey\xc3 rug\xe9"]), query_country=tf.constant([b"\xc3"]))["embedding"]
    clean = encoder(query=_text("grey rug"), query_country=_text(""))["embedding"]
    np.testing.assert_allclose(bad.numpy(), clean.numpy(), atol=1e-6)
    _assert_results(stock.signatures["retrieval_exact"](query=tf.constant([b"\xff"]), query_country=_text("")), 1, k)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["stock", "scann"])
def test_signature_1mb_query_is_answered_quickly(stock, scann_model, exported, model):
    _, k = exported
    function = stock.signatures["retrieval_exact"] if model == "stock" else scann_model.signatures["retrieval"]
    function(**_query("warm up"))
    start = time.perf_counter()
    outputs = function(**_query(ONE_MB_QUERY, "lamp"))
    assert time.perf_counter() - start < 5.0
    _assert_results(outputs, 2, k)


@pytest.mark.slow
def test_signature_product_encoder_wrong_image_dim(stock):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        stock.signatures["product_encoder"](**_products(1, tf.zeros([1, IMAGE_DIM + 2])))
    assert "product_tower/image" in str(error.value) and "[1,5]" in str(error.value)


# --------------------------------------------------------------------------- the server, over the real export


@pytest.fixture(scope="module")
def server(exported):
    base, _ = exported
    lines: list[str] = []
    with ModelServer(base, grpc_port=0, rest_port=0, max_batch=16, log=lines.append) as running:
        assert running.registry.model_names() == ["q2e", "q2e_scann"], lines
        yield running


@pytest.fixture(scope="module")
def clients(server):
    with ServingClient(f"127.0.0.1:{server.grpc_port}") as over_grpc:
        yield {"grpc": over_grpc, "rest": ServingClient(f"127.0.0.1:{server.rest_port}", "rest")}


def _proto(dtype=types_pb2.DT_STRING, shape=(1,), **fields) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    return proto


def _grpc_refused(server, inputs: dict, code: grpc.StatusCode, words: str, **kwargs) -> None:
    with pytest.raises(grpc.RpcError) as error:
        raw_predict(server, inputs, **kwargs)
    assert error.value.code() == code, error.value.details()
    assert words in error.value.details()
    assert "Traceback" not in error.value.details()


def _grpc_answered(server, inputs: dict, k: int, rows: int = 1, **kwargs) -> None:
    start = time.perf_counter()
    response = raw_predict(server, inputs, **kwargs)
    assert time.perf_counter() - start < 5.0
    outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
    assert {name: array.shape for name, array in outputs.items()} == {n: (rows, k) for n in ("product_ids", "scores", "product_titles", "engagement_probability")}
    assert np.isfinite(outputs["scores"]).all()


def _rest_raw(server, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        connection.request("POST", "/v1/models/q2e:predict", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _rest_refused(server, path: str, status: int, words: str, body=None, raw: bytes | None = None) -> None:
    got, answer = rest_call(server, path, body, raw)
    assert (got, list(answer)) == (status, ["error"]), answer
    assert words in answer["error"]


def _rest_answered(server, instances: list, k: int) -> None:
    got, answer = rest_call(server, "/v1/models/q2e:predict", {"signature_name": "retrieval_exact", "instances": instances})
    assert got == 200, answer
    assert [len(row["product_ids"]) for row in answer["predictions"]] == [k] * len(instances)


CTX = {"query_country": strings("")}


def _metadata_without_field(server, k) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "q2e"
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel, pytest.raises(grpc.RpcError) as error:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must name a metadata_field" in error.value.details()


def _status_of_unknown_model(server, k) -> None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel, pytest.raises(grpc.RpcError) as error:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'nope' is not served (served: q2e, q2e_scann)" in error.value.details()


def _version_label(server, k) -> None:
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.version_label = "q2e", "stable"
    request.inputs["query"].CopyFrom(strings("lamp"))
    request.inputs["query_country"].CopyFrom(strings(""))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel, pytest.raises(grpc.RpcError) as error:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version labels are not supported" in error.value.details()


def _unknown_output_filter(server, k) -> None:
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest(output_filter=["nope"])
    request.model_spec.name, request.model_spec.signature_name = "q2e", "retrieval_exact"
    request.inputs["query"].CopyFrom(strings("lamp"))
    request.inputs["query_country"].CopyFrom(strings(""))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel, pytest.raises(grpc.RpcError) as error:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_filter names 'nope', which signature 'retrieval_exact' does not output" in error.value.details()


def _unknown_rank(server, k) -> None:
    proto = strings("lamp")
    proto.tensor_shape.Clear()
    proto.tensor_shape.unknown_rank = True
    _grpc_refused(server, {"query": proto, **CTX}, grpc.StatusCode.INVALID_ARGUMENT, "input 'query' has an unknown rank")


def _search_refused(protocol: str, error: type, words: str, *args, **kwargs):
    def case(server, k, clients) -> None:
        with pytest.raises(error) as raised:
            clients[protocol].search(*args, **kwargs)
        assert words.format(k=k) in str(raised.value)

    return case


SERVER_CASES: dict[str, Callable] = {
    # gRPC, hand-made TensorProtos
    "grpc 1 MB query": lambda s, k: _grpc_answered(s, {"query": strings(ONE_MB_QUERY), **CTX}, k),
    "grpc 1 MB query to ScaNN": lambda s, k: _grpc_answered(
        s, {"query": strings(ONE_MB_QUERY), **CTX}, k, signature="retrieval", model="q2e_scann"),
    "grpc non-UTF-8 query bytes": lambda s, k: _grpc_answered(
        s, {"query": tf.make_tensor_proto(np.array([b"\xff\xfe sofa \xc3"], dtype=object)),
            "query_country": tf.make_tensor_proto(np.array([b"\xe9"], dtype=object))}, k),
    "grpc empty string query": lambda s, k: _grpc_answered(s, {"query": strings(""), **CTX}, k),
    "grpc dtype enum that is no DataType": lambda s, k: _grpc_refused(
        s, {"query": _proto(dtype=999, string_val=[b"a"]), **CTX}, grpc.StatusCode.INVALID_ARGUMENT,
        "input 'query' has no valid dtype (enum value 999)"),
    "grpc unknown rank": _unknown_rank,
    "grpc shape declaring 10**12 elements": lambda s, k: _grpc_refused(
        s, {"query": _proto(shape=(10**12,)), **CTX}, grpc.StatusCode.INVALID_ARGUMENT,
        "input 'query' declares 1000000000000 elements"),
    "grpc more values than the shape holds": lambda s, k: _grpc_refused(
        s, {"query": _proto(shape=(1,), string_val=[b"a", b"b", b"c"]), **CTX}, grpc.StatusCode.INVALID_ARGUMENT,
        "input 'query' is not a valid TensorProto"),
    "grpc float content of the wrong length": lambda s, k: _grpc_refused(
        s, {**{n: strings("lamp") for n in ("product_title", "product_description", "product_category")},
            "product_image_embedding": _proto(types_pb2.DT_FLOAT, (1, IMAGE_DIM), tensor_content=b"\0" * 7)},
        grpc.StatusCode.INVALID_ARGUMENT, "input 'product_image_embedding' is not a valid TensorProto",
        signature="product_encoder"),
    "grpc int64 query to ScaNN": lambda s, k: _grpc_refused(
        s, {"query": tf.make_tensor_proto([7], tf.int64), **CTX}, grpc.StatusCode.INVALID_ARGUMENT,
        "input 'query' must be string, got int64", signature="retrieval", model="q2e_scann"),
    "grpc version 0": lambda s, k: _grpc_refused(
        s, {"query": strings("lamp"), **CTX}, grpc.StatusCode.NOT_FOUND, "model 'q2e' has no version 0", version=0),
    "grpc version label": _version_label,
    "grpc unknown output_filter": _unknown_output_filter,
    "grpc metadata without a field": _metadata_without_field,
    "grpc status of an unknown model": _status_of_unknown_model,
    # REST, raw JSON
    "rest 1 MB query": lambda s, k: _rest_answered(s, [{"query": ONE_MB_QUERY, "query_country": ""}], k),
    "rest lone surrogate in a query": lambda s, k: _rest_answered(s, [{"query": "sofa \ud800", "query_country": ""}], k),
    "rest non-UTF-8 query as b64": lambda s, k: _rest_answered(
        s, [{"query": {"b64": base64.b64encode(b"\xff\xfe sofa").decode()}, "query_country": ""}], k),
    "rest number for a string input": lambda s, k: _rest_refused(
        s, "/v1/models/q2e:predict", 400, "input 'query' must hold string values, got a number: 5",
        {"instances": [{"query": 5, "query_country": ""}]}),
    "rest null for a string input": lambda s, k: _rest_refused(
        s, "/v1/models/q2e:predict", 400, "input 'query' must hold string values, got a null",
        {"instances": [{"query": None, "query_country": ""}]}),
    "rest JSON nested 100,000 deep": lambda s, k: _rest_refused(
        s, "/v1/models/q2e:predict", 400, "request body is not valid JSON", raw=b"[" * 100_000 + b"]" * 100_000),
    "rest body not UTF-8": lambda s, k: _rest_refused(
        s, "/v1/models/q2e:predict", 400, "request body is not valid JSON", raw=b'{"instances": ["\xff"]}'),
    "rest signature_name not a string": lambda s, k: _rest_refused(
        s, "/v1/models/q2e:predict", 400, "'signature_name' must be a string", {"signature_name": 3, "instances": ["a"]}),
    "rest instances as an object": lambda s, k: _rest_refused(
        s, "/v1/models/q2e:predict", 400, "'instances' must be a list", {"instances": {"query": ["a"]}}),
    "rest inputs null": lambda s, k: _rest_refused(
        s, "/v1/models/q2e:predict", 400, "'inputs' must be an object naming the inputs", {"inputs": None}),
    "rest model name with ../": lambda s, k: _rest_refused(
        s, "/v1/models/..%2F..%2Fetc:predict", 404, "model '../../etc' is not served", {"instances": ["a"]}),
    "rest version 0": lambda s, k: _rest_refused(
        s, "/v1/models/q2e/versions/0:predict", 404, "model 'q2e' has no version 0", {"instances": ["a"]}),
    "rest version of 19 digits": lambda s, k: _rest_refused(
        s, "/v1/models/q2e/versions/1234567890123456789:predict", 404, "no such endpoint", {"instances": ["a"]}),
    "rest negative Content-Length": lambda s, k: _assert_rest_raw(
        s, b"", {"Content-Length": "-5"}, 400, "bad Content-Length: '-5'"),
    "rest chunked body": lambda s, k: _assert_rest_raw(
        s, b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}, 411, "chunked request bodies are not supported"),
}


def _assert_rest_raw(server, body: bytes, headers: dict[str, str], status: int, words: str) -> None:
    got, answer = _rest_raw(server, body, headers)
    assert got == status and words in answer["error"], answer


SEARCH_CASES: dict[str, Callable] = {
    "search k=-1": _search_refused("grpc", ValueError, "k must be a positive integer, got -1", "q2e", ["lamp"], -1),
    "search k=10**9": _search_refused("grpc", ValueError, "k=1000000000 is more than the {k} results", "q2e", ["lamp"], 10**9),
    "search k=True": _search_refused("rest", ValueError, "k must be a positive integer, got True", "q2e", ["lamp"], True),
    "search no queries": _search_refused("grpc", ValueError, "queries must be a non-empty list", "q2e", [], 3),
    "search a bare string": _search_refused("grpc", ValueError, "queries must be a non-empty list", "q2e", "lamp", 3),
    "search context of the wrong length": _search_refused(
        "grpc", ValueError, "context 'query_country' has 2 values for 1 queries", "q2e", ["lamp"], 3,
        context={"query_country": ["US", "DE"]}),
    "search unknown context input": _search_refused(
        "rest", ServingError, "unexpected input 'query_nope'", "q2e", ["lamp"], 3, context={"query_nope": "x"}),
    "search a signature without results": _search_refused(
        "grpc", ValueError, "signature 'query_encoder' of model 'q2e' has no output 'product_ids'", "q2e", ["lamp"], 3,
        signature="query_encoder"),
}


def _assert_still_serving(clients, k: int) -> None:
    for protocol, client in clients.items():
        hits = client.search("q2e", ["grey jute rug"], k)
        assert len(hits) == 1 and len(hits[0]) == k, protocol
        assert client.search("q2e_scann", ["lamp"], k, signature="retrieval")[0][0]["product_id"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVER_CASES))
def test_server_bad_request(server, clients, exported, name):
    _, k = exported
    SERVER_CASES[name](server, k)
    _assert_still_serving(clients, k)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEARCH_CASES))
def test_client_search_bad_arguments(server, clients, exported, name):
    _, k = exported
    SEARCH_CASES[name](server, k, clients)
    _assert_still_serving(clients, k)


@pytest.mark.slow
def test_client_search_1mb_query_over_both_protocols(clients, exported):
    _, k = exported
    results = {protocol: client.search("q2e", [ONE_MB_QUERY], k) for protocol, client in clients.items()}
    assert results["grpc"] == results["rest"] and len(results["grpc"][0]) == k
    assert all(math.isfinite(hit["score"]) for hit in results["grpc"][0])
