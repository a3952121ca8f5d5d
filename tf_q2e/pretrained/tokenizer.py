r"""BERT WordPiece tokenization in the graph, with the ops that stock TensorFlow Serving runs.

`BertTokenizer` turns raw text `[B]` (or `[B, 1]`) tf.string into
`token_ids [B, T]` and `mask [B, T]` (int32): `[CLS] wordpieces… [SEP]`,
then padding (id 0, mask 0) up to the longest row of the batch,
`2 <= T <= max_tokens`. A text of more than `max_tokens - 2` wordpieces keeps
its first `max_tokens - 2` and then `[SEP]`, as Hugging Face truncates one
sequence at `max_length`. Empty, blank or unreadable text gives `[CLS] [SEP]`.

The ids are those of Hugging Face's `tokenizers` with all-MiniLM-L6-v2's
`tokenizer.json` (tokenizers 0.22.2): BertNormalizer(clean_text,
handle_chinese_chars, strip_accents follows lowercase, lowercase) +
BertPreTokenizer + WordPiece(`[UNK]`, `##`, max_input_chars_per_word=100) +
`[CLS] … [SEP]`. The tests compare the two on a corpus of tricky text, on
every code point of planes 0-3 and 14-16 and on random Unicode text. The
pipeline, step by step (Hugging Face's order):

    1. invalid UTF-8 → U+FFFD (serving receives raw bytes), which step 2 drops,
       as Hugging Face drops it from text decoded with errors="replace"
    2. clean_text: drop NUL, U+FFFD and the "other" characters (Cc except
       \t \n \r, Cf, Co: `_DROPPED`)
    3. handle_chinese_chars: spaces around CJK ideographs (`_CJK`)
    4. strip accents: NFD, then drop the nonspacing marks (`_NONSPACING_MARKS`)
    5. lowercase: Σ → σ first (TensorFlow's ICU lowercasing writes a word-final
       Σ as ς; Hugging Face lowercases character by character), then
       `tf.strings.lower(encoding="utf-8")`
    6. BertPreTokenizer: spaces around punctuation (`_PUNCTUATION`: Unicode P*
       and every ASCII symbol such as `$+<=>^`|~`), then split at whitespace
       (`_WHITESPACE`; clean_text's whitespace characters)
    7. WordPiece: a word of more than 100 characters is `[UNK]`; otherwise
       greedy longest-match-first wordpieces, `[UNK]` for the whole word when
       one piece is not in the vocabulary
    8. truncate to `max_tokens - 2` pieces, add `[CLS]` and `[SEP]`, pad.

Why not tensorflow-text's own `BertTokenizer(lower_case=True)`: it lowercases
with NFKC case folding (`case_fold_utf8`), which differs from Hugging Face's
lowercase + NFD: "ＢＩＧ" is `big` there and `[UNK]` here, "Straße" is
`st ##ras ##se` there and `st ##raße` here, likewise "ﬁne", "①", "x²". It
turns control characters into spaces where Hugging Face drops them ("a\x85b"
is one word here), its punctuation is the regex engine's newer `\p{P}`
(U+2E43 splits off there), and it limits words to 100 bytes where Hugging Face
limits them to 100 characters (a word of 60 Cyrillic letters is `[UNK]`
there). Hence steps 2-6 here, with tensorflow-text for NFD and WordPiece only.

The character classes are Hugging Face's own, not the regex engine's: its
`unicode_categories` crate has Unicode 8.0 tables, so e.g. U+2E43 (a Unicode 9
dash) is not punctuation there and U+0898 (a Unicode 14 mark) is not stripped.
They were read off tokenizers 0.22.2 code point by code point (a normalizer
and a pre-tokenizer per class); `tests/test_tokenizer.py` checks every code
point of planes 0-3 and 14-16 against the reference.

Hugging Face's added tokens of a BERT `tokenizer.json` ([PAD] [UNK] [CLS]
[SEP] [MASK], `SPECIAL_TOKENS`) are matched in the raw text first, as there:
"abc[CLS]def" is `abc [CLS] def`, while "[cls]" is `[ cl ##s ]`.

Remaining differences from the reference: none in the ids that the tests have
found (every code point of planes 0-3 and 14-16 between letters, alone and
before a combining mark; random Unicode text; the corpus). In the normalised
text, two steps differ on characters of scripts newer than the vocabulary
(Unicode 13 and later: Glagolitic and Latin Extended-D additions, Vithkuqi,
Garay, Tulu-Tigalari, Kirat Rai, Dives Akuru…): TensorFlow's ICU (tables
before Unicode 14) lowercases fewer of them than Rust's (Unicode 16 or later:
U+2C2F stays "Ⱟ" where Hugging Face writes "ⱟ"), and tensorflow-text's ICU
decomposes a few of them in NFD where Hugging Face's tables (before Unicode
13) do not (U+11938). Both spellings are outside the vocabulary, so a word
holding either is `[UNK]` alike;
`tests/test_tokenizer.py::test_newer_scripts_differ_in_text_not_in_ids` pins
both. (A model server's own ICU could differ in the same way, on the same kind
of characters only: Unicode never changes the decomposition of an assigned
character.)

Ops (TensorFlow 2.20, tensorflow-text 2.20.1; `test_graph_ops` checks that the
traced graph uses no others and that only these two are not TensorFlow's):

    tensorflow-text, classic ops (`NormalizeUTF8` in `_normalize_ops.so`,
    target normalize_ops_cc; `WordpieceTokenizeWithOffsets` in
    `_wordpiece_tokenizer.so`, target wordpiece_tokenizer_cc; both in
    tensorflow_text/BUILD's `ops_lib`, which tensorflow/serving's model server
    links through `SUPPORTED_TENSORFLOW_OPS` in
    tensorflow_serving/model_servers/BUILD):
        NormalizeUTF8 WordpieceTokenizeWithOffsets
    core TensorFlow, in `call`:
        AddV2 All Any Assert Cast ConcatV2 Const Cumsum DenseBincount Equal
        Fill GatherV2 Greater Identity If LessEqual LookupTableFindV2 Max
        Maximum Minimum Mul NoOp OnesLike Placeholder RaggedGather RaggedRange
        RaggedTensorToTensor Range Reshape SelectV2 Shape Size
        StaticRegexReplace StridedSlice StringLength StringLower StringSplitV2
        Sub Transpose UnicodeTranscode
    core TensorFlow, in a SavedModel besides: HashTableV2 LookupTableImportV2
    (the vocabulary table), and every SavedModel's checkpoint plumbing
    (MergeV2Checkpoints Pack RestoreV2 SaveV2 Select ShardedFilename
    StatefulPartitionedCall StaticRegexFullMatch StringJoin).

No FastBertNormalize or FastWordpieceTokenizeWithOffsets (tensorflow-text's
FastBertTokenizer): TensorFlow Serving 2.11 and older link tensorflow-text
2.8.2 or older, whose `ops_lib` lacks FastBertNormalize (tensorflow/serving#2064).
Serving 2.12-2.19 link tensorflow-text 2.12.1 and Serving 2.20 links 2.20.0,
which have both; the two classic ops above run on all of them. No
case_fold_utf8, regex_split_with_offsets or tensorflow-text's BasicTokenizer
either: see above.

Example:
    vocab = MiniLMFiles.locate().vocabulary()
    tokenizer = BertTokenizer(vocab, max_tokens=128)
    ids, mask = tokenizer(tf.constant(["5-Light Chrome Vanity", "Café"]))
    # ids  [[101, 1019, 1011, 2422, 18546, 18736, 102], [101, 7668, 102, 0, 0, 0, 0]]
    #      ([CLS] 5 - light chrome vanity [SEP]; [CLS] cafe [SEP] [PAD]…)
    # mask [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]]
"""

from __future__ import annotations

import re

import tensorflow as tf  # tf_q2e/__init__ has selected Keras 2 already
import tensorflow_text as tf_text

from tf_q2e.errors import ConfigError

serializable = tf.keras.utils.register_keras_serializable(package="tf_q2e")

CLS, SEP, UNK, PAD, MASK = "[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]"
# Hugging Face's added tokens of a BERT tokenizer.json: in the raw text, each is a token of its own.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
SUFFIX = "##"
# Hugging Face WordPiece's max_input_chars_per_word: a longer word is [UNK].
MAX_WORD_CHARS = 100
# UTF-8 needs at most 4 bytes a character: tensorflow-text's byte limit never bites before ours.
_MAX_WORD_BYTES = 4 * MAX_WORD_CHARS

# Hugging Face's character classes (tokenizers 0.22.2, Unicode 8.0 categories), as hex code point ranges.
# clean_text drops these: NUL, U+FFFD, and the "other" characters but \t \n \r (Cc, Cf, Co).
_DROPPED_RANGES = """
0-8 b-c e-1f 7f-9f ad 600-605 61c 6dd 70f 180e 200b-200f 202a-202e 2060-2064 2066-206f e000-f8ff feff
fff9-fffb fffd 110bd 1bca0-1bca3 1d173-1d17a e0001 e0020-e007f f0000-ffffd 100000-10fffd
"""
# clean_text maps these to a space, and BertPreTokenizer splits at them (char::is_whitespace, with \t \n \r).
_WHITESPACE_RANGES = "9-a d 20 a0 1680 2000-200a 2028-2029 202f 205f 3000"
# handle_chinese_chars puts spaces around these (BertNormalizer's is_chinese_char).
_CJK_RANGES = "4e00-9fff 3400-4dbf 20000-2a6df 2a700-2b73f 2b740-2b81f 2b920-2ceaf f900-faff 2f800-2fa1f"
# strip_accents drops these after NFD (is_mark_nonspacing: Mn).
_NONSPACING_MARK_RANGES = """
300-33f 342 345-36f 483-487 591-5bd 5bf 5c1-5c2 5c4-5c5 5c7 610-61a 64b-65f 670 6d6-6dc 6df-6e4 6e7-6e8
6ea-6ed 711 730-74a 7a6-7b0 7eb-7f3 816-819 81b-823 825-827 829-82d 859-85b 8e3-902 93a 93c 941-948 94d
951-957 962-963 981 9bc 9c1-9c4 9cd 9e2-9e3 a01-a02 a3c a41-a42 a47-a48 a4b-a4d a51 a70-a71 a75 a81-a82 abc
ac1-ac5 ac7-ac8 acd ae2-ae3 b01 b3c b3f b41-b44 b4d b56 b62-b63 b82 bc0 bcd c00 c3e-c40 c46-c47 c4a-c4d
c55-c56 c62-c63 c81 cbc cbf cc6 ccc-ccd ce2-ce3 d01 d41-d44 d4d d62-d63 dca dd2-dd4 dd6 e31 e34-e3a e47-e4e
eb1 eb4-eb9 ebb-ebc ec8-ecd f18-f19 f35 f37 f39 f71-f72 f74 f77 f79-f7e f80 f82-f84 f86-f87 f8d-f92 f94-f97
f99-f9c f9e-fa1 fa3-fa6 fa8-fab fad-fb8 fba-fbc fc6 102d-1030 1032-1037 1039-103a 103d-103e 1058-1059
105e-1060 1071-1074 1082 1085-1086 108d 109d 135d-135f 1712-1714 1732-1734 1752-1753 1772-1773 17b4-17b5
17b7-17bd 17c6 17c9-17d3 17dd 180b-180d 18a9 1920-1922 1927-1928 1932 1939-193b 1a17-1a18 1a1b 1a56 1a58-1a5e
1a60 1a62 1a65-1a6c 1a73-1a7c 1a7f 1ab0-1abd 1b00-1b03 1b34 1b36-1b3a 1b3c 1b42 1b6b-1b73 1b80-1b81 1ba2-1ba5
1ba8-1ba9 1bab-1bad 1be6 1be8-1be9 1bed 1bef-1bf1 1c2c-1c33 1c36-1c37 1cd0-1cd2 1cd4-1ce0 1ce2-1ce8 1ced 1cf4
1cf8-1cf9 1dc0-1df5 1dfc-1dff 20d0-20dc 20e1 20e5-20f0 2cef-2cf1 2d7f 2de0-2dff 302a-302d 3099-309a a66f
a674-a67d a69e-a69f a6f0-a6f1 a802 a806 a80b a825-a826 a8c4 a8e0-a8f1 a926-a92d a947-a951 a980-a982 a9b3
a9b6-a9b9 a9bc a9e5 aa29-aa2e aa31-aa32 aa35-aa36 aa43 aa4c aa7c aab0 aab2-aab4 aab7-aab8 aabe-aabf aac1
aaec-aaed aaf6 abe5 abe8 abed fb1e fe00-fe0f fe20-fe2f 101fd 102e0 10376-1037a 10a01-10a03 10a05-10a06
10a0c-10a0f 10a38-10a3a 10a3f 10ae5-10ae6 11001 11038-11046 1107f-11081 110b3-110b6 110b9-110ba 11100-11102
11127-1112b 1112d 11130-11134 11173 11180-11181 111b6-111be 111ca-111cc 1122f-11231 11234 11236-11237 112df
112e3-112ea 11300-11301 1133c 11340 11366-1136c 11370-11374 114b3-114b8 114ba 114bf-114c0 114c2-114c3
115b2-115b5 115bc-115bd 115bf-115c0 115dc-115dd 11633-1163a 1163d 1163f-11640 116ab 116ad 116b0-116b5 116b7
1171d-1171f 11722-11725 11727-1172b 16af0-16af4 16b30-16b36 16f8f-16f92 1bc9d-1bc9e 1d167-1d169 1d17b-1d182
1d185-1d18b 1d1aa-1d1ad 1d242-1d244 1da00-1da36 1da3b-1da6c 1da75 1da84 1da9b-1da9f 1daa1-1daaf 1e8d0-1e8d6
e0100-e01ef
"""
# BertPreTokenizer splits these off as words of their own (is_ascii_punctuation or Pc Pd Pe Pf Pi Po Ps).
_PUNCTUATION_RANGES = """
21-2f 3a-40 5b-60 7b-7e a1 a7 ab b6-b7 bb bf 37e 387 55a-55f 589-58a 5be 5c0 5c3 5c6 5f3-5f4 609-60a 60c-60d
61b 61e-61f 66a-66d 6d4 700-70d 7f7-7f9 830-83e 85e 964-965 970 af0 df4 e4f e5a-e5b f04-f12 f14 f3a-f3d f85
fd0-fd4 fd9-fda 104a-104f 10fb 1360-1368 1400 166d-166e 169b-169c 16eb-16ed 1735-1736 17d4-17d6 17d8-17da
1800-180a 1944-1945 1a1e-1a1f 1aa0-1aa6 1aa8-1aad 1b5a-1b60 1bfc-1bff 1c3b-1c3f 1c7e-1c7f 1cc0-1cc7 1cd3
2010-2027 2030-2043 2045-2051 2053-205e 207d-207e 208d-208e 2308-230b 2329-232a 2768-2775 27c5-27c6 27e6-27ef
2983-2998 29d8-29db 29fc-29fd 2cf9-2cfc 2cfe-2cff 2d70 2e00-2e2e 2e30-2e42 3001-3003 3008-3011 3014-301f 3030
303d 30a0 30fb a4fe-a4ff a60d-a60f a673 a67e a6f2-a6f7 a874-a877 a8ce-a8cf a8f8-a8fa a8fc a92e-a92f a95f
a9c1-a9cd a9de-a9df aa5c-aa5f aade-aadf aaf0-aaf1 abeb fd3e-fd3f fe10-fe19 fe30-fe52 fe54-fe61 fe63 fe68
fe6a-fe6b ff01-ff03 ff05-ff0a ff0c-ff0f ff1a-ff1b ff1f-ff20 ff3b-ff3d ff3f ff5b ff5d ff5f-ff65 10100-10102
1039f 103d0 1056f 10857 1091f 1093f 10a50-10a58 10a7f 10af0-10af6 10b39-10b3f 10b99-10b9c 11047-1104d
110bb-110bc 110be-110c1 11140-11143 11174-11175 111c5-111c9 111cd 111db 111dd-111df 11238-1123d 112a9 114c6
115c1-115d7 11641-11643 1173c-1173e 12470-12474 16a6e-16a6f 16af5 16b37-16b3b 16b44 1bc9f 1da87-1da8b
"""


def code_point_ranges(spec: str) -> list[tuple[int, int]]:
    """`"9-a d 20"` → `[(9, 10), (13, 13), (32, 32)]`: inclusive code point ranges from hex."""
    ranges = []
    for item in spec.split():
        first, _, last = item.partition("-")
        ranges.append((int(first, 16), int(last or first, 16)))
    return ranges


def _char_class(spec: str) -> str:
    """An RE2 character class matching the code points of `spec` (`code_point_ranges`)."""
    parts = [f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in code_point_ranges(spec)]
    return "[" + "".join(parts) + "]"


_DROPPED = _char_class(_DROPPED_RANGES)
_WHITESPACE = _char_class(_WHITESPACE_RANGES)
_CJK = _char_class(_CJK_RANGES)
_NONSPACING_MARKS = _char_class(_NONSPACING_MARK_RANGES)
_PUNCTUATION = _char_class(_PUNCTUATION_RANGES)


def normalized(texts: tf.Tensor) -> tf.Tensor:
    """Hugging Face's BertNormalizer, and BertPreTokenizer's splits as spaces: valid UTF-8 `[B]` → `[B]`.

    The words of the result are those between runs of " " (`tf.strings.split`).
    """
    t = tf.strings.regex_replace(texts, _DROPPED, "")
    t = tf.strings.regex_replace(t, f"({_CJK})", r" \1 ")
    t = tf_text.normalize_utf8(t, "NFD")
    t = tf.strings.regex_replace(t, _NONSPACING_MARKS, "")
    t = tf.strings.regex_replace(t, "Σ", "σ")
    t = tf.strings.lower(t, encoding="utf-8")
    t = tf.strings.regex_replace(t, f"({_PUNCTUATION})", r" \1 ")
    return tf.strings.regex_replace(t, _WHITESPACE, " ")


def words(texts: tf.Tensor, special_tokens: tuple[str, ...] = ()) -> tf.RaggedTensor:
    """Raw text `[B]` tf.string → ragged `[B, None]` words, as Hugging Face's tokenizer has them before WordPiece.

    Each of `special_tokens` (e.g. "[CLS]") in the raw text is a word of its
    own and is left as it is (Hugging Face's added tokens, matched before
    normalization); the rest is `normalized` and split at spaces.
    """
    t = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
    # NUL and U+FFFD are both dropped later, so NUL → U+FFFD changes nothing but frees NUL to mark special tokens.
    t = tf.strings.regex_replace(t, r"\x00", "\ufffd")
    if not special_tokens:
        return tf.strings.split(normalized(t))  # at runs of ASCII whitespace: only " " is left
    pattern = "(" + "|".join(re.escape(token) for token in special_tokens) + ")"
    segments = tf.strings.split(tf.strings.regex_replace(t, pattern, "\x00\\1\x00"), sep="\x00")  # [B, S]
    flat = segments.flat_values
    special = tf.reduce_any(tf.equal(flat[:, None], tf.constant(special_tokens)[None, :]), axis=1)
    segments = segments.with_flat_values(tf.where(special, flat, normalized(flat)))
    return tf.strings.split(segments).merge_dims(1, 2)


@serializable
class BertTokenizer(tf.keras.layers.Layer):
    """Raw text `[B]` or `[B, 1]` tf.string → `(token_ids [B, T], mask [B, T])` int32, BERT WordPiece.

    `vocabulary` is the WordPiece vocabulary, token at its id (e.g.
    `MiniLMFiles.locate().vocabulary()`); it must hold `[CLS]`, `[SEP]` and
    `[UNK]`. Rows are `[CLS] wordpieces… [SEP]` padded with id 0 (mask 0) to
    the batch's longest row; T is at most `max_tokens` (at least 2).
    """

    def __init__(self, vocabulary: list[str], max_tokens: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = tuple(str(token) for token in vocabulary)
        self.max_tokens = int(max_tokens)
        if self.max_tokens < 2:
            raise ConfigError(f"BertTokenizer: max_tokens ({max_tokens}) must be at least 2 ([CLS] and [SEP])")
        ids = {}
        for i, token in enumerate(self.vocabulary):
            if token in ids:
                raise ConfigError(f"BertTokenizer: the vocabulary holds {token!r} twice (ids {ids[token]} and {i})")
            ids[token] = i
        missing = [token for token in (CLS, SEP, UNK) if token not in ids]
        if missing:
            raise ConfigError(f"BertTokenizer: the vocabulary has no {', '.join(missing)}")
        self.cls_id, self.sep_id, self.unk_id = ids[CLS], ids[SEP], ids[UNK]
        self.special_tokens = tuple(token for token in SPECIAL_TOKENS if token in ids)
        with tf.init_scope():  # a resource of the layer, even when it is built inside a tf.function
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(self.vocabulary, tf.string), tf.range(len(self.vocabulary), dtype=tf.int64)),
                default_value=-1)
        self.wordpiece = tf_text.WordpieceTokenizer(
            self.table, suffix_indicator=SUFFIX, max_bytes_per_word=_MAX_WORD_BYTES, token_out_type=tf.int64,
            unknown_token=UNK)

    def call(self, texts):
        texts = tf.convert_to_tensor(texts, tf.string)
        if texts.shape.rank == 2:
            texts = tf.squeeze(texts, axis=1)
        elif texts.shape.rank != 1:
            raise ValueError(f"BertTokenizer: texts must be [B] or [B, 1] tf.string, not shape {texts.shape}")
        pieces = self.max_tokens - 2
        w = words(texts, self.special_tokens)[:, :pieces]  # each word is at least one piece
        too_long = tf.strings.length(w.flat_values, unit="UTF8_CHAR") > MAX_WORD_CHARS
        w = w.with_flat_values(tf.where(too_long, UNK, w.flat_values))  # [UNK] is its own vocabulary entry
        ids = self.wordpiece.tokenize(w).merge_dims(1, 2)[:, :pieces]  # [B, None] int64
        ids = tf.cast(ids, tf.int32)
        rows = tf.shape(texts, out_type=tf.int64)[:1]
        cls = tf.RaggedTensor.from_row_lengths(tf.fill(rows, self.cls_id), tf.ones(rows, tf.int64))
        sep = tf.RaggedTensor.from_row_lengths(tf.fill(rows, self.sep_id), tf.ones(rows, tf.int64))
        ids = tf.concat([cls, ids, sep], axis=1)
        return ids.to_tensor(0), tf.ones_like(ids).to_tensor(0)

    def get_config(self) -> dict:
        return {**super().get_config(), "vocabulary": list(self.vocabulary), "max_tokens": self.max_tokens}
