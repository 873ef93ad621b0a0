"""Efficient activation swap: replace activation modules (GELU, SiLU, Tanh, ...) by cheaper ones.

``compress_(model, ActivationSwapConfig(mapping={"type:GELUActivation": "relu"}))`` replaces every
activation module a rule selects by the named replacement. Rules are the layer rules of
``pared.select`` (``type:Name``, ``re:<regex>``, globs on the qualified name); the first rule that
matches a module wins, and a rule that matches no activation module is an error.

Only activation *modules* can be swapped: an activation called as a function inside a forward
(``F.gelu(x)``) is not a module and stays. Nothing is learned or stored, so a skeleton rebuild
simply swaps again. The metric usually drops a little; recover with a ``finetune`` step
(``distill`` > 0 distils from the original). The latency gain on CPU is often small, because
element-wise activations are a few percent of a transformer's time next to its matmuls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from pared.apply import Context, register
from pared.config import BaseConfig, register_config
from pared.errors import UsageError
from pared.select import select_modules

TECHNIQUE = "activation_swap"


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the sigmoid approximation of GELU (Hendrycks & Gimpel, 2016)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise; any shape."""
        return x * torch.sigmoid(1.702 * x)


REPLACEMENTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "hardtanh": nn.Hardtanh,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
}
"""Replacement name -> factory of a fresh, parameter-free activation module."""

# Activation classes of the libraries whose models pared handles; user classes can be named
# explicitly with ``type:`` rules as long as they are parameter-free leaves.
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations", __name__)


@register_config(TECHNIQUE)
@dataclasses.dataclass
class ActivationSwapConfig(BaseConfig):
    """Replace activation modules by cheaper ones.

    Attributes:
        mapping: layer rule -> replacement name, e.g. ``{"type:GELU": "gelu_tanh",
            "type:SiLU": "hardswish"}``. Replacements: relu, relu6, leaky_relu, hardswish,
            hardsigmoid, hardtanh, gelu_tanh, quick_gelu. The first matching rule wins.
        exclude: layer rules; matching activations are kept.
    """

    mapping: dict[str, str] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.mapping:
            raise UsageError(
                "activation_swap.mapping must map at least one layer rule to a replacement"
            )
        unknown = sorted({r for r in self.mapping.values() if r not in REPLACEMENTS})
        if unknown:
            raise UsageError(
                f"activation_swap: unknown replacement(s) {unknown}; known: {sorted(REPLACEMENTS)}"
            )


def is_activation(name: str, module: nn.Module) -> bool:
    """A parameter-free leaf module that is an activation (by its defining library), or any
    parameter-free leaf whose class name a ``type:`` rule may name."""
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None:
        return False
    return type(module).__module__ in _ACTIVATION_MODULES or type(module).__name__.lower().endswith(
        ("activation", "gelu", "silu", "swish", "mish", "tanh", "sigmoid", "relu")
    )


def swap_plan(model: nn.Module, cfg: ActivationSwapConfig) -> dict[str, str]:
    """Qualified name -> replacement for every activation the config selects (first rule wins).

    Raises:
        UsageError: a rule matches no activation module.
    """
    plan: dict[str, str] = {}
    for rule, replacement in cfg.mapping.items():
        for name, _ in select_modules(
            model, candidate=is_activation, include=(rule,), exclude=cfg.exclude
        ):
            plan.setdefault(name, replacement)
    return plan


@register(ActivationSwapConfig)
def _apply_swap(model: nn.Module, cfg: ActivationSwapConfig, ctx: Context) -> nn.Module:
    plan = swap_plan(model, cfg)
    by_kind: dict[str, int] = {}
    for name, replacement in plan.items():
        old = model.get_submodule(name)
        new = REPLACEMENTS[replacement]()
        new.train(old.training)
        model.set_submodule(name, new)
        kind = f"{type(old).__name__} -> {replacement}"
        by_kind[kind] = by_kind.get(kind, 0) + 1
    if not ctx.skeleton:
        ctx.summary.append({"technique": TECHNIQUE, "swapped": len(plan), "by_kind": by_kind})
    return model
