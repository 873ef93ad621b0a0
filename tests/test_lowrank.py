"""Low-rank factorization: SVD math, Linear/Conv2d replacement, rank selection, bad input, reload, export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pared
from pared.apply import Context
from pared.artefact import load_artefact, save_artefact
from pared.config import config_from_dict, config_to_dict
from pared.errors import InputRefused, UsageError
from pared.lowrank import LowRankConfig, LowRankConv2d, LowRankLinear, factorize
from pared.lowrank_svd import (
    allocate_ranks,
    factor_matrix,
    rank_for_energy,
    rank_for_ratio,
    singular_values,
    whitening_from_gram,
)
from pared.testing.models import random_batches, tiny_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=(1, 2)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 3, 10),
    ).eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ pure math


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 1000))
def test_full_rank_factors_reproduce_the_matrix(out: int, n: int, seed: int) -> None:
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(seed))
    a, b = factor_matrix(w, min(out, n))
    assert a.shape == (out, min(out, n)) and b.shape == (min(out, n), n)
    torch.testing.assert_close(a @ b, w, atol=1e-5, rtol=1e-5)


def test_truncated_error_is_the_discarded_singular_values() -> None:
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = singular_values(w)
    a, b = factor_matrix(w, 7)
    assert float(torch.linalg.matrix_norm(w - a @ b) ** 2) == pytest.approx(
        float((s[7:] ** 2).sum()), rel=1e-9
    )


def test_whitened_factors_minimise_the_output_error_not_the_weight_error() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    x = torch.randn(200, 24, generator=gen, dtype=torch.float64) * torch.linspace(
        0.05, 3.0, 24, dtype=torch.float64
    )
    s = whitening_from_gram(x.T @ x)
    a, b = factor_matrix(w, 6, s)
    a0, b0 = factor_matrix(w, 6)
    out_err = lambda a, b: float(torch.linalg.matrix_norm(x @ w.T - x @ (a @ b).T))  # noqa: E731
    assert out_err(a, b) < 0.9 * out_err(a0, b0)
    # and its discarded whitened singular values are that output error
    assert out_err(a, b) ** 2 == pytest.approx(
        float((singular_values(w, s)[6:] ** 2).sum()), rel=1e-3
    )


def test_rank_for_energy_and_ratio() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: 64%, 93%, 100%
    assert [rank_for_energy(s, e) for e in (0.5, 0.64, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 3]
    assert rank_for_energy(torch.zeros(3), 0.9) == 1
    assert rank_for_ratio(64 * 32, 64 + 32, 0.5) == 10  # 10 * 96 = 960 <= 1024 < 11 * 96
    assert rank_for_ratio(4, 100, 0.5) == 1


def test_allocation_spends_the_budget_where_error_per_parameter_falls_most() -> None:
    flat = torch.ones(10)  # every value removes 10% of this layer's error
    steep = torch.tensor(
        [10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    )  # the rest are ~1% each
    ranks = allocate_ranks({"flat": flat, "steep": steep}, {"flat": 10, "steep": 10}, budget=100)
    assert sum(r * 10 for r in ranks.values()) <= 100
    assert ranks["flat"] > ranks["steep"] >= 1


# ------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 10, 3, padding=1, stride=(1, 2)),
        nn.Conv2d(4, 8, (3, 5), padding=(1, 2), stride=(2, 1), dilation=(1, 2), bias=False),
    ],
)
def test_conv_factorization_at_full_rank_is_exact(conv: nn.Conv2d, kind: str) -> None:
    x = torch.randn(2, conv.in_channels, 11, 13, generator=torch.Generator().manual_seed(0))
    out, cin, kh, kw = conv.weight.shape
    full = min(out, cin * kh * kw) if kind == "channel" else min(cin * kh, out * kw)
    new = factorize(conv, full, kind=kind)
    assert isinstance(new, LowRankConv2d) and new.kind == kind
    torch.testing.assert_close(new(x), conv(x), atol=1e-5, rtol=1e-4)


def test_linear_factorization_keeps_bias_and_shape() -> None:
    lin = nn.Linear(12, 7)
    new = factorize(lin, 7)
    assert (
        isinstance(new, LowRankLinear)
        and new[0].weight.shape == (7, 12)
        and new[1].bias is not None
    )
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(new(x), lin(x), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ the verb


@pytest.mark.parametrize(
    "cfg",
    [
        LowRankConfig(ratio=0.5),
        LowRankConfig(rank=8),
        LowRankConfig(energy=0.9),
        LowRankConfig(ratio=0.5, allocation="sensitivity"),
        LowRankConfig(ratio=0.5, data_aware=False),
    ],
)
def test_lowrank_shrinks_the_mlp_and_stays_close(cfg: LowRankConfig) -> None:
    model = tiny_mlp(64, 128, 32)
    calib = random_batches((16, 64))
    ctx = Context(calib=calib)
    out = pared.compress_(copy.deepcopy(model), cfg, context=ctx)
    x = calib[0][0]
    assert isinstance(out[0], LowRankLinear)
    assert _params(out) < _params(model)
    with torch.no_grad():
        err = float((out(x) - model(x)).pow(2).mean() / model(x).pow(2).mean())
    assert err < 0.75  # random weights have a flat spectrum; zero output would score 1
    step = ctx.summary[-1]
    assert (
        step["factored"] == len(step["layers"]) == 2 and step["selected_weights_kept_fraction"] < 1
    )


def test_data_aware_beats_plain_svd_on_the_calibration_data() -> None:
    model = _conv_net()
    calib = random_batches((8, 8, 6, 6))
    errs = {}
    for aware in (True, False):
        out = pared.compress_(
            copy.deepcopy(model),
            LowRankConfig(rank=12, data_aware=aware, include=("0", "2")),
            calib=calib,
        )
        with torch.no_grad():
            errs[aware] = sum(float((out(x) - model(x)).pow(2).mean()) for (x,) in calib)
    assert errs[True] < errs[False]


def test_layers_that_would_not_save_macs_stay_dense() -> None:
    model = tiny_mlp(64, 128, 32)
    ctx = Context(calib=random_batches((4, 64)))
    out = pared.compress_(
        copy.deepcopy(model), LowRankConfig(rank=30, min_mac_saving=0.2), context=ctx
    )
    # layer 0: 30 * 192 = 5760 of 8192 weights (saves 30%); layer 2: 30 * 160 = 4800 of 4096 (adds)
    assert isinstance(out[0], LowRankLinear) and isinstance(out[2], nn.Linear)
    assert [s["layer"] for s in ctx.summary[-1]["skipped"]] == ["2"]


def test_spatial_conv_mode_and_include() -> None:
    model = _conv_net()
    ctx = Context(calib=random_batches((4, 8, 6, 6)))
    out = pared.compress_(
        copy.deepcopy(model), LowRankConfig(ratio=0.5, conv="spatial", include=("2",)), context=ctx
    )
    assert isinstance(out[2], LowRankConv2d) and out[2].kind == "spatial"
    assert out[2][0].kernel_size == (3, 1) and out[2][1].kernel_size == (1, 3)
    assert isinstance(out[0], nn.Conv2d) and isinstance(out[5], nn.Linear)
    assert out(torch.randn(2, 8, 6, 6)).shape == (2, 10)


def test_per_layer_ranks_win() -> None:
    ctx = Context(calib=random_batches((4, 64)))
    out = pared.compress_(
        tiny_mlp(64, 128, 32), LowRankConfig(ratio=0.5, per_layer={"0": 5}), context=ctx
    )
    assert out[0].rank == 5 and out[2].rank == ctx.summary[-1]["layers"]["2"]["rank"] != 5


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "fields",
    [
        {"rank": 0},
        {"rank": -3},
        {"ratio": 0.0},
        {"ratio": 1.0},
        {"energy": 0.0},
        {"energy": 1.5},
        {"rank": 4, "energy": 0.9},
        {"per_layer": {"0": 0}},
        {"min_mac_saving": 1.0},
        {"allocation": "sensitivity", "rank": 3},
        {"conv": "depthwise"},
    ],
)
def test_bad_fields_are_refused(fields: dict) -> None:
    with pytest.raises(UsageError):
        config_from_dict({"technique": "lowrank", **fields})


@pytest.mark.parametrize(
    "cfg, match",
    [
        (LowRankConfig(rank=40), "rank 40 of '2' is above its full rank 32"),
        (LowRankConfig(include=("encoder.nope",)), "matched no eligible layer"),
        (LowRankConfig(per_layer={"nope": 3}), "per_layer names no selected"),
    ],
)
def test_bad_layers_and_ranks_are_refused(cfg: LowRankConfig, match: str) -> None:
    model = tiny_mlp(64, 128, 32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match=match):
        pared.compress_(model, cfg, calib=random_batches((4, 64)))
    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # nothing half-done


def test_nan_weights_and_missing_calibration_are_refused() -> None:
    model = tiny_mlp()
    with pytest.raises(UsageError, match="calibration"):
        pared.compress_(copy.deepcopy(model), LowRankConfig())
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(InputRefused, match="NaN"):
        pared.compress_(model, LowRankConfig(data_aware=False))


# ------------------------------------------------------------------------------ reload, export


def test_config_round_trip() -> None:
    cfg = LowRankConfig(energy=0.95, per_layer={"0": 3}, conv="spatial", include=("0",))
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_artefact_reload_rebuilds_the_ranks(tmp_path) -> None:
    model = _conv_net()
    calib = random_batches((4, 8, 6, 6))
    recipe = [
        LowRankConfig(ratio=0.4, allocation="sensitivity", conv="spatial", include=("0", "2")),
        LowRankConfig(ratio=0.5, include=("5",)),
    ]
    ctx = Context(calib=calib)
    out = pared.compress_(copy.deepcopy(model), recipe, context=ctx)
    save_artefact(out, tmp_path, recipe=recipe, source=None, structure=ctx.structure)
    back = load_artefact(tmp_path, model=_conv_net())
    x = calib[1][0]
    assert torch.equal(back(x), out(x))
    # a structure entry naming a layer the model lacks is refused, not guessed
    bad = {"0:lowrank": {"layers": {"9": {"kind": "linear", "rank": 2}}}}
    with pytest.raises(InputRefused, match="'9'"):
        pared.compress_(_conv_net(), recipe[0], context=Context(skeleton=True, structure=bad))


def test_onnx_export_matches_eager(tmp_path) -> None:
    import onnxruntime as ort

    from pared.onnx_export import export_onnx

    model = _conv_net()
    calib = random_batches((4, 8, 6, 6))
    out = pared.compress_(
        copy.deepcopy(model), LowRankConfig(ratio=0.5, conv="spatial"), calib=calib
    )
    x = calib[0][0]
    path = export_onnx(
        out, (x,), tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "batch"}}
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, out(x).detach().numpy(), atol=1e-4, rtol=1e-4)
