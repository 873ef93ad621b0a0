"""Calibration data: any iterable of model inputs plus an optional transform (NNCF's contract).

Every calibration-based technique, the training loop and the evaluators accept ``CalibData``.
Items are normalised to a tuple of tensors, the positional inputs of the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from pared.errors import InputRefused, UsageError


class CalibData:
    """Iterable of model inputs: ``CalibData(loader, transform=lambda batch: (batch[0],))``.

    Args:
        source: any re-iterable (a list, a DataLoader); each item is one model call's input.
        transform: maps an item to the model's positional inputs (a tensor or a tuple of tensors).
    """

    def __init__(self, source: Iterable[Any], transform: Callable[[Any], Any] | None = None) -> None:
        self.source = source
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for item in self.source:
            yield as_inputs(self.transform(item) if self.transform else item)


def as_inputs(item: Any) -> tuple[torch.Tensor, ...]:
    """A tensor or a sequence of tensors as a tuple of positional inputs."""
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item):
        return tuple(item)
    raise UsageError(f"calibration item must be a tensor or a tuple of tensors, got {type(item).__name__}")


def checked_batches(data: Iterable[Any], *, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Materialise up to ``limit`` calibration batches, refusing empty data and NaN/inf.

    Raises:
        UsageError: the data yields nothing, or a batch has no elements.
        InputRefused: a batch holds NaN or inf (the message names the batch index).
    """
    batches: list[tuple[torch.Tensor, ...]] = []
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            break
        inputs = as_inputs(item)
        for t in inputs:
            if t.numel() == 0:  # observers cannot take a range of nothing
                raise UsageError(f"calibration batch {i} is empty (shape {list(t.shape)})")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise InputRefused(f"calibration batch {i} contains NaN or inf")
        batches.append(inputs)
    if not batches:
        raise UsageError("calibration dataset must not be empty")
    return batches


def sample_count(batches: Iterable[tuple[torch.Tensor, ...]]) -> int:
    """Samples in ``batches``: the first dimension of each batch's first input (1 for a scalar)."""
    return sum(int(b[0].shape[0]) if b[0].dim() else 1 for b in batches)


def observe_layer_inputs(
    model: "torch.nn.Module",
    layers: Iterable[tuple[str, "torch.nn.Module"]],
    batches: Iterable[tuple[torch.Tensor, ...]],
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``batches`` through ``model`` and call ``observe(name, input)`` for each layer's input.

    The hooks are removed afterwards even if the model raises, so calibration never leaves a
    model instrumented.
    """
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=name: observe(n, args[0])) for name, m in layers]
    try:
        with torch.inference_mode():
            for inputs in batches:
                model(*inputs)
    finally:
        for h in hooks:
            h.remove()
