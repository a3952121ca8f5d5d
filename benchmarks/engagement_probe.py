"""Linear probe: how much engagement signal for new queries do a run's frozen tower vectors hold?

Que2Engage's BCE task asks the towers to score engaged pairs above
impressed-but-unengaged ones (hard negatives). On Home Depot it lifts the test
engagement AUC by far less than +0.02 over the contrastive-only model
(`benchmarks/RESULTS.md`). This script asks whether the vectors a trained run
already produces would allow more, with the score kept a dot product of the
two towers' outputs: it fits

    s(q, p) = a * q^T W p + b

on labelled pairs (BCE, engaged = 1, hard negative = 0), with W diagonal or a
full D x D matrix, started at the identity and pulled towards it by an L2
penalty `l2 * |W - I|^2`. W can be folded into the query tower (q -> W^T q),
so a gain here is one a two-tower model could have. It reports the pooled
engagement AUC of q^T W p (the cosine's AUC for W = I), as `q2e evaluate`
computes it (`tf_q2e.metrics.roc_auc`), in two settings:

* fit on the run's training pairs (which the towers were trained on), the
  penalty chosen on validation, reported on test;
* fit on the pairs of half the validation queries (never seen in training;
  even / odd positions in the split's list of distinct queries), the penalty
  chosen on the other half, reported on test.

If neither beats the cosine on test by much, what the vectors hold about
engagement beyond similarity does not carry over to new queries, whatever
linear head is put on them.

The run's query and product vectors come from `tf_q2e.retrievers.
dense_retriever_for_run` (the run's index when it covers the catalogue, else
the catalogue is embedded first, about a minute for Home Depot).

Usage:
  .venv/bin/python benchmarks/engagement_probe.py --run RUN [--data DIR] [--l2 0.1 0.01 0.001 0.0001] [--epochs 30]

Example (after `benchmarks/quality.py` trained the Home Depot runs):
  .venv/bin/python benchmarks/engagement_probe.py --run runs/quality_pq8/homedepot/l0-s0
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf_q2e  # noqa: E402,F401  (Keras 2 before TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_q2e.judged import load_judged, split_path  # noqa: E402
from tf_q2e.metrics import roc_auc  # noqa: E402
from tf_q2e.retrievers import dense_retriever_for_run  # noqa: E402

SPLITS = ("train", "validation", "test")


class Pairs:
    """The labelled pairs of one split: query vectors, product vectors, labels, and each row's query index."""

    def __init__(self, q: np.ndarray, p: np.ndarray, y: np.ndarray, query: np.ndarray):
        self.q, self.p, self.y, self.query = q, p, y, query

    def subset(self, keep: np.ndarray) -> "Pairs":
        return Pairs(self.q[keep], self.p[keep], self.y[keep], self.query[keep])


def labelled_pairs(retriever, data_dir: str, split: str, model) -> Pairs:
    judged = load_judged(split_path(data_dir, split), model.context_columns, model.image_dim or None)
    q, p = retriever.pair_vectors(judged)
    keep = judged.engaged >= 0
    return Pairs(q[keep], p[keep], judged.engaged[keep].astype(np.float32), judged.row_query[keep])


def fit_head(pairs: Pairs, kind: str, l2: float, epochs: int, seed: int = 0) -> np.ndarray:
    """W (diagonal [D] or full [D, D]) of the head a * q^T W p + b fitted by BCE on `pairs`."""
    tf.keras.utils.set_random_seed(seed)
    dim = pairs.q.shape[1]
    identity = tf.eye(dim) if kind == "full" else tf.ones([dim])
    w = tf.Variable(identity)
    a, b = tf.Variable(5.0), tf.Variable(0.0)  # 5: about the BCE scale the package's tasks use
    q, p, y = tf.constant(pairs.q), tf.constant(pairs.p), tf.constant(pairs.y)
    optimizer = tf.keras.optimizers.Adam(0.01)

    @tf.function
    def step(rows):
        with tf.GradientTape() as tape:
            qw = tf.gather(q, rows) @ w if kind == "full" else tf.gather(q, rows) * w
            logits = a * tf.reduce_sum(qw * tf.gather(p, rows), 1) + b
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.gather(y, rows), logits))
            loss += l2 * tf.reduce_sum(tf.square(w - identity))
        optimizer.apply_gradients(zip(tape.gradient(loss, [w, a, b]), [w, a, b]))

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(pairs.y))
        for start in range(0, len(order), 1024):
            step(tf.constant(order[start:start + 1024]))
    return w.numpy()


def head_auc(pairs: Pairs, w: np.ndarray | None) -> float:
    q = pairs.q if w is None else (pairs.q @ w if w.ndim == 2 else pairs.q * w)
    return float(roc_auc(np.einsum("rd,rd->r", q, pairs.p), pairs.y))


def probe(fit: Pairs, choose: Pairs, test: Pairs, l2s: list[float], epochs: int) -> list[dict]:
    rows = []
    for kind in ("diag", "full"):
        for l2 in l2s:
            w = fit_head(fit, kind, l2, epochs)
            rows.append({"kind": kind, "l2": l2, "fit": head_auc(fit, w), "choose": head_auc(choose, w),
                         "test": head_auc(test, w)})
    return rows


def print_table(title: str, rows: list[dict], cosine: dict[str, float], names: tuple[str, str]) -> None:
    print(f"\n{title}")
    print(f"  {'head':<6} {'l2':>8} {names[0]:>12} {names[1]:>12} {'test':>8}")
    print(f"  {'cosine':<6} {'-':>8} {cosine['fit']:>12.4f} {cosine['choose']:>12.4f} {cosine['test']:>8.4f}")
    for kind in ("diag", "full"):
        best = max((r for r in rows if r["kind"] == kind), key=lambda r: r["choose"])
        for r in rows:
            if r["kind"] == kind:
                mark = "   <- chosen on " + names[1] if r is best else ""
                print(f"  {kind:<6} {r['l2']:>8g} {r['fit']:>12.4f} {r['choose']:>12.4f} {r['test']:>8.4f}{mark}")
        print(f"  {kind}: test AUC {best['test']:.4f}, {best['test'] - cosine['test']:+.4f} over the cosine")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run directory")
    parser.add_argument("--data", help="the data set directory (default: the run's data.dir)")
    parser.add_argument("--l2", type=float, nargs="+", default=[0.1, 0.01, 0.001, 0.0001])
    parser.add_argument("--epochs", type=int, default=30, help="passes over the fitted pairs (x3 for the half split)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run):
        parser.error(f"--run {args.run} is not a directory")
    retriever, data_dir, model = dense_retriever_for_run(args.run, args.data, log=lambda m: print(m, file=sys.stderr))
    pairs = {split: labelled_pairs(retriever, data_dir, split, model) for split in SPLITS}
    print(f"run {args.run}, data {data_dir}; labelled pairs (engaged vs hard negative): "
          + ", ".join(f"{s} {len(p.y):,}" for s, p in pairs.items()))
    print("cosine AUC (pooled): " + ", ".join(f"{s} {head_auc(p, None):.4f}" for s, p in pairs.items()))

    train, validation, test = (pairs[s] for s in SPLITS)
    rows = probe(train, validation, test, args.l2, args.epochs)
    cosine = {"fit": head_auc(train, None), "choose": head_auc(validation, None), "test": head_auc(test, None)}
    print_table("head fitted on the training pairs, chosen on validation", rows, cosine, ("train", "validation"))

    even = validation.query % 2 == 0
    half_a, half_b = validation.subset(even), validation.subset(~even)
    rows = probe(half_a, half_b, test, args.l2, 3 * args.epochs)
    cosine = {"fit": head_auc(half_a, None), "choose": head_auc(half_b, None), "test": head_auc(test, None)}
    print_table("head fitted on half the validation queries, chosen on the other half", rows, cosine,
                ("val half A", "val half B"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
