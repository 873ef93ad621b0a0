"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019).

For two layers joined only by a positively homogeneous function ``f`` (ReLU, LeakyReLU, max-pool,
identity: ``f(s x) = s f(x)`` for ``s > 0``), scaling output channel ``i`` of the first layer by
``1 / s_i`` and input channel ``i`` of the second by ``s_i`` leaves the float model unchanged.
With ``s_i = sqrt(r1_i / r2_i)`` (``r1_i``: max |weight| of the first layer's output channel,
``r2_i``: of the second layer's input channel) both channels end with the range
``sqrt(r1_i r2_i)``. Per-channel int8 then wastes less of the grid on the second layer's small
input channels, and the first layer's activations are no longer dominated by one wide channel.

BatchNorms are folded into their convolutions first (the scale has to pass through them), and
pairs are found with ``torch.fx``: a model that does not trace is refused by name.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx, nn

from pared.apply import Context, register
from pared.config import BaseConfig, register_config
from pared.errors import UsageError
from pared.quant.batchnorm import fold_batchnorms
from pared.select import select_modules

# Modules and functions with f(s x) = s f(x) for s > 0, per channel.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.Identity, nn.Dropout)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.max_pool2d)
# Scales are kept within this factor of 1: a channel that is dead in one layer must not blow up
# the other's weights.
_MAX_SCALE = 1e4


@register_config("cle")
@dataclasses.dataclass
class CrossLayerEqualizationConfig(BaseConfig):
    """Equalize per-channel weight ranges of consecutive Conv2d/Linear pairs (apply before ``int8``).

    Attributes:
        iterations: at most this many sweeps over all pairs (a layer in two pairs, as in a chain
            conv1 -> conv2 -> conv3, needs a few sweeps to settle).
        tolerance: stop once no scale in a sweep differs from 1 by more than this.
        include: layer-selection rules (``pared.select``); a pair is equalized when both its
            layers are selected. Empty means every Conv2d and Linear.
        exclude: rules for layers left as they are.
    """

    iterations: int = 20
    tolerance: float = 1e-4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.iterations < 1:
            raise UsageError(f"cle.iterations must be >= 1, got {self.iterations}")
        if not self.tolerance > 0:
            raise UsageError(f"cle.tolerance must be > 0, got {self.tolerance}")


def equalization_scales(out_range: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """``s = sqrt(r1 / r2)`` per channel (pure function); channels with a zero range keep ``s = 1``."""
    alive = (out_range > 0) & (in_range > 0)
    s = torch.sqrt(out_range / torch.where(alive, in_range, torch.ones_like(in_range)))
    return torch.where(alive, s, torch.ones_like(s)).clamp(1 / _MAX_SCALE, _MAX_SCALE)


def _output_range(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().abs().flatten(1).amax(dim=1)


def _input_dim(layer: nn.Module) -> int:
    """The weight dimension that indexes ``layer``'s input channels (0 for a depthwise conv)."""
    return 0 if isinstance(layer, nn.Conv2d) and layer.groups > 1 else 1


def _input_range(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().abs()
    dim = _input_dim(layer)
    return w.transpose(0, dim).flatten(1).amax(dim=1)


@torch.no_grad()
def equalize_pair_(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """Rescale ``first``'s output channels and ``second``'s input channels in place; returns ``s``."""
    s = equalization_scales(_output_range(first), _input_range(second))
    shape = [-1] + [1] * (first.weight.dim() - 1)
    first.weight.div_(s.reshape(shape))
    if first.bias is not None:
        first.bias.div_(s)
    in_shape = [1] * second.weight.dim()
    in_shape[_input_dim(second)] = -1
    second.weight.mul_(s.reshape(in_shape))
    return s


def find_pairs(model: nn.Module, selected: set[str]) -> list[tuple[str, str]]:
    """``(first, second)`` layer names joined only by homogeneous functions in ``model``'s fx graph.

    Both layers must be in ``selected``, every intermediate result must have one user, the channel
    counts must match, and a grouped second conv must be depthwise (each input channel feeds its
    own output channel).
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no graph to search
        raise UsageError(f"cle needs a torch.fx-traceable model: {type(exc).__name__}: {exc}") from None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        first = _layer_at(node, modules, selected)
        if first is None:
            continue
        cur = node
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.args[:1] != (cur,):
                break
            second = _layer_at(user, modules, selected)
            if second is not None:
                if _channels_fit(modules[first], modules[second]):
                    pairs.append((first, second))
                break
            if not _is_homogeneous(user, modules):
                break
            cur = user
    return pairs


def _layer_at(node: fx.Node, modules: dict[str, nn.Module], selected: set[str]) -> str | None:
    if node.op == "call_module" and node.target in selected and type(modules[node.target]) in (nn.Conv2d, nn.Linear):
        return str(node.target)
    return None


def _is_homogeneous(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _channels_fit(first: nn.Module, second: nn.Module) -> bool:
    out_channels = first.weight.shape[0]
    if isinstance(second, nn.Conv2d):
        if second.groups == 1:
            return second.in_channels == out_channels
        return second.groups == second.in_channels == second.out_channels == out_channels
    return isinstance(first, nn.Linear) and second.in_features == out_channels


@register(CrossLayerEqualizationConfig)
def _apply_cle(model: nn.Module, cfg: CrossLayerEqualizationConfig, ctx: Context) -> nn.Module:
    model.eval()
    folded = fold_batchnorms(model)
    chosen = select_modules(
        model, candidate=lambda n, m: type(m) in (nn.Conv2d, nn.Linear), include=cfg.include, exclude=cfg.exclude
    )
    pairs = find_pairs(model, {n for n, _ in chosen})
    sweeps = 0
    if not ctx.skeleton:  # only weights change: a skeleton rebuild loads them from the state_dict
        modules = dict(model.named_modules())
        for sweeps in range(1, cfg.iterations + 1):
            change = 0.0
            for a, b in pairs:
                s = equalize_pair_(modules[a], modules[b])
                change = max(change, float((s - 1).abs().max()))
            if change <= cfg.tolerance:
                break
    ctx.summary.append({
        "technique": "cle",
        "pairs": [list(p) for p in pairs],
        "sweeps": sweeps,
        "folded_batchnorm": folded,
    })
    return model


def range_spread(layer: nn.Module) -> float:
    """max over min of the per-output-channel weight ranges (1 means perfectly equalized)."""
    r = _output_range(layer)
    r = r[r > 0]
    return float(r.max() / r.min()) if r.numel() else 1.0

