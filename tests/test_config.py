"""Config: strict keys with suggestions, YAML overrides, validation naming the field."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from tf_q2e.config import Config, load_config
from tf_q2e.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_every_shipped_config_loads(name):
    assert isinstance(load_config(os.path.join(CONFIGS, name)), Config)


def test_default_yaml_lists_exactly_the_defaults():
    assert load_config(os.path.join(CONFIGS, "default.yaml")) == load_config(None)


def test_default_yaml_lists_every_field():
    with open(os.path.join(CONFIGS, "default.yaml"), encoding="utf-8") as f:
        listed = yaml.safe_load(f)
    for section, fields in load_config(None).to_dict().items():
        missing = set(fields) - set(listed.get(section) or {})
        assert not missing, f"configs/default.yaml lacks {section}: {sorted(missing)}"


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(None, ["train.global_batch_size=1024", "data.dir=null", "data.on_bad_rows=skip", "data.dir=/x y"])
    assert cfg.train.global_batch_size == 1024
    assert cfg.data.on_bad_rows == "skip" and cfg.data.dir == "/x y"


def test_later_override_wins_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seed: 5\n")
    assert load_config(str(path)).train.seed == 5
    assert load_config(str(path), ["train.seed=7"]).train.seed == 7


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(None).train.seed = 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.global_batch_sise=3", "unknown config key train.global_batch_sise; did you mean train.global_batch_size?"),
        ("trian.seed=1", "unknown config key trian; did you mean train?"),
        ("zzz=1", "unknown config key zzz; known fields: data, features, model, train"),
        ("train.global_batch_size=big", "train.global_batch_size ('big') must be a whole number"),
        ("train.global_batch_size=true", "train.global_batch_size (True) must be a whole number"),
        ("train.global_batch_size=0", "train.global_batch_size (0) must be at least 1"),
        ("train.shuffle_buffer=-1", "train.shuffle_buffer (-1) must be 0"),
        ("data.on_bad_rows=ignore", "data.on_bad_rows ('ignore') must be one of error, skip"),
        ("data.image_dim=-2", "data.image_dim (-2) must be null"),
        ("data.dir=5", "data.dir (5) must be a string"),
        ("train=3", "train must be a mapping of fields"),
        ("train.seed.x=1", "train.seed ({'x': 1}) must be a whole number"),
        ("train.seed", "expected KEY=VALUE"),
        ("train.seed=[1", "the value is not valid YAML"),
        ("model.engagement_scale=0", "model.engagement_scale (0.0) must be a positive number, or null"),
    ],
)
def test_bad_values_name_the_field_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bad_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 2, column 1: not valid YAML: expected ',' or ']'") as info:
        load_config(str(bad))
    assert "\n" not in str(info.value)  # one line, where the YAMLError text spans several
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(str(bad))


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["train.seed=11", "data.on_bad_rows=skip"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg
    assert yaml.safe_load(cfg.to_yaml())["train"]["seed"] == 11
