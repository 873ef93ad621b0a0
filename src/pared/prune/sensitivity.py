"""Sensitivity analysis: how much the task metric drops when one group is pruned alone, and
non-uniform per-group ratios that meet a global target where it hurts least.

``sensitivity`` prunes each group (by default every prunable channel group) at several ratios on
a fresh copy of the model and evaluates the task: one ``compress_`` + one evaluation per (group,
ratio). ``save_sensitivity`` writes the result as JSON and, when matplotlib is installed, a PNG
plot (matplotlib is optional; without it the plot is skipped and the returned dict says so).
``allocate_ratios`` turns the measurements into ``ChannelPruneConfig(per_layer=...)``.

Example:
    >>> sens = sensitivity(task.model, task, ratios=(0.25, 0.5, 0.75))
    >>> per_layer = allocate_ratios(sens, 0.5)
    >>> compress_(model, ChannelPruneConfig(ratio=0.0, per_layer=per_layer), calib=task.calibration())
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pared.apply import Context, compress_
from pared.atomic import atomic_write_bytes, atomic_write_text
from pared.calib import checked_batches
from pared.config import BaseConfig, config_to_dict
from pared.errors import UsageError
from pared.prune.graph import build_dependency_graph
from pared.prune.structured import ChannelPruneConfig

ConfigFactory = Callable[[str, float], BaseConfig]
PLOT_MISSING = "plot skipped: matplotlib is not installed (pip install matplotlib)"


def channel_config(layer: str, ratio: float) -> ChannelPruneConfig:
    """The default config of one measurement: prune only the group of ``layer`` at ``ratio``."""
    return ChannelPruneConfig(ratio=ratio, include=(layer,))


def sensitivity(
    model_fn: Callable[[], nn.Module],
    task: Any,
    *,
    layers: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    make_config: ConfigFactory = channel_config,
    calib: Iterable[Any] | None = None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """Metric drop of pruning each group alone at each ratio.

    Args:
        model_fn: returns a fresh fp32 model (called once per measurement, plus once).
        task: has ``evaluate(run) -> dict`` and ``primary_metric`` (and ``calibration()`` when
            ``calib`` is not given).
        layers: group names (a producer layer of each group); default: every prunable channel
            group of the traced model.
        ratios: pruning ratios to measure, each in (0, 1).
        make_config: ``(layer, ratio) -> config`` for one measurement (default: channel pruning
            of that group only).
        calib: example inputs for tracing (default ``task.calibration()``).
        higher_is_better: the metric's direction; the drop is ``baseline - value`` when True.

    Returns:
        ``{"metric", "baseline", "ratios", "higher_is_better", "technique", "layers": {name:
        {"channels": n, "drops": {"0.25": drop, ...}}}}``; JSON-friendly.
    """
    ratios = sorted(float(r) for r in ratios)
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UsageError(f"sensitivity ratios must be in (0, 1), got {ratios}")
    calib = calib if calib is not None else task.calibration()
    inputs = checked_batches(calib, limit=1)[0]
    metric = task.primary_metric
    base_model = model_fn().eval()
    baseline = float(task.evaluate(base_model)[metric])
    sizes = {g.name: g.size for g in build_dependency_graph(base_model, inputs).groups if g.prunable}
    if layers is None:
        layers = list(sizes)
    unknown = [name for name in layers if make_config is channel_config and name not in sizes]
    if unknown:
        raise UsageError(f"sensitivity: {unknown} name no prunable channel group; known: {list(sizes)}")
    out: dict[str, Any] = {
        "metric": metric, "baseline": baseline, "ratios": ratios, "higher_is_better": higher_is_better,
        "technique": config_to_dict(make_config(layers[0], ratios[0]))["technique"] if layers else None,
        "layers": {},
    }
    for name in layers:
        drops: dict[str, float] = {}
        for r in ratios:
            cfg = make_config(name, r)
            model = compress_(model_fn().eval(), cfg, context=Context(calib=[inputs]))
            value = float(task.evaluate(model)[metric])
            drops[_key(r)] = (baseline - value) if higher_is_better else (value - baseline)
        out["layers"][name] = {"channels": sizes.get(name), "drops": drops}
    return out


def save_sensitivity(result: dict[str, Any], directory: str | os.PathLike[str]) -> dict[str, str | None]:
    """Write ``sensitivity.json`` and, with matplotlib, ``sensitivity.png`` into ``directory``.

    Returns:
        ``{"json": path, "plot": path or None, "note": why there is no plot, or None}``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "sensitivity.json"
    atomic_write_text(json_path, json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"json": str(json_path), "plot": None, "note": PLOT_MISSING}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in result["layers"].items():
        rs = [0.0] + [float(k) for k in entry["drops"]]
        ds = [0.0] + list(entry["drops"].values())
        ax.plot(rs, ds, marker="o", label=f"{name} ({entry.get('channels')})")
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_ylabel(f"{result['metric']} drop")
    ax.set_title(f"Pruning sensitivity (baseline {result['metric']} = {result['baseline']:.4g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    plot_path = directory / "sensitivity.png"
    atomic_write_bytes(plot_path, buffer.getvalue())
    return {"json": str(json_path), "plot": str(plot_path), "note": None}


def allocate_ratios(
    result: dict[str, Any], global_target: float, *, max_ratio: float | None = None
) -> dict[str, float]:
    """Per-group ratios whose channel-weighted mean is ``global_target``, lowest drop first.

    Every group is pruned up to a common tolerated drop tau: its ratio is the largest r whose
    (monotone envelope of the) measured drop, linearly interpolated from (0, 0), stays <= tau.
    tau is found by bisection so that ``sum(channels * r) / sum(channels)`` equals the target.
    Groups are never pruned past ``max_ratio`` nor past the largest measured ratio (nothing is
    extrapolated).

    Args:
        result: the output of ``sensitivity``.
        global_target: wanted fraction of all measured groups' channels removed, in [0, 1).

    Returns:
        ``{group name: ratio}`` for ``ChannelPruneConfig(per_layer=...)``.

    Raises:
        UsageError: the target is out of range or above what ``max_ratio`` allows.
    """
    if not 0.0 <= global_target < 1.0:
        raise UsageError(f"global_target must be in [0, 1), got {global_target}")
    layers = result.get("layers") or {}
    if not layers:
        raise UsageError("allocate_ratios: the sensitivity result has no layers")
    measured = max(result["ratios"])
    cap = measured if max_ratio is None else min(max_ratio, measured)  # never extrapolate
    curves = {name: _envelope(entry["drops"], cap) for name, entry in layers.items()}
    weight = {name: float(entry.get("channels") or 1) for name, entry in layers.items()}
    total = sum(weight.values())

    def mean_ratio(tau: float) -> float:
        return sum(weight[n] * _ratio_at(curves[n], tau) for n in layers) / total

    most = mean_ratio(math.inf)
    if global_target > most + 1e-9:
        raise UsageError(f"global_target {global_target} is above the {most:.3f} reachable with max_ratio={cap}")
    lo, hi = 0.0, max(p[1] for c in curves.values() for p in c) + 1.0
    if mean_ratio(lo) >= global_target:
        hi = lo
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_ratio(mid) < global_target:
            lo = mid
        else:
            hi = mid
    return {name: round(min(_ratio_at(curves[name], hi), cap), 6) for name in layers}


def _key(r: float) -> str:
    return f"{r:g}"


def _envelope(drops: dict[str, float], cap: float) -> list[tuple[float, float]]:
    """(ratio, drop) points from (0, 0) up to ``cap``, drop made non-decreasing and, by a tiny
    slope, strictly increasing (so the inverse is a function and bisection is exact)."""
    pts = sorted((float(r), float(d)) for r, d in drops.items() if float(r) <= cap + 1e-12)
    out = [(0.0, 0.0)]
    running = 0.0
    for r, d in pts:
        running = max(running, d)
        out.append((r, running + 1e-9 * r))
    return out


def _ratio_at(curve: list[tuple[float, float]], tau: float) -> float:
    """Largest ratio on the piecewise-linear ``curve`` whose drop is <= ``tau``."""
    best = 0.0
    for (r0, d0), (r1, d1) in zip(curve, curve[1:]):
        if d1 <= tau:
            best = r1
            continue
        if d0 <= tau < d1:
            best = r0 + (r1 - r0) * (tau - d0) / (d1 - d0)
        break
    return best

