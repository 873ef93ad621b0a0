"""Deep Compression on the digits LeNets and the foundation digits CNN: the paper's stage table.

For each model, applies the built-in ``deep-compression`` recipe step by step (gradual pruning to
95% with fine-tuning, recovery fine-tune, 4-bit per-layer k-means with centroid fine-tuning, fp16
rounding), writes the real files of each stage and measures them, then loads the final ``.prdc``
file in a fresh Python process and evaluates it there.

Prints JSON lines on stdout (progress on stderr):

- one ``"kind": "stage"`` line per (model, stage): ``fp32`` (safetensors of the dense model),
  ``pruned`` (pared artefact weights file, sparse tensors as bitmask + values), ``clustered``
  (``.prdc``, fixed-width bit-packed indices and deltas), ``huffman`` (``.prdc``, Huffman-coded);
  with ``bytes``, ``ratio`` (fp32 bytes / bytes) and the test ``accuracy`` of that stage's model;
- one ``"kind": "layer"`` line per (model, layer) of the final file: weights, nonzero, clusters,
  bytes (the paper's per-layer table);
- one ``"kind": "summary"`` line per model: accuracy drop, final ratio, the accuracy measured in a
  fresh process and whether it equals the in-process one exactly, wall time.

Usage:
    python benchmarks/bench_deep_compression.py > deep_compression.jsonl
    python benchmarks/bench_deep_compression.py --task lenet300 --out /tmp/dc
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from pared.apply import Context, compress_
from pared.cluster import ClusterConfig, EntropyCodeConfig, measure_stages
from pared.recipe import load_recipe
from pared.tasks import get_task

TASKS = ("lenet300", "lenet5", "digits")
RECIPE = "deep-compression"


def log(msg: str) -> None:
    print(f"[bench_deep_compression {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def fresh_process_accuracy(task_name: str, path: Path) -> float:
    """Load ``path`` into the task's architecture in a new interpreter and evaluate it there."""
    code = textwrap.dedent(f"""
        import torch
        from pared.cluster import load_compressed
        from pared.tasks import get_task
        task = get_task({task_name!r})
        model = load_compressed({str(path)!r}, task.model())
        print(repr(task.evaluate(model)["accuracy"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def run(task_name: str, out_dir: Path) -> None:
    t0 = time.perf_counter()
    task = get_task(task_name)
    log(f"{task_name}: loading (training once) the fp32 model")
    fp32 = task.model()
    recipe = load_recipe(RECIPE)
    cluster_at = next(i for i, c in enumerate(recipe) if isinstance(c, ClusterConfig))
    code_at = next(i for i, c in enumerate(recipe) if isinstance(c, EntropyCodeConfig))
    ctx = Context(task=task)
    log(f"{task_name}: pruning and fine-tuning")
    model = compress_(copy.deepcopy(fp32), recipe[:cluster_at], context=ctx)
    pruned = copy.deepcopy(model)
    log(f"{task_name}: clustering and fine-tuning centroids")
    model = compress_(model, recipe[cluster_at:code_at], context=ctx)
    acc_clustered = task.evaluate(model)["accuracy"]
    model = compress_(model, recipe[code_at:], context=ctx)  # fp16 rounding: the file's model
    acc = {"fp32": task.evaluate(fp32)["accuracy"], "pruned": task.evaluate(pruned)["accuracy"]}
    acc["clustered"] = acc["huffman"] = task.evaluate(model)["accuracy"]
    log(f"{task_name}: writing and measuring the stage files in {out_dir}")
    sizes = measure_stages(fp32, pruned, model, out_dir / task_name)
    prune_summary = ctx.summary[0]
    for stage, ratio in sizes.ratios().items():
        emit({"bench": "deep_compression", "kind": "stage", "model": task_name, "stage": stage,
              "bytes": getattr(sizes, stage), "ratio": round(ratio, 2), "accuracy": acc[stage],
              "file": sizes.files[stage]})
    for rec in sizes.records:
        if rec["kind"] == "clustered":
            emit({"bench": "deep_compression", "kind": "layer", "model": task_name, "layer": rec["name"],
                  "weights": rec["numel"], "nonzero": rec["nonzero"], "kept": round(rec["nonzero"] / rec["numel"], 4),
                  "clusters": rec["clusters"], "delta_cap": rec["delta_cap"], "bytes": rec["bytes"],
                  "bits_per_nonzero": round(8 * rec["bytes"] / max(rec["nonzero"], 1), 2)})
    dense = [r for r in sizes.records if r["kind"] == "dense"]
    log(f"{task_name}: loading {sizes.files['huffman']} in a fresh process")
    fresh = fresh_process_accuracy(task_name, Path(sizes.files["huffman"]))
    emit({"bench": "deep_compression", "kind": "summary", "model": task_name, "recipe": RECIPE,
          "fp32_accuracy": acc["fp32"], "accuracy": acc["huffman"], "drop": round(acc["fp32"] - acc["huffman"], 4),
          "accuracy_before_fp16_rounding": acc_clustered,
          "ratio": round(sizes.ratios()["huffman"], 2), "bytes": sizes.huffman, "fp32_bytes": sizes.fp32,
          "dense_tensors_bytes": sum(r["bytes"] for r in dense),
          "overall_sparsity": round(prune_summary["overall_sparsity"], 4),
          "fresh_process_accuracy": fresh, "fresh_process_equal": fresh == acc["huffman"],
          "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
          "torch": torch.__version__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--out", type=Path, default=None, help="keep the stage files here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: these models are too small to gain from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = TASKS if args.task == "all" else (args.task,)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in names:
            run(name, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            run(name, Path(tmp))


if __name__ == "__main__":
    main()
