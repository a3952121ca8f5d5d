"""Mined hard negatives in training (`tf_q2e.data.mined`, `data.mined_negatives`) and Que2Search's
curriculum stage 2 (`model.hard_negative_weight`, `HardNegativeCurriculum`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from conftest import IMAGE_DIM, SMALL, product, write_rows
from tf_q2e.callbacks import HardNegativeCurriculum
from tf_q2e.config import load_config
from tf_q2e.data.mined import MINED, MINED_ROW, MinedNegatives, with_mined_negatives
from tf_q2e.data.validate import Validator
from tf_q2e.errors import ConfigError, DataError
from tf_q2e.train import build_model

MINED_LISTS = {"red sofa": ["P1", "P2", "P3"], "bike": ["P4"], "lamp": ["P5", "P6"]}


@pytest.fixture
def catalog(tmp_path):
    path = write_rows([product(i) for i in range(8)], str(tmp_path / "catalog.parquet"))
    validator = Validator(image_dim=IMAGE_DIM)
    validator.load_catalog(path)
    return path, validator.products


def write_mined(path, lists: dict[str, list[str]]) -> str:
    rows = [{"query": q, "product_id": p, "rank": r} for q, ids in lists.items() for r, p in enumerate(ids, start=1)]
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def batches(queries: list[str], steps: int = 1) -> tf.data.Dataset:
    rows = {"query": queries, "product_id": ["P0"] * len(queries)}
    return tf.data.Dataset.from_tensors({k: tf.constant(v) for k, v in rows.items()}).repeat(steps)


def draws(mined: MinedNegatives, queries: list[str], per_row: int, seed: int = 0, steps: int = 1) -> list[np.ndarray]:
    out = [b[MINED]["product_id"].numpy().astype(str).reshape(len(queries), per_row)
           for b in mined.attach(batches(queries, steps), per_row, seed)]
    return out


def test_each_row_draws_its_own_querys_mined_products_without_replacement_and_pads(catalog, tmp_path):
    _, products = catalog
    mined = MinedNegatives(write_mined(tmp_path / "m.parquet", MINED_LISTS), products, IMAGE_DIM)
    queries = ["red sofa", "bike", "lamp", "unmined query", "red sofa"]
    for step in draws(mined, queries, per_row=2, steps=5):
        for query, row in zip(queries, step):
            drawn = [p for p in row if p]
            assert set(drawn) <= set(MINED_LISTS.get(query, []))
            assert len(drawn) == len(set(drawn)) == min(2, len(MINED_LISTS.get(query, [])))  # padding only when short
    # The features are the catalogue's, and padding slots are empty products.
    batch = next(iter(mined.attach(batches(["bike"]), per_row=2)))[MINED]
    assert batch["product_id"].numpy().tolist() == [b"P4", b""]
    assert batch["product_title"].numpy().tolist() == [b"product number 4", b""]
    np.testing.assert_allclose(batch["product_image_embedding"].numpy(), [[4.0, 0.5, -1.0], [0.0, 0.0, 0.0]])


def test_an_empty_mined_file_is_a_clear_error(catalog, tmp_path):
    _, products = catalog
    path = str(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"query": pa.array([], pa.string()), "product_id": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match="empty.parquet: no mined negatives"):
        MinedNegatives(path, products)


def test_draws_are_the_same_for_a_seed_and_change_from_step_to_step(catalog, tmp_path):
    _, products = catalog
    mined = MinedNegatives(write_mined(tmp_path / "m.parquet", MINED_LISTS), products)
    queries = ["red sofa"] * 16
    first, again, other = (draws(mined, queries, 1, seed, steps=4) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert not np.array_equal(first[0], first[1])  # a new draw every step
    assert {p for step in first for p in step.ravel()} == set(MINED_LISTS["red sofa"])  # every one gets drawn


def test_the_marker_finds_each_rows_query_before_featurize_hashes_it_away(catalog, tmp_path):
    _, products = catalog
    mined = MinedNegatives(write_mined(tmp_path / "m.parquet", MINED_LISTS), products)
    marker = mined.marker()
    hashed = batches(["lamp", "bike"]).map(lambda rows: {k: v for k, v in marker(rows).items() if k != "query"})
    out = next(iter(mined.attach(hashed, per_row=1)))
    assert MINED_ROW not in out and "query" not in out
    assert out[MINED]["product_id"].numpy()[1] == b"P4" and out[MINED]["product_id"].numpy()[0] in (b"P5", b"P6")


def test_with_mined_negatives_reads_a_catalogue_file(catalog, tmp_path):
    path, _ = catalog
    out = next(iter(with_mined_negatives(batches(["bike"]), write_mined(tmp_path / "m.parquet", MINED_LISTS), path,
                                         per_row=1)))
    assert out[MINED]["product_id"].numpy().tolist() == [b"P4"]


@pytest.mark.parametrize("rows, message", [
    ([{"query": "sofa", "product_id": "P99"}], "row 0: product_id 'P99' is not in the catalogue"),
    ([{"query": "sofa", "product_id": "P1"}, {"query": "", "product_id": "P2"}], "row 1: query is empty"),
    ([{"query": "sofa", "item": "P1"}], "no product_id column"),
])
def test_a_bad_mined_file_is_a_clear_error(catalog, tmp_path, rows, message):
    _, products = catalog
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=message):
        MinedNegatives(path, products)
    with pytest.raises(DataError, match="does not exist"):
        MinedNegatives(str(tmp_path / "missing.parquet"), products)


def test_attach_wants_batches(catalog, tmp_path):
    _, products = catalog
    mined = MinedNegatives(write_mined(tmp_path / "m.parquet", MINED_LISTS), products)
    with pytest.raises(ValueError, match="batch the dataset first"):
        mined.attach(batches(["bike"]).unbatch(), per_row=1)
    with pytest.raises(ValueError, match="at least 1"):
        mined.attach(batches(["bike"]), per_row=0)


def _model(*overrides: str):
    tf.keras.utils.set_random_seed(0)
    return build_model(load_config(None, SMALL + list(overrides)), IMAGE_DIM, ())


def _batch(catalog_products, tmp_path, per_row: int = 2) -> dict:
    rows = [product(i) for i in (0, 1, 4, 5)]
    features = {k: tf.constant([r[k] for r in rows]) for k in rows[0]}
    features["query"] = tf.constant(["red sofa", "red sofa", "bike", "lamp"])
    features["engaged"] = tf.constant([1, 0, 1, -1])
    mined = MinedNegatives(write_mined(tmp_path / "m.parquet", MINED_LISTS), catalog_products, IMAGE_DIM)
    return next(iter(mined.attach(tf.data.Dataset.from_tensors(features), per_row)))


def test_the_model_scores_the_mined_products_with_the_product_tower_as_softmax_columns(catalog, tmp_path):
    model = _model()
    batch = _batch(catalog[1], tmp_path)
    ctr, bce, hard = model.task_losses(batch)
    q, _, p = model.encode(batch)
    mined = batch[MINED]
    e = model.product_tower(mined)
    expected = model.retrieval(q, p, product_ids=batch["product_id"], extra_embeddings=e,
                               extra_ids=mined["product_id"], extra_valid=mined["product_id"] != "")
    np.testing.assert_allclose(ctr.numpy(), expected.loss.numpy(), rtol=1e-5)
    plain = {k: v for k, v in batch.items() if k != MINED}
    ctr_plain, bce_plain, _ = model.task_losses(plain)
    assert ctr.numpy() > ctr_plain.numpy() + 1e-3  # the mined columns count
    np.testing.assert_allclose(bce.numpy(), bce_plain.numpy(), rtol=1e-6)  # and are not in the BCE
    assert hard.numpy() == 0.0  # stage 2 off by default
    # They train the product tower: a gradient reaches it through the mined products alone.
    with tf.GradientTape() as tape:
        e = model.product_tower(mined, training=True)
        loss = model.retrieval(q, p, product_ids=batch["product_id"], extra_embeddings=e,
                               extra_ids=mined["product_id"], extra_valid=mined["product_id"] != "").loss
    gradients = tape.gradient(loss, model.product_tower.trainable_variables)
    assert any(g is not None and float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in gradients)


def test_the_curriculum_switches_the_hardest_negative_loss_on_at_its_epoch(catalog, tmp_path):
    model = _model("model.hard_negative_weight=0.5", "model.hard_negative_margin=0.2", "model.hard_negative_from_epoch=2")
    batch = _batch(catalog[1], tmp_path)
    assert model.task_losses(batch)[2].numpy() == 0.0  # before its epoch
    curriculum = HardNegativeCurriculum()
    curriculum.set_model(model)
    curriculum.on_epoch_begin(2)
    _, _, hard = model.task_losses(batch)
    q, _, p = model.encode(batch)
    mined = batch[MINED]
    margins = model.retrieval(q, p, product_ids=batch["product_id"], extra_embeddings=model.product_tower(mined),
                              extra_ids=mined["product_id"], extra_valid=mined["product_id"] != "").margin_losses
    np.testing.assert_allclose(hard.numpy(), 0.5 * margins.numpy().mean(), rtol=1e-5)
    assert hard.numpy() > 0
    curriculum.on_epoch_begin(1)  # a run resumed before the stage's epoch
    assert model.task_losses(batch)[2].numpy() == 0.0
    assert "hard_negative_loss" in [m.name for m in model.metrics]
    assert _model().hard_negative_switch.numpy() == 0.0
    assert _model("model.hard_negative_from_epoch=0").hard_negative_switch.numpy() == 1.0  # on from the start


@pytest.mark.parametrize("override, message", [
    ("model.mined_negatives_per_row=0", "mined_negatives_per_row"),
    ("model.hard_negative_weight=-1", "hard_negative_weight"),
    ("model.hard_negative_margin=3", "hard_negative_margin"),
    ("model.hard_negative_from_epoch=-1", "hard_negative_from_epoch"),
])
def test_bad_hard_negative_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
