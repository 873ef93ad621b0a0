"""Technique configs: inert dataclasses that round-trip through plain dicts (JSON/YAML).

Every technique is one ``@register_config`` dataclass. ``config_to_dict`` writes its type
name and version next to its fields; ``config_from_dict`` rebuilds it only from the registry
(an allow-list), and checks every field's type, so a recipe file can never name arbitrary code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from pared.errors import UsageError

_CONFIGS: dict[str, type[BaseConfig]] = {}
C = TypeVar("C", bound="type[BaseConfig]")


@dataclasses.dataclass
class BaseConfig:
    """Base of all technique configs. Subclasses add typed fields and override ``validate``."""

    version: typing.ClassVar[int] = 1

    def validate(self) -> None:
        """Raise ``UsageError`` naming the field when a value is out of range."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            # Lists are accepted where a tuple is declared (YAML and Python callers alike).
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        _check_field_types(self)
        self.validate()


def register_config(name: str) -> typing.Callable[[C], C]:
    """Class decorator: make a config loadable from recipes under ``name``."""

    def deco(cls: C) -> C:
        if name in _CONFIGS and _CONFIGS[name] is not cls:
            raise RuntimeError(f"config name {name!r} registered twice")
        _CONFIGS[name] = cls
        cls.type_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def registered_configs() -> dict[str, type[BaseConfig]]:
    """All technique names a recipe may use, mapped to their config classes."""
    return dict(_CONFIGS)


def config_to_dict(config: BaseConfig) -> dict[str, Any]:
    """``{"technique": name, "version": n, **fields}`` with only JSON-friendly values."""
    out: dict[str, Any] = {"technique": type(config).type_name, "version": type(config).version}  # type: ignore[attr-defined]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: dict[str, Any]) -> BaseConfig:
    """Build a registered config from a dict; unknown technique or field, or a wrong type,
    raises ``UsageError`` naming it."""
    if not isinstance(data, dict):
        raise UsageError(f"a recipe step must be a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("technique", None)
    if not isinstance(name, str) or name not in _CONFIGS:
        known = ", ".join(sorted(_CONFIGS))
        raise UsageError(f"unknown technique {name!r}; known: {known}")
    cls = _CONFIGS[name]
    version = data.pop("version", cls.version)
    if version != cls.version:
        raise UsageError(f"{name}: config version {version} not supported (this pared writes {cls.version})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))  # YAML keys need not be strings
    if unknown:
        raise UsageError(f"{name}: unknown field(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(name, k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tech: str, field: str, value: Any, hint: Any) -> Any:
    # YAML gives lists where the dataclass wants tuples (tuples keep configs hashable).
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        value = tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not _matches(value, hint):
        raise UsageError(f"{tech}.{field}: expected {_hint_name(hint)}, got {value!r}")
    return value


def _check_field_types(config: BaseConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            name = getattr(type(config), "type_name", type(config).__name__)
            raise UsageError(f"{name}.{f.name}: expected {_hint_name(hints[f.name])}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
