"""Activation range observers used during calibration.

Each observer sees every calibration batch of one tensor and returns the ``(min, max)`` range
to quantize it with. Kept as plain classes with ``update``/``range`` so a new estimator is one
small class.
"""

from __future__ import annotations

import torch

from pared.errors import InputRefused

# Cap on values kept for percentile estimation: enough for stable 99.99th percentiles on
# transformer activations while bounding memory (4 MB of floats).
_MAX_SAMPLES = 1 << 20


class MinMaxObserver:
    """Running minimum and maximum over all batches."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise InputRefused(f"non-finite activation at the input of layer {self.name!r} during calibration")
        lo, hi = x.min(), x.max()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.min is not None and self.max is not None, "observer saw no data"
        return self.min, self.max


class PercentileObserver(MinMaxObserver):
    """Clips the range to the given lower/upper percentiles of a bounded sample of values.

    Transformer activations have rare outliers; clipping them trades a little error on the
    outliers for a finer grid on everything else.
    """

    def __init__(self, name: str, percentile: float = 99.99) -> None:
        super().__init__(name)
        self.percentile = percentile
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        flat = x.detach().float().flatten()
        budget = _MAX_SAMPLES // 8
        if flat.numel() > budget:
            # A fixed-stride subsample keeps calibration deterministic.
            flat = flat[:: flat.numel() // budget + 1]
        if self.kept < _MAX_SAMPLES:
            self.samples.append(flat)
            self.kept += flat.numel()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat(self.samples)
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = torch.quantile(values, q)
        return lo, hi


def make_observer(method: str, name: str) -> MinMaxObserver:
    """Observer for a calibration method name (``minmax`` or ``percentile``)."""
    if method == "minmax":
        return MinMaxObserver(name)
    if method == "percentile":
        return PercentileObserver(name)
    raise ValueError(f"unknown calibration method {method!r}")
