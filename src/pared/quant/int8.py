"""Int8 post-training quantization of Linear, Conv2d and Embedding layers.

``Int8Config(mode="static")`` quantizes weights per output channel (symmetric int8) and
activations per tensor with ranges measured on calibration data; ``mode="dynamic"`` measures
activation ranges at run time instead. The quantized modules keep int8 weights as buffers (the
artefact really is small) and export to ONNX as standard QuantizeLinear/DequantizeLinear (static)
or DynamicQuantizeLinear + MatMulInteger (dynamic) graphs, which ONNX Runtime and OpenVINO run
on integer kernels. In eager PyTorch these modules compute the same integer-grid math in float:
that is the reference for accuracy, never what pared reports as int8 speed.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, register
from pared.calib import checked_batches, observe_layer_inputs, sample_count
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.quant.attention import INPUTS as ATTENTION_INPUTS
from pared.quant.attention import AttentionQuant, attach_quantizers, block_errors, discover_attention, use_int8_attention
from pared.quant.batchnorm import fold_batchnorms
from pared.quant.bias_correction import mean_input_for, output_shift
from pared.quant.observers import RangeRecord, auto_range, mse_range, outlier_ratio, record_range
from pared.quant.primitives import choose_qparams, qrange, quantize
from pared.select import rule_matches, select_modules

DEFAULT_CALIBRATION_BATCHES = 32


@register_config("int8")
@dataclasses.dataclass
class Int8Config(BaseConfig):
    """Int8 post-training quantization.

    Attributes:
        mode: ``static`` (activation ranges from calibration data), ``dynamic`` (activation
            ranges at run time, ONNX DynamicQuantizeLinear + MatMulInteger) or ``weight``
            (int8 weights only; OpenVINO quantizes activations per token group at run time).
        calibration: range estimator for static activations: ``minmax``, ``moving_average``,
            ``percentile``, ``mse``, ``kl`` (see ``pared.quant.observers``) or ``auto``: per layer,
            the estimator whose range gives the lowest output MSE of that layer on the first
            calibration batches (the choice per layer is listed in the step summary).
        calibration_batches: how many calibration batches to run. ``None``: every batch the data
            has, up to ``DEFAULT_CALIBRATION_BATCHES``. A number is a request: when the data has
            fewer batches, a warning says how many were used. The step summary records the
            batches and samples used under ``calibration_used``.
        activation_symmetric: int8 symmetric activations instead of uint8 asymmetric.
        embeddings: also quantize ``nn.Embedding`` tables (per row, weight-only).
        include: layer-selection rules (see ``pared.select``); empty means every eligible layer.
        exclude: rules for layers kept in float.
        weight_only: rules for Linear layers whose weights are int8 but whose input stays float
            (for inputs dominated by outliers, such as a transformer FFN's second projection).
        allow_unobserved: keep layers that calibration never reached in float (listed in the
            report) instead of failing.
        weight_calibration: per-output-channel weight range: ``minmax`` (max |w|) or ``mse``
            (clipped to minimise the weight's quantization MSE).
        bias_correction: subtract the mean output shift ``E[(W_q - W) x]`` that weight rounding
            adds, per channel, measured on the calibration data (static mode).
        fallback_outliers: keep in float every static layer whose input range is set by outliers
            (``outlier_ratio`` above ``outlier_threshold``), listed by name in the step summary.
        outlier_threshold: ``max|x|`` over the 99.9th percentile of ``|x|`` above which a layer's
            input counts as outlier-dominated.
        strict: refuse (``InputRefused``, exit 3) a model with parameter-holding layers this mode
            cannot quantize, instead of keeping them in float and listing them under
            ``unsupported`` in the step summary.
        attention: also quantize the two matmuls inside Hugging Face attention (query, key,
            value int8, softmax probabilities uint8; static mode; see ``pared.quant.attention``).
            Faster in OpenVINO, slightly less accurate.
        attention_calibration: range estimator for those four attention inputs. ``mse`` measured
            best on MiniLM (mean cosine 0.9979 / top-10 0.951 against ``minmax`` 0.9979 / 0.949;
            ``kl`` collapsed to 0.918).
        attention_float: keep this many attention blocks in float: those whose int8 attention
            alone changes the model output most, measured on the first calibration batches
            (their names and errors are in the step summary). On MiniLM the last block alone
            held most of the loss.
    """

    mode: Literal["static", "dynamic", "weight"] = "static"
    calibration: Literal["minmax", "moving_average", "percentile", "mse", "kl", "auto"] = "minmax"
    calibration_batches: int | None = None
    activation_symmetric: bool = False
    embeddings: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    weight_only: tuple[str, ...] = ()
    allow_unobserved: bool = False
    weight_calibration: Literal["minmax", "mse"] = "minmax"
    bias_correction: bool = False
    fallback_outliers: bool = False
    outlier_threshold: float = 64.0
    strict: bool = False
    attention: bool = False
    attention_calibration: Literal["minmax", "moving_average", "percentile", "mse", "kl"] = "mse"
    attention_float: int = 0

    def validate(self) -> None:
        if self.calibration_batches is not None and self.calibration_batches < 1:
            raise UsageError(f"int8.calibration_batches must be >= 1, got {self.calibration_batches}")
        if not self.outlier_threshold > 1.0:
            raise UsageError(f"int8.outlier_threshold must be > 1, got {self.outlier_threshold}")
        if self.mode != "static" and (self.bias_correction or self.fallback_outliers):
            raise UsageError("int8.bias_correction and int8.fallback_outliers need mode 'static' (they use calibration data)")
        if self.mode != "static" and self.attention:
            raise UsageError("int8.attention needs mode 'static' (attention ranges come from calibration data)")
        if self.attention_float < 0:
            raise UsageError(f"int8.attention_float must be >= 0, got {self.attention_float}")


class QuantLinear(nn.Module):
    """Linear layer with int8 per-channel weights and (static) uint8/int8 activation qparams."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, mode: str, act_signed: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.act_signed = mode, act_signed
        static = mode == "static"
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if static:
            self.register_buffer("act_scale", torch.ones(()))
            self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            y = _DynamicInt8MatMul.apply(x, self.weight_q.t(), self.weight_scale)
            return y + self.bias if self.bias is not None else y
        if self.mode == "static":
            x = _fake_quant_activation(x, self.act_scale, self.act_zero_point, self.act_signed)
        return F.linear(x, _weight(self.weight_q, self.weight_scale, axis=0), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}"


class QuantConv2d(nn.Module):
    """Conv2d with int8 per-output-channel weights and static uint8/int8 activation qparams."""

    def __init__(self, conv: nn.Conv2d, *, act_signed: bool) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UsageError("int8 Conv2d supports numeric zero padding only")
        self.act_signed = act_signed
        self.register_buffer("weight_q", torch.zeros(conv.weight.shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(conv.out_channels))
        self.register_buffer("bias", torch.zeros(conv.out_channels) if conv.bias is not None else None)
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _fake_quant_activation(x, self.act_scale, self.act_zero_point, self.act_signed)
        w = _weight(self.weight_q, self.weight_scale, axis=0)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantEmbedding(nn.Module):
    """Embedding table stored as int8 with one symmetric scale per row; rows dequantize on lookup.

    The per-row scales are float16: a vocabulary has tens of thousands of rows, and fp32 scales
    were 122 kB of MiniLM's 23 MB file, while fp16's 11-bit precision is far finer than the int8
    grid the scale multiplies.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight_q", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q[ids].float() * self.weight_scale[ids].float().unsqueeze(-1)


def _weight(weight_q: torch.Tensor, scale: torch.Tensor, *, axis: int) -> torch.Tensor:
    shape = [-1] + [1] * (weight_q.dim() - 1)
    w = weight_q.float() * scale.reshape(shape)
    if torch.onnx.is_in_onnx_export():
        # Re-quantizing the dequantized weight is exact; it makes the exporter emit the
        # Q/DQ pair that runtimes match to integer kernels (the Q is folded away later).
        zero = torch.zeros_like(scale, dtype=torch.int32)
        w = torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -128, 127)
    return w


def _fake_quant_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, signed: bool) -> torch.Tensor:
    qmin, qmax = qrange(8, signed=signed)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)


class _DynamicInt8MatMul(torch.autograd.Function):
    """``x @ w_q`` with x quantized per tensor to uint8 at run time (ONNX Runtime's dynamic scheme)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_q_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=1e-8)
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        xq = torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp
        return (xq @ w_q_t.float()) * (scale * w_scale)

    @staticmethod
    def symbolic(g, x, w_q_t, w_scale):  # type: ignore[no-untyped-def]
        xq, x_scale, x_zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", xq, w_q_t, x_zp)
        y = g.op("Cast", acc, to_i=1)  # 1 = FLOAT
        return g.op("Mul", y, g.op("Mul", x_scale, w_scale))


def _matmul_kinds(cfg: Int8Config) -> tuple[type[nn.Module], ...]:
    return (nn.Linear, nn.Conv2d) if cfg.mode == "static" else (nn.Linear,)


def _is_candidate(cfg: Int8Config):
    kinds = _matmul_kinds(cfg)
    if cfg.embeddings:
        kinds = (*kinds, nn.Embedding)
    return lambda name, m: type(m) in kinds


# Normalisation layers stay float in every int8 scheme (runtimes fold or run them in float).
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _unsupported(model: nn.Module, cfg: Int8Config) -> dict[str, str]:
    """``{name: type}`` of layers that hold parameters but that this mode cannot quantize (custom
    modules, ``nn.Bilinear``, ``nn.MultiheadAttention``, Linear subclasses, Conv2d outside static
    mode); normalisation layers are not counted. With ``include`` rules, only layers they match."""
    found = {}
    for name, m in model.named_modules():
        if type(m) in (*_matmul_kinds(cfg), nn.Embedding) or isinstance(m, _NORMS):
            continue
        if next(m.parameters(recurse=False), None) is None:
            continue
        if cfg.include and not any(rule_matches(r, name, m) for r in cfg.include):
            continue
        found[name or "<model>"] = type(m).__name__
    return found


@register(Int8Config)
def _apply_int8(model: nn.Module, cfg: Int8Config, ctx: Context) -> nn.Module:
    model.eval()
    unsupported = _unsupported(model, cfg)
    if unsupported and cfg.strict:
        listed = ", ".join(f"{n!r} ({t})" for n, t in list(unsupported.items())[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise InputRefused(f"int8 {cfg.mode} cannot quantize {len(unsupported)} layer(s): {listed}{more} "
                           "(strict is set; without it they stay float and are listed in the summary)")
    folded = fold_batchnorms(model) if cfg.mode == "static" else []
    chosen = select_modules(model, candidate=_is_candidate(cfg), include=cfg.include, exclude=cfg.exclude)
    if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for _, m in chosen):
        raise UsageError("nothing to quantize: no Linear or Conv2d layer is selected in this model")
    for name, m in chosen:
        if not torch.isfinite(m.weight).all():
            raise InputRefused(f"weight of layer {name!r} contains NaN or inf")
    cal = _Calibration()
    attention_errors: dict[str, float] = {}
    unobserved: list[str] = []
    observed = [(n, m) for n, m in chosen if not isinstance(m, nn.Embedding) and _layer_mode(n, m, cfg) == "static"]
    key = ctx.structure_key("int8")
    attention = _attention_quantizers(model, cfg, ctx, ctx.structure.get(key) if ctx.skeleton else None)
    if ctx.skeleton:
        # Which layers calibration kept in float is data-dependent: the manifest recorded it.
        kept_float = _recorded_kept_float(ctx.structure.get(key), {n for n, _ in chosen})
    elif cfg.mode == "static":
        matmuls = [(n, m) for n, m in chosen if not isinstance(m, nn.Embedding)]
        cal = _calibrate(model, observed, matmuls if cfg.bias_correction else [], cfg, ctx)
        unobserved = [n for n, _ in observed if n not in cal.ranges and n not in cal.outliers]
        if unobserved and not cfg.allow_unobserved:
            raise UsageError(f"layers never reached by calibration data: {unobserved} (set allow_unobserved to keep them in float)")
        for quant in attention.values():
            quant.set_ranges(cfg.attention_calibration)
        attention_errors = _keep_sensitive_attention_float(model, attention, cfg, ctx)
    if not ctx.skeleton:
        kept_float = unobserved + list(cal.outliers)
        record = ({"kept_float": kept_float} if kept_float else {}) | ({"attention": list(attention)} if cfg.attention else {})
        if record:
            ctx.structure[key] = record
    counts: dict[str, int] = {}
    for name, m in chosen:
        if name in kept_float:
            continue
        model.set_submodule(name, _quantized(name, m, cfg, cal.ranges.get(name), cal.mean_inputs.get(name)))
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    left = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Embedding)]
    ctx.summary.append({
        "technique": "int8",
        "mode": cfg.mode,
        "quantized": counts,
        "kept_float": left,
        "unsupported": unsupported,
        "unobserved": unobserved,
        "folded_batchnorm": folded,
        "calibration": cfg.calibration,
        **({"calibration_used": cal.used} if cal.used else {}),
        **({"calibration_choice": cal.choices} if cfg.calibration == "auto" else {}),
        **({"outlier_fallback": cal.outliers} if cfg.fallback_outliers else {}),
        **({"bias_corrected": sorted(cal.mean_inputs)} if cfg.bias_correction else {}),
        **({"attention_quantized": list(attention)} if cfg.attention else {}),
        **({"attention_block_errors": {n: float(f"{e:.4g}") for n, e in attention_errors.items()},
            "attention_kept_float": sorted(set(attention_errors) - set(attention))} if attention_errors else {}),
    })
    return model


# Calibration batches on which each attention block's output error is measured.
_SENSITIVITY_BATCHES = 2


def _keep_sensitive_attention_float(
    model: nn.Module, attention: dict[str, AttentionQuant], cfg: Int8Config, ctx: Context
) -> dict[str, float]:
    """Remove the quantizers of the ``cfg.attention_float`` most sensitive attention blocks from
    the model and from ``attention``; returns every block's relative output MSE with only its
    attention quantized (measured before any Linear layer is)."""
    if cfg.attention_float == 0:
        return {}
    if cfg.attention_float > len(attention):
        raise UsageError(f"int8.attention_float is {cfg.attention_float} but the model has {len(attention)} attention blocks")
    batches = checked_batches(ctx.calib, limit=_SENSITIVITY_BATCHES)
    errors = block_errors(model, attention, batches)
    worst = sorted(errors, key=errors.get, reverse=True)[: cfg.attention_float]
    for name in worst:
        delattr(model.get_submodule(name), "int8_attention")
        del attention[name]
    return errors


def _attention_quantizers(model: nn.Module, cfg: Int8Config, ctx: Context, recorded: object) -> dict[str, AttentionQuant]:
    """``{attention module name: AttentionQuant}`` attached to the model (empty unless
    ``cfg.attention``); recording ranges during calibration, or rebuilt from the manifest."""
    if not cfg.attention:
        return {}
    if ctx.skeleton:
        names = recorded.get("attention") if isinstance(recorded, dict) else None
        modules = {n for n, _ in model.named_modules()}
        if not isinstance(names, list) or not all(isinstance(n, str) and n in modules for n in names):
            raise InputRefused("artefact structure has no valid 'attention' list of int8 attention layers")
        use_int8_attention(model)
    else:
        if ctx.calib is None:
            raise UsageError("int8.attention needs calibration data")
        names = discover_attention(model, checked_batches(ctx.calib, limit=1)[0])
    quants = dict(zip(names, attach_quantizers(model, names)))
    if not ctx.skeleton:
        for quant in quants.values():
            quant.records = {n: RangeRecord(n) for n in ATTENTION_INPUTS}
    return quants


# Whole calibration inputs kept per layer for ``auto``'s output-error comparison.
_AUTO_BATCHES = 2


@dataclasses.dataclass
class _Calibration:
    """What the calibration pass found: activation ranges, auto's choice per layer, layers kept in
    float for outliers (with their ratio), and mean inputs for bias correction."""

    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    choices: dict[str, str] = dataclasses.field(default_factory=dict)
    outliers: dict[str, float] = dataclasses.field(default_factory=dict)
    mean_inputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    used: dict[str, int | None] = dataclasses.field(default_factory=dict)


def _calibrate(
    model: nn.Module,
    observed: list[tuple[str, nn.Module]],
    corrected: list[tuple[str, nn.Module]],
    cfg: Int8Config,
    ctx: Context,
) -> _Calibration:
    """One pass over the calibration data: input ranges of ``observed`` layers and mean inputs of
    ``corrected`` layers (bias correction)."""
    if ctx.calib is None:
        raise UsageError("static int8 needs calibration data (pass calib=..., or use mode='dynamic')")
    requested = cfg.calibration_batches
    batches = checked_batches(ctx.calib, limit=requested or DEFAULT_CALIBRATION_BATCHES)
    used = {"batches": len(batches), "samples": sample_count(batches), "requested_batches": requested}
    if requested is not None and len(batches) < requested:
        message = (f"int8 calibration used {len(batches)} of the {requested} requested batches "
                   f"({used['samples']} samples): the calibration data has no more")
        warnings.warn(message, UserWarning, stacklevel=2)
    keep = _AUTO_BATCHES if cfg.calibration == "auto" else 0
    records = {name: RangeRecord(name, keep_inputs=keep) for name, _ in observed}
    means = {name: mean_input_for(m) for name, m in corrected}

    def observe(name: str, x: torch.Tensor) -> None:
        if name in records:
            records[name].update(x)
        if name in means:
            means[name].update(x)

    layers = dict(observed) | dict(corrected)
    observe_layer_inputs(model, list(layers.items()), batches, observe)
    cal = _Calibration(mean_inputs={n: acc.mean() for n, acc in means.items() if acc.count}, used=used)
    signed = cfg.activation_symmetric
    for name, rec in records.items():
        if not rec.batches:
            continue
        if cfg.fallback_outliers and (ratio := outlier_ratio(rec)) > cfg.outlier_threshold:
            cal.outliers[name] = round(ratio, 1)
        elif cfg.calibration == "auto":
            error = _output_error(layers[name], rec.inputs, cfg)
            cal.choices[name], cal.ranges[name], _ = auto_range(rec, error, symmetric=signed, signed=signed)
        else:
            cal.ranges[name] = record_range(rec, cfg.calibration, symmetric=signed, signed=signed)
        rec.inputs.clear()  # whole inputs can be large: free them layer by layer
    return cal


def _output_error(layer: nn.Module, inputs: list[torch.Tensor], cfg: Int8Config):
    """``(lo, hi) -> MSE`` between the float layer's output and the int8 layer's output (int8
    weights, input fake-quantized to ``[lo, hi]``) on ``inputs``."""
    signed = cfg.activation_symmetric
    scale, zp = weight_qparams(layer.weight.detach(), cfg.weight_calibration)
    w_q = _weight(quantize(layer.weight.detach(), scale, zp, -127, 127, axis=0), scale, axis=0)
    with torch.no_grad():
        refs = [layer(x) for x in inputs]

    def error(lo: torch.Tensor, hi: torch.Tensor) -> float:
        a_scale, a_zp = choose_qparams(lo, hi, symmetric=signed, signed=signed)
        total = 0.0
        with torch.no_grad():
            for x, ref in zip(inputs, refs):
                xq = _fake_quant_activation(x, a_scale, a_zp, signed)
                total += float(((torch.func.functional_call(layer, {"weight": w_q}, (xq,)) - ref) ** 2).mean())
        return total / len(inputs)

    return error


def _recorded_kept_float(entry: object, names: set[str]) -> list[str]:
    if entry is None:
        return []
    kept = entry.get("kept_float", []) if isinstance(entry, dict) else None
    if not isinstance(kept, list) or not all(isinstance(n, str) and n in names for n in kept):
        raise InputRefused("artefact structure has no valid 'kept_float' list of int8 layers for this model")
    return kept


def _layer_mode(name: str, m: nn.Module, cfg: Int8Config) -> str:
    if isinstance(m, nn.Linear) and any(rule_matches(r, name, m) for r in cfg.weight_only):
        return "weight"
    return cfg.mode


def _quantized(name: str, m: nn.Module, cfg: Int8Config, act_range, mean_input: torch.Tensor | None = None) -> nn.Module:
    mode = _layer_mode(name, m, cfg)
    if isinstance(m, nn.Embedding):
        q = QuantEmbedding(m.num_embeddings, m.embedding_dim)
        _set_weight(q, m.weight.detach(), axis=0, method=cfg.weight_calibration)
        return q
    if cfg.bias_correction and m.bias is None:
        # The correction lives in the bias; skeleton rebuilds add the same (then loaded) bias.
        m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
    signed = cfg.activation_symmetric
    if isinstance(m, nn.Conv2d):
        q = QuantConv2d(m, act_signed=signed)
    else:
        q = QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, mode=mode, act_signed=signed)
    _set_weight(q, m.weight.detach(), axis=0, method=cfg.weight_calibration)
    if m.bias is not None:
        q.bias.copy_(m.bias.detach())
    if mean_input is not None:
        weight_error = _weight(q.weight_q, q.weight_scale, axis=0) - m.weight.detach()
        q.bias.sub_(output_shift(m, weight_error, mean_input))
    if act_range is not None:
        scale, zp = choose_qparams(act_range[0], act_range[1], symmetric=signed, signed=signed)
        q.act_scale.copy_(scale)
        q.act_zero_point.copy_(zp)
        if q.bias is not None:
            # Integer kernels add the bias as int32 at scale act_scale * weight_scale; rounding it
            # here makes pared's eager reference bit-match what the runtime computes.
            bias_scale = scale * q.weight_scale
            q.bias.copy_(torch.round(q.bias / bias_scale) * bias_scale)
    return q


def weight_qparams(w: torch.Tensor, method: str = "minmax", *, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 scale and zero point per slice along ``axis`` (``minmax`` or ``mse`` range)."""
    if method == "mse":
        lo, hi = mse_range(w, symmetric=True, signed=True, axis=axis)
        bound = torch.maximum(-lo, hi)
    else:
        dims = [d for d in range(w.dim()) if d != axis]
        bound = w.abs().amax(dim=dims) if dims else w.abs()
    return choose_qparams(-bound, bound, symmetric=True, signed=True)


def _set_weight(q: nn.Module, w: torch.Tensor, *, axis: int, method: str = "minmax") -> None:
    scale, zp = weight_qparams(w, method, axis=axis)
    if q.weight_scale.dtype == torch.float16:
        # Quantize with the scale as stored, kept inside float16's normal range (never 0 or inf).
        info = torch.finfo(torch.float16)
        scale = scale.clamp(info.smallest_normal, info.max).half().float()
    q.weight_q.copy_(quantize(w, scale, zp, -127, 127, axis=axis))
    q.weight_scale.copy_(scale)
