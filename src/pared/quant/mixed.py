"""Mixed precision: a per-layer plan of fp32 / int8 / int4 weights, and an allocator that picks one.

A plan is a plain mapping ``{layer name or selection rule: precision}``, written by hand in a
recipe or returned by ``allocate_plan`` (or a search). Precisions are ``fp32``, ``int8`` and
``int4``, optionally with a group size: ``int4/g128``. The first rule that matches a layer wins;
Linear and Embedding layers that no rule matches stay fp32. Quantized layers are the same
``QuantLinearNBits`` / ``QuantEmbeddingNBits`` modules ``WeightOnlyConfig`` builds, so export and
artefacts are identical to the ``int4`` recipe's (ONNX Runtime MatMulNBits / GatherBlockQuantized).

The allocator measures each layer's sensitivity (the model's relative output error when only
that layer is quantized at a given precision), sizes each choice from the real packed buffers,
and solves the multiple-choice knapsack "least summed error within a byte budget" exactly by
dynamic programming over the budget.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pared.apply import Context, register
from pared.calib import checked_batches
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.select import rule_matches
# The per-layer builders of weight-only quantization: a mixed plan is weight-only quantization
# with a (bits, group size) chosen per layer, so it reuses them rather than a second copy.
from pared.quant.weight_only import WeightOnlyConfig, _hessians, _quantized

TECHNIQUE = "mixed_precision"
_PRECISION = re.compile(r"(fp32|int8|int4)(?:/g(32|64|128))?")
DEFAULT_CHOICES = ("int4/g128", "int4/g64", "int4/g32", "int8/g128", "int8/g32", "fp32")

Plan = dict[str, str]
"""``{layer name or rule: precision}``, e.g. ``{"bert.embeddings.word_embeddings": "int4/g128", "*": "int4"}``."""


@register_config(TECHNIQUE)
@dataclasses.dataclass
class MixedPrecisionConfig(BaseConfig):
    """Per-layer fp32 / int8 / int4 weights, from an explicit plan or chosen for a size budget.

    Attributes:
        plan: ``{layer name or rule: precision}``; first match wins, unmatched layers stay fp32.
            Precision is ``fp32``, ``int8`` or ``int4``, optionally ``/g32``, ``/g64``, ``/g128``.
        budget_bytes: instead of a plan, let the allocator choose one whose quantized model's
            weights take at most this many bytes (needs calibration data; the chosen plan is
            saved in the artefact).
        choices: precisions the allocator may give each layer.
        group_size: group size of precisions written without ``/g``.
        method: ``gptq`` or ``rtn`` rounding of Linear weights (embeddings always round to nearest).
        damp: GPTQ Hessian dampening.
        calibration_batches: calibration batches for GPTQ Hessians and sensitivities.
    """

    plan: dict[str, str] = dataclasses.field(default_factory=dict)
    budget_bytes: int = 0
    choices: tuple[str, ...] = DEFAULT_CHOICES
    group_size: int = 32
    method: Literal["gptq", "rtn"] = "gptq"
    damp: float = 0.01
    calibration_batches: int = 16

    def validate(self) -> None:
        if bool(self.plan) == (self.budget_bytes > 0):
            raise UsageError("mixed_precision needs exactly one of plan or budget_bytes (> 0)")
        if self.budget_bytes < 0:
            raise UsageError(f"mixed_precision.budget_bytes must be >= 0, got {self.budget_bytes}")
        for rule, precision in self.plan.items():
            parse_precision(precision, self.group_size, where=f"mixed_precision.plan[{rule!r}]")
        if not self.choices:
            raise UsageError("mixed_precision.choices must not be empty")
        for precision in self.choices:
            parse_precision(precision, self.group_size, where="mixed_precision.choices")
        # The remaining fields mean what they mean for weight_only; it validates them.
        WeightOnlyConfig(group_size=self.group_size, method=self.method, damp=self.damp,
                         calibration_batches=self.calibration_batches)


def parse_precision(text: str, group_size: int = 32, *, where: str = "precision") -> tuple[int, int] | None:
    """``"int4/g64"`` -> ``(4, 64)``; ``"int8"`` -> ``(8, group_size)``; ``"fp32"`` -> None.

    Raises:
        UsageError: anything else (``int3``, ``int4/g48``, ``fp32/g32``).
    """
    match = _PRECISION.fullmatch(text) if isinstance(text, str) else None
    if match is None or (match.group(1) == "fp32" and match.group(2)):
        raise UsageError(f"{where}: {text!r} is not a precision; use fp32, int8 or int4, optionally with /g32, /g64 or /g128")
    if match.group(1) == "fp32":
        return None
    return int(match.group(1)[3:]), int(match.group(2) or group_size)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Embedding layers a plan can assign a precision to, in model order."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]


def resolve_plan(model: nn.Module, plan: Plan, group_size: int = 32) -> dict[str, tuple[int, int] | None]:
    """Each quantizable layer's ``(bits, group_size)``, or None for fp32, under ``plan``.

    Raises:
        UsageError: a rule matches no layer, a precision is invalid, or a group size does not
            divide a layer's input width.
    """
    layers = quantizable_layers(model)
    unmatched = [r for r in plan if not any(rule_matches(r, n, m) for n, m in layers)]
    if unmatched:
        raise UsageError(f"mixed_precision: plan rule(s) matched no Linear or Embedding layer: {unmatched}")
    parsed = {rule: parse_precision(p, group_size, where=f"mixed_precision.plan[{rule!r}]") for rule, p in plan.items()}
    out: dict[str, tuple[int, int] | None] = {}
    for name, m in layers:
        rule = next((r for r in plan if rule_matches(r, name, m)), None)
        out[name] = parsed[rule] if rule is not None else None
        width = m.in_features if isinstance(m, nn.Linear) else m.embedding_dim
        if out[name] is not None and width % out[name][1]:
            raise UsageError(f"mixed_precision: group size {out[name][1]} does not divide the {width} input channels of {name!r}")
    return out


def _weight_cfg(bits: int, group: int, cfg: MixedPrecisionConfig) -> WeightOnlyConfig:
    return WeightOnlyConfig(bits=bits, group_size=group, method=cfg.method, damp=cfg.damp,
                            calibration_batches=cfg.calibration_batches)


@register(MixedPrecisionConfig)
def _apply_mixed(model: nn.Module, cfg: MixedPrecisionConfig, ctx: Context) -> nn.Module:
    model.eval()
    key = ctx.structure_key(TECHNIQUE)
    if cfg.plan:
        plan = cfg.plan
    elif ctx.skeleton:
        plan = _recorded_plan(ctx, key)
    else:
        plan = allocate_for_model(model, cfg, ctx.calib)
        ctx.structure[key] = {"plan": plan}
    layers = resolve_plan(model, plan, cfg.group_size)
    modules = dict(model.named_modules())
    chosen = {n: p for n, p in layers.items() if p is not None}
    if not chosen:
        raise UsageError("mixed_precision: the plan keeps every layer in fp32; nothing to quantize")
    for name in chosen:
        if not torch.isfinite(modules[name].weight).all():
            raise InputRefused(f"weight of layer {name!r} contains NaN or inf")
    hessians = {}
    if cfg.method == "gptq" and not ctx.skeleton:
        linears = [(n, modules[n]) for n in chosen if isinstance(modules[n], nn.Linear)]
        if linears:
            hessians = _hessians(model, linears, _weight_cfg(4, cfg.group_size, cfg), ctx)
    for name, (bits, group) in chosen.items():
        model.set_submodule(name, _quantized(name, modules[name], _weight_cfg(bits, group, cfg), hessians, skeleton=ctx.skeleton))
    counts: dict[str, int] = {}
    for p in layers.values():
        label = "fp32" if p is None else f"int{p[0]}/g{p[1]}"
        counts[label] = counts.get(label, 0) + 1
    ctx.summary.append({"technique": TECHNIQUE, "method": cfg.method, "layers": counts, "plan": dict(plan),
                        "kernel": "onnxruntime MatMulNBits / GatherBlockQuantized"})
    return model


def _recorded_plan(ctx: Context, key: str) -> Plan:
    entry = ctx.structure.get(key)
    plan = entry.get("plan") if isinstance(entry, dict) else None
    if not isinstance(plan, dict) or not plan or not all(isinstance(k, str) and isinstance(v, str) for k, v in plan.items()):
        raise InputRefused(f"artefact structure has no valid '{key}' plan: cannot rebuild the mixed-precision layers")
    return plan


# --- allocator -----------------------------------------------------------------------------


def layer_bytes(name: str, module: nn.Module, precision: str, group_size: int = 32) -> int:
    """Bytes the layer's weight takes at ``precision``, from the real (packed) buffers.

    Bias bytes are left out: they stay fp32 at every precision.
    """
    parsed = parse_precision(precision, group_size)
    if parsed is None:
        return module.weight.numel() * module.weight.element_size()
    cfg = WeightOnlyConfig(bits=parsed[0], group_size=parsed[1], method="rtn")
    q = _quantized(name, module, cfg, {}, skeleton=True)
    return sum(b.numel() * b.element_size() for n, b in q.named_buffers() if n != "bias")


def fixed_bytes(model: nn.Module) -> int:
    """Bytes of everything a plan does not change: every tensor except Linear/Embedding weights."""
    planned = {f"{n}.weight" for n, _ in quantizable_layers(model)}
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in planned)


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """``||output - reference||^2 / ||reference||^2`` (pure function; 0 is exact)."""
    ref, out = reference.double(), output.double()
    if ref.shape != out.shape:
        raise UsageError(f"output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


def layer_sensitivity(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, ...]],
    choices: Sequence[str],
    *,
    method: Literal["gptq", "rtn"] = "gptq",
    group_size: int = 32,
    layers: Iterable[str] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Relative output error of ``model`` with only one layer quantized, per layer and precision.

    Each layer is replaced by its quantized module (GPTQ Hessians from the fp32 model), the
    batches are run, and the layer is put back, so the model is unchanged on return.

    Returns:
        ``{layer name: {precision: relative_error}}``; fp32 is 0 by definition, and a precision
        whose group size does not divide the layer's width is left out for that layer.
    """
    model.eval()
    named = dict(quantizable_layers(model))
    names = list(layers) if layers is not None else list(named)
    cfg = MixedPrecisionConfig(plan={"*": "fp32"}, group_size=group_size, method=method)
    with torch.inference_mode():
        reference = torch.cat([_output(model, b) for b in batches])
    linears = [(n, named[n]) for n in names if isinstance(named[n], nn.Linear)]
    hessians = _hessians(model, linears, _weight_cfg(4, group_size, cfg), Context(calib=batches)) if method == "gptq" and linears else {}
    result: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        original = named[name]
        result[name] = {}
        for precision in choices:
            parsed = parse_precision(precision, group_size)
            if not _fits(original, precision, group_size):
                continue
            if parsed is None:
                result[name][precision] = 0.0
                continue
            model.set_submodule(name, _quantized(name, original, _weight_cfg(*parsed, cfg), hessians, skeleton=False))
            try:
                with torch.inference_mode():
                    out = torch.cat([_output(model, b) for b in batches])
            finally:
                model.set_submodule(name, original)
            result[name][precision] = relative_error(reference, out)
        if progress:
            print(f"sensitivity {i + 1}/{len(names)} {name}: {result[name]}", flush=True)
    return result


def _output(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"mixed precision sensitivity needs a model that returns one tensor, got {type(out).__name__}")
    return out.detach().float()


def allocate_plan(
    sensitivity: dict[str, dict[str, float]],
    sizes: dict[str, dict[str, int]],
    budget_bytes: int,
    *,
    resolution: int = 4000,
) -> Plan:
    """The plan with the least summed sensitivity whose layers fit in ``budget_bytes`` (pure).

    A multiple-choice knapsack solved by dynamic programming over the budget cut into
    ``resolution`` steps; sizes round up to whole steps, so the plan never exceeds the budget.

    Args:
        sensitivity: ``{layer: {precision: error}}`` as ``layer_sensitivity`` returns.
        sizes: ``{layer: {precision: bytes}}`` for the same layers and precisions.
        budget_bytes: bytes all these layers may take together.

    Raises:
        UsageError: even the smallest choice of every layer exceeds the budget.
    """
    if budget_bytes <= 0:
        raise UsageError(f"budget must be > 0 bytes, got {budget_bytes}")
    names = list(sensitivity)
    smallest = sum(min(sizes[n].values()) for n in names)
    if smallest > budget_bytes:
        raise UsageError(f"size budget {budget_bytes} bytes is below the smallest plan ({smallest} bytes)")
    unit = budget_bytes / resolution
    inf = float("inf")
    best = np.zeros(resolution + 1)  # best[c]: least error of the layers so far within c units
    picks: list[np.ndarray] = []
    for name in names:
        options = list(sensitivity[name])
        new = np.full(resolution + 1, inf)
        pick = np.full(resolution + 1, -1)
        for j, precision in enumerate(options):
            cost = int(np.ceil(sizes[name][precision] / unit - 1e-9))
            if cost > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[cost:] = best[: resolution + 1 - cost] + sensitivity[name][precision]
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    capacity = int(np.argmin(best))
    if not np.isfinite(best[capacity]):
        raise UsageError(f"no plan fits the size budget of {budget_bytes} bytes at this resolution")
    plan: Plan = {}
    for name, pick in zip(reversed(names), reversed(picks)):
        precision = list(sensitivity[name])[int(pick[capacity])]
        plan[name] = precision
        capacity -= int(np.ceil(sizes[name][precision] / unit - 1e-9))
    return dict(reversed(list(plan.items())))


def allocate_for_model(model: nn.Module, cfg: MixedPrecisionConfig, calib: Any) -> Plan:
    """Measure sensitivities on ``calib`` and allocate ``cfg.budget_bytes`` over the whole model."""
    if calib is None:
        raise UsageError("mixed_precision with budget_bytes needs calibration data to measure sensitivity")
    batches = checked_batches(calib, limit=cfg.calibration_batches)
    budget = cfg.budget_bytes - fixed_bytes(model)
    if budget <= 0:
        raise UsageError(f"size budget {cfg.budget_bytes} bytes is below what the model's other tensors take ({fixed_bytes(model)} bytes)")
    sens = layer_sensitivity(model, batches, cfg.choices, method=cfg.method, group_size=cfg.group_size)
    layers = dict(quantizable_layers(model))
    sizes = {n: {c: layer_bytes(n, layers[n], c, cfg.group_size) for c in sens[n]} for n in sens}
    return allocate_plan(sens, sizes, budget)


def _fits(module: nn.Module, precision: str, group_size: int) -> bool:
    parsed = parse_precision(precision, group_size)
    width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
    return parsed is None or width % parsed[1] == 0
