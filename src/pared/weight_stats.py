"""Per-layer weight statistics of a compression: histograms before/after and the weight error.

The "after" weight is the float weight the compressed layer computes with, expressed in the
fp32 layer's coordinates: int8 codes times their scales, int4 groups dequantized, shared
k-means values looked up, and a SmoothQuant ``ChannelScale`` multiplied back in (the layer
computes ``(x / s) (W s)^T``, so ``W s`` alone would look like an error that is not there).
Where the recipe folded BatchNorm into a convolution, the "before" weight is the fp32 weight
folded the same way, so both histograms describe the same function.

These figures go into ``report.json`` (key ``weights``) and the HTML report plots them.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from pared.quant.batchnorm import fold_batchnorms
from pared.quant.gptq import dequantize_groups
from pared.quant.smoothquant import SmoothedLinear

HISTOGRAM_BINS = 48
MAX_LAYERS = 96  # report.json stays small for wide models; the rest are counted, not binned
METHOD = (
    "per layer, histograms of the fp32 weight and of the float weight the compressed layer computes "
    "with (dequantized codes, shared values, SmoothQuant scale folded back), on shared bin edges; "
    "SQNR = 10 log10(sum w^2 / sum (w - w')^2) in dB"
)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@torch.no_grad()
def layer_weight_stats(fp32: nn.Module, compressed: nn.Module, *, bins: int = HISTOGRAM_BINS,
                       max_layers: int = MAX_LAYERS) -> dict[str, Any]:
    """Histograms, zero fractions and SQNR of every weighted fp32 layer against its compressed twin.

    Layers are matched by module name. A layer the recipe removed or renamed is skipped; a layer
    whose shape changed (structured pruning) gets histograms but ``sqnr_db`` None.

    Returns:
        ``{"method", "bins", "reference", "layers": {name: {"type", "numel_before", "numel_after",
        "edges", "before", "after", "zeros_before", "zeros_after", "sqnr_db", "identical"}}, "omitted": n}``,
        layers in model order; JSON-friendly.
    """
    reference, folded = _reference(fp32, compressed)
    after_modules = dict(compressed.named_modules())
    layers: dict[str, Any] = {}
    omitted = 0
    for name, module in reference.named_modules():
        if not isinstance(module, _WEIGHTED) or name not in after_modules:
            continue
        after = effective_weight(after_modules[name])
        if after is None:
            continue
        if len(layers) >= max_layers:
            omitted += 1
            continue
        layers[name] = _layer_entry(module.weight.detach().float(), after, type(module).__name__, bins)
    return {
        "method": METHOD,
        "bins": bins,
        "reference": "fp32 with BatchNorm folded into the preceding conv" if folded else "fp32",
        "layers": layers,
        "omitted": omitted,
    }


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """The float weight ``module`` computes with, or None if it is not a weighted layer pared knows."""
    if isinstance(module, SmoothedLinear):
        inner = effective_weight(module[1])
        return None if inner is None else inner * module[0].scale.float()
    if hasattr(module, "weight_q") and hasattr(module, "weight_scale"):
        q = module.weight_q.float()
        return q * module.weight_scale.float().reshape([-1] + [1] * (q.dim() - 1))
    if hasattr(module, "codes") and hasattr(module, "scales"):
        return dequantize_groups(module.codes(), module.scales.float(), module.zeros())
    if hasattr(module, "weight_packed") and hasattr(module, "scales"):
        # An n-bit embedding has no unpacking method of its own: looking up every row dequantizes it.
        return module(torch.arange(module.weight_packed.shape[0])).float()
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return weight.detach().float()
    return None


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB.

    None when it is undefined: shapes differ (structured pruning), the weights are identical
    (no noise), or the reference is all zeros. report.json stays strict JSON (no inf).
    """
    if reference.shape != approx.shape:
        return None
    signal = float(reference.double().pow(2).sum())
    noise = float((reference.double() - approx.double()).pow(2).sum())
    if noise == 0.0 or signal == 0.0:
        return None
    return 10.0 * math.log10(signal / noise)


def _reference(fp32: nn.Module, compressed: nn.Module) -> tuple[nn.Module, bool]:
    """fp32, with BatchNorms folded where the compressed model no longer has them."""
    after = dict(compressed.named_modules())
    gone = [n for n, m in fp32.named_modules() if isinstance(m, nn.BatchNorm2d) and isinstance(after.get(n), nn.Identity)]
    if not gone:
        return fp32, False
    reference = copy.deepcopy(fp32)
    return reference, bool(fold_batchnorms(reference))


def _layer_entry(before: torch.Tensor, after: torch.Tensor, kind: str, bins: int) -> dict[str, Any]:
    lo = min(float(before.min()), float(after.min()))
    hi = max(float(before.max()), float(after.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"non-finite weight in a {kind} layer")  # pared refuses NaN weights before this
    if hi <= lo:  # a constant layer: one bin around its value
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {
        "type": kind,
        "numel_before": before.numel(),
        "numel_after": after.numel(),
        "edges": [round(float(e), 8) for e in edges],
        "before": _counts(before, lo, hi, bins),
        "after": _counts(after, lo, hi, bins),
        "zeros_before": float((before == 0).sum()) / max(before.numel(), 1),
        "zeros_after": float((after == 0).sum()) / max(after.numel(), 1),
        "sqnr_db": sqnr_db(before, after),
        "identical": before.shape == after.shape and bool(torch.equal(before, after)),
    }


def _counts(values: torch.Tensor, lo: float, hi: float, bins: int) -> list[int]:
    return [int(c) for c in torch.histc(values.flatten(), bins=bins, min=lo, max=hi)]
