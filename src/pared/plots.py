"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes plain report data (dicts and lists read from report.json / search.json)
so that it can be tested without a model. Non-finite values are left out of a plot, never
drawn at an arbitrary place.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, the same output on every machine
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100
FIGSIZE = (7.6, 4.3)
# Distinct shapes for peer tools, so they stay apart from pared's round trial markers in greyscale too.
PEER_MARKERS = ("D", "^", "v", "P", "X", "s")
FEASIBLE, INFEASIBLE, FRONT = "tab:blue", "0.72", "tab:red"


def finite(*values: Any) -> bool:
    """True when every value is a real finite number (bools excluded)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def front_2d(points: Sequence[tuple[float, float]], *, maximize_y: bool) -> list[int]:
    """Indices of the non-dominated points when x is minimised and y maximised (or minimised).

    A point is dominated when another is at least as good on both axes and better on one.
    Returned in increasing x, so consecutive indices draw the front as a staircase.
    """
    sign = -1.0 if maximize_y else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        y = sign * points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


def pareto_png(
    trials: Sequence[dict[str, Any]],
    *,
    x_key: str,
    x_label: str,
    metric: str,
    maximize: bool,
    baseline: dict[str, Any] | None,
    peers: Sequence[dict[str, Any]],
) -> bytes:
    """Metric against one cost (latency ratio, size, energy) for every completed trial.

    Args:
        trials: ``{"number", "feasible", "pareto", "x", "y"}`` per completed trial.
        baseline: ``{"x", "y"}`` of the fp32 model, or None.
        peers: ``{"name", "x", "y"}`` per peer tool.
    """
    fig, ax = plt.subplots(figsize=FIGSIZE)
    shown = [t for t in trials if finite(t["x"], t["y"])]
    infeasible = [t for t in shown if not t["feasible"]]
    feasible = [t for t in shown if t["feasible"]]
    if infeasible:
        ax.scatter([t["x"] for t in infeasible], [t["y"] for t in infeasible], s=22, c=INFEASIBLE,
                   label=f"trial, infeasible ({len(infeasible)})", zorder=2)
    if feasible:
        ax.scatter([t["x"] for t in feasible], [t["y"] for t in feasible], s=28, c=FEASIBLE,
                   label=f"trial, feasible ({len(feasible)})", zorder=3)
    front = [feasible[i] for i in front_2d([(t["x"], t["y"]) for t in feasible], maximize_y=maximize)]
    if front:
        ax.step([t["x"] for t in front], [t["y"] for t in front], where="post", c=FRONT, lw=1.4,
                label="front on these two axes", zorder=4)
    marked = [t for t in shown if t.get("pareto")]
    if marked:
        ax.scatter([t["x"] for t in marked], [t["y"] for t in marked], s=90, facecolors="none",
                   edgecolors=FRONT, lw=1.3, label="Pareto point of the search", zorder=5)
        for t in marked:
            ax.annotate(f"#{t['number']}", (t["x"], t["y"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if baseline and finite(baseline["x"], baseline["y"]):
        ax.scatter([baseline["x"]], [baseline["y"]], marker="*", s=220, c="black", label="fp32 baseline", zorder=6)
    for i, peer in enumerate(p for p in peers if finite(p["x"], p["y"])):
        ax.scatter([peer["x"]], [peer["y"]], marker=PEER_MARKERS[i % len(PEER_MARKERS)], s=80, c="tab:green", edgecolors="black",
                   label=f"peer: {peer['name']}", zorder=6)
    if _spans_decades([t["x"] for t in shown] + [p["x"] for p in peers if finite(p["x"])]
                      + ([baseline["x"]] if baseline and finite(baseline["x"]) else [])):
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{metric} ({'higher' if maximize else 'lower'} is better)")
    ax.set_title(f"{metric} vs {x_label}")
    if not shown:
        ax.text(0.5, 0.5, "no completed trial has both values", transform=ax.transAxes, ha="center", color="0.4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def histograms_png(layers: dict[str, dict[str, Any]], *, panels: int = 6) -> bytes:
    """Weight histograms before (grey) and after (blue): all layers pooled, then the largest layers.

    The pooled panel adds each layer's counts on its own edges, so it shows shape per layer
    range rather than one global grid: it is drawn as the distribution of bin centres.
    """
    biggest = sorted(layers, key=lambda n: -layers[n]["numel_before"])[:panels - 1]
    names = ["all layers", *biggest]
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(FIGSIZE[0] + 1.4, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        if name == "all layers":
            _pooled_panel(ax, layers)
        else:
            entry = layers[name]
            _hist_panel(ax, entry["edges"], entry["before"], entry["after"])
            sqnr = entry.get("sqnr_db")
            extra = f", SQNR {sqnr:.1f} dB" if finite(sqnr) else ""
            ax.set_title(f"{_short(name)}\n{entry['numel_before']:,} weights{extra}", fontsize=7.5)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Weight histograms (log count): fp32 before, compressed after", fontsize=10)
    return _png(fig)


def layer_error_png(layers: dict[str, dict[str, Any]]) -> bytes:
    """Per-layer weight SQNR (dB) as horizontal bars: the layers compression disturbed most are shortest."""
    names = [n for n in layers if finite(layers[n].get("sqnr_db"))]
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], max(2.2, 0.22 * len(names) + 1.2)))
    values = [layers[n]["sqnr_db"] for n in names]
    ax.barh(range(len(names)), values, color=FEASIBLE)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("weight SQNR vs fp32 (dB, higher = closer)")
    ax.set_title("Per-layer weight error")
    if not names:
        ax.text(0.5, 0.5, "no layer with a defined SQNR (shapes changed or weights identical)",
                transform=ax.transAxes, ha="center", color="0.4")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def sensitivity_png(table: dict[str, dict[str, float]], *, metric: str) -> bytes:
    """Heat map of the metric drop when one layer alone is compressed by each technique."""
    layers = list(table)
    columns = sorted({c for row in table.values() for c in row})
    values = [[_or_nan(table[layer].get(c)) for c in columns] for layer in layers]
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], max(2.4, 0.26 * len(layers) + 1.4)))
    image = ax.imshow(values, aspect="auto", cmap="Reds", interpolation="nearest")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(layers)), [_short(n) for n in layers], fontsize=7)
    if len(layers) * len(columns) <= 120:
        top = max((abs(v) for row in values for v in row if not math.isnan(v)), default=0.0)
        for r, row in enumerate(values):
            for c, v in enumerate(row):
                dark = not math.isnan(v) and top > 0 and v > 0.6 * top  # white text on the darkest cells
                ax.text(c, r, "n/a" if math.isnan(v) else f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label=f"{metric} drop")
    ax.set_title("Per-layer sensitivity (that layer alone compressed)")
    return _png(fig)


def ratios_png(ratios: dict[str, float]) -> bytes:
    """Compressed / fp32 ratio per measured quantity, with the 1.0 line (below = smaller/faster)."""
    names = [k for k, v in ratios.items() if finite(v)]
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], 3.2))
    values = [ratios[k] for k in names]
    bars = ax.bar(names, values, color=[FEASIBLE if v <= 1 else "tab:orange" for v in values])
    ax.bar_label(bars, labels=[f"{v:.3f}x" for v in values], fontsize=8)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_ylabel("compressed / fp32")
    ax.set_title("Before/after ratios (1.0 = unchanged)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _hist_panel(ax: Any, edges: Sequence[float], before: Sequence[int], after: Sequence[int]) -> None:
    ax.stairs(before, edges, fill=True, color="0.75", label="fp32")
    ax.stairs(after, edges, color=FEASIBLE, lw=1.2, label="compressed")
    ax.set_yscale("log")
    ax.tick_params(labelsize=7)


def _pooled_panel(ax: Any, layers: dict[str, dict[str, Any]]) -> None:
    # Pool on one grid spanning every layer: each layer's bins are re-binned by their centres.
    lo = min(e["edges"][0] for e in layers.values())
    hi = max(e["edges"][-1] for e in layers.values())
    bins = len(next(iter(layers.values()))["before"])
    grid = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    before, after = [0] * bins, [0] * bins
    for e in layers.values():
        for k in range(len(e["before"])):
            centre = (e["edges"][k] + e["edges"][k + 1]) / 2
            slot = min(bins - 1, max(0, int((centre - lo) / (hi - lo) * bins))) if hi > lo else 0
            before[slot] += e["before"][k]
            after[slot] += e["after"][k]
    _hist_panel(ax, grid, before, after)
    ax.set_title(f"all {len(layers)} layers\npooled", fontsize=7.5)


def _spans_decades(values: Sequence[float]) -> bool:
    """True when positive values spread over more than ~1.3 decades: a log axis keeps them apart."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _or_nan(value: Any) -> float:
    return float(value) if finite(value) else math.nan


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Layer and peer names come from the user's files; a character the font lacks is drawn
        # as a box, which is all a warning could say.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()
