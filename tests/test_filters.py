"""Filters at lookup time (`tf_q2e.filters`): allow-lists, excluded ids and crowding, on exact search,
ScaNN (over-fetched, or exact over a selective restrict's products) and the exported signatures."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import tf_q2e
from conftest import SMALL
from tf_q2e.config import load_config
from tf_q2e.data.datasets import FeatureSchema
from tf_q2e.errors import InputError
from tf_q2e.filters import EXACT_BELOW_SHARE, Filters

WORDS = ["red", "sofa", "lamp", "brass", "oak", "table", "rug", "jute", "grey", "chair", "desk", "bike", "steel", "wool"]
QUERIES = ["red sofa", "brass lamp", "oak table", "grey wool rug"]


def catalogue(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.RandomState(seed)
    # Category "rare" holds 1% of the products: too selective for over-fetching (EXACT_BELOW_SHARE).
    categories = np.where(np.arange(n) % 100 == 0, "rare", np.array(["chairs", "lamps", "rugs", "tables"])[np.arange(n) % 4])
    return pd.DataFrame({"product_id": [f"p{i}" for i in range(n)],
                         "product_title": [" ".join(rng.choice(WORDS, 3)) for _ in range(n)],
                         "product_category": categories,
                         "product_country": np.array(["US", "CA", "MX"])[rng.randint(0, 3, n)],
                         "product_seller": [f"s{j}" for j in rng.randint(0, 30, n)]})


@pytest.fixture(scope="module")
def model():
    config = load_config(None, SMALL + ["index.kind=ah", "index.k=20"])
    return tf_q2e.build_model(config, FeatureSchema(0, ()))


def reference(retriever, filters: Filters, k: int) -> list[list[str]]:
    """Brute force in NumPy: score everything, drop what the filter drops, crowd greedily (one limit)."""
    queries = retriever.encode_queries(QUERIES)
    category, country, seller = (retriever.attributes[a] for a in ("category", "country", "seller"))
    out = []
    for scores in queries @ retriever.vectors.T:
        found, taken = [], {}
        for row in np.argsort(-scores, kind="stable"):
            product = retriever.product_ids[row]
            if (filters.categories and category[row] not in filters.categories
                    or filters.countries and country[row] not in filters.countries or product in filters.exclude):
                continue
            group, limit = ((category[row], filters.max_per_category) if filters.max_per_category
                            else ("seller " + seller[row], filters.max_per_seller))
            if limit and taken.get(group, 0) >= limit:
                continue
            taken[group] = taken.get(group, 0) + 1
            found.append(product)
            if len(found) == k:
                break
        out.append(found)
    return out


def ids(results) -> list[list[str]]:
    return [[h.product_id for h in hits] for hits in results]


FILTERS = [
    Filters(categories=("lamps", "rugs")),  # half the catalogue
    Filters(categories=("rare",)),  # 1%: exact over its products
    Filters(exclude=("p1", "p2", "p3", "p5", "p8", "p13")),
    Filters(max_per_category=2),
    Filters(categories=("chairs", "tables", "rare"), exclude=("p4",), max_per_category=3),
    Filters(categories=("no such category",)),  # matches nothing: empty lists, not wrong items
    Filters(countries=("CA", "MX"), max_per_seller=1),
]
NAMES = ["allow-half", "allow-1%", "exclude", "crowding", "all", "none", "country-seller"]


@pytest.mark.parametrize("filters", FILTERS, ids=NAMES)
def test_exact_search_with_a_filter_equals_brute_force_in_numpy(model, filters):
    retriever = tf_q2e.Retriever.from_model(model, catalogue())
    found = ids(retriever.search(QUERIES, k=10, filters=filters))
    assert found == reference(retriever, filters, 10)
    category = dict(zip(retriever.product_ids, retriever.attributes["category"]))
    country = dict(zip(retriever.product_ids, retriever.attributes["country"]))
    for hits in found:
        assert not set(hits) & set(filters.exclude)
        assert not filters.categories or all(category[p] in filters.categories for p in hits)
        assert not filters.countries or all(country[p] in filters.countries for p in hits)


def test_each_query_of_a_batch_takes_its_own_filter(model):
    retriever = tf_q2e.Retriever.from_model(model, catalogue())
    each = [FILTERS[0], Filters(), FILTERS[2], FILTERS[3]]
    found = ids(retriever.search(QUERIES, k=10, filters=each))
    for i, filters in enumerate(each):
        assert found[i] == reference(retriever, filters, 10)[i]
    scann = tf_q2e.Retriever.from_model(model, catalogue(), scann=True, k=20)
    category = dict(zip(retriever.product_ids, retriever.attributes["category"]))
    assert all(category[p] in ("lamps", "rugs") for p in ids(scann.search(QUERIES, k=10, filters=each))[0])
    with pytest.raises(InputError, match="filters has 2 entries for 4 queries"):
        retriever.search(QUERIES, filters=each[:2])


def test_scann_with_a_filter_never_returns_a_filtered_product_and_finds_what_exact_search_finds(model):
    catalog = catalogue()
    exact = tf_q2e.Retriever.from_model(model, catalog)
    scann = tf_q2e.Retriever.from_model(model, catalog, scann=True, k=20)
    assert scann._scann.options.kind == "ah"
    category = dict(zip(exact.product_ids, exact.attributes["category"]))
    for filters in FILTERS:
        truth, found = ids(exact.search(QUERIES, k=10, filters=filters)), ids(scann.search(QUERIES, k=10, filters=filters))
        for hits, expected in zip(found, truth):
            assert not set(hits) & set(filters.exclude)
            assert not filters.categories or all(category[p] in filters.categories for p in hits)
            if filters.max_per_category:
                assert max(np.unique([category[p] for p in hits], return_counts=True)[1]) <= filters.max_per_category
            assert len(hits) == len(expected)
            if expected:
                assert len(set(hits) & set(expected)) / len(expected) >= 0.8, (filters, hits, expected)
    # The 1% category is scored exactly (below EXACT_BELOW_SHARE): the very products of exact search.
    assert np.mean(catalog.product_category == "rare") < EXACT_BELOW_SHARE
    rare = Filters(categories=("rare",))
    assert ids(scann.search(QUERIES, k=10, filters=rare)) == ids(exact.search(QUERIES, k=10, filters=rare))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """A ScaNN (AH) retriever over the catalogue, and its export under a TF Serving base directory."""
    retriever = tf_q2e.Retriever.from_model(model, catalogue(), scann=True, k=20)
    base = str(tmp_path_factory.mktemp("serving"))
    tf_q2e.export(retriever, base, log=lambda _: None)
    return retriever, base


@pytest.mark.slow
def test_the_exported_filtered_signatures_filter_and_reject_a_negative_crowding_limit(model, exported):
    retriever, base = exported
    exact = tf_q2e.Retriever.from_model(model, catalogue())
    stock = tf_q2e.Retriever.from_saved_model(os.path.join(base, "q2e"))
    served_scann = tf_q2e.Retriever.from_saved_model(os.path.join(base, "q2e_scann"))
    for filters in FILTERS:
        assert ids(stock.search(QUERIES, k=10, filters=filters)) == ids(exact.search(QUERIES, k=10, filters=filters))
        served, local = ids(served_scann.search(QUERIES, k=10, filters=filters)), ids(retriever.search(QUERIES, k=10,
                                                                                                  filters=filters))
        # The same searcher; this untrained model's duplicate titles make exact ties, which ScaNN may order
        # either way (and the export scores a selective restrict from float16 vectors).
        assert [len(h) for h in served] == [len(h) for h in local], filters
        assert np.mean([len(set(a) & set(b)) / len(b) if b else 1.0 for a, b in zip(served, local)]) >= 0.9, filters
        assert not {p for hits in served for p in hits} & set(filters.exclude)
    signature = tf.saved_model.load(os.path.join(base, "q2e", "1")).signatures["retrieval_exact_filtered"]
    inputs = {"query": tf.constant(["red sofa"]), **Filters().inputs(1)}
    inputs["max_per_category"] = tf.constant([-1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_per_category must be 0"):
        signature(**inputs)


@pytest.mark.slow
def test_q2e_query_filters_through_the_server_over_both_protocols(model, exported, capsys):
    from tf_q2e.serving import ModelServer, ServingClient, ServingError, commands

    retriever, base = exported
    exact = tf_q2e.Retriever.from_model(model, catalogue())
    filters = Filters(categories=("lamps", "rare"), exclude=("p2", "p6"), max_per_category=3)
    expected = ids(exact.search(["red sofa"], k=5, filters=filters))[0]
    parser = argparse.ArgumentParser()
    commands.add_query_arguments(parser)
    with ModelServer(base, grpc_port=0, rest_port=0, log=lambda _: None) as server:
        for protocol, port in (([], server.grpc_port), (["--rest"], server.rest_port)):
            argv = ["--server", f"127.0.0.1:{port}", *protocol, "--k", "5", "--category", "lamps", "--category", "rare",
                    "--exclude", "p2", "--exclude", "p6", "--max-per-category", "3", "red sofa"]
            assert commands.run_query(parser.parse_args(argv)) == 0
            lines = capsys.readouterr().out.splitlines()
            assert [line.split()[1] for line in lines[2:]] == expected, lines
            with ServingClient(f"127.0.0.1:{port}", "rest" if protocol else "grpc") as client:
                hits = client.search("q2e_scann", ["red sofa"], 5, signature="retrieval", filters=filters)[0]
                assert [h["product_id"] for h in hits] == ids(retriever.search(["red sofa"], k=5, filters=filters))[0]
                # A negative limit that a client lets through is the server's INVALID_ARGUMENT.
                bad = {"query": ["red sofa"], **Filters().arrays(1), "max_per_category": np.array([-1], np.int32)}
                with pytest.raises(ServingError, match="max_per_category must be 0") as error:
                    client.predict("q2e", bad, "retrieval_exact_filtered")
                assert error.value.code.name == "INVALID_ARGUMENT"
        with pytest.raises(InputError, match=r"filters.max_per_category must be an integer, 0 \(no crowding\) or more"):
            commands.run_query(parser.parse_args(["--server", f"127.0.0.1:{server.grpc_port}", "--max-per-category",
                                                  "-2", "red sofa"]))


def test_a_catalogue_attribute_of_the_wrong_type_is_named(model):
    catalog = catalogue(20)
    catalog["product_country"] = catalog["product_country"].astype(object)
    catalog.loc[3, "product_country"] = 7
    with pytest.raises(InputError, match=r"row 4, column product_country: expected a string, got int 7"):
        tf_q2e.Retriever.from_model(model, catalog)
    # Absent attribute columns are "" for every product: an allow-list on them matches nothing.
    plain = tf_q2e.Retriever.from_model(model, catalogue(20).drop(columns=["product_country", "product_seller"]))
    assert set(plain.attributes["country"]) == {""}
    assert plain.search(QUERIES, k=5, filters=Filters(countries=("US",))) == [[]] * len(QUERIES)


def test_bad_filters_are_named(model):
    retriever = tf_q2e.Retriever.from_model(model, catalogue(50))
    with pytest.raises(InputError, match=r"filters.categories must be a list of strings, not one string 'rugs'"):
        retriever.search(QUERIES, filters={"categories": "rugs"})
    with pytest.raises(InputError, match=r"filters.max_per_category must be an integer, 0 \(no crowding\) or more; got -1"):
        Filters(max_per_category=-1)
    with pytest.raises(InputError, match=r"filters.exclude\[1\] is int 7, not a string"):
        Filters(exclude=["p1", 7])
    with pytest.raises(InputError, match="unknown field 'category'"):
        retriever.search(QUERIES, filters={"category": ["rugs"]})
    assert not Filters().active and Filters(max_per_seller=1).active
