"""``pared report DIR``: one self-contained HTML page (plus Markdown and JSON) for a compress or
search output folder.

A folder with ``search.json`` is a search (see the output contract in docs/report.md); one with
only ``report.json`` is a ``pared compress`` output. The page has no external resource: CSS is
inline, each figure is a base64 PNG, links point only at files inside DIR. Everything is
rendered in memory first, then each file is written atomically, so a bad input writes nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pared import plots
from pared.atomic import atomic_write_text
from pared.errors import EnvironmentIOError, InputRefused, ParedError, UsageError
from pared.html_page import Figure, Page, fmt, md_table
from pared.plots import finite
from pared.report import before_after_rows, measurement_notes, render_markdown, same_runtime_sentence

MAX_JSON_BYTES = 64 * 1024 * 1024
# Costs a search can plot the metric against: (key in a trial's metrics, axis label).
PARETO_AXES = (
    ("latency_ratio", "latency ratio (compressed p50 / fp32 p50)"),
    ("size_bytes", "size on disk (bytes)"),
    ("energy_j", "energy per batch (J)"),
)
COST_KEYS = {"latency_ms", "latency_ratio", "size_bytes", "size_ratio", "macs", "energy_j", "memory_bytes"}
# Cost objectives a search may use beyond PARETO_AXES: plotted and tabled only when chosen.
EXTRA_AXES = {
    "memory_bytes": "memory to load and run (bytes)",
    "macs": "MACs per batch",
}
_SAFE_LINK = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def write_report(directory: str | Path) -> dict[str, Any]:
    """Render DIR's results to ``report.html``, ``report.md`` and (for a search) ``report.json``.

    Returns:
        ``{"kind": "compress" | "search", "files": [paths written]}``; a compress folder's
        report.json is its job's own record and is left as it is.

    Raises:
        UsageError: DIR is missing, not a folder, or holds neither ``search.json`` nor ``report.json``.
        InputRefused: the JSON is malformed or lacks a field the report needs.
        EnvironmentIOError: DIR cannot be read or written.
    """
    directory = Path(directory)
    if not directory.exists():
        raise UsageError(f"report directory does not exist: {directory}")
    if not directory.is_dir():
        raise UsageError(f"not a directory: {directory} (pass the --out folder of pared compress or pared search)")
    if (directory / "search.json").is_file():
        kind, source = "search", directory / "search.json"
    elif (directory / "report.json").is_file():
        kind, source = "compress", directory / "report.json"
    else:
        raise UsageError(f"{directory} has neither search.json nor report.json: not a pared compress or search output")
    data = load_json(source)
    # Imported here, not at the top, because search_report imports this module.
    from pared.search_report import render_search

    try:
        if kind == "search":
            page, markdown, summary = render_search(directory, data)
        else:
            (page, markdown), summary = render_compress(directory, data), None  # report.json stays the job's record
    except ParedError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as exc:
        # The checks above name the usual problems; anything else odd in the file ends here, as one line.
        raise InputRefused(f"{source}: unusable content ({type(exc).__name__}: {exc})") from None
    contents = {"report.html": page, "report.md": markdown}
    if summary is not None:
        contents["report.json"] = json.dumps(summary, indent=2, allow_nan=False, default=_json_default)
    for name, text in contents.items():
        atomic_write_text(directory / name, text)
    return {"kind": kind, "files": [directory / name for name in contents]}


def load_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path`` with one-line errors (size-capped, UTF-8)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InputRefused(f"{path} is {size:,} bytes, more than the {MAX_JSON_BYTES:,} a report reads")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputRefused(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise EnvironmentIOError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputRefused(f"malformed JSON in {path}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise InputRefused(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def require(data: Any, path: Path, *keys: str) -> Any:
    """``data[k1][k2]...``, or InputRefused naming the file and the missing or mistyped field."""
    where = []
    for key in keys:
        where.append(key)
        if not isinstance(data, dict) or key not in data:
            raise InputRefused(f"{path}: missing field {'.'.join(where)!r}")
        data = data[key]
    return data


def safe_link(directory: Path, rel: Any) -> str | None:
    """``rel`` if it names an existing file or folder inside DIR, written plainly; else None.

    search.json is data from disk: a path with ``..``, a scheme (``javascript:``) or an absolute
    path never becomes a link.
    """
    if not isinstance(rel, str) or not _SAFE_LINK.match(rel) or rel.startswith("/") or ".." in rel.split("/"):
        return None
    return rel if (directory / rel).exists() else None


def render_compress(directory: Path, report: dict[str, Any]) -> tuple[str, str]:
    """(HTML, Markdown) of a ``pared compress`` report.json."""
    path = directory / "report.json"
    _check_compress(report, path)
    task, recipe = report["task"], require(report, path, "recipe", "name")
    base, comp = report["baseline"], report["compressed"]
    page = Page(f"pared report: {task} with recipe {recipe}")
    page.paragraph(f"Task {task}; recipe {recipe}; fp32 in {base['latency_ms']['runtime']} against the compressed "
                   f"model in {comp['latency_ms']['runtime']}, measured in one run.")
    page.heading("Before / after")
    lat_b, lat_c = base["latency_ms"], comp["latency_ms"]
    page.table("before-after", ["", f"fp32 ({lat_b['runtime']})", f"compressed ({lat_c['runtime']})", "change"],
               before_after_rows(report))
    if "fp32_same_runtime" in report:
        page.paragraph(same_runtime_sentence(report))
    if "quality_gate" in report:
        gate = report["quality_gate"]
        page.paragraph(f"Quality gate on {gate['metric']} (max drop {gate['max_drop']}): "
                       f"{'passed' if gate['passed'] else 'FAILED'}.")
    ratios = _compress_ratios(base, comp)
    page.figure(Figure("ratios", plots.ratios_png(ratios), "Compressed / fp32 ratio of each measured quantity.",
                       "size and latency as in the table; energy as listed under the measurement methods"))
    add_weight_figures(page, report.get("weights"), source="this run")
    sensitivity = _prune_sensitivity(directory)
    if sensitivity is not None:
        table, metric = sensitivity
        page.figure(Figure("sensitivity", plots.sensitivity_png(table, metric=metric),
                           "Metric drop when one layer's channels alone are pruned (sensitivity.json).",
                           "one compress + evaluation per (layer, ratio) on the task's data"))
    page.heading("How each figure was measured")
    page.definitions(measurement_notes(report))
    steps = report.get("steps") or []
    if steps:
        page.heading("Steps")
        page.items(["; ".join(f"{k}: {_brief(v)}" for k, v in s.items()) for s in steps if isinstance(s, dict)])
    artefacts = [a for a in report.get("artefacts", []) if isinstance(a, dict)]
    if artefacts:
        page.heading("Files")
        page.table("artefacts", ["file", "format", "bytes"],
                   [(page.link(safe_link(directory, a.get("path")), a.get("path")), a.get("format"), fmt(a.get("bytes")))
                    for a in artefacts])
    return page.html(), render_markdown(report) + _weights_markdown(report.get("weights"))


def add_weight_figures(page: Page, weights: Any, *, source: str) -> None:
    """Histogram and per-layer SQNR figures, when report.json carries ``weights`` (older ones do not)."""
    layers = weights.get("layers") if isinstance(weights, dict) else None
    if not isinstance(layers, dict) or not layers or not all(_valid_layer(e) for e in layers.values()):
        page.note("No per-layer weight statistics in this report.json (written by an older pared, or no weighted layer).")
        return
    method = f"{weights.get('method', '')}; reference: {weights.get('reference', 'fp32')}; {source}"
    page.figure(Figure("histograms", plots.histograms_png(layers), "Weight histograms before and after compression.", method))
    page.figure(Figure("layer-error", plots.layer_error_png(layers), "Per-layer weight SQNR against fp32.", method))


def _check_compress(report: dict[str, Any], path: Path) -> None:
    for side in ("baseline", "compressed"):
        for key in ("size_bytes", "params", "macs", "peak_memory_bytes", "peak_memory_method", "metrics"):
            require(report, path, side, key)
        for key in ("p50", "p90", "runtime", "batch", "threads", "runs", "warmup"):
            require(report, path, side, "latency_ms", key)
        for key in ("value", "method"):
            require(report, path, side, "energy_j", key)
    require(report, path, "task")
    for side in ("baseline", "compressed"):
        numbers = [report[side][k] for k in ("size_bytes", "params", "macs")] + [report[side]["latency_ms"]["p50"]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise InputRefused(f"{path}: {side} has a non-numeric size, params, MACs or latency")


def _compress_ratios(base: dict[str, Any], comp: dict[str, Any]) -> dict[str, float]:
    pairs = {
        "size": (comp["size_bytes"], base["size_bytes"]),
        "latency p50": (comp["latency_ms"]["p50"], base["latency_ms"]["p50"]),
        "latency p90": (comp["latency_ms"]["p90"], base["latency_ms"]["p90"]),
        "energy": (comp["energy_j"]["value"], base["energy_j"]["value"]),
        "peak working memory": (comp["peak_memory_bytes"], base["peak_memory_bytes"]),
        "memory to load and run": (comp.get("load_and_run_memory_bytes"), base.get("load_and_run_memory_bytes")),
        "params": (comp["params"], base["params"]),
    }
    return {k: a / b for k, (a, b) in pairs.items() if finite(a, b) and b}


def _prune_sensitivity(directory: Path) -> tuple[dict[str, dict[str, float]], str] | None:
    """``sensitivity.json`` as written by ``pared.prune.sensitivity.save_sensitivity``, as a table."""
    path = directory / "sensitivity.json"
    if not path.is_file():
        return None
    data = load_json(path)
    layers = require(data, path, "layers")
    if not isinstance(layers, dict):
        raise InputRefused(f"{path}: field 'layers' must be an object")
    table = {name: {f"prune {float(r):.0%}": d for r, d in require(entry, path, "drops").items()}
             for name, entry in layers.items()}
    return table, str(data.get("metric", "metric"))


def _valid_layer(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    edges, before, after = entry.get("edges"), entry.get("before"), entry.get("after")
    return (isinstance(edges, list) and isinstance(before, list) and isinstance(after, list)
            and len(edges) == len(before) + 1 == len(after) + 1 and len(before) > 0
            and finite(*edges, *before, *after) and isinstance(entry.get("numel_before"), int))


def _weights_markdown(weights: Any) -> str:
    layers = weights.get("layers") if isinstance(weights, dict) else None
    if not isinstance(layers, dict) or not layers:
        return ""
    rows = [(name, e.get("type"), fmt(e.get("numel_before")), fmt(e.get("numel_after")),
             f"{e.get('zeros_before', 0):.1%}", f"{e.get('zeros_after', 0):.1%}", fmt(e.get("sqnr_db")))
            for name, e in layers.items() if isinstance(e, dict)]
    return "\n## Per-layer weights\n\n" + md_table(
        ["layer", "type", "elements before", "elements after", "zeros before", "zeros after", "SQNR (dB)"], rows) + "\n"


def _brief(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} items ({', '.join(map(str, value[:3]))}, ...)"
    return str(value)


def _json_default(value: Any) -> Any:
    return str(value)


def number(value: Any) -> float | None:
    """A finite float from a number or an ``{"value": x}`` dict (energy in report.json), else None."""
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if finite(value) else None
