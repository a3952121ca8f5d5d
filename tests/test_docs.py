"""The docs stay true: the generated configuration page, documented fields, README length, links."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Literal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 220


def _config_docs():
    spec = importlib.util.spec_from_file_location("config_docs", os.path.join(REPO, "scripts", "config_docs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_docs = _config_docs()


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_configuration_page_is_what_the_script_generates():
    page = os.path.join(REPO, "docs", "configuration.md")
    assert os.path.exists(page), "docs/configuration.md is missing: run `python scripts/config_docs.py`"
    assert _read(page) == config_docs.render(), (
        "docs/configuration.md is stale: run `python scripts/config_docs.py` and commit the result")


def test_every_config_field_has_an_attributes_entry():
    assert config_docs.problems() == []


def test_check_exits_1_with_one_line_when_the_page_is_stale(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text(config_docs.render() + "an edit by hand\n", encoding="utf-8")
    assert config_docs.main(["--check", "--out", str(page)]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "stale" in message and "scripts/config_docs.py" in message
    page.write_text(config_docs.render(), encoding="utf-8")
    assert config_docs.main(["--check", "--out", str(page)]) == 0


@dataclass(frozen=True)
class _Inner:
    """A made-up section.

    Attributes:
      documented: a field with its entry,
        over two lines.
      removed: an entry whose field is gone.
      kinds: a tuple.
    """

    documented: Literal["a", "b"] | None = "a"
    kinds: tuple[str, ...] = ("x", "y")
    forgotten: dict[str, float] = field(default_factory=lambda: {"x": 0.5})


@dataclass(frozen=True)
class _Root:
    inner: _Inner = field(default_factory=_Inner)


def test_problems_name_an_undocumented_field_and_an_entry_without_a_field():
    found = config_docs.problems(_Root)
    assert len(found) == 2
    assert found[0].startswith("inner.forgotten has no entry")
    assert "'removed'" in found[1]


def test_the_page_takes_types_defaults_choices_and_text_from_the_dataclass():
    page = config_docs.render(_Root)
    assert "### `inner.documented`" in page
    assert "Type: one of `a`, `b` or `null`. Default: `a`." in page
    assert "A field with its entry, over two lines." in page
    assert "Type: mapping of string to number. Default: `{x: 0.5}`." in page
    assert "Type: list of string. Default: `[x, y]`." in page
    assert config_docs.UNDOCUMENTED in page


def test_readme_is_short():
    lines = _read(os.path.join(REPO, "README.md")).count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def _markdown_files() -> list[str]:
    files = [os.path.join(REPO, "README.md"), os.path.join(REPO, "benchmarks", "RESULTS.md")]
    return files + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))


def _links(text: str) -> list[str]:
    """Targets of the inline links and images of a Markdown text, outside code blocks and code spans."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def _anchors(path: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (a repeated heading gets -1, -2, ...)."""
    text = re.sub(r"^(```|~~~).*?^\1", "", _read(path), flags=re.S | re.M)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        anchor = config_docs._anchor(heading)
        candidate, n = anchor, 0
        while candidate in anchors:
            n += 1
            candidate = f"{anchor}-{n}"
        anchors.add(candidate)
    anchors.update(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", text))
    return anchors


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    for path in _markdown_files():
        for target in _links(_read(path)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{os.path.relpath(path, REPO)} -> {target}"
            if not os.path.exists(resolved):
                broken.append(f"{where}: no such file")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
                broken.append(f"{where}: no such heading")
    assert broken == []
