"""Objectives and constraints of a search, read from the same ``report.json`` ``pared compress`` writes.

Metric names a search may use:

- the task's metrics (``accuracy``, ``mean_cosine``, ...): higher is better;
- ``metric_drop``: baseline minus compressed primary metric, both measured in the trial's run;
- ``latency_ms`` (p50 of the compressed model) and ``latency_ratio`` (against fp32 PyTorch eager
  timed interleaved in the same run), ``size_bytes`` / ``size_ratio`` (the deployed file),
  ``macs``, ``energy_j``, ``memory_bytes`` (memory to load and run the deployed file in its
  runtime, weights included): lower is better.

A constraint is ``"<name> <=|>= <number>[%]"``; ``%`` makes ``metric_drop`` relative to the
baseline value (``metric_drop <= 1%``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from pared.errors import UsageError

LOWER_IS_BETTER = ("metric_drop", "latency_ms", "latency_ratio", "size_bytes", "size_ratio", "macs", "energy_j",
                   "memory_bytes")
ALIASES = {"latency": "latency_ratio", "size": "size_bytes", "energy": "energy_j", "memory": "memory_bytes"}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*(%?)\s*$")


@dataclasses.dataclass(frozen=True)
class Objective:
    """One optimization direction: ``name`` is a metric key, ``direction`` Optuna's word."""

    name: str
    direction: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "direction": self.direction}


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``name op bound``; ``relative`` scales the bound by the baseline primary metric."""

    name: str
    op: str
    bound: float
    relative: bool = False

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.bound:g}{'%' if self.relative else ''}"

    def violation(self, metrics: dict[str, float], baseline: float) -> float:
        """Optuna's convention: <= 0 when satisfied, the size of the violation otherwise."""
        bound = self.bound / 100.0 * abs(baseline) if self.relative else self.bound
        value = metrics[self.name]
        return value - bound if self.op == "<=" else bound - value


def known_metrics(task_metrics: Sequence[str]) -> list[str]:
    """Every name an objective or constraint may use for a task with ``task_metrics``."""
    return [*task_metrics, *LOWER_IS_BETTER]


def parse_objectives(names: Sequence[str], task_metrics: Sequence[str], primary: str) -> list[Objective]:
    """Objectives from names (``metric`` is the primary task metric; ``latency``, ``size`` and
    ``energy`` and ``memory`` are short for ``latency_ratio``, ``size_bytes``, ``energy_j`` and
    ``memory_bytes``).

    Raises:
        UsageError: no objective, a repeated one, or a name that is not a known metric.
    """
    if not names:
        raise UsageError("a search needs at least one objective")
    known = known_metrics(task_metrics)
    out: list[Objective] = []
    for raw in names:
        name = primary if raw == "metric" else ALIASES.get(raw, raw)
        if name not in known:
            raise UsageError(f"objective {raw!r} names an unknown metric; known: {', '.join(known)}")
        if any(o.name == name for o in out):
            raise UsageError(f"objective {name!r} given twice")
        out.append(Objective(name, "minimize" if name in LOWER_IS_BETTER else "maximize"))
    return out


def parse_constraint(text: str, task_metrics: Sequence[str]) -> Constraint:
    """``"latency_ratio <= 0.2"`` to a ``Constraint``.

    Raises:
        UsageError: bad syntax, an unknown metric, ``%`` on anything but ``metric_drop``.
    """
    match = _CONSTRAINT.match(text)
    if not match:
        raise UsageError(f"constraint {text!r} is not '<metric> <= <number>' or '<metric> >= <number>'")
    name, op, number, percent = match.groups()
    name = ALIASES.get(name, name)
    known = known_metrics(task_metrics)
    if name not in known:
        raise UsageError(f"constraint {text!r} names an unknown metric {name!r}; known: {', '.join(known)}")
    try:
        bound = float(number)
    except ValueError:
        raise UsageError(f"constraint {text!r}: {number!r} is not a number") from None
    if not math.isfinite(bound):
        raise UsageError(f"constraint {text!r}: the bound must be finite")
    if percent and name != "metric_drop":
        raise UsageError(f"constraint {text!r}: '%' is only meaningful for metric_drop")
    return Constraint(name, op, bound, bool(percent))


def metrics_from_report(report: dict[str, Any]) -> dict[str, float]:
    """The flat metric dict of one trial, from its ``report.json`` (see the module docstring)."""
    base, comp = report["baseline"], report["compressed"]
    primary = report["primary_metric"]
    out = {k: float(v) for k, v in comp["metrics"].items()}
    out.update({
        "metric_drop": float(base["metrics"][primary]) - float(comp["metrics"][primary]),
        "latency_ms": float(comp["latency_ms"]["p50"]),
        "latency_ratio": float(report["ratios"]["latency_p50"]),
        "size_bytes": int(comp["size_bytes"]),
        "size_ratio": float(report["ratios"]["size"]),
        "macs": int(comp["macs"]),
        "energy_j": float(comp["energy_j"]["value"]),
    })
    if "load_and_run_memory_bytes" in comp:  # reports written before 2026-11-25 lack it
        out["memory_bytes"] = int(comp["load_and_run_memory_bytes"])
    return out


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        better = better or x < y
    return better


def pareto_indices(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (duplicates all kept)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]
