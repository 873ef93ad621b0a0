"""Render a compress report (the dict written to report.json) as Markdown."""

from __future__ import annotations

from typing import Any


def before_after_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, fp32, compressed, change) rows of the before/after table, formatted for display."""
    base, comp = report["baseline"], report["compressed"]
    lat_b, lat_c = base["latency_ms"], comp["latency_ms"]
    rows = [
        ("size on disk", _mb(base["size_bytes"]), _mb(comp["size_bytes"]), _ratio(comp["size_bytes"], base["size_bytes"])),
        ("parameters (stored elements)", f"{base['params']:,}", f"{comp['params']:,}", _ratio(comp["params"], base["params"])),
        ("MACs per batch", f"{base['macs']:,}", f"{comp['macs']:,}", _ratio(comp["macs"], base["macs"])),
        ("latency p50 (ms)", f"{lat_b['p50']:.2f}", f"{lat_c['p50']:.2f}", _ratio(lat_c["p50"], lat_b["p50"])),
        ("latency p90 (ms)", f"{lat_b['p90']:.2f}", f"{lat_c['p90']:.2f}", _ratio(lat_c["p90"], lat_b["p90"])),
        ("peak working memory", _mb(base["peak_memory_bytes"]), _mb(comp["peak_memory_bytes"]), ""),
        ("energy per batch (J)", f"{base['energy_j']['value']:.4f}", f"{comp['energy_j']['value']:.4f}",
         _ratio(comp["energy_j"]["value"], base["energy_j"]["value"])),
    ]
    if "load_and_run_memory_bytes" in base and "load_and_run_memory_bytes" in comp:  # absent before 2026-11-25
        b, c = base["load_and_run_memory_bytes"], comp["load_and_run_memory_bytes"]
        rows.insert(5, ("memory to load and run", _mb(b), _mb(c), _ratio(c, b)))
    for key in base["metrics"]:
        b, c = base["metrics"][key], comp["metrics"].get(key, float("nan"))
        rows.append((f"metric: {key}", f"{b:.4f}", f"{c:.4f}", f"{c - b:+.4f}"))
    return rows


def same_runtime_sentence(report: dict[str, Any]) -> str:
    """What compression adds over exporting the fp32 model to the same runtime: latency, and memory
    to load and run where the report has it (reports before 2026-11-25 do not)."""
    same, comp = report["fp32_same_runtime"], report["compressed"]
    runtime = comp["latency_ms"]["runtime"]
    text = (f"fp32 exported to {runtime}: p50 {same['latency_ms']['p50']:.2f} ms, so compression alone gives "
            f"{_ratio(comp['latency_ms']['p50'], same['latency_ms']['p50'])} of the runtime's own fp32 latency")
    if "load_and_run_memory_bytes" in same and "load_and_run_memory_bytes" in comp:
        text += (f"; memory to load and run {_mb(same['load_and_run_memory_bytes'])}, so "
                 f"{_ratio(comp['load_and_run_memory_bytes'], same['load_and_run_memory_bytes'])} of its fp32 memory")
    return text + "."


def render_markdown(report: dict[str, Any]) -> str:
    """A before/after table plus how each figure was measured."""
    base, comp = report["baseline"], report["compressed"]
    lat_b, lat_c = base["latency_ms"], comp["latency_ms"]
    rows = before_after_rows(report)
    lines = [
        f"# pared report: {report['task']} with recipe `{report['recipe']['name']}`",
        "",
        f"| | fp32 ({lat_b['runtime']}) | compressed ({lat_c['runtime']}) | change |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    if "fp32_same_runtime" in report:
        lines += [same_runtime_sentence(report), ""]
    if "quality_gate" in report:
        g = report["quality_gate"]
        lines += [f"Quality gate on {g['metric']} (max drop {g['max_drop']}): {'passed' if g['passed'] else 'FAILED'}", ""]
    lines += [
        "## How each figure was measured",
        "",
        *[f"- {what}: {how}" for what, how in measurement_notes(report)],
        "",
        "## Steps",
        "",
        *[_step_line(s) for s in report.get("steps", [])],
        "",
    ]
    return "\n".join(lines)


def measurement_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, how it was measured) pairs, from the method fields the measurements recorded."""
    base, comp = report["baseline"], report["compressed"]
    lat = base["latency_ms"]
    weights = [("Weight histograms and SQNR", report["weights"]["method"] + ".")] if "weights" in report else []
    return [
        ("Latency", f"batch {lat['batch']}, {lat['threads']} threads, {lat['runs']} timed calls per runner "
                    f"after {lat['warmup']} warm-up calls, runners interleaved round-robin in one process."),
        ("Size", "bytes of the deployed file (fp32: safetensors state_dict; compressed: the artefact the runtime loads)."),
        ("MACs", "torch FLOP counter on each PyTorch model (int8 layers count as the float matmuls they replace)."),
        ("Peak working memory", f"{base['peak_memory_method']}: the rise in process memory during a few observed "
                                 "calls, after warm-up calls. Memory a runtime holds from loading or warm-up (the weights, "
                                 "buffers OpenVINO allocates once) is not in it, so a runtime that preallocates reads near 0."),
        *([("Memory to load and run", f"{base['load_and_run_memory_method']}: the highest process memory while the "
                                        f"model is loaded (fp32: its module copied; compressed: {_loaded_how(comp)}) and run "
                                        "3 times, minus the memory before: weights, runtime buffers and activations together.")]
          if "load_and_run_memory_method" in base else []),
        ("Energy", f"{base['energy_j']['method']} (fp32) / {comp['energy_j']['method']} (compressed)."),
        ("Metrics", "the task's evaluation run through each runtime (the compressed figures come from the deployed artefact)."),
        *weights,
    ]


def _step_line(step: dict[str, Any]) -> str:
    # Long layer lists (every Linear of a transformer) are summarised; report.json keeps them whole.
    parts = []
    for key, value in step.items():
        if isinstance(value, list) and len(value) > 6:
            value = f"{len(value)} layers ({', '.join(map(str, value[:3]))}, ...)"
        parts.append(f"{key}: {value}")
    return "- " + "; ".join(parts)


def _loaded_how(side: dict[str, Any]) -> str:
    if side["latency_ms"]["runtime"] == "torch":
        return "its module copied"
    return "its file read and compiled by the runtime"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "n/a"
