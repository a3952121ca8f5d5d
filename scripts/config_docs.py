"""Writes docs/configuration.md from the config dataclasses of tf_q2e/config.py.

    python scripts/config_docs.py            # (re)write docs/configuration.md
    python scripts/config_docs.py --check    # exit 1 with one line if the file is stale

The page is generated, never edited by hand: each field's type and default
come from the dataclass, its choices from `Literal[...]`, and its text from
the `Attributes:` section of its dataclass's Google-style docstring. Nothing
here names a field, so a field that is added, renamed or removed in
tf_q2e/config.py shows up after the next run.

`problems()` lists the fields that have no `Attributes:` entry and the
entries that name no field; the script warns about them on stderr and
tests/test_docs.py fails on them, so a new field cannot go undocumented.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Literal

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # document this checkout's tf_q2e, not an installed copy

from tf_q2e import config as config_module  # noqa: E402  (no TensorFlow import)

OUT = os.path.join(REPO, "docs", "configuration.md")
UNDOCUMENTED = "*Not documented yet.*"

INTRO = """\
A configuration is a YAML file whose sections match the dataclasses in
[tf_q2e/config.py](../tf_q2e/config.py). Every field has a default, so a file
holds only what it changes. Keys are strict: an unknown key fails and names
the closest known key. [configs/](../configs/) holds ready-made files:
`default.yaml` (every field with its default), `smoke.yaml` (a tiny run),
`gpu.yaml` (several GPUs) and `homedepot.yaml` (the Home Depot data set).

Override any field from the command line with `--set section.field=value`
(the value is YAML), or in Python with
`tf_q2e.load_config(path, overrides=["section.field=value"])`:

```sh
q2e train --config configs/default.yaml --set train.epochs=5 --set model.text_sharing=tables --out runs/x
```

A mapping field updates its default mapping: `--set
model.modality_dropout.title=0.2` keeps the other modalities' defaults. A bad
value fails with the field, the value and the fix. A run writes its resolved
configuration (defaults filled in, overrides applied) to `RUN/config.yaml`."""


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _own_docstring(cls: type) -> str:
    """The class's docstring, or "" (dataclasses invent one from the signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return inspect.cleandoc(doc)


def parse_docstring(doc: str) -> tuple[list[str], dict[str, str]]:
    """(paragraphs of the text outside `Attributes:`, {attribute name: its text})."""
    lines = doc.splitlines()
    header = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if header is None:
        return _paragraphs(lines), {}
    header_indent = _indent(lines[header])
    end = header + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > header_indent):
        end += 1
    block = lines[header + 1:end]
    entry_indent = min((_indent(line) for line in block if line.strip()), default=0)
    attributes: dict[str, list[str]] = {}
    current = None
    for line in block:
        if not line.strip():
            continue
        match = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:(?:\s+(.*))?$", line.strip())
        if _indent(line) == entry_indent and match:
            current = match.group(1)
            attributes[current] = [match.group(2) or ""]
        elif current is not None:
            attributes[current].append(line.strip())
    text = {name: " ".join(part for part in parts if part) for name, parts in attributes.items()}
    return _paragraphs(lines[:header] + lines[end:]), text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _paragraphs(lines: list[str]) -> list[str]:
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def sections(root: type = config_module.Config, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted name, dataclass) of every section under `root`, depth first ("" is `root` itself)."""
    found = [(prefix, root)]
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        if _is_section(hints[f.name]):
            found += sections(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    return found


def _leaf_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if not _is_section(hints[f.name])]


def problems(root: type = config_module.Config) -> list[str]:
    """Fields without an `Attributes:` entry, and entries that name no field; [] when all is documented."""
    found = []
    for dotted, cls in sections(root):
        fields = _leaf_fields(cls)
        if not fields:
            continue
        _, attributes = parse_docstring(_own_docstring(cls))
        names = {f.name for f in fields}
        for f in fields:
            if f.name not in attributes:
                found.append(f"{_join(dotted, f.name)} has no entry in the Attributes: section of "
                             f"{cls.__name__}'s docstring ({inspect.getsourcefile(cls)})")
        sections_here = {f.name for f in dataclasses.fields(cls)} - names
        for name in attributes:
            if name not in names and name not in sections_here:
                found.append(f"{cls.__name__}'s docstring documents {name!r}, which is not one of its fields")
    return found


def type_text(hint: Any) -> str:
    """A field's type in words, as a YAML writer sees it: "one of `mean`, `weighted`", "integer or `null`"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in inner)
        return text + " or `null`" if len(inner) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{_yaml(a)}`" for a in args)
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    names = {bool: "`true` or `false`", int: "integer", float: "number", str: "string"}
    if hint in names:
        return names[hint]
    return getattr(hint, "__name__", str(hint))


def default_value(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_yaml(f.default_factory())}`"
    return "required"


def _yaml(value: Any) -> str:
    """`value` as one line of YAML (what a config file would hold)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("...").strip()


def _plain(value: Any) -> Any:
    """`value` with tuples as lists and mappings as dicts, which YAML's safe dumper can write."""
    if isinstance(value, (tuple, list, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _sentence(text: str | None) -> str | None:
    """`text` with its first letter in upper case ("a data set directory" -> "A data set directory")."""
    return text[:1].upper() + text[1:] if text else text


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def render(root: type = config_module.Config) -> str:
    """The whole docs/configuration.md."""
    out = ["# Configuration", "",
           "<!-- Generated by scripts/config_docs.py from tf_q2e/config.py: edit the docstrings there, "
           "then run `python scripts/config_docs.py`. -->", "", INTRO, ""]
    documented = [(dotted, cls) for dotted, cls in sections(root) if _leaf_fields(cls)]
    out += ["Sections:", ""]
    for dotted, cls in documented:
        paragraphs, _ = parse_docstring(_own_docstring(cls))
        summary = f": {paragraphs[0]}" if paragraphs else ""
        out.append(f"* [`{dotted or 'top level'}`](#{_anchor(dotted or 'top level')}){summary}")
    out.append("")
    for dotted, cls in documented:
        hints = typing.get_type_hints(cls)
        paragraphs, attributes = parse_docstring(_own_docstring(cls))
        out += [f"## `{dotted}`" if dotted else "## top level", ""]
        for paragraph in paragraphs:
            out += [paragraph, ""]
        out += ["| field | type | default |", "|---|---|---|"]
        for f in _leaf_fields(cls):
            name = _join(dotted, f.name)
            out.append(f"| [`{name}`](#{_anchor(name)}) | {type_text(hints[f.name])} | {default_value(f)} |")
        out.append("")
        for f in _leaf_fields(cls):
            name = _join(dotted, f.name)
            out += [f"### `{name}`", "",
                    f"Type: {type_text(hints[f.name])}. Default: {default_value(f)}.", "",
                    _sentence(attributes.get(f.name)) or UNDOCUMENTED, ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/configuration.md from tf_q2e/config.py.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    parser.add_argument("--out", default=OUT, help=f"the page to write or check (default {os.path.relpath(OUT, REPO)})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            with open(args.out, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            what = "is missing" if current is None else "is stale"
            print(f"{args.out} {what}: run `python scripts/config_docs.py` and commit the result", file=sys.stderr)
            return 1
        return 0
    for problem in problems():
        print(f"warning: {problem}", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
