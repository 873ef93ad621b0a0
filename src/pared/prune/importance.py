"""Importance criteria: plain callables ``(weight, grad) -> scores`` shaped like ``weight``.

Higher score means more important; pruning removes the lowest. A criterion is any function with
this signature, so a user's own criterion plugs in without subclassing. Structured pruning reduces
these per-weight scores over a channel or head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pared.errors import UsageError

Importance = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def magnitude(weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """``|w|``: the L1 magnitude criterion (Han et al. 2015; Zhu & Gupta 2017). ``grad`` is ignored."""
    return weight.detach().abs()


def taylor(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """``|w * g|``: first-order Taylor estimate of the loss change when ``w`` is set to zero
    (Molchanov et al. 2017). ``grad`` is the loss gradient, summed over a few batches.

    Raises:
        UsageError: ``grad`` is missing or shaped differently from ``weight``.
    """
    if grad is None:
        raise UsageError("taylor importance needs the weight's gradient (run a few training batches first)")
    if grad.shape != weight.shape:
        raise UsageError(
            f"taylor importance: gradient shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}"
        )
    return (weight.detach() * grad.detach()).abs()


IMPORTANCE: dict[str, Importance] = {"magnitude": magnitude, "taylor": taylor}


def get_importance(name: str) -> Importance:
    """The built-in criterion called ``name`` (``magnitude`` or ``taylor``)."""
    try:
        return IMPORTANCE[name]
    except KeyError:
        raise UsageError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCE)}") from None
