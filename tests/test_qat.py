"""Quantization-aware training: LSQ math, conversion to the int8 modules, digits recovery, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pared.recipe  # noqa: F401 - registers every technique (artefact replay)
from pared.apply import Context, compress_
from pared.config import config_from_dict, config_to_dict
from pared.errors import InputRefused, UsageError
from pared.quant import QuantConv2d, QuantLinear
from pared.quant.qat import QATConfig, QATLayer, convert_qat, lsq_fake_quantize, prepare_qat, round_ste
from pared.tasks.digits import DigitsTask
from pared.testing.models import random_batches, tiny_cnn, tiny_mlp

CNN_CALIB = random_batches((4, 3, 6, 6))


@pytest.fixture(scope="module")
def digits(digits_fp32: nn.Module) -> tuple[DigitsTask, nn.Module, float]:
    task = DigitsTask()  # the session fixture has trained and cached its CNN
    return task, digits_fp32, task.evaluate(digits_fp32)["accuracy"]


def _qat(task: DigitsTask, fp32: nn.Module, cfg: QATConfig) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 convs: a second thread only adds synchronisation
    try:
        model = compress_(copy.deepcopy(fp32), cfg, context=Context(calib=task.calibration(), task=task))
    finally:
        torch.set_num_threads(before)
    return task.evaluate(model)["accuracy"]


def test_config_round_trips_and_bad_values_are_refused() -> None:
    cfg = QATConfig(weight_bits=4, weight_granularity="per_tensor", steps=10, autocast="bf16")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(UsageError, match="weight_bits"):
        QATConfig(weight_bits=5)
    with pytest.raises(UsageError, match="weight_bits"):
        QATConfig(weight_bits=1)
    with pytest.raises(UsageError, match="steps"):
        QATConfig(steps=-1)
    with pytest.raises(UsageError, match="lr"):
        QATConfig(lr=0.0)
    with pytest.raises(UsageError, match="weight_granularity"):
        config_from_dict({"technique": "qat", "weight_granularity": "per_group"})
    with pytest.raises(UsageError, match="autocast"):
        config_from_dict({"technique": "qat", "autocast": "fp8"})


def test_round_ste_passes_the_gradient_straight_through() -> None:
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-3, 10.0), st.integers(0, 3), st.sampled_from([(-7, 7), (0, 255), (-3, 3)]))
def test_lsq_fake_quantize_lands_on_the_grid_within_half_a_step(step: float, seed: int, bounds: tuple[int, int]) -> None:
    qmin, qmax = bounds
    zp = torch.tensor(float((qmin + qmax + 1) // 2 if qmin == 0 else 0))
    s = torch.tensor(step)
    lo, hi = (qmin - zp) * s, (qmax - zp) * s
    x = torch.rand(64, generator=torch.Generator().manual_seed(seed)) * (hi - lo) + lo
    y = lsq_fake_quantize(x, s, zp, qmin, qmax, 1.0)
    codes = y / s + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert (codes.round() >= qmin).all() and (codes.round() <= qmax).all()
    assert ((y - x).abs() <= s / 2 + 1e-5 * step).all()


def test_step_size_receives_a_gradient() -> None:
    x = torch.linspace(-3, 3, 101)
    step = torch.tensor(0.5, requires_grad=True)
    ((lsq_fake_quantize(x, step, torch.tensor(0.0), -7, 7, 0.1) - x) ** 2).sum().backward()
    assert step.grad is not None and step.grad.abs() > 0


@pytest.mark.parametrize("bits,granularity", [(4, "per_channel"), (3, "per_tensor")])
def test_conversion_matches_the_trained_fake_quant_model(bits: int, granularity: str) -> None:
    cfg = QATConfig(weight_bits=bits, weight_granularity=granularity, steps=0)
    model = tiny_cnn()
    prepare_qat(model, cfg, CNN_CALIB)
    assert sum(isinstance(m, QATLayer) for m in model.modules()) == 2
    x = CNN_CALIB[0][0]
    with torch.no_grad():
        fake = model(x)
    assert convert_qat(model, cfg) == 2
    q = dict(model.named_modules())
    assert isinstance(q["conv"], QuantConv2d) and isinstance(q["fc"], QuantLinear)
    bound = 2 ** (bits - 1) - 1
    for layer in (q["conv"], q["fc"]):
        assert int(layer.weight_q.abs().max()) <= bound
        if granularity == "per_tensor":
            assert torch.all(layer.weight_scale == layer.weight_scale[0])
    with torch.no_grad():
        # Equal up to the int32 bias rounding the deployable module adds.
        assert torch.allclose(model(x), fake, atol=1e-2, rtol=1e-3)


def test_qat_recovers_more_than_half_the_ptq_drop_on_digits(digits) -> None:
    task, fp32, base = digits
    # At 4-bit weights per channel, PTQ costs digits about one test image; 3 bits with one step
    # per layer is the harder setting where there is a drop to recover.
    ptq = _qat(task, fp32, QATConfig(weight_bits=3, weight_granularity="per_tensor", steps=0))
    qat = _qat(task, fp32, QATConfig(weight_bits=3, weight_granularity="per_tensor", steps=40, lr=1e-3))
    assert base - ptq > 0.5, f"no PTQ drop to recover: fp32 {base}, PTQ {ptq}"
    assert qat - ptq >= 0.5 * (base - ptq), f"fp32 {base}, PTQ w3 {ptq}, QAT w3 {qat}"


def test_bf16_autocast_training_step_runs_and_converts(digits) -> None:
    task, fp32, _ = digits
    acc = _qat(task, fp32, QATConfig(weight_bits=4, steps=5, lr=1e-4, autocast="bf16"))
    assert acc > 90.0


def test_artefact_and_onnx_are_the_int8_ones(tmp_path) -> None:
    from pared.artefact import load_artefact, save_artefact
    from pared.onnx_export import export_onnx
    from pared.runtime import OnnxRuntimeRunner

    cfg = QATConfig(weight_bits=4, steps=0)
    q = compress_(tiny_cnn(), cfg, calib=CNN_CALIB)
    save_artefact(q, tmp_path, recipe=[cfg], source=None)
    back = load_artefact(tmp_path, model=tiny_cnn())
    x = CNN_CALIB[1][0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
        path = export_onnx(q, (x,), tmp_path / "q.onnx", input_names=["x"])
        out = torch.as_tensor(OnnxRuntimeRunner(path, threads=1, input_names=["x"])(x))
        assert torch.allclose(out, q(x), atol=1e-4)


def test_bad_input_is_refused() -> None:
    with pytest.raises(UsageError, match="TrainableTask"):
        compress_(tiny_mlp(), QATConfig(steps=5), calib=random_batches((4, 16)))
    with pytest.raises(UsageError, match="calibration"):
        compress_(tiny_mlp(), QATConfig(steps=0))
    with pytest.raises(UsageError, match="matched no eligible layer"):
        compress_(tiny_mlp(), QATConfig(steps=0, include=("nope*",)), calib=random_batches((4, 16)))
    bad = tiny_mlp()
    with torch.no_grad():
        bad[2].weight[0, 0] = float("nan")
    with pytest.raises(InputRefused, match="'2'"):
        compress_(bad, QATConfig(steps=0), calib=random_batches((4, 16)))
