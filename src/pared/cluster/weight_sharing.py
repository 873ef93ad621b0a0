"""Weight sharing (Deep Compression, stage 2): per-layer k-means, then centroid fine-tuning.

``ClusterConfig(bits=5)`` replaces each selected ``Linear``/``Conv2d`` by a ``ClusteredLinear`` /
``ClusteredConv2d`` that stores a codebook (the centroids, trainable) and one small integer per
weight. Index 0 is reserved for an exact zero that is not a centroid: after pruning, zeros stay
zero through clustering, fine-tuning and storage. Because the weight is rebuilt as
``table[indices]`` in every forward, autograd scatter-adds each weight's gradient into its
centroid (the paper's "gradients grouped by cluster"), so any later fine-tune, including a plain
``finetune`` recipe step, keeps the sharing exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, register
from pared.cluster.kmeans import kmeans_1d
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.select import rule_matches, select_modules
from pared.train import FinetuneConfig, TrainableTask, train

MAX_CLUSTERS = 256


@register_config("cluster")
@dataclasses.dataclass
class ClusterConfig(BaseConfig):
    """Per-layer k-means weight sharing.

    Attributes:
        bits: index bits per weight; a layer gets ``2**bits`` clusters (1..8).
        clusters: cluster count per layer (2..256); overrides ``bits`` when set.
        per_layer_bits: ``{rule: bits}`` for the layers a selection rule matches (the first
            matching rule wins), e.g. ``{"conv*": 8, "fc3": 6}``.
        per_layer_clusters: ``{rule: clusters}``; checked before ``per_layer_bits``.
        init: centroid initialisation: ``linear`` (the paper's best), ``density`` or ``kmeans++``.
        preserve_sparsity: cluster only the nonzero weights; zeros stay exact zeros.
        iters: maximum k-means iterations per layer.
        seed: seed of ``kmeans++``.
        include: layer-selection rules (``pared.select``); empty means every Linear and Conv2d.
        exclude: rules for layers left unclustered.
        finetune: fine-tune the centroids (and biases) right after clustering, with these
            ``FinetuneConfig`` fields (``{"steps": 300, "lr": 1e-4}``); None skips it.
    """

    bits: int | None = 5
    clusters: int | None = None
    per_layer_bits: dict[str, int] = dataclasses.field(default_factory=dict)
    per_layer_clusters: dict[str, int] = dataclasses.field(default_factory=dict)
    init: Literal["linear", "density", "kmeans++"] = "linear"
    preserve_sparsity: bool = True
    iters: int = 100
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    finetune: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.bits is None and self.clusters is None:
            raise UsageError("cluster: set bits or clusters")
        if self.bits is not None:
            _check_bits("cluster.bits", self.bits)
        if self.clusters is not None:
            _check_clusters("cluster.clusters", self.clusters)
        for rule, bits in self.per_layer_bits.items():
            _check_bits(f"cluster.per_layer_bits[{rule!r}]", bits)
        for rule, k in self.per_layer_clusters.items():
            _check_clusters(f"cluster.per_layer_clusters[{rule!r}]", k)
        if self.iters < 1:
            raise UsageError(f"cluster.iters must be >= 1, got {self.iters}")
        if self.finetune is not None:
            finetune_config(self.finetune, "cluster.finetune")


def _check_bits(what: str, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise UsageError(f"{what} must be in 1..8, got {bits}")


def _check_clusters(what: str, k: int) -> None:
    if not 2 <= k <= MAX_CLUSTERS:
        raise UsageError(f"{what} must be in 2..{MAX_CLUSTERS}, got {k}")


def finetune_config(fields: dict[str, Any], what: str) -> FinetuneConfig:
    """A ``FinetuneConfig`` from a nested dict of its fields; bad fields are a ``UsageError``."""
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UsageError(f"{what}: unknown field(s) {unknown}; valid: {sorted(known)}")
    return FinetuneConfig(**fields)


class ClusteredLinear(nn.Module):
    """``Linear`` whose weight is ``[0, *codebook][indices]``: shared values, exact zeros."""

    def __init__(self, in_features: int, out_features: int, clusters: int, *, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.codebook = nn.Parameter(torch.zeros(clusters))
        self.register_buffer("indices", torch.zeros(out_features, in_features, dtype=index_dtype(clusters)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the layer computes with (rebuilt from codebook and indices)."""
        return shared_weight(self.codebook, self.indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, clusters={self.codebook.numel()}"


class ClusteredConv2d(nn.Module):
    """``Conv2d`` (zero padding) whose weight is ``[0, *codebook][indices]``."""

    def __init__(self, conv: nn.Conv2d, clusters: int) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise UsageError(f"clustered Conv2d supports zero padding only, got {conv.padding_mode!r}")
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.codebook = nn.Parameter(torch.zeros(clusters))
        self.register_buffer("indices", torch.zeros(conv.weight.shape, dtype=index_dtype(clusters)))
        self.bias = nn.Parameter(torch.zeros(conv.out_channels)) if conv.bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the layer computes with (rebuilt from codebook and indices)."""
        return shared_weight(self.codebook, self.indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, clusters={self.codebook.numel()}"


CLUSTERED = (ClusteredLinear, ClusteredConv2d)


def index_dtype(clusters: int) -> torch.dtype:
    """Smallest integer dtype holding 0..clusters (0 is the reserved zero)."""
    return torch.uint8 if clusters <= 255 else torch.int16


def shared_weight(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[0, *codebook][indices]``; its backward sums each weight's gradient into its centroid."""
    table = torch.cat([codebook.new_zeros(1), codebook])
    # int32, not int64: the ONNX exporter folds this cast into the Gather's index initializer,
    # which then takes 4 bytes per weight (as much as the dense fp32 weight) instead of 8.
    return table[indices.int()]


def cluster_weight(
    weight: torch.Tensor,
    clusters: int,
    *,
    init: Literal["linear", "density", "kmeans++"] = "linear",
    preserve_sparsity: bool = True,
    iters: int = 100,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster one weight tensor: ``(codebook float32 (k,), indices shaped like weight)``.

    With ``preserve_sparsity`` only nonzero weights are clustered and zeros get index 0; when a
    layer has fewer nonzero weights than ``clusters``, ``k`` shrinks to that count (0 for an
    all-zero layer). ``shared_weight(codebook, indices)`` is the clustered weight.

    Raises:
        UsageError: ``clusters`` < 2 or more than the tensor's number of weights.
    """
    n = weight.numel()
    if clusters < 2 or clusters > n:
        raise UsageError(f"cluster count must be in 2..{n} (the number of weights), got {clusters}")
    flat = weight.detach().flatten()
    keep = flat != 0 if preserve_sparsity else torch.ones_like(flat, dtype=torch.bool)
    values = flat[keep]
    k = min(clusters, values.numel())
    indices = torch.zeros(n, dtype=torch.int64)
    if k == 0:
        return torch.zeros(0), indices.to(index_dtype(0)).reshape(weight.shape)
    centroids, labels = kmeans_1d(values, k, init=init, iters=iters, seed=seed)
    indices[keep] = labels + 1
    return centroids.float(), indices.to(index_dtype(k)).reshape(weight.shape)


def _clustered_module(m: nn.Module, k: int) -> nn.Module:
    if isinstance(m, nn.Linear):
        return ClusteredLinear(m.in_features, m.out_features, k, bias=m.bias is not None)
    return ClusteredConv2d(m, k)


def _clusters_for(name: str, m: nn.Module, cfg: ClusterConfig) -> int:
    for rule, k in cfg.per_layer_clusters.items():
        if rule_matches(rule, name, m):
            return k
    for rule, bits in cfg.per_layer_bits.items():
        if rule_matches(rule, name, m):
            return 2**bits
    return cfg.clusters if cfg.clusters is not None else 2 ** int(cfg.bits or 0)


def _check_rules(cfg: ClusterConfig, chosen: list[tuple[str, nn.Module]]) -> None:
    rules = [*cfg.per_layer_clusters, *cfg.per_layer_bits]
    unmatched = [r for r in rules if not any(rule_matches(r, n, m) for n, m in chosen)]
    if unmatched:
        raise UsageError(f"cluster: per-layer rule(s) matched no selected layer: {unmatched}")


def _candidate(_name: str, m: nn.Module) -> bool:
    return type(m) in (nn.Linear, nn.Conv2d)


@register(ClusterConfig)
def _apply_cluster(model: nn.Module, cfg: ClusterConfig, ctx: Context) -> nn.Module:
    chosen = select_modules(model, candidate=_candidate, include=cfg.include, exclude=cfg.exclude)
    if not chosen:
        raise UsageError("cluster: no Linear or Conv2d layer is selected in this model")
    _check_rules(cfg, chosen)
    key = ctx.structure_key("cluster")
    if ctx.skeleton:
        sizes = _recorded_sizes(ctx.structure.get(key), [n for n, _ in chosen])
        for name, m in chosen:
            model.set_submodule(name, _clustered_module(m, sizes[name]))
        return model
    sizes: dict[str, int] = {}
    layers = []
    for name, m in chosen:
        w = m.weight.detach()
        if not torch.isfinite(w).all():
            raise InputRefused(f"cluster: weight of layer {name!r} contains NaN or inf")
        k = _clusters_for(name, m, cfg)
        if k > w.numel():
            raise UsageError(f"cluster: {k} clusters for layer {name!r}, which has only {w.numel()} weights")
        codebook, indices = cluster_weight(
            w.cpu(), k, init=cfg.init, preserve_sparsity=cfg.preserve_sparsity, iters=cfg.iters, seed=cfg.seed
        )
        new = _clustered_module(m, codebook.numel()).to(w.device)
        with torch.no_grad():
            new.codebook.copy_(codebook)
            new.indices.copy_(indices)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        model.set_submodule(name, new)
        sizes[name] = codebook.numel()
        nonzero = int((indices != 0).sum())
        layers.append({"layer": name, "clusters": codebook.numel(), "requested": k,
                       "index_bits": math.ceil(math.log2(codebook.numel() + 1)) if codebook.numel() else 0,
                       "nonzero": nonzero, "weights": w.numel()})
    ctx.structure[key] = sizes
    summary: dict[str, Any] = {"technique": "cluster", "init": cfg.init, "layers": layers}
    if cfg.finetune is not None:
        if not isinstance(ctx.task, TrainableTask):
            raise UsageError("cluster.finetune needs a task with training data (a TrainableTask)")
        result = train(model, ctx.task, finetune_config(cfg.finetune, "cluster.finetune"), progress=False)
        summary["finetune"] = {"steps": result.steps, "final_loss": result.final_loss}
    ctx.summary.append(summary)
    return model


def _recorded_sizes(recorded: Any, names: list[str]) -> dict[str, int]:
    """Cluster counts saved in the manifest, checked: a bad manifest must not build a wrong model."""
    if not isinstance(recorded, dict) or set(recorded) != set(names):
        raise InputRefused(f"cluster: the manifest's structure does not list the clustered layers {names}")
    for name, k in recorded.items():
        if type(k) is not int or not 0 <= k <= MAX_CLUSTERS:
            raise InputRefused(f"cluster: invalid cluster count {k!r} for layer {name!r} in the manifest")
    return recorded
