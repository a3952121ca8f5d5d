"""Index and export: ScaNN vs exact search, SavedModels in TF Serving's layout, warm-up, versions."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_q2e.cli import main
from tf_q2e.config import load_config
from tf_q2e.data.synth import generate
from tf_q2e.savedmodels import MODELS_CONFIG, STOCK_MODELS_CONFIG, WARMUP_FILE, export_run
from tf_q2e.index import PAD_SCORE, ScannOptions, build_index, exact_top_k, load_index, recall_at_k
from tf_q2e.train import load_model, train

TINY = [
    "features.buckets=2048",
    "features.category_buckets=64",
    "features.context_buckets=32",
    "features.max_words=16",
    "model.embedding_dim=16",
    "model.text_embedding_dim=16",
    "model.hidden_dim=16",
    "train.global_batch_size=128",
    "train.shuffle_buffer=1000",
    "train.learning_rate=0.01",
    "train.early_stopping_patience=0",
    "train.steps_per_execution=1",
    "train.epochs=1",
    "train.steps_per_epoch=15",
    "train.validation_steps=2",
    "index.k=10",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    generate(data, products=600, impressions=4000, seed=5, image_dim=4, ground_truth_queries=5)
    run_dir = str(tmp_path_factory.mktemp("run"))
    train(load_config(None, TINY), data, run_dir, verbose=0)
    # AH + reordering (not the brute force that 600 products get by default), tuned.
    build_index(run_dir, tune_recall=0.9, overrides=["index.kind=ah", "index.tune_queries=100"], log=lambda _: None)
    return run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("base"))
    result = export_run(run, base, "q2e", log=lambda _: None)
    return base, result


def _query_inputs(texts):
    return {"query": tf.constant(texts), "query_country": tf.constant(["US"] * len(texts))}


QUERIES = ["brown couch", "mountain bike red", "lamp", "kids shoes size 4"]


@pytest.mark.slow
def test_index_records_options_tuning_and_products(run):
    index = load_index(run)
    meta = index.meta
    assert meta["products"] == len(index.product_ids) == len(index.vectors) == 600
    assert index.options.kind == "ah" and index.options.reorder >= meta["k"] == 10
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-5)
    chosen = meta["tune"]["chosen"]
    assert chosen["meets_target"] and chosen["recall"] >= 0.9
    assert chosen["reorder"] == index.options.reorder
    assert meta["tune"]["query_source"] == "validation.parquet queries"
    # The fastest-or-least-work rule: no setting that met the target does less work and is faster.
    assert len(meta["tune"]["tried"]) >= 3


@pytest.mark.slow
def test_index_vectors_are_the_product_tower_of_the_catalogue(run):
    index = load_index(run)
    model = load_model(run)
    import pyarrow.parquet as pq

    catalog = pq.read_table(os.path.join(model.config.data.dir, "catalog.parquet")).slice(0, 5).to_pydict()
    features = {c: tf.constant(catalog[c]) for c in ("product_title", "product_description", "product_category")}
    features["product_image_embedding"] = tf.constant(catalog["product_image_embedding"], tf.float32)
    np.testing.assert_allclose(model.product_tower(features).numpy(), index.vectors[:5], atol=1e-5)
    assert list(index.product_ids[:5]) == catalog["product_id"]


@pytest.mark.slow
def test_scann_recall_at_10_against_exact_search(run):
    index = load_index(run)
    model = load_model(run)
    from tf_q2e.index import SearchTimer, build_searcher

    queries = model.query_tower(_query_inputs([str(t) for t in index.titles[:200]])).numpy()
    searcher = build_searcher(index.vectors, index.options, 10)
    found = SearchTimer(searcher, 10).indices(queries, index.options)
    _, truth = exact_top_k(index.vectors, queries, 10)
    assert recall_at_k(found, truth) >= 0.9
    assert recall_at_k(truth, truth) == 1.0


@pytest.mark.slow
def test_saved_models_match_the_in_memory_model(run, exported):
    base, result = exported
    model = load_model(run)
    index = load_index(run)
    stock = tf.saved_model.load(os.path.join(base, "q2e", "1"))
    assert set(stock.signatures) == {"query_encoder", "product_encoder", "retrieval_exact", "retrieval_exact_filtered",
                                     "serving_default"}
    inputs = _query_inputs(QUERIES)
    expected = model.query_tower(inputs).numpy()
    np.testing.assert_allclose(stock.signatures["query_encoder"](**inputs)["embedding"].numpy(), expected, atol=1e-5)
    products = {"product_title": tf.constant(["blue sofa bed"]), "product_description": tf.constant([""]),
                "product_category": tf.constant(["sofa"]), "product_image_embedding": tf.zeros([1, 4])}
    np.testing.assert_allclose(stock.signatures["product_encoder"](**products)["embedding"].numpy(),
                               model.product_tower(products).numpy(), atol=1e-5)

    exact = stock.signatures["retrieval_exact"](**inputs)
    scores, rows = exact_top_k(index.vectors, expected, result["k"])
    assert exact["product_ids"].shape == (len(QUERIES), 10)
    assert [[p.decode() for p in row] for row in exact["product_ids"].numpy()] == index.product_ids[rows].tolist()
    assert [[t.decode() for t in row] for row in exact["product_titles"].numpy()] == index.titles[rows].tolist()
    np.testing.assert_allclose(exact["scores"].numpy(), scores, atol=1e-5)

    import scann  # noqa: F401

    scann_model = tf.saved_model.load(os.path.join(base, "q2e_scann", "1"))
    found = scann_model.signatures["retrieval"](**inputs)
    assert not np.isnan(found["scores"].numpy()).any()
    ids = found["product_ids"].numpy()
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact["product_ids"].numpy())])
    assert overlap >= 0.9
    assert np.all(np.diff(found["scores"].numpy(), axis=1) <= 1e-6)  # best first


@pytest.mark.slow
def test_stock_model_loads_in_a_process_that_never_imports_scann(exported):
    base, _ = exported
    script = f"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
m = tf.saved_model.load({os.path.join(base, "q2e", "1")!r})
q = dict(query=tf.constant(["red lamp"]), query_country=tf.constant([""]))
print(m.signatures["query_encoder"](**q)["embedding"].shape[1])
print(m.signatures["retrieval_exact"](**q)["product_ids"].shape[1])
p = dict(product_title=tf.constant(["lamp"]), product_description=tf.constant([""]), product_category=tf.constant([""]),
         product_image_embedding=tf.zeros([1, 4]))
print(m.signatures["product_encoder"](**p)["embedding"].shape[1])
print("scann" in sys.modules, any(name.startswith("tf_q2e") for name in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["16", "10", "16", "False", "False"]


@pytest.mark.slow
def test_layout_models_config_and_warmup(exported):
    from google.protobuf import text_format
    from tensorflow_serving.apis import prediction_log_pb2
    from tensorflow_serving.config import model_server_config_pb2

    base, result = exported
    assert result["version"] == 1
    assert sorted(os.listdir(base)) == sorted(["q2e", "q2e_scann", MODELS_CONFIG, STOCK_MODELS_CONFIG])
    assert os.listdir(os.path.join(base, "q2e")) == ["1"]  # no temporary directory left behind
    for name, expected in ((MODELS_CONFIG, ["q2e", "q2e_scann"]), (STOCK_MODELS_CONFIG, ["q2e"])):
        config = model_server_config_pb2.ModelServerConfig()
        with open(os.path.join(base, name)) as f:
            text_format.Parse(f.read(), config)
        entries = config.model_config_list.config
        assert [e.name for e in entries] == expected
        assert all(e.base_path == os.path.join(os.path.abspath(base), e.name) and e.model_platform == "tensorflow" for e in entries)

    stock = tf.saved_model.load(os.path.join(base, "q2e", "1"))
    records = list(tf.data.TFRecordDataset(os.path.join(base, "q2e", "1", WARMUP_FILE)).as_numpy_iterator())
    signatures = []
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record)
        request = log.predict_log.request
        assert request.model_spec.name == "q2e"
        signatures.append(request.model_spec.signature_name)
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        outputs = stock.signatures[request.model_spec.signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        assert all(v.shape[0] == 3 for v in outputs.values())
    assert signatures == ["query_encoder", "product_encoder", "retrieval_exact", "retrieval_exact_filtered"]


@pytest.mark.slow
def test_a_second_export_adds_version_2_and_keeps_version_1(run, exported, tmp_path):
    base, _ = exported
    before = os.path.getmtime(os.path.join(base, "q2e", "1", "saved_model.pb"))
    result = export_run(run, base, "q2e", k=5, scann=False, log=lambda _: None)
    assert result["version"] == 2 and result["k"] == 5
    assert sorted(os.listdir(os.path.join(base, "q2e"))) == ["1", "2"]
    assert os.path.getmtime(os.path.join(base, "q2e", "1", "saved_model.pb")) == before
    stock = tf.saved_model.load(os.path.join(base, "q2e", "2"))
    assert stock.signatures["retrieval_exact"](**_query_inputs(["lamp"]))["scores"].shape == (1, 5)


def test_the_tree_assigns_leaves_with_the_configured_avq():
    """index.partition_avq reaches ScaNN's partitioning config for trees (and nothing else uses it)."""
    from scann.proto import scann_pb2

    from tf_q2e.index import build_searcher

    vectors = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tree = ScannOptions.for_catalog(load_config(None, ["index.kind=tree_ah", "index.num_leaves=20"]).index, 3000, 10)
    assert tree.partition_avq == 2.0
    assert ScannOptions.for_catalog(load_config(None, ["index.kind=ah"]).index, 3000, 10).partition_avq == 0.0
    for options, avq in ((tree, 2.0), (dataclasses.replace(tree, partition_avq=0.0), None)):
        state = build_searcher(vectors, options, 10).serialize_to_module()
        partitioning = scann_pb2.ScannConfig.FromString(state.scann_config.numpy()[0]).partitioning
        assert (partitioning.avq if partitioning.HasField("avq") else None) == avq


def _serve_latency(tmp_path):
    """benchmarks/cc/serve_latency.py and its program built in `tmp_path` (the test is skipped, saying why,
    without a C++ compiler)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "cc", "serve_latency.py")
    spec = importlib.util.spec_from_file_location("serve_latency", path)
    serve_latency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_latency)
    binary, why = serve_latency.build(str(tmp_path))
    if binary is None:
        pytest.skip(why)
    return serve_latency, binary


@pytest.mark.slow
def test_exported_models_run_in_tensorflows_cpp_runtime(exported, tmp_path):
    """As TensorFlow Serving runs them: tensorflow::LoadSavedModel and Session::Run, ScaNN's op library
    loaded with TF_LoadLibrary (benchmarks/cc/serve_latency.cc), with Python's top k."""
    serve_latency, binary = _serve_latency(tmp_path)
    base, _ = exported
    stock, scann_dir = os.path.join(base, "q2e", "1"), os.path.join(base, "q2e_scann", "1")
    out = serve_latency.run(binary, QUERIES, {"retrieval": (scann_dir, "retrieval"),
                                              "retrieval_exact": (stock, "retrieval_exact")},
                            str(tmp_path), context={"query_country": "US"}, warmup=1, block=2)
    assert {name: len(times) for name, times in out["times_ms"].items()} == {"retrieval": 4, "retrieval_exact": 4}
    assert list(out["loaded_ops"]) == [serve_latency.scann_ops_library()]  # no text encoder: no tensorflow-text ops
    assert "Scann>ScannSearchBatched" in out["loaded_ops"][serve_latency.scann_ops_library()]
    import scann  # noqa: F401

    first = _query_inputs(QUERIES[:1])
    python = {"retrieval": tf.saved_model.load(scann_dir).signatures["retrieval"](**first),
              "retrieval_exact": tf.saved_model.load(stock).signatures["retrieval_exact"](**first)}
    for name, outputs in python.items():
        assert out["first_product_ids"][name] == [p.decode() for p in outputs["product_ids"].numpy()[0]]
    with pytest.raises(RuntimeError, match="needs the input `query_country`"):
        serve_latency.run(binary, QUERIES, {"retrieval_exact": (stock, "retrieval_exact")}, str(tmp_path), scann=False)


@pytest.mark.slow
def test_filtered_signatures_run_in_tensorflows_cpp_runtime(run, exported, tmp_path):
    """serve_latency's fixed inputs (`inputs=`: a list of strings is a [1, M] string, an integer a [1] int32)
    feed the filter inputs of retrieval_filtered and retrieval_exact_filtered: the C++ runtime gives Python's
    results, within the restrict."""
    from tf_q2e.filters import Filters

    serve_latency, binary = _serve_latency(tmp_path)
    base, _ = exported
    stock, scann_dir = os.path.join(base, "q2e", "1"), os.path.join(base, "q2e_scann", "1")
    index = load_index(run)
    categories = sorted(set(index.attributes["category"]))[:2]
    filters = Filters(categories=tuple(categories), exclude=(str(index.product_ids[0]),), max_per_category=3)
    inputs = {"categories": list(filters.categories), "countries": [], "exclude_product_ids": list(filters.exclude),
              "max_per_category": 3, "max_per_seller": 0}
    signatures = {"retrieval_filtered": (scann_dir, "retrieval_filtered"),
                  "retrieval_exact_filtered": (stock, "retrieval_exact_filtered"),
                  "retrieval": (scann_dir, "retrieval")}  # no filter inputs: it ignores them
    out = serve_latency.run(binary, QUERIES, signatures, str(tmp_path), context={"query_country": "US"},
                            inputs=inputs, warmup=1, block=2, record=len(QUERIES))
    assert {name: len(times) for name, times in out["times_ms"].items()} == {name: 4 for name in signatures}
    import scann  # noqa: F401

    category_of = dict(zip(index.product_ids, index.attributes["category"]))
    for name, (directory, signature) in signatures.items():
        fn = tf.saved_model.load(directory).signatures[signature]
        for i, text in enumerate(QUERIES):
            extra = filters.inputs(1) if name != "retrieval" else {}
            python = fn(**_query_inputs([text]), **extra)["product_ids"].numpy()[0]
            cc = out["outputs"][name][i]["product_ids"][0]
            assert list(cc) == [p.decode() for p in python]
            if name != "retrieval":
                kept = [p for p in cc if p]
                assert kept and all(category_of[p] in categories for p in kept) and filters.exclude[0] not in kept
                assert max(kept.count(p) for p in kept) == 1
                assert max([category_of[p] for p in kept].count(c) for c in categories) <= 3
    # A missing filter input names the flag that gives it; a value serve_latency cannot pass is refused.
    for missing, flag in (("categories", "--strings categories="), ("max_per_category", "--int32 max_per_category=")):
        with pytest.raises(RuntimeError, match=f"needs the input `{missing}`: pass {flag}"):
            serve_latency.run(binary, QUERIES[:1], {"retrieval_exact_filtered": (stock, "retrieval_exact_filtered")},
                              str(tmp_path), context={"query_country": "US"}, scann=False,
                              inputs={k: v for k, v in inputs.items() if k != missing})
    with pytest.raises(ValueError, match="comma"):
        serve_latency.run(binary, QUERIES[:1], signatures, str(tmp_path), inputs={"categories": ["a,b"]})
    with pytest.raises(ValueError, match="neither"):
        serve_latency.run(binary, QUERIES[:1], signatures, str(tmp_path), inputs={"categories": "rugs"})


@pytest.mark.slow
def test_short_scann_results_are_filled_not_nan(run, tmp_path):
    """A tree searched in one small leaf finds fewer than k products: the places get "" and PAD_SCORE."""
    import scann  # noqa: F401
    from tf_q2e.index import ScannTopK, build_searcher

    index = load_index(run)
    options = ScannOptions("tree_ah", num_leaves=60, leaves_to_search=1, training_sample_size=600, reorder=50)
    searcher = build_searcher(index.vectors, options, 50)
    layer = ScannTopK(searcher.serialize_to_module(), list(index.product_ids), options, k=50)
    scores, ids = layer(tf.constant(index.vectors[:4]))
    scores, ids = scores.numpy(), ids.numpy()
    assert scores.shape == ids.shape == (4, 50)  # ScaNN answers [4, n < 50]: padded to k
    assert not np.isnan(scores).any()
    short = ids == b""
    assert short.any(), "one leaf of ~10 products should leave places empty"
    assert np.all(scores[short] == PAD_SCORE) and np.all(scores[~short] > PAD_SCORE)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first, the padding last


@pytest.mark.slow
def test_cli_index_and_export_errors(run, tmp_path, capsys):
    assert main(["index", "--run", str(tmp_path / "missing")]) == 2
    assert "not a trained run" in capsys.readouterr().err
    assert main(["index", "--run", run, "--target-recall", "0.9"]) == 2
    assert "--target-recall needs --tune" in capsys.readouterr().err
    assert main(["index", "--run", run, "--tune", "--target-recall", "1.5"]) == 2
    assert main(["index", "--run", run, "--set", "index.k=0"]) == 2
    assert "index.k (0) must be at least 1" in capsys.readouterr().err
    assert main(["export", "--run", run, "--out", str(tmp_path / "b"), "--name", "../up"]) == 2
    assert "model name" in capsys.readouterr().err
    assert main(["export", "--run", run, "--out", str(tmp_path / "b"), "--k", "0"]) == 2
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "model.json"):
        (bare / name).write_bytes(open(os.path.join(run, name), "rb").read())
    os.makedirs(bare / "model")
    for name in os.listdir(os.path.join(run, "model")):
        (bare / "model" / name).write_bytes(open(os.path.join(run, "model", name), "rb").read())
    assert main(["export", "--run", str(bare), "--out", str(tmp_path / "b")]) == 2
    assert "run q2e index" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_index_reports_a_bad_catalogue_row(run, tmp_path, capsys):
    catalog = tmp_path / "catalog.jsonl"
    rows = [{"product_id": "A", "product_title": "good lamp"}, {"product_id": "B", "product_title": ""}]
    catalog.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["index", "--run", run, "--catalog", str(catalog)]) == 2
    err = capsys.readouterr().err
    assert "catalog.jsonl" in err and "row 2" in err and "product_title" in err


def test_the_deployment_files_for_the_stock_image_parse():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = model_server_config_pb2.ModelServerConfig()
    with open(os.path.join(repo, "export", "models.config")) as f:
        text_format.Parse(f.read(), config)
    assert [(e.name, e.base_path) for e in config.model_config_list.config] == [("q2e", "/models/q2e")]
    import yaml

    with open(os.path.join(repo, "export", "compose.yaml")) as f:
        service = yaml.safe_load(f)["services"]["tfserving"]
    assert service["image"] == "tensorflow/serving:2.20.0"
    assert "--model_config_file=/config/models.config" in service["command"]
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])


@pytest.mark.slow
def test_exported_models_round_trip_through_the_server_and_client(exported):
    from tf_q2e.serving import ModelServer, ServingClient

    base, _ = exported
    with ModelServer(base, grpc_port=0, rest_port=0, poll_seconds=0.2) as server:
        with ServingClient(f"127.0.0.1:{server.grpc_port}", "grpc") as grpc_client, \
                ServingClient(f"127.0.0.1:{server.rest_port}", "rest") as rest_client:
            exact = grpc_client.search("q2e", ["brown couch", "lamp"], 5)  # query_country left out: sent as ""
            assert rest_client.search("q2e", ["brown couch", "lamp"], 5) == exact
            assert [len(hits) for hits in exact] == [5, 5] and all(hit["title"] for hits in exact for hit in hits)
            approximate = grpc_client.search("q2e_scann", ["brown couch", "lamp"], 5, signature="retrieval")
            for a, b in zip(approximate, exact):
                assert len({h["product_id"] for h in a} & {h["product_id"] for h in b}) >= 4
            embedding = grpc_client.predict("q2e", {"query": ["lamp"], "query_country": [""]}, "query_encoder")["embedding"]
            np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
