"""Two `q2e train` workers on loopback (MultiWorkerMirroredStrategy from TF_CONFIG)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import SMALL

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "multi_worker_train.py")

WORKERS = 2

pytestmark = pytest.mark.slow  # subprocess workers


@pytest.fixture(scope="module")
def data_dir(marketplace_train_only):
    """A tiny synthetic marketplace, catalogue and train split only (no validation pass to trace)."""
    return marketplace_train_only


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago (all held open until each is picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _variables(checkpoint: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(checkpoint)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and not k.startswith("save_counter/")}


def _run_workers(data_dir: str, run: str, logs, timeout: float = 540) -> list[tuple[int, str, str]]:
    """Starts the workers, waits for all (or for the first failure), kills whatever is left."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(WORKERS)]}
    sets = [arg for s in SMALL + ["train.strategy=multi_worker", "train.epochs=2", "train.steps_per_epoch=5"]
            for arg in ("--set", s)]
    processes = []
    try:
        for index in range(WORKERS):
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                   "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
            with open(logs / f"worker{index}.out", "w") as out, open(logs / f"worker{index}.err", "w") as err:
                processes.append(subprocess.Popen(
                    [sys.executable, "-u", SCRIPT, "train", "--data", data_dir, "--out", run, *sets],
                    stdout=out, stderr=err, env=env))
        deadline = time.monotonic() + timeout
        # A worker that fails leaves the other waiting in a collective: stop at the first failure.
        while any(p.poll() is None for p in processes) and not any(p.poll() for p in processes):
            assert time.monotonic() < deadline, f"the workers did not finish in {timeout} s"
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
    results = []
    for index, p in enumerate(processes):
        with open(logs / f"worker{index}.out") as out, open(logs / f"worker{index}.err") as err:
            results.append((p.returncode, out.read(), err.read()))
    return results


def test_two_workers_on_loopback_end_with_identical_weights_and_cross_worker_negatives(data_dir, tmp_path):
    """Two `q2e train --set train.strategy=multi_worker` processes, TF_CONFIG on loopback ports.

    Identical weights: the workers read different shards of the data (rows
    dealt out by `tf.distribute.InputContext`), so they end bit-identical only
    if every step all-reduced the gradients; the weights also moved between
    epoch 1 and epoch 2, so "identical" is not the identical initialisation.

    Cross-worker negatives, the most direct evidence available without
    changing the package: each worker runs `q2e train` (tf_q2e.cli.main) in
    tests/scripts/multi_worker_train.py, which afterwards probes the trained
    model's own `ScaledSoftmaxRetrieval` layer — the one `compute_loss` called
    in every training step — under the same strategy with 4 rows per worker:
    with all-zero vectors and distinct ids every logit is 0, so exp(row loss)
    is the number of candidates a query was scored against: 8 = both workers'
    rows (4 for a `cross_replica=False` copy). And with random vectors, the
    row losses split over the two workers equal the losses one process
    computes over all 8 rows (accidental-hit masking across workers included),
    while without the gather they differ. Both workers also log
    "training on 2 replica(s)".
    """
    run = str(tmp_path / "run")
    logs = tmp_path / "logs"
    logs.mkdir()
    results = _run_workers(data_dir, run, logs)
    for index, (code, _, stderr) in enumerate(results):
        assert code == 0, f"worker {index} exited with {code}:\n{stderr[-4000:]}"
        assert "training on 2 replica(s), global batch 128, 2 epoch(s) of 5 steps" in stderr

    # Worker 0 writes RUN/, worker 1 RUN/workers/1/.
    chief, other = run, os.path.join(run, "workers", "1")
    assert os.listdir(os.path.join(run, "workers")) == ["1"]
    for out in (chief, other):
        assert os.path.isfile(os.path.join(out, "model", "weights.index"))
        assert os.path.isfile(os.path.join(out, "history.json"))

    # Identical weights at the end (every variable, bit for bit), and after epoch 1.
    weights = [_variables(os.path.join(out, "model", "weights")) for out in (chief, other)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 10
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    epoch_1 = [_variables(os.path.join(out, "checkpoints", "epoch-1")) for out in (chief, other)]
    for name in epoch_1[0]:
        np.testing.assert_array_equal(epoch_1[0][name], epoch_1[1][name], err_msg=name)
    moved = [name for name in weights[0] if not np.array_equal(weights[0][name], epoch_1[0][name])]
    assert len(moved) > len(weights[0]) // 2, "epoch 2 left the weights unchanged"
    histories = []
    for out in (chief, other):
        with open(os.path.join(out, "history.json"), encoding="utf-8") as f:
            histories.append(json.load(f))
    assert histories[0] == histories[1] and len(histories[0]["loss"]) == 2  # global metrics, logged alike

    # Cross-worker negatives.
    probes = []
    for index, (_, stdout, _) in enumerate(results):
        lines = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
        assert len(lines) == 1, f"worker {index} printed no probe:\n{stdout[-2000:]}"
        probes.append(json.loads(lines[0][len("PROBE "):]))
    assert probes[0] == probes[1]
    probe = probes[0]
    assert probe["replicas"] == 2 and probe["cross_replica"] is True
    np.testing.assert_allclose(probe["candidates"], [8.0] * 8, rtol=1e-5)
    np.testing.assert_allclose(probe["candidates_without_gather"], [4.0] * 8, rtol=1e-5)
    np.testing.assert_allclose(probe["row_losses_across_workers"], probe["row_losses_one_process"], rtol=1e-5, atol=1e-5)
    assert np.abs(np.subtract(probe["row_losses_without_gather"], probe["row_losses_one_process"])).max() > 0.1


def test_every_worker_backs_up_and_restores_through_the_shared_run_directory(data_dir, tmp_path, monkeypatch):
    """Worker 1 of a multi-worker run must use the chief's backup directory, RUN/backup.

    tf-keras's BackupAndRestore under MultiWorkerMirroredStrategy: the chief
    writes `<backup_dir>/chief/`, the other workers write a temporary
    `<backup_dir>/workertemp_<i>/` (deleted after each save), and on restart
    *every* worker reads `<backup_dir>/chief/` — so all workers must be given
    the same directory. Checked by hand with two loopback workers (3 epochs
    of 5 steps, both SIGKILLed in epoch 2, same commands rerun): worker 0
    restored the epoch-1 backup, worker 1 found none in
    RUN/workers/1/backup/chief and started at step 0, and both exited 1
    ("Collective instance ... expected type 1 and data_type 9 but got type 0
    and data_type 1"). This test runs `train` as worker 1 would (`_is_chief`
    answers "worker 1", `fit` only records its callbacks) and checks the
    directory it hands BackupAndRestore.
    """
    import tf_q2e.train as train_module
    from tf_q2e.config import load_config
    from tf_q2e.model import Que2EngageModel

    recorded = {}

    def record_fit(self, *args, callbacks=(), **kwargs):
        recorded["callbacks"] = list(callbacks)
        history = tf.keras.callbacks.History()
        history.history = {"loss": [1.0]}
        return history

    monkeypatch.setattr(train_module, "_is_chief", lambda strategy: (False, 1))
    monkeypatch.setattr(Que2EngageModel, "fit", record_fit)
    run = str(tmp_path / "run")
    train_module.train(load_config(None, SMALL + ["train.epochs=1", "train.steps_per_epoch=1"]), data_dir, run, verbose=0)
    assert os.path.isfile(os.path.join(run, "workers", "1", "model", "weights.index"))  # ran as worker 1
    backups = [c for c in recorded["callbacks"] if isinstance(c, tf.keras.callbacks.BackupAndRestore)]
    assert len(backups) == 1
    assert os.path.abspath(backups[0].backup_dir) == os.path.abspath(os.path.join(run, "backup"))
