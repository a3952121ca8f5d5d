"""Mined hard negatives (`tf_q2e.mining`, `q2e mine`): never a query's own impressions, below the margin,
deterministic for a seed, from BM25 or the run's index."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SMALL
from tf_q2e.bm25 import BM25Index
from tf_q2e.cli import main
from tf_q2e.config import load_config
from tf_q2e.data.synth import generate
from tf_q2e.index import build_index
from tf_q2e.mining import mine_negatives, query_impressions
from tf_q2e.train import train

pytestmark = pytest.mark.slow  # a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    generate(data, products=400, impressions=2500, seed=11)
    run_dir = str(tmp_path_factory.mktemp("run"))
    train(load_config(None, SMALL + ["train.epochs=1", "train.steps_per_epoch=5"]), data, run_dir, verbose=0)
    build_index(run_dir, log=lambda _: None)
    return run_dir, data


def mined(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("source", ["bm25", "index"])
def test_mined_negatives_are_never_shown_for_their_query_and_score_below_the_margin(run, tmp_path, source):
    run_dir, data = run
    out = str(tmp_path / "neg.parquet")
    report = mine_negatives(run_dir, source, out, per_query=5, depth=50, margin=0.9, skip_top=1, log=lambda _: None)
    rows = mined(out)
    shown = query_impressions(os.path.join(data, "train.parquet"))
    assert report["negatives"] == len(rows) > 0 and report["queries"] == len(shown)
    assert report["dropped"]["impressed"] > 0  # the sources do rank shown products high: the rule mattered
    per_query = {}
    for row in rows:
        assert row["product_id"] not in shown[row["query"]][0]
        assert row["score"] < 0.9 * row["positive_score"] + 1e-5
        assert 1 <= row["rank"] <= 50
        per_query.setdefault(row["query"], []).append(row["rank"])
    assert max(len(r) for r in per_query.values()) <= 5
    assert all(r == sorted(r) for r in per_query.values())  # best-ranked first
    assert set(per_query) <= set(shown)
    if source == "bm25":  # the recorded scores are BM25's own
        index = BM25Index.from_catalog(os.path.join(data, "catalog.parquet"))
        sample = rows[:20]
        np.testing.assert_allclose([r["score"] for r in sample],
                                   index.score_pairs([r["query"] for r in sample], [r["product_id"] for r in sample]),
                                   rtol=1e-5)


def test_mining_is_deterministic_for_a_seed(run, tmp_path):
    import tf_q2e

    assert tf_q2e.mine_negatives is mine_negatives  # the public name of what q2e mine runs
    run_dir, _ = run
    paths = [str(tmp_path / f"{i}.parquet") for i in range(3)]
    for path, seed in zip(paths, (3, 3, 4)):
        mine_negatives(run_dir, "bm25", path, per_query=3, depth=60, sampling="random", seed=seed, log=lambda _: None)
    first, again, other = (mined(p) for p in paths)
    assert first == again and first != other


@pytest.mark.parametrize("argv, message", [
    (["--margin", "1.5"], "--margin (1.5) must be in (0, 1]"),
    (["--per-query", "0"], "--per-query (0) must be at least 1"),
    (["--depth", "5", "--per-query", "8"], "--depth (5) must cover"),
])
def test_bad_mining_arguments_exit_2(run, capsys, argv, message):
    assert main(["mine", "--run", run[0], *argv]) == 2
    assert message in capsys.readouterr().err


def test_q2e_mine_writes_the_run_file_and_needs_an_index_for_index(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(["mine", "--run", run_dir, "--per-query", "2"]) == 0
    assert "mined negatives of" in capsys.readouterr().out
    assert os.path.exists(os.path.join(run_dir, "mined_negatives.parquet"))
    assert main(["mine", "--run", str(tmp_path), "--source", "index"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_q2e_train_adds_the_mined_negatives_and_runs_the_curriculum(run, tmp_path, capsys, monkeypatch):
    import json

    import yaml

    run_dir, data = run
    out = str(tmp_path / "neg.parquet")
    mine_negatives(run_dir, "bm25", out, per_query=4, log=lambda _: None)
    trained = str(tmp_path / "mined_run")
    monkeypatch.chdir(tmp_path)  # the file is given relative: the run records it absolute
    assert main(["train", "--data", data, "--out", trained, *[a for o in SMALL for a in ("--set", o)],
                 "--set", "train.epochs=2", "--set", "train.steps_per_epoch=3", "--set", "data.mined_negatives=neg.parquet",
                 "--set", "model.mined_negatives_per_row=2", "--set", "model.hard_negative_weight=0.5"]) == 0
    assert "negatives of" in capsys.readouterr().err
    with open(os.path.join(trained, "config.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f)["data"]["mined_negatives"] == out
    with open(os.path.join(trained, "history.json"), encoding="utf-8") as f:
        history = json.load(f)
    assert all(np.isfinite(history["contrastive_loss"])) and history["hard_negative_loss"][1] > 0
    assert main(["train", "--data", data, "--out", str(tmp_path / "bad_run"), "--set", "train.epochs=1",
                 "--set", "data.mined_negatives=missing.parquet"]) == 2
    assert "missing.parquet does not exist" in capsys.readouterr().err
