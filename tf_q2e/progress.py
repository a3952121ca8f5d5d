"""Progress of a long loop: a Keras progress bar on a terminal, a line per tenth otherwise.

    progress = Progress(total=54667, unit="products", log=print_to_stderr)
    for batch in batches:
        ...
        progress.update(done)     # bar: done/total, rate, ETA; or "embedded 5467/54667 products (10%, 3,210/s)"

The bar is `tf.keras.utils.Progbar` (what `model.fit` shows), drawn when
standard error is a terminal; logs and CI get at most 11 plain lines.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Reports `done` of `total` units of work (`update`); `verb` names the work in plain lines. With
    `total` None (unknown), the bar shows a count and plain lines come at every update."""

    def __init__(self, total: int | None, unit: str, log, verb: str = "done", interactive: bool | None = None):
        self.total = None if total is None else max(int(total), 1)
        self.unit, self.log, self.verb = unit, log, verb
        self.start = time.perf_counter()
        self.next_tenth = 1
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if interactive:
            import tensorflow as tf

            self.bar = tf.keras.utils.Progbar(self.total, unit_name=unit)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done if self.total is None else min(done, self.total))
            return
        seconds = max(time.perf_counter() - self.start, 1e-9)
        if self.total is None:
            self.log(f"{self.verb} {done:,} {self.unit} ({done / seconds:,.0f}/s)")
        elif done >= self.total or done * 10 >= self.next_tenth * self.total:
            self.log(f"{self.verb} {done:,}/{self.total:,} {self.unit} ({100 * done / self.total:.0f}%, "
                     f"{done / seconds:,.0f}/s)")
            self.next_tenth = done * 10 // self.total + 1
