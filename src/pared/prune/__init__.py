"""Pruning: unstructured (individual weights zeroed) and structured (channels removed).

- ``MagnitudePruneConfig`` (recipe name ``magnitude_prune``): one-shot, per layer or global.
- ``GradualPruneConfig`` (``gradual_prune``): Zhu & Gupta's cubic schedule while fine-tuning.
- ``pared.prune.importance``: the criteria, plain callables ``(weight, grad) -> scores``.
"""

from pared.prune.graph import ChannelGroup, DependencyGraph, build_dependency_graph
from pared.prune.heads import PrunedMultiheadAttention, TransformerPruneConfig
from pared.prune.importance import IMPORTANCE, get_importance, magnitude, taylor
from pared.prune.nm import SemiStructuredConfig, follows_nm, nm_mask
from pared.prune.sensitivity import allocate_ratios, save_sensitivity, sensitivity
from pared.prune.structured import ChannelPruneConfig, realized_vs_theoretical
from pared.prune.unstructured import (
    GradualPruneConfig,
    MagnitudePruneConfig,
    cubic_sparsity,
    keep_masks,
    keep_zeros_,
    sparsity_of,
)

__all__ = [
    "IMPORTANCE",
    "ChannelGroup",
    "ChannelPruneConfig",
    "DependencyGraph",
    "PrunedMultiheadAttention",
    "SemiStructuredConfig",
    "TransformerPruneConfig",
    "allocate_ratios",
    "build_dependency_graph",
    "follows_nm",
    "nm_mask",
    "realized_vs_theoretical",
    "save_sensitivity",
    "sensitivity",
    "GradualPruneConfig",
    "MagnitudePruneConfig",
    "cubic_sparsity",
    "get_importance",
    "keep_masks",
    "keep_zeros_",
    "magnitude",
    "sparsity_of",
    "taylor",
]
