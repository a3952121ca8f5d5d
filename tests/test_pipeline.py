"""The tf.data pipeline: raw strings, batching, shuffling, sharding, streaming by row group."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from conftest import IMAGE_DIM, impression, product, write_dataset, write_rows

from tf_q2e.data.pipeline import ImpressionPipeline, dataset_from_dir
from tf_q2e.errors import DataError

N_ROWS = 95


def _rows(n: int = N_ROWS) -> list[dict]:
    return [impression(f"query {k}", k % 7, engaged=k % 2) for k in range(n)]


@pytest.fixture
def row_grouped(tmp_path):
    """A Parquet file of 95 rows in row groups of 10, plus its catalogue."""
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(_rows()), path, row_group_size=10)
    catalog = write_rows([product(i) for i in range(7)], str(tmp_path / "catalog.parquet"))
    return path, catalog


def _queries(ds) -> list[str]:
    return [q.decode() for batch in ds for q in batch["query"].numpy()]


def test_elements_are_raw_strings_and_typed_labels(row_grouped):
    path, catalog = row_grouped
    batch = next(iter(ImpressionPipeline([path], catalog).dataset(8, training=False)))
    assert batch["query"].dtype == tf.string and batch["query"].numpy()[0] == b"query 0"
    assert batch["product_title"].numpy()[1] == b"product number 1"
    assert batch["product_image_embedding"].shape == (8, IMAGE_DIM)
    assert batch["engaged"].dtype == tf.int32 and list(batch["engaged"].numpy()[:3]) == [0, 1, 0]
    assert "relevance" not in batch


def test_evaluation_reads_every_row_once_in_order(row_grouped):
    path, catalog = row_grouped
    queries = _queries(ImpressionPipeline([path], catalog).dataset(16, training=False))
    assert queries == [f"query {k}" for k in range(N_ROWS)]


def test_training_drops_the_remainder_and_reshuffles_each_epoch(row_grouped):
    path, catalog = row_grouped
    ds = ImpressionPipeline([path], catalog).dataset(16, training=True, shuffle_buffer=50, seed=3)
    epoch1, epoch2 = _queries(ds), _queries(ds)
    assert len(epoch1) == len(epoch2) == (N_ROWS // 16) * 16
    assert epoch1 != epoch2
    assert epoch1 != sorted(epoch1, key=lambda q: int(q.split()[1]))
    again = _queries(ImpressionPipeline([path], catalog).dataset(16, training=True, shuffle_buffer=50, seed=3))
    assert again == epoch1  # same seed, same order


@pytest.mark.parametrize("pipelines", [2, 3])
def test_shards_are_disjoint_and_cover_every_row(row_grouped, pipelines):
    path, catalog = row_grouped
    pipeline = ImpressionPipeline([path], catalog)
    shards = []
    for i in range(pipelines):
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=i)
        shards.append(_queries(pipeline.dataset(7, training=False, input_context=context)))
    assert all(shards)
    assert sorted(q for s in shards for q in s) == sorted(f"query {k}" for k in range(N_ROWS))


def test_fewer_units_than_workers_shards_rows(tmp_path):
    path = write_rows(_rows(10), str(tmp_path / "train.csv"))  # one unit: the whole file
    pipeline = ImpressionPipeline([path])
    shards = [
        _queries(pipeline.dataset(4, False, input_context=tf.distribute.InputContext(2, i, 1))) for i in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0]).isdisjoint(shards[1])


def test_bad_first_rows_fail_when_the_pipeline_is_built(tmp_path):
    rows = _rows(10)
    rows[4]["query"] = ""
    path = write_rows(rows, str(tmp_path / "train.jsonl"))
    with pytest.raises(DataError, match="train.jsonl: row 5, column query: empty query"):
        ImpressionPipeline([path])


def test_bad_row_in_the_stream_fails_with_its_location_or_is_skipped(tmp_path):
    rows = _rows(100)
    rows[79]["query"] = ""  # past the rows read when the pipeline is built
    path = write_rows(rows, str(tmp_path / "train.jsonl"))
    with pytest.raises(tf.errors.OpError, match="train.jsonl: row 80, column query: empty query"):
        list(ImpressionPipeline([path]).dataset(4, training=False))
    kept = _queries(ImpressionPipeline([path], on_bad_rows="skip").dataset(4, training=False))
    assert len(kept) == 99 and "query 79" not in kept


def test_dataset_from_dir_reads_a_split_with_relevance(tmp_path):
    data = write_dataset(tmp_path / "d", [impression("q", 1, relevance=None), impression("r", 0, relevance=2.5)])
    batch = next(iter(dataset_from_dir(data, "train", 4, training=False, with_relevance=True)))
    relevance = batch["relevance"].numpy()
    assert np.isnan(relevance[0]) and relevance[1] == 2.5


def test_cached_pipeline_replays_every_row_in_new_orders(row_grouped):
    path, catalog = row_grouped
    upper = lambda chunk: {**chunk, "query": tf.strings.upper(chunk["query"])}  # noqa: E731
    ds = ImpressionPipeline([path], catalog).dataset(5, training=True, shuffle_buffer=10 * 256, seed=1, repeat=True,
                                                    cache="", chunk_fn=upper)
    rows = _queries(ds.take(3 * N_ROWS // 5))  # three passes' worth of rows
    counts = collections.Counter(rows)
    assert set(counts) == {f"QUERY {k}" for k in range(N_ROWS)}  # chunk_fn ran; every row came back
    assert max(counts.values()) <= 4  # the shuffle buffer only mixes neighbouring passes
    assert rows[:N_ROWS] != rows[N_ROWS : 2 * N_ROWS]  # passes are not replayed in one order
