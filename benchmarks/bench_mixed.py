"""MiniLM int4 / mixed precision on ONNX Runtime against int8 and fp32, in one process.

Prints one JSON object per line on stdout (progress goes to stderr):

- one line per (method, batch size): p50/p90 latency, the p50 ratio against fp32 PyTorch eager in
  the same interleaved run, the artefact's real file size, mean/min cosine and top-10 overlap
  against the fp32 model, and whether it meets the issue's target (<= 15 MB, mean cosine >= 0.99);
- one ``"plan": true`` line per mixed method with its per-layer plan;
- one ``"timing": true`` line per batch size and a ``"summary": true`` line.

Methods (2 intra-op threads each; every compressed one is its exported ONNX file in ONNX Runtime):

- ``torch-fp32-eager``: the fp32 model, the baseline of every ratio; ``fp32-onnxruntime``: its export;
- ``int8-onnxruntime``: the built-in ``int8`` recipe (SmoothQuant + static int8, QDQ);
- ``int4-rtn-onnxruntime``: weight-only int4, groups of 32, round to nearest, embeddings too;
- ``int4-gptq-onnxruntime``: the built-in ``int4`` recipe (GPTQ, groups of 32);
- ``int4-mixed-onnxruntime``: the built-in ``int4-mixed`` recipe (hand-written rules for BERT encoders);
- ``minilm-mixed-15mb-onnxruntime``: the built-in ``minilm-mixed-15mb`` recipe, the allocator's
  plan for a 15 MB budget written out as a recipe;
- ``mixed-allocated-onnxruntime`` (with ``--budget-mb``): the allocator's plan for that budget,
  from per-layer sensitivities measured on calibration data and cached in pared's cache folder
  (``minilm_sensitivity_*.json``): measuring them runs the model on 32 calibration sentences
  once per (layer, quantized choice), 86 times (about 40 minutes on the busy 2-core machine).

Latency uses ``bench_int8.timed_rounds`` (interleaved rounds, settle calls, busy rounds set aside).

Usage:
    python benchmarks/bench_mixed.py > mixed.jsonl
    python benchmarks/bench_mixed.py --budget-mb 15 --rounds 10 > mixed.jsonl
    python benchmarks/bench_mixed.py --budget-mb 15 --only mixed-allocated-onnxruntime
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench_int8 import Method, evaluate_all, machine, safetensors_bytes, timed_rounds
from pared.apply import compress_
from pared.atomic import atomic_write_text
from pared.calib import checked_batches
from pared.measure import latency_from_samples
from pared.onnx_export import export_onnx
from pared.quant import MixedPrecisionConfig, WeightOnlyConfig
from pared.quant.mixed import allocate_plan, fixed_bytes, layer_bytes, layer_sensitivity, quantizable_layers
from pared.recipe import load_recipe
from pared.runtime import make_runner
from pared.tasks.base import cache_dir
from pared.tasks.minilm import MiniLMTask

THREADS = 2
WARMUP = 3
BATCHES = (1, 8)
BASELINE = "torch-fp32-eager"
TARGET_BYTES = 15_000_000
TARGET_COSINE = 0.99
# Embeddings hold half of MiniLM's weights, so their group size is worth choosing; for Linear
# layers int4/g32 vs int8 is the choice that matters (and halves the cost of measuring them).
EMBEDDING_CHOICES = ("int4/g128", "int4/g64", "int4/g32", "int8/g128", "fp32")
LINEAR_CHOICES = ("int4/g32", "int8/g128", "fp32")
SENSITIVITY_BATCHES = 4  # of 8 calibration sentences each
# The ONNX file holds the graph besides the weights the allocator counts (about 50 kB for MiniLM).
ONNX_MARGIN_BYTES = 100_000


def log(msg: str) -> None:
    print(f"[bench_mixed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def sensitivity_cache_path(fp32: torch.nn.Module) -> Path:
    """Where sensitivities of these weights, choices and batches are cached."""
    digest = hashlib.sha256()
    for k, v in fp32.state_dict().items():
        digest.update(k.encode() + v.detach().contiguous().numpy().tobytes()[:4096])
    digest.update(repr((EMBEDDING_CHOICES, LINEAR_CHOICES, SENSITIVITY_BATCHES, "gptq")).encode())
    return cache_dir() / f"minilm_sensitivity_{digest.hexdigest()[:16]}.json"


def cached_sensitivity(task: MiniLMTask, fp32: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per-layer sensitivities, measured once (about 40 min on 2 busy cores) and cached as JSON."""
    path = sensitivity_cache_path(fp32)
    if path.is_file():
        log(f"sensitivities from {path}")
        return json.loads(path.read_text())
    log(f"measuring sensitivities of {len(quantizable_layers(fp32))} layers (cached in {path})")
    batches = checked_batches(task.calibration(), limit=SENSITIVITY_BATCHES)
    layers = quantizable_layers(fp32)
    sens: dict[str, dict[str, float]] = {}
    for kind, choices in ((torch.nn.Embedding, EMBEDDING_CHOICES), (torch.nn.Linear, LINEAR_CHOICES)):
        names = [n for n, m in layers if isinstance(m, kind)]
        sens.update(layer_sensitivity(copy.deepcopy(fp32), batches, choices, method="gptq", layers=names, progress=True))
    atomic_write_text(path, json.dumps(sens, indent=1))
    return sens


def allocated_plan(task: MiniLMTask, fp32: torch.nn.Module, budget_bytes: int) -> dict[str, str]:
    sens = cached_sensitivity(task, fp32)
    layers = dict(quantizable_layers(fp32))
    sizes = {n: {c: layer_bytes(n, layers[n], c) for c in sens[n]} for n in sens}
    return allocate_plan(sens, sizes, budget_bytes - ONNX_MARGIN_BYTES - fixed_bytes(fp32))


def build_methods(task: MiniLMTask, fp32: torch.nn.Module, scratch: Path, budget_mb: float | None,
                  only: set[str] | None = None) -> list[Method]:
    names, axes = task.input_names(), task.dynamic_axes()
    inputs = task.example_inputs(max(BATCHES))
    methods = [Method(BASELINE, make_runner("torch", model=fp32, threads=THREADS), runtime="torch",
                      size_bytes=safetensors_bytes(fp32, scratch), size_what="safetensors (fp32)")]

    def onnx_method(name: str, model: torch.nn.Module, what: str) -> None:
        path = export_onnx(model, inputs, scratch / f"{name}.onnx", input_names=names, dynamic_axes=axes)
        run = make_runner("onnxruntime", onnx_path=path, threads=THREADS, input_names=names)
        methods.append(Method(name, run, runtime="onnxruntime", size_bytes=path.stat().st_size, size_what=what))

    onnx_method("fp32-onnxruntime", fp32, "ONNX file (fp32)")
    recipes: list[tuple[str, list[Any], str]] = [
        ("int8-onnxruntime", load_recipe("int8"), "ONNX file (QDQ, int8 initializers)"),
        ("int4-rtn-onnxruntime", [WeightOnlyConfig(bits=4, group_size=32, method="rtn")], "ONNX file (MatMulNBits)"),
        ("int4-gptq-onnxruntime", load_recipe("int4"), "ONNX file (MatMulNBits)"),
        ("int4-mixed-onnxruntime", load_recipe("int4-mixed"), "ONNX file (MatMulNBits, mixed)"),
        ("minilm-mixed-15mb-onnxruntime", load_recipe("minilm-mixed-15mb"), "ONNX file (MatMulNBits, mixed)"),
    ]
    if budget_mb is not None:
        plan = allocated_plan(task, fp32, int(budget_mb * 1e6))
        recipes.append(("mixed-allocated-onnxruntime", [MixedPrecisionConfig(plan=plan)], "ONNX file (MatMulNBits, mixed)"))
    for name, recipe, what in recipes:
        if only is not None and name not in only:
            continue
        t = time.perf_counter()
        model = compress_(copy.deepcopy(fp32), recipe, calib=task.calibration())
        onnx_method(name, model, what)
        log(f"built {name} in {time.perf_counter() - t:.1f}s: {methods[-1].size_bytes} bytes")
        for cfg in recipe:
            if isinstance(cfg, MixedPrecisionConfig):
                emit({"bench": "mixed", "method": name, "plan": True, "layers": cfg.plan})
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds per batch size")
    parser.add_argument("--budget-mb", type=float, default=None,
                        help="also run the allocator's plan for this size budget (MB = 10^6 bytes)")
    parser.add_argument("--n-eval", type=int, default=512, help="evaluation sentences (512 = all)")
    parser.add_argument("--only", default=None,
                        help="comma-separated compressed methods to build (the fp32 rows always run)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(THREADS)
    task = MiniLMTask(n_eval=args.n_eval)
    fp32 = task.model()
    with tempfile.TemporaryDirectory(prefix="bench_mixed_") as tmp:
        only = set(args.only.split(",")) if args.only else None
        methods = build_methods(task, fp32, Path(tmp), args.budget_mb, only)
        task.reference_embeddings()
        metrics = evaluate_all(task, methods)
        fp32_bytes = methods[0].size_bytes
        for batch in BATCHES:
            inputs = task.example_inputs(batch)
            log(f"timing {len(methods)} methods at batch {batch}: {args.rounds} rounds")
            samples, stats = timed_rounds(methods, inputs, rounds=args.rounds, settle=True, seed=batch)
            lat = {m.name: latency_from_samples(samples[m.name], runtime=m.runtime, batch=batch, threads=THREADS,
                                                warmup=WARMUP) for m in methods}
            for m in methods:
                quality = metrics[m.name] if isinstance(metrics[m.name], dict) else {}
                emit({
                    "bench": "mixed", "task": "minilm", "method": m.name, "batch": batch, "threads": THREADS,
                    "p50_ms": round(lat[m.name].p50_ms, 3), "p90_ms": round(lat[m.name].p90_ms, 3),
                    "ratio_vs_fp32_eager": round(lat[m.name].p50_ms / lat[BASELINE].p50_ms, 4),
                    "size_bytes": m.size_bytes, "size_ratio": round(m.size_bytes / fp32_bytes, 4),
                    "metrics": quality, "runtime": m.runtime, "size_what": m.size_what,
                    "meets_target": bool(quality) and m.size_bytes <= TARGET_BYTES
                    and quality["mean_cosine"] >= TARGET_COSINE,
                })
            emit({"bench": "mixed", "batch": batch, "timing": True, **stats})
    emit({"bench": "mixed", "summary": True, "machine": machine(), "threads": THREADS, "rounds": args.rounds,
          "n_eval": args.n_eval, "budget_mb": args.budget_mb, "elapsed_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
