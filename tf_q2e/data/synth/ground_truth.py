"""The `ground_truth` section of the manifest: for sampled test queries, the exact matches searchers engage with most."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tf_q2e.data import schema
from tf_q2e.data.synth.catalog import _sigmoid
from tf_q2e.data.synth.impressions import SEGMENT_PRICE_SENSITIVITY, SEGMENT_PROBABILITIES, SEGMENTS, _utility
from tf_q2e.data.synth.queries import CONSTRAINT_TYPES

GROUND_TRUTH_MAX_PRODUCTS = 50


def _ground_truth(tax, prods, retriever, pool, session_query, session_country, product_ids, limit, seed) -> dict:
    """Per sampled test query: its intent and the grade-3 products with the highest expected engagement."""
    sessions = np.bincount(session_query, minlength=len(pool.text))
    G = len(tax.country_codes)
    by_country = np.bincount(session_query * G + session_country, minlength=len(pool.text) * G).reshape(-1, G)
    top_country = np.argmax(by_country, axis=1)  # ties -> the first country
    splits = schema.query_splits(pa.array(pool.text, type=pa.string()))
    candidates = np.flatnonzero((splits == "test") & (sessions > 0))
    rng = np.random.default_rng([seed, 4])
    if len(candidates) > limit:
        candidates = np.sort(rng.choice(candidates, size=limit, replace=False))
    candidates = sorted(candidates.tolist(), key=lambda i: pool.text[i])
    segment_p = np.array(SEGMENT_PROBABILITIES)
    queries = []
    for i in candidates:
        cat, constraints = int(pool.category[i]), pool.constraints[i]
        members = retriever.by_category.members(cat)
        for t in range(4):
            if constraints[t] >= 0:
                members = members[prods.attributes[members, t] == constraints[t]]
        members = np.sort(members)
        expected = np.zeros(len(members))
        for s in range(len(SEGMENTS)):
            expected += segment_p[s] * _sigmoid(_utility(prods, members, s, SEGMENT_PRICE_SENSITIVITY[s], top_country[i]))
        order = np.lexsort((members, -expected))[:GROUND_TRUTH_MAX_PRODUCTS]
        intent = {"category": tax.categories[cat]}
        vocab = (tax.brands, tax.colors, tax.materials, tax.sizes)
        intent.update({CONSTRAINT_TYPES[t]: vocab[t][constraints[t]] for t in range(4) if constraints[t] >= 0})
        queries.append({
            "query": pool.text[i],
            "sessions": int(sessions[i]),
            "query_country": tax.country_codes[top_country[i]],
            "intent": intent,
            "relevant_products": int(len(members)),
            "product_ids": product_ids.take(pa.array(members[order])).to_pylist(),
            "expected_engagement": [round(float(x), 4) for x in expected[order]],
        })
    return {
        "description": "For a random sample of distinct test-split queries (sorted by text): the hidden intent, the"
                       " most common searcher country, the number of grade-3 (exactly relevant) catalogue products,"
                       f" and up to {GROUND_TRUTH_MAX_PRODUCTS} of them with the highest expected engagement"
                       " probability for a searcher of that country (averaged over brand-affinity segments at their"
                       " mean price sensitivity), best first (ties by product id).",
        "split": "test",
        "max_products_per_query": GROUND_TRUTH_MAX_PRODUCTS,
        "queries": queries,
    }
