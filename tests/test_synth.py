"""Tests of the synthetic marketplace (`tf_q2e.data.synth`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tf_q2e.data import schema, synth
from tf_q2e.data.synth import taxonomy
from tf_q2e.errors import InputError

PRODUCTS = 2000
IMPRESSIONS = 20_000
IMAGE_DIM = 8
SPLITS = ("train", "validation", "test")
FILES = (schema.CATALOG_FILE, *schema.SPLIT_FILES.values(), schema.MANIFEST_FILE)


def _generate(out_dir, seed=0, products=PRODUCTS, impressions=IMPRESSIONS, image_dim=IMAGE_DIM, **kwargs):
    return synth.generate(str(out_dir), products, impressions, seed=seed, image_dim=image_dim, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = _generate(out, seed=7, ground_truth_queries=100)
    return out, manifest


def _read(out, name):
    return pq.read_table(os.path.join(out, name))


def _impressions(out):
    return pa.concat_tables([_read(out, schema.SPLIT_FILES[s]) for s in SPLITS])


def _bytes(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in FILES}


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    out, _ = dataset
    _generate(tmp_path, seed=7, ground_truth_queries=100)
    first, second = _bytes(out), _bytes(tmp_path)
    assert sorted(first) == sorted(second)
    for name in FILES:
        assert first[name] == second[name], name


def test_bytes_do_not_depend_on_the_process_or_its_hash_seed(dataset, tmp_path):
    out, _ = dataset
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"from tf_q2e.data.synth import generate; generate({str(tmp_path)!r}, {PRODUCTS}, {IMPRESSIONS},"
            f" seed=7, image_dim={IMAGE_DIM}, ground_truth_queries=100)")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=repo)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=repo)
    assert _bytes(out) == _bytes(tmp_path)


def test_several_chunks_are_deterministic_and_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK_ROWS", 997)
    first = _generate(tmp_path / "a", products=300, impressions=5000)
    _generate(tmp_path / "b", products=300, impressions=5000)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert sum(first["counts"][s]["rows"] for s in SPLITS) == 5000
    assert _impressions(tmp_path / "a").num_rows == 5000


def test_different_seed_gives_different_files(dataset, tmp_path):
    out, _ = dataset
    _generate(tmp_path, seed=8, ground_truth_queries=100)
    first, second = _bytes(out), _bytes(tmp_path)
    for name in FILES:
        assert first[name] != second[name], name


def test_files_have_the_canonical_schema(dataset):
    out, manifest = dataset
    assert _read(out, schema.CATALOG_FILE).schema.equals(schema.catalog_schema(IMAGE_DIM))
    expected = schema.impression_schema(IMAGE_DIM, (synth.QUERY_COUNTRY,))
    for split in SPLITS:
        assert _read(out, schema.SPLIT_FILES[split]).schema.equals(expected), split
    assert manifest["image_dim"] == IMAGE_DIM
    assert manifest["query_context_columns"] == [synth.QUERY_COUNTRY]


def test_image_dim_zero_writes_no_image_column(tmp_path):
    _generate(tmp_path, products=50, impressions=300, image_dim=0)
    assert _read(tmp_path, schema.CATALOG_FILE).schema.equals(schema.catalog_schema(0))
    assert schema.PRODUCT_IMAGE_EMBEDDING not in _read(tmp_path, "train.parquet").column_names


def test_counts_match_the_arguments_and_the_manifest(dataset):
    out, manifest = dataset
    catalog, impressions = _read(out, schema.CATALOG_FILE), _impressions(out)
    assert catalog.num_rows == PRODUCTS
    assert impressions.num_rows == IMPRESSIONS
    for split in SPLITS:
        table = _read(out, schema.SPLIT_FILES[split])
        assert manifest["counts"][split]["rows"] == table.num_rows
        assert manifest["counts"][split]["engaged"] == pc.sum(table.column(schema.ENGAGED)).as_py()
    with open(os.path.join(out, schema.MANIFEST_FILE), encoding="utf-8") as f:
        assert json.load(f) == manifest
    generator = manifest["generator"]
    assert generator["name"] == "tf_q2e.synth" and generator["version"] == 1
    assert generator["args"] == {"products": PRODUCTS, "impressions": IMPRESSIONS, "seed": 7, "image_dim": IMAGE_DIM,
                                 "ground_truth_queries": 100}
    assert 25 <= generator["taxonomy"]["categories"] <= 40


def test_catalogue_ids_are_unique_and_formatted(dataset):
    out, _ = dataset
    ids = _read(out, schema.CATALOG_FILE).column(schema.PRODUCT_ID).to_pylist()
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 8 and i[0] == "P" and i[1:].isdigit() for i in ids)


def test_catalogue_text_is_filled_and_images_are_unit_vectors(dataset):
    out, _ = dataset
    catalog = _read(out, schema.CATALOG_FILE)
    for column in schema.PRODUCT_TEXT_FIELDS:
        assert pc.min(pc.utf8_length(catalog.column(column))).as_py() > 0, column
    categories = set(catalog.column(schema.PRODUCT_CATEGORY).to_pylist())
    assert len(categories) >= 25
    images = catalog.column(schema.PRODUCT_IMAGE_EMBEDDING).combine_chunks()
    vectors = images.values.to_numpy().reshape(-1, IMAGE_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_images_of_a_category_are_closer_than_across_categories(dataset):
    out, _ = dataset
    catalog = _read(out, schema.CATALOG_FILE)
    vectors = catalog.column(schema.PRODUCT_IMAGE_EMBEDDING).combine_chunks().values.to_numpy().reshape(-1, IMAGE_DIM)
    category = np.array(catalog.column(schema.PRODUCT_CATEGORY).to_pylist())
    similarity = vectors @ vectors.T
    same = category[:, None] == category[None, :]
    assert similarity[same].mean() > similarity[~same].mean() + 0.3


def test_impressions_carry_the_catalogue_fields_of_their_product(dataset):
    out, _ = dataset
    catalog, impressions = _read(out, schema.CATALOG_FILE), _impressions(out)
    index = pc.index_in(impressions.column(schema.PRODUCT_ID), value_set=catalog.column(schema.PRODUCT_ID))
    assert index.null_count == 0
    expected = catalog.take(index)
    for column in schema.PRODUCT_FIELDS:
        assert impressions.column(column).equals(expected.column(column)), column


def test_each_query_is_in_exactly_one_split(dataset):
    out, _ = dataset
    seen = {}
    for split in SPLITS:
        for query in set(_read(out, schema.SPLIT_FILES[split]).column(schema.QUERY).to_pylist()):
            assert schema.query_split(query) == split, query
            key = schema.normalize_query_for_split(query)
            assert seen.setdefault(key, split) == split, query
    assert all(_read(out, schema.SPLIT_FILES[s]).num_rows > 0 for s in SPLITS)


def test_queries_have_one_to_six_words_and_are_mostly_lower_case(dataset):
    out, manifest = dataset
    queries = set(_impressions(out).column(schema.QUERY).to_pylist())
    words = [len(q.split()) for q in queries]
    assert min(words) >= 1 and max(words) <= 6
    assert len(set(words)) >= 4  # short and long queries
    lower = sum(q == q.lower() for q in queries)
    assert 0.8 * len(queries) <= lower < len(queries)
    assert len({q.lower() for q in queries}) == len(queries)  # distinct query strings
    assert manifest["generator"]["query_pool"]["size"] >= len(queries)


def _vocabulary_words():
    tax = taxonomy._taxonomy()
    phrases = tax.nouns + tax.colors + tax.materials + tax.sizes + [b.lower() for b in tax.brands]
    phrases += [p for p in synth.QUERY_PREFIXES + synth.QUERY_SUFFIXES if p]
    return {w for phrase in phrases for w in phrase.split()}


def test_some_queries_have_typos(dataset):
    out, _ = dataset
    words = _vocabulary_words()
    queries = set(_impressions(out).column(schema.QUERY).to_pylist())
    typos = sum(any(w not in words for w in q.lower().split()) for q in queries)
    assert 0.02 * len(queries) < typos < 0.3 * len(queries)


def test_queries_use_noun_synonyms_of_the_intended_category(dataset):
    out, _ = dataset
    tax = taxonomy._taxonomy()
    impressions = _impressions(out)
    exact = impressions.filter(pc.equal(impressions.column(schema.RELEVANCE), 3.0))
    nouns_of = {s: taxonomy._CATEGORIES[i].nouns for i, s in enumerate(tax.category_strings)}
    used = {}
    pairs = set(zip(exact.column(schema.QUERY).to_pylist(), exact.column(schema.PRODUCT_CATEGORY).to_pylist()))
    hits = 0
    for query, category in pairs:
        text = " " + query.lower() + " "
        nouns = [n for n in nouns_of[category] if f" {n} " in text]
        hits += bool(nouns)
        used.setdefault(category, set()).update(nouns)
    assert hits > 0.8 * len(pairs)  # the rest carry a typo in the noun
    assert sum(len(nouns) >= 2 for nouns in used.values()) >= 10  # sofa and couch, fridge and refrigerator, ...


def test_query_country_is_a_known_country(dataset):
    out, manifest = dataset
    countries = set(_impressions(out).column(synth.QUERY_COUNTRY).to_pylist())
    assert countries <= set(manifest["generator"]["taxonomy"]["countries"])
    assert len(countries) >= 5


def test_sessions_mostly_show_the_intended_category(dataset):
    out, manifest = dataset
    impressions = _impressions(out)
    relevance = impressions.column(schema.RELEVANCE).to_numpy()
    assert set(np.unique(relevance)) == {0.0, 1.0, 2.0, 3.0}
    assert 0.4 < (relevance >= 2).mean() < 0.9  # mostly on-intent results, some noise
    assert (relevance == 0).mean() > 0.03
    stats = manifest["generator"]["statistics"]
    assert [stats["impressions_by_relevance"][str(g)] for g in range(4)] == np.bincount(
        relevance.astype(int), minlength=4).tolist()


def test_relevant_but_unengaged_hard_negatives_are_common(dataset):
    out, _ = dataset
    impressions = _impressions(out)
    relevance = impressions.column(schema.RELEVANCE).to_numpy()
    engaged = impressions.column(schema.ENGAGED).to_numpy()
    assert set(np.unique(engaged)) == {0, 1}
    assert 0.08 < engaged.mean() < 0.30
    relevant, irrelevant = engaged[relevance >= 2], engaged[relevance <= 1]
    assert (relevant == 0).mean() > 0.5  # most relevant impressions are not engaged
    assert relevant.mean() > 5 * irrelevant.mean()
    assert engaged[relevance == 3].mean() > engaged[relevance == 2].mean()
    assert irrelevant.mean() < 0.03


def test_engagement_prefers_the_searchers_country(dataset):
    out, _ = dataset
    impressions = _impressions(out)
    # Every description names the pickup city; US searchers engage more with relevant products picked up in the US.
    us_cities = next(country[5] for country in taxonomy._COUNTRIES if country[0] == "US")
    descriptions = impressions.column(schema.PRODUCT_DESCRIPTION).to_pylist()
    local = np.array([any(city in d for city in us_cities) for d in descriptions])
    searcher_us = np.array(impressions.column(synth.QUERY_COUNTRY).to_pylist()) == "US"
    relevant = impressions.column(schema.RELEVANCE).to_numpy() >= 2
    engaged = impressions.column(schema.ENGAGED).to_numpy()
    assert engaged[searcher_us & relevant & local].mean() > 1.5 * engaged[searcher_us & relevant & ~local].mean()


def test_ground_truth_lists_test_queries_and_catalogue_products(dataset):
    out, manifest = dataset
    truth = manifest["ground_truth"]
    queries = truth["queries"]
    assert 0 < len(queries) <= 100
    catalog_ids = set(_read(out, schema.CATALOG_FILE).column(schema.PRODUCT_ID).to_pylist())
    test = _read(out, "test.parquet")
    test_queries = set(test.column(schema.QUERY).to_pylist())
    categories = set(manifest["generator"]["taxonomy"]["category_names"])
    assert len({q["query"] for q in queries}) == len(queries)
    for entry in queries:
        assert schema.query_split(entry["query"]) == "test"
        assert entry["query"] in test_queries
        ids = entry["product_ids"]
        assert 1 <= len(ids) <= min(truth["max_products_per_query"], entry["relevant_products"])
        assert len(set(ids)) == len(ids) and set(ids) <= catalog_ids
        assert entry["expected_engagement"] == sorted(entry["expected_engagement"], reverse=True)
        assert any(c.endswith("> " + entry["intent"]["category"]) for c in categories)


def test_ground_truth_products_are_graded_exact_matches_in_the_log(dataset):
    out, manifest = dataset
    test = _read(out, "test.parquet").to_pydict()
    grade = {(q, p): r for q, p, r in zip(test[schema.QUERY], test[schema.PRODUCT_ID], test[schema.RELEVANCE])}
    checked = 0
    for entry in manifest["ground_truth"]["queries"]:
        for product_id in entry["product_ids"]:
            if (entry["query"], product_id) in grade:
                assert grade[(entry["query"], product_id)] == 3.0, (entry["query"], product_id)
                checked += 1
    assert checked >= 5


def test_ground_truth_respects_its_limit(tmp_path):
    manifest = _generate(tmp_path, products=300, impressions=3000, ground_truth_queries=3)
    assert len(manifest["ground_truth"]["queries"]) == 3
    manifest = _generate(tmp_path, products=300, impressions=3000, ground_truth_queries=0)
    assert manifest["ground_truth"]["queries"] == []


def test_tiny_sizes_work(tmp_path):
    manifest = _generate(tmp_path, products=1, impressions=1)
    assert manifest["counts"]["catalog"] == 1
    assert sum(manifest["counts"][s]["rows"] for s in SPLITS) == 1


def test_progress_is_reported(tmp_path):
    lines = []
    _generate(tmp_path, products=20, impressions=100, progress=lines.append)
    assert any("catalogue" in line for line in lines) and any("impressions" in line for line in lines)


@pytest.mark.parametrize("name, value, fragment", [
    ("products", 0, "products must be >= 1, got 0"),
    ("impressions", -5, "impressions must be >= 1, got -5"),
    ("seed", -1, "seed must be between 0"),
    ("image_dim", -1, "image_dim must be between 0"),
    ("ground_truth_queries", -1, "ground_truth_queries must be >= 0"),
    ("products", 2.5, "products must be an integer, got 2.5"),
    ("impressions", True, "impressions must be an integer"),
])
def test_bad_arguments_raise_input_error(tmp_path, name, value, fragment):
    args = {"products": 10, "impressions": 10, "seed": 0, "image_dim": 4, "ground_truth_queries": 5}
    args[name] = value
    with pytest.raises(InputError, match=fragment) as info:
        synth.generate(str(tmp_path / "out"), **args)
    assert "pass" in str(info.value)  # the message names the fix
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_raises_input_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        synth.generate(str(path), 10, 10)
