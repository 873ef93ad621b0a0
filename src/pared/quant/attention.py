"""Static int8 for the two matmuls inside attention: scores ``Q K^T`` and context ``P V``.

The Linear layers around attention are quantized by ``Int8Config``; the attention matmuls
themselves multiply two activations, so they have no module a forward hook can wrap. For Hugging
Face models pared registers its own attention function with transformers' ``AttentionInterface``
(name ``pared_int8``): the same math as transformers' eager attention, with query, key and value
fake-quantized to symmetric int8 and the softmax probabilities to uint8 (zero point 0), each with
one scale measured on the calibration data. Exported to ONNX this puts QuantizeLinear /
DequantizeLinear on all four matmul inputs, which OpenVINO runs as one int8 attention kernel
instead of an fp32 one (MiniLM batch 8 x 128: docs/quantization.md).

The probabilities lose most: an attention row over 128 keys spends much of its mass on values a
few uint8 steps above zero. That is why ``Int8Config.attention`` is off by default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pared.errors import UsageError
from pared.quant.observers import RangeRecord, record_range
from pared.quant.primitives import choose_qparams

ATTENTION_IMPL = "pared_int8"
INPUTS = ("query", "key", "value", "probs")


class AttentionQuant(nn.Module):
    """The four activation quantizers of one attention block (a child of the attention module).

    While ``records`` is set (calibration) it records ranges and passes tensors through unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in INPUTS:
            self.register_buffer(f"{name}_scale", torch.ones(()))
        self.records: dict[str, RangeRecord] | None = None
        self.enabled = True  # off while the sensitivity of other blocks is measured

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.records is not None:
            self.records[name].update(x)
            return x
        if not self.enabled:
            return x
        scale = float(getattr(self, f"{name}_scale"))
        qmin, qmax = (0, 255) if name == "probs" else (-128, 127)
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)

    def set_ranges(self, method: str) -> None:
        """Scales from the recorded ranges (``method`` as in ``pared.quant.observers``)."""
        assert self.records is not None
        for name in INPUTS:
            rec = self.records[name]
            if not rec.batches:
                raise UsageError(f"int8.attention: no calibration data reached the {name} input")
            if name == "probs":
                hi = record_range(rec, method, symmetric=False, signed=False)[1]
                scale, _ = choose_qparams(torch.zeros(()), hi, symmetric=False, signed=False)
            else:
                lo, hi = record_range(rec, method, symmetric=True, signed=True)
                scale, _ = choose_qparams(lo, hi, symmetric=True, signed=True)
            getattr(self, f"{name}_scale").copy_(scale)
        self.records = None


def int8_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with int8 matmul inputs (the ``pared_int8`` implementation).

    ``query``/``key``/``value`` are (batch, heads, sequence, head_dim); grouped key/value heads
    are repeated to the query's head count. An attention module without an ``AttentionQuant``
    child runs in plain float (calibration discovers the modules through this path).
    """
    quant = getattr(module, "int8_attention", None)
    if _discovered is not None:
        _discovered.append(module)
    if key.shape[1] != query.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if quant is not None:
        query, key, value = quant("query", query), quant("key", key), quant("value", value)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    used = quant("probs", probs) if quant is not None else probs
    out = torch.matmul(used, value).transpose(1, 2).contiguous()
    return out, probs


# While ``discover_attention`` runs: the modules that called ``int8_attention``.
_discovered: list[nn.Module] | None = None


def register_attention() -> None:
    """Register ``pared_int8`` (and the eager additive mask for it) with transformers."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        raise UsageError("int8.attention needs transformers >= 4.48 (its AttentionInterface)") from None
    AttentionInterface.register(ATTENTION_IMPL, int8_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return  # older transformers build the additive mask inside the model
    AttentionMaskInterface.register(ATTENTION_IMPL, eager_mask)


def use_int8_attention(model: nn.Module) -> list[object]:
    """Point every Hugging Face config in ``model`` at ``pared_int8``; returns the configs."""
    register_attention()
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    for c in configs.values():
        c._attn_implementation = ATTENTION_IMPL
    return list(configs.values())


def discover_attention(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of the modules whose attention runs through ``pared_int8`` on ``inputs``."""
    if not use_int8_attention(model):
        raise UsageError("int8.attention: the model has no Hugging Face attention (no config with an attention implementation)")
    global _discovered
    _discovered = []
    try:
        with torch.inference_mode():
            model(*inputs)
        seen = {id(m) for m in _discovered}
    finally:
        _discovered = None
    names = [n for n, m in model.named_modules() if id(m) in seen]
    if not names:
        raise UsageError("int8.attention: no attention layer calls transformers' attention interface "
                         "(this model or transformers version computes attention inside the layer)")
    return names


def block_errors(model: nn.Module, quants: dict[str, AttentionQuant], batches: list[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """``{attention module: relative output MSE}`` with only that block's attention quantized
    (everything else as it is now), on ``batches``."""
    def output(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = model(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
        return out.float()

    for quant in quants.values():
        quant.enabled = False
    try:
        with torch.inference_mode():
            refs = [output(b) for b in batches]
            errors = {}
            for name, quant in quants.items():
                quant.enabled = True
                num = sum(float(((output(b) - r) ** 2).sum()) for b, r in zip(batches, refs))
                errors[name] = num / max(sum(float((r**2).sum()) for r in refs), 1e-30)
                quant.enabled = False
    finally:
        for quant in quants.values():
            quant.enabled = True
    return errors


def attach_quantizers(model: nn.Module, names: list[str]) -> list[AttentionQuant]:
    """Give each named attention module an ``AttentionQuant`` child (``int8_attention``)."""
    quants = []
    for name in names:
        quant = AttentionQuant()
        model.get_submodule(name).add_module("int8_attention", quant)
        quants.append(quant)
    return quants
