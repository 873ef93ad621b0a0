"""Pure 1-D k-means for weight sharing (tensor in, tensors out; no ``nn.Module``).

Deep Compression (Han et al., ICLR 2016) clusters each layer's weights with 1-D k-means and
compares three initialisations: ``linear`` (evenly spaced between min and max) keeps the rare
large weights as centroids and worked best there; ``density`` (evenly spaced quantiles) puts the
centroids where most weights are; ``kmeans++`` samples centroids with probability proportional to
the squared distance to the nearest one already chosen. All three are deterministic for a seed.
"""

from __future__ import annotations

from typing import Literal

import torch

from pared.errors import UsageError

Init = Literal["linear", "density", "kmeans++"]


def init_centroids(values: torch.Tensor, k: int, *, init: Init = "linear", seed: int = 0) -> torch.Tensor:
    """``k`` sorted starting centroids for the 1-D ``values``.

    Args:
        values: 1-D float tensor, at least one element.
        k: number of centroids (>= 1).
        init: ``linear``, ``density`` or ``kmeans++``.
        seed: seeds ``kmeans++`` sampling (the other two are deterministic anyway).

    Returns:
        float64 tensor of shape ``(k,)``, ascending.
    """
    v = values.detach().double().flatten()
    if v.numel() == 0 or k < 1:
        raise UsageError(f"k-means needs at least one value and one centroid (got {v.numel()} and {k})")
    if init == "linear":
        c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    elif init == "density":
        # Centres of k equal-probability bins of the empirical CDF.
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        c = torch.quantile(v, q, interpolation="linear") if v.numel() <= 1 << 24 else _sorted_quantile(v, q)
    elif init == "kmeans++":
        c = _kmeans_pp(v, k, seed)
    else:
        raise UsageError(f"unknown k-means init {init!r}; choose linear, density or kmeans++")
    return torch.sort(c).values


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest of the ascending ``centroids`` for each value.

    In 1-D the nearest centroid is found by bucketing against the midpoints, O(n log k).
    Ties go to the lower centroid.
    """
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values.detach().double().flatten(), mids, right=False)


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    *,
    init: Init = "linear",
    iters: int = 100,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on 1-D data.

    An empty cluster keeps its previous centroid (it may win points back later); iteration
    stops when no assignment changes or after ``iters`` rounds.

    Args:
        values: 1-D float tensor with at least ``k`` elements.
        k: number of clusters (>= 1).
        init: centroid initialisation, see ``init_centroids``.
        iters: maximum Lloyd iterations.
        seed: seed for ``kmeans++``.

    Returns:
        ``(centroids, labels)``: float64 ``(k,)`` ascending, and int64 labels shaped like the
        flattened ``values``. Every label is a valid index; at most ``k`` distinct values result.
    """
    v = values.detach().double().flatten()
    if k > v.numel():
        raise UsageError(f"k-means: {k} clusters for {v.numel()} values; use at most one cluster per value")
    c = init_centroids(v, k, init=init, seed=seed)
    labels = assign(v, c)
    for _ in range(iters):
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, v)
        counts = torch.bincount(labels, minlength=k)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        c = torch.sort(c).values  # means of sorted, contiguous 1-D clusters stay sorted; sort guards rounding
        new = assign(v, c)
        if torch.equal(new, labels):
            break
        labels = new
    return c, labels


def _kmeans_pp(v: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    chosen = [v[int(torch.randint(v.numel(), (1,), generator=gen))]]
    d2 = (v - chosen[0]) ** 2
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every value already sits on a centroid: repeat one (harmless duplicate)
            chosen.append(chosen[-1])
            continue
        nxt = v[int(torch.multinomial(d2 / total, 1, generator=gen))]
        chosen.append(nxt)
        d2 = torch.minimum(d2, (v - nxt) ** 2)
    return torch.stack(chosen)


def _sorted_quantile(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # torch.quantile refuses inputs above 16M elements; nearest-rank on the sorted values is enough
    # for an initialisation.
    s = torch.sort(v).values
    idx = (q * (s.numel() - 1)).round().long()
    return s[idx]
