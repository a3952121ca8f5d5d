"""Three model/training options against the default config, on the synthetic marketplace.

The options: `model.fusion: concat` (concat + MLP instead of Que2Search's
attention fusion), `model.logq_correction: true` (the in-batch softmax's
logits of each product lowered by the log of its training frequency, the
sampling-bias correction of in-batch negatives) and `train.optimizer: adagrad`
(instead of Adam). Runs, with the `q2e` command line (so every step is a
command anyone can repeat):

    q2e synth --products 20000 --impressions 200000 --seed 0 --out OUT/data
    q2e train --config configs/default.yaml --data OUT/data --set train.epochs=E --set train.seed=S [--set OPTION] --out OUT/<variant>-s<S>
    q2e evaluate --run OUT/<variant>-s<S> --split validation --bootstrap 100
    q2e evaluate --run OUT/<variant>-s<S> --split test --bootstrap 100

for every variant (the default config and each option alone) and every seed
in --seeds, then prints one markdown table per split (validation, where an
option is chosen; test, reported) with each metric's mean over the seeds
(± their standard deviation with several seeds), the training seconds and the
exact commands. Engagement ranking is judged within a query
(engagement_auc_per_query, recall@K, and the hidden model's ground truth,
gt_*), not on the pooled AUC alone (docs: DESIGN.md). `q2e synth` writes
ground truth for the test split only, so gt_* is "–" on validation.

The data set and every step whose output exists (a trained model with its
recorded training time, a split's report.json) are reused, so an interrupted
pass resumes where it stopped.

    python benchmarks/options.py --out runs/options --seeds 0 1     # 4 variants x 2 seeds
    python benchmarks/options.py --seeds 0 --variants default concat  # quick
    python benchmarks/options.py --variants default adagrad adagrad-lr0.1  # Adagrad at lr 0.1 too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/default.yaml"
# The default config and each option alone: name -> its `--set` overrides.
VARIANTS = {
    "default": [],
    "concat": ["model.fusion=concat"],
    "logq": ["model.logq_correction=true"],
    "adagrad": ["train.optimizer=adagrad"],
    # Not run by default: Adagrad at TFRS's tutorials' learning rate (Adam's 7e-4 is far too small for it).
    "adagrad-lr0.1": ["train.optimizer=adagrad", "train.learning_rate=0.1"],
}
DEFAULT_VARIANTS = ("default", "concat", "logq", "adagrad")
METRICS = ("recall@10", "recall@100", "engagement_auc_per_query", "engagement_auc_pooled",
           "gt_recall@100", "gt_ndcg@10")  # gt_*: against the manifest's ground truth (test split only)
SPLITS = ("validation", "test")  # validation chooses, test reports
TRAIN_SECONDS = "options_train_seconds.json"  # written into a run directory when its training finished


def q2e(*args: str, log: list[str], run: bool = True) -> float:
    """Runs `q2e ARGS` (unless `run` is False: an earlier call's output is reused), logs the command,
    and returns its wall seconds (0 when reused)."""
    shown = "q2e " + " ".join(args)
    log.append(shown)
    print(f"$ {shown}" + ("" if run else "   # reused: its output exists"), flush=True)
    if not run:
        return 0.0
    # `python -m tf_q2e.cli` with this checkout first on the path: the code measured is this checkout's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tf_q2e.cli", *args], check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    return time.perf_counter() - start


def report_path(run: str, split: str) -> str:
    """`tf_q2e.evaluate.eval_dir`: RUN/eval/ for the test split, RUN/eval-<split>/ for others."""
    return os.path.join(run, "eval" if split == "test" else f"eval-{split}", "report.json")


def train_and_evaluate(variant: str, seed: int, data: str, args, log: list[str]) -> dict:
    """Trains (unless trained) and evaluates (unless reported) one run; returns its reports and train seconds."""
    run = os.path.join(args.out, f"{variant}-s{seed}")
    timing = os.path.join(run, TRAIN_SECONDS)
    trained = os.path.exists(timing) and os.path.exists(os.path.join(run, "model", "weights.index"))
    overrides = [f"train.epochs={args.epochs}", f"train.seed={seed}", *VARIANTS[variant]]
    seconds = q2e("train", "--config", CONFIG, "--data", data, *sum((["--set", s] for s in overrides), []),
                  "--out", run, log=log, run=not trained)
    if trained:
        with open(timing, encoding="utf-8") as f:
            seconds = json.load(f)["seconds"]
    else:
        with open(timing, "w", encoding="utf-8") as f:
            json.dump({"seconds": seconds, "note": "wall seconds of `q2e train` (process start to exit)"}, f)
    reports = {}
    for split in SPLITS:
        path = report_path(run, split)
        q2e("evaluate", "--run", run, "--split", split, "--bootstrap", str(args.bootstrap), log=log,
            run=not os.path.exists(path))
        with open(path, encoding="utf-8") as f:
            reports[split] = json.load(f)
    return {"reports": reports, "train_seconds": seconds}


def mean_over_seeds(runs: list[dict], split: str) -> dict:
    """metric -> (mean, standard deviation or None) over the runs; `train_s` the training seconds."""
    out = {}
    for m in METRICS:
        values = [r["reports"][split]["metrics"][m]["mean"] for r in runs
                  if m in r["reports"][split]["metrics"] and r["reports"][split]["metrics"][m]["mean"] is not None]
        if values:
            out[m] = (float(np.mean(values)), float(np.std(values)) if len(values) > 1 else None)
    seconds = [r["train_seconds"] for r in runs]
    out["train_s"] = (float(np.mean(seconds)), float(np.std(seconds)) if len(seconds) > 1 else None)
    return out


def table(rows: dict[str, dict]) -> str:
    columns = (*METRICS, "train_s")
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        cells = []
        for m in columns:
            if m not in values:
                cells.append("–")
                continue
            mean, sd = values[m]
            digits = 0 if m == "train_s" else 4
            cells.append(f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/options", help="work directory (data and runs are reused when present)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                   help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of q2e evaluate (default 100)")
    p.add_argument("--products", type=int, default=20000)
    p.add_argument("--impressions", type=int, default=200000)
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    command = "python benchmarks/options.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    log: list[str] = []
    data = os.path.join(args.out, "data")
    q2e("synth", "--products", str(args.products), "--impressions", str(args.impressions), "--seed", "0",
        "--out", data, log=log, run=not os.path.exists(os.path.join(data, "manifest.json")))
    runs = {v: [train_and_evaluate(v, s, data, args, log) for s in args.seeds] for v in args.variants}
    text = ""
    for split in SPLITS:
        report = runs[args.variants[0]][0]["reports"][split]
        rows = {(v if not VARIANTS[v] else f"{v} ({', '.join(VARIANTS[v])})"): mean_over_seeds(rs, split)
                for v, rs in runs.items()}
        text += (f"## {split} split ({report['queries']} queries), mean"
                 + (" ± sd" if len(args.seeds) > 1 else "") + f" over seed(s) {' '.join(map(str, args.seeds))}, "
                 + f"{args.epochs} epoch(s)\n\n" + table(rows) + "\n")
    text += ("gt_recall@100, gt_ndcg@10: against the hidden engagement model's ground truth (test split only). "
             "train_s: wall seconds of `q2e train` (process start to exit; 2-core CPU shared with other jobs).\n\n"
             f"Produced by `{command}` (this pass: {time.perf_counter() - start:.0f} s; steps whose output existed "
             "were reused); the commands (from the repository root, `.venv/bin/` on the PATH):\n\n```sh\n"
             + "\n".join(c.replace(REPO + os.sep, "") for c in log) + "\n```\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
