"""Pure math of low-rank factorization (tensors in, tensors out; no modules).

Used by ``pared.lowrank``: the truncated (optionally whitened) SVD, its singular values, and the
three ways of choosing a rank: by kept energy, by a weight share, or by allocating a budget of
weights across layers where it removes the most relative error.
"""

from __future__ import annotations

import math

import torch

from pared.errors import InputRefused


def factor_matrix(
    weight: torch.Tensor, rank: int, whitening: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``A @ B`` the best rank-``rank`` approximation of ``weight`` (out, n).

    Without ``whitening`` it is the truncated SVD (best in the Frobenius norm of the weights).
    With a lower-triangular ``whitening`` S (S S^T = X^T X of the layer inputs X) it minimises
    ``||X W^T - X (A B)^T||``, the error of the outputs on those inputs. The singular values are
    split evenly, ``A = U sqrt(s)`` and ``B = sqrt(s) V^T``, so both factors train alike.
    """
    w = weight.detach().double()
    target = w @ whitening if whitening is not None else w
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    if whitening is not None:
        b = torch.linalg.solve_triangular(
            whitening, b, upper=False, left=False
        )  # B S = sqrt(s) V^T
    return a.to(weight.dtype), b.to(weight.dtype)


def singular_values(weight: torch.Tensor, whitening: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values (descending, float64) of ``weight`` (out, n), whitened if ``whitening``."""
    w = weight.detach().double()
    return torch.linalg.svdvals(w @ whitening if whitening is not None else w)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold at least ``energy`` of the total."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return min(int((kept < energy - 1e-12).sum()) + 1, len(s))


def rank_for_ratio(params: int, cost_per_rank: int, ratio: float) -> int:
    """The largest rank whose factors hold at most ``ratio`` of ``params`` (at least 1)."""
    return max(1, math.floor(ratio * params / cost_per_rank))


def allocate_ranks(
    spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: float
) -> dict[str, int]:
    """Ranks that spend at most ``budget`` parameters where they remove most relative error.

    Each layer's i-th singular value removes ``s_i^2 / sum(s^2)`` of that layer's (output)
    error and costs ``costs[layer]`` parameters. Every layer gets rank 1; then the remaining
    budget goes to the best error-per-parameter values across all layers, in that order
    (within a layer they come in descending order, so each layer keeps a prefix).
    """
    ranks = {name: 1 for name in spectra}
    spent = float(sum(costs.values()))
    gains: list[tuple[float, str]] = []
    for name, s in spectra.items():
        sq = s.double() ** 2
        total = float(sq.sum()) or 1.0
        gains.extend((float(v) / total / costs[name], name) for v in sq[1:])
    gains.sort(key=lambda g: -g[0])
    for _, name in gains:
        if spent + costs[name] > budget:
            continue  # a cheaper layer's value may still fit
        ranks[name] += 1
        spent += costs[name]
    return ranks


def whitening_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular S with S S^T = gram (+ a small ridge, so rank-deficient inputs work)."""
    g = gram.double()
    scale = float(g.diagonal().mean()) or 1.0
    for damp in (1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(g + damp * scale * torch.eye(len(g), dtype=g.dtype))
        if int(info) == 0:
            return chol
    raise InputRefused(
        "lowrank: the calibration inputs' Gram matrix is not positive definite even with damping"
    )
