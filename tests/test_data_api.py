"""The public data API: from_pandas, from_files, from_dir and FeatureSchema on tiny data the tests write."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import IMAGE_DIM, good_impressions, impression, product, write_dataset, write_rows

from tf_q2e.data import FeatureSchema, from_dir, from_files, from_pandas
from tf_q2e.data.pipeline import ImpressionPipeline
from tf_q2e.errors import DataError

SCHEMA = FeatureSchema(IMAGE_DIM, ("query_country",))


def _catalog() -> pd.DataFrame:
    return pd.DataFrame([product(i) for i in range(5)])


def _with(rows: list[dict], row: int, **values) -> list[dict]:
    """`rows` with 1-based row `row` changed."""
    rows = [dict(r) for r in rows]
    rows[row - 1].update(values)
    return rows


def _column(ds, key: str) -> list:
    return [element[key] for element in ds.as_numpy_iterator()]


def test_importing_tf_q2e_data_does_not_import_tensorflow():
    code = ("import sys, tf_q2e.data; from tf_q2e.data import synth; "
            "print(sorted(tf_q2e.data.__all__), 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['FeatureSchema',", "'MinedNegatives',", "'from_dir',", "'from_files',",
                                     "'from_pandas',", "'with_mined_negatives']", "False"]


@pytest.mark.parametrize("with_relevance", [False, True])
def test_element_spec_is_the_pipelines(tmp_path, with_relevance):
    rows = good_impressions(6)
    data = write_dataset(tmp_path / "d", rows)
    train, catalog = os.path.join(data, "train.parquet"), os.path.join(data, "catalog.parquet")
    expected = ImpressionPipeline([train], catalog, with_relevance=with_relevance).element_spec
    for ds in (from_pandas(pd.DataFrame(rows), with_relevance=with_relevance),
               from_files(train, catalog, with_relevance=with_relevance),
               from_dir(data, with_relevance=with_relevance)):
        assert ds.element_spec == expected
        assert list(ds.element_spec) == list(expected)  # same key order


def test_from_pandas_rows_round_trip():
    rows = good_impressions(6)
    elements = list(from_pandas(pd.DataFrame(rows), _catalog()).as_numpy_iterator())
    assert [e["query"].decode() for e in elements] == [r["query"] for r in rows]
    assert [e["product_id"].decode() for e in elements] == [r["product_id"] for r in rows]
    assert [e["product_category"].decode() for e in elements] == [r["product_category"] for r in rows]
    assert [int(e["engaged"]) for e in elements] == [r["engaged"] for r in rows]
    np.testing.assert_array_equal(np.stack([e["product_image_embedding"] for e in elements]),
                                  np.array([r["product_image_embedding"] for r in rows], np.float32))


def test_from_pandas_reads_integer_ids_as_strings_and_missing_relevance_as_nan():
    rows = [{**r, "product_id": int(r["product_id"][1:])} for r in good_impressions(4)]
    rows[1]["relevance"] = np.nan
    ds = from_pandas(pd.DataFrame(rows), with_relevance=True)
    assert _column(ds, "product_id") == [b"0", b"1", b"0", b"1"]
    relevance = _column(ds, "relevance")
    assert relevance[0] == 2.0 and np.isnan(relevance[1])


def test_from_pandas_column_with_no_values_means_no_image_and_no_grade():
    df = pd.DataFrame(good_impressions(3)).assign(product_image_embedding=None, relevance=None)
    ds = from_pandas(df, with_relevance=True)
    assert "product_image_embedding" not in ds.element_spec and FeatureSchema.of(df).image_dim == 0
    assert np.isnan(_column(ds, "relevance")).all()


def test_from_pandas_bad_row_names_row_and_column_as_the_file_reader_does(tmp_path):
    rows = _with(good_impressions(6), 3, query="   ")
    path = write_rows(rows, str(tmp_path / "train.jsonl"))
    with pytest.raises(DataError) as from_file:
        from_files(path)
    with pytest.raises(DataError) as from_frame:
        from_pandas(pd.DataFrame(rows))
    file_message = str(from_file.value)
    assert file_message.startswith(f"{path}: row 3, column query: empty query")
    assert str(from_frame.value).startswith("DataFrame: " + file_message[len(path) + 2:])
    assert "row r is df.iloc[r - 1]" in str(from_frame.value)


def test_from_pandas_cell_of_the_wrong_type_is_a_row_problem():
    df = pd.DataFrame(good_impressions(6)).astype({"query": object})
    df.at[2, "query"] = 123
    with pytest.raises(DataError, match="DataFrame: row 3, column query: expected a string, got int 123"):
        from_pandas(df)


def test_from_pandas_skip_drops_the_bad_row_and_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = _with(good_impressions(6), 3, engaged=2)
    ds = from_pandas(pd.DataFrame(rows), on_bad_rows="skip")
    assert _column(ds, "query") == [r["query"].encode() for i, r in enumerate(rows) if i != 2]
    assert os.listdir(tmp_path) == []


def test_from_pandas_with_no_usable_rows_names_the_first_problem():
    rows = [_with(good_impressions(1), 1, product_title="")[0]]
    with pytest.raises(DataError, match=r"DataFrame: no usable rows \(1 of 1 dropped: DataFrame: row 1, column "
                                        "product_title: empty product_title"):
        from_pandas(pd.DataFrame(rows), on_bad_rows="skip")


@pytest.mark.parametrize("catalog_kind", ["DataFrame", "file"])
def test_from_pandas_checks_the_catalogue(tmp_path, catalog_kind):
    catalog = _catalog() if catalog_kind == "DataFrame" else write_rows([product(i) for i in range(5)],
                                                                         str(tmp_path / "catalog.csv"))
    origin = "catalog DataFrame row 2" if catalog_kind == "DataFrame" else "catalog.csv row 2"
    conflicting = _with(good_impressions(4), 2, product_description="changed")
    with pytest.raises(DataError, match=f"DataFrame: row 2, column product_description: .* in {origin}"):
        from_pandas(pd.DataFrame(conflicting), catalog)
    unknown = good_impressions(4) + [impression("query 9", 42)]
    with pytest.raises(DataError, match="DataFrame: row 5, column product_id: product_id 'P42' is not in the catalogue"):
        from_pandas(pd.DataFrame(unknown), catalog)


def test_from_files_checks_a_catalogue_dataframe(tmp_path):
    rows = _with(good_impressions(4), 2, product_title="another title")
    path = write_rows(rows, str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match="train.parquet: row 2, column product_title: .* in catalog DataFrame row 2"):
        from_files(path, _catalog())
    assert len(list(from_files(path, _catalog(), on_bad_rows="skip"))) == 3


def test_batch_size_gives_batches_with_a_short_last_one(tmp_path):
    rows = good_impressions(6)
    path = write_rows(rows, str(tmp_path / "train.csv"))
    for ds in (from_pandas(pd.DataFrame(rows), batch_size=4), from_files(path, batch_size=4)):
        assert ds.element_spec["product_image_embedding"].shape.as_list() == [None, IMAGE_DIM]
        batches = list(ds.as_numpy_iterator())
        assert [len(b["query"]) for b in batches] == [4, 2]
        assert batches[0]["product_image_embedding"].shape == (4, IMAGE_DIM)
        assert list(batches[1]["engaged"]) == [r["engaged"] for r in rows[4:]]


def test_from_files_reads_several_formats_in_order(tmp_path):
    first = write_rows([impression(f"a {k}", k % 2) for k in range(3)], str(tmp_path / "a.jsonl"))
    second = write_rows([impression(f"b {k}", k % 2) for k in range(2)], str(tmp_path / "b.tfrecord"))
    ds = from_files([first, second], str(write_rows([product(i) for i in range(2)], str(tmp_path / "catalog.csv"))))
    assert _column(ds, "query") == [b"a 0", b"a 1", b"a 2", b"b 0", b"b 1"]


def test_from_files_shuffle_is_a_seeded_permutation(tmp_path):
    path = write_rows([impression(f"q {k}", k % 2) for k in range(40)], str(tmp_path / "train.parquet"))
    first, again = (_column(from_files(path, shuffle=True, seed=1), "query") for _ in range(2))
    assert first == again and sorted(first) == sorted(f"q {k}".encode() for k in range(40))
    assert first != sorted(first, key=lambda q: int(q.split()[1]))


def test_from_files_given_a_directory_points_to_from_dir(tmp_path):
    data = write_dataset(tmp_path / "d", good_impressions(2))
    with pytest.raises(DataError, match="a directory, not a file; .* use from_dir"):
        from_files(data)


def test_from_dir_missing_split_names_the_splits_found(tmp_path):
    data = write_dataset(tmp_path / "d", good_impressions(2))
    with pytest.raises(DataError, match=r"no test.parquet \(splits found: train\)"):
        from_dir(data, "test")
    with pytest.raises(ValueError, match="split must be one of train, validation, test, got 'valid'"):
        from_dir(data, "valid")


def test_from_dir_reads_the_split_in_order_when_not_shuffled(tmp_path):
    rows = good_impressions(6)
    data = write_dataset(tmp_path / "d", rows)
    assert _column(from_dir(data, shuffle=False), "query") == [r["query"].encode() for r in rows]


def test_feature_schema_of_each_accepted_input():
    df = pd.DataFrame(good_impressions(4))
    rows = from_pandas(df)
    for x in (rows, rows.batch(2), rows.element_spec, rows.batch(2).element_spec, df, SCHEMA):
        assert FeatureSchema.of(x) == SCHEMA
    bare = df.drop(columns=["query_country", "product_image_embedding"])
    assert FeatureSchema.of(bare) == FeatureSchema.of(from_pandas(bare)) == FeatureSchema(0, ())


@pytest.mark.parametrize("bad, error, message", [
    (42, TypeError, "FeatureSchema.of takes a tf.data.Dataset"),
    (tf.data.Dataset.from_tensors(({"query": "q"}, 1)), TypeError, "element_spec is a tuple, not a dict"),
    ({"product_image_embedding": tf.TensorSpec([None, None], tf.float32)}, ValueError, "no static length"),
    ({"product_image_embedding": tf.RaggedTensorSpec([None, None], tf.float32)}, ValueError, "static length"),
    ({"query_country": tf.TensorSpec([], tf.int64)}, ValueError, "query_country .* expected a tf.string"),
])
def test_feature_schema_of_a_bad_input_says_what_is_wrong(bad, error, message):
    with pytest.raises(error, match=message):
        FeatureSchema.of(bad)


def test_feature_schema_checks_its_fields():
    with pytest.raises(ValueError, match="name them query_<name>"):
        FeatureSchema(0, ("country",))
    with pytest.raises(ValueError, match="image_dim"):
        FeatureSchema(-1)
