"""The BM25 baseline on a catalogue small enough to know every answer by construction."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pytest

from conftest import good_impressions, write_dataset, write_rows
from tf_q2e.bm25 import BM25Index, product_texts

CATALOG = [
    # id, title, description, category
    ("P1", "Brass Table Lamp", "A lamp for the desk", "Lighting"),
    ("P2", "Floor Lamp with LED bulb", "", "Lighting"),
    ("P3", "Cordless Drill", "18V drill with battery", "Tools"),
    ("P4", "Garden Hose 50 ft", "", "Outdoor"),
    ("P5", "Walnut Coffee Table", "", "Furniture"),
    ("P6", "Ceramic Vase Stand", "", "Decor"),
]


def catalog_table(rows=CATALOG) -> pa.Table:
    ids, titles, descriptions, categories = (list(c) for c in zip(*rows))
    return pa.table({"product_id": ids, "product_title": titles,
                     "product_description": descriptions, "product_category": categories})


@pytest.fixture(scope="module")
def index() -> BM25Index:
    return BM25Index.from_catalog(catalog_table())


def positive_ids(ids_row, scores_row) -> list[str]:
    return [p for p, s in zip(ids_row, scores_row) if s > 0]


def test_exact_term_match_ranks_first_and_non_matches_are_blank(index):
    ids, scores = index.search(["cordless drill"], k=3)
    assert ids.shape == scores.shape == (1, 3)
    assert scores.dtype == np.float32
    assert ids[0].tolist() == ["P3", "", ""]
    assert scores[0, 0] > 0 and scores[0, 1:].tolist() == [0.0, 0.0]


def test_results_are_best_first(index):
    ids, scores = index.search(["table lamp"], k=6)
    # P1 has both terms (and "lamp" twice); P2 and P5 have one each.
    assert ids[0, 0] == "P1"
    assert set(ids[0, 1:3]) == {"P2", "P5"}
    assert list(scores[0]) == sorted(scores[0], reverse=True)
    assert (scores[0, :3] > 0).all() and (ids[0, 3:] == "").all()


def test_stemming_matches_plural_to_singular(index):
    ids, scores = index.search(["lamps"], k=6)
    assert set(positive_ids(ids[0], scores[0])) == {"P1", "P2"}
    assert index.analyze(["Lamps", "bulbs"]) == [["lamp"], ["bulb"]]


def test_stop_words_are_ignored(index):
    with_stop = index.score_pairs(["the drill for a"] * 6, [p[0] for p in CATALOG])
    without = index.score_pairs(["drill"] * 6, [p[0] for p in CATALOG])
    np.testing.assert_array_equal(with_stop, without)
    # "with" is in P2's and P3's texts, "for" in P1's: neither matches anything.
    ids, scores = index.search(["with", "for the"], k=4)
    assert (ids == "").all() and (scores == 0).all()


def test_unknown_and_empty_queries_give_blank_rows(index):
    ids, scores = index.search(["zzqx frobnicator", "", "lamp"], k=2)
    assert ids.shape == (3, 2)
    assert ids[:2].tolist() == [["", ""], ["", ""]]
    assert (scores[:2] == 0).all()
    assert set(ids[2]) == {"P1", "P2"}  # a blank row does not disturb its neighbours


def test_k_above_catalogue_size_is_capped_and_tail_is_blank(index):
    ids, scores = index.search(["lamp", "drill"], k=50)
    assert ids.shape == scores.shape == (2, len(CATALOG))
    assert sorted(positive_ids(ids[0], scores[0])) == ["P1", "P2"]
    assert (ids[0, 2:] == "").all() and (scores[0, 2:] == 0).all()
    assert positive_ids(ids[1], scores[1]) == ["P3"]
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(["lamp"], k=0)


def test_score_pairs_equals_search_scores(index):
    queries = ["table lamp", "drill battery", "walnut table", "garden hose ft"]
    ids, scores = index.search(queries, k=6)
    pairs = [(q, p, s) for q, row, srow in zip(queries, ids, scores) for p, s in zip(row, srow) if p]
    assert len(pairs) == 3 + 1 + 2 + 1
    got = index.score_pairs([q for q, _, _ in pairs], [p for _, p, _ in pairs])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([s for _, _, s in pairs], np.float32))
    # A judged pair that shares no term scores 0.
    assert index.score_pairs(["drill"], ["P6"]).tolist() == [0.0]


def test_score_matches_the_lucene_bm25_formula(index):
    # The analysed length of each product, and P3's "drill" term frequency.
    lengths = [len(terms) for terms in index.analyze(product_texts(catalog_table()))]
    assert lengths[2] == 6  # cordless drill 18v drill battery tool ("with" is a stop word)
    n, df, tf, k1, b = len(CATALOG), 1, 2, 1.2, 0.75
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    expected = idf * tf / (tf + k1 * (1 - b + b * lengths[2] / np.mean(lengths)))
    assert index.score_pairs(["drill"], ["P3"])[0] == pytest.approx(expected, rel=1e-5)


def test_rare_term_outweighs_common_term(index):
    # "table" is in P1 and P5, "ceramic" only in P6; P5 and P6 have the same length and tf.
    lengths = [len(t) for t in index.analyze(product_texts(catalog_table()))]
    assert lengths[4] == lengths[5]
    ids, scores = index.search(["table ceramic"], k=6)
    assert ids[0, 0] == "P6"
    common, rare = index.score_pairs(["table", "ceramic"], ["P5", "P6"])
    assert rare > common > 0


def test_unknown_product_id_raises_naming_it(index):
    with pytest.raises(KeyError, match="P999"):
        index.score_pairs(["lamp", "lamp"], ["P1", "P999"])
    with pytest.raises(ValueError, match="2 queries but 1 product ids"):
        index.score_pairs(["lamp", "drill"], ["P1"])


def test_ties_go_to_the_product_listed_first():
    rows = [("B", "Red Bucket", "", ""), ("A", "Red Bucket", "", ""), ("C", "Blue Bucket", "", "")]
    ids, scores = BM25Index.from_catalog(catalog_table(rows)).search(["red bucket"], k=1)
    assert ids.tolist() == [["B"]]  # B and A tie; B comes first in the catalogue
    ids, scores = BM25Index.from_catalog(catalog_table(rows)).search(["bucket"], k=3)
    assert ids.tolist() == [["B", "A", "C"]] and scores[0, 0] == scores[0, 1] == scores[0, 2]


def test_title_weight_boosts_title_matches():
    rows = [("T", "Lamp", "brass desk light bright warm", ""), ("D", "Desk Light", "lamp lamp", "")]
    plain = BM25Index.from_catalog(catalog_table(rows))
    boosted = BM25Index.from_catalog(catalog_table(rows), title_weight=4)
    assert plain.search(["lamp"], k=2)[0].tolist() == [["D", "T"]]
    assert boosted.search(["lamp"], k=2)[0].tolist() == [["T", "D"]]
    title_only = BM25Index.from_catalog(catalog_table(rows), fields=("product_title",))
    assert title_only.search(["lamp"], k=2)[0].tolist() == [["T", ""]]
    with pytest.raises(ValueError, match="title_weight"):
        BM25Index.from_catalog(catalog_table(rows), title_weight=0)


def test_bm25_parameters_change_scores(index):
    other = BM25Index.from_catalog(catalog_table(), k1=2.0, b=0.0)
    assert (other.k1, other.b, other.method) == (2.0, 0.0, "lucene")
    assert other.score_pairs(["drill"], ["P3"])[0] != index.score_pairs(["drill"], ["P3"])[0]


def test_from_catalog_file_and_data_set_directory_match_the_table(tmp_path, index):
    path = write_rows(catalog_table().to_pylist(), str(tmp_path / "catalog.parquet"))
    from_file = BM25Index.from_catalog(path)
    expected = index.search(["table lamp", "hose"], k=3)
    for got, want in zip(from_file.search(["table lamp", "hose"], k=3), expected):
        np.testing.assert_array_equal(got, want)
    data_dir = write_dataset(tmp_path / "data", good_impressions())  # conftest's products P0..P4, with images
    from_dir = BM25Index.from_catalog(data_dir)
    assert len(from_dir) == 5
    assert from_dir.search(["bike"], k=5)[0][0].tolist()[:2] == ["P1", "P4"]
    assert os.path.exists(os.path.join(data_dir, "catalog.parquet"))


def test_duplicate_product_ids_are_rejected():
    with pytest.raises(ValueError, match="'P1' appears more than once"):
        BM25Index(["P1", "P2", "P1"], ["lamp", "drill", "vase"])


def test_threads_give_the_same_results(index):
    queries = [f"{a} {b}" for a in ("lamp", "table", "drill", "hose", "vase", "zzz", "")
               for b in ("brass", "walnut", "led", "battery", "ft", "stand", "of", "lighting", "garden", "coffee")] * 2
    assert len(queries) > 64 * 2
    threaded = BM25Index.from_catalog(catalog_table(), n_threads=2)
    for got, want in zip(threaded.search(queries, k=4), index.search(queries, k=4)):
        np.testing.assert_array_equal(got, want)
