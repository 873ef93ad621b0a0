"""The search space: techniques declare what they can try; the search only combines them.

A technique joins ``pared search`` by registering a *space function* next to its config:

    from pared.search.space import register_space

    @register_space("lowrank", slot="structure", order=20)
    def lowrank_space(trial, info):
        if not info.layers_of("Linear"):
            return None                      # not applicable to this model
        return LowRankConfig(rank_ratio=trial.suggest_float("lowrank.rank_ratio", 0.2, 0.8))

``trial`` is anything with Optuna's ``suggest_float`` / ``suggest_int`` / ``suggest_categorical``
(this module does not import Optuna, so technique modules can register cheaply). A space
function returns a config, a list of configs, or None (nothing to add for this model).

Spaces share a *slot* when they are alternatives (one quantizer per recipe, one structural
pruner): the trial first picks one member of each slot, or ``none``, then that member's knobs.
Slots run in ``order``, so a recipe is always prune -> recover -> quantize, whatever was picked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from torch import nn

from pared.config import BaseConfig
from pared.errors import UsageError

NONE = "none"


class TrialLike(Protocol):
    """The part of ``optuna.trial.Trial`` a space function may use. ``params`` holds what was
    drawn so far in this trial (earlier slots come first), e.g. ``params["prune"]``."""

    @property
    def params(self) -> dict[str, Any]: ...

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a space function may know about the model before any trial runs.

    Attributes:
        task: the task name.
        layers: ``{layer name: module type name}`` of every Linear, Conv2d and Embedding.
        in_features: ``{Linear name: input width}`` (group sizes must divide it).
        weights: ``{layer name: weight elements}`` (a layer cannot have more clusters than weights).
        attention: the model has attention blocks (BERT-style or ``nn.MultiheadAttention``).
        trainable: the task provides training data (fine-tuning steps are possible).
        groups: layer groups for per-group choices: each transformer block
            (``encoder.layer.3``), else each layer; ``group_rule`` turns one into a selection rule.
        sensitivity: ``{group: {"int8": drop, "prune50": drop}}`` measured before the search
            (empty when not measured); spaces use it to offer per-group choices only where
            they matter.
        hf_attention: the attention goes through transformers' attention interface (what
            ``Int8Config(attention=True)`` needs).
    """

    task: str
    layers: dict[str, str]
    in_features: dict[str, int]
    attention: bool
    trainable: bool
    groups: tuple[str, ...]
    sensitivity: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    weights: dict[str, int] = dataclasses.field(default_factory=dict)
    hf_attention: bool = False

    def layers_of(self, *kinds: str) -> list[str]:
        """Names of the layers whose type is one of ``kinds``."""
        return [name for name, kind in self.layers.items() if kind in kinds]

    def group_rule(self, group: str) -> str:
        """A ``pared.select`` rule matching the layers of ``group``."""
        return group if group in self.layers else f"{group}.*"

    def most_sensitive(self, key: str, k: int) -> list[str]:
        """Up to ``k`` groups whose measured ``key`` drop is largest and positive, worst first."""
        scored = [(v.get(key, 0.0), g) for g, v in self.sensitivity.items() if v.get(key, 0.0) > 0]
        return [g for _, g in sorted(scored, reverse=True)[:k]]


SpaceFn = Callable[[TrialLike, ModelInfo], "BaseConfig | list[BaseConfig] | None"]


@dataclasses.dataclass(frozen=True)
class Space:
    """One registered space function and where its configs go in a recipe."""

    name: str
    fn: SpaceFn
    slot: str
    order: int


_SPACES: dict[str, Space] = {}


def register_space(name: str, *, slot: str | None = None, order: int = 50) -> Callable[[SpaceFn], SpaceFn]:
    """Decorator: offer a technique to ``pared search`` under ``name``.

    Args:
        name: what ``--techniques`` calls it (usually the config's technique name).
        slot: spaces sharing a slot are alternatives (at most one per recipe); default: its own.
        order: recipe position of the slot (lower runs first: pruning 10-20, recovery 30,
            quantization 40); every member of a slot must use the same order.
    """

    def deco(fn: SpaceFn) -> SpaceFn:
        space = Space(name, fn, slot or name, order)
        if name in _SPACES and _SPACES[name].fn is not fn:
            raise RuntimeError(f"search space {name!r} registered twice")
        clash = [s.name for s in _SPACES.values() if s.slot == space.slot and s.order != order]
        if clash:
            raise RuntimeError(f"search space {name!r}: slot {space.slot!r} already has order from {clash}")
        _SPACES[name] = space
        return fn

    return deco


def registered_spaces() -> dict[str, Space]:
    """Every space function registered so far (importing ``pared.search`` registers the built-ins)."""
    return dict(_SPACES)


def select_spaces(names: Iterable[str] | None, info: ModelInfo) -> dict[str, list[Space]]:
    """The slots of the search, ``{slot: [spaces]}`` in recipe order.

    A space is kept when it is named in ``names`` (all when None) and applies to the model
    (its function returns something for a probe trial).

    Raises:
        UsageError: an unknown name, or nothing left to search.
    """
    wanted = list(names) if names is not None else list(_SPACES)
    unknown = [n for n in wanted if n not in _SPACES]
    if unknown:
        raise UsageError(f"unknown technique(s) in the search space: {unknown}; known: {sorted(_SPACES)}")
    kept = [_SPACES[n] for n in wanted if _SPACES[n].fn(_Probe(), info) is not None]
    if not kept:
        raise UsageError(f"empty search space: none of {wanted} applies to {info.task}")
    slots: dict[str, list[Space]] = {}
    for space in sorted(kept, key=lambda s: (s.order, s.slot, s.name)):
        slots.setdefault(space.slot, []).append(space)
    return slots


def build_recipe(trial: TrialLike, slots: dict[str, list[Space]], info: ModelInfo) -> list[BaseConfig]:
    """One recipe: for each slot pick a member (or none), then let it suggest its knobs."""
    recipe: list[BaseConfig] = []
    for slot, spaces in slots.items():
        choice = trial.suggest_categorical(slot, [NONE, *(s.name for s in spaces)])
        if choice == NONE:
            continue
        out = next(s for s in spaces if s.name == choice).fn(trial, info)
        recipe.extend([] if out is None else [out] if isinstance(out, BaseConfig) else out)
    return recipe


def model_info(task_name: str, model: nn.Module, *, trainable: bool,
               sensitivity: dict[str, dict[str, float]] | None = None) -> ModelInfo:
    """``ModelInfo`` of a float model (its structure only; nothing is run)."""
    layers: dict[str, str] = {}
    in_features: dict[str, int] = {}
    weights: dict[str, int] = {}
    attention = False
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            layers[name] = type(m).__name__
            weights[name] = m.weight.numel()
        if isinstance(m, nn.Linear):
            in_features[name] = m.in_features
        if isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("SelfAttention"):
            attention = True
    hf_attention = attention and any(hasattr(getattr(m, "config", None), "_attn_implementation") for m in model.modules())
    return ModelInfo(task_name, layers, in_features, attention, trainable, _groups(layers), sensitivity or {}, weights,
                     hf_attention)


_BLOCK = re.compile(r"^(.*?\.layers?\.\d+)\.")  # HF/PyTorch transformer blocks: encoder.layer.3.*


def _groups(layers: dict[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in layers:
        match = _BLOCK.match(name)
        group = match.group(1) if match else name
        if group not in out:
            out.append(group)
    return tuple(out)


class _Probe:
    """A trial that answers every suggestion with its first or lowest value: used to ask a space
    function whether it applies to a model, without recording anything."""

    params: dict[str, Any] = {}  # nothing drawn yet: a space must not depend on it to apply

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return low

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return low

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[0]
