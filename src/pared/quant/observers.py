"""Calibration: what is recorded of a tensor, and the range estimators computed from it.

One calibration pass fills a ``RangeRecord`` per layer input (per-batch min/max, a bounded
fixed-stride sample, and optionally the first few whole inputs). Every estimator is then a pure
function of that record, so ``auto`` can try them all without running the model again:

- ``minmax``: the running minimum and maximum over all batches.
- ``moving_average``: an exponential moving average of the per-batch min and max (PyTorch's
  ``MovingAverageMinMaxObserver``): one unusual batch moves the range a little, not all the way.
- ``percentile``: the 0.01st / 99.99th percentiles of the sample.
- ``mse``: the clipped range that minimises the mean squared quantization error of the sample
  (grid search on a shrink factor; the unclipped range is a candidate, so it is never worse
  than ``minmax`` on the sample).
- ``kl``: TensorRT's entropy calibration: the clipping threshold whose quantized histogram is
  closest to the original one in KL divergence.

The estimators work per tensor or per channel (``axis``) and for symmetric or asymmetric grids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pared.errors import InputRefused
from pared.quant.primitives import choose_qparams, fake_quantize, qrange

# Cap on values kept per tensor: enough for stable 99.99th percentiles on transformer activations
# while bounding memory (4 MB of floats per observed layer).
_MAX_SAMPLES = 1 << 20
# Weight of the newest batch in ``moving_average`` (PyTorch uses 0.01 over thousands of batches;
# calibration sees tens, so the newest batch gets more weight).
MOVING_AVERAGE_WEIGHT = 0.1
PERCENTILE = 99.99
# Shrink factors tried by ``mse``: 1.0 (no clipping) down to 0.2 of the observed range.
_MSE_SHRINKS = torch.linspace(1.0, 0.2, 41)
_KL_BINS = 2048

METHODS = ("minmax", "moving_average", "percentile", "mse", "kl")


class RangeRecord:
    """What calibration keeps of one tensor.

    Args:
        name: the layer whose input this is (named in errors).
        keep_inputs: also keep the first this-many whole inputs (``auto`` measures the layer's
            output error on them).
    """

    def __init__(self, name: str, *, keep_inputs: int = 0) -> None:
        self.name = name
        self.keep_inputs = keep_inputs
        self.batch_min: list[torch.Tensor] = []
        self.batch_max: list[torch.Tensor] = []
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.inputs: list[torch.Tensor] = []

    @property
    def batches(self) -> int:
        return len(self.batch_min)

    def update(self, x: torch.Tensor) -> None:
        """Record one calibration batch of this tensor.

        Raises:
            InputRefused: the tensor holds NaN or inf (the message names the layer).
        """
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise InputRefused(f"non-finite activation at the input of layer {self.name!r} during calibration")
        self.batch_min.append(x.min())
        self.batch_max.append(x.max())
        flat = x.flatten()
        budget = _MAX_SAMPLES // 8
        if flat.numel() > budget:
            # A fixed-stride subsample keeps calibration deterministic.
            flat = flat[:: flat.numel() // budget + 1]
        if self.kept < _MAX_SAMPLES:
            self.samples.append(flat.clone())
            self.kept += flat.numel()
        if len(self.inputs) < self.keep_inputs:
            self.inputs.append(x.clone())

    def sample(self) -> torch.Tensor:
        assert self.samples, f"observer of {self.name!r} saw no data"
        return torch.cat(self.samples)


def record_range(record: RangeRecord, method: str, *, symmetric: bool, signed: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(min, max)`` that ``method`` estimates from a calibration record."""
    assert record.batches, f"observer of {record.name!r} saw no data"
    if method == "minmax":
        return torch.stack(record.batch_min).min(), torch.stack(record.batch_max).max()
    if method == "moving_average":
        return _moving_average(record.batch_min), _moving_average(record.batch_max)
    if method == "percentile":
        return percentile_range(record.sample(), PERCENTILE)
    if method == "mse":
        return mse_range(record.sample(), bits=bits, symmetric=symmetric, signed=signed)
    if method == "kl":
        return kl_range(record.sample(), bits=bits, signed=signed)
    raise ValueError(f"unknown calibration method {method!r}")


def _moving_average(values: list[torch.Tensor]) -> torch.Tensor:
    avg = values[0]
    for v in values[1:]:
        avg = avg + MOVING_AVERAGE_WEIGHT * (v - avg)
    return avg


def percentile_range(values: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``100 - percentile`` and ``percentile`` percentiles of ``values``."""
    q = torch.tensor([1 - percentile / 100, percentile / 100])
    lo, hi = torch.quantile(values.flatten().float(), q)
    return lo, hi


def quantization_mse(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, bits: int = 8, symmetric: bool, signed: bool, axis: int | None = None
) -> torch.Tensor:
    """Mean squared error of fake-quantizing ``x`` with the grid covering ``[lo, hi]``.

    Per tensor (``axis=None``) this is a scalar; per channel, one value per slice along ``axis``.
    Symmetric signed grids use ``±(2^(b-1) - 1)`` as ``choose_qparams`` (and int8 weights) do.
    """
    scale, zp = choose_qparams(lo, hi, bits=bits, symmetric=symmetric, signed=signed)
    qmin, qmax = qrange(bits, signed=signed)
    if symmetric and signed:
        qmin = -qmax
    err = (fake_quantize(x, scale, zp, qmin, qmax, axis=axis) - x.float()) ** 2
    if axis is None:
        return err.mean()
    return err.transpose(0, axis).reshape(x.shape[axis], -1).mean(dim=1)


def mse_range(
    x: torch.Tensor, *, bits: int = 8, symmetric: bool, signed: bool, axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped range minimising the quantization MSE of ``x`` (per tensor or per ``axis`` slice).

    Tries the min/max range shrunk by factors from 1.0 to 0.2 and keeps, per channel, the factor
    with the lowest error; ties keep the wider range, so the result is never worse than min/max.
    """
    x = x.float()
    if axis is None:
        lo, hi = x.min(), x.max()
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for shrink in _MSE_SHRINKS:
        err = quantization_mse(x, lo * shrink, hi * shrink, bits=bits, symmetric=symmetric, signed=signed, axis=axis)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * shrink, best_lo)
        best_hi = torch.where(better, hi * shrink, best_hi)
    return best_lo, best_hi


def kl_range(values: torch.Tensor, *, bits: int = 8, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-style entropy calibration on ``|values|``: the clipping threshold ``t`` whose
    ``2^(b-1)``-level (or ``2^b`` for non-negative data on an unsigned grid) quantized histogram
    has the lowest KL divergence from the clipped original. Returns ``[max(min, -t), min(max, t)]``.
    """
    values = values.flatten().float()
    lo, hi = values.min(), values.max()
    absval = values.abs()
    amax = float(absval.max())
    if amax == 0.0:
        return lo, hi
    levels = 2 ** bits if (lo >= 0 and not signed) else 2 ** (bits - 1)
    # A histogram much finer than the sample is mostly empty bins and its KL minimum is noise:
    # about 16 values per bin, never fewer bins than grid levels (then nothing is clipped).
    bins = int(min(_KL_BINS, max(levels, values.numel() // 16)))
    hist = torch.histc(absval, bins=bins, min=0.0, max=amax).double()
    best_i, best_kl = bins, float("inf")
    for i in range(levels, bins + 1, max(1, bins // 256)):
        kl = _clipped_kl(hist, i, levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    t = torch.tensor(best_i * amax / bins, dtype=values.dtype)
    return torch.maximum(lo, -t), torch.minimum(hi, t)


def _clipped_kl(hist: torch.Tensor, i: int, levels: int) -> float:
    """KL(p || q): p is ``hist`` clipped at bin ``i`` (outliers added to the last bin), q is p
    merged into ``levels`` bins and spread back evenly over the non-empty source bins."""
    p = hist[:i].clone()
    p[-1] += hist[i:].sum()
    nonzero = (hist[:i] > 0).double()
    idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
    totals = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, idx, hist[:i])
    counts = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, idx, nonzero)
    q = torch.where(nonzero > 0, totals[idx] / counts[idx].clamp(min=1), torch.zeros_like(p))
    p, q = p / p.sum(), q / q.sum().clamp(min=1e-300)
    mask = p > 0
    # The clipped outlier mass can land in an empty bin of q: a small floor keeps KL finite there.
    return float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-10))).sum())


def outlier_ratio(record: RangeRecord, quantile: float = 0.999) -> float:
    """``max|x|`` over the ``quantile`` of ``|x|``: how much wider the full range is than where
    nearly all values lie. Large values mean a per-tensor int8 grid is set by a few outliers."""
    absval = record.sample().abs()
    bulk = float(torch.quantile(absval, quantile))
    top = float(absval.max())
    return top / bulk if bulk > 0 else (float("inf") if top > 0 else 1.0)


def auto_range(
    record: RangeRecord,
    output_error: Callable[[torch.Tensor, torch.Tensor], float],
    *,
    symmetric: bool,
    signed: bool,
) -> tuple[str, tuple[torch.Tensor, torch.Tensor], dict[str, float]]:
    """The method whose range gives the lowest ``output_error(lo, hi)``, its range, and every
    method's error (for the report). Ties keep the earlier method in ``METHODS``."""
    errors: dict[str, float] = {}
    best: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    for method in METHODS:
        rng = record_range(record, method, symmetric=symmetric, signed=signed)
        errors[method] = output_error(*rng)
        if best is None or errors[method] < errors[best[0]]:
            best = (method, rng)
    assert best is not None
    return best[0], best[1], errors
