"""Tests of tf_q2e.data.adapters on tiny fixtures that each test writes itself.

The fixtures follow the published formats (Home Depot CSV in latin-1, ESCI
parquet files, WANDS tab-separated files); their contents are invented.
"""

from __future__ import annotations

import json
import os
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tf_q2e.data import adapters
from tf_q2e.data.schema import (
    CATALOG_FILE,
    MANIFEST_FILE,
    SPLIT_FILES,
    catalog_schema,
    impression_schema,
    normalize_query_for_split,
    query_split,
)
from tf_q2e.errors import DataError

# ---------------------------------------------------------------- helpers


def read_impressions(out_dir) -> dict[str, pa.Table]:
    return {name: pq.read_table(os.path.join(out_dir, f)) for name, f in SPLIT_FILES.items()}


def read_all_impressions(out_dir) -> list[dict]:
    return [row for table in read_impressions(out_dir).values() for row in table.to_pylist()]


def read_catalog(out_dir) -> pa.Table:
    return pq.read_table(os.path.join(out_dir, CATALOG_FILE))


def rows_for(out_dir, query) -> list[dict]:
    return [row for row in read_all_impressions(out_dir) if row["query"] == query]


def assert_split_by_query(out_dir):
    tables = read_impressions(out_dir)
    owner = {}
    for name, table in tables.items():
        for query in table.column("query").to_pylist():
            assert query_split(query) == name, f"{query!r} is in {name}, belongs in {query_split(query)}"
            key = normalize_query_for_split(query)
            assert owner.setdefault(key, name) == name, f"{query!r} is in {owner[key]} and {name}"
    # The fixture must exercise more than one split for this check to mean anything.
    assert sum(table.num_rows > 0 for table in tables.values()) >= 2


def assert_canonical_files(out_dir, context_columns=()):
    assert read_catalog(out_dir).schema.equals(catalog_schema(), check_metadata=False)
    for table in read_impressions(out_dir).values():
        assert table.schema.equals(impression_schema(0, context_columns), check_metadata=False)
    with open(os.path.join(out_dir, MANIFEST_FILE), encoding="utf-8") as f:
        assert json.load(f)["query_context_columns"] == list(context_columns)


def assert_catalog_unique_and_consistent(out_dir):
    catalog = read_catalog(out_dir)
    ids = catalog.column("product_id").to_pylist()
    assert len(ids) == len(set(ids))
    fields = {row["product_id"]: row for row in catalog.to_pylist()}
    for row in read_all_impressions(out_dir):
        product = fields[row["product_id"]]
        for name in ("product_title", "product_description", "product_category"):
            assert row[name] == product[name]


# ---------------------------------------------------------------- Home Depot fixture

# (id, product_uid, product_title, search_term, relevance) -- invented rows.
HOMEDEPOT_ROWS = [
    (1, 200001, "Acme 50 ft. Garden Hose", "garden hose", "3"),
    (2, 200002, "Bolt 9 in. Paint Roller 2-Pack", "paint roller", "2.67"),
    (3, 200003, "Crane 30\u00e5\u00a1 Steel Kitchen Sink", "kitchen sink", "2.33"),
    (4, 200004, 'Dover 2-1/2" Door Knob, Brass', "door knob", "2"),
    (5, 200005, "Elm 52 in. Ceiling Fan", "ceiling fan", "1"),
    # 200006: title B is seen first but once, title A twice -> A wins everywhere.
    (6, 200006, "Fern Round Toilet Seat, White", "toilet seat", "2.5"),
    (7, 200006, "Fern Round Toilet Seat in White", "round toilet seat", "1.67"),
    (8, 200006, "Fern Round Toilet Seat in White", "white toilet seat", "3"),
    # 200007: one row per title -> the first seen wins.
    (9, 200007, "Hale LED Desk Lamp", "desk lamp", "2.75"),
    (10, 200007, "Hale Desk Lamp with LED", "led desk lamp", "1.33"),
    (11, 200001, "Acme 50 ft. Garden Hose", "hose", "2.25"),
    (12, 200008, "Gale 9 ft. Patio Umbrella", "patio umbrella", "2.665"),
]


def homedepot_csv_bytes(rows=HOMEDEPOT_ROWS, header=("id", "product_uid", "product_title", "search_term", "relevance")) -> bytes:
    """The published format: header, quoted strings, bare numbers, latin-1."""

    def quote(text):
        return '"' + str(text).replace('"', '""') + '"'

    lines = [",".join(quote(h) for h in header)]
    for row in rows:
        lines.append(",".join(quote(v) if isinstance(v, str) and i in (2, 3) else str(v) for i, v in enumerate(row)))
    return ("\n".join(lines) + "\n").encode("latin-1")


@pytest.fixture
def homedepot_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(homedepot_csv_bytes())
    return path


@pytest.fixture
def homedepot_out(tmp_path, homedepot_csv):
    out = tmp_path / "out"
    manifest = adapters.prepare("homedepot", str(homedepot_csv), str(out))
    return out, manifest


def test_homedepot_writes_canonical_files(homedepot_out):
    out, _ = homedepot_out
    assert_canonical_files(out)


@pytest.mark.parametrize(
    "query, engaged, relevance",
    [
        ("garden hose", 1, 3.0),
        ("paint roller", 1, 2.67),
        ("patio umbrella", 1, 2.665),
        ("kitchen sink", -1, 2.33),
        ("hose", -1, 2.25),
        ("door knob", 0, 2.0),
        ("ceiling fan", 0, 1.0),
    ],
)
def test_homedepot_maps_relevance_to_labels(homedepot_out, query, engaged, relevance):
    out, _ = homedepot_out
    (row,) = rows_for(out, query)
    assert row["engaged"] == engaged
    assert row["relevance"] == pytest.approx(relevance, abs=1e-6)


def test_homedepot_decodes_latin1(homedepot_csv, homedepot_out):
    assert b"30\xe5\xa1" in homedepot_csv.read_bytes()  # the fixture holds raw latin-1 bytes
    out, _ = homedepot_out
    titles = read_catalog(out).column("product_title").to_pylist()
    assert "Crane 30\u00e5\u00a1 Steel Kitchen Sink" in titles
    (row,) = rows_for(out, "kitchen sink")
    assert row["product_title"] == "Crane 30\u00e5\u00a1 Steel Kitchen Sink"


def test_homedepot_keeps_quoted_commas_and_quotes(homedepot_out):
    out, _ = homedepot_out
    (row,) = rows_for(out, "door knob")
    assert row["product_id"] == "200004"
    assert row["product_title"] == 'Dover 2-1/2" Door Knob, Brass'


def test_homedepot_catalog_has_each_product_once(homedepot_out):
    out, _ = homedepot_out
    catalog = read_catalog(out)
    assert sorted(catalog.column("product_id").to_pylist()) == [str(200001 + i) for i in range(8)]
    assert set(catalog.column("product_description").to_pylist()) == {""}
    assert set(catalog.column("product_category").to_pylist()) == {""}


def test_homedepot_resolves_title_seen_most(homedepot_out):
    out, _ = homedepot_out
    catalog = {r["product_id"]: r["product_title"] for r in read_catalog(out).to_pylist()}
    assert catalog["200006"] == "Fern Round Toilet Seat in White"
    for query in ("toilet seat", "round toilet seat", "white toilet seat"):
        (row,) = rows_for(out, query)
        assert row["product_title"] == "Fern Round Toilet Seat in White"


def test_homedepot_resolves_title_tie_to_first_seen(homedepot_out):
    out, _ = homedepot_out
    (row,) = rows_for(out, "led desk lamp")
    assert row["product_title"] == "Hale LED Desk Lamp"


def test_homedepot_counts_resolved_products(homedepot_out):
    out, manifest = homedepot_out
    resolved = manifest["source"]["resolved"]["product_fields"]
    assert resolved["count"] == 2
    assert resolved["product_ids"] == ["200006", "200007"]
    assert resolved["records_with_other_fields"] == 2  # one toilet-seat row, one desk-lamp row
    assert_catalog_unique_and_consistent(out)


def test_homedepot_splits_by_query(homedepot_out):
    out, _ = homedepot_out
    assert_split_by_query(out)


def test_homedepot_manifest_records_source(homedepot_out):
    _, manifest = homedepot_out
    source = manifest["source"]
    assert source["dataset"] == "homedepot"
    assert [f["name"] for f in source["input_files"]] == ["train.csv"]
    assert source["label_mapping"] == adapters.HOMEDEPOT_LABEL_MAPPING
    assert source["label_counts"]["3.00"] == 2
    assert source["rows"] == {"impressions_read": 12, "impressions_written": 12, "product_records_read": 12, "catalog": 8}
    counts = manifest["counts"]
    assert sum(counts[s]["engaged"] for s in SPLIT_FILES) == 5
    assert sum(counts[s]["not_engaged"] for s in SPLIT_FILES) == 4
    assert sum(counts[s]["unlabelled"] for s in SPLIT_FILES) == 3


def test_homedepot_reads_zip_like_csv(tmp_path, homedepot_out):
    csv_out, _ = homedepot_out
    archive = tmp_path / "train.csv.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("train.csv", homedepot_csv_bytes())
    manifest = adapters.prepare("homedepot", str(archive), str(tmp_path / "zip_out"))
    assert manifest["source"]["input_files"][0]["name"] == "train.csv.zip"
    assert manifest["source"]["input_files"][0]["member"] == "train.csv"
    for name in (CATALOG_FILE, *SPLIT_FILES.values()):
        assert (tmp_path / "zip_out" / name).read_bytes() == (csv_out / name).read_bytes()


def test_homedepot_output_is_deterministic(tmp_path, homedepot_csv, homedepot_out):
    out, _ = homedepot_out
    adapters.prepare("homedepot", str(homedepot_csv), str(tmp_path / "again"))
    for name in (CATALOG_FILE, *SPLIT_FILES.values(), MANIFEST_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_homedepot_counts_dropped_empty_query(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(homedepot_csv_bytes(HOMEDEPOT_ROWS + [(13, 200009, "Ivy Planter", "  ", "3")]))
    manifest = adapters.prepare("homedepot", str(path), str(tmp_path / "out"))
    source = manifest["source"]
    assert source["dropped"]["impressions"]["empty query"] == 1
    assert source["rows"]["impressions_read"] == 13
    assert source["rows"]["impressions_written"] == 12
    assert sum(manifest["counts"][s]["rows"] for s in SPLIT_FILES) == 12


def test_homedepot_missing_column_raises(tmp_path):
    path = tmp_path / "train.csv"
    rows = [r[:4] for r in HOMEDEPOT_ROWS]
    path.write_bytes(homedepot_csv_bytes(rows, header=("id", "product_uid", "product_title", "search_term")))
    with pytest.raises(DataError) as error:
        adapters.prepare("homedepot", str(path), str(tmp_path / "out"))
    assert str(path) in str(error.value)
    assert "'relevance'" in str(error.value)


def test_homedepot_unknown_relevance_raises(tmp_path):
    path = tmp_path / "train.csv"
    rows = list(HOMEDEPOT_ROWS)
    rows[2] = (3, 200003, "Crane Sink", "kitchen sink", "4.5")
    path.write_bytes(homedepot_csv_bytes(rows))
    with pytest.raises(DataError) as error:
        adapters.prepare("homedepot", str(path), str(tmp_path / "out"))
    message = str(error.value)
    assert str(path) in message and "data row 3" in message and "'relevance'" in message and "'4.5'" in message
    assert not (tmp_path / "out").exists()  # nothing is written before the input is checked


# ---------------------------------------------------------------- ESCI fixture

ESCI_PRODUCTS = {
    "product_id": ["B001", "B001", "B002", "B003", "B004"],
    "product_locale": ["us", "jp", "us", "es", "us"],
    "product_title": ["Cotton T-Shirt", "\u30b3\u30c3\u30c8\u30f3T\u30b7\u30e3\u30c4", "Phone Case", "Funda", "Desk Lamp"],
    "product_description": ["<p>Soft <b>cotton</b>&nbsp;shirt.</p>\n", None, "", "Funda de   silicona", None],
    "product_bullet_point": ["ignored", "\u67d4\u3089\u304b\u3044\n\u7dbf", "Fits model X\nShockproof", None, None],
    "product_brand": ["Acme", None, "Bolt", None, "Lumo"],
    "product_color": ["Blue", "", None, None, None],
}
# (query, product_id, product_locale, esci_label)
ESCI_EXAMPLES = [
    ("t shirt", "B001", "us", "E"),
    ("\u30c6\u30a3\u30fc\u30b7\u30e3\u30c4", "B001", "jp", "E"),
    ("phone case", "B002", "us", "S"),
    ("phone case", "B004", "us", "C"),
    ("funda movil", "B003", "es", "I"),
    ("t shirt", "B002", "us", "I"),
    ("blue shirt", "B999", "us", "E"),  # not in the products file
    ("coffee table", "B004", "us", "C"),
]


def esci_examples_table(examples=ESCI_EXAMPLES) -> pa.Table:
    n = len(examples)
    query, product_id, locale, label = (list(c) for c in zip(*examples))
    return pa.table(
        {
            "example_id": list(range(n)),
            "query": query,
            "query_id": list(range(100, 100 + n)),
            "product_id": product_id,
            "product_locale": locale,
            "esci_label": label,
            "small_version": [1] * n,
            "large_version": [1] * n,
            "split": ["train"] * n,
        }
    )


@pytest.fixture
def esci_dir(tmp_path):
    directory = tmp_path / "esci"
    directory.mkdir()
    pq.write_table(esci_examples_table(), directory / adapters.ESCI_EXAMPLES_FILE)
    pq.write_table(pa.table(ESCI_PRODUCTS), directory / adapters.ESCI_PRODUCTS_FILE)
    return directory


@pytest.fixture
def esci_out(tmp_path, esci_dir):
    out = tmp_path / "out"
    return out, adapters.prepare("esci", str(esci_dir), str(out))


def test_esci_writes_canonical_files(esci_out):
    out, _ = esci_out
    assert_canonical_files(out, ("query_locale",))


@pytest.mark.parametrize(
    "query, product_id, engaged, relevance",
    [
        ("t shirt", "us:B001", 1, 3.0),
        ("phone case", "us:B002", -1, 2.0),
        ("phone case", "us:B004", -1, 1.0),
        ("funda movil", "es:B003", 0, 0.0),
        ("t shirt", "us:B002", 0, 0.0),
    ],
)
def test_esci_maps_labels(esci_out, query, product_id, engaged, relevance):
    out, _ = esci_out
    (row,) = [r for r in rows_for(out, query) if r["product_id"] == product_id]
    assert (row["engaged"], row["relevance"]) == (engaged, relevance)


def test_esci_keys_products_by_locale(esci_out):
    out, _ = esci_out
    (us,) = [r for r in rows_for(out, "t shirt") if r["product_id"] == "us:B001"]
    (jp,) = rows_for(out, "\u30c6\u30a3\u30fc\u30b7\u30e3\u30c4")
    assert (us["query_locale"], us["product_title"]) == ("us", "Cotton T-Shirt")
    assert (jp["query_locale"], jp["product_id"]) == ("jp", "jp:B001")
    assert jp["product_title"] == "\u30b3\u30c3\u30c8\u30f3T\u30b7\u30e3\u30c4"


def test_esci_builds_descriptions(esci_out):
    out, _ = esci_out
    descriptions = {r["product_id"]: r["product_description"] for r in read_catalog(out).to_pylist()}
    assert descriptions == {
        "us:B001": "brand: Acme. color: Blue. Soft cotton shirt.",
        "jp:B001": "\u67d4\u3089\u304b\u3044 \u7dbf",
        "us:B002": "brand: Bolt. Fits model X Shockproof",
        "es:B003": "Funda de silicona",
        "us:B004": "brand: Lumo.",
    }


def test_esci_catalog_holds_every_product_once(esci_out):
    out, _ = esci_out
    ids = read_catalog(out).column("product_id").to_pylist()
    assert sorted(ids) == ["es:B003", "jp:B001", "us:B001", "us:B002", "us:B004"]
    assert_catalog_unique_and_consistent(out)


def test_esci_counts_example_without_product(esci_out):
    out, manifest = esci_out
    source = manifest["source"]
    assert source["dropped"]["impressions"][f"product not in {adapters.ESCI_PRODUCTS_FILE}"] == 1
    assert source["rows"]["impressions_read"] == 8
    assert source["rows"]["impressions_written"] == 7
    assert rows_for(out, "blue shirt") == []
    assert source["label_counts"] == {"E": 3, "S": 1, "C": 2, "I": 2}
    assert source["label_mapping"]["S"] == {"engaged": -1, "relevance": 2}


def test_esci_splits_by_query(esci_out):
    out, _ = esci_out
    assert_split_by_query(out)


def test_esci_accepts_merged_file(tmp_path):
    examples = esci_examples_table(ESCI_EXAMPLES[:6] + ESCI_EXAMPLES[7:])
    products = pa.table(ESCI_PRODUCTS).rename_columns([f"p_{c}" for c in ESCI_PRODUCTS])
    merged = examples.join(products, ["product_id", "product_locale"], ["p_product_id", "p_product_locale"])
    merged = merged.rename_columns([c.removeprefix("p_") for c in merged.column_names]).sort_by("example_id")
    path = tmp_path / "merged.parquet"
    pq.write_table(merged, path)
    manifest = adapters.prepare("esci", str(path), str(tmp_path / "out"))
    catalog = {r["product_id"]: r for r in read_catalog(tmp_path / "out").to_pylist()}
    assert sorted(catalog) == ["es:B003", "jp:B001", "us:B001", "us:B002", "us:B004"]
    assert catalog["us:B001"]["product_description"] == "brand: Acme. color: Blue. Soft cotton shirt."
    assert manifest["source"]["rows"]["impressions_written"] == 7


def test_esci_missing_column_raises(tmp_path, esci_dir):
    path = esci_dir / adapters.ESCI_PRODUCTS_FILE
    pq.write_table(pa.table(ESCI_PRODUCTS).drop_columns(["product_color"]), path)
    with pytest.raises(DataError) as error:
        adapters.prepare("esci", str(esci_dir), str(tmp_path / "out"))
    assert str(path) in str(error.value) and "'product_color'" in str(error.value)


def test_esci_unknown_label_raises(tmp_path, esci_dir):
    examples = list(ESCI_EXAMPLES)
    examples[4] = ("funda movil", "B003", "es", "X")
    path = esci_dir / adapters.ESCI_EXAMPLES_FILE
    pq.write_table(esci_examples_table(examples), path)
    with pytest.raises(DataError) as error:
        adapters.prepare("esci", str(esci_dir), str(tmp_path / "out"))
    message = str(error.value)
    assert str(path) in message and "data row 5" in message and "'esci_label'" in message and "'X'" in message


# ---------------------------------------------------------------- WANDS fixture

WANDS_QUERIES = [("query_id", "query", "query_class"), ("0", "salon chair", "Massage Chairs"),
                 ("1", "coffee table", "Coffee Tables"), ("2", "sofa", "Sofas")]  # fmt: skip
WANDS_PRODUCTS = [
    ("product_id", "product_name", "product_class", "category hierarchy", "product_description",
     "product_features", "rating_count", "average_rating", "review_count"),
    ("10", "oak platform bed", "Beds", "Furniture / Bedroom Furniture / Beds", "a  sturdy   bed", "color:oak", "3", "4.5", "3"),
    ("11", "pro salon chair", "", "Commercial Furniture / Salon / Salon Chairs", "", "", "", "", ""),
    ("12", "round coffee table", "Coffee Tables", "Furniture / Living Room / Coffee Tables", "round top", "", "1", "5.0", "1"),
    ("13", "wool area rug", "Area Rugs", "Rugs / Area Rugs", "soft", "", "", "", ""),
]  # fmt: skip
WANDS_LABELS = [("id", "query_id", "product_id", "label"), ("0", "0", "11", "Exact"), ("1", "0", "10", "Irrelevant"),
                ("2", "1", "12", "Partial"), ("3", "2", "10", "Irrelevant"), ("4", "9", "10", "Exact"),
                ("5", "1", "99", "Partial"), ("6", "2", "12", "Exact")]  # fmt: skip


def write_tsv(path, rows):
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def wands_dir(tmp_path):
    directory = tmp_path / "wands"
    directory.mkdir()
    write_tsv(directory / "query.csv", WANDS_QUERIES)
    write_tsv(directory / "product.csv", WANDS_PRODUCTS)
    write_tsv(directory / "label.csv", WANDS_LABELS)
    return directory


@pytest.fixture
def wands_out(tmp_path, wands_dir):
    out = tmp_path / "out"
    return out, adapters.prepare("wands", str(wands_dir), str(out))


def test_wands_writes_canonical_files(wands_out):
    out, _ = wands_out
    assert_canonical_files(out)


@pytest.mark.parametrize(
    "query, product_id, engaged, relevance",
    [
        ("salon chair", "11", 1, 2.0),
        ("salon chair", "10", 0, 0.0),
        ("coffee table", "12", -1, 1.0),
        ("sofa", "12", 1, 2.0),
    ],
)
def test_wands_maps_labels(wands_out, query, product_id, engaged, relevance):
    out, _ = wands_out
    (row,) = [r for r in rows_for(out, query) if r["product_id"] == product_id]
    assert (row["engaged"], row["relevance"]) == (engaged, relevance)


def test_wands_maps_product_fields(wands_out):
    out, _ = wands_out
    catalog = {r["product_id"]: r for r in read_catalog(out).to_pylist()}
    assert catalog["10"]["product_title"] == "oak platform bed"
    assert catalog["10"]["product_description"] == "a sturdy bed"
    assert catalog["10"]["product_category"] == "Beds"
    assert catalog["11"]["product_category"] == "Salon Chairs"  # product_class empty -> hierarchy's last part


def test_wands_catalog_holds_every_product_once(wands_out):
    out, _ = wands_out
    assert sorted(read_catalog(out).column("product_id").to_pylist()) == ["10", "11", "12", "13"]
    assert_catalog_unique_and_consistent(out)


def test_wands_counts_dropped_labels(wands_out):
    _, manifest = wands_out
    source = manifest["source"]
    assert source["dropped"]["impressions"]["query_id not in query.csv"] == 1
    assert source["dropped"]["impressions"]["product_id not in product.csv"] == 1
    assert source["rows"]["impressions_read"] == 7
    assert source["rows"]["impressions_written"] == 5
    assert source["label_counts"] == {"Exact": 3, "Partial": 2, "Irrelevant": 2}


def test_wands_splits_by_query(wands_out):
    out, _ = wands_out
    assert_split_by_query(out)


def test_wands_missing_column_raises(tmp_path, wands_dir):
    write_tsv(wands_dir / "product.csv", [row[:2] + row[3:] for row in WANDS_PRODUCTS])  # no product_class
    with pytest.raises(DataError) as error:
        adapters.prepare("wands", str(wands_dir), str(tmp_path / "out"))
    assert str(wands_dir / "product.csv") in str(error.value) and "'product_class'" in str(error.value)


def test_wands_unknown_label_raises(tmp_path, wands_dir):
    write_tsv(wands_dir / "label.csv", WANDS_LABELS[:3] + [("2", "1", "12", "Somewhat")] + WANDS_LABELS[4:])
    with pytest.raises(DataError) as error:
        adapters.prepare("wands", str(wands_dir), str(tmp_path / "out"))
    message = str(error.value)
    assert str(wands_dir / "label.csv") in message and "data row 3" in message and "'label'" in message


# ---------------------------------------------------------------- prepare


def test_prepare_unknown_dataset_raises(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'escii'.*esci, wands, homedepot.*did you mean 'esci'"):
        adapters.prepare("escii", str(tmp_path), str(tmp_path / "out"))


def test_prepare_missing_input_raises(tmp_path):
    missing = tmp_path / "nope" / "train.csv"
    with pytest.raises(DataError, match="does not exist") as error:
        adapters.prepare("homedepot", str(missing), str(tmp_path / "out"))
    assert str(missing) in str(error.value)


def test_prepare_missing_wands_file_raises(tmp_path, wands_dir):
    os.remove(wands_dir / "label.csv")
    with pytest.raises(DataError, match="label.csv") as error:
        adapters.prepare("wands", str(wands_dir), str(tmp_path / "out"))
    assert "not found" in str(error.value)
