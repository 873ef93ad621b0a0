"""Recipes: an ordered list of technique configs, read from YAML (built-in names or a file)."""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import pared.quant  # noqa: F401 - registers the technique configs recipes may name
import pared.train  # noqa: F401
import pared.prune, pared.cluster  # noqa: F401, E401 - unstructured pruning, clustering, entropy coding
import pared.lowrank, pared.activation_swap, pared.early_exit  # noqa: F401, E401 - SVD, activations, exits
import pared.student, pared.distill  # noqa: F401, E401 - layer dropping, distillation
from pared.config import BaseConfig, config_from_dict
from pared.errors import UsageError

_MAX_RECIPE_BYTES = 1 << 20
# Fields by which a step may keep layers it cannot handle, and the value that refuses them instead:
# int8 keeps them float unless ``strict``; channel pruning skips their groups with ``on_unsupported``.
STRICT_FIELDS: dict[str, object] = {"strict": True, "on_unsupported": "error"}


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with pared."""
    return sorted(p.name[:-5] for p in resources.files("pared.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | os.PathLike[str]) -> list[BaseConfig]:
    """Configs of a built-in recipe name or a YAML file.

    The YAML is a mapping with ``steps:`` (a list of ``{technique: name, field: value}``), or the
    list itself. Only ``yaml.safe_load`` is used: a recipe cannot construct Python objects.

    Raises:
        UsageError: unknown name or missing file, invalid YAML, unknown technique, bad field.
    """
    text, origin = _recipe_text(str(name_or_path))
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    steps = data.get("steps") if isinstance(data, dict) else data
    if not isinstance(steps, list) or not steps:
        raise UsageError(f"recipe {origin} must have a non-empty 'steps' list")
    configs = []
    for i, step in enumerate(steps):
        try:
            configs.append(config_from_dict(step))
        except UsageError as exc:
            raise UsageError(f"recipe {origin}, step {i + 1}: {exc}") from None
    return configs


def strict_recipe(configs: list[BaseConfig]) -> list[BaseConfig]:
    """The same steps, each set to refuse layers it cannot handle instead of keeping them
    (``pared compress --strict``): every field of ``STRICT_FIELDS`` a step has is set."""
    out = []
    for config in configs:
        names = {f.name for f in dataclasses.fields(config)}
        out.append(dataclasses.replace(config, **{k: v for k, v in STRICT_FIELDS.items() if k in names}))
    return out


def _recipe_text(spec: str) -> tuple[str, str]:
    if spec in builtin_recipes():
        return (resources.files("pared.recipes") / f"{spec}.yaml").read_text(encoding="utf-8"), spec
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(builtin_recipes())
        raise UsageError(f"recipe not found: {spec!r} is neither a built-in recipe ({known}) nor a file")
    if path.stat().st_size > _MAX_RECIPE_BYTES:
        raise UsageError(f"recipe file too large: {path}")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as exc:
        raise UsageError(f"recipe {path} is not UTF-8 text (byte {exc.start})") from None
    except PermissionError:
        raise UsageError(f"cannot read recipe {path}: permission denied") from None
