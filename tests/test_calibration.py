"""Calibration methods (range estimators, ``auto``), MSE weight ranges and the outlier fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pared.apply import Context, compress_
from pared.config import config_from_dict, config_to_dict
from pared.errors import InputRefused, UsageError
from pared.quant import Int8Config, QuantLinear
from pared.quant.int8 import weight_qparams
from pared.quant.observers import (
    METHODS,
    RangeRecord,
    auto_range,
    kl_range,
    mse_range,
    outlier_ratio,
    percentile_range,
    quantization_mse,
    record_range,
)
from pared.quant.primitives import quantize
from pared.testing.models import random_batches, tiny_cnn, tiny_mlp

SCHEMES = [(False, False), (True, True)]  # (symmetric, signed): uint8 asymmetric, int8 symmetric
_floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def _record(*batches: torch.Tensor, keep: int = 0) -> RangeRecord:
    rec = RangeRecord("layer", keep_inputs=keep)
    for b in batches:
        rec.update(b)
    return rec


# ------------------------------------------------------------------ estimator properties


@settings(max_examples=60, deadline=None)
@given(st.lists(_floats, min_size=1, max_size=64), st.lists(_floats, min_size=1, max_size=64))
def test_minmax_range_contains_every_value(a: list[float], b: list[float]) -> None:
    ta, tb = torch.tensor(a), torch.tensor(b)
    lo, hi = record_range(_record(ta, tb), "minmax", symmetric=False, signed=False)
    both = torch.cat([ta, tb])
    assert lo <= both.min() and hi >= both.max()
    assert lo == both.min() and hi == both.max()


@settings(max_examples=60, deadline=None)
@given(st.lists(_floats, min_size=2, max_size=200), st.sampled_from(SCHEMES))
def test_mse_range_error_never_above_minmax(values: list[float], scheme: tuple[bool, bool]) -> None:
    symmetric, signed = scheme
    x = torch.tensor(values)
    lo, hi = mse_range(x, symmetric=symmetric, signed=signed)
    assert x.min() <= lo <= hi <= x.max() or (lo == x.min() and hi == x.max())
    err_mse = quantization_mse(x, lo, hi, symmetric=symmetric, signed=signed)
    err_minmax = quantization_mse(x, x.min(), x.max(), symmetric=symmetric, signed=signed)
    assert err_mse <= err_minmax


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 40), st.integers(0, 2**31 - 1))
def test_per_channel_mse_range_not_worse_per_channel(channels: int, width: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, width, generator=gen) * torch.rand(channels, 1, generator=gen) * 5
    lo, hi = mse_range(w, symmetric=True, signed=True, axis=0)
    assert lo.shape == hi.shape == (channels,)
    per_channel = quantization_mse(w, lo, hi, symmetric=True, signed=True, axis=0)
    unclipped = quantization_mse(w, w.amin(1), w.amax(1), symmetric=True, signed=True, axis=0)
    assert per_channel.shape == (channels,)
    assert torch.all(per_channel <= unclipped)


def test_mse_range_clips_a_heavy_tail() -> None:
    # Laplace data: the few largest values cost less when clipped than the coarse grid they force
    # on everything else (at 4 bits the optimum is near half the range).
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    lo, hi = mse_range(x, bits=4, symmetric=True, signed=True)
    assert hi < 0.8 * x.abs().max()
    clipped = quantization_mse(x, lo, hi, bits=4, symmetric=True, signed=True)
    full = quantization_mse(x, x.min(), x.max(), bits=4, symmetric=True, signed=True)
    assert clipped < 0.7 * full


def test_mse_range_keeps_a_lone_outlier_that_would_cost_more_clipped() -> None:
    x = torch.cat([torch.linspace(-1, 1, 10_000), torch.tensor([200.0])])
    _, hi = mse_range(x, symmetric=False, signed=False)
    assert hi > 150.0  # clipping 200 to anything small costs more squared error than the grid


def test_kl_range_clips_heavy_tail_and_keeps_uniform_data() -> None:
    gen = torch.Generator().manual_seed(0)
    heavy = torch.distributions.StudentT(2.0).sample((200_000,))
    lo, hi = kl_range(heavy, signed=True)
    assert -heavy.abs().max() < lo < 0 < hi < heavy.abs().max()
    uniform = torch.rand(200_000, generator=gen)
    lo_u, hi_u = kl_range(uniform, signed=False)
    assert lo_u == uniform.min() and hi_u >= 0.95 * uniform.max()  # nothing to clip in a flat histogram


def test_kl_range_of_zeros_is_zero() -> None:
    lo, hi = kl_range(torch.zeros(100), signed=False)
    assert lo == 0 and hi == 0


def test_percentile_range_within_minmax() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    lo, hi = percentile_range(x, 99.0)
    assert x.min() < lo < hi < x.max()


def test_moving_average_damps_one_unusual_batch() -> None:
    rec = _record(*[torch.tensor([-1.0, 1.0])] * 5, torch.tensor([-50.0, 50.0]))
    lo, hi = record_range(rec, "moving_average", symmetric=False, signed=False)
    assert hi == pytest.approx(1.0 + 0.1 * 49.0)  # the newest batch moves the range by 10%
    assert lo == pytest.approx(-(1.0 + 0.1 * 49.0))
    assert record_range(rec, "minmax", symmetric=False, signed=False)[1] == 50.0


def test_every_method_gives_finite_range_for_constant_data() -> None:
    rec = _record(torch.full((4, 8), 3.0), torch.full((4, 8), 3.0))
    for method in METHODS:
        lo, hi = record_range(rec, method, symmetric=False, signed=False)
        assert torch.isfinite(lo) and torch.isfinite(hi), method


def test_record_refuses_non_finite_naming_the_layer() -> None:
    rec = RangeRecord("encoder.fc1")
    with pytest.raises(InputRefused, match="encoder.fc1"):
        rec.update(torch.tensor([1.0, float("inf")]))


def test_auto_range_picks_lowest_error_and_reports_all() -> None:
    rec = _record(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
    target = {"minmax": 3.0, "moving_average": 2.0, "percentile": 5.0, "mse": 1.0, "kl": 4.0}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fake_error(lo: torch.Tensor, hi: torch.Tensor) -> float:
        seen.append((lo, hi))
        return target[METHODS[len(seen) - 1]]  # auto tries the methods in METHODS order

    method, rng, errors = auto_range(rec, fake_error, symmetric=False, signed=False)
    assert method == "mse" and errors == target
    assert rng == record_range(rec, "mse", symmetric=False, signed=False)


def test_outlier_ratio() -> None:
    flat = _record(torch.linspace(-1, 1, 100_000))
    spiky = _record(torch.cat([torch.linspace(-1, 1, 100_000), torch.tensor([500.0])]))
    assert outlier_ratio(flat) == pytest.approx(1.0, rel=0.01)
    assert outlier_ratio(spiky) > 400


# ------------------------------------------------------------------ int8 with each method


@pytest.mark.parametrize("method", [*METHODS, "auto"])
def test_int8_every_calibration_method_stays_close_to_fp32(method: str) -> None:
    ref = tiny_cnn()
    ctx = Context(calib=random_batches((8, 3, 6, 6)))
    q = compress_(copy.deepcopy(ref), Int8Config(calibration=method), context=ctx)
    x = random_batches((32, 3, 6, 6), 1, seed=7)[0][0]
    with torch.no_grad():
        rel = float(((q(x) - ref(x)) ** 2).mean() / (ref(x) ** 2).mean())
    assert rel < 0.02, method
    step = ctx.summary[-1]
    assert step["calibration"] == method
    if method == "auto":
        assert set(step["calibration_choice"]) == {"conv", "fc"}
        assert set(step["calibration_choice"].values()) <= set(METHODS)


def test_auto_is_no_worse_than_minmax_on_its_calibration_data() -> None:
    # auto minimises each layer's output error on the first calibration batches: on those
    # batches the whole model should not be worse than min-max (one layer here, so exactly so).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16)).eval()
    calib = random_batches((64, 16), 2)
    calib[0][0][0, 0] = 40.0  # an outlier that min-max has to cover
    outs = {}
    for method in ("minmax", "auto"):
        q = compress_(copy.deepcopy(model), Int8Config(calibration=method), calib=calib)
        with torch.no_grad():
            outs[method] = sum(float(((q(x) - model(x)) ** 2).mean()) for (x,) in calib)
    assert outs["auto"] <= outs["minmax"]


def test_weight_calibration_mse_lowers_weight_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, 0] *= 30  # one wide input column sets every row's min-max range
    errs = {}
    for method in ("minmax", "mse"):
        scale, zp = weight_qparams(w, method)
        w_hat = quantize(w, scale, zp, -127, 127, axis=0).float() * scale[:, None]
        errs[method] = float(((w_hat - w) ** 2).mean())
    assert errs["mse"] <= errs["minmax"]
    model = tiny_mlp()
    q = compress_(copy.deepcopy(model), Int8Config(weight_calibration="mse"), calib=random_batches((8, 16)))
    assert isinstance(q[0], QuantLinear) and q[0].weight_q.dtype == torch.int8


# ------------------------------------------------------------------ outlier fallback


class _Outliers(nn.Module):
    """``a`` sees ordinary inputs; ``b``'s input has one huge channel (as transformer FFNs do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        spike = torch.zeros_like(h)
        spike[..., 0] = 1000.0 * (x[..., 0] > 2.5).float()
        return self.b(h + spike)


def test_outlier_fallback_keeps_the_layer_float_and_names_it() -> None:
    model = _Outliers().eval()
    calib = random_batches((64, 8), 4)
    ctx = Context(calib=calib)
    q = compress_(copy.deepcopy(model), Int8Config(fallback_outliers=True, outlier_threshold=20.0), context=ctx)
    step = ctx.summary[-1]
    assert list(step["outlier_fallback"]) == ["b"] and step["outlier_fallback"]["b"] > 20
    assert type(q.b) is nn.Linear and isinstance(q.a, QuantLinear)
    assert "b" in step["kept_float"]
    # the layer kept in float is recorded, so a skeleton rebuild has the same structure
    skeleton = compress_(_Outliers().eval(), Int8Config(fallback_outliers=True, outlier_threshold=20.0),
                         context=Context(skeleton=True, structure=ctx.structure))
    assert type(skeleton.b) is nn.Linear
    skeleton.load_state_dict(q.state_dict(), strict=True)
    # without the flag the same layer is quantized
    q2 = compress_(copy.deepcopy(model), Int8Config(), calib=calib)
    assert isinstance(q2.b, QuantLinear)


def test_skeleton_refuses_a_bad_kept_float_record() -> None:
    with pytest.raises(InputRefused, match="kept_float"):
        compress_(tiny_mlp(), Int8Config(), context=Context(skeleton=True, structure={"0:int8": {"kept_float": ["nope"]}}))


# ------------------------------------------------------------------ config and bad input


def test_new_fields_round_trip() -> None:
    cfg = Int8Config(calibration="auto", weight_calibration="mse", bias_correction=True,
                     fallback_outliers=True, outlier_threshold=10.0)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("fields, message", [
    ({"calibration": "entropy"}, "calibration"),
    ({"weight_calibration": "kl"}, "weight_calibration"),
    ({"outlier_threshold": 1.0}, "outlier_threshold"),
    ({"mode": "dynamic", "bias_correction": True}, "static"),
    ({"mode": "weight", "fallback_outliers": True}, "static"),
])
def test_bad_fields_refused_before_any_work(fields: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        config_from_dict({"technique": "int8", **fields})


def test_nan_calibration_refused_for_every_method() -> None:
    batches = random_batches((4, 16), 2)
    batches[1][0][0, 0] = float("nan")
    for method in ("mse", "kl", "auto"):
        with pytest.raises(InputRefused, match="calibration batch 1"):
            compress_(tiny_mlp(), Int8Config(calibration=method), calib=batches)


def test_unmatched_rule_refused() -> None:
    with pytest.raises(UsageError, match="fc9"):
        compress_(tiny_mlp(), Int8Config(calibration="auto", exclude=("fc9",)), calib=random_batches((4, 16)))


# ------------------------------------------------------------------ artefact size


def test_embedding_scales_are_float16_and_finite_for_extreme_rows() -> None:
    emb = nn.Embedding(4, 8)
    with torch.no_grad():
        emb.weight[0] = 1e-30  # below float16's range: the row becomes zeros, never NaN
        emb.weight[1] = 1e30  # above it: the row saturates, never inf
        emb.weight[2] = 0.0
    model = nn.Sequential(emb, nn.Linear(8, 2)).eval()
    ids = torch.tensor([[0, 1, 2, 3]])
    q = compress_(copy.deepcopy(model), Int8Config(), calib=[(ids,)])
    scale = q[0].weight_scale
    assert scale.dtype == torch.float16 and torch.isfinite(scale).all() and (scale > 0).all()
    out = q[0](ids)
    assert torch.isfinite(out).all() and torch.equal(out[0, 2], torch.zeros(8))
    row = emb.weight[3].detach()
    assert torch.allclose(out[0, 3], row, atol=float(row.abs().max()) / 127)


def test_export_drops_path_like_names_but_keeps_parameter_names(tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    from pared.onnx_export import export_onnx

    model = tiny_mlp()
    q = compress_(copy.deepcopy(model), Int8Config(), calib=random_batches((8, 16)))
    x = random_batches((4, 16), 1, seed=9)[0][0]
    path = export_onnx(q, (x,), tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    graph = onnx.load(str(path)).graph
    assert all(not n.name for n in graph.node)
    assert not any(v.startswith("/") for n in graph.node for v in (*n.input, *n.output))
    assert "0.weight_scale" in {i.name for i in graph.initializer}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]), q(x), atol=1e-5)
