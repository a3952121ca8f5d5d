"""The static vocabulary of the marketplace (fixed in generator version 1).

Categories with their departments, noun synonyms, colour palettes, materials,
sizes, median prices and popularities; made-up brands with quality tiers;
seller countries with currencies and cities. `_taxonomy()` builds it once, as
arrays, from a fixed seed that is not the data set's `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tf_q2e.data.synth.sampling import _PerCategory


@dataclass(frozen=True)
class _Category:
    name: str
    department: str
    nouns: tuple[str, ...]  # the first is the canonical noun
    palette: str
    materials: tuple[str, ...]
    sizes: tuple[str, ...]
    base_price: float  # USD, median of a new mainstream item
    popularity: float  # relative share of listings and of searches


_PALETTES = {
    "home": ("grey", "beige", "black", "white", "brown", "blue", "green", "navy", "cream"),
    "tech": ("black", "white", "silver", "space grey", "gold", "blue", "red"),
    "apparel": ("black", "navy", "grey", "red", "white", "green", "beige", "pink", "brown", "olive"),
    "gear": ("black", "red", "blue", "white", "green", "orange", "yellow", "silver"),
    "appliance": ("white", "black", "silver", "grey", "red"),
    "wood": ("natural", "black", "sunburst", "brown", "white"),
}
_SHOE_SIZES = ("size 7", "size 8", "size 9", "size 10", "size 11")
_C = _Category
_CATEGORIES = (
    _C("sofa", "Furniture", ("sofa", "couch", "settee"), "home",
       ("leather", "fabric", "velvet", "linen", "faux leather"), ("2-seater", "3-seater", "sectional", "corner"), 450, 1.6),
    _C("armchair", "Furniture", ("armchair", "accent chair", "recliner"), "home", ("leather", "fabric", "velvet"), (), 180, 0.8),
    _C("dining table", "Furniture", ("dining table", "kitchen table"), "home",
       ("oak", "pine", "walnut", "glass", "marble"), ("4-seater", "6-seater", "8-seater", "extendable"), 300, 1.0),
    _C("office chair", "Furniture", ("office chair", "desk chair", "gaming chair"), "home", ("mesh", "leather", "fabric"), (), 150, 0.9),
    _C("bed frame", "Furniture", ("bed frame", "bed", "bedstead"), "home",
       ("wood", "metal", "oak", "upholstered"), ("single", "double", "queen", "king"), 350, 1.0),
    _C("wardrobe", "Furniture", ("wardrobe", "armoire", "closet"), "home", ("oak", "pine", "walnut", "metal"), ("2-door", "3-door", "4-door"), 250, 0.6),
    _C("bookshelf", "Furniture", ("bookshelf", "bookcase", "shelving unit"), "home", ("oak", "pine", "metal", "walnut"), ("3-shelf", "5-shelf"), 100, 0.7),
    _C("desk", "Furniture", ("desk", "computer desk", "writing desk"), "home",
       ("oak", "glass", "metal", "walnut", "pine"), ("small", "large", "l-shaped", "standing"), 180, 0.9),
    _C("desk lamp", "Home Decor", ("desk lamp", "table lamp", "reading lamp"), "home", ("metal", "brass", "ceramic", "glass"), (), 40, 0.6),
    _C("floor lamp", "Home Decor", ("floor lamp", "standing lamp", "arc lamp"), "home", ("metal", "brass", "wood"), (), 80, 0.5),
    _C("rug", "Home Decor", ("rug", "area rug", "carpet"), "home", ("wool", "jute", "cotton", "polyester"), ("5x7", "8x10", "9x12", "runner"), 120, 0.7),
    _C("road bike", "Bikes", ("road bike", "racing bike", "racer"), "gear",
       ("carbon", "aluminum", "steel", "titanium"), ("52cm", "54cm", "56cm", "58cm"), 900, 1.0),
    _C("mountain bike", "Bikes", ("mountain bike", "mtb", "trail bike"), "gear", ("carbon", "aluminum", "steel"), ("small", "medium", "large", "xl"), 800, 1.0),
    _C("e-bike", "Bikes", ("e-bike", "electric bike", "ebike"), "gear", ("aluminum", "steel"), ("small", "medium", "large"), 1500, 0.8),
    _C("iphone", "Phones & Tablets", ("iphone", "apple iphone"), "tech", (), ("64gb", "128gb", "256gb", "512gb"), 500, 1.8),
    _C("android phone", "Phones & Tablets", ("android phone", "smartphone", "cell phone", "mobile phone"), "tech", (), ("64gb", "128gb", "256gb"), 350, 1.4),
    _C("tablet", "Phones & Tablets", ("tablet", "ipad", "android tablet"), "tech", (), ("32gb", "64gb", "128gb", "256gb"), 300, 1.0),
    _C("laptop", "Electronics", ("laptop", "notebook", "macbook"), "tech", ("aluminum", "plastic"), ("13-inch", "14-inch", "15-inch", "17-inch"), 700, 1.5),
    _C("headphones", "Electronics", ("headphones", "headset", "earbuds"), "tech", (), ("over-ear", "on-ear", "in-ear"), 120, 1.0),
    _C("tv", "Electronics", ("tv", "television", "smart tv"), "tech", (), ("32-inch", "43-inch", "55-inch", "65-inch"), 400, 1.2),
    _C("game console", "Electronics", ("game console", "gaming console", "console"), "tech", (), ("500gb", "1tb"), 300, 1.0),
    _C("winter jacket", "Clothing & Shoes", ("winter jacket", "parka", "puffer jacket", "winter coat"), "apparel",
       ("down", "wool", "nylon", "leather"), ("xs", "small", "medium", "large", "xl"), 150, 1.0),
    _C("sneakers", "Clothing & Shoes", ("sneakers", "trainers", "running shoes"), "apparel", ("leather", "canvas", "mesh", "suede"), _SHOE_SIZES, 90, 1.3),
    _C("boots", "Clothing & Shoes", ("boots", "ankle boots", "chelsea boots"), "apparel", ("leather", "suede", "rubber"), _SHOE_SIZES, 110, 0.8),
    _C("handbag", "Clothing & Shoes", ("handbag", "purse", "tote bag", "shoulder bag"), "apparel", ("leather", "canvas", "suede"), ("small", "medium", "large"), 120, 0.9),
    _C("stroller", "Baby & Kids", ("stroller", "pram", "pushchair", "buggy"), "gear", ("aluminum", "steel"), (), 250, 0.8),
    _C("crib", "Baby & Kids", ("crib", "cot", "baby bed"), "home", ("wood", "pine", "oak", "metal"), (), 150, 0.6),
    _C("high chair", "Baby & Kids", ("high chair", "baby chair", "feeding chair"), "home", ("wood", "plastic"), (), 70, 0.5),
    _C("lawn mower", "Garden & Tools", ("lawn mower", "lawnmower", "mower"), "gear", (), ("push", "self-propelled", "ride-on"), 250, 0.7),
    _C("power drill", "Garden & Tools", ("power drill", "cordless drill", "drill"), "gear", (), ("12v", "18v", "20v"), 90, 0.7),
    _C("bbq grill", "Garden & Tools", ("bbq grill", "grill", "barbecue", "bbq"), "gear", ("stainless steel", "cast iron"), ("gas", "charcoal", "electric"), 200, 0.7),
    _C("treadmill", "Sports & Outdoors", ("treadmill", "running machine"), "gear", (), ("folding", "non-folding"), 500, 0.6),
    _C("dumbbells", "Sports & Outdoors", ("dumbbells", "dumbbell set", "weights"), "gear", ("cast iron", "rubber", "chrome"), ("5kg", "10kg", "20kg", "adjustable"), 80, 0.7),
    _C("tent", "Sports & Outdoors", ("tent", "camping tent"), "gear", ("nylon", "polyester", "canvas"), ("2-person", "4-person", "6-person"), 150, 0.6),
    _C("washing machine", "Appliances", ("washing machine", "washer"), "appliance", (), ("7kg", "8kg", "9kg", "10kg"), 400, 0.8),
    _C("refrigerator", "Appliances", ("fridge", "refrigerator", "fridge freezer"), "appliance", (), ("mini", "single-door", "double-door", "side-by-side"), 600, 0.8),
    _C("coffee maker", "Appliances", ("coffee maker", "espresso machine", "coffee machine"), "appliance", (), (), 150, 0.8),
    _C("acoustic guitar", "Musical Instruments", ("acoustic guitar", "guitar"), "wood", ("spruce", "mahogany", "cedar", "rosewood"), ("3/4", "full-size"), 250, 0.7),
    _C("digital piano", "Musical Instruments", ("digital piano", "keyboard", "electric piano"), "appliance", (), ("61-key", "76-key", "88-key"), 500, 0.6),
)
del _C

# (code, share of listings and searchers, currency prefix, currency suffix, units per USD, cities)
_COUNTRIES = (
    ("US", 0.35, "$", "", 1.0, ("New York", "Los Angeles", "Chicago", "Houston", "Austin", "Seattle")),
    ("GB", 0.12, "£", "", 0.79, ("London", "Manchester", "Birmingham", "Leeds", "Bristol")),
    ("CA", 0.08, "C$", "", 1.36, ("Toronto", "Vancouver", "Montreal", "Calgary")),
    ("AU", 0.06, "A$", "", 1.52, ("Sydney", "Melbourne", "Brisbane", "Perth")),
    ("DE", 0.08, "", " €", 0.92, ("Berlin", "Munich", "Hamburg", "Cologne")),
    ("FR", 0.07, "", " €", 0.92, ("Paris", "Lyon", "Marseille", "Toulouse")),
    ("MX", 0.08, "MX$", "", 17.0, ("Mexico City", "Guadalajara", "Monterrey")),
    ("BR", 0.08, "R$", "", 5.0, ("São Paulo", "Rio de Janeiro", "Belo Horizonte")),
    ("IN", 0.08, "₹", "", 83.0, ("Mumbai", "Delhi", "Bangalore", "Hyderabad")),
)

_BRAND_SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "zu", "bel", "dor", "fin", "gar", "hal", "jo", "kel", "lum", "mar",
    "nor", "pel", "quin", "ros", "sol", "tam", "vik", "wen", "yar", "zel", "ax", "bri", "cor", "del", "ex",
    "fla", "gro", "hex", "io", "jet", "kor", "lex", "mo", "nex", "ob", "pra", "rix", "sto", "tek", "ul", "vo",
)
_TAXONOMY_SEED = 20230222  # the taxonomy is part of the generator version, not of `seed`
BRAND_TIER_PROBABILITIES = (0.35, 0.45, 0.20)
BRAND_ZIPF_EXPONENT = 1.2


class _Taxonomy:
    """The fixed world: categories, vocabularies, brands, countries, as arrays."""

    def __init__(self):
        cats = _CATEGORIES
        self.categories = [c.name for c in cats]
        self.departments = list(dict.fromkeys(c.department for c in cats))
        self.department = np.array([self.departments.index(c.department) for c in cats])
        self.category_strings = [f"{c.department} > {c.name}" for c in cats]
        self.popularity = np.array([c.popularity for c in cats])
        self.base_price = np.array([c.base_price for c in cats])

        def vocabulary(lists):
            return list(dict.fromkeys(v for values in lists for v in values))

        self.nouns = vocabulary(c.nouns for c in cats)
        self.colors = vocabulary(_PALETTES[c.palette] for c in cats)
        self.materials = vocabulary(c.materials for c in cats)
        self.sizes = vocabulary(c.sizes for c in cats)
        self.title_nouns = _PerCategory([[self.nouns.index(n) for n in c.nouns] for c in cats], 1.2)
        self.query_nouns = _PerCategory([[self.nouns.index(n) for n in c.nouns] for c in cats], 0.8)
        self.color_lists = _PerCategory([[self.colors.index(v) for v in _PALETTES[c.palette]] for c in cats], 0.6)
        self.material_lists = _PerCategory([[self.materials.index(v) for v in c.materials] for c in cats], 0.5)
        self.size_lists = _PerCategory([[self.sizes.index(v) for v in c.sizes] for c in cats], 0.3)

        rng = np.random.default_rng(_TAXONOMY_SEED)
        taken = set(self.nouns) | set(self.colors) | set(self.materials) | set(self.sizes)
        self.brands: list[str] = []
        brand_lists = []
        for _ in cats:
            ids = []
            for _ in range(int(rng.integers(8, 15))):
                while True:
                    parts = rng.choice(len(_BRAND_SYLLABLES), size=int(rng.choice([2, 3], p=[0.7, 0.3])))
                    name = "".join(_BRAND_SYLLABLES[i] for i in parts)
                    if len(name) >= 4 and name not in taken:
                        break
                taken.add(name)
                ids.append(len(self.brands))
                self.brands.append(name.capitalize())
            brand_lists.append(ids)
        self.brand_tier = rng.choice(3, size=len(self.brands), p=BRAND_TIER_PROBABILITIES).astype(np.int64)
        self.brand_lists = _PerCategory(brand_lists, BRAND_ZIPF_EXPONENT)

        self.country_codes = [c[0] for c in _COUNTRIES]
        self.country_weights = np.array([c[1] for c in _COUNTRIES])
        self.country_weights /= self.country_weights.sum()
        self.currency_prefix = [c[2] for c in _COUNTRIES]
        self.currency_suffix = [c[3] for c in _COUNTRIES]
        self.fx = np.array([c[4] for c in _COUNTRIES])
        self.cities = [city for c in _COUNTRIES for city in c[5]]
        self.city_count = np.array([len(c[5]) for c in _COUNTRIES])
        self.city_start = np.concatenate([[0], np.cumsum(self.city_count)[:-1]])

        # Categories of each department, to draw a related (other) category.
        members = [np.flatnonzero(self.department == d) for d in range(len(self.departments))]
        self.department_members = np.full((len(members), max(map(len, members))), -1, dtype=np.int64)
        for d, m in enumerate(members):
            self.department_members[d, : len(m)] = m
        self.department_size = np.array([len(m) for m in members])
        self.position_in_department = np.array(
            [int(np.flatnonzero(members[d] == c)[0]) for c, d in enumerate(self.department)])

        def word_counts(vocab):
            return np.array([len(v.split()) for v in vocab] + [0], dtype=np.int64)  # index -1 -> 0 words

        self.noun_words = word_counts(self.nouns)
        self.attribute_words = (np.ones(len(self.brands) + 1, dtype=np.int64), word_counts(self.colors),
                                word_counts(self.materials), word_counts(self.sizes))

    def summary(self) -> dict:
        return {
            "categories": len(self.categories),
            "departments": len(self.departments),
            "brands": len(self.brands),
            "colors": len(self.colors),
            "materials": len(self.materials),
            "sizes": len(self.sizes),
            "countries": self.country_codes,
            "category_names": self.category_strings,
        }


@lru_cache(maxsize=1)
def _taxonomy() -> _Taxonomy:
    return _Taxonomy()
