"""Int8 post-training quantization, BatchNorm folding and SmoothQuant on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, compress_
from pared.calib import CalibData
from pared.testing.models import TinyCNN, random_batches, tiny_cnn, tiny_mlp
from pared.errors import InputRefused, UsageError
from pared.quant import Int8Config, QuantConv2d, QuantEmbedding, QuantLinear, SmoothQuantConfig
from pared.quant.batchnorm import fold_batchnorms, fold_conv_bn_
from pared.quant.smoothquant import ChannelScale, SmoothedLinear, smoothing_scales


def _mlp() -> nn.Module:
    return tiny_mlp()


def _cnn() -> TinyCNN:
    return tiny_cnn()


def _calib(shape: tuple[int, ...], n: int = 4, seed: int = 2) -> list[tuple[torch.Tensor]]:
    return random_batches(shape, n, seed=seed)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


# ---------------------------------------------------------------- static int8


def test_static_int8_mlp() -> None:
    ref = _mlp()
    ctx = Context()
    q = compress_(copy.deepcopy(ref), Int8Config(), calib=_calib((8, 16)), context=ctx)
    assert _count(q, QuantLinear) == 2 and _count(q, nn.Linear) == 0
    for m in q.modules():
        if isinstance(m, QuantLinear):
            assert m.weight_q.dtype == torch.int8 and "weight_q" in dict(m.named_buffers())
            assert not any(True for _ in m.parameters())  # nothing float trainable left
            assert int(m.weight_q.abs().max()) == 127  # per-channel symmetric: full range used
            assert float(m.act_scale) > 0
    x = _calib((64, 16), n=1, seed=9)[0][0]
    with torch.no_grad():
        assert _cos(q(x), ref(x)) > 0.99
    assert ctx.summary[-1]["quantized"] == {"Linear": 2}
    assert ctx.summary[-1]["kept_float"] == [] and ctx.summary[-1]["unobserved"] == []


def test_static_int8_cnn_folds_batchnorm() -> None:
    ref = _cnn()
    ctx = Context()
    q = compress_(copy.deepcopy(ref), Int8Config(), calib=_calib((4, 3, 6, 6)), context=ctx)
    assert _count(q, QuantConv2d) == 1 and _count(q, QuantLinear) == 1
    assert _count(q, nn.BatchNorm2d) == 0 and isinstance(q.bn, nn.Identity)
    assert q.conv.weight_q.dtype == torch.int8 and q.conv.weight_q.shape == (8, 3, 3, 3)
    assert q.conv.bias is not None  # the folded BatchNorm supplies the bias
    summary = ctx.summary[-1]
    assert summary["folded_batchnorm"] == ["bn"] and summary["quantized"] == {"Conv2d": 1, "Linear": 1}
    x = _calib((32, 3, 6, 6), n=1, seed=7)[0][0]
    with torch.no_grad():
        assert _cos(q(x), ref(x)) > 0.99


def test_embeddings_are_quantized_per_row() -> None:
    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids))

    torch.manual_seed(3)
    ref = Emb().eval()
    ids = torch.randint(0, 50, (4, 7))
    q = compress_(copy.deepcopy(ref), Int8Config(), calib=[(ids,)])
    assert isinstance(q.emb, QuantEmbedding) and q.emb.weight_q.dtype == torch.int8
    err = (q.emb(ids) - ref.emb(ids)).abs()
    assert bool((err <= q.emb.weight_scale[ids].unsqueeze(-1) / 2 + 1e-7).all())
    q2 = compress_(copy.deepcopy(ref), Int8Config(embeddings=False), calib=[(ids,)])
    assert type(q2.emb) is nn.Embedding


# ---------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fold_conv_bn_is_exact(conv_bias: bool, affine: bool) -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias, groups=1)
    bn = nn.BatchNorm2d(5, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 3)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        expected = bn(conv(x))
        fold_conv_bn_(conv, bn)
        got = conv(x)
    assert conv.bias is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fold_batchnorms_skips_shared_conv_output() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # conv output also used elsewhere: folding would be wrong

    m = Shared().eval()
    assert fold_batchnorms(m) == [] and isinstance(m.bn, nn.BatchNorm2d)
    m2 = _cnn()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = m2(x)
        assert fold_batchnorms(m2) == ["bn"]
        torch.testing.assert_close(m2(x), before, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- dynamic and weight-only


def test_dynamic_mode() -> None:
    ref = _mlp()
    ctx = Context()
    q = compress_(copy.deepcopy(ref), Int8Config(mode="dynamic"), context=ctx)  # no calibration needed
    assert _count(q, QuantLinear) == 2
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert all(m.mode == "dynamic" and not hasattr(m, "act_scale") for m in layers)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _cos(q(x), ref(x)) > 0.99
    # dynamic int8 covers Linear only: a CNN keeps its convolution (and BatchNorm) in float
    cnn = compress_(_cnn(), Int8Config(mode="dynamic"), context=ctx)
    assert type(cnn.conv) is nn.Conv2d and _count(cnn, QuantLinear) == 1
    assert ctx.summary[-1]["kept_float"] == ["conv"]


def test_weight_mode() -> None:
    ref = _mlp()
    q = compress_(copy.deepcopy(ref), Int8Config(mode="weight"))
    assert _count(q, QuantLinear) == 2 and all(
        m.mode == "weight" for m in q.modules() if isinstance(m, QuantLinear)
    )
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _cos(q(x), ref(x)) > 0.999  # only weights are rounded


# ---------------------------------------------------------------- selection rules


def test_include_exclude_and_weight_only_rules() -> None:
    ctx = Context()
    q = compress_(_mlp(), Int8Config(include=("0",)), calib=_calib((8, 16)), context=ctx)
    assert isinstance(q[0], QuantLinear) and type(q[2]) is nn.Linear
    assert ctx.summary[-1]["kept_float"] == ["2"]

    q = compress_(_mlp(), Int8Config(include=("type:Linear",), exclude=("re:[2-9]",)), calib=_calib((8, 16)))
    assert isinstance(q[0], QuantLinear) and type(q[2]) is nn.Linear  # exclude wins

    q = compress_(_cnn(), Int8Config(exclude=("type:Conv2d",)), calib=_calib((4, 3, 6, 6)))
    assert type(q.conv) is nn.Conv2d and isinstance(q.fc, QuantLinear)

    q = compress_(_mlp(), Int8Config(weight_only=("2",)), calib=_calib((8, 16)))
    assert q[0].mode == "static" and q[2].mode == "weight"
    assert "act_scale" not in dict(q[2].named_buffers()) and "act_scale" in dict(q[0].named_buffers())

    with pytest.raises(UsageError, match="fc9"):
        compress_(_mlp(), Int8Config(include=("fc9",)), calib=_calib((8, 16)))


def test_exclude_everything_is_nothing_to_quantize() -> None:
    with pytest.raises(UsageError, match="nothing to quantize"):
        compress_(_mlp(), Int8Config(exclude=("*",)), calib=_calib((8, 16)))


# ---------------------------------------------------------------- refusals


def test_empty_calibration_refused() -> None:
    with pytest.raises(UsageError, match="must not be empty") as info:
        compress_(_mlp(), Int8Config(), calib=[])
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="must not be empty"):
        compress_(_mlp(), Int8Config(), calib=CalibData(iter(())))


def test_nan_calibration_refused_naming_the_batch() -> None:
    batches = _calib((8, 16), n=3)
    batches[1][0][3, 5] = float("nan")
    model = _mlp()
    with pytest.raises(InputRefused, match="calibration batch 1 ") as info:
        compress_(model, Int8Config(), calib=batches)
    assert info.value.exit_code == 3
    batches[1][0][3, 5] = float("inf")
    with pytest.raises(InputRefused, match="batch 1"):
        compress_(_mlp(), Int8Config(), calib=batches)


def test_non_finite_activation_refused_naming_the_layer() -> None:
    model = _mlp()
    with torch.no_grad():
        model[0].bias[0] = 3e38  # finite weights, but the hidden activation overflows
        model[0].weight[0] = 1e38
    with pytest.raises(InputRefused, match="'2'"):
        compress_(model, Int8Config(), calib=[(torch.ones(2, 16),)])


def test_static_without_calibration_refused() -> None:
    with pytest.raises(UsageError, match="calibration data"):
        compress_(_mlp(), Int8Config())


def test_nothing_to_quantize() -> None:
    with pytest.raises(UsageError, match="nothing to quantize"):
        compress_(nn.Sequential(nn.ReLU()), Int8Config(), calib=_calib((2, 4)))
    with pytest.raises(UsageError, match="nothing to quantize"):
        compress_(nn.Sequential(nn.Embedding(4, 4)), Int8Config(mode="dynamic"))


def test_nan_weight_refused_naming_the_layer() -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    with pytest.raises(InputRefused, match="'2'") as info:
        compress_(model, Int8Config(), calib=_calib((8, 16)))
    assert info.value.exit_code == 3
    with pytest.raises(InputRefused, match="'2'"):
        compress_(model, Int8Config(mode="dynamic"))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)  # only reached for negative-sum inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if bool(x.sum() < -1e6):
            y = self.b(y)
        return y


def test_unobserved_layer_is_an_error() -> None:
    with pytest.raises(UsageError, match=r"never reached by calibration data: \['b'\]"):
        compress_(Branchy().eval(), Int8Config(), calib=_calib((2, 4)))


def test_unobserved_layer_kept_float_when_allowed() -> None:
    ctx = Context()
    q = compress_(Branchy().eval(), Int8Config(allow_unobserved=True), calib=_calib((2, 4)), context=ctx)
    assert isinstance(q.a, QuantLinear) and type(q.b) is nn.Linear
    assert ctx.summary[-1]["unobserved"] == ["b"]
    assert ctx.summary[-1]["kept_float"] == ["b"]
    assert ctx.summary[-1]["quantized"] == {"Linear": 1}


def test_calibration_batches_limit_is_honoured() -> None:
    seen = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return self.fc(x)

    compress_(Counting().eval(), Int8Config(calibration_batches=3), calib=_calib((2, 4), n=10))
    assert len(seen) == 3


# ---------------------------------------------------------------- SmoothQuant


def _outlier_mlp() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    model = _mlp()
    gen = torch.Generator().manual_seed(10)
    batches = []
    for _ in range(4):
        x = torch.randn(8, 16, generator=gen)
        x[:, 3] *= 50.0  # an outlier channel, as in transformer activations
        batches.append((x,))
    return model, batches


def test_smoothquant_float_transform_is_exact() -> None:
    ref, batches = _outlier_mlp()
    ctx = Context()
    smoothed = compress_(copy.deepcopy(ref), SmoothQuantConfig(alpha=0.5), calib=batches, context=ctx)
    assert isinstance(smoothed[0], SmoothedLinear) and isinstance(smoothed[0][0], ChannelScale)
    assert ctx.summary[-1]["smoothed"] == ["0", "2"]
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        torch.testing.assert_close(smoothed(x), ref(x), atol=1e-4, rtol=1e-4)
    s = 1.0 / smoothed[0][0].scale
    assert float(s[3]) > 2 * float(s.median())  # the outlier channel got the largest migration


def test_smoothquant_then_int8() -> None:
    ref, batches = _outlier_mlp()
    q = compress_(copy.deepcopy(ref), [SmoothQuantConfig(alpha=0.5), Int8Config()], calib=batches)
    assert _count(q, QuantLinear) == 2 and _count(q, ChannelScale) == 2
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        assert _cos(q(x), ref(x)) > 0.99


@pytest.mark.parametrize("alpha", [-0.1, 1.01, 2.0])
def test_smoothquant_alpha_out_of_range(alpha: float) -> None:
    with pytest.raises(UsageError, match="alpha"):
        SmoothQuantConfig(alpha=alpha)


def test_smoothquant_refusals() -> None:
    ctx = Context()
    untouched = compress_(nn.Sequential(nn.ReLU()), SmoothQuantConfig(), calib=_calib((2, 4)), context=ctx)
    assert isinstance(untouched[0], nn.ReLU) and ctx.summary[-1]["smoothed"] == []
    with pytest.raises(UsageError, match="calibration data"):
        compress_(_mlp(), SmoothQuantConfig())
    with pytest.raises(UsageError, match="must not be empty"):
        compress_(_mlp(), SmoothQuantConfig(), calib=[])
    with pytest.raises(UsageError, match=r"'b' never reached"):
        compress_(Branchy().eval(), SmoothQuantConfig(), calib=_calib((2, 4)))


def test_smoothing_scales_pure_function() -> None:
    act = torch.tensor([4.0, 0.0, 1.0, 9.0])
    w = torch.tensor([[1.0, 2.0, 0.0, -4.0], [-0.5, 1.0, 0.0, 1.0]])  # column 2 all zero
    before = w.clone()
    s = smoothing_scales(act, w, 0.5)
    assert torch.equal(w, before)  # no side effects
    assert s.tolist()[1] == 1.0 and s.tolist()[2] == 1.0  # dead activation / dead weight column
    torch.testing.assert_close(s[0], torch.tensor(4.0**0.5 / 1.0**0.5))
    torch.testing.assert_close(s[3], torch.tensor(9.0**0.5 / 4.0**0.5))
    torch.testing.assert_close(smoothing_scales(act, w, 0.0)[[0, 3]], torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(smoothing_scales(act, w, 1.0)[[0, 3]], torch.tensor([4.0, 9.0]))
    huge = smoothing_scales(torch.tensor([1e30]), torch.tensor([[1e-30]]), 1.0)
    assert float(huge) == pytest.approx(1e5)  # clamped to a finite range


def test_default_recipe_accepts_a_conv_only_model() -> None:
    from pared.recipe import load_recipe

    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    q = compress_(model, load_recipe("int8"), calib=_calib((2, 3, 8, 8)))
    assert isinstance(q[0], QuantConv2d)
