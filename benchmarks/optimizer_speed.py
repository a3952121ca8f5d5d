"""Training speed with dense Keras Adam, lazy `SparseAdam` and Adagrad on large hashed tables.

The model is the expensive part of the two towers, reduced to what the
optimizer sees: two embedding tables of 2^18 x 64 (query n-grams, product
n-grams), each row a bag of ~40 hashed ids (ragged, 20..60, uniform over the
table: the most rows a batch can touch, the worst case for sparse updates),
mean-pooled, a Dense(64) per side, and an in-batch softmax loss over the
batch's [B, B] dot products. Every optimizer trains a fresh model with the same
weights on the same batches in one process; the table prints steps/s and
examples/s, and the ratio SparseAdam / Adam.

Usage:
  .venv/bin/python benchmarks/optimizer_speed.py [--rows 262144] [--dim 64] [--batch 768]
      [--ids 40] [--steps 20] [--warmup 5] [--blocks 3] [--json]

Timing: after `--warmup` steps each, `--blocks` rounds in which every optimizer
runs a block of `--steps` steps (interleaved, so a load from other processes
hits all alike); the figure is the median block, with the min-max range.
Runs on CPU (CUDA devices are hidden).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_q2e  # noqa: E402,F401  (Keras 2 before TensorFlow)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_q2e.optimizers import SparseAdam  # noqa: E402

LEARNING_RATE = 7e-4  # Que2Search

OPTIMIZERS = {
    "none (forward+backward)": lambda: None,
    "Adam (tf.keras, dense)": lambda: tf.keras.optimizers.Adam(LEARNING_RATE),
    "SparseAdam (lazy)": lambda: SparseAdam(LEARNING_RATE),
    "Adagrad (tf.keras)": lambda: tf.keras.optimizers.Adagrad(LEARNING_RATE),
}


class TwoTableModel(tf.keras.Model):
    """Two embedding bags (mean-pooled) + Dense(dim) per side; in-batch softmax loss."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.query_table = tf.keras.layers.Embedding(rows, dim, name="query_ngrams")
        self.product_table = tf.keras.layers.Embedding(rows, dim, name="product_ngrams")
        self.query_dense = tf.keras.layers.Dense(dim, name="query_dense")
        self.product_dense = tf.keras.layers.Dense(dim, name="product_dense")

    def call(self, inputs):
        query_ids, product_ids = inputs  # ragged [B, None]
        query = tf.reduce_mean(self.query_table(query_ids), axis=1)  # [B, D]
        product = tf.reduce_mean(self.product_table(product_ids), axis=1)  # [B, D]
        return self.query_dense(query), self.product_dense(product)


def make_batches(n: int, batch: int, ids: int, rows: int, seed: int = 0) -> list:
    rng = np.random.RandomState(seed)

    def bag():
        lengths = rng.randint(ids // 2, ids * 3 // 2 + 1, size=batch)
        values = rng.randint(0, rows, size=int(lengths.sum())).astype(np.int64)
        return tf.RaggedTensor.from_row_lengths(values, lengths)

    return [(bag(), bag()) for _ in range(n)]


class Runner:
    """A fresh model (same initial weights) and optimizer, and a compiled train step."""

    def __init__(self, name: str, make, args, batches, init_weights):
        self.name, self.args, self.batches = name, args, batches
        self.model = TwoTableModel(args.rows, args.dim)
        self.model(batches[0])
        self.model.set_weights(init_weights)
        self.optimizer = optimizer = make()
        model = self.model
        labels = tf.range(args.batch)

        @tf.function
        def train_step(query_ids, product_ids):
            with tf.GradientTape() as tape:
                query, product = model((query_ids, product_ids))
                logits = tf.matmul(query, product, transpose_b=True)  # [B, B]
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
            variables = model.trainable_variables
            gradients = tape.gradient(loss, variables)
            if optimizer is None:  # the floor: gradients computed, nothing applied
                return loss + tf.add_n([tf.reduce_sum(getattr(g, "values", g)) for g in gradients]) * 0.0
            optimizer.apply_gradients(zip(gradients, variables))
            return loss

        self.train_step = train_step
        self.step = 0
        self.loss = float("nan")
        self.seconds_per_step: list[float] = []

    def run(self, steps: int) -> float:
        """Runs `steps` steps; returns seconds per step (waits for the last step)."""
        start = time.perf_counter()
        loss = None
        for _ in range(steps):
            loss = self.train_step(*self.batches[self.step % len(self.batches)])
            self.step += 1
        self.loss = float(loss)
        return (time.perf_counter() - start) / steps

    def result(self) -> dict:
        per_step = statistics.median(self.seconds_per_step)
        kinds = sorted({type(g).__name__ for g in table_gradients(self.model, self.batches[0])})
        return {
            "optimizer": self.name,
            "class": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "steps_per_s": 1.0 / per_step,
            "examples_per_s": self.args.batch / per_step,
            "ms_per_step": 1000.0 * per_step,
            "ms_per_step_min_max": [1000.0 * min(self.seconds_per_step), 1000.0 * max(self.seconds_per_step)],
            "final_loss": self.loss,
            "table_gradient_types": kinds,
        }


def table_gradients(model, batch):
    with tf.GradientTape() as tape:
        query, product = model(batch)
        loss = tf.reduce_sum(query) + tf.reduce_sum(product)
    return tape.gradient(loss, [model.query_table.embeddings, model.product_table.embeddings])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2**18)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--ids", type=int, default=40, help="mean ids per bag (lengths uniform in ids/2..3ids/2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print one JSON line with the results")
    args = parser.parse_args(argv)

    tf.keras.utils.set_random_seed(0)
    batches = make_batches(8, args.batch, args.ids, args.rows)
    unique = np.mean([len(np.unique(q.flat_values.numpy())) for q, _ in batches])
    reference = TwoTableModel(args.rows, args.dim)
    reference(batches[0])
    init_weights = reference.get_weights()
    del reference

    print(
        f"tables 2 x {args.rows} x {args.dim}, batch {args.batch}, ~{args.ids} ids/bag "
        f"(~{unique:.0f} unique rows per table per batch), CPU threads: {os.cpu_count()}, TF {tf.__version__}"
    )
    runners = [Runner(name, make, args, batches, init_weights) for name, make in OPTIMIZERS.items()]
    for runner in runners:
        runner.run(args.warmup)
    for _ in range(args.blocks):  # interleaved, so load from other processes hits every optimizer alike
        for runner in runners:
            runner.seconds_per_step.append(runner.run(args.steps))
    results = [runner.result() for runner in runners]

    print(f"\n{'optimizer':<28} {'steps/s':>8} {'examples/s':>11} {'ms/step':>8} {'(min-max)':>13}  {'loss':>8}")
    for r in results:
        low, high = r["ms_per_step_min_max"]
        print(
            f"{r['optimizer']:<28} {r['steps_per_s']:>8.2f} {r['examples_per_s']:>11.0f} "
            f"{r['ms_per_step']:>8.1f} {f'({low:.0f}-{high:.0f})':>13}  {r['final_loss']:>8.5f}"
        )
    by_name = {r["class"]: r for r in results}
    ratio = by_name["SparseAdam"]["examples_per_s"] / by_name["Adam"]["examples_per_s"]
    best_ratio = by_name["Adam"]["ms_per_step_min_max"][0] / by_name["SparseAdam"]["ms_per_step_min_max"][0]
    print(
        f"\nSparseAdam / Adam throughput: {ratio:.2f}x (median blocks), {best_ratio:.2f}x (fastest blocks)"
        f"   (table gradients: {', '.join(results[0]['table_gradient_types'])})"
    )
    if args.json:
        print(json.dumps({"args": vars(args), "results": results, "sparse_adam_over_adam": ratio,
                          "sparse_adam_over_adam_fastest_blocks": best_ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
