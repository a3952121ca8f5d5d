"""What a search shows and whether the searcher engages: sessions, retrieval, relevance grades and engagement.

The parameters of sessions and searchers (drawn in `generate`: a country, a
brand-affinity segment and a price sensitivity); `_Retriever`, which picks the
shown products from group indexes of the catalogue; `_relevance`, the grade of
each (intent, product) pair; and `_utility`, the hidden searcher utility behind
`P(engaged)`.
"""

from __future__ import annotations

import numpy as np

from tf_q2e.data.synth.catalog import _Products
from tf_q2e.data.synth.sampling import _Groups
from tf_q2e.data.synth.taxonomy import _Taxonomy

# Sessions and searchers.
RESULTS_PER_SESSION = (5, 15)
SEGMENTS = ("budget", "mainstream", "premium")
SEGMENT_PROBABILITIES = (0.35, 0.45, 0.20)
SEGMENT_PRICE_SENSITIVITY = (1.3, 0.8, 0.3)  # mean; N(mean, 0.3) clipped to [0, 2]
PRICE_SENSITIVITY_SD = 0.3

# Retrieval: source of each shown slot.
SOURCES = ("category", "attribute", "local", "related", "lexical", "random")
SOURCE_PROBABILITIES = (0.30, 0.25, 0.20, 0.10, 0.07, 0.08)
SOURCE_BEST_OF = {"category": 3, "attribute": 2, "local": 2}
DEDUPLICATION_ROUNDS = 4

# Engagement.
RELEVANCE_MULTIPLIER = (0.003, 0.03, 0.35, 1.0)
UTILITY_INTERCEPT = -0.9
UTILITY_QUALITY = 3.0
UTILITY_PRICE = 1.2
UTILITY_SAME_COUNTRY = 1.0
BRAND_AFFINITY = ((0.6, 0.0, -0.6), (-0.2, 0.4, -0.2), (-0.8, 0.0, 0.8))  # [segment, brand tier]


class _Retriever:
    """Group indexes of the catalogue for the retrieval sources."""

    def __init__(self, tax: _Taxonomy, products: _Products):
        self.tax = tax
        self.products = products
        self.n = len(products.category)
        C = len(tax.categories)
        cat = products.category.astype(np.int64)
        self.by_category = _Groups(cat)
        self.by_country_category = _Groups(products.country.astype(np.int64) * C + cat)
        self.attribute_sizes = (len(tax.brands), len(tax.colors), len(tax.materials), len(tax.sizes))
        self.by_attribute = [_Groups(cat * (v + 1) + products.attributes[:, t] + 1)
                             for t, v in enumerate(self.attribute_sizes)]
        self.by_material = _Groups(products.attributes[:, 2].astype(np.int64))
        self.by_color = _Groups(products.attributes[:, 1].astype(np.int64))

    def _best_of(self, groups: _Groups, keys: np.ndarray, constraints: np.ndarray, m: int,
                 rng: np.random.Generator) -> np.ndarray:
        """Of `m` random members of each row's group, the one that matches most constraints."""
        cand = groups.sample(keys, rng.random((len(keys), m)))  # [n, m]
        if m == 1:
            return cand[:, 0]
        attrs = self.products.attributes[np.maximum(cand, 0)]  # [n, m, 4]
        score = ((attrs == constraints[:, None, :]) & (constraints[:, None, :] >= 0)).sum(axis=2)
        score = score + 0.5 * rng.random(score.shape) - 10.0 * (cand < 0)
        return cand[np.arange(len(keys)), np.argmax(score, axis=1)]

    def retrieve(self, source: np.ndarray, cat: np.ndarray, constraints: np.ndarray, country: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """A product index per row, drawn from the row's source (empty groups fall back to category, then random)."""
        tax, n = self.tax, len(source)
        out = np.full(n, -1, dtype=np.int64)
        C = len(tax.categories)

        rows = np.flatnonzero(source == SOURCES.index("attribute"))
        has = constraints[rows] >= 0
        race = np.where(has, rng.random(has.shape), 2.0)
        chosen = np.argmin(race, axis=1)
        ok = has.any(axis=1)
        for t in range(4):
            sel = rows[ok & (chosen == t)]
            keys = cat[sel] * (self.attribute_sizes[t] + 1) + constraints[sel, t] + 1
            out[sel] = self._best_of(self.by_attribute[t], keys, constraints[sel], SOURCE_BEST_OF["attribute"], rng)

        rows = np.flatnonzero(source == SOURCES.index("local"))
        out[rows] = self._best_of(self.by_country_category, country[rows] * C + cat[rows], constraints[rows],
                                  SOURCE_BEST_OF["local"], rng)

        rows = np.flatnonzero(source == SOURCES.index("related"))
        dept = tax.department[cat[rows]]
        others = tax.department_size[dept] - 1
        j = (rng.random(len(rows)) * np.maximum(others, 1)).astype(np.int64)
        j = j + (j >= tax.position_in_department[cat[rows]])
        related = tax.department_members[dept, np.minimum(j, tax.department_members.shape[1] - 1)]
        pick = self.by_category.sample(np.where(others > 0, related, -1), rng.random(len(rows)))
        out[rows] = np.where(others > 0, pick, -1)

        rows = np.flatnonzero(source == SOURCES.index("lexical"))
        material, color = constraints[rows, 2], constraints[rows, 1]
        by_material = self.by_material.sample(material, rng.random(len(rows)))
        by_color = self.by_color.sample(color, rng.random(len(rows)))
        anything = rng.integers(0, self.n, len(rows))  # no material or colour asked: any product
        out[rows] = np.where(material >= 0, by_material, np.where(color >= 0, by_color, anything))

        # The category source, and the fallback of every other source whose group was empty.
        rows = np.flatnonzero((out < 0) & (source != SOURCES.index("random")))
        out[rows] = self._best_of(self.by_category, cat[rows], constraints[rows], SOURCE_BEST_OF["category"], rng)
        rows = np.flatnonzero(out < 0)
        out[rows] = rng.integers(0, self.n, len(rows))
        return out


def _relevance(products: _Products, tax: _Taxonomy, product: np.ndarray, cat: np.ndarray,
               constraints: np.ndarray) -> np.ndarray:
    """Graded relevance 0-3 of each (intent, product) row, int8."""
    p_cat = products.category[product]
    constrained = constraints >= 0
    matched = (products.attributes[product] == constraints) & constrained
    n_con, n_match = constrained.sum(axis=1), matched.sum(axis=1)
    same = p_cat == cat
    related = tax.department[p_cat] == tax.department[cat]
    grade = np.where(same, np.where(n_match == n_con, 3, np.where(n_match > 0, 2, 1)), np.where(related, 1, 0))
    return grade.astype(np.int8)


def _utility(products: _Products, product: np.ndarray, segment, sensitivity, country) -> np.ndarray:
    """The searcher's utility U of a product (see the package docstring)."""
    affinity = np.array(BRAND_AFFINITY)[segment, products.tier[product]]
    local = np.where(products.country[product] == country, UTILITY_SAME_COUNTRY, -UTILITY_SAME_COUNTRY)
    return (UTILITY_INTERCEPT + UTILITY_QUALITY * (products.quality[product] - 0.5)
            - UTILITY_PRICE * sensitivity * products.relative_price[product] + affinity + local)
