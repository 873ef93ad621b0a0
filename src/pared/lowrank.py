"""Low-rank factorization: a Linear or Conv2d replaced by two thinner layers from a truncated SVD.

``compress_(model, LowRankConfig(ratio=0.5), calib=batches)`` factors every selected layer's
weight ``W (out, n)`` as ``A (out, r) @ B (r, n)``:

- ``nn.Linear`` becomes ``LowRankLinear``: ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.
- ``nn.Conv2d`` (``conv="channel"``) becomes a k x k conv to ``r`` channels then a 1 x 1 conv;
  ``conv="spatial"`` becomes a k x 1 conv to ``r`` channels then a 1 x k conv (Tai et al., 2016).

The rank is fixed (``rank``), set by a share of each layer's parameters (``ratio``), by the
singular-value energy kept (``energy``), or given per layer (``per_layer``). With
``allocation="sensitivity"`` the ``ratio`` budget is spread over all selected layers where the
output error per parameter is lowest. A layer is replaced only where the factorization saves at
least ``min_mac_saving`` of its MACs; the others stay dense and are listed in the summary.

With calibration data the SVD is data-aware (SVD-LLM, Wang et al., 2024): it factors ``W S``
where ``S S^T`` is the Gram matrix of the layer's inputs, so the discarded singular values are
exactly the error of the layer's *outputs* on that data, not of its weights. Recovery is a
separate ``finetune`` step. The chosen ranks are recorded in ``ctx.structure`` so that
``load_artefact`` rebuilds the factored layers without data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, register
from pared.calib import checked_batches, observe_layer_inputs
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.lowrank_svd import (
    allocate_ranks,
    factor_matrix,
    rank_for_energy,
    rank_for_ratio,
    singular_values,
    whitening_from_gram,
)
from pared.select import rule_matches, select_modules

TECHNIQUE = "lowrank"
DEFAULT_RATIO = 0.5
Kind = Literal["linear", "channel", "spatial"]


@register_config(TECHNIQUE)
@dataclasses.dataclass
class LowRankConfig(BaseConfig):
    """Replace Linear / Conv2d layers by two thinner ones (truncated SVD).

    Attributes:
        rank: the same rank for every selected layer (>= 1, at most the layer's full rank).
        ratio: share of each layer's parameters the factored layer keeps, in (0, 1). The default
            (0.5) applies when neither ``rank`` nor ``energy`` is given.
        energy: keep the fewest singular values whose squares sum to at least this share of
            the total, in (0, 1].
        allocation: ``uniform``: ``ratio`` for every layer; ``sensitivity``: ``ratio`` of all
            selected parameters, given to the layers whose output error falls most per parameter.
        per_layer: exact ranks keyed by a layer rule (name, glob, ``re:``, ``type:``); win over
            the other settings. A key that matches no selected layer is an error.
        conv: ``channel`` (k x k conv to r channels, then 1 x 1) or ``spatial`` (k x 1 then 1 x k).
        data_aware: whiten the SVD by the layer inputs' Gram matrix on the calibration data.
        calibration_batches: calibration batches used for the Gram matrices.
        min_mac_saving: a layer is factored only if it saves at least this share of its MACs.
        include: layer rules; only matching Linear / Conv2d layers are considered.
        exclude: layer rules; matching layers stay dense.
    """

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    per_layer: dict[str, int] = dataclasses.field(default_factory=dict)
    conv: Literal["channel", "spatial"] = "channel"
    data_aware: bool = True
    calibration_batches: int = 8
    min_mac_saving: float = 0.1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        given = [n for n in ("rank", "ratio", "energy") if getattr(self, n) is not None]
        if len(given) > 1:
            raise UsageError(
                f"lowrank: set only one of rank, ratio, energy (got {', '.join(given)})"
            )
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"lowrank.rank must be >= 1, got {self.rank}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise UsageError(f"lowrank.ratio must be in (0, 1), got {self.ratio}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"lowrank.energy must be in (0, 1], got {self.energy}")
        if self.allocation == "sensitivity" and (self.rank is not None or self.energy is not None):
            raise UsageError(
                "lowrank.allocation='sensitivity' spreads a ratio budget; it cannot be used with rank or energy"
            )
        for rule, r in self.per_layer.items():
            if r < 1:
                raise UsageError(f"lowrank.per_layer[{rule!r}] must be >= 1, got {r}")
        if self.calibration_batches < 1:
            raise UsageError(
                f"lowrank.calibration_batches must be >= 1, got {self.calibration_batches}"
            )
        if not 0.0 <= self.min_mac_saving < 1.0:
            raise UsageError(f"lowrank.min_mac_saving must be in [0, 1), got {self.min_mac_saving}")


# ------------------------------------------------------------------------------ modules


class LowRankLinear(nn.Sequential):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``: same inputs and outputs as the
    ``nn.Linear`` it replaces, ``rank * (in + out)`` weights instead of ``in * out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool) -> None:
        super().__init__(
            nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias)
        )
        self.rank = rank


class LowRankConv2d(nn.Sequential):
    """Two convs standing in for one ``nn.Conv2d`` (groups=1).

    ``kind="channel"``: the original k x k conv with ``rank`` output channels, then a 1 x 1 conv.
    ``kind="spatial"``: a kh x 1 conv to ``rank`` channels (vertical stride, padding, dilation),
    then a 1 x kw conv (the horizontal ones).
    """

    def __init__(self, conv: nn.Conv2d, rank: int, kind: Kind) -> None:
        kh, kw = conv.kernel_size
        (sh, sw), (dh, dw) = conv.stride, conv.dilation
        bias = conv.bias is not None
        if kind == "channel":
            first = nn.Conv2d(
                conv.in_channels,
                rank,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                bias=False,
                padding_mode=conv.padding_mode,
            )
            second = nn.Conv2d(rank, conv.out_channels, 1, bias=bias)
        else:
            ph, pw = conv.padding  # type: ignore[misc] - string padding is refused before this
            first = nn.Conv2d(
                conv.in_channels,
                rank,
                (kh, 1),
                stride=(sh, 1),
                padding=(ph, 0),
                dilation=(dh, 1),
                bias=False,
                padding_mode=conv.padding_mode,
            )
            second = nn.Conv2d(
                rank,
                conv.out_channels,
                (1, kw),
                stride=(1, sw),
                padding=(0, pw),
                dilation=(1, dw),
                bias=bias,
                padding_mode=conv.padding_mode,
            )
        super().__init__(first, second)
        self.rank, self.kind = rank, kind


# ------------------------------------------------------------------------- layer plumbing


def _kind(module: nn.Module, cfg: LowRankConfig) -> Kind:
    return "linear" if isinstance(module, nn.Linear) else cfg.conv


def _matrix(module: nn.Module, kind: Kind) -> torch.Tensor:
    """The 2-D matrix the SVD factors: (out, in) for Linear, (out, in*kh*kw) for channel convs,
    (in*kh, out*kw) for spatial convs (so its factors are the vertical and horizontal filters)."""
    w = module.weight
    if kind == "linear":
        return w
    if kind == "channel":
        return w.reshape(w.shape[0], -1)
    out, cin, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(cin * kh, out * kw)


def _full_rank(module: nn.Module, kind: Kind) -> int:
    return min(_matrix(module, kind).shape)


def _costs(module: nn.Module, kind: Kind) -> tuple[int, int, int]:
    """(weights of the original, weights per unit of rank, MACs per unit of rank relative to the
    original's MACs per output position), all in the same per-output-position units."""
    if kind == "linear":
        return module.in_features * module.out_features, module.in_features + module.out_features, 0
    out, cin, kh, kw = module.weight.shape
    if kind == "channel":
        return out * cin * kh * kw, cin * kh * kw + out, 0
    # the k x 1 conv runs at the input width when the stride is horizontal: sw times the positions
    return out * cin * kh * kw, cin * kh + out * kw, cin * kh * (module.stride[1] - 1)


def _mac_saving(module: nn.Module, kind: Kind, rank: int) -> float:
    params, per_rank, extra = _costs(module, kind)
    return 1.0 - rank * (per_rank + extra) / params


def factorize(
    module: nn.Module, rank: int, *, kind: Kind | None = None, whitening: torch.Tensor | None = None
) -> nn.Module:
    """The two-layer replacement of an ``nn.Linear`` or ``nn.Conv2d`` at ``rank``.

    Args:
        module: the layer (left unchanged).
        rank: inner width, 1..full rank.
        kind: ``channel`` or ``spatial`` for a Conv2d (default ``channel``); ignored for Linear.
        whitening: lower-triangular S of the inputs' Gram matrix (see ``factor_matrix``).

    Returns:
        A ``LowRankLinear`` / ``LowRankConv2d`` on the module's device and dtype; at full rank
        it computes the same function up to rounding.
    """
    kind = "linear" if isinstance(module, nn.Linear) else (kind or "channel")
    new = _empty_factored(module, kind, rank)
    a, b = factor_matrix(_matrix(module, kind), rank, whitening)
    first, second = new[0], new[1]
    with torch.no_grad():
        if kind == "spatial":
            out, cin, kh, kw = module.weight.shape
            first.weight.copy_(a.T.reshape(rank, cin, kh, 1))  # a: (cin*kh, r) vertical filters
            second.weight.copy_(
                b.reshape(rank, out, kw).permute(1, 0, 2).unsqueeze(2)
            )  # b: (r, out*kw)
        else:
            first.weight.copy_(b.reshape(first.weight.shape))
            second.weight.copy_(a.reshape(second.weight.shape))
        if module.bias is not None:
            second.bias.copy_(module.bias)
    return new.train(module.training)


def _empty_factored(module: nn.Module, kind: Kind, rank: int) -> nn.Module:
    if kind == "linear":
        new: nn.Module = LowRankLinear(
            module.in_features, module.out_features, rank, bias=module.bias is not None
        )
    else:
        new = LowRankConv2d(module, rank, kind)
    return new.to(device=module.weight.device, dtype=module.weight.dtype)


def _candidates(model: nn.Module) -> set[str]:
    inner = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules()
        if isinstance(m, (LowRankLinear, LowRankConv2d))
        for c, _ in m.named_children()
    }
    names = set()
    for name, m in model.named_modules():
        if name in inner:
            continue  # already a factor of an earlier lowrank step
        if isinstance(m, nn.Linear) or (
            isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str)
        ):
            names.add(name)
    return names


def _grams(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    batches: list[tuple[torch.Tensor, ...]],
    kinds: dict[str, Kind],
) -> dict[str, torch.Tensor]:
    """X^T X of every layer's inputs (unfolded patches for channel convs), float64."""
    grams: dict[str, torch.Tensor] = {}
    modules = dict(layers)

    def observe(name: str, x: torch.Tensor) -> None:
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            patches = F.unfold(
                x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
            )
            flat = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B*L, in*kh*kw)
        else:
            flat = x.reshape(-1, x.shape[-1])
        flat = flat.double()
        grams[name] = grams.get(name, 0) + flat.T @ flat  # type: ignore[operator]

    whitened = [(n, m) for n, m in layers if kinds[n] != "spatial"]
    observe_layer_inputs(model, whitened, batches, observe)
    missing = [n for n, _ in whitened if n not in grams]
    if missing:
        raise UsageError(
            f"lowrank: the calibration data never reached {missing[:5]}; exclude them or set data_aware=false"
        )
    return grams


def _choose_ranks(
    layers: list[tuple[str, nn.Module]],
    kinds: dict[str, Kind],
    spectra: dict[str, torch.Tensor],
    cfg: LowRankConfig,
) -> dict[str, int]:
    ranks: dict[str, int] = {}
    ratio = cfg.ratio if cfg.ratio is not None else DEFAULT_RATIO
    if cfg.allocation == "sensitivity":
        costs = {n: _costs(m, kinds[n])[1] for n, m in layers}
        budget = ratio * sum(_costs(m, kinds[n])[0] for n, m in layers)
        ranks = allocate_ranks(spectra, costs, budget)
    for name, module in layers:
        if cfg.rank is not None:
            ranks[name] = cfg.rank
        elif cfg.energy is not None:
            ranks[name] = rank_for_energy(spectra[name], cfg.energy)
        elif cfg.allocation == "uniform":
            params, per_rank, _ = _costs(module, kinds[name])
            ranks[name] = rank_for_ratio(params, per_rank, ratio)
        for rule, r in cfg.per_layer.items():
            if rule_matches(rule, name, module):
                ranks[name] = r
        full = _full_rank(module, kinds[name])
        if ranks[name] > full:
            raise UsageError(
                f"lowrank: rank {ranks[name]} of '{name}' is above its full rank {full}"
            )
    return ranks


def _check_per_layer(cfg: LowRankConfig, layers: list[tuple[str, nn.Module]]) -> None:
    unmatched = [
        rule for rule in cfg.per_layer if not any(rule_matches(rule, n, m) for n, m in layers)
    ]
    if unmatched:
        raise UsageError(f"lowrank.per_layer names no selected Linear/Conv2d layer: {unmatched}")


# ------------------------------------------------------------------------------ handler


@register(LowRankConfig)
def _apply_lowrank(model: nn.Module, cfg: LowRankConfig, ctx: Context) -> nn.Module:
    if ctx.skeleton:
        key = ctx.structure_key(TECHNIQUE)
        _rebuild(model, ctx.structure.get(key), key)
        return model
    names = _candidates(model)
    layers = select_modules(
        model, candidate=lambda n, m: n in names, include=cfg.include, exclude=cfg.exclude
    )
    if not layers:
        raise UsageError("lowrank: the model has no Linear or Conv2d (groups=1) layer to factor")
    _check_per_layer(cfg, layers)
    for name, module in layers:
        if not torch.isfinite(module.weight).all():
            raise InputRefused(f"lowrank: weight of '{name}' contains NaN or inf")
    # The SVDs and Cholesky factors are small float64 LAPACK calls: a second thread mostly waits
    # (one 384 x 1536 SVD took 0.5 s on one thread and 20 s on two on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _factor_layers(model, cfg, ctx, layers)
    finally:
        torch.set_num_threads(threads)


def _factor_layers(
    model: nn.Module, cfg: LowRankConfig, ctx: Context, layers: list[tuple[str, nn.Module]]
) -> nn.Module:
    kinds = {n: _kind(m, cfg) for n, m in layers}
    whitening: dict[str, torch.Tensor] = {}
    if cfg.data_aware:
        if ctx.calib is None:
            raise UsageError(
                "lowrank.data_aware needs calibration data: pass calib=... or set data_aware=false"
            )
        batches = checked_batches(ctx.calib, limit=cfg.calibration_batches)
        whitening = {
            n: whitening_from_gram(g) for n, g in _grams(model, layers, batches, kinds).items()
        }
    spectra = {n: singular_values(_matrix(m, kinds[n]), whitening.get(n)) for n, m in layers}
    ranks = _choose_ranks(layers, kinds, spectra, cfg)
    done: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []
    for name, module in layers:
        kind, rank = kinds[name], ranks[name]
        saving = _mac_saving(module, kind, rank)
        if saving < cfg.min_mac_saving:
            skipped.append(
                {
                    "layer": name,
                    "rank": rank,
                    "reason": f"saves {saving:.0%} of MACs < min_mac_saving",
                }
            )
            continue
        model.set_submodule(name, factorize(module, rank, kind=kind, whitening=whitening.get(name)))
        sq = spectra[name] ** 2
        done[name] = {
            "kind": kind,
            "rank": rank,
            "full_rank": len(sq),
            "mac_saving": round(saving, 4),
            "energy_kept": round(float(sq[:rank].sum() / sq.sum().clamp(min=1e-300)), 4),
        }
    ctx.structure[ctx.structure_key(TECHNIQUE)] = {
        "layers": {n: {"kind": d["kind"], "rank": d["rank"]} for n, d in done.items()}
    }
    before = sum(_costs(m, kinds[n])[0] for n, m in layers)
    after = sum(_costs(m, kinds[n])[0] for n, m in layers if n not in done)
    after += sum(d["rank"] * _costs(m, kinds[n])[1] for n, m in layers if (d := done.get(n)))
    ctx.summary.append(
        {
            "technique": TECHNIQUE,
            "factored": len(done),
            "skipped": skipped,
            "layers": done,
            "data_aware": cfg.data_aware,
            "selected_weights_kept_fraction": round(after / before, 4),
        }
    )
    return model


def _rebuild(model: nn.Module, entry: Any, key: str) -> None:
    """Skeleton mode: replace the recorded layers by factored ones of the recorded ranks."""
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict):
        raise InputRefused(
            f"artefact structure has no valid '{key}' entry: cannot rebuild the factored layers"
        )
    for name, spec in entry["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputRefused(
                f"artefact structure names layer '{name}', which the model does not have"
            ) from None
        kind, rank = (
            (spec.get("kind"), spec.get("rank")) if isinstance(spec, dict) else (None, None)
        )
        expected = (
            ("linear",)
            if isinstance(module, nn.Linear)
            else ("channel", "spatial")
            if isinstance(module, nn.Conv2d)
            else ()
        )
        if kind not in expected or not isinstance(rank, int) or isinstance(rank, bool):
            raise InputRefused(
                f"artefact structure: '{name}' ({type(module).__name__}) cannot be factored as {spec!r}"
            )
        if not 1 <= rank <= _full_rank(module, kind):
            raise InputRefused(
                f"artefact structure: rank {rank} of '{name}' is outside 1..{_full_rank(module, kind)}"
            )
        model.set_submodule(name, _empty_factored(module, kind, rank))
