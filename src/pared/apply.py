"""``compress_``: the one verb that applies any technique config to a model, in place.

Handlers register next to their config with ``@register(ConfigType)``; this file never grows
an if/elif per technique.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from torch import nn

from pared.calib import CalibData
from pared.config import BaseConfig
from pared.errors import UsageError


@dataclasses.dataclass
class Context:
    """What a handler may need besides the model and its config.

    Attributes:
        calib: calibration inputs (required by static quantization and other data-driven steps).
        summary: per-step facts for the report (what was changed, what was skipped and why).
        task: the task being compressed; fine-tuning steps train on its data (``TrainableTask``).
        skeleton: rebuild the compressed structure only, with placeholder values, so that a
            saved state_dict can be loaded into it (no calibration, no data needed).
        structure: JSON-friendly facts a handler needs to rebuild its result in skeleton mode
            when they depend on data (kept channels, per-layer ranks), keyed by
            ``structure_key(step_index, technique)``. Saved in the artefact manifest.
    """

    calib: Iterable[Any] | None = None
    summary: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skeleton: bool = False
    task: Any = None
    structure: dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int = 0

    def structure_key(self, technique: str) -> str:
        """Key of the current recipe step in ``structure``: ``"<step index>:<technique>"``."""
        return f"{self.step}:{technique}"


Handler = Callable[[nn.Module, Any, Context], nn.Module]
_HANDLERS: dict[type[BaseConfig], Handler] = {}
H = TypeVar("H", bound=Handler)


def register(config_type: type[BaseConfig]) -> Callable[[H], H]:
    """Decorator: ``handler(model, config, ctx) -> model`` applies ``config_type``."""

    def deco(fn: H) -> H:
        _HANDLERS[config_type] = fn
        return fn

    return deco


def compress_(
    model: nn.Module,
    config: BaseConfig | Sequence[BaseConfig],
    *,
    calib: CalibData | Iterable[Any] | None = None,
    context: Context | None = None,
) -> nn.Module:
    """Apply one technique config (or a recipe: a sequence of them, in order) to ``model``.

    Args:
        model: the model; modified in place where the technique allows, and returned.
        config: a technique config such as ``Int8Config()``, or a list of them.
        calib: calibration inputs for data-driven techniques (see ``pared.CalibData``).
        context: pass one to collect the per-step summary used in reports.

    Returns:
        The compressed model (use the return value: some techniques replace the root module).

    Example:
        >>> pared.compress_(model, pared.Int8Config(mode="static"), calib=batches)
    """
    ctx = context or Context()
    if calib is not None:
        ctx.calib = calib
    configs = [config] if isinstance(config, BaseConfig) else list(config)
    for index, cfg in enumerate(configs):
        handler = _HANDLERS.get(type(cfg))
        if handler is None:
            raise UsageError(f"no handler registered for {type(cfg).__name__}")
        ctx.step = index
        model = handler(model, cfg, ctx)
    return model
