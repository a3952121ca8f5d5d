"""In-graph text featurization: normalize, tokens, TextHasher, hash_strings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata

import tf_q2e  # noqa: F401  (Keras 2 before TensorFlow)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tf_q2e.config import FeaturesConfig  # noqa: E402
from tf_q2e.features import (  # noqa: E402
    TextHasher,
    fold_table,
    hash_strings,
    normalize,
    tokens,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = 2**18
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Texts that exercise every branch: ASCII and non-ASCII rows in one batch, marks,
# format characters, invalid UTF-8, blanks, one-letter words, long words.
MIXED = [
    "Red sofa", "", "   ", "a", "Café Crème brûlée", "ＡＢＣ ｄｅｆ", "日本語 の テスト", "x\u0301y Ωmega ΣΟΦΆΣ",
    "men's t-shirt, 2.5m (XL)", "wash\u00adable soft\u200dware", b"bad\xff\xfebytes here", "emoji ❤️ sofa 👩‍💻",
    "supercalifragilisticexpialidocious", "one two three four five six seven",
]


def _text(values) -> tf.Tensor:
    return tf.constant(values, tf.string)


def _strings(tensor) -> list:
    value = tensor.to_list() if isinstance(tensor, tf.RaggedTensor) else tensor.numpy().tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return [[t.decode("utf-8") for t in row] if isinstance(row, list) else row.decode("utf-8") for row in value]


def reference_normalize(text: str) -> str:
    """Pure Python: NFKD without combining marks, case fold, P/S/Z/C -> space, collapse.

    Agrees with `normalize` on text of the folded blocks (Latin, Greek, full-width)
    and on scripts NFKD leaves alone; see the docstring of `normalize` for the rest.
    """
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn")
    text = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text.casefold())
    return " ".join(text.split())


# Graph functions, traced once (the serving signature).
_SIGNATURE = [tf.TensorSpec([None], tf.string)]
_normalize = tf.function(normalize, input_signature=_SIGNATURE)
_hasher = TextHasher(BUCKETS)
_hash = tf.function(_hasher.call, input_signature=_SIGNATURE)


@tf.function(input_signature=_SIGNATURE)
def _token_ids(text):
    return tf.strings.to_hash_bucket_fast(tokens(text), BUCKETS)


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("text", [
    "Café Crème", "ＡＢＣ", "UPPER lower MiXeD", "red, sofa!! (new) & co.", "a   b \t\n c  ",
    "椅子 chair 沙发", "Ünïcödé façade naïve", "Ελληνικά ΆΣΤΡΟ", "  ", "", "5 – 3 in.", "𝐒𝐨𝐟𝐚 ℓ",
    "x\u0301y", "Ǖber", "₂ ² ⁿ", "tab\tnew\nline\r",
])
def test_normalize_matches_the_python_reference(text):
    assert _strings(normalize(_text([text]))) == [reference_normalize(text)]


@pytest.mark.parametrize("text, expected", [
    ("Café Crème", "cafe creme"),
    ("ＡＢＣ", "abc"),
    ("Straße ẞ", "straße ß"),  # one-to-one folds only: ß is not "ss"
    ("ΣΟΦΆΣ σοφάς", "σοφασ σοφασ"),  # final sigma folds to σ
    ("ﬁsh ¼ ĳ", "ﬁsh ¼ ĳ"),  # multi-character expansions are left alone
    ("ガギ", "ガギ"),  # kana voiced sound marks are kept (not NFKD)
    ("Йогурт ёлка", "йогурт ёлка"),  # Cyrillic keeps its marks
    ("soft\u00adware zero\u200dwidth", "software zerowidth"),  # format characters removed
    ("ไทย\u200bภาษา", "ไทย ภาษา"),  # zero-width space is a word break
    ("c++ & $5", "c 5"),
    ("emoji ❤️ here", "emoji here"),
])
def test_normalize_documented_examples(text, expected):
    assert _strings(normalize(_text([text]))) == [expected]


def test_normalize_invalid_utf8_becomes_a_space():
    assert _strings(normalize(_text([b"bad\xff\xfebytes", b"\xc3"]))) == ["bad bytes", ""]


def test_normalize_keeps_the_shape():
    assert normalize(_text([["A B"], ["C!"]])).shape == (2, 1)
    assert normalize(tf.constant("Äh!")).numpy() == b"ah"


def test_normalize_rejects_numbers():
    with pytest.raises(TypeError, match="must be a tf.string tensor"):
        normalize(tf.constant([1, 2]))


def test_fold_table_is_its_own_fixed_point():
    page_index, values = fold_table()
    cp = np.arange(0x110000)
    folded = values[page_index[cp >> 8] * 256 + (cp & 255)]
    target = np.where(folded == -1, cp, folded)
    changed = folded >= 0
    again = values[page_index[target[changed] >> 8] * 256 + (target[changed] & 255)]
    assert np.all((again == -1) | (again == target[changed]))
    assert folded[ord("A")] == ord("a") and folded[ord("é")] == ord("e") and folded[0x301] == -2
    assert folded[ord("日")] == -1 and folded[ord(",")] == ord(" ")


@PROPERTY
@given(st.lists(st.text(max_size=40), min_size=1, max_size=6))
def test_normalize_never_fails_and_is_idempotent(texts):
    once = _normalize(_text(texts))
    assert once.shape == (len(texts),)
    assert _normalize(once).numpy().tolist() == once.numpy().tolist()
    for value in _strings(once):
        assert value == value.strip() and "  " not in value


@PROPERTY
@given(st.lists(st.binary(max_size=30), min_size=1, max_size=6))
def test_normalize_never_fails_on_arbitrary_bytes(values):
    once = _normalize(_text(values))
    assert _normalize(once).numpy().tolist() == once.numpy().tolist()
    for value in once.numpy().tolist():
        value.decode("utf-8")  # valid UTF-8 out


# --------------------------------------------------------------------------- tokens


def test_tokens_of_red_sofa():
    assert _strings(tokens(_text(["Red sofa"]))) == [[
        "3:#re", "3:red", "3:ed#", "3:#so", "3:sof", "3:ofa", "3:fa#", "1:red", "1:sofa", "2:red sofa"]]


def test_tokens_of_a_one_letter_word_and_characters_not_bytes():
    assert _strings(tokens(_text(["a", "Né"]))) == [["3:#a#", "1:a"], ["3:#ne", "3:ne#", "1:ne"]]
    assert _strings(tokens(_text(["ñú"]), word_unigrams=False)) == [["3:#nu", "3:nu#"]]
    assert _strings(tokens(_text(["Ωμ"]), word_unigrams=False)) == [["3:#ωμ", "3:ωμ#"]]


def test_tokens_kinds_can_be_switched_off():
    assert _strings(tokens(_text(["red sofa"]), char_trigrams=False, word_bigrams=False)) == [["1:red", "1:sofa"]]
    assert _strings(tokens(_text(["red sofa"]), char_trigrams=False, word_unigrams=False)) == [["2:red sofa"]]
    with pytest.raises(ValueError, match="enable at least one"):
        tokens(_text(["x"]), char_trigrams=False, word_unigrams=False, word_bigrams=False)


def test_tokens_use_only_the_first_max_words_words():
    got = _strings(tokens(_text(["one two, three four"]), char_trigrams=False, max_words=2))
    assert got == [["1:one", "1:two", "2:one two"]]
    with pytest.raises(ValueError, match="max_words"):
        tokens(_text(["x"]), max_words=0)


def test_tokens_drop_the_word_cut_at_max_chars():
    got = _strings(tokens(_text(["red sofa bed", "red sofa", "red sofa "]), char_trigrams=False,
                          word_bigrams=False, max_chars=9))
    # "red sofa b|ed" loses the cut word; "red sofa" fits; "red sofa |" was cut after a space.
    assert got == [["1:red", "1:sofa"], ["1:red", "1:sofa"], ["1:red", "1:sofa"]]
    assert _strings(tokens(_text(["red sofa"]), char_trigrams=False, word_bigrams=False, max_chars=7)) == [["1:red"]]
    # A word that ends at the window's edge is whole when a separator (here '|', or a space) follows it.
    got = _strings(tokens(_text(["red sof|a", "red sof a", "red sof\u0301 a", "red sof\u0301a"]), char_trigrams=False,
                          word_bigrams=False, max_chars=7))
    assert got == [["1:red", "1:sof"], ["1:red", "1:sof"], ["1:red", "1:sof"], ["1:red"]]


def test_blank_texts_give_empty_rows():
    assert _strings(tokens(_text(["", "  ", "!?", "red"])))[:3] == [[], [], []]
    ids = _hasher(_text(["", " \t ", "--", "red"]))
    assert ids.row_lengths().numpy().tolist()[:3] == [0, 0, 0] and ids.row_lengths()[3] > 0
    assert _hasher(_text(["", ""])).flat_values.shape == (0,)
    assert _hasher(tf.zeros([0], tf.string)).nrows() == 0


def test_kinds_never_collide():
    rows = _strings(tokens(_text(["red", "a", "ab ab", "12 123"])))
    for row in rows:
        kinds = {}
        for token in row:
            prefix, _, body = token.partition(":")
            assert prefix in ("1", "2", "3") and ":" not in body
            kinds.setdefault(prefix, set()).add(token)
        assert all(kinds[a].isdisjoint(kinds[b]) for a in kinds for b in kinds if a != b)
    # "red" is a trigram and a word of "red": two tokens, two ids.
    assert "3:red" in rows[0] and "1:red" in rows[0]
    ids = _hasher(_text(["red"])).to_list()[0]
    assert len(set(ids)) == len(ids) == 4


# --------------------------------------------------------------------------- TextHasher


def test_hasher_ids_are_the_hashed_tokens():
    text = _text(MIXED)
    assert _hasher(text).to_list() == tf.strings.to_hash_bucket_fast(tokens(text), BUCKETS).to_list()


def test_hasher_ids_of_a_row_do_not_depend_on_its_batch():
    batch = _hash(_text(MIXED)).to_list()
    assert batch == [_hash(_text([t])).to_list()[0] for t in MIXED]
    assert _hash(_text(MIXED[::-1])).to_list() == batch[::-1]


def test_hasher_conds_stay_functional_if_ops_in_the_graph():
    """The conds guard rare branches; lowered to Switch/Merge they would cost every query (normalize._cond)."""
    graph = _hash.get_concrete_function().graph
    ifs = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert len(ifs) == 4  # fold non-ASCII rows, put wide rows, keep the first words, hash other trigrams
    assert all(op.get_attr("_lower_using_switch_merge") is False for op in ifs)
    # The fold branch holds normalize's own cond, kept functional too.
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    fold = library[ifs[0].get_attr("then_branch").name]
    inner = [node for node in fold.node_def if node.op in ("If", "StatelessIf")]
    assert inner and all(node.attr["_lower_using_switch_merge"].b is False and "_lower_using_switch_merge" in node.attr
                         for node in inner)


@pytest.mark.parametrize("max_words, max_chars", [(1, None), (3, None), (2, 7), (64, 5), (4, 1)])
def test_hasher_ids_are_the_hashed_tokens_with_limits(max_words, max_chars):
    text = _text(MIXED)
    hasher = TextHasher(1000, max_words=max_words, max_chars=max_chars)
    expected = tf.strings.to_hash_bucket_fast(tokens(text, max_words=max_words, max_chars=max_chars), 1000)
    assert hasher(text).to_list() == expected.to_list()


@pytest.mark.parametrize("kinds", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)])
def test_hasher_ids_with_some_kinds(kinds):
    text = _text(MIXED)
    hasher = TextHasher(5000, *kinds)
    assert hasher(text).to_list() == tf.strings.to_hash_bucket_fast(tokens(text, *kinds), 5000).to_list()


_WORDY = st.text(alphabet=st.sampled_from(list("aAbz09 #:,.-'éÉñΩ日本\u0301\u200b\u00ad\t") + ["\U0001F600"]),
                 max_size=40)


@PROPERTY
@given(st.lists(st.one_of(st.text(max_size=30), _WORDY), min_size=1, max_size=6))
def test_hasher_equals_hashed_tokens_for_any_text(texts):
    text = _text(texts)
    ids = _hash(text)
    assert ids.to_list() == _token_ids(text).to_list()
    assert ids.nrows() == len(texts)
    assert ids.dtype == tf.int64
    values = ids.flat_values.numpy()
    assert np.all((values >= 0) & (values < BUCKETS))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_WORDY, min_size=1, max_size=5), st.integers(1, 4), st.integers(1, 12))
def test_hasher_equals_hashed_tokens_with_small_limits(texts, max_words, max_chars):
    text = _text(texts)
    got = TextHasher(97, max_words=max_words, max_chars=max_chars)(text)
    expected = tf.strings.to_hash_bucket_fast(tokens(text, max_words=max_words, max_chars=max_chars), 97)
    assert got.to_list() == expected.to_list()


def test_hasher_ids_are_in_range_and_small_buckets_work():
    ids = TextHasher(7)(_text(MIXED)).flat_values.numpy()
    assert ids.size > 100 and ids.min() >= 0 and ids.max() < 7 and len(set(ids.tolist())) == 7


def test_hasher_accepts_b_by_1_and_rejects_other_shapes():
    assert _hasher(_text([["red sofa"], ["x"]])).to_list() == _hasher(_text(["red sofa", "x"])).to_list()
    with pytest.raises(ValueError, match=r"shape \[B\] or \[B, 1\]"):
        _hasher(_text([["a", "b"]]))
    with pytest.raises(TypeError, match="tf.string"):
        _hasher(tf.constant([1.0]))


_CHILD = """
import json, sys
import tf_q2e, tensorflow as tf
from tf_q2e.features import TextHasher
texts = json.loads(sys.argv[1])
print(json.dumps(TextHasher(2**18)(tf.constant(texts)).to_list()))
"""


@pytest.mark.slow
def test_hasher_ids_are_the_same_in_a_fresh_process():
    texts = ["Red sofa", "Café crème", "日本語 テスト", ""]
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(texts)], capture_output=True, text=True,
                           env=env, timeout=180)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.strip().splitlines()[-1]) == _hasher(_text(texts)).to_list()


def test_hasher_ids_survive_saved_model_round_trip(tmp_path):
    module = tf.Module()
    module.hasher = TextHasher(BUCKETS)
    module.ids = tf.function(lambda text: module.hasher(text), input_signature=_SIGNATURE)
    module.normalized = tf.function(normalize, input_signature=_SIGNATURE)
    tf.saved_model.save(module, str(tmp_path / "model"))
    loaded = tf.saved_model.load(str(tmp_path / "model"))
    text = _text(MIXED)
    assert loaded.ids(text).to_list() == _hasher(text).to_list()
    assert loaded.normalized(text).numpy().tolist() == normalize(text).numpy().tolist()


def test_hasher_in_a_keras_model():
    text = tf.keras.Input(shape=(), dtype=tf.string)
    model = tf.keras.Model(text, TextHasher(BUCKETS)(text))
    assert model(_text(["red sofa", ""])).to_list() == _hasher(_text(["red sofa", ""])).to_list()


def test_hasher_config_round_trips_and_comes_from_features_config():
    hasher = TextHasher(1000, char_trigrams=False, max_words=5, max_chars=40, name="title_hasher")
    clone = TextHasher.from_config(hasher.get_config())
    assert clone.get_config() == hasher.get_config() and clone.name == "title_hasher"
    assert clone(_text(MIXED)).to_list() == hasher(_text(MIXED)).to_list()
    cfg = FeaturesConfig(buckets=512, word_bigrams=False, max_words=7)
    built = TextHasher.from_config_section(cfg).get_config()
    assert [built[k] for k in ("buckets", "char_trigrams", "word_bigrams", "max_words", "max_chars")] == [
        512, True, False, 7, 12 * 7]
    assert hasher.weights == []


def test_hasher_validates_its_arguments():
    with pytest.raises(ValueError, match="buckets"):
        TextHasher(0)
    with pytest.raises(ValueError, match="enable at least one"):
        TextHasher(10, char_trigrams=False, word_unigrams=False, word_bigrams=False)
    with pytest.raises(ValueError, match="max_chars"):
        TextHasher(10, max_chars=0)


# --------------------------------------------------------------------------- hash_strings


def test_hash_strings_normalizes_first_and_keeps_the_shape():
    ids = hash_strings(_text(["US", " us ", "ＵＳ", "DE", ""]), 1024).numpy()
    assert ids.shape == (5,) and ids.dtype == np.int64
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert ids[0] == tf.strings.to_hash_bucket_fast("us", 1024).numpy()
    assert np.all((ids >= 0) & (ids < 1024))
    assert hash_strings(_text([["a"], ["b"]]), 10).shape == (2, 1)
    with pytest.raises(ValueError, match="buckets"):
        hash_strings(_text(["a"]), 0)
