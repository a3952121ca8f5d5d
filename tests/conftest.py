"""Shared test helpers: tiny canonical data sets that the tests write themselves, and the synthetic
marketplace that several modules train on (built once per session)."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_q2e  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402

from tf_q2e.data.formats import write_table  # noqa: E402

IMAGE_DIM = 3

# A tiny model for training tests (config overrides); `train.steps_per_execution=1`: one step per
# call, as a loop of steps traces slower than tiny tests run (and observers see every step).
SMALL = [
    "features.buckets=4096",
    "features.category_buckets=128",
    "features.context_buckets=64",
    "features.max_words=16",
    "model.embedding_dim=16",
    "model.text_embedding_dim=16",
    "model.hidden_dim=32",
    "train.global_batch_size=128",
    "train.shuffle_buffer=2000",
    "train.learning_rate=0.01",
    "train.early_stopping_patience=0",
    "train.steps_per_execution=1",
]


# A tinier model for tests that need any trained run (evaluation, comparison): 20 steps of one epoch.
TINY_RUN_CONFIG = [
    "features.buckets=2048", "features.category_buckets=64", "features.context_buckets=32", "features.max_words=16",
    "model.embedding_dim=16", "model.text_embedding_dim=16", "model.hidden_dim=16",
    "train.global_batch_size=64", "train.shuffle_buffer=1000", "train.learning_rate=0.01",
    "train.early_stopping_patience=0", "train.steps_per_execution=1", "train.epochs=1", "train.steps_per_epoch=20",
    "train.validation_steps=2",
]


def train_tiny_run(tmp_path_factory) -> tuple[str, str]:
    """`(run directory, data set)`: `TINY_RUN_CONFIG` trained on a synthetic marketplace of 300 products,
    3000 impressions (seed 7, no images, 5 ground-truth queries). For a module-scoped fixture: the tests
    of a module may write into the run (its evaluation reports)."""
    from tf_q2e.config import load_config
    from tf_q2e.data.synth import generate
    from tf_q2e.train import train

    data = str(tmp_path_factory.mktemp("data"))
    generate(data, products=300, impressions=3000, seed=7, image_dim=0, ground_truth_queries=5)
    run_dir = str(tmp_path_factory.mktemp("run"))
    train(load_config(None, TINY_RUN_CONFIG), data, run_dir, verbose=0)
    return run_dir, data


def product(i: int) -> dict:
    return {
        "product_id": f"P{i}",
        "product_title": f"product number {i}",
        "product_description": f"description of {i}",
        "product_category": ["sofa", "bike", "lamp"][i % 3],
        "product_image_embedding": [float(i), 0.5, -1.0],
    }


def impression(query: str, i: int, engaged: int = 1, country: str = "US", relevance: float | None = 2.0) -> dict:
    return {"query": query, "query_country": country, **product(i), "engaged": engaged, "relevance": relevance}


def good_impressions(n: int = 8) -> list[dict]:
    return [impression(f"query {k % 4}", k % 2, engaged=[1, 0, -1][k % 3]) for k in range(n)]


def write_rows(rows: list[dict], path: str) -> str:
    write_table(pa.Table.from_pylist(rows), path)
    return path


def write_dataset(directory, impressions: list[dict], suffix: str = ".parquet", catalog: list[dict] | None = None) -> str:
    """A data set directory with catalog + train (+ the given impressions as train)."""
    os.makedirs(directory, exist_ok=True)
    catalog = catalog if catalog is not None else [product(i) for i in range(5)]
    write_rows(catalog, os.path.join(directory, "catalog" + suffix))
    write_rows(impressions, os.path.join(directory, "train" + suffix))
    return str(directory)


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_dataset(tmp_path / "data", good_impressions())


# --- shared across modules, built once per session: read only (a test that writes makes its own) ---


@pytest.fixture(scope="session")
def marketplace(tmp_path_factory) -> str:
    """A tiny synthetic marketplace, every split: 400 products, 8000 impressions, seed 3, 4-d images,
    10 ground-truth queries (test_train)."""
    from tf_q2e.data.synth import generate

    out = str(tmp_path_factory.mktemp("marketplace"))
    generate(out, products=400, impressions=8000, seed=3, image_dim=4, ground_truth_queries=10)
    return out


@pytest.fixture(scope="session")
def marketplace_train_only(marketplace, tmp_path_factory) -> str:
    """`marketplace` with catalogue, train split and manifest only (test_recovery, test_multi_worker).

    No validation split: those tests are about what a killed process or a
    worker leaves behind, and a validation pass would only add a second graph
    to trace to every run.
    """
    out = str(tmp_path_factory.mktemp("marketplace_train_only") / "data")
    shutil.copytree(marketplace, out, ignore=shutil.ignore_patterns("validation.parquet", "test.parquet"))
    return out
