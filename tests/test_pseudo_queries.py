"""Pseudo-queries made from catalogue titles: their words, their rows, and training with them."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SMALL
from tf_q2e import train as train_module
from tf_q2e.config import load_config
from tf_q2e.data import schema as S
from tf_q2e.data.pipeline import ImpressionPipeline
from tf_q2e.data.pseudo_queries import PSEUDO_QUERY_FILE, pseudo_queries, title_words, write_pseudo_queries
from tf_q2e.data.synth import generate
from tf_q2e.errors import ConfigError

TITLES = ["Delta Vero 1-Handle Shower Faucet in Chrome", "&& --", "Grey Jute Rug", "Lamp"]


def _is_ordered_subset(query: list[str], words: list[str]) -> bool:
    it = iter(words)
    return all(any(w == x for x in it) for w in query)


def test_pseudo_queries_are_title_words_in_title_order():
    rows, queries = pseudo_queries(TITLES, 3, np.array([1, 2, 3, 5]), np.random.default_rng(0))
    assert title_words(TITLES[0]) == ["delta", "vero", "1-handle", "shower", "faucet", "in", "chrome"]
    assert rows.tolist() == [0, 0, 0, 2, 2, 2, 3, 3, 3]  # the title without a word gets none
    for row, query in zip(rows, queries):
        words = title_words(TITLES[row])
        assert 1 <= len(query.split()) <= min(5, len(words))
        assert _is_ordered_subset(query.split(), words), (query, TITLES[row])
    assert queries[6:] == ["lamp"] * 3


def test_pseudo_query_lengths_follow_the_given_word_counts_and_the_seed():
    long_titles = [" ".join(f"w{i}x{j}" for j in range(12)) for i in range(50)]
    _, two = pseudo_queries(long_titles, 2, np.array([2]), np.random.default_rng(1))
    assert {len(q.split()) for q in two} == {2}
    _, again = pseudo_queries(long_titles, 2, np.array([2]), np.random.default_rng(1))
    _, other = pseudo_queries(long_titles, 2, np.array([2]), np.random.default_rng(2))
    assert again == two and other != two
    with pytest.raises(ValueError, match="query_lengths"):
        pseudo_queries(long_titles, 1, np.array([0, 2]), np.random.default_rng(0))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    generate(out, products=200, impressions=3000, seed=5, image_dim=4)
    return out


def test_written_rows_carry_the_catalogue_fields_and_no_engagement_label(data_dir, tmp_path):
    catalog, train = os.path.join(data_dir, S.CATALOG_FILE), os.path.join(data_dir, "train.parquet")
    path = str(tmp_path / PSEUDO_QUERY_FILE)
    reference = ImpressionPipeline([train], catalog).products
    n = write_pseudo_queries(reference, train, path, 2, seed=0, context_columns=("query_country",), image_dim=4)
    table = pq.read_table(path)
    products = {r[S.PRODUCT_ID]: r for r in pq.read_table(catalog).to_pylist()}
    assert n == table.num_rows == 2 * len(products)
    assert table.schema.equals(S.impression_schema(4, ("query_country",)))
    for row in table.to_pylist():
        product = products[row[S.PRODUCT_ID]]
        # Every product field; the catalogue-only filter attributes (product_country, ...) are not impression fields.
        assert {k: row[k] for k in product if k not in S.PRODUCT_ATTRIBUTE_FIELDS} == \
            {k: v for k, v in product.items() if k not in S.PRODUCT_ATTRIBUTE_FIELDS}
        assert row[S.ENGAGED] == S.ENGAGED_UNLABELLED and row[S.RELEVANCE] is None and row["query_country"] == ""
        assert _is_ordered_subset(row[S.QUERY].split(), title_words(product[S.PRODUCT_TITLE]))
    # The rows pass the pipeline's checks against the catalogue, next to the training split.
    pipeline = ImpressionPipeline([train, path], catalog)
    rows = sum(int(b[S.ENGAGED].shape[0]) for b in pipeline.dataset(512, training=False))
    assert rows == pq.read_metadata(train).num_rows + n


@pytest.mark.slow
def test_training_reads_the_pseudo_queries_with_the_split(data_dir, tmp_path, monkeypatch):
    built = []

    class Spy(ImpressionPipeline):
        def __init__(self, files, *args, **kwargs):
            built.append(list(files))
            super().__init__(files, *args, **kwargs)

    monkeypatch.setattr(train_module, "ImpressionPipeline", Spy)
    run = str(tmp_path / "run")
    config = load_config(None, SMALL + ["data.pseudo_queries=3", "train.epochs=1",
                                        "train.cache=none"])
    history = train_module.train(config, data_dir, run, verbose=0)
    path = os.path.join(run, PSEUDO_QUERY_FILE)
    assert pq.read_metadata(path).num_rows == 3 * 200
    assert [os.path.join(data_dir, "train.parquet"), path] in built
    assert np.isfinite(history["loss"][0])


def test_negative_pseudo_query_count_is_a_config_error():
    with pytest.raises(ConfigError, match="data.pseudo_queries"):
        load_config(None, ["data.pseudo_queries=-1"])
