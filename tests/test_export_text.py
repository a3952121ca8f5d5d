"""A model with the pretrained text encoder (`model.text_encoder: minilm`) exported and served by TensorFlow's
C++ runtime (`benchmarks/cc/serve_latency.cc`), with tensorflow-text's op libraries loaded as a TensorFlow
Serving build links them: the same embeddings and results as Python."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import tf_q2e
from tf_q2e.config import load_config
from tf_q2e.data.datasets import FeatureSchema

from conftest import SMALL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Accents (NormalizeUTF8's NFD), CJK, punctuation, an unknown word, and a query longer than max_tokens.
QUERIES = ["Café crème brûlée, 2-pack", "grey jute rug", "北京 sofa", "xqzzyv 3/4-in. pipe",
           "a very long query about a cordless drill with two batteries and a charger and a case and more"]


@pytest.fixture(scope="module")
def serve_latency(tmp_path_factory):
    """benchmarks/cc/serve_latency.py, its program compiled once (`.binary`); skips without a C++ compiler."""
    spec = importlib.util.spec_from_file_location("serve_latency", os.path.join(REPO, "benchmarks", "cc", "serve_latency.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.binary, why = module.build(str(tmp_path_factory.mktemp("cc")))
    if module.binary is None:
        pytest.skip(why)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained tiny model with the pretrained modality (1 query block, 16 tokens), exported with ScaNN."""
    config = load_config(None, SMALL + ["model.text_encoder=minilm", "model.query_layers=1", "model.max_tokens=16",
                                        "index.k=10"])
    model = tf_q2e.build_model(config, FeatureSchema(0, ("query_country",)))
    nouns = ["sofa", "rug", "drill", "lamp", "pipe", "faucet", "chair", "vanity", "tile", "saw"]
    colours = ["grey", "white", "oak", "brass", "black", "red"]
    catalog = pd.DataFrame({
        "product_id": [f"P{i}" for i in range(120)],
        "product_title": [f"{colours[i % 6]} {nouns[i % 10]} model {i}" for i in range(120)],
        "product_description": [f"a {nouns[(i * 7) % 10]} for the home" for i in range(120)],
        "product_category": [nouns[i % 10] for i in range(120)],
    })
    base = str(tmp_path_factory.mktemp("base"))
    tf_q2e.export(tf_q2e.Retriever.from_model(model, catalog, scann=True, k=10), base, log=lambda line: None)
    return model, os.path.join(base, "q2e", "1"), os.path.join(base, "q2e_scann", "1")


def _inputs(text: str) -> dict:
    return {"query": tf.constant([text]), "query_country": tf.constant(["US"])}


@pytest.mark.slow
def test_a_pretrained_text_encoder_serves_in_tensorflows_cpp_runtime(serve_latency, exported, tmp_path):
    """query_encoder, retrieval_exact and ScaNN's retrieval, one query per Session::Run, with tensorflow-text's
    _normalize_ops.so and _wordpiece_tokenizer.so loaded by TF_LoadLibrary: Python's embeddings and results."""
    model, stock, scann_dir = exported
    signatures = {"query_encoder": (stock, "query_encoder"), "retrieval_exact": (stock, "retrieval_exact"),
                  "retrieval": (scann_dir, "retrieval")}
    assert serve_latency.needed_text_ops(signatures) == {"NormalizeUTF8", "WordpieceTokenizeWithOffsets"}
    out = serve_latency.run(serve_latency.binary, QUERIES, signatures, str(tmp_path), context={"query_country": "US"},
                            warmup=1, block=2, record=len(QUERIES))
    assert {name: len(times) for name, times in out["times_ms"].items()} == {name: len(QUERIES) for name in signatures}
    # The libraries loaded: ScaNN's, then exactly tensorflow-text's two that register the tokenizer's ops.
    libraries = list(out["loaded_ops"])
    assert libraries == [serve_latency.scann_ops_library(), *serve_latency.text_ops_libraries()]
    assert [os.path.basename(p) for p in libraries[1:]] == ["_normalize_ops.so", "_wordpiece_tokenizer.so"]
    assert "NormalizeUTF8" in out["loaded_ops"][libraries[1]]
    assert out["loaded_ops"][libraries[2]] == ["WordpieceTokenizeWithOffsets"]

    importlib.import_module("scann")  # registers ScaNN's ops: the Python side loads the ScaNN model too

    python = {"stock": tf.saved_model.load(stock).signatures, "scann": tf.saved_model.load(scann_dir).signatures}
    for i, text in enumerate(QUERIES):
        expected, bias = model.query_tower(_inputs(text), training=False, return_bias=True)
        encoded = out["outputs"]["query_encoder"][i]
        np.testing.assert_allclose(encoded["embedding"], expected.numpy(), atol=1e-5, err_msg=text)
        np.testing.assert_allclose(encoded["query_bias"], bias.numpy(), atol=1e-5)
        for label, fn in (("retrieval_exact", python["stock"]["retrieval_exact"]), ("retrieval", python["scann"]["retrieval"])):
            want, got = fn(**_inputs(text)), out["outputs"][label][i]
            assert got["product_ids"].shape == (1, 10)
            assert got["product_ids"].tolist() == [[p.decode() for p in want["product_ids"].numpy()[0]]], (label, text)
            assert got["product_titles"].tolist() == [[t.decode() for t in want["product_titles"].numpy()[0]]]
            np.testing.assert_allclose(got["scores"], want["scores"].numpy(), atol=1e-5)
            np.testing.assert_allclose(got["engagement_probability"], want["engagement_probability"].numpy(), atol=1e-5)
    assert out["first_product_ids"]["retrieval"] == out["outputs"]["retrieval"][0]["product_ids"][0].tolist()


@pytest.mark.slow
def test_serve_latency_says_when_tensorflow_texts_ops_are_missing(serve_latency, exported, tmp_path, monkeypatch):
    _, stock, _ = exported
    signatures = {"query_encoder": (stock, "query_encoder")}
    # Not loaded: the C++ program fails at the first Session::Run (the ops are in the signature's function),
    # naming the op and the libraries to pass.
    with pytest.raises(RuntimeError, match=r"(?s)Op type not registered '(NormalizeUTF8|WordpieceTokenizeWithOffsets)'"
                                           r".*_normalize_ops.so and _wordpiece_tokenizer.so"):
        serve_latency.run(serve_latency.binary, QUERIES[:1], signatures, str(tmp_path), context={"query_country": "US"},
                          scann=False, text_ops=False)
    # Not installed: said before the program runs.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(serve_latency.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow_text" else find_spec(name, *a))
    with pytest.raises(serve_latency.MissingOpLibrary, match="query_encoder: tensorflow-text's ops NormalizeUTF8, "
                                                             "WordpieceTokenizeWithOffsets are needed, but tensorflow_text "
                                                             "is not installed: pip install tensorflow-text"):
        serve_latency.run(serve_latency.binary, QUERIES[:1], signatures, str(tmp_path), context={"query_country": "US"}, scann=False)
