"""Training end to end on a tiny synthetic marketplace: model.fit, run directory, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from conftest import SMALL
from tf_q2e.cli import main
from tf_q2e.config import load_config
from tf_q2e.data.pipeline import dataset_from_dir

from tf_q2e.optimizers import SparseAdam
from tf_q2e.train import HistoryFile, build_model, load_model, split_reading, train



@pytest.fixture(scope="module")
def data_dir(marketplace):
    return marketplace


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run"))
    config = load_config(None, SMALL + ["train.epochs=4", "train.steps_per_epoch=25"])
    history = train(config, data_dir, run, verbose=0)
    return run, config, history


@pytest.mark.slow
def test_training_lowers_validation_loss_and_learns_engagement(trained):
    _, _, history = trained
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert history["val_contrastive_loss"][-1] < history["val_contrastive_loss"][0]
    assert history["val_engagement_auc"][-1] > 0.5
    assert history["recall_at_1"][-1] > history["recall_at_1"][0]


@pytest.mark.slow
def test_logged_loss_is_the_two_task_losses_weighted_by_lambda(trained, data_dir):
    # Validation ends on a short batch (the split is no multiple of the batch): `loss` still
    # equals its parts as logged, each a mean over rows, not over batches.
    _, config, history = trained
    validation_rows = pq.read_metadata(os.path.join(data_dir, "validation.parquet")).num_rows
    assert validation_rows % config.train.global_batch_size and config.train.validation_steps is None
    weight = config.model.engagement_weight
    assert weight > 0
    for prefix in ("", "val_"):
        np.testing.assert_allclose(history[prefix + "loss"],
                                   np.add(history[prefix + "contrastive_loss"],
                                          weight * np.asarray(history[prefix + "engagement_loss"])), rtol=1e-5)


@pytest.mark.slow
def test_run_directory_records_the_run(trained, data_dir):
    run, config, history = trained
    recorded_config = load_config(os.path.join(run, "config.yaml"))
    assert recorded_config.data.dir == os.path.abspath(data_dir)  # q2e index finds the run's data set
    assert recorded_config == dataclasses.replace(config, data=dataclasses.replace(config.data, dir=os.path.abspath(data_dir)))
    with open(os.path.join(run, "history.json"), encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded == history and len(recorded["loss"]) == 4
    assert {"loss", "contrastive_loss", "engagement_loss", "recall_at_1", "engagement_auc", "val_engagement_auc"} <= set(recorded)
    with open(os.path.join(run, "model.json"), encoding="utf-8") as f:
        assert json.load(f)["image_dim"] == 4
    assert os.path.isdir(os.path.join(run, "logs", "train"))
    assert sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.endswith(".index")) == [
        "epoch-2.index", "epoch-3.index", "epoch-4.index"
    ]


def _vectors(model, data_dir):
    batch = next(iter(dataset_from_dir(data_dir, "test", 32, training=False)))
    return [v.numpy() for v in model(batch, training=False)]


@pytest.mark.slow
def test_checkpoint_round_trip_restores_the_trained_model(trained, data_dir):
    run, config, _ = trained
    final = _vectors(load_model(run), data_dir)
    last_epoch = _vectors(load_model(run, os.path.join(run, "checkpoints", "epoch-4")), data_dir)
    untrained = _vectors(build_model(config, 4, ("query_country",)), data_dir)
    for a, b, c in zip(final, last_epoch, untrained):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - c).max() > 1e-3
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_modality_dropout_only_in_training(data_dir):
    config = load_config(None, SMALL + ["model.modality_dropout={query_context: 0.9, description: 0.9, category: 0.9, image: 0.9}"])
    model = build_model(config, 4, ("query_country",))
    batch = next(iter(dataset_from_dir(data_dir, "train", 64, training=False)))
    tower = model.product_tower
    inference = [tower.modality_vectors(batch, training=False).numpy() for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    assert (np.abs(inference[0]).sum(axis=2) > 0).all()  # nothing zeroed
    training = tower.modality_vectors(batch, training=True).numpy()
    zeroed = np.abs(training).sum(axis=2) == 0  # [B, modalities]
    names = tower.modality_names
    assert not zeroed[:, names.index("title")].any()  # rate 0: never dropped
    assert 0.7 < zeroed[:, names.index("description")].mean() <= 1.0
    kept = ~zeroed
    np.testing.assert_array_equal(training[kept], inference[0][kept])  # kept vectors are not rescaled


def test_attention_fusion_weights_are_a_distribution(data_dir):
    model = build_model(load_config(None, SMALL), 4, ("query_country",))
    batch = next(iter(dataset_from_dir(data_dir, "train", 16, training=False)))
    tower = model.product_tower
    weights = tower.fusion.attention(tower.modality_vectors(batch)).numpy()
    assert weights.shape == (16, 4)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)


def test_contrastive_only_baseline_has_no_engagement_term(data_dir):
    config = load_config(None, SMALL + ["model.engagement_weight=0"])
    model = build_model(config, 4, ("query_country",))
    batch = next(iter(dataset_from_dir(data_dir, "train", 64, training=False)))
    loss = model.compute_loss(batch).numpy()
    assert abs(loss - model.contrastive_loss.result().numpy()) < 1e-4
    assert model.engagement_loss.result().numpy() > 0.1  # still measured, just not trained


def test_engagement_auc_ranks_cosines_that_the_bce_sigmoid_saturates():
    """Engaged rows at cosine 0.9-0.95, hard negatives at 0.5-0.6: σ(20·c) is above 0.9999 for all of
    them, yet they are perfectly ranked; the metric must say 1.0 (it said ~0.5 on σ's buckets)."""
    model = build_model(load_config(None, SMALL), 0, ())
    engaged = np.array([1, 1, 1, 0, 0, 0, -1], np.int32)
    cosines = np.array([0.9, 0.93, 0.95, 0.5, 0.55, 0.6, -0.4], np.float32)
    queries = np.zeros((7, 2), np.float32)
    queries[:, 0] = 1.0
    products = np.stack([cosines, np.sqrt(1 - cosines**2)], axis=1)
    model.encode = lambda features, training=None: (tf.constant(queries), tf.zeros([7]), tf.constant(products))
    model.compute_loss({"product_id": tf.constant([f"P{i}" for i in range(7)]), "engaged": tf.constant(engaged)})
    assert model.engagement_auc.result().numpy() == pytest.approx(1.0)
    model.engagement_auc.reset_state()
    swapped = np.array([0, 0, 0, 1, 1, 1, -1], np.int32)  # now the engaged rows have the low cosines
    model.compute_loss({"product_id": tf.constant([f"P{i}" for i in range(7)]), "engaged": tf.constant(swapped)})
    assert model.engagement_auc.result().numpy() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("trains_tables", [True, False])
def test_engagement_gradient_reaches_the_tables_only_when_asked(data_dir, trains_tables):
    """One step of λ = 0.5 against one step of λ = 0 from the same weights: without
    `engagement_trains_tables` the embedding tables move exactly as under the contrastive task alone,
    while the dense layers still learn from the BCE."""
    batch = next(iter(dataset_from_dir(data_dir, "train", 64, training=False)))
    models = {}
    for lam in (0.5, 0.0):
        tf.keras.utils.set_random_seed(11)
        config = load_config(None, SMALL + [f"model.engagement_weight={lam}",
                                            f"model.engagement_trains_tables={str(trains_tables).lower()}",
                                            "model.modality_dropout.query_context=0", "model.modality_dropout.description=0",
                                            "model.modality_dropout.category=0", "model.modality_dropout.image=0"])
        model = build_model(config, 4, ("query_country",))
        model(batch)
        model.compile(optimizer=SparseAdam(0.01))
        model.train_step(batch)
        models[lam] = [(v.name.split("/", 1)[1], v.numpy()) for v in model.trainable_variables]
    pairs = [(name, a, b) for (name, a), (_, b) in zip(models[0.5], models[0.0])]
    tables = [(a, b) for name, a, b in pairs if "table" in name or "embeddings" in name]
    dense = [(a, b) for name, a, b in pairs if "kernel" in name]
    assert len(tables) >= 3 and dense
    assert all(np.allclose(a, b, atol=1e-7) for a, b in tables) == (not trains_tables)
    assert any(np.abs(a - b).max() > 1e-6 for a, b in dense)


def test_q2e_train_needs_data(capsys):
    assert main(["train", "--out", "unused"]) == 2
    assert "no data set given" in capsys.readouterr().err


@pytest.mark.slow
def test_mirrored_training_on_two_logical_cpus_and_batch_divisibility(data_dir, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")
    base = [sys.executable, "-m", "tf_q2e.cli", "train", "--config", smoke, "--data", data_dir, "--out", str(tmp_path / "run")]
    sets = [arg for s in ["train.strategy=mirrored", "train.num_devices=2", "train.epochs=1", "train.steps_per_epoch=3",
                          "train.validation_steps=1000"] for arg in ("--set", s)]
    # validation_steps: a cap beyond the split's full global batches ran the iterator dry (no val_* metric logged)
    bad = subprocess.run(base + sets + ["--set", "train.global_batch_size=33"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert "train.global_batch_size (33) must be divisible by the number of replicas (2)" in bad.stderr
    good = subprocess.run(base + sets, capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    assert "training on 2 replica(s)" in good.stderr
    with open(tmp_path / "run" / "history.json", encoding="utf-8") as f:
        history = json.load(f)
    assert np.isfinite(history["loss"][0]) and np.isfinite(history["val_engagement_auc"][0])
    without_mirrored = subprocess.run(base + ["--set", "train.num_devices=2"], capture_output=True, text=True, env=env,
                                      timeout=300)
    assert without_mirrored.returncode == 2
    assert "train.num_devices (2) applies to train.strategy=mirrored only" in without_mirrored.stderr


def test_tf_function_input_is_raw_strings(data_dir):
    # The towers take the pipeline's raw strings directly: no preprocessing outside the graph.
    model = build_model(load_config(None, SMALL), 4, ("query_country",))
    spec = {"query": tf.TensorSpec([None], tf.string), "query_country": tf.TensorSpec([None], tf.string)}
    encode = tf.function(lambda f: model.query_tower(f), input_signature=[spec])
    out = encode({"query": tf.constant(["red sofa", "Ｒｅｄ ＳＯＦＡ"]), "query_country": tf.constant(["US", "US"])}).numpy()
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)  # normalisation in the graph


def test_featurizing_in_the_pipeline_gives_the_same_vectors(data_dir):
    model = build_model(load_config(None, SMALL), 4, ("query_country",))
    batch = next(iter(dataset_from_dir(data_dir, "train", 32, training=False)))
    featurized = model.featurize(batch)
    assert "product_title" not in featurized and isinstance(featurized["product_title#ids"], tf.RaggedTensor)
    for a, b in zip(model(batch), model(featurized)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float32_scores(data_dir, tmp_path, precision):
    config = load_config(None, SMALL + [f"train.mixed_precision={precision}", "train.epochs=1", "train.steps_per_epoch=5",
                                        "train.validation_steps=2", "train.featurize_in_pipeline=true",
                                        "train.cache=none"])
    history = train(config, data_dir, str(tmp_path / "run"), verbose=0)
    assert np.isfinite(history["loss"][0]) and np.isfinite(history["val_loss"][0])
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # restored after training


@pytest.mark.slow
def test_xla_switch_compiles_the_dense_parts_with_the_same_loss_and_gradients(data_dir):
    batch = next(iter(dataset_from_dir(data_dir, "train", 32, training=False)))
    results = {}
    for jit in (False, True):
        tf.keras.utils.set_random_seed(0)
        model = build_model(load_config(None, SMALL + [f"train.jit_compile={str(jit).lower()}"]), 4, ("query_country",))
        with tf.GradientTape() as tape:
            loss = model.compute_loss(batch, training=False)
        grads = tape.gradient(loss, model.trainable_variables)
        results[jit] = (loss.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads], model)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    for with_xla, without in zip(results[True][1], results[False][1]):
        np.testing.assert_allclose(with_xla, without, rtol=1e-4, atol=1e-6)

    compiled, plain = results[True][2], results[False][2]
    stacked = tf.zeros([2, len(compiled.query_tower.modality_names), 16])
    assert "dot" in compiled.query_tower._head.experimental_get_compiler_ir(stacked)(stage="hlo")  # an XLA program
    assert "dot" in compiled.product_tower.encoders["title"]._dense.experimental_get_compiler_ir(tf.zeros([2, 16]))(stage="hlo")
    assert not hasattr(plain.query_tower._head, "experimental_get_compiler_ir")  # off by default: plain Python


def test_shared_text_encoder_is_one_siamese_text_path():
    model = build_model(load_config(None, SMALL + ["model.text_sharing=encoder"]), 4, ())
    shared = model.query_tower.encoders["query_text"]
    assert shared is model.product_tower.encoders["title"] is model.product_tower.encoders["description"]
    separate = build_model(load_config(None, SMALL), 4, ())
    count = lambda m: sum(int(np.prod(v.shape)) for v in m.trainable_variables)  # noqa: E731
    # One table + one MLP instead of two tables and three MLPs.
    table, mlp = 4096 * 16, sum(int(np.prod(v.shape)) for v in shared.mlp.trainable_variables)
    assert count(separate) - count(model) == table + 2 * mlp


@pytest.mark.slow
def test_learned_engagement_bias_trains_through_model_fit(data_dir, tmp_path):
    config = load_config(None, SMALL + ["model.engagement_bias=learned", "train.epochs=1", "train.steps_per_epoch=3",
                                        "train.validation_steps=1", "train.cache=none"])
    run = str(tmp_path / "run")
    history = train(config, data_dir, run, verbose=0)
    assert np.isfinite(history["loss"][0])
    bias = load_model(run).engagement.bias
    assert bias is not None and float(bias.numpy()) != 0.0  # updated by the optimizer


def test_auto_cache_only_for_splits_an_iterator_reads_to_the_end():
    """tf.data drops (and warns about) a cache whose iterator stopped early: auto does not build one."""
    config = load_config(None, SMALL)
    model = build_model(config, 4, ("query_country",))
    t = config.train
    whole = split_reading(t, 1000, model)
    assert whole["cache"] == "" and whole["chunk_fn"] is not None
    partial = split_reading(t, 1000, model, rows_read=999)
    assert partial["cache"] is None and partial["chunk_fn"] is not None  # still hashed in the pipeline
    assert split_reading(t, 1000, model, rows_read=5000)["cache"] == ""
    forced = split_reading(dataclasses.replace(t, cache="memory"), 1000, model, rows_read=10)
    assert forced["cache"] == ""
    off = split_reading(dataclasses.replace(t, cache="none"), 1000, model)
    assert off["cache"] is None and off["chunk_fn"] is None


def _toy_model() -> tf.keras.Model:
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    model.compile(optimizer="sgd", loss="mse")
    return model


class _Interrupt(tf.keras.callbacks.Callback):
    """Raises at the start of epoch `at` (0-based): fit ends without on_train_end, like a killed process."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("interrupted")


@pytest.mark.slow
def test_history_file_keeps_the_epochs_before_a_backup_resume(tmp_path):
    """history.json after BackupAndRestore resumes at epoch 3 of 5: epochs 1-2 of the interrupted fit, then 3-5.

    The interrupted fit had also written a third entry (history.json is
    written before the backup at each epoch end; here the third epoch ends
    without a backup, as if killed between the two): the resumed fit drops it.
    """
    x, y = np.random.default_rng(0).normal(size=(32, 2)), np.zeros((32, 1))
    path, backup = str(tmp_path / "history.json"), str(tmp_path / "backup")

    class NoBackupAtEpoch3(tf.keras.callbacks.BackupAndRestore):
        def on_epoch_end(self, epoch, logs=None):
            if epoch < 2:
                super().on_epoch_end(epoch, logs)

    tf.keras.utils.set_random_seed(0)
    with pytest.raises(RuntimeError, match="interrupted"):
        _toy_model().fit(x, y, epochs=5, verbose=0,
                         callbacks=[HistoryFile(path), NoBackupAtEpoch3(backup), _Interrupt(at=3)])
    with open(path, encoding="utf-8") as f:
        first = json.load(f)
    assert len(first["loss"]) == 3 and not [n for n in os.listdir(tmp_path) if ".tmp" in n]

    history_file = HistoryFile(path)
    resumed = _toy_model().fit(x, y, epochs=5, verbose=0,
                               callbacks=[history_file, tf.keras.callbacks.BackupAndRestore(backup)])
    assert len(resumed.history["loss"]) == 3  # this fit ran epochs 3-5 only
    result = history_file.finish()
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded == result and list(recorded) == ["loss"]
    assert recorded["loss"][:2] == first["loss"][:2]
    assert recorded["loss"][2:] == pytest.approx(resumed.history["loss"])

    # A run that starts at epoch 0 (no backup left) starts a new file.
    fresh = HistoryFile(path)
    _toy_model().fit(x, y, epochs=1, verbose=0, callbacks=[fresh, tf.keras.callbacks.BackupAndRestore(backup)])
    assert len(fresh.finish()["loss"]) == 1


@pytest.mark.slow
def test_history_file_lists_every_epoch_when_early_stopping_restores_the_best_weights(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(32, 2)), np.zeros((32, 1))
    history_file = HistoryFile(str(tmp_path / "history.json"))
    model = _toy_model()
    stopping = tf.keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=1e9, restore_best_weights=True)
    keras_history = model.fit(x, y, epochs=6, verbose=0, callbacks=[history_file, stopping])
    assert stopping.stopped_epoch == 1  # stopped after epoch 2, restored epoch 1's weights
    assert history_file.finish()["loss"] == pytest.approx(keras_history.history["loss"]) and len(keras_history.history["loss"]) == 2


def test_engagement_scale_sets_the_bce_scale_alone():
    m = build_model(load_config(None, SMALL + ["model.engagement_scale=5"]), 4, ("query_country",))
    assert m.engagement.scale == 5.0 and m.retrieval.scale == 20.0
    m = build_model(load_config(None, SMALL), 4, ("query_country",))
    assert m.engagement.scale == m.retrieval.scale == 20.0
