"""Configuration: frozen dataclasses loaded from YAML with strict keys.

A config file is YAML whose sections match the dataclasses below. Keys are
strict: an unknown key fails with the closest known key as a suggestion.
`--set a.b=value` overrides a field; the value is parsed as YAML
(`--set train.global_batch_size=1024`, `--set data.dir=null`). Every value is
checked and a bad one fails with the dotted field, the value and the fix. The
resolved config (defaults filled in, overrides applied) is what a run records
(`Config.to_yaml()`).

Example:
    cfg = load_config("configs/smoke.yaml", overrides=["data.on_bad_rows=skip"])
    cfg.data.on_bad_rows  # "skip"
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from tf_q2e.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how bad rows are treated.

    Attributes:
      dir: a data set directory (catalog.parquet, train/validation/test.parquet),
        as written by `q2e synth` or `q2e prepare`; `--data DIR` overrides it.
      on_bad_rows: `error` stops at the first bad row; `skip` drops bad rows
        into a quarantine file and counts them.
      quarantine_dir: where skipped rows go; null = `<data dir>/quarantine`
        (for `q2e train`: the run directory).
      image_dim: length of `product_image_embedding`; null = as in the data.
    """

    dir: str | None = None
    on_bad_rows: Literal["error", "skip"] = "error"
    quarantine_dir: str | None = None
    image_dim: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Batching of the training input (the model issue adds the optimizer & co.).

    Attributes:
      global_batch_size: rows per step summed over all replicas (Que2Search: 768).
      shuffle_buffer: rows held in the shuffle buffer; 0 turns shuffling off.
      seed: seed of the shuffle order (and, later, of initialisation).
    """

    global_batch_size: int = 768
    shuffle_buffer: int = 100_000
    seed: int = 0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(cfg: Config) -> None:
    """Value checks beyond types; each names the field, the value and the fix."""
    t = cfg.train
    if t.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be at least 1")
    if t.shuffle_buffer < 0:
        raise ConfigError(f"train.shuffle_buffer ({t.shuffle_buffer}) must be 0 (no shuffling) or more")
    if cfg.data.image_dim is not None and cfg.data.image_dim < 0:
        raise ConfigError(f"data.image_dim ({cfg.data.image_dim}) must be null (as in the data), 0 (none) or positive")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config (or the defaults when `path` is None) and applies `--set` overrides."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    _check(cfg)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.global_batch_size=1024")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted field name such as data.on_bad_rows")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from e
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str):
    where = prefix or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {_join(prefix, close[0])}?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown config key {_join(prefix, str(key))}{hint}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _convert(hints[name], raw[name], _join(prefix, name))
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, _join(prefix, name))
    return cls(**values)


def _convert(hint, value, dotted: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, dotted)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, dotted)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{dotted} ({value!r}) must be one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted} ({value!r}) must be a list")
        return tuple(_convert(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted} ({value!r}) must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted} ({value!r}) must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted} ({value!r}) must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted} ({value!r}) must be a string (quote it in YAML)")
        return value
    raise TypeError(f"config field {dotted} has an unsupported type {hint}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
