"""Quantization-aware training with learned step sizes (LSQ), converted to pared's int8 modules.

``QATConfig`` folds BatchNorm, replaces each selected Linear / Conv2d by a training-time module
that fake-quantizes its weight (per output channel or per tensor, ``weight_bits`` of 4 or 8) and
its input (8-bit per tensor, as static int8 does), fine-tunes the model with the shared training
loop (``pared.train.train``) on the task's data, and converts the result to the very
``QuantLinear`` / ``QuantConv2d`` modules ``Int8Config(mode="static")`` produces. The exported
artefact is therefore the same QDQ ONNX as post-training int8; 4-bit weights are int8 codes in
[-7, 7].

Fake quantization rounds with the straight-through estimator, and every step size is a trained
parameter with LSQ's gradient scaling: Esser et al., "Learned Step Size Quantization", ICLR 2020.
Step sizes start from the post-training (absmax / calibration min-max) values, so ``steps=0``
gives exactly the post-training result at the same bit width: the baseline QAT is measured against.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, register
from pared.calib import checked_batches, observe_layer_inputs
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.quant.batchnorm import fold_batchnorms
from pared.quant.int8 import QuantConv2d, QuantLinear
from pared.quant.primitives import choose_qparams, qrange
from pared.select import select_modules
from pared.train import FinetuneConfig, TrainableTask, train

TECHNIQUE = "qat"


@register_config(TECHNIQUE)
@dataclasses.dataclass
class QATConfig(BaseConfig):
    """Quantization-aware training, deployed as static int8 (``QuantLinear`` / ``QuantConv2d``).

    Attributes:
        weight_bits: 8, or 4, 3, 2 (int8 codes restricted to [-7, 7], [-3, 3], [-1, 1]).
        weight_granularity: one weight step per output channel, or one per layer.
        activation_symmetric: int8 symmetric activations instead of uint8 asymmetric.
        include: layer-selection rules; empty means every Linear and Conv2d.
        exclude: rules for layers kept in float.
        steps: optimizer steps of fine-tuning; 0 converts at once (post-training quantization
            with the same quantizer, the baseline).
        lr: Adam learning rate for weights and step sizes.
        batch_size: training batch size.
        autocast: ``bf16`` runs forward/backward under bfloat16 autocast, or None.
        distill: weight of logit distillation from the fp32 model (see ``FinetuneConfig``).
        seed: shuffling seed.
        calibration_batches: batches used to initialise activation ranges.
    """

    weight_bits: int = 8
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    activation_symmetric: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 64
    autocast: Literal["bf16"] | None = None
    distill: float = 0.0
    seed: int = 0
    calibration_batches: int = 32

    def validate(self) -> None:
        if self.weight_bits not in (2, 3, 4, 8):
            raise UsageError(f"qat.weight_bits must be 2, 3, 4 or 8, got {self.weight_bits}")
        if self.steps < 0:
            raise UsageError(f"qat.steps must be >= 0, got {self.steps}")
        if self.calibration_batches < 1:
            raise UsageError(f"qat.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.steps:
            self.finetune_config()  # validates lr, batch_size, distill

    def finetune_config(self) -> FinetuneConfig:
        """The settings of the shared training loop for this QAT run."""
        return FinetuneConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, autocast=self.autocast,
                              distill=self.distill, seed=self.seed, schedule="cosine", optimizer="adam")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward (LSQ's step-size gradient scale)."""
    scaled = x * factor
    return scaled + (x - scaled).detach()


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, grad_factor: float) -> torch.Tensor:
    """LSQ fake quantization: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``, trainable in ``s``.

    ``step`` and ``zero_point`` broadcast against ``x`` (per tensor or per channel); ``grad_factor``
    is LSQ's ``1 / sqrt(elements per step * qmax)``, which keeps step updates in proportion to
    weight updates.
    """
    s = scale_grad(step, grad_factor)
    q = torch.clamp(round_ste(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


class LsqQuantizer(nn.Module):
    """A learned step size (per tensor or per channel along dim 0) with a fixed integer zero point.

    Args:
        step: initial step size(s), broadcastable against the quantized tensor.
        zero_point: integer zero point(s), same shape as ``step``.
        qmin, qmax: the integer range.
        elements_per_step: values that share one step (for the gradient scale).
    """

    def __init__(self, step: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, elements_per_step: int) -> None:
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.step = nn.Parameter(step.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().float().clone())
        self.grad_factor = 1.0 / math.sqrt(max(elements_per_step, 1) * qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A step pushed to or below zero by an update would divide by zero: keep it positive.
        step = self.step.abs().clamp(min=1e-8)
        return lsq_fake_quantize(x, step, self.zero_point, self.qmin, self.qmax, self.grad_factor)


class QATLayer(nn.Module):
    """A Linear or Conv2d whose input and weight are fake-quantized during training."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, weight_quant: LsqQuantizer, act_quant: LsqQuantizer) -> None:
        super().__init__()
        self.layer, self.weight_quant, self.act_quant = layer, weight_quant, act_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quant(self.layer.weight)
        x = self.act_quant(x)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def _weight_quantizer(w: torch.Tensor, cfg: QATConfig) -> LsqQuantizer:
    qmin, qmax = qrange(cfg.weight_bits, signed=True)
    dims = tuple(range(1, w.dim()))
    per_channel = cfg.weight_granularity == "per_channel"
    bound = w.detach().abs().amax(dim=dims, keepdim=True) if per_channel else w.detach().abs().amax().reshape([1] * w.dim())
    step, _ = choose_qparams(-bound, bound, bits=cfg.weight_bits, symmetric=True, signed=True)
    per_step = w[0].numel() if per_channel else w.numel()
    # Symmetric range ±(2^(b-1) - 1), as choose_qparams and the int8 modules use.
    return LsqQuantizer(step, torch.zeros_like(step), qmin + 1, qmax, per_step)


def _act_quantizer(lo: torch.Tensor, hi: torch.Tensor, features: int, cfg: QATConfig) -> LsqQuantizer:
    signed = cfg.activation_symmetric
    qmin, qmax = qrange(8, signed=signed)
    step, zp = choose_qparams(lo, hi, symmetric=signed, signed=signed)
    return LsqQuantizer(step, zp.float(), qmin, qmax, features)


def prepare_qat(model: nn.Module, cfg: QATConfig, calib) -> list[str]:  # type: ignore[no-untyped-def]
    """Fold BatchNorms and wrap the selected layers in ``QATLayer`` (step sizes at their PTQ values).

    Returns:
        The names of the wrapped layers.
    """
    fold_batchnorms(model)
    chosen = select_modules(model, candidate=lambda n, m: type(m) in (nn.Linear, nn.Conv2d), include=cfg.include, exclude=cfg.exclude)
    if not chosen:
        raise UsageError("nothing to quantize: no Linear or Conv2d layer is selected in this model")
    for name, m in chosen:
        if not torch.isfinite(m.weight).all():
            raise InputRefused(f"weight of layer {name!r} contains NaN or inf")
    if calib is None:
        raise UsageError("qat needs calibration data to initialise activation ranges")
    ranges: dict[str, list[torch.Tensor]] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise InputRefused(f"non-finite activation at the input of layer {name!r} during calibration")
        old = ranges.get(name)
        ranges[name] = [torch.minimum(old[0], lo), torch.maximum(old[1], hi)] if old else [lo, hi]

    observe_layer_inputs(model, chosen, checked_batches(calib, limit=cfg.calibration_batches), observe)
    unobserved = [n for n, _ in chosen if n not in ranges]
    if unobserved:
        raise UsageError(f"qat: layers never reached by calibration data: {unobserved}")
    for name, m in chosen:
        features = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        wrapped = QATLayer(m, _weight_quantizer(m.weight, cfg), _act_quantizer(*ranges[name], features, cfg))
        model.set_submodule(name, wrapped)
    return [n for n, _ in chosen]


def convert_qat(model: nn.Module, cfg: QATConfig) -> int:
    """Replace every ``QATLayer`` by the int8 module holding its learned codes and steps.

    Returns:
        How many layers were converted.
    """
    converted = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLayer):
            model.set_submodule(name, _deployable(m, cfg))
            converted += 1
    return converted


@torch.no_grad()
def _deployable(m: QATLayer, cfg: QATConfig) -> nn.Module:
    layer = m.layer
    q = _empty_int8(layer, cfg)
    wq = m.weight_quant
    step = wq.step.abs().clamp(min=1e-8)
    codes = torch.clamp(torch.round(layer.weight / step), wq.qmin, wq.qmax)
    q.weight_q.copy_(codes.to(torch.int8))
    q.weight_scale.copy_(step.reshape(-1).expand(layer.weight.shape[0]))
    aq = m.act_quant
    q.act_scale.copy_(aq.step.abs().clamp(min=1e-8).reshape(()))
    q.act_zero_point.copy_(aq.zero_point.round().to(torch.int32).reshape(()))
    if layer.bias is not None:
        # Integer kernels add the bias as int32 at scale act_scale * weight_scale (as in int8.py).
        bias_scale = q.act_scale * q.weight_scale
        q.bias.copy_(torch.round(layer.bias / bias_scale) * bias_scale)
    return q


def _empty_int8(layer: nn.Module, cfg: QATConfig) -> nn.Module:
    signed = cfg.activation_symmetric
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d(layer, act_signed=signed)
    return QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, mode="static", act_signed=signed)


@register(QATConfig)
def _apply_qat(model: nn.Module, cfg: QATConfig, ctx: Context) -> nn.Module:
    model.eval()
    if ctx.skeleton:
        fold_batchnorms(model)
        chosen = select_modules(model, candidate=lambda n, m: type(m) in (nn.Linear, nn.Conv2d), include=cfg.include, exclude=cfg.exclude)
        for name, m in chosen:
            model.set_submodule(name, _empty_int8(m, cfg))
        return model
    if cfg.steps and not isinstance(ctx.task, TrainableTask):
        name = getattr(ctx.task, "name", "this task")
        raise UsageError(f"qat: {name} provides no training data (a TrainableTask is needed; steps: 0 quantizes without training)")
    layers = prepare_qat(model, cfg, ctx.calib)
    result = train(model, ctx.task, cfg.finetune_config(), progress=False) if cfg.steps else None
    convert_qat(model, cfg)
    ctx.summary.append({
        "technique": TECHNIQUE, "weight_bits": cfg.weight_bits, "weight_granularity": cfg.weight_granularity,
        "quantized": len(layers), "steps": result.steps if result else 0,
        "final_loss": result.final_loss if result else None, "autocast": cfg.autocast,
    })
    return model
