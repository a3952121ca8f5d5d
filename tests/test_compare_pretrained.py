"""`q2e compare --pretrained / --late-fusion`: zero-shot all-MiniLM-L6-v2 and its late fusion with a run.

The zero-shot retriever on a hand-made catalogue whose right answers a person
can tell (a wrong encoder, tokenizer or product text fails them); the late
fusion's arithmetic on stub retrievers; the command end to end, with a text
cache and with a trained run (slow).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from tf_q2e.cli import main
from tf_q2e.evaluate import FUSION_WEIGHTS, choose_fusion_weight, compare
from tf_q2e.errors import InputError
from tf_q2e.judged import Judged, load_judged
from tf_q2e.retrievers import LateFusionRetriever, PretrainedRetriever, dense_retriever_for_run

from conftest import train_tiny_run, write_rows

# Distinct products of a home-improvement store, and queries whose right product a person can tell.
PRODUCTS = [
    ("P0", "Grey jute area rug 5x8", "Hand-woven natural jute rug in grey, 5 ft by 8 ft."),
    ("P1", "Cordless drill driver 18V", "Brushless 18-volt drill with two batteries and a charger."),
    ("P2", "Stainless steel kitchen sink", "Undermount single bowl sink, 16 gauge stainless steel."),
    ("P3", "LED ceiling light fixture", "Flush mount LED light, 3000K warm white, dimmable."),
    ("P4", "Queen memory foam mattress", "10-inch gel memory foam mattress, queen size."),
    ("P5", "Garden hose 50 ft", "Kink-free rubber garden hose with brass fittings."),
    ("P6", "Ceramic coffee mug set", "Set of four 12 oz ceramic mugs, dishwasher safe."),
    ("P7", "Cast iron skillet 12 inch", "Pre-seasoned cast iron frying pan for stove and oven."),
]
QUERIES = {"jute rug": "P0", "18v cordless drill": "P1", "kitchen sink stainless": "P2", "ceiling light led": "P3",
           "mattress memory foam queen": "P4", "hose for the garden": "P5", "coffee mugs": "P6", "cast iron pan": "P7",
           "Cordless drill driver 18V": "P1", "Queen memory foam mattress": "P4"}  # the last two: titles verbatim

def _product(pid: str, title: str, description: str) -> dict:
    return {"product_id": pid, "product_title": title, "product_description": description, "product_category": "home"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """The hand-made catalogue; test split: each query engaged with its product, a hard negative the next one."""
    data = tmp_path_factory.mktemp("store")
    catalog = [_product(*p) for p in PRODUCTS]
    write_rows(catalog, str(data / "catalog.parquet"))
    rows = []
    for query, pid in QUERIES.items():
        i = int(pid[1:])
        for j, engaged in ((i, 1), ((i + 1) % len(PRODUCTS), 0)):
            rows.append({"query": query, "query_country": "US", **catalog[j], "engaged": engaged})
    write_rows(rows, str(data / "train.parquet"))
    write_rows(rows, str(data / "test.parquet"))
    return str(data)


@pytest.fixture(scope="module")
def zero_shot(store) -> PretrainedRetriever:
    return PretrainedRetriever.for_data(store, log=lambda line: None)


def test_zero_shot_finds_the_product_a_person_would(zero_shot, store):
    judged = load_judged(os.path.join(store, "test.parquet"))
    top = zero_shot.search(judged, 3)
    assert top.shape == (len(QUERIES), 3)
    assert {q: top[i, 0] for i, q in enumerate(judged.queries)} == QUERIES
    # Pair scores are the cosine of the query's and of "title description"'s all-MiniLM-L6-v2 vectors (the
    # product tower's text), computed here without the retriever; the cache rounds them to float16.
    from tf_q2e.pretrained.bert import SentenceEncoder
    from tf_q2e.pretrained.files import MiniLMFiles

    encoder = SentenceEncoder.from_files(MiniLMFiles.locate(), max_tokens=64)
    text = {pid: f"{title} {description}" for pid, title, description in PRODUCTS}
    q = encoder(np.array(judged.queries)[judged.row_query]).numpy()
    d = encoder(np.array([text[p] for p in judged.row_product])).numpy()
    scores = zero_shot.score_pairs(judged)
    np.testing.assert_allclose(scores, np.einsum("rd,rd->r", q, d), atol=2e-3)
    assert scores[judged.engaged == 1].min() > 0.4 > scores[judged.engaged == 0].max()
    random = zero_shot.random_pair_scores(judged, np.random.default_rng(0))
    assert random.shape == scores.shape and np.all(np.abs(random) <= 1 + 1e-5)


class StubScores:
    """A retriever with hand-set full-catalogue scores [Q, N] (pair scores: the same, plus `bias`)."""

    def __init__(self, name, product_ids, scores, bias=0.0):
        self.name, self.bias = name, bias
        self.product_ids = np.array(product_ids, dtype=object)
        self.scores = np.asarray(scores, dtype=np.float32)

    def catalogue_scores(self, judged, start, stop):
        return self.scores[start:stop]

    def pair_scores(self, judged, product_ids):
        column = {p: i for i, p in enumerate(self.product_ids)}
        return self.scores[judged.row_query, [column[p] for p in product_ids]] + np.float32(self.bias)

    def ranking(self, k):
        return self.product_ids[np.argsort(-self.scores, axis=1, kind="stable")[:, :k]]


def _judged(rows, engaged):
    queries = [f"q{i}" for i in range(max(q for q, _ in rows) + 1)]
    return Judged(queries=queries, contexts={}, row_query=np.array([q for q, _ in rows]),
                  row_product=np.array([p for _, p in rows], dtype=object), engaged=np.array(engaged),
                  relevance=np.full(len(rows), np.nan), path="split")


def _stubs():
    rng = np.random.default_rng(5)
    ids = [f"P{i}" for i in range(30)]
    dense = StubScores("run", ids, rng.normal(size=(70, 30)), bias=0.5)
    order = rng.permutation(30)  # MiniLM's catalogue in another order: the fusion matches products by id
    cosine = np.stack([rng.permutation(np.linspace(-1, 1, 30)) for _ in range(70)])  # gaps of 0.07: no near-ties
    minilm = StubScores("minilm", [ids[i] for i in order], cosine[:, order])
    return dense, minilm, cosine


def test_late_fusion_runs_from_the_runs_ranking_to_zero_shots():
    dense, minilm, cosine = _stubs()
    judged = _judged([(q, f"P{(q * 7) % 30}") for q in range(70)], engaged=[1] * 70)
    # 70 queries: two chunks of full-catalogue scores (_RANK_CHUNK = 64).
    assert LateFusionRetriever(dense, minilm, 0.0).search(judged, 10).tolist() == dense.ranking(10).tolist()
    assert LateFusionRetriever(dense, minilm, 1e6).search(judged, 10).tolist() == minilm.ranking(10).tolist()
    fusion = LateFusionRetriever(dense, minilm, 2.0)
    assert fusion.name == "late fusion: run + 2 × minilm"
    expected = dense.scores + 2 * cosine.astype(np.float32)
    np.testing.assert_allclose(fusion.catalogue_scores(judged, 0, 70), expected, atol=1e-6)
    assert fusion.search(judged, 50).shape == (70, 30)  # k is capped at the catalogue
    rows = judged.row_product
    np.testing.assert_allclose(fusion.score_pairs(judged),
                               expected[np.arange(70), [int(p[1:]) for p in rows]] + 0.5, atol=1e-6)  # + b_q
    many = fusion.search_weights(judged, 5, [0.0, 2.0, 1e6])
    assert [m.tolist() for m in many] == [dense.ranking(5).tolist(), fusion.search(judged, 5).tolist(),
                                          minilm.ranking(5).tolist()]
    with pytest.raises(ValueError, match="different catalogues"):
        LateFusionRetriever(dense, StubScores("minilm", [f"X{i}" for i in range(30)], cosine), 1.0)
    with pytest.raises(ValueError, match="fusion weight"):
        LateFusionRetriever(dense, minilm, -1.0)


def test_the_fusion_weight_is_the_grids_best_recall_smallest_on_a_tie():
    ids = ["A", "B", "C"]
    # q0 engages C, which the run ranks last and MiniLM first: C (0.25 + w) tops A (1) for w > 0.75.
    dense = StubScores("run", ids, [[1.0, 0.5, 0.25]])
    minilm = StubScores("minilm", ids, [[0.0, 0.0, 1.0]])
    judged = _judged([(0, "C")], engaged=[1])
    weight, recalls = choose_fusion_weight(LateFusionRetriever(dense, minilm, 0.0), judged, k=1)
    assert weight == 1.0  # 1, 2 and 4 all find C; the smallest wins
    assert list(recalls) == list(FUSION_WEIGHTS) and [recalls[w] for w in (0.5, 1.0, 4.0)] == [0.0, 1.0, 1.0]
    with pytest.raises(InputError, match="no engaged product"):
        choose_fusion_weight(LateFusionRetriever(dense, minilm, 0.0), _judged([(0, "C")], engaged=[0]), k=1)


def test_text_cache_is_filled_once_and_shared(store, tmp_path, capsys):
    from tf_q2e.pretrained.cache import TextEmbeddingCache, text_keys
    from tf_q2e.pretrained.modality import product_texts
    from tf_q2e.bm25 import read_catalog

    cache = str(tmp_path / "text_cache")
    args = ["compare", "--pretrained", "--data", store, "--bootstrap", "10", "--text-cache", cache]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "minilm (zero-shot)" in first.out and "8 encoded now" in first.err  # the 8 product texts
    parts = sorted(glob.glob(os.path.join(cache, "minilm-L6-T64", "part-*")))
    assert len(parts) == 4  # product texts, then queries: two parts of keys and vectors
    # The keys are those `q2e train` looks up (model.text_encoder=minilm, train.text_cache=DIR): the
    # product tower's texts and the raw queries.
    stored = TextEmbeddingCache.open(cache, "minilm-L6-T64")
    expected = text_keys(product_texts(read_catalog(store)) + list(QUERIES))
    assert sorted(stored.keys.tolist()) == sorted(expected.tolist())

    assert main(args) == 0
    again = capsys.readouterr()
    assert again.err.count("0 encoded now") == 2 and "encoded 8/8" not in again.err
    assert sorted(glob.glob(os.path.join(cache, "minilm-L6-T64", "part-*"))) == parts
    assert again.out == first.out
    assert main(args[:-2]) == 0  # in memory: the same vectors, so the same table
    assert capsys.readouterr().out == first.out


def test_bad_options_are_clear_errors(store, tmp_path, capsys):
    def error(*args) -> str:
        assert main(["compare", *args]) == 2
        return capsys.readouterr().err

    assert "--late-fusion needs runs" in error("--late-fusion")
    assert "--late-fusion needs run directories" in error("--late-fusion", "--pretrained", "--data", store)
    assert "--pretrained without runs needs --data" in error("--pretrained")
    assert "--fusion-weight needs --late-fusion" in error("--pretrained", "--data", store, "--fusion-weight", "1")
    assert "--max-tokens (1) must be in [2, 512]" in error("--pretrained", "--data", store, "--max-tokens", "1")
    assert "--text-cache is an option of the MiniLM rows" in error("--bm25", "--data", store, "--text-cache", "x")
    (tmp_path / "file").write_text("")
    assert "is a file" in error("--pretrained", "--data", store, "--text-cache", str(tmp_path / "file"))
    with pytest.raises(InputError, match="finite number >= 0"):
        compare(["run"], store, late_fusion=True, fusion_weight=float("nan"))
    with pytest.raises(InputError, match="finite number >= 0"):
        compare(["run"], store, late_fusion=True, fusion_weight=-1.0)


# -- with a trained run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run, its data set and a text cache that the tests share (so each text is encoded once)."""
    return (*train_tiny_run(tmp_path_factory), str(tmp_path_factory.mktemp("text_cache")))


@pytest.mark.slow
def test_late_fusion_of_a_run_with_zero_weight_is_the_run_and_with_a_huge_one_zero_shot(run):
    run_dir, data, cache = run
    dense, _, model = dense_retriever_for_run(run_dir)
    minilm = PretrainedRetriever.for_data(data, cache_root=cache, log=lambda line: None)
    judged = load_judged(os.path.join(data, "test.parquet"), model.context_columns)
    off = LateFusionRetriever(dense, minilm, 0.0)
    assert off.search(judged, 20).tolist() == dense.search(judged, 20).tolist()
    np.testing.assert_array_equal(off.score_pairs(judged), dense.score_pairs(judged))
    # A huge weight ranks by the cosine: the same cosines, best first, as zero-shot's list (products of equal
    # text tie there, and the run's score orders them).
    huge = LateFusionRetriever(dense, minilm, 1e6).search(judged, 10)
    alone = minilm.search(judged, 10)
    queries = minilm.query_vectors(judged)[0]
    cosines = [np.einsum("qkd,qd->qk", minilm.vectors[np.vectorize(minilm.position.get)(ids)], queries)
               for ids in (huge, alone)]
    np.testing.assert_allclose(*cosines, atol=1e-6)


@pytest.mark.slow
def test_q2e_compare_with_zero_shot_and_late_fusion(run, tmp_path, capsys):
    run_dir, data, cache = run
    out = tmp_path / "cmp"
    assert main(["compare", run_dir, "--pretrained", "--late-fusion", "--text-cache", cache, "--out", str(out),
                 "--bootstrap", "10"]) == 0
    captured = capsys.readouterr()
    with open(out / "compare.json") as f:
        reports = json.load(f)
    name = os.path.basename(run_dir)
    weight = reports[2]["fusion_weight"]
    assert [r["model"] for r in reports] == [name, "minilm (zero-shot)", f"late fusion: {name} + {weight:g} × minilm"]
    table = captured.out.splitlines()
    assert [line.split("|")[1].strip() for line in table[2:5]] == [r["model"] for r in reports]
    fusion = reports[2]
    assert weight in FUSION_WEIGHTS and fusion["fusion_weight_split"] == "validation"
    recalls = fusion["fusion_weight_recall@100"]
    assert list(recalls) == [f"{w:g}" for w in FUSION_WEIGHTS] and recalls[f"{weight:g}"] == max(recalls.values())
    note = f"w = {weight:g} chosen on the validation split by Recall@100"
    assert note in captured.out and note in (out / "compare.md").read_text() and "in-sample" not in captured.out
    for report in reports[1:]:
        m = report["metrics"]
        assert 0 <= m["recall@10"]["mean"] <= m["recall@100"]["mean"] <= 1 and "gt_recall@100" in m
        assert "engagement_auc_per_query" in m and "in_batch_recall@1" not in m

    # On the validation split the choice is in-sample, and says so; a given weight 0 is the run itself.
    assert main(["compare", run_dir, "--late-fusion", "--split", "validation", "--text-cache", cache,
                 "--bootstrap", "10"]) == 0
    assert "the compared split is validation too, so the choice is in-sample" in capsys.readouterr().out
    assert main(["compare", run_dir, "--late-fusion", "--fusion-weight", "0", "--text-cache", cache,
                 "--bootstrap", "10", "--out", str(out)]) == 0
    assert "w = 0 given (--fusion-weight)" in capsys.readouterr().out
    with open(out / "compare.json") as f:
        own, fused = json.load(f)
    assert fused["model"] == f"late fusion: {name} + 0 × minilm" and "fusion_weight_split" not in fused
    for metric in ("recall@10", "recall@100", "mrr", "engagement_auc_pooled", "engagement_auc_per_query", "ndcg@10"):
        assert fused["metrics"][metric]["mean"] == pytest.approx(own["metrics"][metric]["mean"], abs=1e-9), metric
