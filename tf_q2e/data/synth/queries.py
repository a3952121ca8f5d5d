"""The query pool: distinct query strings, each with a hidden intent (category and constraints) and a popularity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.data.synth.catalog import _Products
from tf_q2e.data.synth.sampling import _Groups
from tf_q2e.data.synth.taxonomy import _Taxonomy
from tf_q2e.data.synth.text import _capitalize_first, _join, _tokens

MAX_QUERY_WORDS = 6
CONSTRAINT_TYPES = ("brand", "color", "material", "size")
CONSTRAINT_COUNT_PROBABILITIES = (0.25, 0.40, 0.25, 0.10)
CONSTRAINT_TYPE_WEIGHTS = (1.0, 1.2, 0.7, 0.8)
QUERY_PREFIXES = (None, "cheap", "used", "new")
QUERY_PREFIX_PROBABILITIES = (0.90, 0.04, 0.04, 0.02)
QUERY_SUFFIXES = (None, "for sale", "near me")
QUERY_SUFFIX_PROBABILITIES = (0.93, 0.04, 0.03)
QUERY_ORDER_PROBABILITIES = (0.55, 0.15, 0.15, 0.15)  # brand-first, noun-before-brand, noun-first, brand-noun-attributes
QUERY_CASE_PROBABILITIES = (0.93, 0.05, 0.02)  # lower, first letter capital, Title Case
TYPO_PROBABILITY = 0.10
TYPO_KINDS = ("drop", "swap", "duplicate")
QUERIES_PER_SESSION = 0.25
MAX_QUERY_POOL = 250_000
_POOL_ROUNDS = 20  # candidate batches drawn to fill the pool; a tiny catalogue may allow fewer distinct queries
QUERY_ZIPF_EXPONENT = 1.0
QUERY_ZIPF_OFFSET = 10.0


@dataclass
class _QueryPool:
    text: list[str]
    category: np.ndarray  # [Q]
    constraints: np.ndarray  # [Q, 4] brand, color, material, size ids (-1 none)
    weight: np.ndarray  # popularity, sums to 1


def _add_typo(query: str, kind: int, u1: float, u2: float) -> str:
    """Drop, swap (with the next) or duplicate an inner character of a word of 4+ letters."""
    words = query.split(" ")
    eligible = [i for i, w in enumerate(words) if len(w) >= 4]
    if not eligible:
        return query
    i = eligible[int(u1 * len(eligible))]
    w = words[i]
    pos = 1 + int(u2 * (len(w) - 2))  # 1 .. len-2: first and last letters stay
    if kind == 0:
        w = w[:pos] + w[pos + 1:]
    elif kind == 1:
        w = w[:pos] + w[pos + 1] + w[pos] + w[pos + 2:]
    else:
        w = w[:pos] + w[pos] + w[pos:]
    words[i] = w
    return " ".join(words)


def _query_candidates(tax: _Taxonomy, products: _Products, by_category: _Groups, n: int,
                      rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """`n` queries with intents: (text, category, constraints [n, 4], popularity rank key)."""
    present = np.unique(products.category)
    demand = tax.popularity[present] / tax.popularity[present].sum()
    cat = present[rng.choice(len(present), size=n, p=demand)]
    anchor = by_category.sample(cat, rng.random(n))
    anchor_attrs = products.attributes[anchor]  # [n, 4]
    available = anchor_attrs >= 0
    wanted = rng.choice(4, size=n, p=CONSTRAINT_COUNT_PROBABILITIES)
    race = -np.log(1.0 - rng.random((n, 4))) / np.array(CONSTRAINT_TYPE_WEIGHTS)  # weighted order, no replacement
    race[~available] = np.inf
    rank = np.argsort(np.argsort(race, axis=1, kind="stable"), axis=1, kind="stable")
    constraints = np.where((rank < wanted[:, None]) & available, anchor_attrs, -1)
    noun = tax.query_nouns.sample(cat, rng.random(n))
    words = tax.noun_words[noun].copy()
    for t in range(4):
        words += tax.attribute_words[t][constraints[:, t]]
    for t in (3, 2, 1, 0):  # at most 6 words: drop size, then material, colour, brand
        drop = (words > MAX_QUERY_WORDS) & (constraints[:, t] >= 0)
        words -= np.where(drop, tax.attribute_words[t][constraints[:, t]], 0)
        constraints[drop, t] = -1
    prefix = rng.choice(len(QUERY_PREFIXES), size=n, p=QUERY_PREFIX_PROBABILITIES)
    prefix[words + 1 > MAX_QUERY_WORDS] = 0
    words += prefix > 0
    suffix = rng.choice(len(QUERY_SUFFIXES), size=n, p=QUERY_SUFFIX_PROBABILITIES)
    suffix[words + 2 > MAX_QUERY_WORDS] = 0
    words += 2 * (suffix > 0)

    q_brand = _tokens([b.lower() for b in tax.brands], constraints[:, 0])
    q_color = _tokens(tax.colors, constraints[:, 1])
    q_material = _tokens(tax.materials, constraints[:, 2])
    q_size = _tokens(tax.sizes, constraints[:, 3])
    q_noun = _tokens(tax.nouns, noun)
    q_prefix = _tokens([p or "" for p in QUERY_PREFIXES], np.where(prefix > 0, prefix, -1))
    q_suffix = _tokens([s or "" for s in QUERY_SUFFIXES], np.where(suffix > 0, suffix, -1))
    orders = [
        _join(" ", q_prefix, q_brand, q_color, q_material, q_noun, q_size, q_suffix),
        _join(" ", q_prefix, q_color, q_material, q_noun, q_size, q_brand, q_suffix),
        _join(" ", q_prefix, q_noun, q_brand, q_color, q_material, q_size, q_suffix),
        _join(" ", q_prefix, q_brand, q_noun, q_color, q_material, q_size, q_suffix),
    ]
    which = rng.choice(len(orders), size=n, p=QUERY_ORDER_PROBABILITIES).astype(np.int8)
    text = pc.choose(pa.array(which), *orders)
    case = rng.choice(3, size=n, p=QUERY_CASE_PROBABILITIES).astype(np.int8)
    text = pc.choose(pa.array(case), text, _capitalize_first(text), pc.utf8_title(text)).to_pylist()

    typo = rng.random(n) < TYPO_PROBABILITY
    kind = rng.integers(0, len(TYPO_KINDS), n)
    u1, u2 = rng.random(n), rng.random(n)
    for i in np.flatnonzero(typo):  # ~10% of the pool, not the impressions
        text[i] = _add_typo(text[i], int(kind[i]), float(u1[i]), float(u2[i]))
    rank_key = words + 1.5 * typo + 0.5 * ((prefix > 0) | (suffix > 0)) + rng.normal(0.0, 1.2, n)
    return text, cat, constraints, rank_key


def _make_query_pool(tax: _Taxonomy, products: _Products, by_category: _Groups, size: int, seed: int) -> _QueryPool:
    """`size` distinct queries (by lower-cased text), fewer if the catalogue cannot make that many."""
    rng = np.random.default_rng([seed, 1])
    text: list[str] = []
    cats, cons, keys = [], [], []
    seen: set[str] = set()
    for _ in range(_POOL_ROUNDS):
        need = size - len(text)
        if need <= 0:
            break
        t, c, k, r = _query_candidates(tax, products, by_category, max(int(need * 1.5), 4096), rng)
        keep = []
        for i, q in enumerate(t):  # order-preserving de-duplication of the pool
            norm = " ".join(q.lower().split())
            if norm not in seen and len(keep) < need:
                seen.add(norm)
                keep.append(i)
        text += [t[i] for i in keep]
        cats.append(c[keep])
        cons.append(k[keep])
        keys.append(r[keep])
    rank_key = np.concatenate(keys)
    rank = np.empty(len(text), dtype=np.int64)
    rank[np.argsort(rank_key, kind="stable")] = np.arange(len(text))
    weight = (rank + QUERY_ZIPF_OFFSET) ** -QUERY_ZIPF_EXPONENT
    return _QueryPool(text=text, category=np.concatenate(cats), constraints=np.concatenate(cons),
                      weight=weight / weight.sum())
