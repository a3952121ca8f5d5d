"""The `generator` section of the manifest: what made the data set, with every probability and coefficient."""

from __future__ import annotations

from tf_q2e.data.synth.catalog import (
    _CONDITIONS, DESCRIPTION_TEMPLATE_PROBABILITIES, IMAGE_COLOR_WEIGHT, IMAGE_MATERIAL_WEIGHT, IMAGE_NOISE,
    PRICE_LOG_NOISE, PRICE_QUALITY_SLOPE, QUALITY_NOISE, TIER_PRICE_FACTOR, TIER_QUALITY_SHIFT,
    TITLE_SLOT_PROBABILITIES, TITLE_TEMPLATE_PROBABILITIES)
from tf_q2e.data.synth.impressions import (
    BRAND_AFFINITY, PRICE_SENSITIVITY_SD, RELEVANCE_MULTIPLIER, RESULTS_PER_SESSION, SEGMENT_PRICE_SENSITIVITY,
    SEGMENT_PROBABILITIES, SEGMENTS, SOURCE_BEST_OF, SOURCE_PROBABILITIES, SOURCES, UTILITY_INTERCEPT, UTILITY_PRICE,
    UTILITY_QUALITY, UTILITY_SAME_COUNTRY)
from tf_q2e.data.synth.queries import (
    CONSTRAINT_COUNT_PROBABILITIES, CONSTRAINT_TYPE_WEIGHTS, CONSTRAINT_TYPES, MAX_QUERY_WORDS,
    QUERY_CASE_PROBABILITIES, QUERY_ORDER_PROBABILITIES, QUERY_PREFIX_PROBABILITIES, QUERY_PREFIXES,
    QUERY_SUFFIX_PROBABILITIES, QUERY_SUFFIXES, QUERY_ZIPF_EXPONENT, QUERY_ZIPF_OFFSET, TYPO_KINDS, TYPO_PROBABILITY)
from tf_q2e.data.synth.taxonomy import BRAND_TIER_PROBABILITIES, BRAND_ZIPF_EXPONENT

NAME = "tf_q2e.synth"
VERSION = 1


def _generator_section(tax, products, impressions, seed, image_dim, ground_truth_queries, pool_size, n_sessions,
                       grade_rows, grade_engaged, source_rows, chunk_rows) -> dict:
    """The `generator` section of the manifest: arguments, taxonomy sizes, every parameter, log statistics."""
    total = int(grade_rows.sum())
    return {
        "name": NAME,
        "version": VERSION,
        "args": {"products": products, "impressions": impressions, "seed": seed, "image_dim": image_dim,
                 "ground_truth_queries": ground_truth_queries},
        "chunk_rows": chunk_rows,
        "taxonomy": tax.summary(),
        "catalogue": {
            "brand_tier_probabilities": list(BRAND_TIER_PROBABILITIES),
            "brand_zipf_exponent": BRAND_ZIPF_EXPONENT,
            "conditions": {c[0]: {"probability": c[3], "quality_shift": c[4], "price_factor": c[5]} for c in _CONDITIONS},
            "quality": f"sigmoid({TIER_QUALITY_SHIFT} * (tier - 1) + condition shift + N(0, {QUALITY_NOISE}))",
            "price_usd": f"category median * {list(TIER_PRICE_FACTOR)}[tier] * condition factor"
                         f" * exp(N(0, {PRICE_LOG_NOISE}) + {PRICE_QUALITY_SLOPE} * (quality - 0.5))",
            "title_slot_probabilities": TITLE_SLOT_PROBABILITIES,
            "title_template_probabilities": list(TITLE_TEMPLATE_PROBABILITIES),
            "description_template_probabilities": list(DESCRIPTION_TEMPLATE_PROBABILITIES),
            "image": {"weights": {"category": 1.0, "color": IMAGE_COLOR_WEIGHT, "material": IMAGE_MATERIAL_WEIGHT},
                      "noise": IMAGE_NOISE, "normalised": "L2"},
        },
        "query_pool": {
            "size": pool_size,
            "constraint_types": list(CONSTRAINT_TYPES),
            "constraint_count_probabilities": list(CONSTRAINT_COUNT_PROBABILITIES),
            "constraint_type_weights": list(CONSTRAINT_TYPE_WEIGHTS),
            "max_words": MAX_QUERY_WORDS,
            "prefix_probabilities": {p or "none": x for p, x in zip(QUERY_PREFIXES, QUERY_PREFIX_PROBABILITIES)},
            "suffix_probabilities": {p or "none": x for p, x in zip(QUERY_SUFFIXES, QUERY_SUFFIX_PROBABILITIES)},
            "word_order_probabilities": list(QUERY_ORDER_PROBABILITIES),
            "case_probabilities": {"lower": QUERY_CASE_PROBABILITIES[0], "capitalized": QUERY_CASE_PROBABILITIES[1],
                                   "title": QUERY_CASE_PROBABILITIES[2]},
            "typo_probability": TYPO_PROBABILITY,
            "typo_kinds": list(TYPO_KINDS),
            "popularity": f"(rank + {QUERY_ZIPF_OFFSET}) ** -{QUERY_ZIPF_EXPONENT}, rank by words + 1.5 * typo"
                          " + 0.5 * filler + N(0, 1.2)",
        },
        "sessions": {
            "count": n_sessions,
            "results_per_session": list(RESULTS_PER_SESSION),
            "segments": {s: {"probability": p, "price_sensitivity_mean": m}
                         for s, p, m in zip(SEGMENTS, SEGMENT_PROBABILITIES, SEGMENT_PRICE_SENSITIVITY)},
            "price_sensitivity_sd": PRICE_SENSITIVITY_SD,
        },
        "retrieval_sources": dict(zip(SOURCES, SOURCE_PROBABILITIES)),
        "retrieval_best_of": SOURCE_BEST_OF,
        "relevance_grades": {
            "3": "category and all constraints match",
            "2": "category matches, some constraints match and some do not",
            "1": "category matches but no constraint does, or a related category (same department)",
            "0": "irrelevant",
        },
        "engagement_model": {
            "probability": "relevance_multiplier[relevance] * sigmoid(U)",
            "utility": "U = intercept + quality * (product quality - 0.5) - price * sensitivity * log(price / category"
                       " median) + brand_affinity[segment][brand tier] + same_country * (+1 same, -1 other)",
            "relevance_multiplier": list(RELEVANCE_MULTIPLIER),
            "intercept": UTILITY_INTERCEPT,
            "quality": UTILITY_QUALITY,
            "price": UTILITY_PRICE,
            "same_country": UTILITY_SAME_COUNTRY,
            "brand_affinity": [list(row) for row in BRAND_AFFINITY],
        },
        "statistics": {
            "impressions_by_relevance": {str(g): int(grade_rows[g]) for g in range(4)},
            "engagement_rate_by_relevance": {str(g): round(float(grade_engaged[g] / max(grade_rows[g], 1)), 6)
                                             for g in range(4)},
            "engagement_rate": round(float(grade_engaged.sum() / max(total, 1)), 6),
            "impressions_by_source": {s: int(c) for s, c in zip(SOURCES, source_rows)},
        },
    }
