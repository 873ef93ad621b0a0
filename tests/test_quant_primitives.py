"""Property tests of the affine quantization primitives (reliability plan 3.2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pared.errors import UsageError
from pared.quant.primitives import MIN_SCALE, choose_qparams, dequantize, fake_quantize, qrange, quantize

PROPS = settings(max_examples=200, deadline=None, database=None)  # no .hypothesis dir in the repo
F32_MAX = 3.4028234663852886e38
MIN_SCALE_F32 = float(torch.tensor(MIN_SCALE))  # the floor as stored in a float32 scale

# (bits, symmetric, signed): every scheme choose_qparams supports
schemes = st.tuples(st.sampled_from([2, 3, 4, 8]), st.booleans(), st.booleans())

# Ordinary finite values (no overflow of max - min) for the arithmetic properties.
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
values = st.lists(finite, min_size=1, max_size=64)

# Degenerate inputs the PyTorch strategies exclude: NaN, inf, denormals, huge, signed zeros.
special = st.sampled_from(
    [0.0, -0.0, 1e-45, -1e-45, 1.4e-40, -3e-39, 1.1754942e-38, 1e-30, -1e-30, 1e30, -1e30, 1.0, -1.0]
)
tiny_bound = 9.99999991097579e-38  # 1e-37 rounded to float32
tiny = st.floats(min_value=-tiny_bound, max_value=tiny_bound, width=32, allow_subnormal=True)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
any_f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
degenerate_tensors = st.one_of(
    st.builds(
        lambda vs: torch.tensor(vs, dtype=torch.float32),
        st.lists(st.one_of(special, non_finite, finite), min_size=1, max_size=16),
    ),
    st.builds(
        lambda v, n: torch.full((n,), v, dtype=torch.float32),
        st.one_of(special, finite),
        st.integers(1, 16),
    ),
    st.builds(lambda n: torch.zeros(n), st.integers(1, 16)),
    st.builds(lambda v: torch.tensor([v], dtype=torch.float32), st.one_of(special, finite)),
    st.builds(lambda vs: torch.tensor(vs, dtype=torch.float32), st.lists(special, min_size=1, max_size=16)),
    st.builds(
        lambda vs: torch.tensor(vs, dtype=torch.float32),
        st.lists(tiny, min_size=1, max_size=16),
    ),
)


def _qparams(x: torch.Tensor, bits: int, symmetric: bool, signed: bool):
    scale, zp = choose_qparams(x.min(), x.max(), bits=bits, symmetric=symmetric, signed=signed)
    qmin, qmax = qrange(bits, signed=signed)
    return scale, zp, qmin, qmax


def _representable(scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> tuple[float, float]:
    return float((qmin - zp) * scale), float((qmax - zp) * scale)


# ---------------------------------------------------------------- 1. bounded round-trip error


@PROPS
@given(values, schemes)
def test_round_trip_error_within_half_step(xs: list[float], scheme) -> None:
    bits, symmetric, signed = scheme
    x = torch.tensor(xs, dtype=torch.float32)
    scale, zp, qmin, qmax = _qparams(x, bits, symmetric, signed)
    lo, hi = _representable(scale, zp, qmin, qmax)
    inside = x[(x >= lo) & (x <= hi)]
    err = (fake_quantize(inside, scale, zp, qmin, qmax) - inside).abs()
    bound = float(scale) / 2 * (1 + 1e-6) + 1e-6 * inside.abs()
    assert bool((err <= bound).all()), (err - bound).max()


@PROPS
@given(st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=8), st.booleans())
def test_round_trip_error_per_channel(rows: list[list[float]], signed: bool) -> None:
    w = torch.tensor(rows, dtype=torch.float32)  # (channels, 3)
    bound_abs = w.abs().amax(dim=1)
    scale, zp = choose_qparams(-bound_abs, bound_abs, symmetric=True, signed=signed)
    assert scale.shape == (len(rows),) and zp.shape == (len(rows),)
    qmin, qmax = qrange(8, signed=signed)
    q = quantize(w, scale, zp, qmin, qmax, axis=0)
    assert q.shape == w.shape and q.dtype == (torch.int8 if signed else torch.uint8)
    err = (dequantize(q, scale, zp, axis=0) - w).abs()
    bound = scale[:, None] / 2 * (1 + 1e-6) + 1e-6 * w.abs()
    assert bool((err <= bound).all())


# ---------------------------------------------------------------- 2. range and saturation


@PROPS
@given(values, schemes, st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=16))
def test_out_of_range_saturates_never_wraps(xs: list[float], scheme, probes: list[float]) -> None:
    bits, symmetric, signed = scheme
    scale, zp, qmin, qmax = _qparams(torch.tensor(xs, dtype=torch.float32), bits, symmetric, signed)
    lo, hi = _representable(scale, zp, qmin, qmax)
    p = torch.tensor(probes, dtype=torch.float32)
    q = quantize(p, scale, zp, qmin, qmax)
    expected_dtype = torch.int8 if signed else torch.uint8
    assert q.dtype == expected_dtype
    qi = q.to(torch.int64)
    assert bool(((qi >= qmin) & (qi <= qmax)).all())
    above, below = p > hi + float(scale), p < lo - float(scale)
    assert bool((qi[above] == qmax).all()) and bool((qi[below] == qmin).all())
    # outside the range the error equals the distance to the clamp bound (up to rounding)
    xh = dequantize(q, scale, zp)
    finite_above = above & torch.isfinite(p)
    if finite_above.any():
        assert torch.allclose(xh[finite_above], torch.full_like(xh[finite_above], hi), rtol=1e-6)


def test_saturation_examples() -> None:
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    inf = float("inf")
    q = quantize(torch.tensor([12.7, 12.8, 1e9, inf, -12.8, -12.9, -1e30, -inf]), scale, zp, -128, 127)
    assert q.tolist() == [127, 127, 127, 127, -128, -128, -128, -128]
    q = quantize(torch.tensor([300.0, -5.0]), torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), 0, 255)
    assert q.dtype == torch.uint8 and q.tolist() == [255, 0]


# ---------------------------------------------------------------- 3. idempotence


@PROPS
@given(values, schemes)
def test_quantize_dequantize_is_a_projection(xs: list[float], scheme) -> None:
    bits, symmetric, signed = scheme
    x = torch.tensor(xs, dtype=torch.float32)
    scale, zp, qmin, qmax = _qparams(x, bits, symmetric, signed)
    grid = torch.arange(qmin, qmax + 1)
    codes = grid.to(torch.int8 if signed else torch.uint8)
    assert torch.equal(quantize(dequantize(codes, scale, zp), scale, zp, qmin, qmax), codes)
    q = quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(quantize(dequantize(q, scale, zp), scale, zp, qmin, qmax), q)
    once = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(fake_quantize(once, scale, zp, qmin, qmax), once)


# ---------------------------------------------------------------- 4. monotonicity


@PROPS
@given(values, schemes, st.lists(st.floats(width=32, allow_nan=False), min_size=2, max_size=32))
def test_monotone(xs: list[float], scheme, probes: list[float]) -> None:
    bits, symmetric, signed = scheme
    scale, zp, qmin, qmax = _qparams(torch.tensor(xs, dtype=torch.float32), bits, symmetric, signed)
    p = torch.tensor(sorted(probes), dtype=torch.float32)
    q = quantize(p, scale, zp, qmin, qmax).to(torch.int64)
    assert bool((q[1:] >= q[:-1]).all())
    xh = dequantize(q, scale, zp)
    assert bool((xh[1:] >= xh[:-1]).all())


# ---------------------------------------------------------------- 5. exact zero


@PROPS
@given(values, schemes)
def test_zero_is_exact(xs: list[float], scheme) -> None:
    bits, symmetric, signed = scheme
    x = torch.tensor(xs, dtype=torch.float32)
    scale, zp, qmin, qmax = _qparams(x, bits, symmetric, signed)
    assert qmin <= int(zp) <= qmax
    zeros = torch.tensor([0.0, -0.0])
    assert fake_quantize(zeros, scale, zp, qmin, qmax).tolist() == [0.0, 0.0]
    # zeros inside a tensor (ReLU zeros, padding) stay exactly zero
    with_zeros = torch.cat([x, torch.zeros(3)])
    assert bool((fake_quantize(with_zeros, scale, zp, qmin, qmax)[-3:] == 0).all())


# ---------------------------------------------------------------- 8. degenerate inputs


@PROPS
@given(degenerate_tensors, schemes)
def test_degenerate_tensors_give_finite_positive_scales(x: torch.Tensor, scheme) -> None:
    bits, symmetric, signed = scheme
    scale, zp, qmin, qmax = _qparams(x, bits, symmetric, signed)
    assert bool(torch.isfinite(scale).all()) and float(scale) >= MIN_SCALE_F32
    assert zp.dtype == torch.int32 and qmin <= int(zp) <= qmax
    out = fake_quantize(x, scale, zp, qmin, qmax)
    assert out.shape == x.shape
    finite_in = torch.isfinite(x)
    assert bool(torch.isfinite(out[finite_in]).all())
    assert bool((out[x == 0] == 0).all())


@PROPS
@given(any_f32, any_f32, schemes)
def test_nan_inf_in_min_max_never_give_nan_scales(lo: float, hi: float, scheme) -> None:
    assume(not (math.isfinite(lo) and math.isfinite(hi)) or abs(lo) + abs(hi) < F32_MAX)
    bits, symmetric, signed = scheme
    lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
    scale, zp = choose_qparams(lo_t, hi_t, bits=bits, symmetric=symmetric, signed=signed)
    qmin, qmax = qrange(bits, signed=signed)
    assert math.isfinite(float(scale)) and float(scale) >= MIN_SCALE_F32
    assert qmin <= int(zp) <= qmax


def test_per_channel_with_nan_and_constant_channels() -> None:
    lo = torch.tensor([float("nan"), 0.0, -2.0, 5.0])
    hi = torch.tensor([1.0, 0.0, float("inf"), 5.0])
    scale, zp = choose_qparams(lo, hi, symmetric=False, signed=False)
    assert bool(torch.isfinite(scale).all()) and bool((scale >= MIN_SCALE_F32).all())
    assert bool(((zp >= 0) & (zp <= 255)).all())


@pytest.mark.parametrize("bits", [2, 8])
def test_extreme_range_does_not_overflow_scale(bits: int) -> None:
    lo, hi = torch.tensor(-3e38), torch.tensor(3e38)
    scale, zp = choose_qparams(lo, hi, bits=bits, symmetric=False, signed=True)
    assert math.isfinite(float(scale)) and float(scale) > 0


# ---------------------------------------------------------------- 11. error falls as bits rise


@PROPS
@given(
    st.floats(min_value=-1e4, max_value=0.0, width=32),
    st.floats(min_value=0.0, max_value=1e4, width=32),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_error_bound_shrinks_with_bits(
    lo: float, hi: float, symmetric: bool, signed: bool, seed: int
) -> None:
    assume(hi - lo > 1e-3)
    lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
    qparams = {b: choose_qparams(lo_t, hi_t, bits=b, symmetric=symmetric, signed=signed) for b in (2, 4, 8)}
    scales = [float(qparams[b][0]) for b in (2, 4, 8)]
    assert scales[0] > scales[1] > scales[2] > 0  # worst-case error scale/2 strictly shrinks
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(2000, generator=gen)
    mse = []
    for b, s in zip((2, 4, 8), scales):
        scale, zp = qparams[b]
        qmin, qmax = qrange(b, signed=signed)
        err = fake_quantize(x, scale, zp, qmin, qmax) - x
        mse.append(float(err.pow(2).mean()))
        assert float(err.abs().max()) <= s / 2 * (1 + 1e-5) + 1e-6 * max(abs(lo), hi)
    assert mse[0] > mse[1] > mse[2]


# ---------------------------------------------------------------- qrange


@pytest.mark.parametrize("bits", [0, 1, 5, 16, 33, -8])
def test_qrange_rejects_bad_bits(bits: int) -> None:
    with pytest.raises(UsageError, match=f"got {bits}"):
        qrange(bits, signed=True)
    with pytest.raises(UsageError):
        choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), bits=bits, symmetric=True, signed=True)


def test_qrange_values() -> None:
    assert qrange(8, signed=True) == (-128, 127) and qrange(8, signed=False) == (0, 255)
    assert qrange(4, signed=True) == (-8, 7) and qrange(2, signed=False) == (0, 3)
    assert qrange(3, signed=True) == (-4, 3)


def test_symmetric_signed_uses_restricted_range() -> None:
    scale, zp = choose_qparams(torch.tensor(-2.0), torch.tensor(1.0), symmetric=True, signed=True)
    assert int(zp) == 0 and math.isclose(float(scale), 2.0 / 127, rel_tol=1e-6)
    q = quantize(torch.tensor([-2.0, 2.0]), scale, zp, -128, 127)
    assert q.tolist() == [-127, 127]  # -x and x quantize alike
