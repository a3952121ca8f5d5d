"""The public Python API: names, Keras serialization of every layer, save/load, build_model, metrics without labels."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import yaml

import tf_q2e
from conftest import SMALL, good_impressions, impression
from tf_q2e.callbacks import EarlyStopping
from tf_q2e.config import FeaturesConfig, ModelConfig, load_config
from tf_q2e.data.datasets import FeatureSchema
from tf_q2e.errors import InputError
from tf_q2e.features import TextHasher
from tf_q2e.pretrained.modality import PretrainedText
from tf_q2e.tasks import EngagementBCE, ScaledSoftmaxRetrieval
from tf_q2e.terms import TermChannel
from tf_q2e.towers import (AttentionFusion, EmbeddingBag, HashedCategorical, ModalityDropout, ProductTower,
                           QueryTower, TextModality, _Sum)

FEATURES = FeaturesConfig(buckets=512, category_buckets=32, context_buckets=16, max_words=8)
MODEL = ModelConfig(embedding_dim=8, text_embedding_dim=8, hidden_dim=16)
ROWS = {"query": tf.constant(["red sofa", "oak lamp", ""]), "query_country": tf.constant(["US", "DE", ""]),
        "product_id": tf.constant(["a", "b", "c"]), "product_title": tf.constant(["Red Sofa", "oak lamp", "rug"]),
        "product_description": tf.constant(["soft", "", "wool"]), "product_category": tf.constant(["sofa", "lamp", ""]),
        "product_image_embedding": tf.constant(np.arange(9, dtype=np.float32).reshape(3, 3) / 9),
        "engaged": tf.constant([1, 0, -1])}


def test_the_public_names_import_lazily_without_tensorflow():
    names = ["Que2EngageModel", "QueryTower", "ProductTower", "ScaledSoftmaxRetrieval", "EngagementBCE", "Config",
             "load_config", "build_model", "Retriever", "Hit", "save", "load", "export", "SparseAdam", "EarlyStopping"]
    for name in names:
        assert getattr(tf_q2e, name) is not None, name
    assert tf_q2e.data.from_pandas and tf_q2e.data.from_files and tf_q2e.data.from_dir
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tf_q2e.nope  # noqa: B018
    # No submodule shadows a public name once imported (importing `tf_q2e.x` sets the attribute `x`).
    import importlib
    import pkgutil
    import types

    for module in pkgutil.walk_packages(tf_q2e.__path__, "tf_q2e."):
        importlib.import_module(module.name)
    for name in names:
        assert not isinstance(getattr(tf_q2e, name), types.ModuleType), f"tf_q2e.{name} is a module"
    out = subprocess.run([sys.executable, "-c", "import sys, tf_q2e; print('tensorflow' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-1000:]


def _same_after_round_trip(layer, call):
    """Serializes `layer` (tf.keras.layers.serialize), rebuilds it, copies the weights; both give the same outputs."""
    before = call(layer)
    config = tf.keras.layers.serialize(layer)
    rebuilt = tf.keras.layers.deserialize(config)
    assert type(rebuilt) is type(layer)
    call(rebuilt)  # builds its variables
    assert len(rebuilt.get_weights()) == len(layer.get_weights())
    rebuilt.set_weights(layer.get_weights())
    after = call(rebuilt)
    for x, y in zip(tf.nest.flatten(before), tf.nest.flatten(after)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert rebuilt.get_config() == layer.get_config()


def _ids():
    return TextHasher(512)(ROWS["product_title"])


LAYERS = {
    "EmbeddingBag": (lambda: EmbeddingBag(512, 4, "weighted"), lambda l: l(_ids())),
    "TextHasher": (lambda: TextHasher(512, word_bigrams=False, max_words=4), lambda l: l(ROWS["query"]).to_tensor()),
    "TextModality": (lambda: TextModality(TextHasher(512), EmbeddingBag(512, 4), 8, 4), lambda l: l(ROWS["query"])),
    "HashedCategorical": (lambda: HashedCategorical(32, 4, empty_is_unknown=True), lambda l: l(ROWS["product_category"])),
    "ModalityDropout": (lambda: ModalityDropout(0.5, seed=3), lambda l: l(tf.ones([3, 4]), training=False)),
    "AttentionFusion": (lambda: AttentionFusion(), lambda l: l(tf.reshape(tf.range(24, dtype=tf.float32), [3, 2, 4]) / 24)),
    "_Sum": (lambda: _Sum([HashedCategorical(16, 4), HashedCategorical(8, 4)]),
             lambda l: l([ROWS["query_country"], ROWS["product_category"]])),
    "TermChannel": (lambda: TermChannel(16, 0.5, "mean", learned_weights=True, query_bias=True),
                    lambda l: l.pool_with_bias(TermChannel.word_hashes(ROWS["query"]))),
    "QueryTower": (lambda: QueryTower(FEATURES, MODEL, ("query_country",), seed=1),
                   lambda l: l(ROWS, return_bias=True)),
    "QueryTower with a term channel and a query bias": (
        lambda: QueryTower(FEATURES, ModelConfig(embedding_dim=8, text_embedding_dim=8, hidden_dim=16, term_dim=16,
                                                 query_bias=True, term_weights="engagement", text_sharing="encoder")),
        lambda l: l(ROWS, return_bias=True)),
    "ProductTower": (lambda: ProductTower(FEATURES, ModelConfig(embedding_dim=8, text_embedding_dim=8, hidden_dim=16,
                                                                text_sharing="tables"), image_dim=3),
                     lambda l: l(ROWS)),
    "PretrainedText": (lambda: PretrainedText(4, layers=1, max_tokens=16),
                       lambda l: l([ROWS["product_title"], ROWS["product_description"]])),
    "QueryTower with a pretrained text encoder": (
        lambda: QueryTower(FEATURES, ModelConfig(embedding_dim=8, text_embedding_dim=8, hidden_dim=16,
                                                 text_encoder="minilm", query_layers=1, max_tokens=16)),
        lambda l: l(ROWS)),
    "ScaledSoftmaxRetrieval": (lambda: ScaledSoftmaxRetrieval(5.0, cross_replica=False),
                               lambda l: l(tf.eye(3), tf.eye(3), product_ids=ROWS["product_id"]).loss),
    "EngagementBCE": (lambda: EngagementBCE(5.0, learned_bias=True, bias_lr_multiplier=2.0),
                      lambda l: l(tf.eye(3), tf.eye(3), ROWS["engaged"], query_bias=tf.constant([0.1, 0.2, 0.3])).loss),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_round_trips_through_its_keras_config(name):
    make, call = LAYERS[name]
    layer = make()
    if name == "EngagementBCE":
        layer.bias.assign(0.7)  # not the initial value, so a lost weight would show
    _same_after_round_trip(layer, call)


def _model(overrides=()):
    return tf_q2e.build_model(load_config(None, SMALL + list(overrides)), FeatureSchema(3, ("query_country",)))


def test_the_model_round_trips_through_its_keras_config_and_through_save_and_load(tmp_path):
    model = _model(["model.term_dim=16", "model.query_bias=true", "model.engagement_bias=learned",
                    "model.text_sharing=encoder", "model.term_weights=engagement"])
    model.engagement.bias.assign(0.25)
    model.query_tower.term_channel.length_weight.assign(0.5)
    rebuilt = type(model).from_config(model.get_config()).build_from_schema()
    assert rebuilt.get_config() == model.get_config()
    assert rebuilt.config == model.config and rebuilt.context_columns == ("query_country",) and rebuilt.image_dim == 3
    path = tf_q2e.save(model, str(tmp_path / "saved"))
    loaded = tf_q2e.load(path)
    q, b = model.query_tower(ROWS, return_bias=True)
    q2, b2 = loaded.query_tower(ROWS, return_bias=True)
    np.testing.assert_allclose(q2.numpy(), q.numpy(), atol=1e-6)
    np.testing.assert_allclose(b2.numpy(), b.numpy(), atol=1e-6)
    assert abs(b.numpy()).max() > 0.1  # the length weight's share: a lost weight would show
    np.testing.assert_allclose(loaded.product_tower(ROWS).numpy(), model.product_tower(ROWS).numpy(), atol=1e-6)
    assert float(loaded.engagement.bias.numpy()) == 0.25
    np.testing.assert_allclose(loaded.compute_loss(ROWS).numpy(), model.compute_loss(ROWS).numpy(), rtol=1e-6)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="no saved model"):
        tf_q2e.load(str(tmp_path))
    (tmp_path / "model.json").write_text('{"format": "other"}')
    with pytest.raises(InputError, match="format 'other'"):
        tf_q2e.load(str(tmp_path))


def test_build_model_takes_the_schema_from_a_dataset_a_dataframe_or_a_schema():
    rows = [impression(f"query {k}", k % 3) for k in range(6)]
    df = pd.DataFrame(rows)
    config = load_config(None, SMALL)
    for source in (tf_q2e.data.from_pandas(df), tf_q2e.data.from_pandas(df, batch_size=4), df, FeatureSchema(3, ("query_country",))):
        model = tf_q2e.build_model(config, source)
        assert model.image_dim == 3 and model.context_columns == ("query_country",)
        assert model.built and len(model.trainable_variables) > 0  # no dummy batch from the caller
    plain = tf_q2e.build_model(config)
    assert plain.image_dim == 0 and plain.context_columns == ()
    with pytest.raises(TypeError):
        tf_q2e.build_model(config, 42)


@pytest.mark.slow
def test_a_model_fits_a_dataset_from_the_data_api():
    df = pd.DataFrame(good_impressions(64))
    train = tf_q2e.data.from_pandas(df)
    model = tf_q2e.build_model(load_config(None, SMALL), train)
    model.compile(optimizer=tf_q2e.SparseAdam(0.01))
    history = model.fit(train.batch(16, drop_remainder=True), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and history.history["loss"][1] < history.history["loss"][0]


def test_engagement_metrics_are_nan_without_labelled_rows_and_the_loss_is_the_contrastive_one():
    model = _model()
    clicks = dict(ROWS, engaged=tf.constant([-1, -1, -1]))
    model.compute_loss(clicks)
    results = {m.name: float(m.result()) for m in model.metrics}
    assert np.isnan(results["engagement_auc"]) and np.isnan(results["engagement_loss"])
    assert results["loss"] == pytest.approx(results["contrastive_loss"])
    model.compute_loss(dict(ROWS, engaged=tf.constant([1, 0, -1])))  # both classes seen: defined
    assert np.isfinite(float(model.engagement_auc.result())) and np.isfinite(float(model.engagement_loss.result()))


def test_early_stopping_falls_back_when_its_monitor_is_nan():
    notes = []
    callback = EarlyStopping("val_engagement_auc", patience=1, restore_best_weights=True, log=notes.append)
    callback.set_model(_model())
    callback.on_train_begin()
    recalls = [0.1, 0.2, 0.3, 0.25, 0.2]
    for epoch, recall in enumerate(recalls):
        callback.on_epoch_end(epoch, {"val_engagement_auc": float("nan"), "val_recall_at_1": recall})
        if callback.model.stop_training:
            break
    assert callback.monitor == "val_recall_at_1" and len(notes) == 1 and "NaN" in notes[0]
    assert callback.best_epoch == 2 and callback.stopped_epoch == 3  # the best epoch is not the first
    plain = EarlyStopping("val_engagement_auc", fallback=None, patience=1)
    plain.set_model(_model())
    plain.on_train_begin()
    plain.on_epoch_end(0, {"val_engagement_auc": float("nan"), "val_recall_at_1": 0.1})
    assert plain.monitor == "val_engagement_auc"
    assert EarlyStopping("val_loss").monitor_op == np.less and EarlyStopping("val_recall_at_1").monitor_op == np.greater


def test_removed_config_keys_load_when_they_meant_todays_behaviour_and_name_the_fix_otherwise(tmp_path):
    from tf_q2e.config import Config, ConfigError

    # A run directory's config.yaml of an earlier version: every key written out, the removed ones included.
    old = Config().to_dict()
    old["model"].update(fusion="attention", logq_correction=False, term_in_training=False, share_text_tables=True,
                        share_text_encoder=False)
    del old["model"]["text_sharing"]
    old["train"]["optimizer"] = "adam"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(str(path)).model.text_sharing == "tables"
    assert Config.from_dict(old) == load_config(str(path))
    assert load_config(None, ["model.share_text_encoder=true"]).model.text_sharing == "encoder"
    for override, words in [("model.fusion=concat", "model.fusion ('concat') was removed: attention fusion is the only"),
                            ("model.logq_correction=true", "model.logq_correction (True) was removed"),
                            ("train.optimizer=adagrad", "train.optimizer ('adagrad') was removed: Adam"),
                            ("model.term_in_training=true", "model.term_in_training (True) was removed")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="disagree"):
        load_config(None, ["model.share_text_encoder=true", "model.text_sharing=none"])
    with pytest.raises(ConfigError, match="model.engagement_bias_lr_multiplier"):
        load_config(None, ["model.engagement_bias_lr_multiplier=0"])


def test_progress_is_a_line_per_tenth_off_a_terminal_and_a_keras_bar_on_one(capsys):
    from tf_q2e.progress import Progress

    lines = []
    progress = Progress(1000, "products", lines.append, verb="embedded", interactive=False)
    for done in range(0, 1001, 7):
        progress.update(done)
    progress.update(1000)
    assert 10 <= len(lines) <= 12 and lines[-1].startswith("embedded 1,000/1,000 products (100%")
    unknown = []
    Progress(None, "rows", unknown.append, interactive=False).update(5)
    assert unknown[0].startswith("done 5 rows")
    bar = Progress(10, "products", lines.append, interactive=True)
    bar.update(10)
    assert "10/10" in capsys.readouterr().out  # tf.keras.utils.Progbar, as model.fit draws


def test_a_model_saves_and_loads_the_keras_way(tmp_path):
    model = _model(["model.term_dim=8", "model.query_bias=true", "model.engagement_bias=learned"])
    model.engagement.bias.assign(-0.4)
    path = str(tmp_path / "model.keras")
    model.save(path)  # Keras's own format: the model's config plus its weights
    loaded = tf.keras.models.load_model(path)  # the classes are registered: no custom_objects needed
    assert type(loaded) is type(model) and loaded.config == model.config
    np.testing.assert_allclose(loaded.query_tower(ROWS).numpy(), model.query_tower(ROWS).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.product_tower(ROWS).numpy(), model.product_tower(ROWS).numpy(), atol=1e-6)
    assert float(loaded.engagement.bias.numpy()) == pytest.approx(-0.4)


def test_an_empty_query_context_is_no_context_as_modality_dropout_makes_it():
    tower = QueryTower(FEATURES, MODEL, ("query_country",), seed=1)
    context = tower.encoders["query_context"]([tf.constant([b"US", b"", b"  ", b"\xc3"])]).numpy()
    assert np.abs(context[0]).max() > 0  # "" (unknown), blank, unreadable: the dropped modality's zeros
    np.testing.assert_array_equal(context[1:], 0.0)
    tower(ROWS)
    stacked = tower.modality_vectors({"query": tf.constant(["red sofa"]), "query_country": tf.constant([""])})
    np.testing.assert_array_equal(stacked.numpy()[0, 1], 0.0)
    category = HashedCategorical(32, 4)(tf.constant(["", "sofa"])).numpy()  # a product's "" stays a value of its own
    assert np.abs(category[0]).max() > 0
