"""Bad input in every format: each problem names file, row and column; skip quarantines."""

from __future__ import annotations

import csv
import json
import math
import os

import pyarrow as pa
import pytest
from conftest import good_impressions, impression, product, write_dataset, write_rows

from tf_q2e.data.formats import write_tfrecord
from tf_q2e.data.validate import FileReport, Validator, validate_dataset
from tf_q2e.errors import DataError

FORMATS = [".parquet", ".csv", ".jsonl", ".tfrecord"]
BAD_ROW = 3  # 1-based row that each case spoils
PLACEHOLDER = "QQBADQQ"


def _write(rows: list[dict], path: str, bad_bytes: bool = False) -> str:
    """Writes rows; with bad_bytes, PLACEHOLDER in a text value becomes the byte 0xFF."""
    if not bad_bytes:
        return write_rows(rows, path)
    if path.endswith(".tfrecord"):
        records = [{k: (v.replace(PLACEHOLDER, "").encode() + b"\xff" if isinstance(v, str) and PLACEHOLDER in v else v)
                    for k, v in r.items()} for r in rows]
        write_tfrecord(records, path)
    elif path.endswith(".parquet"):
        table = pa.Table.from_pylist(rows)
        queries = [q.replace(PLACEHOLDER, "").encode() + (b"\xff" if PLACEHOLDER in q else b"") for q in table.column("query").to_pylist()]
        table = table.set_column(table.column_names.index("query"), "query", pa.array(queries, pa.binary()))
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        write_rows(rows, path)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data.replace(PLACEHOLDER.encode(), b"caf\xff"))
    return path


def _rows_with(column: str, value) -> list[dict]:
    rows = good_impressions(6)
    rows[BAD_ROW - 1] = {**rows[BAD_ROW - 1], column: value}
    return rows


def _read(path: str, mode: str, tmp_path=None) -> tuple[list[pa.Table], FileReport]:
    validator = Validator(on_bad_rows=mode, quarantine_dir=None if tmp_path is None else str(tmp_path / "q"))
    report = FileReport(path, "impressions")
    return list(validator.iter_file(path, "impressions", report)), report


CASES = {
    # name: (rows builder, column named in the error, bad_bytes)
    "empty query": (lambda: _rows_with("query", "   "), "query", False),
    "non-UTF-8 byte": (lambda: _rows_with("query", f"sofa {PLACEHOLDER}"), "query", True),
    "NaN label": (lambda: _rows_with("engaged", math.nan), "engaged", False),
    "label out of range": (lambda: _rows_with("engaged", 2), "engaged", False),
    "image embedding of the wrong length": (lambda: _rows_with("product_image_embedding", [1.0, 2.0]), "product_image_embedding", False),
    "NaN in an image embedding": (lambda: _rows_with("product_image_embedding", [1.0, math.nan, 2.0]), "product_image_embedding", False),
    "conflicting product fields": (lambda: _rows_with("product_title", "another title"), "product_title", False),
    "empty product title": (lambda: _rows_with("product_title", ""), "product_title", False),
}


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_row_error_names_file_row_and_column(tmp_path, suffix, case):
    build, column, bad_bytes = CASES[case]
    path = _write(build(), str(tmp_path / f"train{suffix}"), bad_bytes)
    with pytest.raises(DataError) as info:
        _read(path, "error")
    message = str(info.value)
    assert f"train{suffix}: row {BAD_ROW}, column {column}:" in message, message
    assert "on_bad_rows=skip" in message


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_row_skip_quarantines_exactly_that_row(tmp_path, suffix, case):
    build, column, bad_bytes = CASES[case]
    rows = build()
    path = _write(rows, str(tmp_path / f"train{suffix}"), bad_bytes)
    tables, report = _read(path, "skip", tmp_path)
    kept = pa.concat_tables(tables)
    assert (report.rows_read, report.rows_kept, report.problem_count) == (len(rows), len(rows) - 1, 1)
    assert kept.num_rows == len(rows) - 1
    with open(report.quarantine, encoding="utf-8") as f:
        quarantined = [json.loads(line) for line in f]
    assert [q["row"] for q in quarantined] == [BAD_ROW]
    assert quarantined[0]["problems"][0]["column"] == column


def _write_text(rows: list[dict], path: str) -> str:
    """Writes CSV or JSONL straight from dicts, so a column may mix types."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            writer = csv.writer(f)
            writer.writerow(rows[0])
            writer.writerows([json.dumps(v) if isinstance(v, list) else v for v in r.values()] for r in rows)
    return path


def test_wrong_json_type_is_a_row_problem(tmp_path):
    path = _write_text(_rows_with("query", 123), str(tmp_path / "train.jsonl"))
    with pytest.raises(DataError, match=rf"train.jsonl: row {BAD_ROW}, column query: expected a string, got int"):
        _read(path, "error")


def test_wrong_csv_label_text_is_a_row_problem(tmp_path):
    path = _write_text(_rows_with("engaged", "yes"), str(tmp_path / "train.csv"))
    with pytest.raises(DataError, match=rf"train.csv: row {BAD_ROW}, column engaged: not a label: 'yes'"):
        _read(path, "error")


def test_wrong_tfrecord_feature_type_is_a_row_problem(tmp_path):
    path = str(tmp_path / "train.tfrecord")
    write_tfrecord(_rows_with("engaged", "yes"), path)
    with pytest.raises(DataError, match=rf"train.tfrecord: row {BAD_ROW}, column engaged: expected a number"):
        _read(path, "error")


def test_wrong_parquet_column_type_fails_the_file(tmp_path):
    rows = [{**r, "query": 7} for r in good_impressions(4)]
    path = write_rows(rows, str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match=r"train.parquet: column query \(every row\) has type int64; expected string"):
        _read(path, "skip", tmp_path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_missing_required_column_fails_the_file(tmp_path, suffix):
    rows = [{k: v for k, v in r.items() if k != "engaged"} for r in good_impressions(4)]
    path = write_rows(rows, str(tmp_path / f"train{suffix}"))
    with pytest.raises(DataError, match=rf"train{suffix}: missing required column\(s\) engaged"):
        _read(path, "skip", tmp_path)


def test_unparseable_jsonl_line_is_a_row_problem(tmp_path):
    path = write_rows(good_impressions(4), str(tmp_path / "train.jsonl"))
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    tables, report = _read(path, "skip", tmp_path)
    assert report.rows_kept == 4 and report.problem_count == 1
    assert "row 5, column (row): not a JSON object" in str(report.problems[0])


def test_good_rows_convert_to_the_canonical_schema(tmp_path):
    path = write_rows(good_impressions(6), str(tmp_path / "train.csv"))
    tables, report = _read(path, "error")
    table = pa.concat_tables(tables)
    assert report.problem_count == 0
    assert table.schema.field("engaged").type == pa.int8()
    assert table.column("engaged").to_pylist() == [1, 0, -1, 1, 0, -1]
    assert table.column("product_image_embedding")[1].as_py() == [1.0, 0.5, -1.0]
    assert report.labels == {"engaged": 2, "not_engaged": 2, "unlabelled": 2}


def test_integer_product_ids_are_read_as_strings(tmp_path):
    rows = [{**r, "product_id": int(r["product_id"][1:])} for r in good_impressions(4)]
    tables, _ = _read(write_rows(rows, str(tmp_path / "train.parquet")), "error")
    assert tables[0].column("product_id").to_pylist()[:2] == ["0", "1"]


def test_missing_relevance_is_null_but_nan_relevance_is_a_problem(tmp_path):
    rows = good_impressions(4)
    rows[0]["relevance"] = None
    tables, _ = _read(write_rows(rows, str(tmp_path / "a.csv")), "error")
    assert tables[0].column("relevance")[0].as_py() is None
    rows[1]["relevance"] = math.nan
    with pytest.raises(DataError, match="row 2, column relevance: NaN relevance"):
        _read(write_rows(rows, str(tmp_path / "b.parquet")), "error")


def test_unknown_product_in_dataset_is_reported(tmp_path):
    rows = good_impressions(4) + [impression("query 9", 42)]
    data = write_dataset(tmp_path / "d", rows)
    report = validate_dataset(data)
    assert report.problem_count == 1
    assert "row 5, column product_id: product_id 'P42' is not in the catalogue" in str(report.files[1].problems[0])


def test_impression_conflicting_with_catalogue_names_the_catalogue_row(tmp_path):
    rows = good_impressions(4)
    rows[2]["product_description"] = "changed"
    report = validate_dataset(write_dataset(tmp_path / "d", rows))
    problem = str(report.files[1].problems[0])
    assert "row 3, column product_description" in problem and "catalog.parquet row 1" in problem


def test_catalogue_conflicts_are_problems_and_identical_repeats_are_dropped_with_a_note(tmp_path):
    catalog = [product(i) for i in range(5)] + [product(1), {**product(2), "product_title": "other"}]
    report = validate_dataset(write_dataset(tmp_path / "d", good_impressions(4), catalog=catalog))
    cat = report.files[0]
    assert cat.rows_read == 7 and cat.rows_kept == 5
    assert [str(p).split(": ", 1)[1][:30] for p in cat.problems] == ["row 7, column product_title: p"]
    assert any("1 row(s) repeat a product" in n for n in cat.notes)


def test_dataset_in_csv_is_found_by_suffix(tmp_path):
    data = write_dataset(tmp_path / "d", good_impressions(6), suffix=".csv")
    report = validate_dataset(data)
    assert [os.path.basename(f.path) for f in report.files] == ["catalog.csv", "train.csv"]
    assert report.problem_count == 0 and report.files[1].rows_kept == 6


def test_missing_catalogue_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "d")
    with pytest.raises(DataError, match=r"no catalogue \(catalog.parquet or another format\).*\.csv"):
        validate_dataset(str(tmp_path / "d"))


def test_corrupt_tfrecord_fails_with_the_file(tmp_path):
    path = str(tmp_path / "train.tfrecord")
    write_tfrecord(good_impressions(4), path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    with pytest.raises(DataError, match=r"train.tfrecord: row 4: corrupt TFRecord file"):
        _read(path, "skip", tmp_path)


def test_unknown_suffix_names_the_supported_ones(tmp_path):
    path = tmp_path / "train.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"train.xlsx: unknown file type; use one of the suffixes .parquet"):
        _read(str(path), "error")


def test_embedding_problems_name_the_right_row_of_a_sliced_column():
    """NaN found in a column that does not start at offset 0 (a slice) is flagged on its own row."""
    from tf_q2e.data.columns import to_embedding

    column = pa.array([[1.0, 2.0], [3.0, 4.0], [math.nan, 1.0], [5.0, 6.0], [7.0, 8.0]], type=pa.list_(pa.float32()))
    for start in range(3):
        flagged: dict[int, str] = {}

        def flag(rows, column_name, message):
            for i in rows:
                flagged.setdefault(int(i), message if isinstance(message, str) else message(int(i)))

        fixed, dim = to_embedding(column.slice(start), "f.parquet", None, flag)
        assert dim == 2 and flagged == {2 - start: "image embedding holds NaN or infinity"}
        assert fixed.type == pa.list_(pa.float32(), 2)
