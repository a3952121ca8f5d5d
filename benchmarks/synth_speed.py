"""Speed and memory of the synthetic marketplace generator (`tf_q2e.data.synth.generate`).

Runs `generate` in a child process (so the peak RSS is the generator's alone),
into a temporary directory that is deleted afterwards, and prints the wall
time, impressions per second, the child's peak RSS, the row counts per split,
the engagement rate, and whether the targets are met (default: 1M products and
5M impressions in under 300 s with a peak RSS under 8 GB).

Usage:
  .venv/bin/python benchmarks/synth_speed.py [--products 1000000] [--impressions 5000000]
      [--seed 0] [--image-dim 16] [--max-seconds 300] [--max-rss-gb 8] [--keep DIR]

Exit code 0 if the targets are met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import sys
from tf_q2e.data.synth import generate
generate(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), seed=int(sys.argv[4]), image_dim=int(sys.argv[5]),
         progress=lambda m: print("  " + m, file=sys.stderr, flush=True))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--impressions", type=int, default=5_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-dim", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--max-rss-gb", type=float, default=8.0)
    parser.add_argument("--keep", metavar="DIR", help="write here and keep the data set instead of a temp dir")
    args = parser.parse_args(argv)

    out_dir = args.keep or tempfile.mkdtemp(prefix="q2e-synth-bench-")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        print(f"synth: {args.products:,} products, {args.impressions:,} impressions, image_dim {args.image_dim},"
              f" {os.cpu_count()} CPUs", flush=True)
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, out_dir, str(args.products), str(args.impressions), str(args.seed),
             str(args.image_dim)], env=env, cwd=REPO)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            print(f"generate failed with exit code {child.returncode}", file=sys.stderr)
            return 1
        rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        sizes = {name: os.path.getsize(os.path.join(out_dir, name)) / 2**20
                 for name in sorted(os.listdir(out_dir))}
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)

    counts = manifest["counts"]
    engaged = sum(counts[s]["engaged"] for s in ("train", "validation", "test"))
    rows = sum(counts[s]["rows"] for s in ("train", "validation", "test"))
    stats = manifest["generator"]["statistics"]
    print(f"wall seconds      {seconds:.1f}")
    print(f"impressions/s     {args.impressions / seconds:,.0f}")
    print(f"products/s        {args.products / seconds:,.0f}")
    print(f"peak RSS (child)  {rss_gb:.2f} GB")
    print(f"catalogue rows    {counts['catalog']:,}")
    for split in ("train", "validation", "test"):
        c = counts[split]
        print(f"{split:<17} {c['rows']:,} rows, {c['engaged']:,} engaged ({c['engaged'] / max(c['rows'], 1):.3f})")
    print(f"engagement rate   {engaged / max(rows, 1):.4f}")
    print(f"by relevance      rows {stats['impressions_by_relevance']}, rate {stats['engagement_rate_by_relevance']}")
    print(f"query pool        {manifest['generator']['query_pool']['size']:,} queries,"
          f" {manifest['generator']['sessions']['count']:,} sessions,"
          f" ground truth for {len(manifest['ground_truth']['queries']):,} test queries")
    print("file MiB          " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    fast, small = seconds < args.max_seconds, rss_gb < args.max_rss_gb
    print(f"target time  < {args.max_seconds:.0f} s: {'met' if fast else 'NOT met'}")
    print(f"target RSS   < {args.max_rss_gb:.0f} GB: {'met' if small else 'NOT met'}")
    return 0 if fast and small else 1


if __name__ == "__main__":
    sys.exit(main())
