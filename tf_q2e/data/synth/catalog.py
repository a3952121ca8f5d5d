"""The catalogue: products with hidden attributes, quality and price, and their titles, descriptions and images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf_q2e.data import schema
from tf_q2e.data.synth.taxonomy import _Taxonomy
from tf_q2e.data.synth.text import _capitalize_first, _cat, _join, _keep, _tokens, _word_title

# Conditions: title word, description adjective, description phrase, probability, quality shift, price factor.
_CONDITIONS = (
    ("new", "brand new", "brand new", 0.22, 0.6, 1.0),
    ("like new", "like new", "in like-new condition", 0.23, 0.4, 0.8),
    ("used", "used", "in good used condition", 0.35, 0.0, 0.6),
    ("used - fair", "well used", "in fair condition", 0.15, -0.5, 0.45),
    ("for parts", "broken", "for parts or repair", 0.05, -1.5, 0.2),
)
TIER_PRICE_FACTOR = (0.6, 1.0, 1.8)
TIER_QUALITY_SHIFT = 0.8
QUALITY_NOISE = 0.6
PRICE_LOG_NOISE = 0.35
PRICE_QUALITY_SLOPE = 0.3

# Probability that an optional attribute is shown in a title.
TITLE_SLOT_PROBABILITIES = {"brand": 0.85, "color": 0.75, "material": 0.65, "size": 0.6, "condition": 0.8}
TITLE_TEMPLATE_PROBABILITIES = (0.3, 0.2, 0.15, 0.15, 0.1, 0.1)
DESCRIPTION_TEMPLATE_PROBABILITIES = (0.3, 0.3, 0.2, 0.2)
DESCRIPTION_BRAND_PROBABILITY = 0.75
DESCRIPTION_EXTRA_PROBABILITY = 0.35
_DESCRIPTION_EXTRAS = (
    "Smoke-free home.", "No lowballers please.", "Dimensions in the photos.", "Can deliver for a fee.",
    "Message me if interested.", "Price is firm.", "Pet-free home.", "Cash or bank transfer.",
)
IMAGE_COLOR_WEIGHT = 0.45
IMAGE_MATERIAL_WEIGHT = 0.35
IMAGE_NOISE = 0.35


@dataclass
class _Products:
    """Hidden attributes of the catalogue, one entry per product (index = row)."""

    category: np.ndarray
    attributes: np.ndarray  # [P, 4] brand, color, material, size ids (-1 none)
    tier: np.ndarray
    condition: np.ndarray
    country: np.ndarray
    quality: np.ndarray  # (0, 1)
    relative_price: np.ndarray  # log(price_usd / category median)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _make_catalog(tax: _Taxonomy, n: int, image_dim: int, seed: int) -> tuple[pa.Table, _Products]:
    rng = np.random.default_rng([seed, 0])
    cat = rng.choice(len(tax.categories), size=n, p=tax.popularity / tax.popularity.sum())
    brand = tax.brand_lists.sample(cat, rng.random(n))
    color = tax.color_lists.sample(cat, rng.random(n))
    material = tax.material_lists.sample(cat, rng.random(n))
    size = tax.size_lists.sample(cat, rng.random(n))
    noun = tax.title_nouns.sample(cat, rng.random(n))
    cond_p = np.array([c[3] for c in _CONDITIONS])
    condition = rng.choice(len(_CONDITIONS), size=n, p=cond_p / cond_p.sum())
    country = rng.choice(len(tax.country_codes), size=n, p=tax.country_weights)
    city = tax.city_start[country] + (rng.random(n) * tax.city_count[country]).astype(np.int64)
    tier = tax.brand_tier[brand]
    cond_quality = np.array([c[4] for c in _CONDITIONS])
    quality = _sigmoid(TIER_QUALITY_SHIFT * (tier - 1) + cond_quality[condition] + rng.normal(0.0, QUALITY_NOISE, n))
    cond_price = np.array([c[5] for c in _CONDITIONS])
    price_usd = (tax.base_price[cat] * np.array(TIER_PRICE_FACTOR)[tier] * cond_price[condition]
                 * np.exp(rng.normal(0.0, PRICE_LOG_NOISE, n) + PRICE_QUALITY_SLOPE * (quality - 0.5)))
    local = price_usd * tax.fx[country]
    step = np.where(local >= 1000, 10, np.where(local >= 100, 5, 1))
    local = np.maximum(1, np.round(local / step) * step).astype(np.int64)
    products = _Products(
        category=cat, attributes=np.stack([brand, color, material, size], axis=1), tier=tier,
        condition=condition, country=country, quality=quality.astype(np.float32),
        relative_price=np.log(price_usd / tax.base_price[cat]).astype(np.float32))

    # Titles: 6 templates over optional slots.
    slot = {k: rng.random(n) < p for k, p in TITLE_SLOT_PROBABILITIES.items()}
    titled = [_word_title(s) for s in tax.brands]
    t_brand = _keep(_tokens(titled, brand), slot["brand"])
    t_color = _keep(_tokens(tax.colors, color), slot["color"])
    t_color_t = _keep(_tokens([_word_title(s) for s in tax.colors], color), slot["color"])
    t_material = _keep(_tokens(tax.materials, material), slot["material"])
    t_material_t = _keep(_tokens([_word_title(s) for s in tax.materials], material), slot["material"])
    t_size = _keep(_tokens(tax.sizes, size), slot["size"])
    t_noun = _tokens(tax.nouns, noun)
    t_noun_t = _tokens([_word_title(s) for s in tax.nouns], noun)
    t_cond = _keep(_tokens([c[0] for c in _CONDITIONS], condition), slot["condition"])
    titles = [
        _join(" ", t_brand, t_color_t, t_material_t, t_noun_t, t_size),
        _join(", ", _join(" - ", _join(" ", t_cond, t_noun), _join(" ", t_color, t_material)), t_brand),
        _capitalize_first(_join(" - ", _join(" ", t_noun, t_size, t_color), t_brand)),
        _capitalize_first(_join(" ", t_brand, t_color, t_noun, _cat("(", t_cond, ")"))),
        _capitalize_first(_join(" ", t_color, t_material, t_noun, "for sale")),
        _capitalize_first(_join(", ", _join(" ", t_brand, t_size, t_noun), t_color, t_cond)),
    ]
    which = rng.choice(len(titles), size=n, p=TITLE_TEMPLATE_PROBABILITIES).astype(np.int8)
    title = pc.choose(pa.array(which), *titles)
    del titles

    # Descriptions: 4 templates; every attribute the product has is mentioned.
    d_brand = _keep(_tokens(titled, brand), rng.random(n) < DESCRIPTION_BRAND_PROBABILITY)
    d_brand_all = _tokens(titled, brand)
    d_color = _tokens(tax.colors, color)
    d_material = _tokens(tax.materials, material)
    d_size = _tokens(tax.sizes, size)
    d_noun = _tokens(tax.nouns, noun)
    d_adjective = _tokens([c[1] for c in _CONDITIONS], condition)
    d_phrase = _tokens([c[2] for c in _CONDITIONS], condition)
    d_cond = _tokens([c[0] for c in _CONDITIONS], condition)
    d_price = _cat(_tokens(tax.currency_prefix, country), pc.cast(pa.array(local), pa.string()),
                   _tokens(tax.currency_suffix, country))
    d_city = _tokens(tax.cities, city)
    extra_ids = np.where(rng.random(n) < DESCRIPTION_EXTRA_PROBABILITY,
                         rng.integers(0, len(_DESCRIPTION_EXTRAS), n), -1)
    d_extra = _tokens(list(_DESCRIPTION_EXTRAS), extra_ids)
    descriptions = [
        _join(" ", _cat(_capitalize_first(_join(" ", d_adjective, d_color, d_material, d_noun, _cat("by ", d_brand))), "."),
              _cat("Asking ", d_price, "."), _cat("Pickup in ", d_city, "."), d_extra),
        _join(" ", _cat(_join(" ", "Selling my", d_brand_all, d_noun, _cat("(", d_size, ")")), ", ", d_phrase, "."),
              _cat("Material: ", d_material, "."), _cat(_capitalize_first(d_color), " color."),
              _cat(d_price, " or best offer, pick up in ", d_city, "."), d_extra),
        _join(" ", _cat(d_brand_all, " ", d_noun, " for sale."), _cat("Color: ", d_color, "."),
              _cat("Material: ", d_material, "."), _cat("Size: ", d_size, "."), _cat("Condition: ", d_cond, "."),
              _cat("Price: ", d_price, "."), _cat("Located in ", d_city, ".")),
        _join(" ", "Moving sale!",
              _cat(_capitalize_first(_join(" ", d_color, d_material, d_noun, _cat("from ", d_brand))), ", ", d_phrase, "."),
              _cat(d_price, ", cash only."), _cat(d_city, " area."), d_extra),
    ]
    which = rng.choice(len(descriptions), size=n, p=DESCRIPTION_TEMPLATE_PROBABILITIES).astype(np.int8)
    description = pc.choose(pa.array(which), *descriptions)
    del descriptions

    width = max(7, len(str(n - 1)))
    ids = pc.binary_join_element_wise(
        "P", pc.utf8_lpad(pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string()), width=width, padding="0"), "")
    columns = {
        schema.PRODUCT_ID: ids,
        schema.PRODUCT_TITLE: title,
        schema.PRODUCT_DESCRIPTION: description,
        schema.PRODUCT_CATEGORY: _tokens(tax.category_strings, cat),
    }
    if image_dim:
        columns[schema.PRODUCT_IMAGE_EMBEDDING] = _image_embeddings(tax, products, image_dim, seed)
    return pa.table(columns), products


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _image_embeddings(tax: _Taxonomy, products: _Products, dim: int, seed: int) -> pa.Array:
    """Category centroid + colour and material directions + noise, L2-normalised, float32 [P, dim]."""
    rng = np.random.default_rng([seed, 5])
    centroid = _unit_rows(rng.normal(size=(len(tax.categories), dim)))
    color_dir = _unit_rows(rng.normal(size=(len(tax.colors), dim)))
    material_dir = np.vstack([_unit_rows(rng.normal(size=(len(tax.materials), dim))), np.zeros((1, dim))])
    n = len(products.category)
    out = np.empty((n, dim), dtype=np.float32)
    block = 1 << 18
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        attrs = products.attributes[lo:hi]
        x = (centroid[products.category[lo:hi]] + IMAGE_COLOR_WEIGHT * color_dir[attrs[:, 1]]
             + IMAGE_MATERIAL_WEIGHT * material_dir[attrs[:, 2]]  # -1 -> the zero row
             + rng.normal(0.0, IMAGE_NOISE / math.sqrt(dim), size=(hi - lo, dim)))
        out[lo:hi] = _unit_rows(x)
    return pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), dim)
