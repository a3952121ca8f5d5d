"""A click-only log (every `engaged` is -1): no engagement metric pretends to be 0, early stopping goes on."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SMALL
from tf_q2e.config import load_config
from tf_q2e.data.synth import generate
from tf_q2e.train import train


@pytest.mark.slow
def test_training_on_a_click_only_log_watches_recall_and_keeps_a_later_epoch(tmp_path, capfd):
    data = str(tmp_path / "data")
    generate(data, products=300, impressions=6000, seed=2, image_dim=0, ground_truth_queries=0)
    for split in ("train", "validation", "test"):  # a log of clicks: no engagement labels
        path = f"{data}/{split}.parquet"
        table = pq.read_table(path)
        column = table.schema.get_field_index("engaged")
        clicks = pa.array([-1] * table.num_rows, type=table.schema.field("engaged").type)
        pq.write_table(table.set_column(column, table.schema.field("engaged"), clicks), path)
    config = load_config(None, SMALL + ["train.epochs=5", "train.early_stopping_patience=1", "train.steps_per_epoch=12",
                                        "train.learning_rate=0.02"])
    assert config.train.early_stopping_monitor == "val_engagement_auc"  # the default
    history = train(config, data, str(tmp_path / "run"), verbose=0)
    err = capfd.readouterr().err
    assert "val_engagement_auc is NaN" in err and "watches val_recall_at_1 instead" in err
    assert all(math.isnan(v) for v in history["val_engagement_auc"] + history["engagement_auc"])  # absent, not 0.0
    assert all(math.isnan(v) for v in history["engagement_loss"])
    assert history["loss"] == pytest.approx(history["contrastive_loss"])  # λ · (no engagement loss)
    recall = history["val_recall_at_1"]
    best = max(range(len(recall)), key=recall.__getitem__)
    # On NaN Keras's own early stopping stopped after patience + 1 = 2 epochs and kept the first.
    assert len(recall) > 2 and best > 0, recall
