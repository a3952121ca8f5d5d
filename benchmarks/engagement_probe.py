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

A third head ("offset") keeps the cosine and adds a linear *query offset*,
a * (q^T p + w^T q) + b (w started at 0, penalty `l2 * |w|^2`). The pooled
AUC ranks pairs across queries, and a query's own share of engaged pairs
predicts much of it (the script prints that oracle's AUC), while the
in-batch softmax is blind to an offset of its row's query (every logit of
the row moves alike): an offset is the one part of the score that only the
engagement task could learn. A two-tower model can hold it as one more
coordinate (w^T q for the query, 1 for the product); it changes no query's
ranking, so each head's per-query AUC is printed beside it. A fourth head
("p-offset") adds a product offset w^T p instead: a prior of the product,
which the softmax does see (it moves one product against the others).

It then asks what signal the vectors miss, with one lexical feature that is
not a two-tower score: a pair's *query-term coverage*, the share of the
query's distinct BM25 terms (`tf_q2e.bm25`: lower-cased, stop words out,
Snowball-stemmed) found in the product's BM25 text. It prints the pooled AUC
of the coverage alone and of `cos + alpha * coverage`, alpha chosen on
validation (0 to 1 in steps of 0.025), reported on test. A gain there is
engagement signal that the towers could learn from the text but do not
(hard negatives often miss one of the query's words, a colour or a size,
which moves a pooled n-gram vector little).

Last, it asks which weight the *contrastive* task alone would give that
feature, were it a channel of both towers' vectors (q' = [q, sqrt(alpha) *
terms(q) / |terms(q)|], p' = [p, sqrt(alpha) * terms(p)] give q'.p' = cos +
alpha * coverage): the in-batch softmax loss of s * (cos + alpha * coverage)
over the training and validation splits' impressed rows in random batches of
512, accidental hits masked, for each alpha, and the alpha with the lowest
loss. If that alpha already gives most of the AUC gain, a contrastive-only
model with such a channel would take most of it too, and the engagement task
would be left little to add.

Then it weights the coverage's terms: cos + alpha * Σ u_t [t in p] / Σ u_t
over the query's terms t, u_t = softplus(v_t), alpha the one chosen above,
with v fitted (towers frozen) once by the engagement BCE on the labelled
training pairs and once by the in-batch softmax over the training split's
impressed rows, and prints the pooled AUC of each. Weights that the BCE
finds and the softmax does not are engagement signal that only the
engagement task could bring into a model (`model.term_weights: engagement`).

Last, a learned bias of each query (`model.query_bias`): score + b_q,
b_q = mean of the query's terms' offsets r + a * log(1 + terms), fitted by the
BCE with the towers frozen as training would fit it (the package's lazy Adam
at the run's learning rate, small batches, a few epochs), with r at the
towers' rate and at 10x, and with the length weight a alone; it prints the
pooled AUC (train, validation, test) after each epoch. It changes no query's
ranking; a gain is calibration across queries, which the pooled AUC
measures and the softmax cannot learn.

For a run with a term channel (`model.term_dim`), "cosine" below is the
run's whole dot product, the channel's share of coverage included (so run
the coverage sections on a run without one).

The run's query and product vectors come from `tf_q2e.retrievers.
dense_retriever_for_run` (the run's index when it covers the catalogue, else
the catalogue is embedded first, about a minute for Home Depot).

About 4 minutes a Home Depot run on 2 quiet cores (9 with a training beside it).

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
import pyarrow as pa  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_q2e.bm25 import BM25Index, product_texts, read_catalog  # noqa: E402
from tf_q2e.data import schema as S  # noqa: E402
from tf_q2e.judged import load_judged, split_path  # noqa: E402
from tf_q2e.metrics import mean_defined, per_query_auc, roc_auc  # noqa: E402
from tf_q2e.optimizers import SparseAdam  # noqa: E402
from tf_q2e.retrievers import dense_retriever_for_run  # noqa: E402

SPLITS = ("train", "validation", "test")


class Pairs:
    """The labelled pairs of one split: query vectors, product vectors, labels, and each row's query index."""

    def __init__(self, q: np.ndarray, p: np.ndarray, y: np.ndarray, query: np.ndarray, texts: np.ndarray,
                 products: np.ndarray):
        self.q, self.p, self.y, self.query = q, p, y, query
        self.texts, self.products = texts, products  # each row's query text and product id

    def subset(self, keep: np.ndarray) -> "Pairs":
        return Pairs(self.q[keep], self.p[keep], self.y[keep], self.query[keep], self.texts[keep], self.products[keep])


def labelled_pairs(retriever, data_dir: str, split: str, model) -> Pairs:
    judged = load_judged(split_path(data_dir, split), model.context_columns, model.image_dim or None)
    q, p = retriever.pair_vectors(judged)
    keep = judged.engaged >= 0
    texts = np.asarray(judged.queries, dtype=object)[judged.row_query]
    return Pairs(q[keep], p[keep], judged.engaged[keep].astype(np.float32), judged.row_query[keep], texts[keep],
                 judged.row_product[keep])


class Terms:
    """BM25 terms (`tf_q2e.bm25`'s analyser) of a catalogue's products and of queries, as id arrays."""

    def __init__(self, data_dir: str):
        catalog = read_catalog(data_dir)
        texts = dict(zip(catalog.column(S.PRODUCT_ID).cast(pa.string()).to_pylist(), product_texts(catalog)))
        self._bm25 = BM25Index(list(texts), list(texts.values()))
        self._ids: dict[str, int] = {}
        self.products = dict(zip(texts, self.of(list(texts.values()))))

    def of(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's distinct term ids."""
        return [np.array(sorted({self._ids.setdefault(t, len(self._ids)) for t in terms}), np.int64)
                for terms in self._bm25.analyze(texts)]

    def coverage(self, queries: list[np.ndarray], products: list) -> np.ndarray:
        """[len(queries), len(products)]: the share of each query's terms in each product's text (0: no terms)."""
        local = {t: i for i, t in enumerate(np.unique(np.concatenate([*queries, np.zeros(0, np.int64)])))}
        q = np.zeros((len(queries), len(local)), np.float32)
        for i, terms in enumerate(queries):
            q[i, [local[t] for t in terms]] = 1.0 / max(1, len(terms))
        p = np.zeros((len(products), len(local)), np.float32)
        for j, pid in enumerate(products):
            p[j, [local[t] for t in self.products[pid] if t in local]] = 1.0
        return q @ p.T

    def pair_coverage(self, pairs: Pairs) -> np.ndarray:
        """Each labelled pair's query-term coverage."""
        queries = self.of(list(pairs.texts))
        return np.concatenate([np.diag(self.coverage(queries[i:i + 512], pairs.products[i:i + 512]))
                               for i in range(0, len(queries), 512)])


def pair_cosines(pairs: Pairs) -> np.ndarray:
    return np.einsum("rd,rd->r", pairs.q, pairs.p)


def per_query(pairs: Pairs, scores: np.ndarray) -> float:
    """Engagement AUC averaged over the queries with both classes."""
    return mean_defined(per_query_auc(scores, pairs.y, pairs.query))


def engaged_share(pairs: Pairs) -> np.ndarray:
    """Each pair's query's share of engaged pairs: an oracle score, constant within a query."""
    counts = np.bincount(pairs.query)
    return (np.bincount(pairs.query, weights=pairs.y) / np.maximum(counts, 1))[pairs.query]


COVERAGE_WEIGHTS = np.round(np.arange(0.0, 1.0001, 0.025), 3)


def print_coverage(terms: Terms, validation: Pairs, test: Pairs) -> float:
    """Pooled AUC of the coverage, alone and added to the cosine (the module docstring); returns the
    coverage's weight alpha chosen on validation."""
    cov = {"validation": terms.pair_coverage(validation), "test": terms.pair_coverage(test)}
    cos = {"validation": pair_cosines(validation), "test": pair_cosines(test)}
    y = {"validation": validation.y, "test": test.y}
    chosen = max(COVERAGE_WEIGHTS, key=lambda a: roc_auc(cos["validation"] + a * cov["validation"], y["validation"]))
    print("\nquery-term coverage (not a two-tower score): pooled AUC")
    print(f"  {'score':<28} {'validation':>12} {'test':>8}")
    scores = {"cosine": cos, "coverage alone": cov,
              f"cosine + {chosen:g} * coverage": {s: cos[s] + chosen * cov[s] for s in cos}}
    for name, by_split in scores.items():
        print(f"  {name:<28} {roc_auc(by_split['validation'], y['validation']):>12.4f} "
              f"{roc_auc(by_split['test'], y['test']):>8.4f}")
    gain = roc_auc(cos["test"] + chosen * cov["test"], y["test"]) - roc_auc(cos["test"], y["test"])
    print(f"  cosine + coverage: {gain:+.4f} test AUC over the cosine (alpha {chosen:g}, chosen on validation)")
    for a in (0.1, 0.2):
        print(f"  cosine + {a:g} * coverage: test AUC {roc_auc(cos['test'] + a * cov['test'], y['test']):.4f}")
    return float(chosen)


def impressed_batches(judged, order: np.ndarray, batch_size: int):
    """The full batches of `order`'s impressed rows, as the contrastive task sees them: (rows, their
    product ids, the accidental-hit mask [b, b]: another row of the same product)."""
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start:start + batch_size]
        products = judged.row_product[rows]
        yield rows, products, (products[:, None] == products[None, :]) & ~np.eye(len(rows), dtype=bool)


def contrastive_weight(terms: Terms, retriever, data_dir: str, split: str, model, scale: float,
                       batch_size: int = 512) -> None:
    """The coverage weight alpha that the contrastive task would choose: the in-batch softmax loss of
    scale * (cos + alpha * coverage) over `split`'s impressed rows (all of them, labelled or not) in
    random batches, accidental hits masked as in training, for each alpha of COVERAGE_WEIGHTS."""
    judged = load_judged(split_path(data_dir, split), model.context_columns, model.image_dim or None)
    q, p = retriever.pair_vectors(judged)
    query_terms = terms.of(list(judged.queries))
    order = np.random.default_rng(0).permutation(len(judged.row_query))
    losses = np.zeros(len(COVERAGE_WEIGHTS))
    batches = 0
    for rows, products, hit in impressed_batches(judged, order, batch_size):
        batches += 1
        cos = q[rows] @ p[rows].T
        cov = terms.coverage([query_terms[i] for i in judged.row_query[rows]], products)
        for k, a in enumerate(COVERAGE_WEIGHTS):
            z = np.where(hit, -1e9, scale * (cos + a * cov))
            top = z.max(axis=1)
            losses[k] += np.mean(np.log(np.exp(z - top[:, None]).sum(axis=1)) + top - np.diag(z))
    losses /= max(1, batches)
    best = int(np.argmin(losses))
    print(f"  contrastive loss of {scale:g} * (cos + alpha * coverage), {split} split, {batches} batches of "
          f"{batch_size}: {losses[0]:.4f} at alpha 0, lowest {losses[best]:.4f} at alpha {COVERAGE_WEIGHTS[best]:g}")


WORD_WEIGHT_INIT = float(np.log(np.expm1(1.0)))  # softplus(v) = 1: every word counts alike


def query_term_ids(terms: Terms, queries: list[str]) -> np.ndarray:
    """`[n, L]` each query's term ids, padded with -1."""
    query_terms = terms.of(list(queries))
    ids = np.full((len(query_terms), max(1, max(map(len, query_terms), default=1))), -1, np.int64)
    for i, t in enumerate(query_terms):
        ids[i, :len(t)] = t
    return ids


def query_term_matches(terms: Terms, queries: list[str], products) -> tuple[np.ndarray, np.ndarray]:
    """`[n, L]` each query's term ids (-1: none) and, for each pair (queries[i], products[i]), whether
    the product's text holds each term."""
    ids = query_term_ids(terms, queries)
    match = np.stack([np.isin(row, terms.products[pid]) & (row >= 0) for row, pid in zip(ids, products)])
    return ids, match.astype(np.float32).reshape(ids.shape)


def weighted_coverage(ids, match, v):
    """Σ u_t [t in p] / Σ u_t over the query's terms, u_t = softplus(v_t) (the package's
    `model.term_weights: engagement`); works on NumPy arrays and, for fitting, on tensors."""
    u = tf.nn.softplus(tf.gather(v, tf.maximum(ids, 0))) * tf.cast(ids >= 0, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(u * match, -1), tf.reduce_sum(u, -1))


def fit_word_weights(terms: Terms, train: Pairs, alpha: float, task: str, retriever=None, data_dir=None, model=None,
                     epochs: int = 20, l2: float = 1e-5, batch_size: int = 512) -> np.ndarray:
    """Per-term weights v of the coverage in cos + alpha * weighted coverage (alpha fixed), fitted with
    the towers frozen by one task: "engagement" (BCE a * score + b on the labelled training pairs) or
    "contrastive" (in-batch softmax of scale * score over the training split's impressed rows in
    random batches, accidental hits masked)."""
    rng = np.random.default_rng(0)
    if task == "engagement":
        ids, match = query_term_matches(terms, list(train.texts), train.products)
        cos, y = pair_cosines(train), train.y
    else:
        judged = load_judged(split_path(data_dir, "train"), model.context_columns, model.image_dim or None)
        q, p = retriever.pair_vectors(judged)
        query_ids = query_term_ids(terms, list(judged.queries))
    tf.keras.utils.set_random_seed(0)
    v = tf.Variable(tf.fill([len(terms._ids) + 1], WORD_WEIGHT_INIT))  # every term id seen so far
    a, b = tf.Variable(5.0), tf.Variable(0.0)
    optimizer = tf.keras.optimizers.Adam(0.01)

    @tf.function
    def bce_step(ids, match, cos, y):
        with tf.GradientTape() as tape:
            logits = a * (cos + alpha * weighted_coverage(ids, match, v)) + b
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, logits))
            loss += l2 * tf.reduce_sum(tf.square(v - WORD_WEIGHT_INIT))
        optimizer.apply_gradients(zip(tape.gradient(loss, [v, a, b]), [v, a, b]))

    @tf.function
    def softmax_step(ids, match, cos, hit):
        with tf.GradientTape() as tape:
            scale = model.config.model.scale
            z = tf.where(hit, -1e9, scale * (cos + alpha * weighted_coverage(ids[:, None, :], match, v)))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.range(tf.shape(z)[0]), z))
            loss += l2 * tf.reduce_sum(tf.square(v - WORD_WEIGHT_INIT))
        optimizer.apply_gradients(zip(tape.gradient(loss, [v]), [v]))

    for _ in range(epochs):
        if task == "engagement":
            order = rng.permutation(len(y))
            for start in range(0, len(order), 1024):
                r = order[start:start + 1024]
                bce_step(ids[r], match[r], cos[r], y[r])
            continue
        for rows, products, hit in impressed_batches(judged, rng.permutation(len(judged.row_query)), batch_size):
            ids = query_ids[judged.row_query[rows]]
            # match[i, j, l]: does product j hold query i's term l (through the batch's own term list)
            local, position = np.unique(np.maximum(ids, 0), return_inverse=True)
            holds = np.zeros((len(rows), len(local)), np.float32)
            for j, pid in enumerate(products):
                holds[j, np.searchsorted(local, np.intersect1d(terms.products[pid], local))] = 1.0
            match = holds[:, position.reshape(ids.shape)].transpose(1, 0, 2)
            softmax_step(ids, match, (q[rows] @ p[rows].T).astype(np.float32), hit)
    return v.numpy()


def print_word_weights(terms: Terms, retriever, data_dir: str, model, alpha: float, train: Pairs,
                       validation: Pairs, test: Pairs) -> None:
    """Pooled AUC of cos + alpha * coverage with every term alike, and with per-term weights fitted by
    the engagement task or by the contrastive task (alpha: `print_coverage`'s, chosen on validation)."""
    split = {"validation": validation, "test": test}
    matches = {s: query_term_matches(terms, list(p.texts), p.products) for s, p in split.items()}
    cos = {s: pair_cosines(p) for s, p in split.items()}
    plain = np.full(len(terms._ids) + 1, WORD_WEIGHT_INIT, np.float32)
    print(f"\nper-term weights of the coverage, cos + {alpha:g} * weighted coverage (towers frozen): pooled AUC")
    print(f"  {'weights':<30} {'validation':>10} {'test':>8}")
    for name, v in (("every term alike", plain),
                    ("fitted by the engagement BCE", fit_word_weights(terms, train, alpha, "engagement")),
                    ("fitted by the in-batch softmax", fit_word_weights(terms, train, alpha, "contrastive", retriever,
                                                                        data_dir, model, epochs=10))):
        auc = {s: roc_auc(cos[s] + alpha * weighted_coverage(*matches[s], v).numpy(), p.y) for s, p in split.items()}
        print(f"  {name:<30} {auc['validation']:>10.4f} {auc['test']:>8.4f}")


def query_bias(ids, r, a, rate: float):
    """b_q = rate * (mean of the query's terms' r + a * log(1 + terms)) for `[n, L]` term ids padded
    with -1 (`model.query_bias` at rate 1); works on NumPy arrays and, for fitting, on tensors."""
    known = tf.cast(ids >= 0, tf.float32)
    n = tf.reduce_sum(known, -1)
    mean_r = tf.math.divide_no_nan(tf.reduce_sum(tf.gather(r, tf.maximum(ids, 0)) * known, -1), n)
    return rate * (mean_r + a * tf.math.log1p(n))


def print_query_bias(terms: Terms, model, train: Pairs, validation: Pairs, test: Pairs, epochs: int = 4,
                     batch_size: int = 48) -> None:
    """Pooled AUC of score + b_q, a learned bias of each query (`model.query_bias`), fitted by the BCE
    on the labelled training pairs with the towers frozen, as training would: the package's lazy Adam
    at the run's learning rate, batches of `batch_size` pairs (about the labelled rows of a Home Depot
    training batch), the BCE's scale and a learned bias b at `model.engagement_bias_lr_multiplier`; for the term table r
    at the towers' rate and at 10x (the word weights' rate), and for the length weight a alone."""
    ids = {s: query_term_ids(terms, list(p.texts)) for s, p in (("train", train), ("validation", validation),
                                                                ("test", test))}
    score = {"train": pair_cosines(train), "validation": pair_cosines(validation), "test": pair_cosines(test)}
    y = {"train": train.y, "validation": validation.y, "test": test.y}
    m = model.config.model
    scale = m.scale if m.engagement_scale is None else m.engagement_scale
    print(f"\nquery bias b_q = rate * (mean of the query's terms' r + a * log(1 + terms)), fitted by the BCE "
          f"(towers frozen, lazy Adam {model.config.train.learning_rate:g}, batches of {batch_size} pairs): "
          "pooled AUC (train, validation, test) after each epoch")
    print(f"  score alone: {roc_auc(score['train'], y['train']):.4f} {roc_auc(score['validation'], y['validation']):.4f} "
          f"{roc_auc(score['test'], y['test']):.4f}")
    for name, rate, words in (("terms + length, rate 1", 1.0, True), ("terms + length, rate 10", 10.0, True),
                              ("length alone, rate 1", 1.0, False)):
        tf.keras.utils.set_random_seed(0)
        r = tf.Variable(tf.zeros([len(terms._ids) + 1]))
        a, b = tf.Variable(0.0), tf.Variable(0.0)
        variables = [r, a, b] if words else [a, b]
        optimizer = SparseAdam(model.config.train.learning_rate)

        @tf.function
        def step(ids, score, y):
            with tf.GradientTape() as tape:
                logits = scale * (score + query_bias(ids, r, a, rate)) + model.engagement.bias_lr_multiplier * b
                loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, logits))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

        rng = np.random.default_rng(0)
        aucs = []
        for _ in range(epochs):
            order = rng.permutation(len(y["train"]))
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                step(ids["train"][rows], score["train"][rows], y["train"][rows])
            aucs.append(" ".join(f"{roc_auc(score[s] + query_bias(ids[s], r, a, rate).numpy(), y[s]):.4f}" for s in y))
        print(f"  {name:<24} " + " | ".join(aucs))


HEADS = ("diag", "full", "offset", "p-offset")


def fit_head(pairs: Pairs, kind: str, l2: float, epochs: int, seed: int = 0) -> np.ndarray:
    """The head fitted by BCE on `pairs`: W (diagonal [D] or full [D, D]) of a * q^T W p + b, or
    (kind "offset") w [D] of a * (q^T p + w^T q) + b, or (kind "p-offset") of a * (q^T p + w^T p) + b."""
    tf.keras.utils.set_random_seed(seed)
    dim = pairs.q.shape[1]
    identity = {"full": tf.eye(dim), "diag": tf.ones([dim]), "offset": tf.zeros([dim]), "p-offset": tf.zeros([dim])}[kind]
    w = tf.Variable(identity)
    a, b = tf.Variable(5.0), tf.Variable(0.0)  # 5: about the BCE scale the package's tasks use
    q, p, y = tf.constant(pairs.q), tf.constant(pairs.p), tf.constant(pairs.y)
    optimizer = tf.keras.optimizers.Adam(0.01)

    @tf.function
    def step(rows):
        with tf.GradientTape() as tape:
            qr, pr = tf.gather(q, rows), tf.gather(p, rows)
            if kind.endswith("offset"):
                logits = a * (tf.reduce_sum(qr * pr, 1) + tf.linalg.matvec(qr if kind == "offset" else pr, w)) + b
            else:
                logits = a * tf.reduce_sum((qr @ w if kind == "full" else qr * w) * pr, 1) + b
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.gather(y, rows), logits))
            loss += l2 * tf.reduce_sum(tf.square(w - identity))
        optimizer.apply_gradients(zip(tape.gradient(loss, [w, a, b]), [w, a, b]))

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(pairs.y))
        for start in range(0, len(order), 1024):
            step(tf.constant(order[start:start + 1024]))
    return w.numpy()


def head_scores(pairs: Pairs, w: np.ndarray | None, kind: str = "diag") -> np.ndarray:
    if kind.endswith("offset"):
        return pair_cosines(pairs) + (pairs.q if kind == "offset" else pairs.p) @ w
    q = pairs.q if w is None else (pairs.q @ w if w.ndim == 2 else pairs.q * w)
    return np.einsum("rd,rd->r", q, pairs.p)


def head_auc(pairs: Pairs, w: np.ndarray | None, kind: str = "diag") -> float:
    return float(roc_auc(head_scores(pairs, w, kind), pairs.y))


def probe(fit: Pairs, choose: Pairs, test: Pairs, l2s: list[float], epochs: int) -> list[dict]:
    rows = []
    for kind in HEADS:
        for l2 in l2s:
            w = fit_head(fit, kind, l2, epochs)
            rows.append({"kind": kind, "l2": l2, "fit": head_auc(fit, w, kind), "choose": head_auc(choose, w, kind),
                         "test": head_auc(test, w, kind), "per_query": per_query(test, head_scores(test, w, kind))})
    return rows


def print_table(title: str, rows: list[dict], cosine: dict[str, float], names: tuple[str, str]) -> None:
    print(f"\n{title}")
    print(f"  {'head':<8} {'l2':>8} {names[0]:>12} {names[1]:>12} {'test':>8}")
    print(f"  {'cosine':<8} {'-':>8} {cosine['fit']:>12.4f} {cosine['choose']:>12.4f} {cosine['test']:>8.4f}")
    for kind in HEADS:
        best = max((r for r in rows if r["kind"] == kind), key=lambda r: r["choose"])
        for r in rows:
            if r["kind"] == kind:
                mark = "   <- chosen on " + names[1] if r is best else ""
                print(f"  {kind:<8} {r['l2']:>8g} {r['fit']:>12.4f} {r['choose']:>12.4f} {r['test']:>8.4f}{mark}")
        print(f"  {kind}: test AUC {best['test']:.4f}, {best['test'] - cosine['test']:+.4f} over the cosine "
              f"(per query {best['per_query']:.4f})")


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
    print("cosine AUC (per query): " + ", ".join(f"{s} {per_query(p, pair_cosines(p)):.4f}" for s, p in pairs.items()))
    print("pooled AUC of each query's own engaged share (an oracle constant within a query): "
          + ", ".join(f"{s} {roc_auc(engaged_share(p), p.y):.4f}" for s, p in pairs.items()))

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
    terms = Terms(data_dir)
    alpha = print_coverage(terms, validation, test)
    for split in ("train", "validation"):
        contrastive_weight(terms, retriever, data_dir, split, model, model.config.model.scale)
    print_word_weights(terms, retriever, data_dir, model, alpha, train, validation, test)
    print_query_bias(terms, model, train, validation, test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
