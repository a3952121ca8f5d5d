"""Keras callbacks for training a `Que2EngageModel` with `model.fit`.

`EarlyStopping` is Keras's, with one addition: a fallback monitor. The
engagement metrics (`val_engagement_auc`, `val_engagement_loss`) are NaN when
the data has no labelled rows (a click-only log: every `engaged` is -1), and a
NaN never improves, so Keras's early stopping would stop after `patience`
epochs and restore the first epoch's weights. This one switches to the
fallback (`val_recall_at_1` by default), says so in one line, and goes on.

Example:
    model.fit(train, validation_data=valid, epochs=20,
              callbacks=[tf_q2e.EarlyStopping("val_engagement_auc", patience=2, restore_best_weights=True)])
"""

from __future__ import annotations

import math
import sys

import numpy as np
import tensorflow as tf

FALLBACK_MONITOR = "val_recall_at_1"


def mode_of(monitor: str) -> str:
    """"min" for a loss, "max" for every other metric of the model (recall, AUC)."""
    return "min" if monitor.endswith("loss") else "max"


class EarlyStopping(tf.keras.callbacks.EarlyStopping):
    """`tf.keras.callbacks.EarlyStopping` that falls back to another monitor when its own is missing or NaN.

    Args:
      monitor: the metric to watch (`val_engagement_auc`, `val_recall_at_1`, `val_loss`, ...); its
        mode (min for losses, max otherwise) follows from the name unless `mode` is given.
      fallback: the monitor used from the first epoch whose `monitor` is absent or NaN (None: never).
      log: a function of one message line (default: stderr).
      **kwargs: as for Keras's `EarlyStopping` (patience, restore_best_weights, min_delta, ...).
    """

    def __init__(self, monitor: str = "val_engagement_auc", fallback: str | None = FALLBACK_MONITOR, mode: str | None = None,
                 log=None, **kwargs):
        super().__init__(monitor=monitor, mode=mode or mode_of(monitor), **kwargs)
        self.fallback = fallback
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        value = (logs or {}).get(self.monitor)
        missing = value is None or (isinstance(value, (float, np.floating, int)) and math.isnan(float(value)))
        if missing and self.fallback and self.fallback != self.monitor and (logs or {}).get(self.fallback) is not None:
            self._log(f"early stopping: {self.monitor} is {'NaN' if value is not None else 'not logged'} (no labelled "
                      f"rows?), so it watches {self.fallback} instead")
            self._switch(self.fallback)
        super().on_epoch_end(epoch, logs)

    def _switch(self, monitor: str) -> None:
        self.monitor = monitor
        self.monitor_op = np.less if mode_of(monitor) == "min" else np.greater
        self.min_delta = abs(self.min_delta) * (1 if self.monitor_op == np.greater else -1)
        self.best = np.inf if self.monitor_op == np.less else -np.inf
        self.wait = 0


class HardNegativeCurriculum(tf.keras.callbacks.Callback):
    """Switches on Que2Search's curriculum stage 2 (`model.hard_negative_weight`, the margin loss on each
    row's hardest negative) at the start of epoch `from_epoch` (0-based; None = the model's
    `model.hard_negative_from_epoch`), and off before it, so a resumed run gets the right stage.

    Example:
        model.fit(train, epochs=4, callbacks=[tf_q2e.HardNegativeCurriculum()])
    """

    def __init__(self, from_epoch: int | None = None):
        super().__init__()
        self.from_epoch = from_epoch

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        start = self.model.config.model.hard_negative_from_epoch if self.from_epoch is None else self.from_epoch
        self.model.hard_negative_switch.assign(float(epoch >= start))
