"""Student construction: a shallower copy of a transformer (or block stack) initialised from its
teacher's weights.

``compress_(model, DropLayersConfig(every=2))`` keeps every second layer of the model's layer
stack (``bert.encoder.layer`` in a Hugging Face BERT-style encoder, or any ``nn.ModuleList`` /
``nn.Sequential`` of same-class blocks) and removes the rest; the kept layers keep their trained
weights, so distillation (``pared.distill``) starts from a model that is already close. Narrower
students come from the transformer pruning step (``prune_transformer``: fewer heads, smaller
FFN), which also keeps the teacher's weights; a recipe chains the two.

The step is pure structure: the same config rebuilds the same student from a fresh teacher, so
artefact reloading (skeleton replay) needs nothing recorded.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from pared.apply import Context, register
from pared.config import BaseConfig, register_config
from pared.errors import UsageError

TECHNIQUE = "drop_layers"


@register_config(TECHNIQUE)
@dataclasses.dataclass
class DropLayersConfig(BaseConfig):
    """Keep a subset of a layer stack's layers (exactly one of ``every`` and ``keep``).

    Attributes:
        every: keep every k-th layer counting from 1: layers k, 2k, ... (0-based k-1, 2k-1, ...),
            so the last layer stays when k divides the depth (6 layers, every=2: 1, 3, 5).
        keep: 0-based indices of the layers to keep, in increasing order.
        stack: dotted name of the ``ModuleList`` / ``Sequential`` holding the layers; empty
            finds it (``layer_stack``).
    """

    every: int = 0
    keep: tuple[int, ...] = ()
    stack: str = ""

    def validate(self) -> None:
        if (self.every > 0) == bool(self.keep):
            raise UsageError(
                "drop_layers: give exactly one of every (>= 1) and keep (a list of layer indices)"
            )
        if self.every < 0:
            raise UsageError(f"drop_layers.every must be >= 1, got {self.every}")
        if any(i < 0 for i in self.keep):
            raise UsageError(f"drop_layers.keep holds 0-based layer indices, got {list(self.keep)}")
        if list(self.keep) != sorted(set(self.keep)):
            raise UsageError(
                f"drop_layers.keep must be increasing without repeats, got {list(self.keep)}"
            )


def layer_stack(model: nn.Module, name: str = "") -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The model's stack of transformer layers or repeated blocks, and its dotted name.

    Without ``name``: ``*.encoder.layer`` (Hugging Face BERT-style encoders) when present,
    otherwise the longest ``ModuleList`` / ``Sequential`` whose children (at least 2) all have one
    class that holds parameters.

    Raises:
        UsageError: no stack, several equally long candidates, or ``name`` is not a stack.
    """
    if name:
        try:
            stack = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"drop_layers.stack: no module named {name!r}") from None
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
            raise UsageError(
                f"drop_layers.stack: {name!r} is a {type(stack).__name__}, not a ModuleList or Sequential"
            )
        return name, stack
    candidates = [(n, m) for n, m in model.named_modules() if _is_stack(m)]
    hf = [(n, m) for n, m in candidates if n == "encoder.layer" or n.endswith(".encoder.layer")]
    if len(hf) == 1:
        return hf[0]
    if not candidates:
        raise UsageError(
            f"no layer stack in {type(model).__name__}: no ModuleList/Sequential of same-class blocks; name one with stack="
        )
    longest = max(len(m) for _, m in candidates)
    best = [(n, m) for n, m in candidates if len(m) == longest]
    if len(best) > 1:
        names = ", ".join(n or "<root>" for n, _ in best)
        raise UsageError(
            f"several layer stacks of {longest} layers ({names}); choose one with stack="
        )
    return best[0]


def _is_stack(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
        return False
    kinds = {type(child) for child in module}
    return len(kinds) == 1 and any(True for _ in module[0].parameters())


def kept_layers(depth: int, cfg: DropLayersConfig, stack_name: str = "layers") -> list[int]:
    """0-based indices ``cfg`` keeps of a ``depth``-layer stack (pure).

    Raises:
        UsageError: ``keep`` names a layer that does not exist, or nothing would remain.
    """
    if cfg.keep:
        unknown = [i for i in cfg.keep if i >= depth]
        if unknown:
            raise UsageError(
                f"drop_layers.keep names layer(s) {unknown}, but {stack_name} has {depth} (0-{depth - 1})"
            )
        return list(cfg.keep)
    kept = list(range(cfg.every - 1, depth, cfg.every))
    if not kept:
        raise UsageError(
            f"drop_layers.every={cfg.every} keeps no layer of {stack_name}, which has {depth}"
        )
    return kept


def drop_layers(model: nn.Module, cfg: DropLayersConfig) -> tuple[nn.Module, dict[str, object]]:
    """Remove the layers ``cfg`` does not keep, in place; returns the model and a summary."""
    name, stack = layer_stack(model, cfg.stack)
    depth = len(stack)
    kept = kept_layers(depth, cfg, name or "the model")
    smaller = (
        type(stack)(*[stack[i] for i in kept])
        if isinstance(stack, nn.Sequential)
        else nn.ModuleList([stack[i] for i in kept])
    )
    if name:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, smaller)
    else:
        model = smaller
    _update_hf_config(model, smaller)
    return model, {"technique": TECHNIQUE, "stack": name, "layers_before": depth, "kept": kept}


def _update_hf_config(model: nn.Module, stack: nn.Module) -> None:
    """Keep ``config.num_hidden_layers`` truthful, so saved HF configs and exports agree."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(stack)
    # transformers tags attention modules with their layer index (for KV caches); renumber them
    # 0..n-1 like a model built with n layers.
    for j, layer in enumerate(stack):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j


@register(DropLayersConfig)
def _apply_drop_layers(model: nn.Module, cfg: DropLayersConfig, ctx: Context) -> nn.Module:
    model, summary = drop_layers(model, cfg)
    if not ctx.skeleton:
        ctx.summary.append(summary)
    return model
