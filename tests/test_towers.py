"""The embedding bag's pooling, by hand, and a model with learned n-gram weights through model.fit."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import SMALL
from tf_q2e.config import load_config
from tf_q2e.data.synth import generate
from tf_q2e.towers import EmbeddingBag
from tf_q2e.train import load_model, train

IDS = tf.ragged.constant([[1, 3], [3], [], [2, 2, 1]], dtype=tf.int64)


def _bag(pooling: str) -> tuple[EmbeddingBag, np.ndarray]:
    bag = EmbeddingBag(5, 2, pooling)
    bag.build(None)
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    bag.table.assign(table)
    return bag, table


def test_mean_pooling_averages_the_rows_and_gives_zeros_for_an_empty_text():
    bag, t = _bag("mean")
    expected = [(t[1] + t[3]) / 2, t[3], [0, 0], (2 * t[2] + t[1]) / 3]
    np.testing.assert_allclose(bag(IDS).numpy(), expected, rtol=1e-6)


def test_weighted_pooling_starts_at_the_mean_and_follows_the_learned_weights():
    bag, t = _bag("weighted")
    np.testing.assert_allclose(bag(IDS).numpy(), _bag("mean")[0](IDS).numpy(), rtol=1e-6)
    bag.importance.assign([0.0, 0.0, np.log(3.0), 9.0, 0.0])  # 9 is clipped to 5
    w3 = np.exp(5.0)
    expected = [(t[1] + w3 * t[3]) / (1 + w3), t[3], [0, 0], (3 * t[2] * 2 + t[1]) / 7]
    np.testing.assert_allclose(bag(IDS).numpy(), expected, rtol=1e-5)


def test_weighted_pooling_gradients_stay_sparse():
    bag, _ = _bag("weighted")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(bag(IDS) ** 2)
    table_grad, importance_grad = tape.gradient(loss, [bag.table, bag.importance])
    assert isinstance(table_grad, tf.IndexedSlices) and isinstance(importance_grad, tf.IndexedSlices)
    assert sorted(set(importance_grad.indices.numpy().tolist())) == [1, 2, 3]


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingBag(5, 2, "max")


@pytest.mark.slow
def test_a_model_with_learned_ngram_weights_trains_and_reloads(tmp_path):
    data = str(tmp_path / "data")
    generate(data, products=150, impressions=2000, seed=2, image_dim=0)
    config = load_config(None, SMALL + ["model.text_pooling=weighted", "model.text_sharing=tables", "train.epochs=1",
                                        "train.cache=none"])
    run = str(tmp_path / "run")
    history = train(config, data, run, verbose=0)
    assert np.isfinite(history["loss"][0])
    importance = load_model(run).query_tower.encoders["query_text"].bag.importance.numpy()
    assert np.count_nonzero(importance) > 0  # the optimizer moved the weights of the n-grams it saw
