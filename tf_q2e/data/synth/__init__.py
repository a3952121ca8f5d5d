"""The synthetic marketplace: a catalogue, shoppers' queries and an impression log with a hidden truth.

`generate(out_dir, products, impressions, seed)` writes a canonical data set
directory (see `tf_q2e.data.schema`): `catalog.parquet`, `train.parquet`,
`validation.parquet`, `test.parquet` (split by query) and `manifest.json`.
Same arguments give byte-identical files (with the same NumPy and PyArrow).

The generative model, step by step:

1. **Taxonomy** (fixed in version 1). 39 marketplace categories in 11
   departments (sofa, dining table, road bike, iphone, winter jacket, sneakers,
   desk lamp, ...). Each category has noun synonyms (sofa / couch / settee), a
   colour palette, optional materials and sizes (size stands for the
   category's main variant: 3-seater, 128gb, size 9, 55-inch, ...), a median
   price, a popularity, and 8-14 made-up brands with Zipf popularity and a
   quality tier (0 budget, 1 mainstream, 2 premium). Categories of the same
   department are *related*.
2. **Catalogue.** Each product draws a category (by popularity), a brand
   (Zipf within the category), colour, material, size, a condition (new, like
   new, used, used - fair, for parts) and a seller country (US, GB, CA, AU, DE,
   FR, MX, BR, IN, each with cities and a currency). A latent quality in (0, 1)
   rises with the brand tier and the condition, plus noise; the price is the
   category median times tier, condition and quality factors and log-normal
   noise. The title comes from one of 6 templates over these attributes, each
   optional attribute shown with some probability ("Acme Blue Leather Sofa
   3-seater", "used couch - blue leather, Acme"); the description from one of 4
   templates mentions condition, material, the local price and the pickup city.
   `product_category` is "Department > category". With `image_dim > 0` each
   product has an image-like embedding: category centroid + colour direction +
   material direction + Gaussian noise, L2-normalised (float32).
3. **Query pool.** Distinct query strings (compared lower-cased), about one
   per four sessions. Each has a hidden intent: a category (by popularity) and
   0-3 constraints among brand, colour, material and size, copied from an
   anchor product of that category so that an exact match exists. The surface
   form uses a query-side noun synonym, the constraint words in one of 4 word
   orders, sometimes a filler word ("cheap", "used", "for sale", "near me"),
   a typo with probability 0.1 (a character dropped, swapped with its
   neighbour or duplicated, in a word of 4+ letters), 1-6 words, mostly lower
   case. Popularity is Zipf over a rank that favours short, clean queries.
4. **Sessions.** A session is a pool query (by popularity) and a searcher: a
   country (the `query_country` column), a brand-affinity segment (budget,
   mainstream, premium) and a price sensitivity drawn around the segment's mean.
   It shows 5-15 distinct products (the last session is cut so that the log has
   exactly `impressions` rows).
5. **Retrieval.** Each shown slot draws a source, as a lexical retriever with
   some locality would: the intent's category (best of 3 random products by
   matched constraints), a category + constraint group (best of 2), the
   searcher's country + category (best of 2), a related category, a lexical
   look-alike in another category (same material or colour), or a random
   product. Sampling is vectorised: products are sorted by group key and an
   index is `order[start[group] + floor(u * size[group])]`.
6. **Relevance** of (intent, product), written as `relevance`:
   3 = category and all constraints match (every product of the category for a
   query without constraints); 2 = category matches, some constraints match and
   some do not; 1 = category matches but no constraint does, or a related
   category; 0 = irrelevant.
7. **Engagement** (`engaged`): relevance is necessary, not sufficient.
   `P(engaged) = m[relevance] * sigmoid(U)` with `m = (0.003, 0.03, 0.35, 1)`
   and the searcher's utility
   `U = a + b_q (quality - 0.5) - b_p * sensitivity * log(price / category median)
   + affinity[segment, brand tier] + b_c * (+1 same country, -1 otherwise)`.
   So most relevant impressions are hard negatives: shown, relevant, and not
   engaged because of price, quality, brand or distance.

`manifest.json` holds, besides the writer's counts, a `generator` section (all
arguments, taxonomy sizes, every probability and coefficient used, and
statistics of the log) and a `ground_truth` section: for up to
`ground_truth_queries` distinct test-split queries, the query, its hidden
intent, its most common searcher country and the grade-3 products with the
highest expected engagement probability for a searcher of that country (up to
50, best first).

Only NumPy and PyArrow are imported, so the command starts fast.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import pyarrow as pa

from tf_q2e.data import schema
from tf_q2e.data.synth.catalog import _make_catalog, _sigmoid
from tf_q2e.data.synth.ground_truth import _ground_truth
from tf_q2e.data.synth.impressions import (
    DEDUPLICATION_ROUNDS, PRICE_SENSITIVITY_SD, RELEVANCE_MULTIPLIER, RESULTS_PER_SESSION, SEGMENT_PRICE_SENSITIVITY,
    SEGMENT_PROBABILITIES, SEGMENTS, SOURCE_PROBABILITIES, SOURCES, _relevance, _Retriever, _utility)
from tf_q2e.data.synth.manifest import NAME, VERSION, _generator_section
from tf_q2e.data.synth.queries import (
    MAX_QUERY_POOL, QUERIES_PER_SESSION, QUERY_PREFIXES, QUERY_SUFFIXES, _make_query_pool)
from tf_q2e.data.synth.taxonomy import _taxonomy
from tf_q2e.errors import InputError

__all__ = ["CHUNK_ROWS", "MAX_IMAGE_DIM", "NAME", "QUERY_COUNTRY", "QUERY_PREFIXES", "QUERY_SUFFIXES", "VERSION",
           "generate"]

# Impressions are generated and written in chunks of whole sessions starting in
# each block of this many rows: memory stays bounded and the bytes do not depend
# on anything else.
CHUNK_ROWS = 500_000
QUERY_COUNTRY = "query_country"
MAX_IMAGE_DIM = 4096


def _check_int(name: str, value, low: int, high: int | None = None, fix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"synth: {name} must be an integer, got {value!r} ({type(value).__name__}); {fix}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise InputError(f"synth: {name} must be {bound}, got {value}; {fix}")
    return int(value)


def generate(out_dir: str, products: int, impressions: int, seed: int = 0, image_dim: int = 16,
             ground_truth_queries: int = 1000, progress: Callable[[str], None] | None = None) -> dict:
    """Writes a synthetic marketplace data set to `out_dir` and returns its manifest.

    Args:
      out_dir: directory to write `catalog.parquet`, `train.parquet`,
        `validation.parquet`, `test.parquet` and `manifest.json` (created if
        missing; files of the same names are replaced).
      products: catalogue size, >= 1.
      impressions: rows of the impression log (all splits together), >= 1.
      seed: non-negative integer; same arguments -> byte-identical files.
      image_dim: length of `product_image_embedding`; 0 writes no image column.
      ground_truth_queries: at most this many test-split queries get ground
        truth in the manifest; 0 for none.
      progress: called with a short line at each stage (e.g. `print`).

    Returns:
      The manifest dict, as written to `manifest.json`.

    Raises:
      InputError: an argument is out of range; the message names it and the fix.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise InputError(f"synth: out_dir must be a directory path, got {out_dir!r}; pass --out DIR")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"synth: out_dir {str(out_dir)!r} exists and is not a directory; choose another --out")
    products = _check_int("products", products, 1, fix="pass --products N with N >= 1")
    impressions = _check_int("impressions", impressions, 1, fix="pass --impressions M with M >= 1")
    seed = _check_int("seed", seed, 0, 2**63 - 1, fix="pass --seed S with 0 <= S < 2**63")
    image_dim = _check_int("image_dim", image_dim, 0, MAX_IMAGE_DIM,
                           fix=f"pass an image dimension between 0 (no image column) and {MAX_IMAGE_DIM}")
    ground_truth_queries = _check_int("ground_truth_queries", ground_truth_queries, 0,
                                      fix="pass 0 for no ground truth, or a positive count")
    say = progress or (lambda message: None)
    tax = _taxonomy()

    say(f"catalogue: {products:,} products in {len(tax.categories)} categories")
    catalog, prods = _make_catalog(tax, products, image_dim, seed)
    retriever = _Retriever(tax, prods)

    rng = np.random.default_rng([seed, 2])
    lo, hi = RESULTS_PER_SESSION
    sizes = rng.integers(lo, hi + 1, size=impressions // lo + 1)
    ends = np.cumsum(sizes)
    n_sessions = int(np.searchsorted(ends, impressions)) + 1
    sizes = sizes[:n_sessions].copy()
    sizes[-1] -= int(ends[n_sessions - 1]) - impressions
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    pool_size = int(min(MAX_QUERY_POOL, max(1, round(n_sessions * QUERIES_PER_SESSION))))
    pool = _make_query_pool(tax, prods, retriever.by_category, pool_size, seed)
    say(f"queries: {len(pool.text):,} distinct queries for {n_sessions:,} sessions")
    session_query = rng.choice(len(pool.text), size=n_sessions, p=pool.weight)
    session_country = rng.choice(len(tax.country_codes), size=n_sessions, p=tax.country_weights)
    session_segment = rng.choice(len(SEGMENTS), size=n_sessions, p=SEGMENT_PROBABILITIES)
    session_sensitivity = np.clip(rng.normal(np.array(SEGMENT_PRICE_SENSITIVITY)[session_segment], PRICE_SENSITIVITY_SD),
                                  0.0, 2.0).astype(np.float32)

    query_text = pa.array(pool.text, type=pa.string())
    country_codes = pa.array(tax.country_codes, type=pa.string())
    grade_rows = np.zeros(4, dtype=np.int64)
    grade_engaged = np.zeros(4, dtype=np.int64)
    source_rows = np.zeros(len(SOURCES), dtype=np.int64)
    n_chunks = (impressions + CHUNK_ROWS - 1) // CHUNK_ROWS
    with schema.DatasetWriter(out_dir, image_dim=image_dim, context_columns=(QUERY_COUNTRY,)) as writer:
        writer.write_catalog(catalog)
        for k in range(n_chunks):
            s_lo, s_hi = np.searchsorted(starts, [k * CHUNK_ROWS, (k + 1) * CHUNK_ROWS])
            if s_hi <= s_lo:
                continue
            say(f"impressions: chunk {k + 1}/{n_chunks}")
            crng = np.random.default_rng([seed, 3, k])
            session = np.repeat(np.arange(s_lo, s_hi), sizes[s_lo:s_hi])
            q = session_query[session]
            cat, constraints = pool.category[q], pool.constraints[q]
            country = session_country[session]
            source = crng.choice(len(SOURCES), size=len(session), p=SOURCE_PROBABILITIES)
            product = retriever.retrieve(source, cat, constraints, country, crng)
            for _ in range(DEDUPLICATION_ROUNDS):  # a session shows distinct products
                key = (session - s_lo) * retriever.n + product
                _, first = np.unique(key, return_index=True)
                dup = np.ones(len(key), dtype=bool)
                dup[first] = False
                if not dup.any():
                    break
                product[dup] = crng.integers(0, retriever.n, int(dup.sum()))
                source[dup] = SOURCES.index("random")
            grade = _relevance(prods, tax, product, cat, constraints)
            utility = _utility(prods, product, session_segment[session], session_sensitivity[session], country)
            p_engaged = np.array(RELEVANCE_MULTIPLIER)[grade] * _sigmoid(utility)
            engaged = (crng.random(len(session)) < p_engaged).astype(np.int8)

            grade_rows += np.bincount(grade, minlength=4)
            grade_engaged += np.bincount(grade, weights=engaged, minlength=4).astype(np.int64)
            source_rows += np.bincount(source, minlength=len(SOURCES))
            shown = catalog.take(pa.array(product))
            columns = {schema.QUERY: query_text.take(pa.array(q)), QUERY_COUNTRY: country_codes.take(pa.array(country))}
            columns.update({name: shown.column(name) for name in shown.column_names})
            columns[schema.ENGAGED] = pa.array(engaged, type=pa.int8())
            columns[schema.RELEVANCE] = pa.array(grade.astype(np.float32), type=pa.float32())
            writer.write_impressions(pa.table(columns))
            del shown, columns

        say("ground truth")
        writer.manifest["generator"] = _generator_section(
            tax, products, impressions, seed, image_dim, ground_truth_queries, len(pool.text), n_sessions,
            grade_rows, grade_engaged, source_rows, CHUNK_ROWS)
        writer.manifest["ground_truth"] = _ground_truth(
            tax, prods, retriever, pool, session_query, session_country, catalog.column(schema.PRODUCT_ID),
            ground_truth_queries, seed)
    with open(os.path.join(out_dir, schema.MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)
