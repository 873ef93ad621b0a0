"""The compress job: measure the float model, apply a recipe, export, measure again, report.

Everything the report claims is measured in this one run: the fp32 model in PyTorch eager
(the baseline), the fp32 model exported to the deployment runtime (to separate runtime gains
from compression gains), and the compressed artefact in that runtime, timed interleaved.
"""

from __future__ import annotations

import copy
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pared.apply import Context, compress_
from pared.artefact import WEIGHTS, save_artefact
from pared.atomic import atomic_directory, atomic_write_text
from pared.config import BaseConfig, config_to_dict
from pared.errors import QualityGateFailed, UsageError
from pared.measure import (
    count_macs,
    count_params,
    energy_per_inference,
    file_bytes,
    interleaved_latency,
    latency_from_samples,
    load_and_run_memory_bytes,
    peak_memory_bytes,
)
from pared.measure.size import activation_bytes
from pared.onnx_export import export_onnx, uses_contrib_ops
from pared.report import render_markdown
from pared.runtime import RUNTIMES, make_runner
from pared.tasks import Task
from pared.weight_stats import layer_weight_stats

ONNX_FILE = "model.onnx"
PRDC_FILE = "model.prdc"
# Techniques whose gain is in storage (zeros, shared values, entropy coding): an ONNX export
# would store their weights densely again, so "auto" measures them in PyTorch from pared's files.
STORAGE_TECHNIQUES = {"magnitude_prune", "gradual_prune", "cluster", "entropy_code"}
EAGER_ONLY_TECHNIQUES = {"early_exit"}  # data-dependent control flow: there is no ONNX graph to export


def compress_task(
    task: Task,
    recipe: list[BaseConfig],
    out_dir: str | Path,
    *,
    recipe_name: str = "custom",
    runtime: str = "auto",
    threads: int = 2,
    batch: int = 8,
    latency_rounds: int = 20,
    overwrite: bool = False,
    max_drop: float | None = None,
    allow_regression: bool = False,
    source: dict[str, Any] | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Compress ``task``'s model with ``recipe``; write artefacts and reports into ``out_dir``.

    Args:
        task: the model, its data and its metric.
        recipe: technique configs applied in order.
        out_dir: output folder; created atomically (temp folder renamed at the end).
        runtime: where the compressed model runs: ``openvino``, ``onnxruntime``, ``torch``, or
            ``auto``: OpenVINO (the faster int8 runtime on CPU) unless the exported graph uses
            ONNX Runtime contrib ops (int4 ``MatMulNBits``), which only ONNX Runtime runs.
        threads: intra-op threads for every runtime measured.
        batch: batch size for latency, MACs, memory and energy.
        latency_rounds: timed calls per runner (interleaved).
        overwrite: replace an existing ``out_dir``.
        max_drop: quality gate: largest allowed drop of the primary metric (absolute).
        allow_regression: write the artefact even if the gate fails (marked in the report).
        source: how to rebuild the float model later, recorded in the artefact.
        on_metrics: called with ``{"baseline": ..., "compressed": ...}`` task metrics before the
            timing starts; it may raise to stop a hopeless job early (the search prunes trials so).
        strict: every step that would keep layers it cannot handle refuses the model instead
            (``pared.recipe.strict_recipe``); recorded as ``strict`` in the report.

    Returns:
        The report (also written as ``report.json`` and ``report.md``).

    Raises:
        UsageError: bad arguments, or ``out_dir`` exists without ``overwrite``.
        QualityGateFailed: the metric dropped more than ``max_drop``.
        InputRefused: with ``strict``, a step met a layer it cannot handle (int8).
    """
    out_dir = Path(out_dir)
    if strict:
        from pared.recipe import strict_recipe

        recipe = strict_recipe(recipe)
    if runtime not in (*RUNTIMES, "auto"):
        raise UsageError(f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    if threads < 1 or batch < 1 or latency_rounds < 1:
        raise UsageError("threads, batch and latency_rounds must be >= 1")
    if out_dir.exists() and not overwrite:
        raise UsageError(f"output directory already exists: {out_dir} (pass --overwrite to replace it)")
    techniques = {config_to_dict(c)["technique"] for c in recipe}
    if runtime == "auto" and techniques & (STORAGE_TECHNIQUES | EAGER_ONLY_TECHNIQUES):
        runtime = "torch"
    if runtime != "torch" and techniques & EAGER_ONLY_TECHNIQUES:
        raise UsageError(f"{sorted(techniques & EAGER_ONLY_TECHNIQUES)[0]} runs in PyTorch only: use --runtime torch or auto")
    torch.set_num_threads(threads)
    step = _Steps(6)
    step("loading the float model")
    fp32 = task.model()
    inputs = task.example_inputs(batch)
    step("applying the recipe")
    ctx = Context(calib=task.calibration(), task=task)
    compressed = compress_(copy.deepcopy(fp32), recipe, context=ctx)
    # scratch holds the fp32 ONNX file, which the memory measurement loads again after timing.
    with tempfile.TemporaryDirectory(prefix="pared-fp32-") as scratch, atomic_directory(out_dir, overwrite=overwrite) as tmp:
        step("exporting artefacts")
        save_artefact(compressed, tmp, recipe=recipe, source=source, structure=ctx.structure)
        if "entropy_code" in techniques:
            from pared.cluster import save_compressed

            # The entropy_code step already rounded the model to what the file stores.
            save_compressed(compressed, tmp / PRDC_FILE, half=False)
        runners, onnx_paths, loaders = _runners(task, fp32, compressed, inputs, tmp, Path(scratch), runtime, threads)
        step("evaluating the task metric (fp32 and compressed)")
        metrics = {"baseline": task.evaluate(runners["baseline"]), "compressed": task.evaluate(runners["compressed"])}
        if on_metrics is not None:
            on_metrics(metrics)
        step(f"timing {len(runners)} runners interleaved, batch {batch}, {threads} threads")
        samples = interleaved_latency(runners, inputs, rounds=latency_rounds, warmup=3)
        step("measuring size, MACs, memory and energy")
        report = _report(task, recipe, recipe_name, fp32, compressed, inputs, runners, samples, metrics,
                         tmp, onnx_paths, loaders, runtime=runners["compressed"].runtime, threads=threads, batch=batch)
        report["steps"] = ctx.summary
        report["strict"] = strict
        _quality_gate(task, report, max_drop, allow_regression)
        atomic_write_text(tmp / "report.json", _json(report))
        atomic_write_text(tmp / "report.md", render_markdown(report))
    return report


def _runners(task: Task, fp32: nn.Module, compressed: nn.Module, inputs, tmp: Path, scratch: Path, runtime: str,
             threads: int):
    """The runners to time, the ONNX files written, and a loader per side for the load-and-run memory
    figure (a torch loader copies the module, so its weights are allocated inside the measurement)."""
    names = task.input_names()
    runners: dict[str, Any] = {"baseline": make_runner("torch", model=fp32, threads=threads)}
    loaders: dict[str, Callable[[], Any]] = {
        "baseline": lambda: make_runner("torch", model=copy.deepcopy(fp32), threads=threads)
    }
    paths: dict[str, Path] = {}
    if runtime == "torch":
        runners["compressed"] = make_runner("torch", model=compressed, threads=threads)
        loaders["compressed"] = lambda: make_runner("torch", model=copy.deepcopy(compressed), threads=threads)
        return runners, paths, loaders
    paths["compressed"] = export_onnx(compressed, inputs, tmp / ONNX_FILE, input_names=names, dynamic_axes=task.dynamic_axes())
    if runtime == "auto":
        runtime = "onnxruntime" if uses_contrib_ops(paths["compressed"]) else "openvino"
    elif runtime.startswith("openvino") and uses_contrib_ops(paths["compressed"]):
        raise UsageError("this recipe exports ONNX Runtime contrib ops (int4 MatMulNBits) that OpenVINO cannot run: use --runtime onnxruntime or auto")
    fp32_onnx = export_onnx(fp32, inputs, scratch / "fp32.onnx", input_names=names, dynamic_axes=task.dynamic_axes())
    for side, path in (("fp32_same_runtime", fp32_onnx), ("compressed", paths["compressed"])):
        loaders[side] = functools.partial(make_runner, runtime, onnx_path=path, threads=threads, input_names=names)
        runners[side] = loaders[side]()
    return runners, paths, loaders


def _report(task, recipe, recipe_name, fp32, compressed, inputs, runners, samples, metrics, tmp, onnx_paths,
            loaders, *, runtime: str, threads: int, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        fp32_file = Path(scratch) / "fp32.safetensors"
        save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, str(fp32_file))
        fp32_bytes = file_bytes(fp32_file)
    deployed = onnx_paths.get("compressed") or next((p for p in (tmp / PRDC_FILE, tmp / WEIGHTS) if p.exists()))
    act_bytes = activation_bytes(fp32, inputs)
    mac_dtype = _mac_dtype(recipe) if runtime != "torch" else "fp32"
    sides = {
        "baseline": (fp32, runners["baseline"], "torch", fp32_bytes, "fp32"),
        "compressed": (compressed, runners["compressed"], runtime, file_bytes(deployed), mac_dtype),
    }
    report: dict[str, Any] = {"task": task.name, "primary_metric": task.primary_metric}
    for side, (model, run, rt, size, dtype) in sides.items():
        peak, mem_method = peak_memory_bytes(run, inputs)
        loaded, load_method = load_and_run_memory_bytes(loaders[side], inputs)
        # counted on each model: low-rank, channel pruning and early exit change the arithmetic
        macs = count_macs(model, inputs)
        energy = energy_per_inference(run, inputs, macs=macs, mac_dtype=dtype, weight_bytes=size, activation_bytes=act_bytes)
        report[side] = {
            "size_bytes": size,
            "params": count_params(model),
            "macs": macs,
            "latency_ms": latency_from_samples(samples[side], runtime=rt, batch=batch, threads=threads, warmup=3).to_dict(),
            "peak_memory_bytes": peak,
            "peak_memory_method": mem_method,
            "load_and_run_memory_bytes": loaded,
            "load_and_run_memory_method": load_method,
            "energy_j": energy.to_dict(),
            "metrics": metrics[side],
        }
    if "fp32_same_runtime" in samples:
        same_memory, same_method = load_and_run_memory_bytes(loaders["fp32_same_runtime"], inputs)
        report["fp32_same_runtime"] = {
            "latency_ms": latency_from_samples(samples["fp32_same_runtime"], runtime=runtime, batch=batch, threads=threads, warmup=3).to_dict(),
            "load_and_run_memory_bytes": same_memory,
            "load_and_run_memory_method": same_method,
        }
    base, comp = report["baseline"], report["compressed"]
    report["ratios"] = {
        "size": comp["size_bytes"] / base["size_bytes"],
        "latency_p50": comp["latency_ms"]["p50"] / base["latency_ms"]["p50"],
        "energy": comp["energy_j"]["value"] / base["energy_j"]["value"],
    }
    report["recipe"] = {"name": recipe_name, "steps": [config_to_dict(c) for c in recipe]}
    report["artefacts"] = [
        {"path": p.name, "format": _format_of(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.iterdir()) if p.is_file() and p.suffix in (".onnx", ".safetensors", ".json", ".prdc")
    ]
    report["environment"] = {"torch": torch.__version__, "threads": threads, "python": sys.version.split()[0]}
    report["weights"] = layer_weight_stats(fp32, compressed)
    return report


def _mac_dtype(recipe: list[BaseConfig]) -> str:
    """Data type of most multiply-accumulates in the exported runtime, for the energy estimate.

    Weight-only schemes are labelled fp32: the activations stay float in the graph (ONNX
    Runtime may still compute some in int8 blocks internally; the estimate stays conservative).
    PyTorch eager computes pared's quantized modules in float, hence fp32 for that runtime.
    """
    steps = [config_to_dict(c) for c in recipe]
    if any(s["technique"] == "int8" and s.get("mode") in ("static", "dynamic") for s in steps):
        return "int8"
    return "fp32"


def _quality_gate(task: Task, report: dict[str, Any], max_drop: float | None, allow_regression: bool) -> None:
    if max_drop is None:
        return
    key = task.primary_metric
    before, after = report["baseline"]["metrics"][key], report["compressed"]["metrics"][key]
    report["quality_gate"] = {"metric": key, "max_drop": max_drop, "passed": before - after <= max_drop}
    if before - after > max_drop and not allow_regression:
        # Enough digits that a small drop never prints as "from 1.0000 to 1.0000".
        raise QualityGateFailed(f"{key} dropped from {before:.6g} to {after:.6g} (by {before - after:.3g}), more than max_drop={max_drop}")


def _format_of(path: Path) -> str:
    if path.suffix == ".onnx":
        return "onnx-ort-contrib" if uses_contrib_ops(path) else "onnx-qdq"
    return {".safetensors": "safetensors", ".json": "json", ".prdc": "prdc"}[path.suffix]


def _json(report: dict[str, Any]) -> str:
    import json

    return json.dumps(report, indent=2, default=float)


class _Steps:
    """One stderr line per step, with the elapsed time of the previous one."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.n += 1
        now = time.perf_counter()
        print(f"[{self.n}/{self.total}] {what}  (+{now - self.t:.1f}s)", file=sys.stderr, flush=True)
        self.t = now
