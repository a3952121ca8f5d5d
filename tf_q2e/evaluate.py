"""The multitask evaluation: does retrieval return what people engage with, and stay relevant?

`evaluate_run(RUN)` scores a held-out split (by query) of a data set with a
retriever and writes `RUN/eval/report.json`, `report.md` and plots. A
retriever is anything with `search` and `score_pairs` (`DenseRetriever` for a
trained run, `tf_q2e.bm25.BM25Retriever` for the lexical baseline), so every
model goes through the same code and the same metrics:

* retrieval: full-catalogue Recall@K (K = 10, 100, 1000) of each query's
  engaged products (Que2Search's KNN recall), averaged over queries with at
  least one engaged product; MRR of the first engaged product in the top 1000;
* engagement: ROC AUC of the score for engaged vs hard-negative pairs, pooled
  over all pairs and averaged per query (queries with both classes);
* relevance, where graded labels exist: NDCG@10 over each query's judged
  products with gain = grade − the scale's lowest grade, and ROC AUC of
  relevant (grade above the scale's midpoint) vs irrelevant pairs;
* in-batch recall@1 (Que2Search's batch metric; dense models only): the split
  in batches of `train.global_batch_size` rows in a seeded random order, each
  row's query against the batch's products, same-product copies masked;
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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e import metrics as M
from tf_q2e.data import schema as S
from tf_q2e.data.validate import Validator, dataset_files
from tf_q2e.errors import InputError

EVAL_DIR = "eval"
RECALL_KS = (10, 100, 1000)
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
NDCG_K = 10


@dataclass
class Judged:
    """A labelled split grouped by query: distinct queries, and one entry per judged row."""

    queries: list[str]  # distinct query texts
    contexts: dict[str, list[str]]  # query context column -> value per distinct query
    row_query: np.ndarray  # [R] index into `queries`
    row_product: np.ndarray  # [R] product id (object)
    engaged: np.ndarray  # [R] 1, 0 or -1
    relevance: np.ndarray  # [R] float, NaN when not graded
    path: str

    @property
    def engaged_sets(self) -> list[set[str]]:
        sets: list[set[str]] = [set() for _ in self.queries]
        for q, p in zip(self.row_query[self.engaged == 1], self.row_product[self.engaged == 1]):
            sets[q].add(p)
        return sets


def load_judged(path: str, context_columns: tuple[str, ...] = (), image_dim: int | None = None) -> Judged:
    """Reads a split file (checked as in `q2e validate`) into a `Judged`; queries keyed by text + context."""
    validator = Validator("error", image_dim=image_dim, context_columns=tuple(context_columns))
    columns = [S.QUERY, *context_columns, S.PRODUCT_ID, S.ENGAGED]
    tables = []
    for table in validator.iter_file(path, "impressions"):
        keep = columns + ([S.RELEVANCE] if S.RELEVANCE in table.column_names else [])
        tables.append(table.select(keep))
    if not tables:
        raise InputError(f"{path}: no rows to evaluate")
    table = pa.concat_tables(tables, promote_options="default")
    keys = table.select([S.QUERY, *context_columns])
    distinct = keys.group_by(keys.column_names).aggregate([]).sort_by([(c, "ascending") for c in keys.column_names])
    index = {tuple(row.values()): i for i, row in enumerate(distinct.to_pylist())}
    row_query = np.fromiter((index[tuple(r.values())] for r in keys.to_pylist()), dtype=np.int64, count=table.num_rows)
    relevance = (table.column(S.RELEVANCE).to_numpy(zero_copy_only=False).astype(np.float64)
                 if S.RELEVANCE in table.column_names else np.full(table.num_rows, np.nan))
    return Judged(
        queries=distinct.column(S.QUERY).to_pylist(),
        contexts={c: distinct.column(c).to_pylist() for c in context_columns},
        row_query=row_query,
        row_product=table.column(S.PRODUCT_ID).to_numpy(zero_copy_only=False).astype(object),
        engaged=pc.cast(table.column(S.ENGAGED), pa.int32()).to_numpy(),
        relevance=relevance,
        path=path,
    )


class DenseRetriever:
    """A trained run's towers: exact search over the catalogue's product vectors."""

    def __init__(self, model, product_ids: np.ndarray, vectors: np.ndarray, name: str = "dense"):
        import tensorflow as tf

        self.name = name
        self.model = model
        self.product_ids = np.asarray(product_ids, dtype=object)
        self.vectors = vectors
        self.position = {p: i for i, p in enumerate(self.product_ids)}
        self._tf = tf
        self._cached: tuple[Judged, np.ndarray] | None = None  # the last split's query vectors

    def query_vectors(self, judged: Judged, batch: int = 1024) -> np.ndarray:
        tf = self._tf
        out = []
        for start in range(0, len(judged.queries), batch):
            features = {S.QUERY: tf.constant(judged.queries[start:start + batch])}
            features.update({c: tf.constant(v[start:start + batch]) for c, v in judged.contexts.items()})
            out.append(self.model.query_tower(features, training=False).numpy())
        return np.concatenate(out).astype(np.float32)

    def search(self, judged: Judged, k: int) -> np.ndarray:
        from tf_q2e.index import exact_top_k

        _, rows = exact_top_k(self.vectors, self._queries(judged), k)
        return self.product_ids[rows]

    def score_pairs(self, judged: Judged) -> np.ndarray:
        rows = self._rows(judged.row_product)
        return np.einsum("rd,rd->r", self._queries(judged)[judged.row_query], self.vectors[rows])

    def random_pair_scores(self, judged: Judged, rng: np.random.Generator) -> np.ndarray:
        products = rng.integers(0, len(self.vectors), size=len(judged.row_query))
        return np.einsum("rd,rd->r", self._queries(judged)[judged.row_query], self.vectors[products])

    def in_batch_recall_at_1(self, judged: Judged, batch_size: int, seed: int = 0) -> np.ndarray:
        """Per batch: the share of rows whose own product scores highest among the batch's products."""
        order = np.random.default_rng(seed).permutation(len(judged.row_query))
        queries = self._queries(judged)
        rows = self._rows(judged.row_product)
        values = []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            b = order[start:start + batch_size]
            scores = queries[judged.row_query[b]] @ self.vectors[rows[b]].T
            ids = judged.row_product[b]
            same = ids[:, None] == ids[None, :]
            np.fill_diagonal(same, False)
            scores[same] = -np.inf  # accidental hits: another copy of the row's product is not a negative
            values.append(np.mean(np.argmax(scores, axis=1) == np.arange(len(b))))
        return np.array(values)

    def _queries(self, judged: Judged) -> np.ndarray:
        """The split's query vectors, computed once for search, pair scores and in-batch recall."""
        if self._cached is None or self._cached[0] is not judged:
            self._cached = (judged, self.query_vectors(judged))
        return self._cached[1]

    def _rows(self, product_ids: np.ndarray) -> np.ndarray:
        try:
            return np.fromiter((self.position[p] for p in product_ids), dtype=np.int64, count=len(product_ids))
        except KeyError as e:
            raise InputError(f"product {e.args[0]!r} of the evaluated split is not in the catalogue") from None


class BM25Retriever:
    """The lexical baseline (`tf_q2e.bm25.BM25Index`) behind the evaluator's interface.

    The query context plays no part (BM25 sees the query text only).
    """

    def __init__(self, index, name: str = "bm25"):
        self.name = name
        self.index = index

    @classmethod
    def for_data(cls, data_dir: str, on_bad_rows: str = "error") -> "BM25Retriever":
        from tf_q2e.bm25 import BM25Index

        catalog, _ = dataset_files(data_dir)
        return cls(BM25Index.from_catalog(catalog, on_bad_rows=on_bad_rows))

    def search(self, judged: Judged, k: int) -> np.ndarray:
        return self.index.search(judged.queries, k)[0]

    def score_pairs(self, judged: Judged) -> np.ndarray:
        return self.index.score_pairs([judged.queries[q] for q in judged.row_query], list(judged.row_product))

    def random_pair_scores(self, judged: Judged, rng: np.random.Generator) -> np.ndarray:
        ids = self.index.product_ids
        products = [ids[i] for i in rng.integers(0, len(ids), size=len(judged.row_query))]
        return self.index.score_pairs([judged.queries[q] for q in judged.row_query], products)


def evaluate(retriever, judged: Judged, ks=RECALL_KS, n_boot: int = 1000, seed: int = 0,
             in_batch_size: int | None = None) -> dict:
    """Every metric of the module docstring for one retriever on one split, with 95% bootstrap intervals."""
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

    hists = {"engaged": scores[judged.engaged == 1], "hard_negative": scores[judged.engaged == 0]}
    if hasattr(retriever, "random_pair_scores"):
        hists["random"] = retriever.random_pair_scores(judged, rng)
    report["_histograms"] = hists
    if in_batch_size and hasattr(retriever, "in_batch_recall_at_1"):
        per_batch = retriever.in_batch_recall_at_1(judged, in_batch_size, seed)
        if len(per_batch):
            m["in_batch_recall@1"] = {"mean": float(per_batch.mean()), "ci95": list(M.bootstrap_ci(per_batch, n_boot=n_boot, seed=seed)),
                                      "batch_size": in_batch_size, "batches": int(len(per_batch))}
    return report


def _pooled_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """ROC AUC over all pairs, its interval resampling whole queries; None where undefined (one class)."""
    auc = M.roc_auc(scores, labels)
    low, high = M.bootstrap_grouped(M.roc_auc, groups, scores, labels, n_boot=n_boot, seed=seed)
    return {"mean": _finite(auc), "ci95": [_finite(low), _finite(high)]}


def _finite(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def dense_retriever_for_run(run_dir: str, data_dir: str | None = None, log=None):
    """`(retriever, data_dir, model)` of a run: its product vectors from `RUN/index/` when that index
    covers the data set's catalogue, else embedded now."""
    from tf_q2e.index import INDEX_DIR, META_FILE, embed_catalog, load_index
    from tf_q2e.train import load_model

    model = load_model(run_dir)
    data_dir = data_dir or model.config.data.dir
    if not data_dir:
        raise InputError(f"{run_dir}: the run's config names no data set; pass --data DIR")
    catalog, _ = dataset_files(data_dir)
    index = load_index(run_dir) if os.path.exists(os.path.join(run_dir, INDEX_DIR, META_FILE)) else None
    if index is not None and index.meta.get("catalog") == os.path.abspath(catalog):
        ids, vectors = index.product_ids, index.vectors
    else:
        (log or _log)(f"embedding the catalogue {catalog} (no index of it in {run_dir})")
        ids, _, vectors = embed_catalog(model, catalog, model.config.index.batch_size, model.config.data.on_bad_rows)
    name = os.path.basename(os.path.normpath(run_dir))
    return DenseRetriever(model, ids, vectors, name=name), data_dir, model


def evaluate_run(run_dir: str, data_dir: str | None = None, split: str = "test", n_boot: int = 1000,
                 seed: int = 0, log=None) -> dict:
    """Evaluates a trained run on a split and writes `RUN/eval/` (report.json, report.md, plots)."""
    log = log or _log
    retriever, data_dir, model = dense_retriever_for_run(run_dir, data_dir, log)
    judged = load_judged(_split_path(data_dir, split), model.context_columns, model.image_dim or None)
    report = evaluate(retriever, judged, n_boot=n_boot, seed=seed, in_batch_size=model.config.train.global_batch_size)
    report.update({"run": os.path.abspath(run_dir), "data": os.path.abspath(data_dir), "split": split,
                   "engagement_weight": model.config.model.engagement_weight})
    write_report(report, os.path.join(run_dir, EVAL_DIR))
    return report


def compare(runs: list[str], data_dir: str | None = None, split: str = "test", bm25: bool = False,
            out_dir: str | None = None, n_boot: int = 1000, seed: int = 0) -> str:
    """One table of several runs (each evaluated on the same data and split) and, with `bm25`, the
    BM25 baseline. A run's `RUN/eval/report.json` is reused when it is of the same data and split."""
    reports = []
    for run in runs:
        report = _saved_report(run, data_dir, split)
        if report is None:
            report = evaluate_run(run, data_dir, split, n_boot=n_boot, seed=seed)
        data_dir = data_dir or report["data"]
        reports.append(report)
    if bm25:
        if not data_dir:
            raise InputError("--bm25 without runs needs --data DIR")
        judged = load_judged(_split_path(data_dir, split), ())
        report = evaluate(BM25Retriever.for_data(data_dir), judged, n_boot=n_boot, seed=seed)
        report.update({"data": os.path.abspath(data_dir), "split": split})
        reports.append(report)
    table = comparison_table(reports)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "compare.json"), "w", encoding="utf-8") as f:
            json.dump([public(r) for r in reports], f, indent=2)
        with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
            f.write(f"# {split} split of {data_dir}\n\n95% bootstrap intervals over queries.\n\n{table}")
        plot_recall_curves(reports, os.path.join(out_dir, "recall_at_k.png"))
    return table


def _saved_report(run_dir: str, data_dir: str | None, split: str) -> dict | None:
    path = os.path.join(run_dir, EVAL_DIR, "report.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    same_data = data_dir is None or report.get("data") == os.path.abspath(data_dir)
    return report if same_data and report.get("split") == split else None


def _split_path(data_dir: str, split: str) -> str:
    _, splits = dataset_files(data_dir)
    if split not in splits:
        raise InputError(f"{data_dir}: no {split} split (found: {', '.join(splits)})")
    return splits[split]


# -- reports ---------------------------------------------------------------------------------------


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def write_report(report: dict, out_dir: str) -> None:
    """`report.json`, `report.md`, `recall_at_k.png` and `score_histograms.png` in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(public(report), f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# Evaluation of {report['model']} on {report.get('split', 'the split')}\n\n")
        f.write(f"{report['queries']} queries ({report['queries_with_engaged']} with an engaged product), "
                f"{report['rows']} judged rows; 95% bootstrap intervals over queries.\n\n")
        f.write(comparison_table([report]))
    plot_recall_curves([report], os.path.join(out_dir, "recall_at_k.png"))
    if "_histograms" in report:
        plot_histograms(report["_histograms"], report["model"], os.path.join(out_dir, "score_histograms.png"))


TABLE_METRICS = ("recall@10", "recall@100", "recall@1000", "mrr", "engagement_auc_pooled", "engagement_auc_per_query",
                 f"ndcg@{NDCG_K}", "relevance_auc", "in_batch_recall@1")


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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
