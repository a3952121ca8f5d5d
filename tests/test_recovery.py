"""Recovery from a killed process: `q2e train` resumes from its backup, `q2e export` never leaves half a version.

Both tests SIGKILL a real subprocess at a known point (no exception handler,
no `finally`, no atexit runs), then check what the next run makes of what was
left on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import SMALL
from tensorflow.core.util import event_pb2

from tf_q2e.config import load_config
from tf_q2e.savedmodels import MODELS_CONFIG, WARMUP_FILE, export_run, next_version
from tf_q2e.index import build_index
from tf_q2e.serving.registry import ModelRegistry, discover_models, list_versions
from tf_q2e.serving.signatures import Limits
from tf_q2e.train import train

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
TRAIN_OBSERVED = os.path.join(SCRIPTS, "train_observed.py")

EPOCHS, STEPS = 3, 30
KILL_AFTER_BATCH = 9  # 0-based: SIGKILL once 10 steps of epoch 2 are done (of 30)

pytestmark = pytest.mark.slow  # subprocess trainings and exports


@pytest.fixture(scope="module")
def data_dir(marketplace_train_only):
    """A tiny synthetic marketplace with catalogue and train split only (conftest)."""
    return marketplace_train_only


def _env(**extra: str) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _events(path: str) -> list[dict]:
    """The observer's complete JSON lines (a line still being written is left out)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _start(command: list[str], output: str, **env: str) -> subprocess.Popen:
    """Starts `command` with stdout and stderr going to the files `output`.out and `output`.err."""
    with open(f"{output}.out", "w") as out, open(f"{output}.err", "w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=_env(**env))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=60)


def _epoch_scalars(log_dir: str) -> dict[str, list[int]]:
    """TensorBoard event file name -> the steps (epochs, 0-based) of its `epoch_loss` scalars."""
    found = {}
    for name in sorted(n for n in os.listdir(log_dir) if n.startswith("events.out.tfevents")):
        steps = []
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            steps += [event.step for value in event.summary.value if value.tag == "epoch_loss"]
        found[name] = steps
    return found


def _variables(checkpoint: str) -> dict[str, np.ndarray]:
    """The model's variables in a checkpoint (not the object graph, not CheckpointManager's save_counter)."""
    reader = tf.train.load_checkpoint(checkpoint)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and not k.startswith("save_counter/")}


def test_sigkill_mid_epoch_then_resume_finishes_the_planned_steps(data_dir, tmp_path):
    """SIGKILL `q2e train` 10 steps into epoch 2 of 3 (30 steps each), rerun the same command.

    The run is `q2e train` itself (`tf_q2e.cli.main`) with one read-only
    callback added by tests/scripts/train_observed.py; it reports each finished
    step and the optimizer's `iterations` (after BackupAndRestore has restored
    them), so the kill lands at a known step and the resumed run's step count
    can be checked. BackupAndRestore saves at epoch ends, so the rerun must
    restore the state after epoch 1 (30 steps), drop the 10+ steps of the
    killed epoch, run epochs 2 and 3 only, and stop at exactly 3 x 30 steps.
    """
    run = str(tmp_path / "run")
    sets = [arg for s in SMALL + [f"train.epochs={EPOCHS}", f"train.steps_per_epoch={STEPS}"] for arg in ("--set", s)]
    command = [sys.executable, "-u", TRAIN_OBSERVED, "train", "--data", data_dir, "--out", run, *sets]
    observed = [str(tmp_path / "first.jsonl"), str(tmp_path / "second.jsonl")]
    outputs = [str(tmp_path / "first"), str(tmp_path / "second")]

    # 1. Train, and SIGKILL the process in the middle of epoch 2.
    first = _start(command, outputs[0], Q2E_OBSERVE=observed[0])
    try:
        deadline = time.monotonic() + 400
        while not any(e["event"] == "batch" and e["epoch"] == 1 and e["batch"] >= KILL_AFTER_BATCH
                      for e in _events(observed[0])):
            assert first.poll() is None, \
                f"q2e train ended (code {first.returncode}) before epoch 2:\n{_read(outputs[0] + '.err')[-3000:]}"
            assert time.monotonic() < deadline, "q2e train did not reach epoch 2 in 400 s"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        _kill(first)
    assert first.returncode == -signal.SIGKILL

    events = _events(observed[0])
    assert [e["epoch"] for e in events if e["event"] == "epoch_begin"] == [0, 1]
    last = [e for e in events if e["event"] == "batch"][-1]
    assert last["epoch"] == 1 and KILL_AFTER_BATCH <= last["batch"] < STEPS - 1  # killed inside epoch 2
    assert not any(e["event"] == "train_end" for e in events)
    # What the killed run left: the backup of the end of epoch 1, epoch 1's weights, no result.
    backup = tf.train.latest_checkpoint(os.path.join(run, "backup", "chief"))
    assert backup is not None
    state = tf.train.load_checkpoint(backup)
    assert state.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 0  # epoch 1 (0-based) completed
    assert state.get_tensor("model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == STEPS
    assert sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.endswith(".index")) == ["epoch-1.index"]
    # history.json is rewritten at each epoch end: it holds epoch 1.
    with open(os.path.join(run, "history.json"), encoding="utf-8") as f:
        killed_history = json.load(f)
    assert "loss" in killed_history and {len(values) for values in killed_history.values()} == {1}
    assert all(np.isfinite(values[0]) for values in killed_history.values())
    assert not [n for n in os.listdir(run) if n.startswith("history.json.tmp")]
    assert not os.path.exists(os.path.join(run, "model", "weights.index"))
    logs = os.path.join(run, "logs", "train")
    killed_run_logs = _epoch_scalars(logs)
    assert list(killed_run_logs.values()) == [[0]]  # epoch 1 logged, epoch 2 never finished

    # 2. The same command again: resumes from the backup and finishes.
    second = _start(command, outputs[1], Q2E_OBSERVE=observed[1])
    try:
        second.wait(timeout=400)
    finally:
        _kill(second)
    stdout = _read(outputs[1] + ".out")
    assert second.returncode == 0, _read(outputs[1] + ".err")[-3000:]

    events = _events(observed[1])
    assert events[0] == {"event": "train_begin", "iterations": STEPS}  # restored, not from scratch
    assert [e["epoch"] for e in events if e["event"] == "epoch_begin"] == [1, 2]  # began at epoch 2
    assert len([e for e in events if e["event"] == "batch"]) == (EPOCHS - 1) * STEPS
    assert events[-1] == {"event": "train_end", "iterations": EPOCHS * STEPS}  # the planned steps exactly
    # Keras's progress lines (verbose 2 without a terminal) agree.
    assert "Epoch 1/3" not in stdout and "Epoch 2/3" in stdout and "Epoch 3/3" in stdout
    assert f"trained {EPOCHS} epoch(s)" in stdout  # the run's epochs, the killed process's included

    # history.json holds every epoch of the run: epoch 1 as the killed process logged it, then epochs 2 and 3.
    with open(os.path.join(run, "history.json"), encoding="utf-8") as f:
        history = json.load(f)
    assert history.keys() == killed_history.keys()
    assert {len(values) for values in history.values()} == {EPOCHS}
    assert {name: values[:1] for name, values in history.items()} == killed_history
    assert all(np.isfinite(v) for values in history.values() for v in values)
    # TensorBoard keeps every epoch exactly once: epoch 1 from the killed run, epochs 2 and 3 from this one.
    resumed_logs = _epoch_scalars(logs)
    new = {name: steps for name, steps in resumed_logs.items() if name not in killed_run_logs}
    assert list(new.values()) == [[1, 2]]
    assert sorted(step for steps in resumed_logs.values() for step in steps) == [0, 1, 2]

    # The final weights are epoch 3's; the per-epoch checkpoints span both processes; the backup is gone.
    assert sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.endswith(".index")) == [
        "epoch-1.index", "epoch-2.index", "epoch-3.index"
    ]
    final, epoch_3 = _variables(os.path.join(run, "model", "weights")), _variables(os.path.join(run, "checkpoints", "epoch-3"))
    assert final.keys() == epoch_3.keys() and len(final) > 10
    for name, value in final.items():
        np.testing.assert_array_equal(value, epoch_3[name], err_msg=name)
    assert tf.train.latest_checkpoint(os.path.join(run, "backup", "chief")) is None  # a third run starts afresh


@pytest.fixture(scope="module")
def indexed_run(data_dir, tmp_path_factory):
    """A trained (2 steps) and indexed run: what `q2e export` needs."""
    run = str(tmp_path_factory.mktemp("run"))
    config = load_config(None, SMALL + ["train.epochs=1", "train.steps_per_epoch=2", "train.cache=none", "index.k=10"])
    train(config, data_dir, run, verbose=0)
    build_index(run, log=lambda _: None)
    return run


def test_killed_export_leaves_no_loadable_partial_version(indexed_run, tmp_path):
    """SIGKILL `q2e export` while it writes the SavedModel's temporary directory; then export again.

    The killed export must leave no integer version directory (what TF
    Serving and `tf_q2e.serving` load), only its `.tmp-*` directory, which the
    registry ignores; the next export must get version 1 and load.
    """
    base = str(tmp_path / "serving")
    command = [sys.executable, "-m", "tf_q2e.cli", "export", "--run", indexed_run, "--out", base]
    model_dir = os.path.join(base, "q2e")  # the stock model is written first, then q2e_scann

    export = _start(command, str(tmp_path / "export"))
    try:
        deadline = time.monotonic() + 300
        while True:
            names = os.listdir(model_dir) if os.path.isdir(model_dir) else []
            if any(n.startswith(".tmp-") for n in names):
                export.send_signal(signal.SIGKILL)  # mid-write: the directory has existed for < 1 ms of polling
                break
            assert "1" not in names, "the export wrote version 1 before its temporary directory was seen"
            assert export.poll() is None, \
                f"q2e export ended (code {export.returncode}): {_read(str(tmp_path / 'export.err'))[-3000:]}"
            assert time.monotonic() < deadline, "q2e export did not start writing in 300 s"
            time.sleep(0.001)
        export.wait(timeout=60)
    finally:
        _kill(export)
    assert export.returncode == -signal.SIGKILL

    # Left behind: a temporary directory, no version, no models.config.
    leftovers = os.listdir(model_dir)
    assert leftovers and all(n.startswith(".tmp-") for n in leftovers), leftovers
    assert [os.path.join(m, v) for m in os.listdir(base) for v in os.listdir(os.path.join(base, m)) if v.isdigit()] == []
    assert not os.path.exists(os.path.join(base, MODELS_CONFIG))
    assert list_versions(model_dir) == []
    assert discover_models(base) == {}
    messages = []
    registry = ModelRegistry(base, keep_versions=2, limits=Limits(max_batch=1024, max_request_bytes=4 << 20),
                             log=messages.append)
    registry.refresh()
    assert registry.model_names() == []
    assert next_version(base, ["q2e", "q2e_scann"]) == 1

    # The next export: version 1 of both models, complete, loadable and served; the leftover stays ignored.
    result = export_run(indexed_run, base, log=lambda _: None)
    assert result["version"] == 1
    for name in ("q2e", "q2e_scann"):
        version_dir = os.path.join(base, name, "1")
        assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
        assert os.path.isfile(os.path.join(version_dir, WARMUP_FILE))
        assert list_versions(os.path.join(base, name)) == [1]
    assert set(leftovers) < set(os.listdir(model_dir))
    stock = tf.saved_model.load(os.path.join(model_dir, "1"))
    embedding = stock.signatures["query_encoder"](query=tf.constant(["red sofa"]), query_country=tf.constant(["US"]))["embedding"]
    np.testing.assert_allclose(np.linalg.norm(embedding.numpy(), axis=1), 1.0, rtol=1e-5)
    registry.refresh()
    assert registry.model_names() == ["q2e", "q2e_scann"]
    for name in ("q2e", "q2e_scann"):
        assert [(s.version, s.state) for s in registry.statuses(name)] == [(1, "AVAILABLE")], messages
    registry.close()
