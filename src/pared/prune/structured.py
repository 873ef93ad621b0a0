"""Structured channel pruning: whole output channels of Conv and Linear layers, physically removed.

``compress_(model, ChannelPruneConfig(ratio=0.5))`` traces the model (``pared.prune.graph``),
scores each group of coupled channels with a plain importance callable
(``pared.prune.importance``), keeps the best ``1 - ratio`` of every group (or of all groups
together, ``scope="global"``), and replaces each affected layer by a smaller ``nn.Conv*`` /
``nn.Linear`` / ``nn.BatchNorm*`` holding the kept weights. The result is an ordinary dense
model: every runtime runs it faster without sparse kernels.

The kept indices of every changed layer go into ``ctx.structure`` (JSON), so ``load_artefact``
rebuilds the smaller layers on a fresh model (skeleton mode) and loads the saved state_dict
strictly; nothing is pickled. Recovery fine-tuning is a separate recipe step (``finetune``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from pared.apply import Context, register
from pared.calib import checked_batches
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.prune.graph import ChannelGroup, DependencyGraph, build_dependency_graph
from pared.prune.importance import Importance, get_importance
from pared.select import rule_matches, select_modules

TECHNIQUE = "prune_channels"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_config(TECHNIQUE)
@dataclasses.dataclass
class ChannelPruneConfig(BaseConfig):
    """Remove output channels of Conv/Linear layers (and everything coupled to them).

    Attributes:
        ratio: fraction of channels removed from each group, in [0, 1).
        importance: ``magnitude`` (|w|) or ``taylor`` (|w * grad|, needs a trainable task).
        scope: ``layer``: every group loses ``ratio`` of its channels; ``global``: ``ratio`` of
            all channels, taken where normalised importance is lowest (non-uniform per group).
        per_layer: group ratio overrides, keyed by a layer rule (name, glob, ``re:`` or
            ``type:``) matching one of the group's producers; ``allocate_ratios`` writes these.
        include: layer rules; only groups with a matching producer are pruned.
        exclude: layer rules; groups with a matching producer are left whole.
        round_to: kept channels per group are rounded up to a multiple of this (SIMD widths).
        on_unsupported: a group touched by an op pared cannot follow is an ``error`` (default,
            naming the node), or ``skip``ped and listed in the summary.
        taylor_batches: training batches whose gradients ``taylor`` sums.
    """

    ratio: float = 0.5
    importance: Literal["magnitude", "taylor"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    per_layer: dict[str, float] = dataclasses.field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    on_unsupported: Literal["error", "skip"] = "error"
    taylor_batches: int = 4

    def validate(self) -> None:
        _check_ratio(f"{TECHNIQUE}.ratio", self.ratio)
        for rule, value in self.per_layer.items():
            _check_ratio(f"{TECHNIQUE}.per_layer[{rule!r}]", value)
        if self.round_to < 1:
            raise UsageError(f"{TECHNIQUE}.round_to must be >= 1, got {self.round_to}")
        if self.taylor_batches < 1:
            raise UsageError(f"{TECHNIQUE}.taylor_batches must be >= 1, got {self.taylor_batches}")


def _check_ratio(field: str, value: float) -> None:
    if not (0.0 <= value < 1.0) or not math.isfinite(value):
        raise UsageError(f"{field} must be in [0, 1), got {value}")


# --------------------------------------------------------------------------- pure selection math


def kept_count(n: int, ratio: float, round_to: int = 1) -> int:
    """Channels a group of ``n`` keeps when ``ratio`` of them go: at least 1, rounded up to a
    multiple of ``round_to`` and at most ``n``."""
    keep = n - math.floor(n * ratio + 1e-9)
    keep = math.ceil(keep / round_to) * round_to
    return max(1, min(n, keep))


def top_channels(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, in ascending index order (ties: lower index)."""
    order = torch.argsort(-scores.double(), stable=True)[:keep]
    return sorted(int(i) for i in order)


def global_keep_counts(
    scores: dict[Any, torch.Tensor], ratio: float, round_to: int = 1, *, normalize: bool = True
) -> dict[Any, int]:
    """Per-group kept counts when ``ratio`` of all channels go where scores are lowest. Every
    group keeps at least one channel (rounded up to ``round_to``).

    ``normalize`` divides each group's scores by their mean first: needed for weight-magnitude
    scores, whose scale differs from layer to layer; scores already in common units (such as
    output variance) are compared as they are."""
    if not scores:
        return {}
    flat = torch.cat([s.double() / (s.double().mean().clamp_min(1e-12) if normalize else 1.0) for s in scores.values()])
    keys = list(scores)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores.values())])
    n_remove = math.floor(len(flat) * ratio + 1e-9)
    removed = owner[torch.argsort(flat, stable=True)[:n_remove]]
    counts: dict[Any, int] = {}
    for i, (g, s) in enumerate(scores.items()):
        gone = int((removed == i).sum())
        counts[g] = max(1, min(len(s), math.ceil((len(s) - gone) / round_to) * round_to))
    return counts


def reduce_to_channels(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean of per-element ``scores`` over every dimension but ``dim``: one score per channel."""
    moved = scores.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).double().mean(dim=1)


# -------------------------------------------------------------------------------- group scores


def group_scores(
    model: nn.Module, graph: DependencyGraph, index: int, importance: Importance,
    grads: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One score per channel of group ``index``: producers' output rows, BatchNorm scales and
    consumers' input columns, each scored by ``importance``, normalised by its mean, averaged."""
    group = graph.groups[index]
    parts: list[torch.Tensor] = []

    def score(name: str, weight: torch.Tensor) -> torch.Tensor:
        grad = grads.get(f"{name}.weight") if grads is not None else None
        return importance(weight, grad)

    for name in group.producers:
        parts.append(reduce_to_channels(score(name, model.get_submodule(name).weight)))
    for name in group.passengers:
        mod = model.get_submodule(name)
        if getattr(mod, "weight", None) is not None:
            parts.append(reduce_to_channels(score(name, mod.weight)))
    for name in group.consumers:
        weight = model.get_submodule(name).weight  # (out, in, ...)
        per_elem = score(name, weight).movedim(1, 0)  # (in, out, ...)
        offset, total = 0, torch.zeros(group.size, dtype=torch.float64)
        for seg in graph.inputs[name].segments:
            width = seg.size * seg.repeat
            if seg.space is not None and graph.space_group[seg.space] == index:
                block = per_elem[offset : offset + width].reshape(seg.size, -1)
                total += block.double().mean(dim=1)
            offset += width
        parts.append(total)
    normed = [p / p.mean().clamp_min(1e-12) for p in parts]
    return torch.stack(normed).mean(dim=0)


# ------------------------------------------------------------------------------ module surgery


def slice_module(module: nn.Module, keep_out: Sequence[int] | None, keep_in: Sequence[int] | None) -> nn.Module:
    """A new layer of the same type holding only the kept output channels / input features.

    Supported: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (``groups=1``; depthwise with ``keep_out ==
    keep_in``) and ``nn.BatchNorm1d/2d/3d`` (``keep_out`` only). Weights are copied; the new layer
    is on the old one's device and dtype, in the same train/eval mode.
    """
    ref = next(module.parameters(), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            w = _take(_take(module.weight, 0, keep_out), 1, keep_in)
            new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, **factory)
            new.weight.copy_(w)
            if module.bias is not None:
                new.bias.copy_(_take(module.bias, 0, keep_out))
        elif isinstance(module, _CONVS):
            new = _slice_conv(module, keep_out, keep_in, factory)
        elif isinstance(module, _NORMS):
            new = _slice_norm(module, keep_out, factory)
        else:
            raise UsageError(f"structured pruning cannot resize a {type(module).__name__}")
    return new.train(module.training)


def _slice_conv(conv: nn.Module, keep_out, keep_in, factory) -> nn.Module:
    depthwise = conv.groups > 1
    if depthwise and (conv.groups != conv.in_channels or conv.groups != conv.out_channels):
        raise UsageError(f"cannot resize a grouped convolution (groups={conv.groups})")
    if depthwise:
        keep_in = None  # a depthwise filter has one input channel: slice the filters only
    w = _take(_take(conv.weight, 0, keep_out), 1, keep_in)
    out_ch = w.shape[0]
    in_ch = out_ch if depthwise else w.shape[1]
    new = type(conv)(
        in_ch, out_ch, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=out_ch if depthwise else 1, bias=conv.bias is not None,
        padding_mode=conv.padding_mode, **factory,
    )
    new.weight.copy_(w)
    if conv.bias is not None:
        new.bias.copy_(_take(conv.bias, 0, keep_out))
    return new


def _slice_norm(bn: nn.Module, keep, factory) -> nn.Module:
    n = len(keep) if keep is not None else bn.num_features
    new = type(bn)(n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats, **factory)
    if bn.affine:
        new.weight.copy_(_take(bn.weight, 0, keep))
        new.bias.copy_(_take(bn.bias, 0, keep))
    if bn.track_running_stats:
        new.running_mean.copy_(_take(bn.running_mean, 0, keep))
        new.running_var.copy_(_take(bn.running_var, 0, keep))
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _take(t: torch.Tensor, dim: int, keep: Sequence[int] | None) -> torch.Tensor:
    if keep is None:
        return t
    return t.index_select(dim, torch.as_tensor(list(keep), dtype=torch.long, device=t.device))


# ------------------------------------------------------------------------------------ handler


@register(ChannelPruneConfig)
def _apply_channels(model: nn.Module, cfg: ChannelPruneConfig, ctx: Context) -> nn.Module:
    key = ctx.structure_key(TECHNIQUE)
    if ctx.skeleton:
        _rebuild(model, ctx.structure.get(key), key)
        return model
    inputs = example_inputs(ctx, TECHNIQUE)
    graph = build_dependency_graph(model, inputs)
    ratios, skipped = _group_ratios(model, graph, cfg)
    importance = get_importance(cfg.importance)
    grads = _taylor_grads(model, ctx, cfg) if cfg.importance == "taylor" else None
    scores = {g: group_scores(model, graph, g, importance, grads) for g in ratios}
    counts = _keep_counts(scores, ratios, cfg)
    keep = {g: top_channels(scores[g], counts[g]) for g in scores if counts[g] < graph.groups[g].size}
    layers = plan_layers(graph, keep)
    before = _facts(model, inputs)
    apply_layers(model, layers, check_inputs=inputs)
    after = _facts(model, inputs)
    ctx.structure[key] = {"layers": layers}
    total = sum(graph.groups[g].size for g in ratios)
    removed = sum(graph.groups[g].size - len(k) for g, k in keep.items())
    r = removed / total if total else 0.0
    ctx.summary.append({
        "technique": TECHNIQUE,
        "scope": cfg.scope,
        "importance": cfg.importance,
        "groups": [
            {"group": graph.groups[g].name, "layers": graph.groups[g].producers,
             "channels_before": graph.groups[g].size, "channels_after": counts[g]}
            for g in ratios
        ],
        "skipped": skipped,
        "channels_removed_fraction": r,
        **realized_vs_theoretical(before, after, ideal_ratio=(1 - r) ** 2),
    })
    return model


def example_inputs(ctx: Context, technique: str) -> tuple[torch.Tensor, ...]:
    """One batch of model inputs: the first calibration batch, else the task's example inputs."""
    if ctx.calib is not None:
        return checked_batches(ctx.calib, limit=1)[0]
    if ctx.task is not None and hasattr(ctx.task, "example_inputs"):
        return tuple(ctx.task.example_inputs(2))
    raise UsageError(f"{technique} traces the model and needs one batch of example inputs: pass calib=[inputs]")


def _group_ratios(model: nn.Module, graph: DependencyGraph, cfg: ChannelPruneConfig):
    """Groups to prune with their ratio, and the groups left whole with the reason."""
    owner = {p: i for i, g in enumerate(graph.groups) for p in g.producers}
    candidate = lambda name, m: name in owner  # noqa: E731
    chosen = {n for n, _ in select_modules(model, candidate=candidate, include=cfg.include)}
    kept = {n for n, _ in select_modules(model, candidate=candidate, exclude=cfg.exclude)}
    _require_rules_match(model, cfg.per_layer, owner)
    ratios: dict[int, float] = {}
    skipped: list[dict[str, str]] = []
    for i, group in enumerate(graph.groups):
        if not any(p in chosen for p in group.producers) or not all(p in kept for p in group.producers):
            continue
        if group.unsupported:
            if cfg.on_unsupported == "error" or cfg.include:
                raise UsageError(
                    f"{TECHNIQUE}: cannot prune the group of '{group.name}' ({group.size} channels): "
                    f"{group.unsupported[0]}. Exclude it (exclude=['{group.name}']) or set "
                    f"on_unsupported='skip' to leave such groups whole"
                )
            skipped.append({"group": group.name, "reason": group.unsupported[0]})
            continue
        if group.blocked:
            if cfg.include:  # the user named this group explicitly
                raise UsageError(f"{TECHNIQUE}: the channels of '{group.name}' cannot be pruned: {group.blocked[0]}")
            skipped.append({"group": group.name, "reason": group.blocked[0]})
            continue
        ratios[i] = _ratio_for(model, group, cfg)
    return ratios, skipped


def _ratio_for(model: nn.Module, group: ChannelGroup, cfg: ChannelPruneConfig) -> float:
    for rule, value in cfg.per_layer.items():
        if any(rule_matches(rule, p, model.get_submodule(p)) for p in group.producers):
            return value
    return cfg.ratio


def _require_rules_match(model: nn.Module, per_layer: dict[str, float], owner: dict[str, int]) -> None:
    unmatched = [r for r in per_layer if not any(rule_matches(r, p, model.get_submodule(p)) for p in owner)]
    if unmatched:
        raise UsageError(f"{TECHNIQUE}.per_layer rule(s) matched no prunable layer: {unmatched}")


def _keep_counts(scores: dict[int, torch.Tensor], ratios: dict[int, float], cfg: ChannelPruneConfig) -> dict[int, int]:
    counts = {g: kept_count(len(s), ratios[g], cfg.round_to) for g, s in scores.items()}
    if cfg.scope == "global":
        pooled = {g: s for g, s in scores.items() if ratios[g] == cfg.ratio}  # overrides stay fixed
        counts.update(global_keep_counts(pooled, cfg.ratio, cfg.round_to))
    return counts


def plan_layers(graph: DependencyGraph, keep: dict[int, list[int]]) -> dict[str, dict[str, list[int] | None]]:
    """Per changed layer, ``{"out": kept output channels or None, "in": kept input features or None}``."""
    layers: dict[str, dict[str, list[int] | None]] = {}
    passengers = {p for group in graph.groups for p in group.passengers}
    for g, channels in keep.items():
        for name in graph.groups[g].producers:
            layers.setdefault(name, {"out": None, "in": None})["out"] = list(channels)
    for name in graph.inputs:
        kept_in = graph.input_indices(name, keep)
        if kept_in is None:
            continue
        entry = layers.setdefault(name, {"out": None, "in": None})
        if name in passengers:
            entry["out"] = kept_in  # BatchNorm / depthwise: one parameter per input channel
        else:
            entry["in"] = kept_in
    return layers


def apply_layers(model: nn.Module, layers: dict[str, dict[str, Any]], *, check_inputs: tuple[torch.Tensor, ...] | None = None) -> None:
    """Replace each named layer by its sliced version; with ``check_inputs``, run the model before
    and after and restore every layer if the output shape changed or the forward failed."""
    expected = _output_shapes(model, check_inputs) if check_inputs is not None else None
    originals = {name: model.get_submodule(name) for name in layers}
    for name, entry in layers.items():
        model.set_submodule(name, slice_module(originals[name], entry.get("out"), entry.get("in")))
    if check_inputs is None:
        return
    try:
        got = _output_shapes(model, check_inputs)
        problem = None if got == expected else f"output shapes changed from {expected} to {got}"
    except Exception as exc:  # noqa: BLE001 - any failure means a coupling the graph missed
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem is not None:
        for name, mod in originals.items():
            model.set_submodule(name, mod)
        raise UsageError(f"structured pruning would break this model ({problem}); the model is left unchanged. "
                         f"Exclude the layers involved or report the coupling pared missed")


def _output_shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        model.train(training)
    return torch.utils._pytree.tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, out)


def _rebuild(model: nn.Module, entry: Any, key: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict):
        raise InputRefused(f"artefact structure has no valid '{key}' entry: cannot rebuild the pruned layers")
    for name, spec in entry["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputRefused(f"artefact structure names layer '{name}', which the model does not have") from None
        if not isinstance(spec, dict):
            raise InputRefused(f"artefact structure entry of '{name}' is not a mapping")
        out, inp = _indices(spec.get("out"), name), _indices(spec.get("in"), name)
        limits = _limits(module)
        for kind, idx, limit in (("out", out, limits[0]), ("in", inp, limits[1])):
            if idx is not None and (not idx or max(idx) >= limit or min(idx) < 0):
                raise InputRefused(f"artefact structure: '{kind}' indices of '{name}' do not fit its {limit} channels")
        model.set_submodule(name, slice_module(module, out, inp))


def _indices(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputRefused(f"artefact structure: indices of '{name}' must be a list of integers")
    return value


def _limits(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, _CONVS):
        return module.out_channels, module.in_channels
    if isinstance(module, _NORMS):
        return module.num_features, module.num_features
    raise InputRefused(f"artefact structure asks to resize a {type(module).__name__}, which channel pruning never does")


def _taylor_grads(model: nn.Module, ctx: Context, cfg: ChannelPruneConfig) -> dict[str, torch.Tensor]:
    return accumulate_grads(model, ctx, cfg.taylor_batches, TECHNIQUE)


def accumulate_grads(model: nn.Module, ctx: Context, batches: int, technique: str) -> dict[str, torch.Tensor]:
    """Sum of loss gradients of every parameter over ``batches`` training batches of ``ctx.task``."""
    from pared.train import TrainableTask

    if not isinstance(ctx.task, TrainableTask):
        raise UsageError(f"{technique}: taylor importance needs a task with training data and a loss (TrainableTask)")
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    training = model.training
    model.eval()  # BatchNorm statistics stay as they are
    try:
        for i, (inputs, target) in enumerate(ctx.task.train_batches(32, seed=0)):
            if i >= batches:
                break
            model.zero_grad(set_to_none=True)
            ctx.task.loss(model(*inputs), target).backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    grads[n] += p.grad.detach()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
    return grads


def _facts(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    from pared.measure import count_macs, count_params

    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"params": count_params(model), "macs": count_macs(model, inputs), "bytes": state_bytes}


def realized_vs_theoretical(
    before: dict[str, float], after: dict[str, float], *, ideal_ratio: float,
    latency_ratio: float | None = None,
) -> dict[str, Any]:
    """Realized after/before ratios of params, MACs and bytes next to what theory promises.

    Theoretical (``ideal_ratio``): for channel pruning at a removed fraction r, ``(1 - r)^2``,
    since an interior layer loses r of its inputs and r of its outputs; the first and last layers
    lose only one side, so realized params and MACs sit above it. Bytes follow params. Latency's
    theoretical ratio is the realized MAC ratio (time proportional to arithmetic); the gap to the
    measured latency is what memory traffic and per-op overhead cost.

    Args:
        before / after: ``params``, ``macs`` and ``bytes`` of the model before and after.
        ideal_ratio: the theoretical after/before ratio of params and MACs.
        latency_ratio: measured after/before latency, when the caller timed both.
    """
    out: dict[str, Any] = {"before": dict(before), "after": dict(after), "realized": {}, "theoretical": {}}
    for k in ("params", "macs", "bytes"):
        if before.get(k):
            out["realized"][k] = after[k] / before[k]
            out["theoretical"][k] = ideal_ratio
    if latency_ratio is not None:
        out["realized"]["latency"] = latency_ratio
        out["theoretical"]["latency"] = out["realized"].get("macs")
    return out
