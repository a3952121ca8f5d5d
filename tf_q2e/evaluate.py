"""The multitask evaluation: does retrieval return what people engage with, and stay relevant?

`evaluate_run(RUN)` scores a held-out split (by query) of a data set with a
retriever and writes `RUN/eval/report.json`, `report.md` and plots (another
split than test: `RUN/eval-<split>/`, e.g. to choose a config on validation). A
retriever is anything with `search` and `score_pairs` (`tf_q2e.retrievers`:
`DenseRetriever` for a trained run, `BM25Retriever` for the lexical baseline
over `tf_q2e.bm25`, `HybridRetriever` for both fused by reciprocal rank
fusion, `PretrainedRetriever` for zero-shot all-MiniLM-L6-v2,
`LateFusionRetriever` for a run plus w × its cosine) and the split is a
`tf_q2e.judged.Judged`, so every model goes through the same code and the
same metrics:

* retrieval: full-catalogue Recall@K (K = 10, 100, 1000) of each query's
  engaged products (Que2Search's KNN recall), averaged over queries with at
  least one engaged product; MRR of the first engaged product in the top 1000;
* engagement: ROC AUC of the score for engaged vs hard-negative pairs, pooled
  over all pairs and averaged per query (queries with both classes);
* relevance, where graded labels exist: NDCG@10 over each query's judged
  products with gain = grade − the scale's lowest grade, and ROC AUC of
  relevant (grade above the scale's midpoint) vs irrelevant pairs;
* calibration of the engagement probability (dense models only: σ(s_e·(q·d
  + b_q) + b), the engagement task's output): expected calibration error
  `engagement_ece` over 15 equal-width bins of labelled pairs (its interval
  resampling whole queries) and a reliability plot, `reliability.png`;
* in-batch recall@1 (Que2Search's batch metric; dense models only): the split
  in batches of `train.global_batch_size` rows in a seeded random order, each
  row's query against the batch's products, same-product copies masked;
* ground truth, where the data set's `manifest.json` has a `ground_truth`
  section for the evaluated split (`q2e synth` writes one for the test split:
  for sampled test queries, the searchers' most common country and up to 50
  exactly relevant products with the highest *expected* engagement
  probability `e(p)` under the generator's hidden model, best first); each
  such query is searched with that country as `query_country`:
  - `gt_recall@100`: |top 100 ∩ T10| / |T10|, T10 = the query's true best
    10 products (all of them when the list is shorter), averaged over the
    ground-truth queries;
  - `gt_ndcg@10`: DCG@10 / IDCG@10 of the retriever's top 10 with
    `DCG@10 = Σ_{i<10} gain(p_i) / log2(i + 2)`, `gain(p) = e(p)` for a
    product of the true list and 0 for any other (including exactly relevant
    products below the list's 50), IDCG@10 the same sum over the true list's
    first 10; where the manifest gives no `expected_engagement`, gain =
    1 / (1-based rank in the true list);
  both exact truth where the sampled `engaged` labels only estimate it;
* 95% bootstrap intervals over queries (pooled figures resample whole
  queries; in-batch recall resamples batches).

Dense retrieval is exact search over the product vectors (the index's, when
`q2e index` ran on the same catalogue): it measures the model, not ScaNN,
whose recall against exact search `q2e index --tune` reports.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from tf_q2e import metrics as M
from tf_q2e.errors import InputError
from tf_q2e.judged import GroundTruth, Judged, load_judged, split_ground_truth, split_path
from tf_q2e.config import PRETRAINED_MAX_TOKENS
from tf_q2e.retrievers import (MINILM_MAX_TOKENS, BM25Retriever, HybridRetriever, LateFusionRetriever, PretrainedRetriever,
                               dense_retriever_for_run)

EVAL_DIR = "eval"
RECALL_KS = (10, 100, 1000)
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
NDCG_K = 10


GT_RECALL_K = 100  # gt_recall@K: how deep the true best products are looked for
GT_TRUE_BEST = 10  # ... of the true list's first this many


def eval_dir(run_dir: str, split: str = "test") -> str:
    """Where a run's report of `split` goes: `RUN/eval/` for the test split, `RUN/eval-<split>/` for others
    (a validation report, read to choose a config, never overwrites the test report)."""
    return os.path.join(run_dir, EVAL_DIR if split == "test" else f"{EVAL_DIR}-{split}")


def ground_truth_recall(ranked, truth: GroundTruth, k: int = GT_RECALL_K, best: int = GT_TRUE_BEST) -> np.ndarray:
    """Per ground-truth query: |top k ∩ T| / |T|, T = the true list's first `best` products (all when
    shorter); NaN for a query with an empty list."""
    return M.recall_at_k(ranked, [ids[:best] for ids in truth.product_ids], k)


def ground_truth_ndcg(ranked, truth: GroundTruth, k: int = NDCG_K) -> np.ndarray:
    """Per ground-truth query: NDCG@k of the ranked list, gain = the product's gain in the true list,
    0 for a product not in it (and for an empty place ""); `DCG@k = Σ_{i<k} gain_i / log2(i + 2)`,
    IDCG@k = the same sum over the true list's gains sorted, highest first. NaN when IDCG@k = 0."""
    discount = 1.0 / np.log2(np.arange(k) + 2.0)  # [k]
    out = np.full(len(truth.queries), np.nan)
    for q, (row, ids, gain) in enumerate(zip(ranked, truth.product_ids, truth.gains)):
        gain_of = dict(zip(ids, gain))
        top = list(row)[:k]
        dcg = sum(gain_of.get(p, 0.0) * discount[i] for i, p in enumerate(top))
        ideal = np.sort(gain)[::-1][:k]
        idcg = float(ideal @ discount[:len(ideal)])
        if idcg > 0:
            out[q] = dcg / idcg
    return out


def ground_truth_metrics(retriever, truth: GroundTruth, n_boot: int = 1000, seed: int = 0,
                         context_columns: tuple[str, ...] = ()) -> dict:
    """`{"gt_recall@100": summary, "gt_ndcg@10": summary}` (`metrics.summary`: mean, 95% bootstrap
    interval over the ground-truth queries, defined queries) of one retriever; the queries are
    searched once, at depth 100, with `query_country` = the ground truth's country."""
    ranked = retriever.search(truth.judged(tuple(context_columns)), max(GT_RECALL_K, NDCG_K))
    return {f"gt_recall@{GT_RECALL_K}": M.summary(ground_truth_recall(ranked, truth), n_boot=n_boot, seed=seed),
            f"gt_ndcg@{NDCG_K}": M.summary(ground_truth_ndcg(ranked, truth), n_boot=n_boot, seed=seed)}


def evaluate(retriever, judged: Judged, ks=RECALL_KS, n_boot: int = 1000, seed: int = 0,
             in_batch_size: int | None = None, truth: GroundTruth | None = None) -> dict:
    """Every metric of the module docstring for one retriever on one split, with 95% bootstrap intervals;
    with `truth` (the split's `GroundTruth`) also `ground_truth_metrics`, its queries searched with
    the split's context columns."""
    rng = np.random.default_rng(seed)
    report: dict = {"model": retriever.name, "split_file": judged.path, "queries": len(judged.queries),
                    "rows": int(len(judged.row_query)), "metrics": {}}
    m = report["metrics"]
    start = time.perf_counter()
    max_k = max(max(ks), max(CURVE_KS))
    ranked = retriever.search(judged, max_k)
    engaged = judged.engaged_sets
    with_engaged = np.array([bool(s) for s in engaged])
    report["queries_with_engaged"] = int(with_engaged.sum())
    for k in ks:
        m[f"recall@{k}"] = M.summary(M.recall_at_k(ranked, engaged, k), n_boot=n_boot, seed=seed)
    m["mrr"] = M.summary(M.reciprocal_rank(ranked, engaged), n_boot=n_boot, seed=seed)
    report["recall_curve"] = {"k": list(CURVE_KS),
                              "recall": [M.mean_defined(M.recall_at_k(ranked, engaged, k)) for k in CURVE_KS]}
    report["search_seconds"] = round(time.perf_counter() - start, 2)

    scores = retriever.score_pairs(judged)
    labelled = judged.engaged >= 0
    s, y, g = scores[labelled], judged.engaged[labelled], judged.row_query[labelled]
    m["engagement_auc_pooled"] = {**_pooled_auc(s, y, g, n_boot, seed), "pairs": int(labelled.sum())}
    m["engagement_auc_per_query"] = M.summary(M.per_query_auc(s, y, g), n_boot=n_boot, seed=seed)

    graded = ~np.isnan(judged.relevance)
    if graded.any():
        grades, gq, gs = judged.relevance[graded], judged.row_query[graded], scores[graded]
        low, high = float(grades.min()), float(grades.max())
        m[f"ndcg@{NDCG_K}"] = M.summary(M.ndcg_at_k(gs, grades, gq, k=NDCG_K, min_grade=low), n_boot=n_boot, seed=seed)
        middle = (low + high) / 2
        rel = (grades > middle).astype(np.int32)
        m["relevance_auc"] = {**_pooled_auc(gs, rel, gq, n_boot, seed), "relevant_above": middle, "grades": [low, high]}

    if hasattr(retriever, "engagement_probabilities") and labelled.any():
        p = retriever.engagement_probabilities(judged)[labelled]
        low, high = M.bootstrap_grouped(M.expected_calibration_error, g, p, y, n_boot=n_boot, seed=seed)
        m["engagement_ece"] = {"mean": _finite(M.expected_calibration_error(p, y)), "ci95": [_finite(low), _finite(high)],
                               "pairs": int(labelled.sum())}
        report["reliability"] = M.reliability_curve(p, y)

    hists = {"engaged": scores[judged.engaged == 1], "hard_negative": scores[judged.engaged == 0]}
    if hasattr(retriever, "random_pair_scores"):
        hists["random"] = retriever.random_pair_scores(judged, rng)
    report["_histograms"] = hists
    if in_batch_size and hasattr(retriever, "in_batch_recall_at_1"):
        per_batch = retriever.in_batch_recall_at_1(judged, in_batch_size, seed)
        if len(per_batch):
            m["in_batch_recall@1"] = {"mean": float(per_batch.mean()), "ci95": list(M.bootstrap_ci(per_batch, n_boot=n_boot, seed=seed)),
                                      "batch_size": in_batch_size, "batches": int(len(per_batch))}
    if truth is not None:  # last: a dense retriever then caches the ground-truth queries' vectors
        m.update(ground_truth_metrics(retriever, truth, n_boot, seed, tuple(judged.contexts)))
        report["ground_truth_queries"] = len(truth.queries)
    return report


def _pooled_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """ROC AUC over all pairs, its interval resampling whole queries; None where undefined (one class)."""
    auc = M.roc_auc(scores, labels)
    low, high = M.bootstrap_grouped(M.roc_auc, groups, scores, labels, n_boot=n_boot, seed=seed)
    return {"mean": _finite(auc), "ci95": [_finite(low), _finite(high)]}


def _finite(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def evaluate_run(run_dir: str, data_dir: str | None = None, split: str = "test", n_boot: int = 1000,
                 seed: int = 0, log=None) -> dict:
    """Evaluates a trained run on a split and writes `eval_dir(RUN, split)` (report.json, report.md, plots)."""
    log = log or _log
    retriever, data_dir, model = dense_retriever_for_run(run_dir, data_dir, log)
    judged = load_judged(split_path(data_dir, split), model.context_columns, model.image_dim or None)
    log(f"evaluating {retriever.name} on {split}: {len(judged.queries):,} queries, {len(judged.row_query):,} judged rows, "
        f"{len(retriever.product_ids):,} products; {n_boot} bootstrap resamples")
    start = time.perf_counter()
    report = evaluate(retriever, judged, n_boot=n_boot, seed=seed, in_batch_size=model.config.train.global_batch_size,
                      truth=split_ground_truth(data_dir, split))
    report.update({"run": os.path.abspath(run_dir), "data": os.path.abspath(data_dir), "split": split,
                   "engagement_weight": model.config.model.engagement_weight})
    write_report(report, eval_dir(run_dir, split))
    log(f"evaluated in {time.perf_counter() - start:.1f} s")
    return report


FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # the grid `compare --late-fusion` chooses w from
FUSION_SPLIT = "validation"  # ... on this split
FUSION_RECALL_K = 100  # ... by this Recall@K


def choose_fusion_weight(fusion: LateFusionRetriever, judged: Judged, weights=FUSION_WEIGHTS,
                         k: int = FUSION_RECALL_K) -> tuple[float, dict[float, float]]:
    """`(w, {weight: Recall@k})`: the weight of `weights` under which `fusion` (its own weight unused)
    finds the most engaged products of `judged` in its top k, the smallest on a tie; every weight is
    searched in one pass over the catalogue (`LateFusionRetriever.search_weights`)."""
    engaged = judged.engaged_sets
    recalls = {float(w): M.mean_defined(M.recall_at_k(ids, engaged, k))
               for w, ids in zip(weights, fusion.search_weights(judged, k, weights))}
    if all(np.isnan(r) for r in recalls.values()):
        raise InputError(f"{judged.path}: no engaged product to choose the fusion weight by; give --fusion-weight W")
    return max(recalls, key=lambda w: (recalls[w], -w)), recalls


def compare(runs: list[str], data_dir: str | None = None, split: str = "test", bm25: bool = False,
            out_dir: str | None = None, n_boot: int = 1000, seed: int = 0, hybrid: bool = False,
            pretrained: bool = False, late_fusion: bool = False, fusion_weight: float | None = None,
            max_tokens: int | None = None, text_cache: str | None = None, log=None) -> str:
    """One table of several runs (each evaluated on the same data and split), and baselines:

    * `bm25`: the BM25 baseline;
    * `hybrid`: one `HybridRetriever` row per run (the run's dense retrieval and BM25 fused by RRF,
      named `hybrid(<run>)`);
    * `pretrained`: zero-shot all-MiniLM-L6-v2 (`PretrainedRetriever`, `minilm (zero-shot)`), texts cut
      at `max_tokens` (default 64), its vectors read from and added to the `TextEmbeddingCache` under
      `text_cache` when given (the folder `minilm-L6-T64` a run with `train.text_cache` fills), else
      encoded in memory;
    * `late_fusion`: one `LateFusionRetriever` row per run, `late fusion: <run> + <w> × minilm`: its
      score q·d + w × MiniLM's cosine, w = `fusion_weight`, or when None the weight of
      `FUSION_WEIGHTS` with the best Recall@100 on the validation split (`choose_fusion_weight`).

    A run's saved report of the split is reused when it is of the same data and split (and has the
    ground-truth metrics when the split has ground truth); BM25 and MiniLM are built once for all rows.
    Returns the table, followed by a line per late-fusion row saying how its weight was set (also in
    its report: `fusion_weight`, and `fusion_weight_split`, `fusion_weight_recall@100` when chosen).
    """
    log = log or _log
    with_minilm = pretrained or late_fusion
    if hybrid and not runs:
        raise InputError("--hybrid needs run directories: it fuses each run's dense retrieval with BM25")
    if late_fusion and not runs:
        raise InputError("--late-fusion needs run directories: it adds zero-shot MiniLM's cosine to each run's score")
    if fusion_weight is not None and not late_fusion:
        raise InputError("--fusion-weight needs --late-fusion (it is the weight of MiniLM's cosine there)")
    if fusion_weight is not None and not (np.isfinite(fusion_weight) and fusion_weight >= 0):
        raise InputError(f"--fusion-weight ({fusion_weight}) must be a finite number >= 0")
    for flag, value in (("--max-tokens", max_tokens), ("--text-cache", text_cache)):
        if value is not None and not with_minilm:
            raise InputError(f"{flag} is an option of the MiniLM rows: it needs --pretrained or --late-fusion")
    max_tokens = MINILM_MAX_TOKENS if max_tokens is None else max_tokens
    if not 2 <= max_tokens <= PRETRAINED_MAX_TOKENS:
        raise InputError(f"--max-tokens ({max_tokens}) must be in [2, {PRETRAINED_MAX_TOKENS}] ([CLS] and [SEP] included)")
    if text_cache is not None and os.path.exists(text_cache) and not os.path.isdir(text_cache):
        raise InputError(f"--text-cache {text_cache} is a file; give a directory (it is created when missing)")

    reports = []
    for run in runs:
        report = _saved_report(run, data_dir, split)
        if report is not None and f"gt_recall@{GT_RECALL_K}" not in report["metrics"] \
                and split_ground_truth(data_dir or report.get("data") or "", split) is not None:
            report = None  # written before the ground-truth metrics existed: evaluate again
        if report is None:
            report = evaluate_run(run, data_dir, split, n_boot=n_boot, seed=seed)
        data_dir = data_dir or report.get("data")
        reports.append(report)
    flags = [flag for flag, on in (("--bm25", bm25), ("--hybrid", hybrid), ("--pretrained", pretrained),
                                   ("--late-fusion", late_fusion)) if on]
    if flags and not data_dir:
        raise InputError(f"{flags[0]} without runs needs --data DIR" if not runs else
                         f"{flags[0]} needs --data DIR (the runs' reports name no data set)")
    if late_fusion and fusion_weight is None and split != FUSION_SPLIT:
        try:
            split_path(data_dir, FUSION_SPLIT)
        except InputError as e:
            raise InputError(f"--late-fusion chooses its weight on the {FUSION_SPLIT} split: {e}; "
                             "give --fusion-weight W instead") from None
    lexical = BM25Retriever.for_data(data_dir) if bm25 or hybrid else None
    minilm = PretrainedRetriever.for_data(data_dir, max_tokens, text_cache, log=log) if with_minilm else None
    truth = split_ground_truth(data_dir, split) if flags else None
    about = {"data": os.path.abspath(data_dir), "split": split} if flags else {}
    baselines = [r for r, on in ((lexical, bm25), (minilm, pretrained)) if on]
    if baselines:
        judged = load_judged(split_path(data_dir, split), ())
        reports += [{**evaluate(r, judged, n_boot=n_boot, seed=seed, truth=truth), **about} for r in baselines]
    hybrids, fusions, notes = [], [], []
    for run in runs if hybrid or late_fusion else ():
        dense, _, model = dense_retriever_for_run(run, data_dir, log)
        about_run = {"run": os.path.abspath(run), **about}
        judged = load_judged(split_path(data_dir, split), model.context_columns, model.image_dim or None)
        if late_fusion:  # the weight first: it may search the validation split
            fusion, choice, note = _late_fusion(dense, minilm, fusion_weight, judged, data_dir, split, model, log)
            notes.append(note)
        if hybrid:
            hybrids.append({**evaluate(HybridRetriever(dense, lexical), judged, n_boot=n_boot, seed=seed, truth=truth),
                            **about_run})
        if late_fusion:
            fusions.append({**evaluate(fusion, judged, n_boot=n_boot, seed=seed, truth=truth), **about_run, **choice})
    reports += hybrids + fusions
    table = comparison_table(reports) + "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "compare.json"), "w", encoding="utf-8") as f:
            json.dump([public(r) for r in reports], f, indent=2)
        with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
            f.write(f"# {split} split of {data_dir}\n\n95% bootstrap intervals over queries.\n\n{table}")
        plot_recall_curves(reports, os.path.join(out_dir, "recall_at_k.png"))
    return table


def _late_fusion(dense, minilm, weight: float | None, judged: Judged, data_dir: str, split: str, model, log):
    """`(LateFusionRetriever, report fields, note)` of a run: its weight given, or chosen on the validation
    split (`judged` itself when that is the compared split)."""
    if weight is not None:
        fusion = LateFusionRetriever(dense, minilm, weight)
        return fusion, {"fusion_weight": weight}, f"{fusion.name}: w = {weight:g} given (--fusion-weight)"
    tuning = judged if split == FUSION_SPLIT else \
        load_judged(split_path(data_dir, FUSION_SPLIT), model.context_columns, model.image_dim or None)
    weight, recalls = choose_fusion_weight(LateFusionRetriever(dense, minilm, 0.0), tuning)
    fusion = LateFusionRetriever(dense, minilm, weight)
    tried = ", ".join(f"{w:g}: {r:.4f}" for w, r in recalls.items())
    note = (f"{fusion.name}: w = {weight:g} chosen on the {FUSION_SPLIT} split by Recall@{FUSION_RECALL_K} ({tried})"
            + (f"; the compared split is {FUSION_SPLIT} too, so the choice is in-sample" if split == FUSION_SPLIT else ""))
    log(note)
    return fusion, {"fusion_weight": weight, "fusion_weight_split": FUSION_SPLIT,
                    f"fusion_weight_recall@{FUSION_RECALL_K}": {f"{w:g}": r for w, r in recalls.items()}}, note


def _saved_report(run_dir: str, data_dir: str | None, split: str) -> dict | None:
    path = os.path.join(eval_dir(run_dir, split), "report.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    same_data = data_dir is None or report.get("data") == os.path.abspath(data_dir)
    return report if same_data and report.get("split") == split else None


# -- reports ---------------------------------------------------------------------------------------


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def write_report(report: dict, out_dir: str) -> None:
    """`report.json`, `report.md`, `recall_at_k.png`, `score_histograms.png` and (dense models)
    `reliability.png` in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(public(report), f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# Evaluation of {report['model']} on {report.get('split', 'the split')}\n\n")
        f.write(f"{report['queries']} queries ({report['queries_with_engaged']} with an engaged product), "
                f"{report['rows']} judged rows; 95% bootstrap intervals over queries.\n\n")
        if "ground_truth_queries" in report:
            f.write(f"gt_*: against the manifest's ground truth ({report['ground_truth_queries']} queries, each "
                    "searched with its searchers' most common country).\n\n")
        f.write(comparison_table([report]))
    plot_recall_curves([report], os.path.join(out_dir, "recall_at_k.png"))
    if "_histograms" in report:
        plot_histograms(report["_histograms"], report["model"], os.path.join(out_dir, "score_histograms.png"))
    if "reliability" in report:
        plot_reliability(report["reliability"], report["model"], report["metrics"]["engagement_ece"]["mean"],
                         os.path.join(out_dir, "reliability.png"))


TABLE_METRICS = ("recall@10", "recall@100", "recall@1000", "mrr", "engagement_auc_pooled", "engagement_auc_per_query",
                 "engagement_ece", f"ndcg@{NDCG_K}", "relevance_auc", "in_batch_recall@1", f"gt_recall@{GT_RECALL_K}", f"gt_ndcg@{NDCG_K}")


def comparison_table(reports: list[dict]) -> str:
    """A Markdown table: one row per model, one column per metric (mean [95% interval])."""
    present = [m for m in TABLE_METRICS if any(m in r["metrics"] for r in reports)]
    lines = ["| model | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for r in reports:
        cells = []
        for name in present:
            value = r["metrics"].get(name)
            cells.append(_cell(value))
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: dict | None) -> str:
    if value is None or value["mean"] is None:
        return "–"
    if value["ci95"][0] is None:
        return f"{value['mean']:.4f}"
    return f"{value['mean']:.4f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"


def plot_recall_curves(reports: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        ax.plot(r["recall_curve"]["k"], r["recall_curve"]["recall"], marker="o", label=r["model"])
    ax.set(xscale="log", xlabel="K", ylabel="Recall@K of engaged products", title="Full-catalogue Recall@K", ylim=(0, 1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(histograms: dict[str, np.ndarray], model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in histograms.items():
        if len(values):
            ax.hist(values, bins=50, density=True, histtype="step", linewidth=1.5, label=f"{name} ({len(values)})")
    ax.set(xlabel="score", ylabel="density", title=f"Scores of {model}: engaged, hard-negative, random pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(curve: dict, model: str, ece: float | None, path: str) -> None:
    """The reliability diagram of the engagement probability: observed engaged rate per bin vs its mean
    prediction (the diagonal is perfect calibration), with each bin's share of pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    filled = [(m, o) for m, o in zip(curve["mean_predicted"], curve["observed"]) if m is not None]
    if filled:
        ax.plot(*zip(*filled), marker="o", label=f"{model} (ECE {ece:.3f})" if ece is not None else model)
    total = max(1, sum(curve["count"]))
    edges = curve["edges"]
    ax.bar(edges[:-1], [c / total for c in curve["count"]], width=edges[1] - edges[0], align="edge", alpha=0.2,
           color="tab:blue", label="share of pairs")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted engagement probability", ylabel="observed engaged rate",
           title="Reliability of the engagement probability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
