"""`q2e` verbs end to end: exit codes, one-line errors, quarantine, the data commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import good_impressions, write_dataset

from tf_q2e.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.yaml")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_good_dataset(capsys, tiny_dataset):
    code, out, err = _run(capsys, "validate", "--config", DEFAULT_CONFIG, "--data", tiny_dataset)
    assert code == 0, err
    assert "train.parquet: 8 rows read, 8 kept" in out
    assert "engaged 3, not_engaged 3, unlabelled 2" in out


def test_validate_bad_row_exits_2_with_one_line_naming_the_place(capsys, tmp_path):
    rows = good_impressions(6)
    rows[3]["engaged"] = float("nan")
    data = write_dataset(tmp_path / "d", rows)
    code, out, err = _run(capsys, "validate", "--data", data)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q2e: error: 1 bad row(s)")
    assert "train.parquet: row 4, column engaged: NaN label" in lines[0]


def test_validate_skip_quarantines_prints_and_records_the_count(capsys, tmp_path):
    rows = good_impressions(6)
    rows[1]["query"] = ""
    data = write_dataset(tmp_path / "d", rows)
    report_path = str(tmp_path / "report.json")
    code, out, err = _run(capsys, "validate", "--data", data, "--set", "data.on_bad_rows=skip", "--report", report_path)
    assert code == 0, err
    assert "1 row(s) skipped" in out
    quarantine = os.path.join(data, "quarantine", "train.parquet.quarantine.jsonl")
    with open(quarantine, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [(r["row"], r["problems"][0]["column"]) for r in records] == [(2, "query")]
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    assert report["rows_dropped"] == 1 and report["files"][1]["rows_kept"] == 5


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["validate", "--set", "train.global_batch_sise=3"], "did you mean train.global_batch_size?"),
        (["validate", "--set", "data.on_bad_rows=drop"], "data.on_bad_rows ('drop') must be one of error, skip"),
        (["validate", "--set", "nonsense"], "expected KEY=VALUE"),
        (["validate", "--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
        (["validate", "--data", "/no/such/dir"], "/no/such/dir: no such data set directory"),
        (["synth", "--products", "0", "--impressions", "5", "--out", "unused"], "products"),
    ],
)
def test_bad_config_and_arguments_exit_2_with_a_clear_line(capsys, argv, expected):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1


def test_bad_usage_exits_2(capsys):
    code, _, err = _run(capsys, "synth", "--products", "10")
    assert code == 2 and "--impressions" in err
    code, _, err = _run(capsys, "no-such-verb")
    assert code == 2


def test_synth_then_validate(capsys, tmp_path):
    out_dir = str(tmp_path / "synth")
    code, out, err = _run(capsys, "synth", "--products", "300", "--impressions", "2000", "--seed", "1", "--out", out_dir)
    assert code == 0, err
    assert "catalog 300 products" in out
    code, out, err = _run(capsys, "validate", "--data", out_dir)
    assert code == 0, err + out
    kept = sum(pq.ParquetFile(os.path.join(out_dir, f)).metadata.num_rows for f in ("train.parquet", "validation.parquet", "test.parquet"))
    assert kept == 2000


HOMEDEPOT_CSV = (
    b'"id","product_uid","product_title","search_term","relevance"\n'
    b'2,100001,"Simpson Strong-Tie 12-Gauge Angle","angle bracket",3\n'
    b'3,100001,"Simpson Strong-Tie 12-Gauge Angle","l bracket",2.5\n'
    b'9,100002,"BEHR Premium Textured Deck 30\xe5\xa1","deck over",1.67\n'
)


def test_prepare_homedepot_then_validate(capsys, tmp_path):
    source = tmp_path / "train.csv"
    source.write_bytes(HOMEDEPOT_CSV)
    out_dir = str(tmp_path / "hd")
    code, out, err = _run(capsys, "prepare", "--dataset", "homedepot", "--input", str(source), "--out", out_dir)
    assert code == 0, err
    assert "catalog 2 products" in out
    code, out, err = _run(capsys, "validate", "--data", out_dir)
    assert code == 0, err + out


def test_console_script_is_installed():
    exe = shutil.which("q2e", path=os.path.dirname(sys.executable))
    assert exe, "the q2e console script is not installed next to this Python"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("tf_q2e ")
