"""Which channels must be removed together: a dependency graph traced with ``torch.fx``.

Removing output channel ``c`` of a Conv2d also removes channel ``c`` of the BatchNorm after it,
input channel ``c`` of every conv or Linear that reads it, and, through a residual ``add``,
channel ``c`` of every other producer feeding that add. ``build_dependency_graph`` traces the
model once and returns these couplings as ``ChannelGroup`` objects, the unit of work of
structured pruning: a group is pruned as a whole or not at all.

How it works: every prunable producer (``nn.Linear``, or ``nn.Conv1d/2d/3d`` with ``groups=1``)
opens a *channel space*. Walking the graph in order, each tensor carries a ``Layout``: which
spaces its tracked dimension is made of (one segment per space, several after ``torch.cat``;
``flatten`` turns channel ``c`` into a block of ``H*W`` features). Element-wise ops pass layouts
on; an ``add``/``mul`` of two tracked tensors merges their spaces (union-find); convs and Linears
record the layout they consume. A group is a merged set of spaces.

What is refused, never guessed: any op this file does not know that touches a tracked
dimension (a custom layer, an indexing op, a ``view`` to a hard-coded size, a grouped conv, a
norm over channels) marks every space involved as *blocked*, naming the node. So are spaces that
reach the model output (the final layer's outputs are never pruned) and spaces combined with
a tensor pared cannot slice. Network inputs open no space, so they are never pruned.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pared.errors import UsageError

OUTPUT_REASON = "reaches the model output"

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each element (or each channel alone) and keep every dimension.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d,
)  # fmt: skip
# Spatial pooling keeps dim 1 (channels); valid only when dim 1 is the tracked one.
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid,
    F.mish, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout2d, torch.abs,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "abs", "float", "detach", "sigmoid_",
    "tanh_",
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
}  # fmt: skip
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    operator.isub, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_SHAPE_ONLY_METHODS = {"size", "dim"}  # results are ints, never tensors


@dataclasses.dataclass(frozen=True)
class Segment:
    """``size`` channels of one space along a tensor dimension, ``repeat`` features per channel.

    ``space`` is None for features that belong to no prunable producer (a network input that was
    concatenated in); those are always kept. After ``flatten`` channel ``c`` of a (B, C, H, W)
    tensor covers features ``c*H*W .. (c+1)*H*W - 1``, so ``repeat`` is ``H*W``.
    """

    space: int | None
    size: int
    repeat: int = 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the tracked dimension ``dim`` of a tensor is made of, in order."""

    dim: int
    segments: tuple[Segment, ...]

    @property
    def features(self) -> int:
        return sum(s.size * s.repeat for s in self.segments)


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are removed together.

    Attributes:
        size: channels in the group (every producer has this many outputs).
        producers: layers whose output channels (dim 0 of the weight) form the group.
        passengers: layers with one parameter per channel, sliced with it (BatchNorm, depthwise conv).
        consumers: layers whose input features include the group's channels.
        blocked: fixed couplings that keep the group whole (it reaches the model output, or is
            added to the network input); such groups are skipped and listed.
        unsupported: nodes pared cannot follow that touch the group's channels (a custom layer,
            an indexing op, a ``view`` to a literal size); pruning such a group is an error.
    """

    size: int
    producers: list[str]
    passengers: list[str]
    consumers: list[str]
    blocked: list[str]
    unsupported: list[str]

    @property
    def name(self) -> str:
        """The first producer's qualified name; the group's name in reports and ``per_layer``."""
        return self.producers[0]

    @property
    def prunable(self) -> bool:
        return not self.blocked and not self.unsupported

    def describe(self) -> str:
        """One line: producers -> passengers -> consumers, and why it is blocked."""
        text = f"{self.size} ch: {', '.join(self.producers)}"
        if self.passengers:
            text += f" | with {', '.join(self.passengers)}"
        if self.consumers:
            text += f" -> read by {', '.join(self.consumers)}"
        if self.blocked or self.unsupported:
            text += f" [blocked: {'; '.join(self.blocked + self.unsupported)}]"
        return text


@dataclasses.dataclass
class DependencyGraph:
    """Groups of coupled channels, plus the input layout of every layer that reads a group.

    Attributes:
        groups: every group, in graph order of its first producer.
        inputs: module name -> layout of the features its input is made of (consumers and
            passengers; used to turn kept channels into kept input indices).
        space_group: space id -> index into ``groups``.
    """

    groups: list[ChannelGroup]
    inputs: dict[str, Layout]
    space_group: dict[int, int]

    def describe(self) -> str:
        """All groups, one per line."""
        return "\n".join(f"[{i}] {g.describe()}" for i, g in enumerate(self.groups))

    def input_indices(self, module: str, keep: dict[int, list[int]]) -> list[int] | None:
        """Kept input-feature indices of ``module`` given kept channels per group index, or None
        when none of its inputs changes."""
        layout = self.inputs.get(module)
        if layout is None:
            return None
        out: list[int] = []
        offset = 0
        changed = False
        for seg in layout.segments:
            group = self.space_group.get(seg.space) if seg.space is not None else None
            channels = keep.get(group) if group is not None else None
            if channels is None:
                channels = list(range(seg.size))
            else:
                changed = True
            out.extend(offset + c * seg.repeat + r for c in channels for r in range(seg.repeat))
            offset += seg.size * seg.repeat
        return out if changed else None


def build_dependency_graph(model: nn.Module, example_inputs: Sequence[Any]) -> DependencyGraph:
    """Trace ``model`` with ``torch.fx`` and group its coupled channels.

    Args:
        model: the model (not modified); its forward must be traceable by ``fx.symbolic_trace``.
        example_inputs: one batch of positional inputs (shapes decide how ``flatten`` maps channels).

    Returns:
        The ``DependencyGraph``; blocked groups say why.

    Raises:
        UsageError: the model cannot be traced.
    """
    try:
        gm = fx.GraphModule(model, _Leaves().trace(model))
    except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable code
        raise UsageError(
            f"structured pruning traces the model with torch.fx, and tracing failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            f"(make the forward traceable, or prune with a technique that does not trace)"
        ) from None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        model.train(training)
    return _Tracer(gm).run()


class _Leaves(fx.Tracer):
    """fx's tracer, also stopping at modules that declare ``pared_fx_leaf = True`` (pared's own
    layers whose forward has data-dependent branches, such as ``PrunedMultiheadAttention``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(m, "pared_fx_leaf", False)) or super().is_leaf_module(m, module_qualified_name)


class _Tracer:
    """One pass over the fx graph, propagating layouts and merging spaces."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []  # union-find over spaces
        self.space_size: list[int] = []
        self.space_of_module: dict[str, int] = {}
        self.producers: dict[int, list[str]] = {}
        self.blocked: dict[int, list[tuple[bool, str]]] = {}
        self.from_params: set[fx.Node] = set()  # untracked nodes computed from parameters only
        self.layouts: dict[fx.Node, Layout | None] = {}
        self.inputs: dict[str, list[Layout]] = {}
        self.passengers: set[str] = set()
        self.consumers: set[str] = set()

    # ------------------------------------------------------------------ union-find over spaces

    def _new_space(self, module: str, size: int) -> int:
        if module in self.space_of_module:  # a layer called twice produces the same channels
            return self.space_of_module[module]
        sid = len(self.parent)
        self.parent.append(sid)
        self.space_size.append(size)
        self.space_of_module[module] = sid
        self.producers[sid] = [module]
        return sid

    def _find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[rb] = ra

    def _block(self, layout: Layout | None, reason: str, *, unsupported: bool = True) -> None:
        """Mark every space in ``layout`` unprunable. ``unsupported``: an op pared does not
        know (an error unless the user skips such groups); otherwise a fixed coupling (the
        model output, the network input) that simply cannot change."""
        if layout is None:
            return
        for seg in layout.segments:
            if seg.space is not None:
                self.blocked.setdefault(seg.space, []).append((unsupported, reason))

    # ---------------------------------------------------------------------------------- the pass

    def run(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            self.layouts[node] = self._visit(node)
        return self._result()

    def _visit(self, node: fx.Node) -> Layout | None:
        if node.op == "get_attr":
            self.from_params.add(node)
            return None
        if node.op == "placeholder":
            return None
        if node.op == "output":
            for arg in _flat_nodes(node.args):
                self._block(self.layouts.get(arg), OUTPUT_REASON, unsupported=False)
            return None
        tracked = [(a, self.layouts.get(a)) for a in _flat_nodes((node.args, node.kwargs))]
        tracked = [(a, lay) for a, lay in tracked if lay is not None]
        if node.op == "call_module":
            return self._module(node, self.gm.get_submodule(str(node.target)))
        if not tracked:
            args = _flat_nodes((node.args, node.kwargs))
            if args and all(a in self.from_params for a in args):
                self.from_params.add(node)
            return None  # nothing prunable flows through this node
        if node.op == "call_method" and node.target in _SHAPE_ONLY_METHODS:
            return None
        if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device"):
            return None
        return self._function(node, tracked)

    def _module(self, node: fx.Node, mod: nn.Module) -> Layout | None:
        name = str(node.target)
        inp = self.layouts.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        others = [self.layouts.get(a) for a in _flat_nodes((node.args[1:], node.kwargs))]
        if any(lay is not None for lay in others):
            for lay in [inp, *others]:
                self._block(lay, _why(node, f"{type(mod).__name__} takes pruned channels in a second input"))
            return None
        if isinstance(mod, _CONVS) and mod.groups == 1:
            self._consume(node, name, inp, dim=1)
            return Layout(1, (Segment(self._new_space(name, mod.out_channels), mod.out_channels),))
        if isinstance(mod, nn.Linear):
            ndim = _ndim(node.args[0]) if inp is not None else None
            self._consume(node, name, inp, dim=(ndim - 1) if ndim else -1)
            out_dim = _ndim(node) - 1
            return Layout(out_dim, (Segment(self._new_space(name, mod.out_features), mod.out_features),))
        if inp is None:
            return None
        if isinstance(mod, _CONVS) and mod.groups == mod.in_channels == mod.out_channels:
            return self._passenger(node, name, inp)  # depthwise: one filter per channel
        if isinstance(mod, _NORMS):
            return self._passenger(node, name, inp)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return inp
        if isinstance(mod, _POOL_MODULES):
            return self._channel_dim_only(node, inp, "pooling")
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, inp, mod.start_dim, mod.end_dim)
        kind = f"a {type(mod).__name__} layer" if not isinstance(mod, _CONVS) else "a grouped convolution"
        self._block(inp, _why(node, f"{kind} ({type(mod).__module__}.{type(mod).__qualname__}) reads the pruned channels and pared cannot slice it"))
        return None

    def _consume(self, node: fx.Node, name: str, inp: Layout | None, *, dim: int) -> None:
        if inp is None:
            return
        if inp.dim != dim:
            self._block(inp, _why(node, f"channels arrive on dim {inp.dim}, the layer reads dim {dim}"))
            return
        self.inputs.setdefault(name, []).append(inp)
        self.consumers.add(name)

    def _passenger(self, node: fx.Node, name: str, inp: Layout) -> Layout | None:
        if inp.dim != 1 or any(s.repeat != 1 for s in inp.segments):
            self._block(inp, _why(node, "per-channel layer on a dimension other than the channels"))
            return None
        self.inputs.setdefault(name, []).append(inp)
        self.passengers.add(name)
        return inp

    def _channel_dim_only(self, node: fx.Node, inp: Layout, what: str) -> Layout | None:
        if inp.dim != 1:
            self._block(inp, _why(node, f"{what} over the pruned dimension"))
            return None
        return inp

    def _flatten(self, node: fx.Node, inp: Layout, start: int, end: int) -> Layout | None:
        shape = _shape(node.args[0])
        if shape is None:
            self._block(inp, _why(node, "flatten of a tensor with unknown shape"))
            return None
        nd = len(shape)
        start, end = start % nd, end % nd
        if inp.dim < start:
            return inp
        if inp.dim > end:
            return Layout(inp.dim - (end - start), inp.segments)
        if inp.dim != start:
            self._block(inp, _why(node, "flatten that puts other dimensions before the pruned one"))
            return None
        inner = 1
        for d in shape[start + 1 : end + 1]:
            inner *= int(d)
        return Layout(start, tuple(Segment(s.space, s.size, s.repeat * inner) for s in inp.segments))

    def _function(self, node: fx.Node, tracked: list[tuple[fx.Node, Layout]]) -> Layout | None:
        target = node.target
        first = node.args[0] if node.args else None
        inp = self.layouts.get(first) if isinstance(first, fx.Node) else None
        method = node.op == "call_method"
        if (method and target in _ELEMENTWISE_METHODS) or (not method and target in _ELEMENTWISE_FUNCTIONS):
            if len(tracked) == 1 and inp is not None:
                return inp
        if not method and target in _POOL_FUNCTIONS and len(tracked) == 1 and inp is not None:
            return self._channel_dim_only(node, inp, "pooling")
        if (method and target == "flatten") or (not method and target is torch.flatten):
            if inp is not None and len(tracked) == 1:
                start = _arg(node, 1, "start_dim", 0)
                end = _arg(node, 2, "end_dim", -1)
                return self._flatten(node, inp, int(start), int(end))
        if method and target in ("view", "reshape") or (not method and target is torch.reshape):
            if inp is not None and len(tracked) == 1:
                return self._view(node, inp)
        if (method and target in _REDUCE_METHODS) or (not method and target in _REDUCE_FUNCTIONS):
            if inp is not None and len(tracked) == 1:
                return self._reduce(node, inp)
        if (method and target in _BINARY_METHODS) or (not method and target in _BINARY_FUNCTIONS):
            return self._binary(node, tracked)
        if not method and target is torch.cat:
            return self._cat(node)
        what = f"{node.op} {getattr(target, '__name__', target)}"
        for _, lay in tracked:
            self._block(lay, _why(node, f"{what} is not an op pared can follow through pruned channels"))
        return None

    def _view(self, node: fx.Node, inp: Layout) -> Layout | None:
        # Only x.view(batch, -1) / x.reshape(batch, -1): any literal size would break once
        # channels are removed.
        sizes = list(node.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        shape = _shape(node.args[0])
        if len(sizes) == 2 and sizes[1] == -1 and inp.dim == 1 and shape is not None:
            return self._flatten(node, inp, 1, -1)
        self._block(inp, _why(node, f"{node.target} to sizes {sizes} (only view(batch, -1) is followed)"))
        return None

    def _reduce(self, node: fx.Node, inp: Layout) -> Layout | None:
        dims = _arg(node, 1, "dim", None)
        keepdim = bool(_arg(node, 2, "keepdim", False))
        shape = _shape(node.args[0])
        if dims is None or shape is None:
            self._block(inp, _why(node, "reduction over every dimension"))
            return None
        dims = [int(d) % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if inp.dim in dims:
            self._block(inp, _why(node, "reduction over the pruned dimension"))
            return None
        shift = 0 if keepdim else sum(1 for d in dims if d < inp.dim)
        return Layout(inp.dim - shift, inp.segments)

    def _binary(self, node: fx.Node, tracked: list[tuple[fx.Node, Layout]]) -> Layout | None:
        out_nd = _ndim(node)
        untracked = [a for a in _flat_nodes((node.args, node.kwargs)) if self.layouts.get(a) is None]
        first_nd = _ndim(tracked[0][0])
        right = first_nd - tracked[0][1].dim  # position counted from the right (broadcasting)
        for a in untracked:
            shape = _shape(a)
            if shape is None:
                continue  # a Python number or a size: broadcasts over everything
            if len(shape) >= right and int(shape[len(shape) - right]) != 1:
                param = a in self.from_params
                what = (f"combines pruned channels with '{a.name}', a parameter tensor pared cannot slice"
                        if param else f"couples pruned channels to '{a.name}', which no prunable layer produces (e.g. the network input)")
                for _, lay in tracked:
                    self._block(lay, _why(node, what), unsupported=param)
                return None
        base = tracked[0][1]
        for a, lay in tracked[1:]:
            if _ndim(a) - lay.dim != right or _structure(lay) != _structure(base):
                for _, each in tracked:
                    self._block(each, _why(node, "combines tensors whose pruned dimensions do not line up"))
                return None
            for s1, s2 in zip(base.segments, lay.segments):
                if s1.space is None or s2.space is None:
                    if s1.space != s2.space:
                        self._block(lay if s1.space is None else base, _why(node, "adds pruned channels to unpruned features"), unsupported=False)
                        return None
                    continue
                self._union(s1.space, s2.space)
        return Layout(out_nd - right, base.segments)

    def _cat(self, node: fx.Node) -> Layout | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = _arg(node, 1, "dim", 0)
        nd = _ndim(node)
        dim = int(dim) % nd
        segments: list[Segment] = []
        layouts = []
        for t in tensors if isinstance(tensors, (list, tuple)) else []:
            lay = self.layouts.get(t) if isinstance(t, fx.Node) else None
            layouts.append(lay)
            shape = _shape(t) if isinstance(t, fx.Node) else None
            if lay is None:
                if shape is None:
                    break
                segments.append(Segment(None, int(shape[dim]), 1))
            elif lay.dim == dim:
                segments.extend(lay.segments)
            else:
                break
        else:
            return Layout(dim, tuple(segments))
        for lay in layouts:
            self._block(lay, _why(node, "torch.cat along a dimension other than the pruned one"))
        return None

    # -------------------------------------------------------------------------------- result

    def _result(self) -> DependencyGraph:
        roots: dict[int, list[int]] = {}
        for sid in range(len(self.parent)):
            roots.setdefault(self._find(sid), []).append(sid)
        space_group: dict[int, int] = {}
        groups: list[ChannelGroup] = []
        for members in roots.values():
            index = len(groups)
            for sid in members:
                space_group[sid] = index
            sizes = {self.space_size[s] for s in members}
            reasons = [r for s in members for r in self.blocked.get(s, [])]
            if len(sizes) > 1:
                reasons.append((True, f"coupled layers disagree on the channel count: {sorted(sizes)}"))
            groups.append(ChannelGroup(
                size=min(sizes), producers=[p for s in members for p in self.producers[s]],
                passengers=[], consumers=[],
                blocked=list(dict.fromkeys(r for u, r in reasons if not u)),
                unsupported=list(dict.fromkeys(r for u, r in reasons if u)),
            ))
        inputs: dict[str, Layout] = {}
        for name, seen in self.inputs.items():
            first = seen[0]
            if any(_resolved(lay, self._find) != _resolved(first, self._find) for lay in seen[1:]):
                for lay in seen:  # a shared layer called on differently-coupled inputs
                    for seg in lay.segments:
                        if seg.space is not None:
                            groups[space_group[seg.space]].unsupported.append(f"layer '{name}' is called on inputs that are pruned differently")
            inputs[name] = first
            for seg in first.segments:
                if seg.space is None:
                    continue
                g = groups[space_group[seg.space]]
                bucket = g.passengers if name in self.passengers else g.consumers
                if name not in bucket:
                    bucket.append(name)
        return DependencyGraph(groups=groups, inputs=inputs, space_group=space_group)


def _why(node: fx.Node, what: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else ""
    where = f" in module '{owner}'" if owner and owner != node.target else ""
    return f"node '{node.name}'{where}: {what}"


def _structure(layout: Layout) -> tuple[tuple[int, int, bool], ...]:
    return tuple((s.size, s.repeat, s.space is None) for s in layout.segments)


def _resolved(layout: Layout, find: Any) -> tuple[Any, ...]:
    return (layout.dim, tuple((find(s.space) if s.space is not None else None, s.size, s.repeat) for s in layout.segments))


def _flat_nodes(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(obj, out.append)
    return out


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _ndim(node: Any) -> int:
    shape = _shape(node)
    return len(shape) if shape is not None else 0


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
