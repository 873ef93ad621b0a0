"""Cross-layer equalization and bias correction: exactness, pair finding, measured benefit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pared.apply import Context, compress_
from pared.artefact import load_artefact, save_artefact
from pared.config import config_from_dict, config_to_dict
from pared.errors import UsageError
from pared.quant import CrossLayerEqualizationConfig, Int8Config, QuantConv2d, QuantLinear
from pared.quant.bias_correction import mean_input_for, output_shift
from pared.quant.cle import equalization_scales, equalize_pair_, find_pairs, range_spread
from pared.recipe import load_recipe
from pared.tasks.digits import DigitsTask
from pared.testing.models import random_batches
from pared.testing.resnet import tiny_resnet


def _rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b**2).mean())


def _chain() -> nn.Sequential:
    """conv -> ReLU -> conv -> LeakyReLU -> max-pool -> depthwise conv, with badly spread channels."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
    )
    with torch.no_grad():
        m[0].weight.mul_(torch.logspace(-2, 1, 8).reshape(-1, 1, 1, 1))  # ranges over 3 decades
        m[2].weight.mul_(torch.logspace(1, -1, 8).reshape(-1, 1, 1, 1))
    return m.eval()


# ------------------------------------------------------------------ CLE


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1e3), st.floats(0.0, 1e3)), min_size=1, max_size=16))
def test_scales_equalize_ranges(pairs: list[tuple[float, float]]) -> None:
    r1 = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    r2 = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    s = equalization_scales(r1, r2)
    assert torch.all(s > 0) and torch.all(torch.isfinite(s))
    alive = (r1 > 0) & (r2 > 0) & (s > 1e-4) & (s < 1e4)
    assert torch.allclose((r1 / s)[alive], (r2 * s)[alive], rtol=1e-9)
    assert torch.all(s[(r1 == 0) | (r2 == 0)] == 1)  # dead channels are left alone


def test_cle_keeps_the_float_model_and_equalizes_ranges() -> None:
    ref = _chain()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = Context()
    eq = compress_(copy.deepcopy(ref), CrossLayerEqualizationConfig(), context=ctx)
    assert ctx.summary[-1]["pairs"] == [["0", "2"], ["2", "5"]]
    with torch.no_grad():
        assert torch.allclose(eq(x), ref(x), rtol=1e-4, atol=1e-5)
    # conv 0's output channel ranges went from a 1000x spread to a much smaller one
    assert range_spread(ref[0]) > 100 and range_spread(eq[0]) < range_spread(ref[0]) / 10


def test_one_step_gives_both_layers_the_geometric_mean_range() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(4, 6), nn.Linear(6, 3)
    r1 = a.weight.detach().abs().amax(1)
    r2 = b.weight.detach().abs().amax(0)
    equalize_pair_(a, b)
    expected = torch.sqrt(r1 * r2)
    assert torch.allclose(a.weight.detach().abs().amax(1), expected, rtol=1e-5)
    assert torch.allclose(b.weight.detach().abs().amax(0), expected, rtol=1e-5)


def test_cle_on_resnet_layout_is_exact_and_pairs_only_inside_blocks() -> None:
    ref = tiny_resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ctx = Context()
    eq = compress_(copy.deepcopy(ref), CrossLayerEqualizationConfig(), context=ctx)
    pairs = ctx.summary[-1]["pairs"]
    # conv2 feeds the residual add, the stem's max-pool output feeds conv1 and the shortcut:
    # only each block's conv1 -> conv2 is a single-path pair.
    assert len(pairs) == 8 and all(a.endswith("conv1") and b.endswith("conv2") for a, b in pairs)
    with torch.no_grad():
        assert _rel_mse(eq(x), ref(x)) < 1e-10


class _Blocked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(self.act(h)) + self.c(torch.relu(h))  # ReLU6 is not homogeneous; h has two users


def test_find_pairs_refuses_non_homogeneous_and_shared_outputs() -> None:
    model = _Blocked()
    assert find_pairs(model, {"a", "b", "c"}) == []
    assert find_pairs(_chain(), {"0", "2"}) == [("0", "2")]  # both layers must be selected


def test_cle_refuses_an_untraceable_model() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(UsageError, match="cle needs a torch.fx-traceable model"):
        compress_(Branchy(), CrossLayerEqualizationConfig())


def test_cle_config_round_trip_and_bad_fields() -> None:
    cfg = CrossLayerEqualizationConfig(iterations=5, tolerance=1e-3, exclude=("fc",))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(UsageError, match="iterations"):
        CrossLayerEqualizationConfig(iterations=0)
    with pytest.raises(UsageError, match="tolerance"):
        CrossLayerEqualizationConfig(tolerance=0.0)
    with pytest.raises(UsageError, match="nope"):
        compress_(_chain(), CrossLayerEqualizationConfig(include=("nope",)))


# ------------------------------------------------------------------ bias correction


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1, stride=2)])
def test_output_shift_is_the_mean_output_change(layer: nn.Module) -> None:
    torch.manual_seed(0)
    shape = (7, 6) if isinstance(layer, nn.Linear) else (7, 3, 9, 9)
    xs = [torch.randn(shape) + 2.0 for _ in range(3)]
    error = torch.randn_like(layer.weight) * 0.01
    acc = mean_input_for(layer)
    for x in xs:
        acc.update(x)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            outs = [F.linear(x, error) for x in xs]
            expected = torch.cat(outs).mean(0)
        else:
            outs = [F.conv2d(x, error, None, layer.stride, layer.padding) for x in xs]
            expected = torch.cat(outs).mean(dim=(0, 2, 3))
    assert torch.allclose(output_shift(layer, error, acc.mean()), expected, atol=1e-6)


def test_bias_correction_removes_the_mean_output_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False)).eval()
    calib = [(torch.randn(32, 64) * 0.1 + 3.0,) for _ in range(4)]  # inputs far from zero mean
    x = torch.cat([b[0] for b in calib])
    mean_err = {}
    for bc in (False, True):
        q = compress_(copy.deepcopy(model), Int8Config(bias_correction=bc), calib=calib)
        with torch.no_grad():
            mean_err[bc] = float((q(x) - model(x)).mean(0).abs().mean())
    assert mean_err[True] < 0.5 * mean_err[False]
    assert isinstance(q[0], QuantLinear) and q[0].bias is not None  # the correction needs a bias


def test_bias_correction_skeleton_rebuild_has_the_added_bias() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False)).eval()
    cfgs = [CrossLayerEqualizationConfig(), Int8Config(bias_correction=True)]
    ctx = Context(calib=random_batches((2, 3, 8, 8)))
    q = compress_(copy.deepcopy(model), cfgs, context=ctx)
    assert ctx.summary[-1]["bias_corrected"] == ["0", "2"]
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False)).eval()
    skeleton = compress_(fresh, cfgs, context=Context(skeleton=True, structure=ctx.structure))
    assert isinstance(skeleton[2], QuantConv2d) and skeleton[2].bias is not None
    skeleton.load_state_dict(q.state_dict(), strict=True)
    x = random_batches((2, 3, 8, 8), 1, seed=5)[0][0]
    with torch.no_grad():
        assert torch.equal(skeleton(x), q(x))


def test_bias_correction_needs_calibration_data() -> None:
    with pytest.raises(UsageError, match="calibration data"):
        compress_(nn.Sequential(nn.Linear(4, 4)).eval(), Int8Config(bias_correction=True))


# ------------------------------------------------------------------ measured on the CNNs


def test_cle_and_bias_correction_no_worse_on_resnet_layout() -> None:
    fp32 = tiny_resnet()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(8, 3, 32, 32, generator=gen),) for _ in range(2)]
    held_out = torch.randn(16, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = fp32(held_out)
        plain = compress_(copy.deepcopy(fp32), Int8Config(), calib=calib)(held_out)
        both = compress_(copy.deepcopy(fp32), [CrossLayerEqualizationConfig(), Int8Config(bias_correction=True)],
                         calib=calib)(held_out)
    assert _rel_mse(both, ref) <= _rel_mse(plain, ref)


def test_cle_and_bias_correction_no_worse_on_digits(digits_fp32: nn.Module, tmp_path) -> None:
    task = DigitsTask()
    recipe = load_recipe("int8-cnn")
    assert [type(c) for c in recipe] == [CrossLayerEqualizationConfig, Int8Config] and recipe[1].bias_correction
    plain = compress_(copy.deepcopy(digits_fp32), Int8Config(), calib=task.calibration())
    ctx = Context(calib=task.calibration())
    both = compress_(copy.deepcopy(digits_fp32), recipe, context=ctx)
    base = task.evaluate(digits_fp32)["accuracy"]
    acc_plain, acc_both = task.evaluate(plain)["accuracy"], task.evaluate(both)["accuracy"]
    assert acc_both >= acc_plain
    assert base - acc_both <= 0.3
    # the artefact replays CLE's folding and the added biases, then loads bit-identically
    save_artefact(both, tmp_path, recipe=recipe, source={"kind": "builtin", "name": "digits"}, structure=ctx.structure)
    loaded = load_artefact(tmp_path)
    x = task.example_inputs(16)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), both(x))
