"""Speed of in-graph text featurization (`tf_q2e.features.TextHasher`) on CPU.

Times `TextHasher(buckets)` (default options: char trigrams, word unigrams and
bigrams, max_words 64) inside a `tf.function` with a `[None]` string signature,
on batches of `--batch` texts: queries (3-4 words), titles (~8 words),
descriptions (~40 words) and long descriptions (~160 words, of which
max_words = 64 are used, as in catalogues such as Home Depot's). Texts are
generated here (seeded):
product-like words with capitals, digits, units and punctuation; a share of
rows (`--non-ascii`) carries a non-ASCII character (accents, "½", "™", CJK),
which sends the row through the slower Unicode path. `--home-depot FILE` takes
queries and titles from the Home Depot `train.csv.zip` instead (descriptions:
four titles joined).

Prints, per kind: milliseconds per batch (median), texts per second and ids per
text; then rows per second with query + title + description featurized per row
(one tf.function; again with the long description), run as one stream and as
`--streams` concurrent streams (as `tf.data` map calls with num_parallel_calls
would), and the share of the machine's CPUs that featurization takes at
`--target-rows` rows per second (target / rows per second with all streams,
which keep every CPU busy).

Usage:
  .venv/bin/python benchmarks/featurize_speed.py [--batch 768] [--buckets 262144] [--steps 30]
      [--non-ascii 0,0.1,1] [--streams 2] [--target-rows 15000] [--home-depot PATH]

Exit code 0 if `--streams` streams reach `--target-rows` rows per second, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import statistics
import sys
import threading
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_q2e  # noqa: E402,F401  (Keras 2 before TensorFlow)
import tensorflow as tf  # noqa: E402

from tf_q2e.features import TextHasher  # noqa: E402

_UNICODE_WORDS = ["café", "Größe", "crème", "naïve", "½-inch", "Pro™", "90°", "señor", "日本語", "Ωmega", "façade"]
_UNITS = ["2.5m", "3-seater", "12-gauge", "(Grey)", "1/2 in.", "x", "&", "-", "10ft", "4-pack", "#SC-141"]


class TextMaker:
    """Seeded product-like text: Zipf-distributed words of 2-10 letters, with units and punctuation."""

    def __init__(self, seed: int = 0, vocabulary: int = 5000):
        self.rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.words = ["".join(self.rng.choice(letters) for _ in range(self.rng.randint(2, 10)))
                      for _ in range(vocabulary)]
        self.weights = [1.0 / (rank + 1) for rank in range(vocabulary)]

    def _words(self, n: int) -> list[str]:
        words = self.rng.choices(self.words, self.weights, k=n)
        for i in range(n):
            if self.rng.random() < 0.08:
                words[i] = self.rng.choice(_UNITS)
        return words

    def text(self, kind: str, non_ascii: bool) -> str:
        if kind == "query":
            words = self._words(self.rng.randint(3, 4))
        elif kind == "title":
            words = [w.capitalize() for w in self._words(self.rng.randint(6, 10))]
        else:  # description: sentences of 6-14 words, ~40 (long: ~160) words
            words, n = [], self.rng.randint(36, 44) * (4 if kind == "long description" else 1)
            while len(words) < n:
                sentence = self._words(self.rng.randint(6, 14))
                words += [sentence[0].capitalize()] + sentence[1:-1] + [sentence[-1] + self.rng.choice(".,;!")]
            words = words[:n]
        if non_ascii:
            words[self.rng.randrange(len(words))] = self.rng.choice(_UNICODE_WORDS)
        return " ".join(words)

    def batch(self, kind: str, size: int, non_ascii_share: float) -> list[str]:
        return [self.text(kind, self.rng.random() < non_ascii_share) for _ in range(size)]


def home_depot_batches(path: str, size: int, count: int, seed: int) -> dict[str, list[list[str]]]:
    with zipfile.ZipFile(path) as archive:
        raw = archive.read(archive.namelist()[0]).decode("latin-1")
    rows = list(csv.DictReader(io.StringIO(raw)))
    rng = random.Random(seed)
    batches: dict[str, list[list[str]]] = {"query": [], "title": [], "description": [], "long description": []}
    for _ in range(count):
        sample = rng.sample(rows, size)
        batches["query"].append([r["search_term"] for r in sample])
        batches["title"].append([r["product_title"] for r in sample])
        batches["description"].append([" ".join(r["product_title"] for r in rng.sample(rows, 4)) for _ in sample])
        batches["long description"].append([" ".join(r["product_title"] for r in rng.sample(rows, 14))
                                            for _ in sample])
    return batches


def _median_seconds(run, batches, steps: int) -> float:
    for b in batches:  # trace and warm up
        run(b)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        run(batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _streams_rows_per_second(run_row_batch, batches, streams: int, steps: int, batch_size: int) -> float:
    def worker():
        for i in range(steps):
            run_row_batch(*batches[i % len(batches)])

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams * steps * batch_size / (time.perf_counter() - start)


def run_scenario(name: str, batches: dict[str, list[list[str]]], args) -> float:
    hasher = TextHasher(args.buckets)
    ids_fn = tf.function(hasher.call, input_signature=[tf.TensorSpec([None], tf.string)])
    tensors = {kind: [tf.constant(b) for b in bs] for kind, bs in batches.items()}
    print(f"\n{name}")
    print(f"  {'texts':17s} {'words':>6s} {'ms/batch':>9s} {'texts/s':>10s} {'ids/text':>9s}")
    seconds = {}
    for kind, ts in tensors.items():
        seconds[kind] = _median_seconds(ids_fn, ts, args.steps)
        words = statistics.mean(len(t.split()) for t in batches[kind][0])
        ids = float(tf.reduce_mean(tf.cast(ids_fn(ts[0]).row_lengths(), tf.float32)))
        print(f"  {kind:17s} {words:6.1f} {seconds[kind] * 1e3:9.2f} {args.batch / seconds[kind]:10,.0f} {ids:9.1f}")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)] * 3)
    def featurize_rows(query, title, description):
        return hasher(query), hasher(title), hasher(description)

    cpus = os.cpu_count() or 1
    result = None
    for description in ("description", "long description"):
        rows = list(zip(tensors["query"], tensors["title"], tensors[description]))
        one = args.batch / _median_seconds(lambda r: featurize_rows(*r), rows, args.steps)
        many = _streams_rows_per_second(featurize_rows, rows, args.streams, args.steps, args.batch)
        result = many if result is None else result
        print(f"  query + title + {description} per row: {one:,.0f} rows/s (1 stream), "
              f"{many:,.0f} rows/s ({args.streams} streams); at {args.target_rows:,} rows/s "
              f"featurization takes ~{args.target_rows / max(one, many):.0%} of the {cpus} CPUs")
    return result  # the target is checked with ~40-word descriptions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--buckets", type=int, default=2**18)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--non-ascii", default="0,0.1,1",
                        help="comma-separated shares of rows with a non-ASCII character, one scenario each")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--target-rows", type=int, default=15_000)
    parser.add_argument("--home-depot", metavar="PATH", help="Home Depot train.csv.zip: real queries and titles")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(f"TextHasher(buckets={args.buckets}) defaults, batch {args.batch}, tf.function on CPU, "
          f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}")
    results = []
    if args.home_depot:
        results.append(run_scenario(f"Home Depot queries and titles ({args.home_depot})",
                                    home_depot_batches(args.home_depot, args.batch, 4, args.seed), args))
    else:
        maker = TextMaker(args.seed)
        for share in [float(s) for s in args.non_ascii.split(",")]:
            batches = {kind: [maker.batch(kind, args.batch, share) for _ in range(4)]
                       for kind in ("query", "title", "description", "long description")}
            results.append(run_scenario(f"synthetic text, {share:.0%} of rows with a non-ASCII character",
                                        batches, args))
    ok = all(r >= args.target_rows for r in results)
    print(f"\n{'meets' if ok else 'misses'} the target of {args.target_rows:,} rows/s "
          f"({args.streams} streams) in every scenario")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
