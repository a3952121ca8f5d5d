"""`q2e <verb>`: the command line.

Exit codes: 0 success, 2 bad usage, config or input (one clear line on stderr),
1 any other failure.

Verbs: `synth`, `prepare`, `validate`, `train`, `evaluate`, `compare`,
`index`, `mine`, `export`, `serve`, `query`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import tf_q2e
from tf_q2e.errors import InputError


def _synth(args: argparse.Namespace) -> int:
    from tf_q2e.data import synth

    start = time.perf_counter()
    manifest = synth.generate(
        args.out,
        products=args.products,
        impressions=args.impressions,
        seed=args.seed,
        image_dim=args.image_dim,
        ground_truth_queries=args.ground_truth_queries,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    _print_counts(args.out, manifest, time.perf_counter() - start)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from tf_q2e.data import adapters

    start = time.perf_counter()
    manifest = adapters.prepare(args.dataset, args.input, args.out)
    _print_counts(args.out, manifest, time.perf_counter() - start)
    return 0


def _print_counts(out: str, manifest: dict, seconds: float) -> None:
    counts = manifest.get("counts", {})
    print(f"wrote {out} in {seconds:.1f} s: catalog {counts.get('catalog', 0)} products")
    for split in ("train", "validation", "test"):
        c = counts.get(split)
        if c:
            print(
                f"  {split}: {c['rows']} impressions (engaged {c['engaged']}, not engaged {c['not_engaged']}, "
                f"unlabelled {c['unlabelled']})"
            )


def _validate(args: argparse.Namespace) -> int:
    from tf_q2e.config import load_config
    from tf_q2e.data.validate import validate_dataset

    cfg = load_config(args.config, args.set)
    print(f"config {args.config or '(defaults)'}: ok")
    data_dir = args.data or cfg.data.dir
    if data_dir is None:
        print("no data set given (--data DIR or data.dir): checked the config only")
        return 0
    if args.report:  # fail before a long validation rather than after it
        report_dir = os.path.dirname(os.path.abspath(args.report))
        if not os.path.isdir(report_dir):
            raise InputError(f"--report {args.report}: the directory {report_dir} does not exist; create it first")
    quarantine_dir = cfg.data.quarantine_dir or os.path.join(data_dir, "quarantine")
    report = validate_dataset(data_dir, cfg.data.on_bad_rows, cfg.data.image_dim, quarantine_dir)
    print(report.format_text())
    if args.report:
        try:
            with open(args.report, "w", encoding="utf-8") as f:
                json.dump(report.to_dict(), f, indent=2)
        except OSError as e:
            raise InputError(f"--report {args.report}: cannot write the report ({e.strerror or e}); "
                             "give a writable file path") from e
    if cfg.data.on_bad_rows == "skip":
        print(f"{report.rows_dropped} row(s) skipped")
        return 0
    if report.problem_count:
        first = next(p for f in report.files for p in f.problems)
        print(
            f"q2e: error: {report.problem_count} bad row(s), first: {first}. "
            "Fix them, or set data.on_bad_rows=skip to quarantine them",
            file=sys.stderr,
        )
        return 2
    return 0


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from tf_q2e.config import load_config

    cfg = load_config(args.config, args.set)
    if args.data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=args.data))
    if not cfg.data.dir:
        raise InputError("no data set given: pass --data DIR or set data.dir in the config")
    from tf_q2e.train import train

    history = train(cfg, cfg.data.dir, args.out)
    last = {name: values[-1] for name, values in history.items() if values}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_") or k == "loss")
    print(f"trained {len(history.get('loss', []))} epoch(s) into {args.out}: {shown}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tf_q2e.evaluate import comparison_table, eval_dir, evaluate_run

    _check_bootstrap(args.bootstrap)
    report = evaluate_run(args.run, args.data, args.split, n_boot=args.bootstrap)
    print(comparison_table([report]), end="")
    print(f"wrote {eval_dir(args.run, args.split)}: report.json, report.md, recall_at_k.png, score_histograms.png, "
          "reliability.png")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tf_q2e.evaluate import compare

    _check_bootstrap(args.bootstrap)
    if not args.runs and not args.bm25 and not args.pretrained:
        fused = [f"{flag} needs runs: it fuses each run with {baseline}" for flag, baseline, on in
                 (("--hybrid", "BM25", args.hybrid), ("--late-fusion", "MiniLM", args.late_fusion)) if on]
        raise InputError("nothing to compare: give run directories, --bm25 and/or --pretrained"
                         + (f" ({'; '.join(fused)})" if fused else ""))
    table = compare(args.runs, args.data, args.split, bm25=args.bm25, hybrid=args.hybrid, out_dir=args.out,
                    n_boot=args.bootstrap, pretrained=args.pretrained, late_fusion=args.late_fusion,
                    fusion_weight=args.fusion_weight, max_tokens=args.max_tokens, text_cache=args.text_cache)
    print(table, end="")
    if args.out:
        print(f"wrote {args.out}: compare.md, compare.json, recall_at_k.png")
    return 0


def _check_bootstrap(n: int) -> None:
    if n < 10:
        raise InputError(f"--bootstrap ({n}) must be at least 10 resamples")


def _index(args: argparse.Namespace) -> int:
    from tf_q2e.index import build_index

    if args.upsert or args.delete:
        return _update_index(args)
    if args.rebalance != "auto":
        raise InputError("--rebalance needs --upsert or --delete")
    if args.target_recall is not None and not args.tune:
        raise InputError("--target-recall needs --tune")
    target = args.target_recall if args.target_recall is not None else 0.95
    if not 0.0 < target <= 1.0:
        raise InputError(f"--target-recall ({target}) must be in (0, 1]")
    meta = build_index(args.run, args.catalog, target if args.tune else None, args.set)
    scann = meta["scann"]
    print(f"indexed {meta['products']} products ({meta['dim']}-d) into {os.path.join(args.run, 'index')}: "
          f"ScaNN {scann['kind']}, leaves {scann['num_leaves']} (search {scann['leaves_to_search']}), reorder {scann['reorder']}; "
          f"embed {meta['embed_seconds']:.1f} s, build {meta['build_seconds']:.1f} s")
    if "tune" in meta:
        chosen = meta["tune"]["chosen"]
        print(f"tuned: recall@{meta['k']} {chosen['recall']:.3f} vs exact search, p50 {chosen['p50_ms']:.3f} ms "
              f"({len(meta['tune']['tried'])} settings tried; see index.json)")
    return 0


def _update_index(args: argparse.Namespace) -> int:
    from tf_q2e.updates import update_index

    if args.catalog or args.tune or args.set:
        raise InputError("--upsert/--delete update the run's index as it is: --catalog, --tune and --set build a new one")
    meta = update_index(args.run, args.upsert, args.delete, args.rebalance)
    update = meta["updates"][-1]
    print(f"updated {os.path.join(args.run, 'index')}: {update['added']} added, {update['replaced']} replaced, "
          f"{update['deleted']} deleted -> {meta['products']} products"
          f"{'; rebalanced' if update['rebalanced'] else ''} in {update['seconds']:.1f} s (q2e export writes a new version)")
    return 0


def _mine(args: argparse.Namespace) -> int:
    from tf_q2e.mining import mine_negatives

    report = mine_negatives(args.run, args.source, args.out, args.per_query, args.depth, args.margin, args.skip_top,
                            args.sampling, args.seed)
    print(f"wrote {report['negatives']} mined negatives of {report['queries']} training queries to {report['out']} "
          f"({report['queries_without_negatives']} queries without any)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tf_q2e.savedmodels import export_run

    if args.k is not None and args.k < 1:
        raise InputError(f"--k ({args.k}) must be at least 1")
    result = export_run(args.run, args.out, args.name, args.k, scann=not args.no_scann)
    print(f"exported version {result['version']} (k {result['k']}) to {args.out}: {', '.join(result['models'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="q2e", description="Que2Engage product search: data, training, serving.")
    parser.add_argument("--version", action="version", version=f"tf_q2e {tf_q2e.__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("synth", help="write a synthetic marketplace data set")
    p.add_argument("--products", type=int, required=True, help="catalogue size")
    p.add_argument("--impressions", type=int, required=True, help="impression log rows over all splits")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--image-dim", type=int, default=16, help="length of the image-like embedding, 0 for none (default 16)")
    p.add_argument("--ground-truth-queries", type=int, default=1000, help="test queries with ground truth in the manifest")
    p.add_argument("--out", required=True, help="output data set directory")
    p.set_defaults(handler=_synth)

    from tf_q2e.data.adapters import DATASETS

    p = verbs.add_parser("prepare", help="convert a public data set into the canonical files")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--input", required=True, help="the data set's file or directory, as published")
    p.add_argument("--out", required=True, help="output data set directory")
    p.set_defaults(handler=_prepare)

    p = verbs.add_parser("validate", help="check a config and a data set")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--data", help="data set directory (overrides data.dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (YAML value)")
    p.add_argument("--report", help="also write the report as JSON to this file")
    p.set_defaults(handler=_validate)

    p = verbs.add_parser("train", help="train the two towers with model.fit")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--data", help="data set directory (overrides data.dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (YAML value)")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume a killed run)")
    p.set_defaults(handler=_train)

    p = verbs.add_parser("evaluate", help="retrieval, engagement and relevance metrics of a run on a held-out split")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--data", help="data set directory (default: the one the run trained on)")
    p.add_argument("--split", default="test", choices=("test", "validation", "train"), help="split to evaluate (default test)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (default 1000)")
    p.set_defaults(handler=_evaluate)

    p = verbs.add_parser("compare", help="one table of several runs (and BM25, MiniLM, fusions) on the same split")
    p.add_argument("runs", nargs="*", metavar="RUN", help="trained run directories")
    p.add_argument("--bm25", action="store_true", help="add the BM25 baseline (bm25s, English stemmer)")
    p.add_argument("--hybrid", action="store_true",
                   help="add one row per run: its dense retrieval and BM25 fused by reciprocal rank fusion (k=60)")
    p.add_argument("--pretrained", action="store_true",
                   help="add zero-shot all-MiniLM-L6-v2: cosine of the query's and the title + description's vectors")
    p.add_argument("--late-fusion", action="store_true",
                   help="add one row per run: its score q.d + W x MiniLM's cosine (W: --fusion-weight, or the best "
                        "Recall@100 on the validation split of 0, 0.25, 0.5, 1, 2, 4)")
    p.add_argument("--fusion-weight", type=float, metavar="W", help="the late fusion's weight (default: chosen on validation)")
    p.add_argument("--max-tokens", type=int, help="MiniLM's WordPiece tokens per text, [CLS] and [SEP] included (default 64)")
    p.add_argument("--text-cache", metavar="DIR",
                   help="read and fill MiniLM's vectors in this text cache (train.text_cache's; default: in memory)")
    p.add_argument("--data", help="data set directory (default: the first run's)")
    p.add_argument("--split", default="test", choices=("test", "validation", "train"), help="split to evaluate (default test)")
    p.add_argument("--out", help="also write compare.md, compare.json and recall_at_k.png here")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (default 1000)")
    p.set_defaults(handler=_compare)

    p = verbs.add_parser("index", help="embed the catalogue and build the ScaNN and exact indexes of a run")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--catalog", help="catalogue file (default: the catalogue of the run's data set)")
    p.add_argument("--tune", action="store_true", help="pick the fastest search options that reach --target-recall")
    p.add_argument("--target-recall", type=float, help="recall@k against exact search that --tune must reach (default 0.95)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an index option (index.k=50)")
    p.add_argument("--upsert", metavar="FILE", help="update the run's index: add or replace the products of this "
                   "catalogue file (only they are embedded)")
    p.add_argument("--delete", metavar="FILE", help="update the run's index: remove the product ids of this file "
                   "(one per line)")
    p.add_argument("--rebalance", choices=("auto", "always", "never"), default="auto",
                   help="with --upsert/--delete: retrain ScaNN's partitions (auto: after 20%% churn since they were trained)")
    p.set_defaults(handler=_index)

    p = verbs.add_parser("mine", help="mine hard negatives for the run's training queries (ranked high, never shown)")
    p.add_argument("--run", required=True, help="a run directory (its data set's training split is mined)")
    p.add_argument("--source", choices=("bm25", "index"), default="bm25",
                   help="rank with BM25 over the catalogue, or with the run's towers over its index (default bm25)")
    p.add_argument("--out", help="Parquet file to write (default RUN/mined_negatives.parquet)")
    p.add_argument("--per-query", type=int, default=8, help="negatives per query at most (default 8)")
    p.add_argument("--depth", type=int, default=100, help="candidates ranked per query (default 100)")
    p.add_argument("--margin", type=float, default=0.95,
                   help="drop candidates scoring >= MARGIN x the query's positive (default 0.95, NV-Retriever)")
    p.add_argument("--skip-top", type=int, default=0, help="also drop the first N candidates left (default 0)")
    p.add_argument("--sampling", choices=("top", "random"), default="top",
                   help="keep the best-ranked candidates left, or a seeded random draw among them (default top)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random (default 0)")
    p.set_defaults(handler=_mine)

    p = verbs.add_parser("export", help="write the run's SavedModels into a TensorFlow Serving base directory")
    p.add_argument("--run", required=True, help="a trained and indexed run directory")
    p.add_argument("--out", required=True, help="TensorFlow Serving base directory (a new version is added)")
    p.add_argument("--name", default="q2e", help="model name (default q2e; the ScaNN model is <name>_scann)")
    p.add_argument("--k", type=int, help="products per query (default: index.k)")
    p.add_argument("--no-scann", action="store_true", help="export the stock-op model only")
    p.set_defaults(handler=_export)

    from tf_q2e.serving import commands

    p = verbs.add_parser("serve", help="serve a TF Serving base directory over gRPC and REST (development server)")
    commands.add_serve_arguments(p)
    p.set_defaults(handler=commands.run_serve)

    p = verbs.add_parser("query", help="query a server through the tensorflow-serving-api client")
    commands.add_query_arguments(p)
    p.set_defaults(handler=commands.run_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO lines drown the output
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    try:
        return args.handler(args)
    except InputError as e:
        print(f"q2e: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("q2e: interrupted", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the last resort of a command line
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
