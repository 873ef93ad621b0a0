"""Unstructured pruning: zero individual weights of Linear/Conv2d layers by importance.

Two configs, one per way of pruning:

- ``MagnitudePruneConfig``: one shot, to a target sparsity per layer or over all selected layers
  (global ranking), by ``magnitude`` (|w|) or ``taylor`` (|w * grad|, gradients from a few
  training batches).
- ``GradualPruneConfig``: Zhu & Gupta's cubic schedule (2017) interleaved with fine-tuning;
  sparsity rises from ``initial_sparsity`` to ``final_sparsity`` over ``steps`` optimizer steps,
  re-pruned every ``frequency`` steps; masks are re-applied after every step.

No mask is stored anywhere: a pruned weight is an exact zero, and "pruned" is recomputed from the
zeros. Pruned layers get a gradient hook that zeroes the gradient of zero weights, so a later
``finetune`` step (a fresh optimizer) leaves them exactly zero. The hook belongs to the parameter
objects: a ``copy.deepcopy`` of the model drops it; call ``keep_zeros_`` on the copy to restore it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

from pared.apply import Context, register
from pared.cluster.weight_sharing import finetune_config
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.prune.importance import get_importance
from pared.select import rule_matches, select_modules
from pared.train import FinetuneConfig, TrainableTask, train

Scope = Literal["layer", "global"]


# ------------------------------------------------------------------------------ pure functions


def cubic_sparsity(
    step: int, *, initial: float, final: float, steps: int, frequency: int = 1, begin: int = 0
) -> float:
    """Zhu & Gupta's schedule: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / n) ** 3``.

    The sparsity changes only at pruning events ``t0, t0 + frequency, ...`` and is held in
    between; it is 0 before ``begin`` and ``final`` from ``begin + steps`` on.

    Args:
        step: optimizer steps completed.
        initial: sparsity at the first event (``s_i``).
        final: sparsity at the end (``s_f``).
        steps: length of the ramp in optimizer steps (``n * delta_t`` in the paper).
        frequency: optimizer steps between pruning events (``delta_t``).
        begin: step of the first event (``t0``).
    """
    if step < begin:
        return 0.0
    if steps <= 0 or step >= begin + steps:
        return final
    t = (step - begin) // frequency * frequency
    return final + (initial - final) * (1.0 - t / steps) ** 3


def prune_counts(sizes: dict[str, int], sparsity: dict[str, float]) -> dict[str, int]:
    """Weights to zero per layer: the fewest ``k`` with ``k / n >= sparsity`` (compared as floats,
    so 0.9 of 1000 weights is 900, and any sparsity above 0 prunes at least one weight)."""
    return {name: _fewest(n, sparsity[name]) for name, n in sizes.items()}


def _fewest(n: int, s: float) -> int:
    k = min(n, max(0, math.floor(s * n)))
    while k < n and k / n < s:
        k += 1
    while k > 0 and (k - 1) / n >= s:
        k -= 1
    return k


def keep_masks(
    weights: dict[str, torch.Tensor],
    scores: dict[str, torch.Tensor],
    sparsity: dict[str, float] | float,
    *,
    scope: Scope = "layer",
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = keep) that zero the lowest-scoring weights.

    A weight that is already zero is never kept and is pruned first, so masks only ever shrink
    and the realised sparsity is at least the requested one.

    Args:
        weights: layer name -> weight tensor.
        scores: layer name -> importance, shaped like the weight (higher = more important).
        sparsity: the fraction to zero, one number or one per layer (``scope="layer"`` only).
        scope: ``layer`` ranks within each layer; ``global`` ranks all layers together and
            zeros the fewest weights that reach ``sparsity`` of their total.
    """
    ranked = {n: torch.where(w == 0, float("-inf"), scores[n].double()).flatten() for n, w in weights.items()}
    if scope == "global":
        if not isinstance(sparsity, (int, float)):
            raise UsageError("global pruning takes one overall sparsity, not one per layer")
        names = list(ranked)
        flat = torch.cat([ranked[n] for n in names])
        k = prune_counts({"all": flat.numel()}, {"all": float(sparsity)})["all"]
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[torch.argsort(flat, stable=True)[:k]] = False
        out, start = {}, 0
        for n in names:
            size = ranked[n].numel()
            out[n] = keep[start : start + size].reshape(weights[n].shape) & (weights[n] != 0)
            start += size
        return out
    per_layer = sparsity if isinstance(sparsity, dict) else dict.fromkeys(weights, float(sparsity))
    counts = prune_counts({n: w.numel() for n, w in weights.items()}, per_layer)
    out = {}
    for n, r in ranked.items():
        keep = torch.ones(r.numel(), dtype=torch.bool, device=r.device)
        keep[torch.argsort(r, stable=True)[: counts[n]]] = False
        out[n] = keep.reshape(weights[n].shape) & (weights[n] != 0)
    return out


def sparsity_of(t: torch.Tensor) -> float:
    """Fraction of exact zeros in ``t``."""
    return float((t == 0).sum()) / max(t.numel(), 1)


# ------------------------------------------------------------------------------ configs


def _check_sparsity(what: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise UsageError(f"{what} must be in [0, 1), got {value!r}")


@register_config("magnitude_prune")
@dataclasses.dataclass
class MagnitudePruneConfig(BaseConfig):
    """One-shot unstructured pruning of Linear/Conv2d weights.

    Attributes:
        sparsity: fraction of weights to zero, in [0, 1).
        per_layer: ``{rule: sparsity}`` overriding ``sparsity`` for the layers a selection rule
            matches (first matching rule wins); ``scope="layer"`` only.
        scope: ``layer`` (each layer reaches its sparsity) or ``global`` (one ranking over all
            selected layers: layers with small weights lose more).
        importance: ``magnitude`` (|w|) or ``taylor`` (|w * grad|, needs a ``TrainableTask``).
        importance_batches: training batches whose gradients ``taylor`` sums.
        include: layer-selection rules (``pared.select``); empty means every Linear and Conv2d.
        exclude: rules for layers left dense.
    """

    sparsity: float = 0.5
    per_layer: dict[str, float] = dataclasses.field(default_factory=dict)
    scope: Scope = "layer"
    importance: Literal["magnitude", "taylor"] = "magnitude"
    importance_batches: int = 8
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        _check_sparsity("magnitude_prune.sparsity", self.sparsity)
        for rule, s in self.per_layer.items():
            _check_sparsity(f"magnitude_prune.per_layer[{rule!r}]", s)
        if self.per_layer and self.scope == "global":
            raise UsageError("magnitude_prune: per_layer sparsities need scope='layer'")
        if self.importance_batches < 1:
            raise UsageError(f"magnitude_prune.importance_batches must be >= 1, got {self.importance_batches}")


@register_config("gradual_prune")
@dataclasses.dataclass
class GradualPruneConfig(BaseConfig):
    """Gradual magnitude pruning (Zhu & Gupta) while fine-tuning on the task's training data.

    Attributes:
        initial_sparsity: sparsity at the first pruning event, in [0, 1).
        final_sparsity: sparsity reached at ``begin_step + steps``, in [0, 1).
        per_layer: ``{rule: final sparsity}`` for the layers a rule matches (first match wins);
            each such layer ramps from ``min(initial_sparsity, its final)`` to its final.
        steps: optimizer steps over which sparsity ramps up.
        frequency: optimizer steps between pruning events.
        begin_step: optimizer step of the first pruning event.
        scope: ``layer`` or ``global`` ranking (see ``MagnitudePruneConfig``).
        importance: ``magnitude`` or ``taylor`` (gradients summed since the previous event).
        include: layer-selection rules; empty means every Linear and Conv2d.
        exclude: rules for layers left dense.
        finetune: ``FinetuneConfig`` fields of the training run (``{"lr": 1e-3, "steps": 2000}``).
            ``steps`` 0 or absent trains exactly ``begin_step + steps``; more steps recover at
            the final sparsity.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    per_layer: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: int = 1000
    frequency: int = 50
    begin_step: int = 0
    scope: Scope = "layer"
    importance: Literal["magnitude", "taylor"] = "magnitude"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        _check_sparsity("gradual_prune.initial_sparsity", self.initial_sparsity)
        _check_sparsity("gradual_prune.final_sparsity", self.final_sparsity)
        for rule, s in self.per_layer.items():
            _check_sparsity(f"gradual_prune.per_layer[{rule!r}]", s)
        if self.per_layer and self.scope == "global":
            raise UsageError("gradual_prune: per_layer sparsities need scope='layer'")
        if self.steps < 0 or self.frequency < 1 or self.begin_step < 0:
            raise UsageError("gradual_prune: steps and begin_step must be >= 0 and frequency >= 1")
        ft = self.training()
        if ft.steps and ft.steps < self.begin_step + self.steps:
            raise UsageError(
                f"gradual_prune: finetune.steps={ft.steps} ends before the schedule does "
                f"(begin_step + steps = {self.begin_step + self.steps})"
            )

    def training(self) -> FinetuneConfig:
        """The training run's ``FinetuneConfig`` (``steps`` filled in from the schedule)."""
        ft = finetune_config(self.finetune, "gradual_prune.finetune")
        if ft.steps == 0:
            ft = dataclasses.replace(ft, steps=max(self.begin_step + self.steps, 1))
        return ft


# ------------------------------------------------------------------------------ plumbing


def _candidate(_name: str, m: nn.Module) -> bool:
    return type(m) in (nn.Linear, nn.Conv2d)


def _selected(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...], what: str) -> dict[str, nn.Module]:
    chosen = select_modules(model, candidate=_candidate, include=include, exclude=exclude)
    if not chosen:
        raise UsageError(f"{what}: no Linear or Conv2d layer is selected in this model")
    for name, m in chosen:
        if not torch.isfinite(m.weight).all():
            raise InputRefused(f"{what}: weight of layer {name!r} contains NaN or inf")
    return dict(chosen)


def _layer_targets(
    layers: dict[str, nn.Module], default: float, per_layer: dict[str, float], what: str
) -> dict[str, float]:
    unmatched = [r for r in per_layer if not any(rule_matches(r, n, m) for n, m in layers.items())]
    if unmatched:
        raise UsageError(f"{what}: per-layer rule(s) matched no selected layer: {unmatched}")
    out = {}
    for name, m in layers.items():
        out[name] = next((s for r, s in per_layer.items() if rule_matches(r, name, m)), default)
    return out


def keep_zeros_(model: nn.Module, names: list[str] | None = None) -> None:
    """Make every later gradient of a zero weight zero, so fine-tuning keeps pruned weights zero.

    Args:
        model: the pruned model.
        names: layers whose ``weight`` to guard; None means every Linear and Conv2d.
    """
    for name, m in model.named_modules():
        if (names is None and _candidate(name, m)) or (names is not None and name in names):
            w = m.weight
            if w.requires_grad and not getattr(w, "_pared_keep_zeros", False):
                w.register_hook(_ZeroWhereZero(w))
                w._pared_keep_zeros = True  # type: ignore[attr-defined]


class _ZeroWhereZero:
    """Gradient hook: the gradient of a weight that is exactly zero is zero."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.weight.detach() == 0, 0.0)


def _apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in layers.items():
            # masked_fill writes +0.0; multiplying by the mask would leave -0.0 for negative
            # weights, which sparse storage (it compares bit patterns) would keep as values.
            m.weight.masked_fill_(~masks[name].to(m.weight.device), 0.0)


def _taylor_grads(model: nn.Module, layers: dict[str, nn.Module], task: Any, batches: int) -> dict[str, torch.Tensor]:
    if not isinstance(task, TrainableTask):
        raise UsageError("taylor importance needs a task with training data (a TrainableTask)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # gradients only: BatchNorm statistics must not move
    for m in layers.values():
        m.weight.grad = None
    seen = 0
    for inputs, target in task.train_batches(64, seed=0):
        if seen >= batches:
            break
        out = model(*(t.to(device) for t in inputs))
        task.loss(out, target.to(device) if isinstance(target, torch.Tensor) else target).backward()
        seen += 1
    if seen == 0:
        raise UsageError("taylor importance: the task yields no training batches")
    grads = {n: torch.zeros_like(m.weight) if m.weight.grad is None else m.weight.grad.detach().clone()
             for n, m in layers.items()}  # a layer the loss does not reach has zero gradient
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grads


def _summary(technique: str, layers: dict[str, nn.Module], targets: dict[str, float]) -> dict[str, Any]:
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return {
        "technique": technique,
        "layers": [{"layer": n, "target": round(targets[n], 6), "sparsity": round(sparsity_of(m.weight), 6),
                    "weights": m.weight.numel()} for n, m in layers.items()],
        "overall_sparsity": zeros / max(total, 1),
    }


@register(MagnitudePruneConfig)
def _apply_magnitude(model: nn.Module, cfg: MagnitudePruneConfig, ctx: Context) -> nn.Module:
    layers = _selected(model, cfg.include, cfg.exclude, "magnitude_prune")
    targets = _layer_targets(layers, cfg.sparsity, cfg.per_layer, "magnitude_prune")
    if ctx.skeleton:
        return model  # shapes are unchanged; the saved zeros are the pruning
    score = get_importance(cfg.importance)
    grads = _taylor_grads(model, layers, ctx.task, cfg.importance_batches) if cfg.importance == "taylor" else {}
    weights = {n: m.weight.detach() for n, m in layers.items()}
    scores = {n: score(w, grads.get(n)) for n, w in weights.items()}
    masks = keep_masks(weights, scores, cfg.sparsity if cfg.scope == "global" else targets, scope=cfg.scope)
    _apply_masks(layers, masks)
    keep_zeros_(model, list(layers))
    ctx.summary.append(_summary("magnitude_prune", layers, targets))
    return model


class GradualPruner:
    """The ``after_step`` hook of a gradual run: re-prunes on schedule and keeps masks applied.

    With ``taylor`` importance, gradients are summed between pruning events by hooks on the
    weights; an event with no gradients yet (the one before the first step) measures them on a
    few training batches of ``task``. Call ``close()`` afterwards to remove the hooks.
    """

    def __init__(self, layers: dict[str, nn.Module], finals: dict[str, float], cfg: GradualPruneConfig,
                 *, task: Any = None) -> None:
        self.layers, self.finals, self.cfg, self.task = layers, finals, cfg, task
        self.score = get_importance(cfg.importance)
        self.applied = -1.0  # the schedule value the current masks implement
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
        self.grads: dict[str, torch.Tensor] = {}
        self.fresh_grads = False
        self.handles = []
        if cfg.importance == "taylor":
            for n, m in layers.items():
                self.grads[n] = torch.zeros_like(m.weight)
                self.handles.append(m.weight.register_hook(lambda g, n=n: self._accumulate(n, g)))

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        self.grads[name].add_(grad.detach())
        self.fresh_grads = True

    def targets(self, step: int) -> dict[str, float]:
        """Per-layer sparsity the schedule asks for after ``step`` optimizer steps."""
        c = self.cfg
        return {n: cubic_sparsity(step, initial=min(c.initial_sparsity, f), final=f, steps=c.steps,
                                  frequency=c.frequency, begin=c.begin_step) for n, f in self.finals.items()}

    def __call__(self, step: int, model: nn.Module) -> None:
        c = self.cfg
        # The schedule's shape alone (0 -> 1): it changes exactly at the pruning events.
        level = cubic_sparsity(step, initial=0.0, final=1.0, steps=c.steps, frequency=c.frequency,
                               begin=c.begin_step)
        if step >= c.begin_step and level != self.applied:
            self.applied = level
            targets = self.targets(step)
            weights = {n: m.weight.detach() for n, m in self.layers.items()}
            grads = self.grads
            if c.importance == "taylor" and not self.fresh_grads:
                grads = _taylor_grads(model, self.layers, self.task, 8)
            scores = {n: self.score(w, grads.get(n)) for n, w in weights.items()}
            total = sum(w.numel() for w in weights.values())
            overall = sum(targets[n] * w.numel() for n, w in weights.items()) / total
            self.masks = keep_masks(weights, scores, overall if c.scope == "global" else targets, scope=c.scope)
            for g in self.grads.values():
                g.zero_()
            self.fresh_grads = False
        _apply_masks(self.layers, self.masks)

    def close(self) -> None:
        """Remove the gradient hooks of ``taylor`` importance."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


@register(GradualPruneConfig)
def _apply_gradual(model: nn.Module, cfg: GradualPruneConfig, ctx: Context) -> nn.Module:
    layers = _selected(model, cfg.include, cfg.exclude, "gradual_prune")
    finals = _layer_targets(layers, cfg.final_sparsity, cfg.per_layer, "gradual_prune")
    if ctx.skeleton:
        return model
    if not isinstance(ctx.task, TrainableTask):
        raise UsageError("gradual_prune fine-tunes while pruning: it needs a task with training data "
                         "(a TrainableTask)")
    pruner = GradualPruner(layers, finals, cfg, task=ctx.task)
    try:
        pruner(0, model)  # the event at step 0 (when begin_step is 0) prunes before the first update
        keep_zeros_(model, list(layers))
        result = train(model, ctx.task, cfg.training(), after_step=[pruner], progress=False)
    finally:
        pruner.close()
    summary = _summary("gradual_prune", layers, finals)
    summary["finetune"] = {"steps": result.steps, "final_loss": result.final_loss}
    ctx.summary.append(summary)
    return model
