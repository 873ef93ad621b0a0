"""Pruning: unstructured (individual weights zeroed) and structured (channels removed).

- ``MagnitudePruneConfig`` (recipe name ``magnitude_prune``): one-shot, per layer or global.
- ``GradualPruneConfig`` (``gradual_prune``): Zhu & Gupta's cubic schedule while fine-tuning.
- ``pared.prune.importance``: the criteria, plain callables ``(weight, grad) -> scores``.
"""

from pared.prune.importance import IMPORTANCE, get_importance, magnitude, taylor
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
