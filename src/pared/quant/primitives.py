"""Affine quantization math as pure functions: tensors in, tensors out, no nn.Module.

Conventions: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
``x_hat = (q - zero_point) * scale``. Ranges are widened to contain 0 so that zero (padding,
ReLU zeros, pruned weights) is exact.
"""

from __future__ import annotations

import torch

from pared.errors import UsageError

# Smallest scale we allow: keeps constant / all-zero tensors finite without distorting real ranges.
MIN_SCALE = 1e-8
# Largest float32 scale: keeps qparams finite however wide the observed range.
_MAX_SCALE = float(torch.finfo(torch.float32).max)


def qrange(bits: int, *, signed: bool) -> tuple[int, int]:
    """Integer range for ``bits``: signed int8 is (-128, 127), unsigned is (0, 255)."""
    if bits not in (2, 3, 4, 8):
        raise UsageError(f"bits must be one of 2, 3, 4, 8, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    *,
    bits: int = 8,
    symmetric: bool,
    signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[min_val, max_val]`` (elementwise: per tensor or channel).

    Symmetric schemes use a zero point of 0 (signed) or the mid-point (unsigned) and
    restrict the signed range to ±(2^(b-1) - 1) so that -x and x quantize alike.

    Returns:
        ``(scale, zero_point)``: float32 scales >= MIN_SCALE and int32 zero points in range.
    """
    qmin, qmax = qrange(bits, signed=signed)
    # float64: a float32 range spanning more than float32's maximum would overflow to inf.
    min_val = torch.clamp(torch.nan_to_num(min_val.double(), nan=0.0, posinf=0.0, neginf=0.0), max=0.0)
    max_val = torch.clamp(torch.nan_to_num(max_val.double(), nan=0.0, posinf=0.0, neginf=0.0), min=0.0)
    # Every code is at most qmax - qmin steps from the zero point: this cap keeps every
    # dequantized value finite too, not just the scale.
    max_scale = _MAX_SCALE / (qmax - qmin)
    if symmetric:
        bound = torch.maximum(-min_val, max_val)
        half = (qmax - qmin) // 2
        scale = torch.clamp(bound / half, min=MIN_SCALE, max=max_scale)
        zp = torch.full_like(scale, 0 if signed else (qmax + qmin + 1) // 2, dtype=torch.int32)
    else:
        scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=MIN_SCALE, max=max_scale)
        zp = torch.clamp(torch.round(qmin - min_val / scale), qmin, qmax).to(torch.int32)
    return scale.float(), zp


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *, axis: int | None = None
) -> torch.Tensor:
    """Round ``x`` onto the integer grid; values outside the range saturate (never wrap)."""
    scale, zero_point = _broadcastable(scale, x, axis), _broadcastable(zero_point, x, axis)
    q = torch.round(x.float() / scale) + zero_point
    dtype = torch.int8 if qmin < 0 and qmax <= 127 else torch.uint8 if qmin >= 0 and qmax <= 255 else torch.int32
    return torch.clamp(q, qmin, qmax).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, axis: int | None = None) -> torch.Tensor:
    """Float values represented by integer codes ``q``."""
    scale, zero_point = _broadcastable(scale, q, axis), _broadcastable(zero_point, q, axis)
    return (q.to(torch.int32) - zero_point.to(torch.int32)).float() * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *, axis: int | None = None
) -> torch.Tensor:
    """``dequantize(quantize(x))``: what the deployed integer model computes with ``x``."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis=axis), scale, zero_point, axis=axis)


def _broadcastable(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    p = torch.as_tensor(p)
    if axis is None or p.numel() == 1:
        return p.reshape(()) if p.numel() == 1 else p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)
