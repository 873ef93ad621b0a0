"""The report page of a ``pared search`` folder: Pareto fronts, the before/after table of the
chosen points against fp32 and the peer tools, per-layer sensitivity and weight histograms.

Input is ``search.json`` as the search writes it (fields in docs/report.md); a Pareto point's
``points/trial-NNNN/report.json`` adds its weight histograms and measurement methods.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from pared import plots
from pared.errors import InputRefused
from pared.html_page import Figure, Page, Raw, md_table
from pared.html_report import (
    COST_KEYS,
    EXTRA_AXES,
    PARETO_AXES,
    add_weight_figures,
    load_json,
    number,
    require,
    safe_link,
)
from pared.report import measurement_notes

STATES = ("COMPLETE", "FAIL", "PRUNED")


def render_search(directory: Path, doc: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(HTML, Markdown, summary JSON) of a search folder."""
    path = directory / "search.json"
    trials, peers = _check_search(doc, path)
    metric, maximize = _primary(doc, path)
    base = doc["baseline"]
    counts = {s: sum(t["state"] == s for t in trials) for s in STATES}
    feasible = [t for t in trials if t["state"] == "COMPLETE" and t.get("feasible")]
    chosen = sorted((t for t in trials if t.get("pareto")), key=lambda t: _sort_key(t, metric, maximize))
    page = Page(f"pared search: {doc['task']}")
    summary_line = (f"Task {doc['task']}, runtime {doc.get('runtime', 'n/a')}, batch {doc.get('batch', 'n/a')}. "
                    f"{len(trials)} finished trials: {counts['COMPLETE']} complete ({len(feasible)} feasible), "
                    f"{counts['FAIL']} failed, {counts['PRUNED']} pruned; {len(chosen)} on the Pareto front.")
    objectives = ", ".join(f"{o['name']} ({o['direction']})" for o in doc["objectives"])
    constraints = ", ".join(map(str, doc.get("constraints") or [])) or "none"
    page.paragraph(summary_line)
    page.paragraph(f"Objectives: {objectives}. Constraints: {constraints}.")

    extra = _extra_costs(doc)
    page.heading("Pareto front")
    for key, label in [*PARETO_AXES, *((k, EXTRA_AXES[k]) for k in extra)]:
        _pareto_figure(page, trials, peers, base, key, label, metric, maximize)

    page.heading("Before / after: fp32, the Pareto points and the peers")
    header, rows, classes = _point_table(directory, page, base, chosen, peers, metric, extra)
    page.table("before-after", header, rows, row_classes=classes)

    page.heading("Per-layer sensitivity")
    sensitivity = doc.get("sensitivity")
    if isinstance(sensitivity, dict) and sensitivity and all(isinstance(v, dict) for v in sensitivity.values()):
        page.figure(Figure("sensitivity", plots.sensitivity_png(sensitivity, metric=metric),
                           "Metric drop when one layer (group) alone is compressed, before the search.",
                           "one compress + evaluation of the task per (layer, technique) on the fp32 model"))
    else:
        page.note("This search recorded no per-layer sensitivity.")

    page.heading("Weights of the best Pareto point")
    point_report, point, unreadable = _best_point_report(directory, chosen)
    for problem in unreadable:
        page.note(f"Skipped a Pareto point: {problem}")
    if point_report is None:
        page.note("No Pareto point folder with a readable report.json (points/trial-NNNN/) to take weight histograms from.")
    else:
        add_weight_figures(page, point_report.get("weights"), source=f"trial {point['number']}'s compress run")

    page.heading("All trials")
    page.table("trials", ["trial", "state", metric, "latency ratio", "size (bytes)", "energy (J)",
                          *(EXTRA_AXES[k] for k in extra), "feasible", "Pareto", "error"],
               [(t["number"], t["state"], _metric(t, metric), _metric(t, "latency_ratio"), _metric(t, "size_bytes"),
                 _metric(t, "energy_j"), *(_metric(t, k) for k in extra), t.get("feasible"), t.get("pareto"),
                 t.get("error") or "") for t in trials],
               collapsed=f"{len(trials)} trials (click to expand)")

    page.heading("How each figure was measured")
    notes = _search_notes(doc, constraints)
    if point_report is not None:
        notes += [(f"{what} (trial {point['number']})", how) for what, how in measurement_notes(point_report)]
    page.definitions(notes)

    markdown = "\n".join([
        f"# pared search: {doc['task']}", "", summary_line, "", f"Objectives: {objectives}. Constraints: {constraints}.", "",
        "## Before / after", "", md_table(header, [[_plain(c) for c in r] for r in rows]), "",
        "## How each figure was measured", "", *[f"- {a}: {b}" for a, b in notes], "",
    ])
    summary = _clean({
        "kind": "search", "task": doc["task"], "runtime": doc.get("runtime"), "batch": doc.get("batch"),
        "metric": metric, "maximize": maximize, "objectives": doc["objectives"], "constraints": doc.get("constraints") or [],
        "counts": {**counts, "feasible": len(feasible), "pareto": len(chosen)}, "baseline": base,
        "pareto": chosen, "peers": peers, "figures": page.figure_keys,
    })
    return page.html(), markdown, summary


def _check_search(doc: dict[str, Any], path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    for key in ("task", "objectives", "baseline", "trials"):
        require(doc, path, key)
    require(doc, path, "baseline", "metrics")
    if not isinstance(doc["trials"], list) or not isinstance(doc["baseline"]["metrics"], dict):
        raise InputRefused(f"{path}: 'trials' must be a list and 'baseline.metrics' an object")
    objectives = doc["objectives"]
    if not isinstance(objectives, list) or not objectives or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) and o.get("direction") in ("maximize", "minimize")
            for o in objectives):
        raise InputRefused(f"{path}: 'objectives' must be a non-empty list of {{name, direction: maximize|minimize}}")
    for i, t in enumerate(doc["trials"]):
        if not (isinstance(t, dict) and isinstance(t.get("number"), int) and t.get("state") in STATES
                and isinstance(t.get("metrics", {}), dict)):
            raise InputRefused(f"{path}: trials[{i}] needs an integer 'number', a state in {STATES} and 'metrics' as an object")
        t.setdefault("metrics", {})
    peers = doc.get("peers") or []
    if not isinstance(peers, list) or not all(isinstance(p, dict) and isinstance(p.get("metrics"), dict) for p in peers):
        raise InputRefused(f"{path}: 'peers' must be a list of {{name, metrics}}")
    return doc["trials"], peers


def _primary(doc: dict[str, Any], path: Path) -> tuple[str, bool]:
    """The quality objective the plots put on the y axis: the first objective that is not a cost."""
    for o in doc["objectives"]:
        if o["name"] not in COST_KEYS:
            return o["name"], o["direction"] == "maximize"
    metrics = list(doc["baseline"]["metrics"])
    if not metrics:
        raise InputRefused(f"{path}: no quality objective and no baseline metric to plot against the costs")
    return metrics[0], True  # task metrics in pared are higher-is-better unless an objective says otherwise


def _pareto_figure(page: Page, trials: list[dict[str, Any]], peers: list[dict[str, Any]], base: dict[str, Any],
                   key: str, label: str, metric: str, maximize: bool) -> None:
    points = [{"number": t["number"], "feasible": bool(t.get("feasible")), "pareto": bool(t.get("pareto")),
               "x": _metric(t, key), "y": _metric(t, metric)} for t in trials if t["state"] == "COMPLETE"]
    base_x = 1.0 if key == "latency_ratio" else number(base.get(key))
    baseline = {"x": base_x, "y": _baseline_metric(base, metric)}
    peer_points = [{"name": str(p.get("name", "peer")), "x": _metric(p, key), "y": _metric(p, metric)} for p in peers]
    if not any(plots.finite(p["x"], p["y"]) for p in [*points, baseline, *peer_points]):
        page.note(f"No trial, peer or baseline recorded both {metric} and {key}: no plot against {label}.")
        return
    png = plots.pareto_png(points, x_key=key, x_label=label, metric=metric, maximize=maximize,
                           baseline=baseline, peers=peer_points)
    page.figure(Figure(f"pareto-{key}", png,
                       f"{metric} against {label}: every completed trial (grey: violates a constraint), the fp32 baseline "
                       "(star), peer tools (green) and the front.",
                       _axis_method(key)))


def _axis_method(key: str) -> str:
    return {
        "latency_ratio": "each trial's p50 latency divided by the fp32 p50 measured interleaved in the same compress run",
        "size_bytes": "bytes of the file the runtime loads (ONNX, .prdc or safetensors) in each trial's compress run",
        "energy_j": "energy per batch from each trial's compress run (measured RAPL/NVML where readable, else estimated)",
        "memory_bytes": "highest process memory while each trial's compress run loaded the deployed file in its runtime "
                        "and ran it 3 times, minus the memory before",
        "macs": "multiply-accumulates per batch counted by torch's FLOP counter on each trial's compressed model",
    }[key]


def _extra_costs(doc: dict[str, Any]) -> list[str]:
    """Cost metrics beyond the standard axes that the search optimised or constrained, in order."""
    named = [o["name"] for o in doc["objectives"]]
    for c in doc.get("constraints") or []:
        match = re.match(r"\s*([A-Za-z_][\w.]*)", str(c))
        if match:
            named.append(match.group(1))
    return [k for k in EXTRA_AXES if k in named]


def _point_table(directory: Path, page: Page, base: dict[str, Any], chosen: list[dict[str, Any]],
                 peers: list[dict[str, Any]], metric: str, extra: list[str]) -> tuple[list[str], list[list[Any]], list[str]]:
    header = ["point", metric, "latency (ms)", "latency ratio", "size (bytes)", "size ratio", "energy (J)",
              *(EXTRA_AXES[k] for k in extra), "feasible", "recipe", "artefact", "params"]
    rows: list[list[Any]] = [["fp32 baseline", _baseline_metric(base, metric), number(base.get("latency_ms")), 1.0,
                              number(base.get("size_bytes")), 1.0, number(base.get("energy_j")),
                              *(number(base.get(k)) for k in extra), "", "", "", ""]]
    classes = ["baseline"]
    for t in chosen:
        rows.append([f"trial {t['number']}", *_value_cells(t, metric), *(_metric(t, k) for k in extra), t.get("feasible"),
                     page.link(safe_link(directory, t.get("recipe")), t.get("recipe") or ""),
                     page.link(safe_link(directory, t.get("artefact")), t.get("artefact") or ""),
                     ", ".join(f"{k}={v}" for k, v in (t.get("params") or {}).items())])
        classes.append("pareto")
    for p in peers:
        rows.append([f"peer: {p.get('name', '?')}", *_value_cells(p, metric), *(_metric(p, k) for k in extra),
                     "", "", "", ""])
        classes.append("peer")
    return header, rows, classes


def _value_cells(entry: dict[str, Any], metric: str) -> list[float | None]:
    return [_metric(entry, k) for k in (metric, "latency_ms", "latency_ratio", "size_bytes", "size_ratio", "energy_j")]


def _best_point_report(directory: Path, chosen: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
    """The report.json of the best Pareto point that has a readable one, that point, and why
    better points were skipped: one broken point folder must not hide the whole search."""
    skipped = []
    for t in chosen:  # already best first
        rel = safe_link(directory, t.get("artefact"))
        if not rel or not (directory / rel / "report.json").is_file():
            continue
        try:
            report = load_json(directory / rel / "report.json")
            measurement_notes(report)
        except InputRefused as exc:
            skipped.append(str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append(f"{directory / rel / 'report.json'}: unusable content ({type(exc).__name__}: {exc})")
        else:
            return report, t, skipped
    return None, {}, skipped


def _search_notes(doc: dict[str, Any], constraints: str) -> list[tuple[str, str]]:
    return [
        ("Trials", "each trial is one pared compress run of its recipe: fp32 and compressed measured in that run, "
                   "the compressed figures from the deployed artefact"),
        ("Feasible", f"a complete trial meeting every constraint ({constraints})"),
        ("Pareto point", "not dominated on all objectives by another feasible trial (among all complete trials if none is feasible)"),
        ("fp32 baseline", "task metrics evaluated once before the trials; latency, size and energy the median over the trials' own fp32 runs"),
        ("Peers", "the peer tools run on the same task, runtime and batch, measured the same way"),
        ("Sensitivity", "metric drop of the fp32 model with one layer alone compressed, measured before the search"),
    ]


def _metric(entry: dict[str, Any], key: str) -> float | None:
    metrics = entry.get("metrics")
    return number(metrics.get(key)) if isinstance(metrics, dict) else None


def _baseline_metric(base: dict[str, Any], metric: str) -> float | None:
    if metric == "metric_drop":
        return 0.0
    return number(base["metrics"].get(metric))


def _sort_key(t: dict[str, Any], metric: str, maximize: bool) -> tuple[float, int]:
    value = _metric(t, metric)
    if value is None:
        return (math.inf, t["number"])
    return (-value if maximize else value, t["number"])


def _plain(cell: Any) -> Any:
    """The Markdown form of a table cell: a link's text (the page builder made the markup)."""
    return html.unescape(re.sub(r"<[^>]*>", "", cell)) if isinstance(cell, Raw) else cell


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (report.json stays strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
