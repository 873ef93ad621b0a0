"""N:M semi-structured sparsity: in every group of M consecutive input weights, keep N.

``compress_(model, SemiStructuredConfig(n=2, m=4))`` zeroes, in every Linear weight row, the
``m - n`` smallest-importance weights of each run of ``m`` consecutive input columns. The zeros
stay in the saved state_dict (dense tensors), so the artefact reloads like any other.

Speed, said plainly: **on CPU nothing runs faster.** No CPU kernel in PyTorch, ONNX Runtime or
OpenVINO skips the zeros of a 2:4 pattern; the model costs the same time and, stored dense, the
same bytes (they compress well with a general-purpose compressor, nothing more). 2:4 pays off on
NVIDIA GPUs from Ampere on, whose sparse tensor cores run a 2:4 matmul about twice as fast: with
``accelerate=True`` and the weights on CUDA, this handler converts each masked weight with
``torch.sparse.to_sparse_semi_structured``. That path is written but not tested by pared's CI
(no GPU), and a converted model is for inference only: save the artefact before converting.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from pared.apply import Context, register
from pared.config import BaseConfig, register_config
from pared.errors import UsageError
from pared.prune.importance import get_importance
from pared.select import select_modules

TECHNIQUE = "semi_structured"


@register_config(TECHNIQUE)
@dataclasses.dataclass
class SemiStructuredConfig(BaseConfig):
    """N:M sparsity along the input dimension of Linear weights.

    Attributes:
        n: weights kept in every group.
        m: group length (consecutive input columns); ``in_features`` must be a multiple.
        importance: ``magnitude`` (``taylor`` needs gradients and is not offered here).
        include / exclude: layer rules (``pared.select``); default every ``nn.Linear``.
        accelerate: on CUDA, convert masked weights to PyTorch's semi-structured sparse tensors
            (2:4 only). Never on CPU, where no such kernel exists.
    """

    n: int = 2
    m: int = 4
    importance: Literal["magnitude"] = "magnitude"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    accelerate: bool = False

    def validate(self) -> None:
        if not 1 <= self.n < self.m:
            raise UsageError(f"{TECHNIQUE}: need 1 <= n < m, got n={self.n}, m={self.m}")
        if self.accelerate and (self.n, self.m) != (2, 4):
            raise UsageError(f"{TECHNIQUE}.accelerate needs the 2:4 pattern, got {self.n}:{self.m}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` highest scores in every run of ``m`` along the last dim.

    Args:
        scores: (..., K) with K a multiple of ``m``.

    Returns:
        A bool tensor shaped like ``scores`` with exactly ``n`` True per group (ties: lower index).

    Example:
        >>> nm_mask(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2, 4)
        tensor([[False,  True,  True, False]])
    """
    k = scores.shape[-1]
    if k % m:
        raise UsageError(f"N:M sparsity needs the last dimension ({k}) to be a multiple of m={m}")
    groups = scores.reshape(-1, m).double()
    keep = torch.argsort(-groups, dim=1, stable=True)[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.reshape(scores.shape)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every run of ``m`` along the last dim has at most ``n`` non-zeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(dim=1) <= n).all())


@register(SemiStructuredConfig)
def _apply_nm(model: nn.Module, cfg: SemiStructuredConfig, ctx: Context) -> nn.Module:
    chosen = select_modules(model, candidate=lambda name, mod: isinstance(mod, nn.Linear),
                            include=cfg.include, exclude=cfg.exclude)
    if not chosen:
        raise UsageError(f"{TECHNIQUE}: no nn.Linear layer selected")
    bad = [f"{name} (in_features={mod.in_features})" for name, mod in chosen if mod.in_features % cfg.m]
    if bad:
        raise UsageError(f"{TECHNIQUE}: in_features must be a multiple of m={cfg.m}; not so for {bad} "
                         f"(exclude these layers)")
    if ctx.skeleton:
        return model  # the zeros are in the saved weights; the structure is unchanged
    importance = get_importance(cfg.importance)
    accelerated = 0
    with torch.no_grad():
        for _, mod in chosen:
            mask = nm_mask(importance(mod.weight, None), cfg.n, cfg.m)
            mod.weight.mul_(mask.to(mod.weight.dtype))
            if cfg.accelerate and mod.weight.is_cuda:
                accelerated += _to_semi_structured(mod)
    total = sum(mod.weight.numel() for _, mod in chosen)
    zeros = sum(int((mod.weight == 0).sum()) for _, mod in chosen) if not accelerated else None
    ctx.summary.append({
        "technique": TECHNIQUE,
        "pattern": f"{cfg.n}:{cfg.m}",
        "layers": [name for name, _ in chosen],
        "weights": total,
        "zero_fraction": zeros / total if zeros is not None else 1 - cfg.n / cfg.m,
        "accelerated_layers": accelerated,
        "speedup_note": ("semi-structured kernels in use (CUDA)" if accelerated else
                         "no speed-up: dense kernels still multiply the zeros (no CPU N:M kernel exists)"),
    })
    return model


def _to_semi_structured(mod: nn.Linear) -> int:
    # Untested in pared's CI (no GPU). cuSPARSELt/CUTLASS kernels need fp16/bf16 (or int8) and
    # shapes that are multiples of 64/128; a weight that does not fit stays dense.
    from torch.sparse import to_sparse_semi_structured

    try:
        mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight), requires_grad=False)
    except (RuntimeError, ValueError):
        return 0
    return 1
