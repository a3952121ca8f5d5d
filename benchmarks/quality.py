"""Quality of Que2Engage vs contrastive-only vs BM25, on Home Depot and on the synthetic marketplace.

Runs, with the `q2e` command line (so every step is a command anyone can
repeat), for each data set:

    q2e train --config CFG --data DATA --set model.engagement_weight=L --set train.seed=S --out OUT/<data>/l<L>-s<S>
    q2e evaluate --run OUT/<data>/l<L>-s<S>
    q2e compare ... --split validation --bm25 --hybrid
    q2e compare ... --split test --bm25 --hybrid

for every weight L in --lambdas (0 = contrastive only, Que2Search) and every
seed in --seeds, then averages each metric over the seeds and writes the
tables of the test split (reported) and of the validation split (where a
config and a weight are chosen), each Que2Engage row's difference from contrastive-only and the exact commands into
`--results` (default benchmarks/RESULTS.md), each data set between its own
markers, so the rest of the file (and the other data set) is kept.

Home Depot is not redistributable: it is read from
`../shared/data/home-depot-search-relevance/train.csv.zip` (or --homedepot)
and prepared into OUT/data/homedepot; when the file is missing the script
says so and does the synthetic marketplace only.

    python benchmarks/quality.py --out runs/quality            # both data sets, lambdas 0 and 0.5, seeds 0 1 2
    python benchmarks/quality.py --datasets synth --seeds 0    # quick
    # the pretrained text encoder, with the zero-shot and late-fusion baselines, in its own section:
    python benchmarks/quality.py --datasets homedepot --lambdas 0.5 --variant minilm --pretrained \
        --set model.text_encoder=minilm --set train.text_cache=runs/quality/text_cache
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
HOMEDEPOT = os.path.join(os.path.dirname(REPO), "shared", "data", "home-depot-search-relevance", "train.csv.zip")
METRICS = ("recall@10", "recall@100", "recall@1000", "mrr", "engagement_auc_pooled", "engagement_auc_per_query",
           "engagement_ece", "ndcg@10", "relevance_auc", "in_batch_recall@1",
           "gt_recall@100", "gt_ndcg@10")  # gt_*: against the manifest's ground truth (synthetic data; "–" elsewhere)
CONFIGS = {"homedepot": "configs/homedepot.yaml", "synth": "configs/default.yaml"}
# Validation chooses (the config, λ), test reports: both tables are written.
SPLITS = ("validation", "test")


def q2e(*args: str, log: list[str], run: bool = True) -> None:
    """Runs `q2e ARGS` (unless `run` is False: a run of an earlier call is reused) and logs the command."""
    shown = "q2e " + " ".join(args)
    log.append(shown)
    print(f"$ {shown}" + ("" if run else "   # reused: its report exists"), flush=True)
    if run:
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "q2e"), *args], check=True, stdout=subprocess.DEVNULL)


def prepare(dataset: str, out: str, args, log: list[str]) -> str | None:
    data = os.path.join(out, "data", dataset)
    exists = os.path.exists(os.path.join(data, "manifest.json"))  # listed, not rerun
    if dataset == "homedepot":
        if not exists and not os.path.exists(args.homedepot):
            print(f"Home Depot data missing ({args.homedepot}): skipping it", flush=True)
            return None
        q2e("prepare", "--dataset", "homedepot", "--input", args.homedepot, "--out", data, log=log, run=not exists)
    else:
        q2e("synth", "--products", str(args.synth_products), "--impressions", str(args.synth_impressions),
            "--seed", "0", "--out", data, log=log, run=not exists)
    return data


def run_dataset(dataset: str, data: str, out: str, args, log: list[str]) -> dict:
    runs: dict[str, list[str]] = {}
    prefix = f"{args.variant}-" if args.variant else ""
    for lam in args.lambdas:
        for seed in args.seeds:
            run = os.path.join(out, dataset, f"{prefix}l{lam:g}-s{seed}")
            reuse = os.path.exists(os.path.join(run, "eval", "report.json"))  # listed, not rerun
            q2e("train", "--config", args.config or CONFIGS[dataset], "--data", data,
                "--set", f"model.engagement_weight={lam:g}", "--set", f"train.seed={seed}", *sum((["--set", s] for s in args.set), []),
                "--out", run, log=log, run=not reuse)
            q2e("evaluate", "--run", run, "--bootstrap", str(args.bootstrap), log=log, run=not reuse)
            runs.setdefault(f"{lam:g}", []).append(run)
    return {split: split_rows(split, runs, out, dataset, args, log) for split in SPLITS}


def split_rows(split: str, runs: dict[str, list[str]], out: str, dataset: str, args, log: list[str]) -> dict:
    """The table rows of one split: each weight's mean over seeds, BM25, and each weight's hybrid."""
    compare_dir = os.path.join(out, dataset, (f"{args.variant}-" if args.variant else "")
                               + ("compare" if split == "test" else f"compare-{split}"))
    pretrained = ["--pretrained", "--late-fusion", "--text-cache", os.path.join(out, "text_cache")] if args.pretrained else []
    q2e("compare", *[r for rs in runs.values() for r in rs], "--split", split, "--bm25", "--hybrid", *pretrained,
        "--out", compare_dir, "--bootstrap", str(args.bootstrap), log=log)
    with open(os.path.join(compare_dir, "compare.json"), encoding="utf-8") as f:
        reports = json.load(f)

    def key(path):  # a run directory may be reached through a symbolic link
        return os.path.realpath(path or "")

    baseline = ("bm25", "hybrid(", "minilm (zero-shot)", "late fusion:")
    dense = {key(r.get("run")): r for r in reports if not r["model"].startswith(baseline)}
    hybrid = {key(r.get("run")): r for r in reports if r["model"].startswith("hybrid(")}
    fusion = {key(r.get("run")): r for r in reports if r["model"].startswith("late fusion:")}
    rows = {}
    for lam, rs in runs.items():
        rows[f"λ = {lam}" + (" (contrastive only)" if float(lam) == 0 else " (Que2Engage)")] = mean_over_seeds(
            [dense[key(r)] for r in rs])
    bm25 = next(r for r in reports if r["model"] == "bm25")
    rows["BM25 (bm25s, Snowball stemmer)"] = {m: (bm25["metrics"][m]["mean"], None) for m in METRICS if m in bm25["metrics"]}
    for lam, rs in runs.items():
        rows[f"hybrid: BM25 + λ = {lam} (RRF)"] = mean_over_seeds([hybrid[key(r)] for r in rs])
    zero_shot = next((r for r in reports if r["model"] == "minilm (zero-shot)"), None)
    if zero_shot is not None:
        rows["all-MiniLM-L6-v2 zero-shot (exact)"] = {m: (zero_shot["metrics"][m]["mean"], None) for m in METRICS
                                                      if m in zero_shot["metrics"]}
    for lam, rs in runs.items():
        if all(key(r) in fusion for r in rs):
            weights = sorted({fusion[key(r)].get("fusion_weight") for r in rs})
            rows[f"late fusion: λ = {lam} + w × MiniLM cosine (w {', '.join(f'{w:g}' for w in weights)}, "
                 "chosen on validation)"] = mean_over_seeds([fusion[key(r)] for r in rs])
    return {"rows": rows, "queries": bm25["queries"], "queries_with_engaged": bm25["queries_with_engaged"],
            "compare": compare_dir}


def mean_over_seeds(reports: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        values = [r["metrics"][m]["mean"] for r in reports if m in r["metrics"] and r["metrics"][m]["mean"] is not None]
        if values:
            out[m] = (float(np.mean(values)), float(np.std(values)) if len(values) > 1 else None)
    return out


def table(rows: dict, seeds: int) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, values in rows.items():
        cells = []
        for m in METRICS:
            if m not in values:
                cells.append("–")
            else:
                mean, sd = values[m]
                cells.append(f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gt = ("" if not any(m.startswith("gt_") and m in values for values in rows.values() for m in METRICS) else
          " gt_recall@100, gt_ndcg@10: against the hidden engagement model's exact ground truth (the manifest's"
          " best products per test query for its searchers' most common country; tf_q2e/judged.py, tf_q2e/evaluate.py).")
    return "\n".join(lines) + (f"\n\nDense and hybrid rows: mean ± standard deviation over {seeds} seed(s). Hybrid: the "
                               "run's dense retrieval and BM25 fused by reciprocal rank fusion, "
                               "1/(60 + rank_dense) + 1/(60 + rank_bm25) (`q2e compare --hybrid`)." + gt + "\n")


def differences(rows: dict) -> str:
    """One line per Que2Engage row: its difference from the contrastive-only row (and BM25's Recall@100)."""
    base = next((v for k, v in rows.items() if "contrastive only" in k), None)
    ours = [(k, v) for k, v in rows.items() if "Que2Engage" in k]
    bm25 = next((v for k, v in rows.items() if k.startswith("BM25")), None)
    if base is None or not ours:
        return ""
    lines = []
    for name, v in ours:
        parts = [f"{label} {v[m][0] - base[m][0]:+.4f}" for m, label in
                 (("engagement_auc_per_query", "per-query engagement AUC"), ("engagement_auc_pooled", "pooled AUC"))
                 if m in v and m in base]
        parts += [f"{label} {v[m][0] / base[m][0] - 1:+.2%}" for m, label in
                  (("recall@10", "Recall@10"), ("recall@100", "Recall@100"), ("ndcg@10", "NDCG@10")) if m in v and m in base]
        line = f"- {name} vs contrastive only: " + ", ".join(parts)
        if bm25 and "recall@100" in bm25:
            line += f"; Recall@100 {v['recall@100'][0]:.4f} vs BM25's {bm25['recall@100'][0]:.4f}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_results(path: str, dataset: str, section: str) -> None:
    """Replaces the data set's section of `path` (between its markers), keeping the rest of the file."""
    begin, end = f"<!-- quality.py {dataset}: begin -->", f"<!-- quality.py {dataset}: end -->"
    body = f"{begin}\n{section}{end}\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Results\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + body + text[text.index(end) + len(end) + 1:]
    else:
        text += "\n" + body
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality", help="work directory (runs are reused when their report exists)")
    p.add_argument("--datasets", nargs="+", default=["homedepot", "synth"], choices=["homedepot", "synth"])
    p.add_argument("--lambdas", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--config", help="config for every data set (default: configs/homedepot.yaml, configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run")
    p.add_argument("--homedepot", default=HOMEDEPOT, help="Home Depot train.csv.zip")
    p.add_argument("--synth-products", type=int, default=20000)
    p.add_argument("--synth-impressions", type=int, default=200000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "RESULTS.md"))
    p.add_argument("--variant", help="a name for runs with other --set overrides: their run directories, compare "
                                     "directories and RESULTS.md section carry it (e.g. minilm)")
    p.add_argument("--pretrained", action="store_true",
                   help="add the zero-shot all-MiniLM-L6-v2 row and each λ's late fusion with it (q2e compare "
                        "--pretrained --late-fusion; vectors cached in OUT/text_cache)")
    args = p.parse_args(argv)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for dataset in args.datasets:
        start = time.perf_counter()
        log: list[str] = []
        data = prepare(dataset, args.out, args, log)
        if data is None:
            write_results(args.results, dataset, f"## {dataset}\n\nNot run: {args.homedepot} is missing.\n")
            continue
        result = run_dataset(dataset, data, args.out, args, log)
        section = f"{dataset} {args.variant}" if args.variant else dataset
        text = ""
        for split in ("test", "validation"):
            r = result[split]
            text += (f"## {section}: {split} split, {r['queries']} queries ({r['queries_with_engaged']} with an engaged product)\n\n"
                     + table(r["rows"], len(args.seeds)) + "\n" + differences(r["rows"]) + "\n")
        text += (f"Produced by `{command}` (this pass: {time.perf_counter() - start:.0f} s on a 2-core CPU; runs whose report "
                 + "existed were reused); the commands behind the tables "
                 + "(from the repository root, `.venv/bin/` on the PATH):\n\n```sh\n" + "\n".join(log) + "\n```\n")
        print(text, flush=True)
        write_results(args.results, section, text)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
