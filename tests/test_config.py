"""Technique configs and recipes: dict round-trip, strict validation, safe YAML."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import pared.quant  # noqa: F401 - registers int8 and smoothquant
from pared.config import config_from_dict, config_to_dict, registered_configs
from pared.errors import UsageError
from pared.quant import Int8Config, SmoothQuantConfig
from pared.recipe import builtin_recipes, load_recipe


# Techniques with no valid all-default config (they need to be told which layers or plan):
# the smallest valid setting, the base of both round-trips.
_REQUIRED: dict[str, dict] = {
    "activation_swap": {"mapping": {"type:GELU": "relu"}},
    "drop_layers": {"every": 2},
    "early_exit": {"after": ("layer1",)},
    "mixed_precision": {"plan": {"*": "int8"}},
}


def _non_default(cls: type, base: dict) -> dict:
    """Field values that differ from the defaults, so the round-trip is not trivially true.

    A candidate a config's own validation refuses (bits 7, group size 131) is left at its
    default; every config must still get at least one non-default field.
    """
    out: dict = dict(base)
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, bool):
            candidates = [not default]
        elif isinstance(default, int):
            candidates = [default + 3, default * 2, default // 2]
        elif isinstance(default, float):
            candidates = [0.25 if default != 0.25 else 0.75]
        elif isinstance(default, tuple):
            candidates = [("re:.*",)]
        else:
            continue
        for value in candidates:
            try:
                cls(**{**out, f.name: value})
            except UsageError:
                continue
            out[f.name] = value
            break
    assert out != base, f"{cls.__name__}: no field could be set to a non-default value"
    return out


def test_expected_techniques_are_registered() -> None:
    assert {"int8", "smoothquant"} <= set(registered_configs())


@pytest.mark.parametrize("name", sorted(registered_configs()))
def test_every_config_round_trips(name: str) -> None:
    cls = registered_configs()[name]
    base = _REQUIRED.get(name, {})
    for cfg in (cls(**base), cls(**_non_default(cls, base))):
        data = config_to_dict(cfg)
        assert data["technique"] == name and data["version"] == cls.version
        json.dumps(data)  # JSON-friendly: tuples became lists
        back = config_from_dict(json.loads(json.dumps(data)))
        assert type(back) is cls and back == cfg
        assert config_to_dict(back) == data


def test_literal_and_tuple_fields_round_trip() -> None:
    cfg = Int8Config(
        mode="dynamic", calibration="percentile", include=("a.*", "type:Linear"), exclude=("re:b\\d",)
    )
    back = config_from_dict(config_to_dict(cfg))
    assert back == cfg and back.include == ("a.*", "type:Linear") and isinstance(back.exclude, tuple)


def test_int_accepted_for_float_field() -> None:
    cfg = config_from_dict({"technique": "smoothquant", "alpha": 1})
    assert isinstance(cfg, SmoothQuantConfig) and cfg.alpha == 1.0 and isinstance(cfg.alpha, float)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"technique": "nosuch"}, "nosuch"),
        ({"mode": "static"}, "unknown technique"),
        ({"technique": "int8", "bogus_field": 1}, "bogus_field"),
        ({"technique": "int8", "mode": 5}, "mode"),
        ({"technique": "int8", "mode": "fancy"}, "mode"),
        ({"technique": "int8", "calibration_batches": "x"}, "calibration_batches"),
        ({"technique": "int8", "calibration_batches": True}, "calibration_batches"),
        ({"technique": "int8", "calibration_batches": 2.0}, "calibration_batches"),
        ({"technique": "int8", "activation_symmetric": 1}, "activation_symmetric"),
        ({"technique": "int8", "include": "fc1"}, "include"),
        ({"technique": "int8", "include": [1, 2]}, "include"),
        ({"technique": "smoothquant", "alpha": True}, "alpha"),
        ({"technique": "smoothquant", "alpha": "0.5"}, "alpha"),
        ({"technique": "smoothquant", "alpha": 1.5}, "alpha"),
        ({"technique": "smoothquant", "alpha": -0.01}, "alpha"),
        ({"technique": "smoothquant", "alpha": float("nan")}, "alpha"),
        ({"technique": "smoothquant", "calibration_batches": 0}, "calibration_batches"),
        ({"technique": "int8", "calibration_batches": 0}, "calibration_batches"),
        ({"technique": "int8", "calibration_batches": -4}, "calibration_batches"),
        ({"technique": "int8", "version": 99}, "version"),
    ],
)
def test_bad_config_is_usage_error_naming_the_field(data: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle) as info:
        config_from_dict(data)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_non_mapping_step_refused() -> None:
    with pytest.raises(UsageError, match="mapping"):
        config_from_dict(["int8"])  # type: ignore[arg-type]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(UsageError, match="alpha"):
        SmoothQuantConfig(alpha=2.0)
    with pytest.raises(UsageError, match="mode"):
        Int8Config(mode="int4")  # type: ignore[arg-type]


# ---------------------------------------------------------------- recipes


def test_builtin_recipes_all_load() -> None:
    names = builtin_recipes()
    assert {"int8", "int8-static", "int8-dynamic"} <= set(names)
    for name in names:
        steps = load_recipe(name)
        assert steps and all(type(s) in registered_configs().values() for s in steps)
    assert [type(s) for s in load_recipe("int8")] == [SmoothQuantConfig, Int8Config]
    assert load_recipe("int8")[0].alpha == 0.85
    assert load_recipe("int8-dynamic") == [Int8Config(mode="dynamic")]
    assert load_recipe("int8-static") == [Int8Config(mode="static")]


def test_recipe_file_as_list_or_steps(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("steps:\n  - technique: int8\n    mode: weight\n    exclude: [fc2]\n", encoding="utf-8")
    b = tmp_path / "b.yaml"
    b.write_text("- {technique: int8, mode: weight, exclude: [fc2]}\n", encoding="utf-8")
    assert load_recipe(a) == load_recipe(str(b)) == [Int8Config(mode="weight", exclude=("fc2",))]


def test_recipe_with_python_object_tag_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.yaml"
    evil.write_text(
        "steps:\n"
        "  - !!python/object/apply:os.system ['touch " + str(canary) + "']\n"
        "  - !!python/object:pared.quant.Int8Config {mode: static}\n",
        encoding="utf-8",
    )
    with pytest.raises(UsageError, match="not valid YAML") as info:
        load_recipe(evil)
    assert str(evil) in str(info.value)
    assert not canary.exists()
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("steps:\n  - !!python/object:pared.quant.Int8Config {mode: static}\n", encoding="utf-8")
    with pytest.raises(UsageError):
        load_recipe(tagged)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("steps:\n  - technique: nosuch\n", "step 1: unknown technique 'nosuch'"),
        ("steps:\n  - technique: int8\n  - technique: int8\n    mode: 5\n", "step 2: int8.mode"),
        ("steps:\n  - technique: int8\n    calibration_batches: x\n", "calibration_batches"),
        ("steps:\n  - technique: smoothquant\n    alpha: 1.5\n", "alpha"),
        ("steps: []\n", "non-empty"),
        ("name: nothing\n", "non-empty"),
        ("steps: [\n", "not valid YAML"),
    ],
)
def test_bad_recipe_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        load_recipe(path)


def test_missing_recipe_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="int8-dynamic"):
        load_recipe(tmp_path / "nope.yaml")
