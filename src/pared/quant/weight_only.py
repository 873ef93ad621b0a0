"""Weight-only quantization with groups: int4 (two codes per byte) or int8, RTN or GPTQ.

Linear weights are split into groups of ``group_size`` input columns, each with its own scale
and zero point, and stored packed in the artefact (really ~8x smaller than fp32 at 4 bits).
Exported to ONNX as ONNX Runtime's ``MatMulNBits`` (Linear) and ``GatherBlockQuantized``
(Embedding) contrib ops, which run on ONNX Runtime's low-bit CPU kernels; OpenVINO does not
implement these ops, so such models run on ONNX Runtime (``runtime="auto"`` picks it).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, register
from pared.calib import checked_batches, observe_layer_inputs
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.quant.gptq import dequantize_groups, gptq_quantize, pack_nibbles, rtn_quantize, unpack_nibbles
from pared.select import select_modules


@register_config("weight_only")
@dataclasses.dataclass
class WeightOnlyConfig(BaseConfig):
    """Group-wise weight-only quantization of Linear (and Embedding) layers.

    Attributes:
        bits: 4 (packed two per byte) or 8.
        group_size: input columns per scale; 32, 64 or 128, and must divide every selected
            layer's input width.
        method: ``gptq`` (Hessian-aware rounding from calibration data) or ``rtn``.
        embeddings: also quantize Embedding tables (per row, symmetric, ``group_size`` columns).
        include: layer-selection rules; empty means every Linear (and Embedding).
        exclude: rules for layers kept as they are.
        damp: GPTQ Hessian dampening (fraction of the mean diagonal).
        calibration_batches: batches used to estimate GPTQ Hessians.
    """

    bits: int = 4
    group_size: int = 128
    method: Literal["gptq", "rtn"] = "gptq"
    embeddings: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    damp: float = 0.01
    calibration_batches: int = 16

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"weight_only.bits must be 4 or 8, got {self.bits}")
        if self.group_size not in (32, 64, 128):
            raise UsageError(f"weight_only.group_size must be 32, 64 or 128, got {self.group_size}")
        if not 0 < self.damp < 1:
            raise UsageError(f"weight_only.damp must be in (0, 1), got {self.damp}")
        if self.calibration_batches < 1:
            raise UsageError(f"weight_only.calibration_batches must be >= 1, got {self.calibration_batches}")


class QuantLinearNBits(nn.Module):
    """Linear layer with group-wise asymmetric 4- or 8-bit weight codes."""

    onnx_domain = "com.microsoft"

    def __init__(self, in_features: int, out_features: int, *, bias: bool, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = in_features // group_size
        width = in_features // 2 if bits == 4 else in_features
        self.register_buffer("weight_packed", torch.zeros(out_features, width, dtype=torch.uint8))
        # float16 scales: fp16's 11-bit mantissa is far finer than a 4-bit grid, and fp32 scales
        # were 0.7 MB (6%) of MiniLM's int4 file. The ONNX file stores them as float16 too.
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        # Stored in ONNX Runtime's MatMulNBits layout (4-bit: two per byte, padded to whole bytes)
        # so that export only reshapes buffers.
        zp_width = (groups + 1) // 2 if bits == 4 else groups
        self.register_buffer("zero_points", torch.zeros(out_features, zp_width, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes, (out, in)."""
        return unpack_nibbles(self.weight_packed) if self.bits == 4 else self.weight_packed

    def zeros(self) -> torch.Tensor:
        """Unpacked zero points, (out, groups)."""
        groups = self.scales.shape[1]
        return unpack_nibbles(self.zero_points)[:, :groups] if self.bits == 4 else self.zero_points

    def set_zeros(self, zeros: torch.Tensor) -> None:
        """Store (out, groups) zero points in the packed layout."""
        if self.bits == 4:
            zeros = pack_nibbles(F.pad(zeros, (0, zeros.shape[1] % 2)))
        self.zero_points.copy_(zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            y = _MatMulNBits.apply(x, *self._ort_inputs(), self.in_features, self.out_features, self.bits, self.group_size)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, dequantize_groups(self.codes(), self.scales.float(), self.zeros()), self.bias)

    def _ort_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, groups = self.scales.shape
        b = self.weight_packed.reshape(n, groups, self.group_size * self.bits // 8)
        return b, self.scales.float().reshape(-1), self.zero_points.reshape(-1)


class QuantEmbeddingNBits(nn.Module):
    """Embedding table with asymmetric 4- or 8-bit codes per row group (packed like the Linear)."""

    onnx_domain = "com.microsoft"

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int, group_size: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        groups = embedding_dim // group_size
        width = embedding_dim // 2 if bits == 4 else embedding_dim
        self.register_buffer("weight_packed", torch.zeros(num_embeddings, width, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(num_embeddings, groups, dtype=torch.float16))
        zp_width = (groups + 1) // 2 if bits == 4 else groups
        self.register_buffer("zero_points", torch.zeros(num_embeddings, zp_width, dtype=torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _GatherBlockQuantized.apply(self.weight_packed, ids, self.scales.float(), self.zero_points, self.group_size, self.bits)
        return _lookup(self.weight_packed, ids, self.scales.float(), self.zero_points, self.group_size, self.bits)


def _lookup(packed, ids, scales, zero_points, block: int, bits: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    rows, zeros = packed[ids], zero_points[ids]
    if bits == 4:
        rows, zeros = unpack_nibbles(rows), unpack_nibbles(zeros)[..., : scales.shape[1]]
    q = rows.float().reshape(*rows.shape[:-1], -1, block) - zeros.float().unsqueeze(-1)
    return (q * scales[ids].unsqueeze(-1)).flatten(-2)


class _MatMulNBits(torch.autograd.Function):
    """``x @ W^T`` with W given in ONNX Runtime's MatMulNBits layout (traced for export)."""

    @staticmethod
    def forward(ctx, x, b, scales, zp, k, n, bits, block):  # type: ignore[override]
        groups = k // block
        codes = b.reshape(n, -1)
        zeros = zp.reshape(n, -1)
        if bits == 4:
            codes, zeros = unpack_nibbles(codes), unpack_nibbles(zeros)[:, :groups]
        return F.linear(x, dequantize_groups(codes, scales.reshape(n, groups), zeros))

    @staticmethod
    def symbolic(g, x, b, scales, zp, k, n, bits, block):  # type: ignore[no-untyped-def]
        y = g.op("com.microsoft::MatMulNBits", x, b, scales, zp, K_i=k, N_i=n, bits_i=bits, block_size_i=block)
        sizes = x.type().sizes() if x.type().sizes() is not None else None
        if sizes is not None:
            y.setType(x.type().with_sizes([*sizes[:-1], n]))
        return y


class _GatherBlockQuantized(torch.autograd.Function):
    """Row lookup in a block-quantized table, ONNX Runtime's GatherBlockQuantized (traced for export)."""

    @staticmethod
    def forward(ctx, data, ids, scales, zero_points, block, bits):  # type: ignore[override]
        return _lookup(data, ids, scales, zero_points, block, bits)

    @staticmethod
    def symbolic(g, data, ids, scales, zero_points, block, bits):  # type: ignore[no-untyped-def]
        return g.op(
            "com.microsoft::GatherBlockQuantized", data, ids, scales, zero_points,
            gather_axis_i=0, quantize_axis_i=1, block_size_i=block, bits_i=bits,
        )


@register(WeightOnlyConfig)
def _apply_weight_only(model: nn.Module, cfg: WeightOnlyConfig, ctx: Context) -> nn.Module:
    model.eval()
    kinds = (nn.Linear, nn.Embedding) if cfg.embeddings else (nn.Linear,)
    chosen = select_modules(model, candidate=lambda n, m: type(m) in kinds, include=cfg.include, exclude=cfg.exclude)
    if not any(isinstance(m, nn.Linear) for _, m in chosen):
        raise UsageError("nothing to quantize: no Linear layer is selected in this model")
    for name, m in chosen:
        width = m.in_features if isinstance(m, nn.Linear) else m.embedding_dim
        if width % cfg.group_size:
            raise UsageError(f"weight_only: group_size {cfg.group_size} does not divide the {width} input channels of {name!r}")
        if not torch.isfinite(m.weight).all():
            raise InputRefused(f"weight of layer {name!r} contains NaN or inf")
    linears = [(n, m) for n, m in chosen if isinstance(m, nn.Linear)]
    hessians = _hessians(model, linears, cfg, ctx) if cfg.method == "gptq" and not ctx.skeleton else {}
    for name, m in chosen:
        model.set_submodule(name, _quantized(name, m, cfg, hessians, skeleton=ctx.skeleton))
    ctx.summary.append({
        "technique": "weight_only", "bits": cfg.bits, "group_size": cfg.group_size, "method": cfg.method,
        "quantized": {"Linear": len(linears), "Embedding": len(chosen) - len(linears)},
        "kernel": "onnxruntime MatMulNBits / GatherBlockQuantized",
    })
    return model


def _quantized(name: str, m: nn.Module, cfg: WeightOnlyConfig, hessians, *, skeleton: bool) -> nn.Module:
    if isinstance(m, nn.Embedding):
        q = QuantEmbeddingNBits(m.num_embeddings, m.embedding_dim, bits=cfg.bits, group_size=cfg.group_size)
        if not skeleton:
            _fill_embedding(q, m.weight.detach(), cfg, name)
        return q
    q = QuantLinearNBits(m.in_features, m.out_features, bias=m.bias is not None, bits=cfg.bits, group_size=cfg.group_size)
    if skeleton:
        return q
    if name in hessians:
        codes, scales, zeros = gptq_quantize(m.weight, hessians[name], bits=cfg.bits, group_size=cfg.group_size, damp=cfg.damp)
    else:
        codes, scales, zeros = rtn_quantize(m.weight, bits=cfg.bits, group_size=cfg.group_size)
    q.weight_packed.copy_(pack_nibbles(codes) if cfg.bits == 4 else codes)
    q.scales.copy_(_half(scales, name))
    q.set_zeros(zeros)
    if m.bias is not None:
        q.bias.copy_(m.bias.detach())
    return q


def _half(scales: torch.Tensor, name: str) -> torch.Tensor:
    """The scales as float16 (how the module and the ONNX file store them)."""
    half = scales.to(torch.float16)
    if not torch.isfinite(half).all():
        raise InputRefused(f"weight_only: layer {name!r} has weights too large for float16 scales (|w| > 1e6)")
    return half


def _fill_embedding(q: QuantEmbeddingNBits, w: torch.Tensor, cfg: WeightOnlyConfig, name: str) -> None:
    codes, scales, zeros = rtn_quantize(w, bits=cfg.bits, group_size=cfg.group_size)
    q.weight_packed.copy_(pack_nibbles(codes) if cfg.bits == 4 else codes)
    q.scales.copy_(_half(scales, name))
    if cfg.bits == 4:
        zeros = pack_nibbles(F.pad(zeros, (0, zeros.shape[1] % 2)))
    q.zero_points.copy_(zeros)


def _hessians(model: nn.Module, linears, cfg: WeightOnlyConfig, ctx: Context) -> dict[str, torch.Tensor]:
    if ctx.calib is None:
        raise UsageError("weight_only method 'gptq' needs calibration data (or use method: rtn)")
    batches = checked_batches(ctx.calib, limit=cfg.calibration_batches)
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears}
    counts = dict.fromkeys(sums, 0)

    def observe(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        sums[name] += flat.T @ flat
        counts[name] += flat.shape[0]

    observe_layer_inputs(model, linears, batches, observe)
    unobserved = [n for n, c in counts.items() if c == 0]
    if unobserved:
        raise UsageError(f"weight_only: layers never reached by calibration data: {unobserved}")
    return {n: 2.0 * sums[n] / counts[n] for n in sums}
