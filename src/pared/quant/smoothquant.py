"""SmoothQuant: move activation outliers into the weights before int8 quantization.

For a Linear ``y = x W^T``, per input channel ``j``: ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)``
and ``y = (x / s) (W * s)^T`` exactly. The scaled activation has a flatter range, so a per-tensor
int8 grid loses less (Xiao et al., "SmoothQuant", ICML 2023).

Where the producer of ``x`` can absorb ``1/s`` (a LayerNorm feeding only this Linear) the paper
folds it; in post-LN transformers such as BERT the LayerNorm also feeds the residual, so pared
keeps ``1/s`` as an explicit per-channel multiply (``ChannelScale``) in front of the Linear, a
cheap elementwise op that runtimes fuse into the activation quantizer.

Linears that read the same tensor (an attention block's query, key and value projections) share
one ``s``, computed from the largest weight column over the group as the paper does for QKV: their
smoothed inputs are then one tensor, so after int8 quantization the exported graph multiplies
and quantizes that input once instead of once per projection (ONNX export merges the copies).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pared.apply import Context, register
from pared.calib import checked_batches, observe_layer_inputs
from pared.config import BaseConfig, register_config
from pared.errors import UsageError
from pared.select import select_modules


@register_config("smoothquant")
@dataclasses.dataclass
class SmoothQuantConfig(BaseConfig):
    """Smooth activation outliers of Linear inputs (apply before ``Int8Config``).

    Attributes:
        alpha: migration strength in [0, 1]; 0 leaves activations alone, 1 moves all range into weights.
        calibration_batches: at most this many calibration batches measure channel ranges.
        include: layer-selection rules (``pared.select``); empty means every Linear.
        exclude: rules for Linears left as they are.
    """

    alpha: float = 0.5
    calibration_batches: int = 16
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"smoothquant.alpha must be in [0, 1], got {self.alpha}")
        if self.calibration_batches < 1:
            raise UsageError(f"smoothquant.calibration_batches must be >= 1, got {self.calibration_batches}")


class ChannelScale(nn.Module):
    """Multiplies the last dimension by a fixed per-channel vector."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class SmoothedLinear(nn.Sequential):
    """``ChannelScale(1/s)`` followed by the Linear whose weight absorbed ``s``."""

    def __init__(self, linear: nn.Module, channels: int) -> None:
        super().__init__(ChannelScale(channels), linear)


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel ``s`` from activation and weight ranges (pure function)."""
    w_absmax = weight.detach().abs().amax(dim=0).float()
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    # Dead channels (never active, or all-zero weights) keep s=1: nothing to migrate.
    s = torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5, max=1e5)


@register(SmoothQuantConfig)
def _apply_smoothquant(model: nn.Module, cfg: SmoothQuantConfig, ctx: Context) -> nn.Module:
    model.eval()
    chosen = select_modules(
        model, candidate=lambda n, m: type(m) is nn.Linear, include=cfg.include, exclude=cfg.exclude
    )
    if not chosen:
        # A conv-only model has nothing to smooth; the recipe's next steps still apply.
        ctx.summary.append({"technique": "smoothquant", "alpha": cfg.alpha, "smoothed": []})
        return model
    absmax, groups = ({}, []) if ctx.skeleton else _channel_absmax(model, chosen, cfg, ctx)
    scales = {} if ctx.skeleton else _group_scales(chosen, absmax, groups, cfg.alpha)
    for name, linear in chosen:
        wrapped = SmoothedLinear(linear, linear.in_features)
        if not ctx.skeleton:
            s = scales[name]
            with torch.no_grad():
                linear.weight.mul_(s)
            wrapped[0].scale.copy_(1.0 / s)
        model.set_submodule(name, wrapped)
    ctx.summary.append({"technique": "smoothquant", "alpha": cfg.alpha, "smoothed": [n for n, _ in chosen],
                        "shared_input_groups": groups})
    return model


def _group_scales(chosen, absmax: dict[str, torch.Tensor], groups: list[list[str]], alpha: float) -> dict[str, torch.Tensor]:
    """``s`` per layer, one shared ``s`` per group of layers that read the same tensor (computed
    before any weight absorbs it)."""
    group_of = {name: group for group in groups for name in group}
    layers = dict(chosen)
    scales: dict[str, torch.Tensor] = {}
    for name, _ in chosen:
        if name not in absmax:
            raise UsageError(f"smoothquant: layer {name!r} never reached by calibration data")
        if name not in scales:
            group = group_of.get(name, [name])
            weights = torch.cat([layers[n].weight.detach() for n in group])
            s = smoothing_scales(absmax[name], weights, alpha)
            scales.update({n: s for n in group})
    return scales


def _channel_absmax(
    model: nn.Module, layers, cfg: SmoothQuantConfig, ctx: Context
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Per-input-channel ``max|x|`` of each layer over the calibration batches, and the groups
    (two or more layers) whose input is the very same tensor in the first batch."""
    if ctx.calib is None:
        raise UsageError("smoothquant needs calibration data")
    batches = checked_batches(ctx.calib, limit=cfg.calibration_batches)
    absmax: dict[str, torch.Tensor] = {}
    first_inputs: dict[str, torch.Tensor] = {}  # held, so no later tensor can reuse an id

    def observe(name: str, x: torch.Tensor) -> None:
        first_inputs.setdefault(name, x)
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

    observe_layer_inputs(model, layers, batches, observe)
    by_tensor: dict[int, list[str]] = {}
    for name, x in first_inputs.items():
        by_tensor.setdefault(id(x), []).append(name)
    groups = [names for names in by_tensor.values() if len(names) > 1]
    for group in groups:
        shared = torch.stack([absmax[n] for n in group]).amax(dim=0)
        for n in group:
            absmax[n] = shared
    return absmax, groups
