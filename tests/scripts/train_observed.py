"""Run by tests/test_recovery.py: `q2e train ARGS...` with an observer on model.fit.

Runs `tf_q2e.cli.main(["train", ...])` — what the `q2e` console script runs —
after wrapping `Que2EngageModel.fit` so that one more callback goes last in its
callback list. The callback only reads: after `BackupAndRestore` (first in the
list) has restored the backup in `on_train_begin`, it records the optimizer's
`iterations`, then every epoch start, every finished training step and the
final `iterations`, as JSON lines in the file `$Q2E_OBSERVE` (one flushed line
per event, so a test can watch the run and SIGKILL it at a known step):

    {"event": "train_begin", "iterations": 30}
    {"event": "epoch_begin", "epoch": 1}
    {"event": "batch", "epoch": 1, "batch": 0, "iterations": 31}
    {"event": "train_end", "iterations": 90}

Epochs and batches are 0-based, as Keras passes them.
"""

import json
import os
import sys

from tf_q2e import cli  # first: importing tf_q2e makes TensorFlow use Keras 2
import tensorflow as tf
from tf_q2e.model import Que2EngageModel


class Observer(tf.keras.callbacks.Callback):
    def __init__(self, path: str):
        super().__init__()
        self.file = open(path, "a", encoding="utf-8")
        self.epoch = None

    def _write(self, **event) -> None:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def _iterations(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        self._write(event="train_begin", iterations=self._iterations())

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._write(event="epoch_begin", epoch=epoch)

    def on_train_batch_end(self, batch, logs=None):
        self._write(event="batch", epoch=self.epoch, batch=batch, iterations=self._iterations())

    def on_train_end(self, logs=None):
        self._write(event="train_end", iterations=self._iterations())
        self.file.close()


_fit = Que2EngageModel.fit


def _observed_fit(self, *args, **kwargs):
    kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [Observer(os.environ["Q2E_OBSERVE"])]
    return _fit(self, *args, **kwargs)


Que2EngageModel.fit = _observed_fit

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
