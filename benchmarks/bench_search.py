"""Time-budgeted ``pared search`` on MiniLM and the digits CNN, next to single-technique peers.

Prints one JSON object per line on stdout (progress goes to stderr):

- one ``"point"`` line per Pareto point of the search (its recipe's techniques, task metric,
  latency ratio against fp32 PyTorch eager measured in that trial's own interleaved run, size of
  the deployed file);
- one ``"peer"`` line per peer tool (NNCF + OpenVINO int8, ONNX Runtime ``quantize_dynamic``
  int8, Torch-Pruning 50% run in PyTorch eager), timed interleaved against fp32 PyTorch eager in
  one run (``bench_int8.timed_rounds``: settle + busy rounds set aside), with the pared point
  that dominates it, if any;
- one ``"acceptance"`` line per task with issue 7's targets, each ``[measured, met]``.

The search folder (``--out``/TASK) is a normal ``pared search`` folder: ``pared report`` renders it,
peers included (they are recorded in the study). Search settings: objectives task metric, latency
ratio and size; constraint ``metric_drop <= 0.02`` (MiniLM) / ``<= 0.5`` points (digits); runtime
auto; batch 8 (MiniLM: 8 x 128 tokens); every technique that applies; TPE, seed 0; a few known
recipes enqueued first (``START``), so the front never starts empty.

Usage:
    python benchmarks/bench_search.py --task all > search.jsonl          # 60 + 15 minute budgets
    python benchmarks/bench_search.py --task digits --budget 5 --out out/bench-search
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_int8 import Method, machine, timed_rounds  # noqa: E402 - shared timing harness
from bench_quant import BASELINE, THREADS, WARMUP, Part, nncf_openvino, ort_dynamic  # noqa: E402

from pared.measure import latency_from_samples  # noqa: E402
from pared.runtime import make_runner  # noqa: E402
from pared.search import SearchSpec  # noqa: E402
from pared.search.evaluate import CompressEvaluator  # noqa: E402
from pared.search.objectives import dominates  # noqa: E402
from pared.search.output import record_peers, write_outputs  # noqa: E402
from pared.search.study import prepare, run_worker  # noqa: E402
from pared.tasks import get_task  # noqa: E402

BUDGET_MIN = {"minilm": 60.0, "digits": 15.0}
MAX_DROP = {"minilm": 0.02, "digits": 0.5}
OBJECTIVES = ("metric", "latency", "size")
BATCH = 8
SHOWN = ("metric_drop", "latency_ratio", "latency_ms", "size_bytes", "size_ratio")
# Known starting points, tried first (params of pared's own spaces): the built-in int8 and int4
# recipes, and pruning followed by quantization (docs/pruning-structured.md).
INT8_STATIC = {"quantize": "int8", "int8.mode": "static", "int8.calibration": "minmax"}
START = {
    "minilm": [
        {"prune": "none", **INT8_STATIC, "int8.smoothquant": True, "int8.alpha": 0.85},
        {"prune": "none", "quantize": "weight_only", "weight_only.bits": 4, "weight_only.group_size": 32,
         "weight_only.method": "gptq"},
        {"prune": "prune_transformer", "recover": "none", "prune_transformer.heads_of_12": 2, "prune_transformer.ffn_ratio": 0.3,
         "quantize": "weight_only", "weight_only.bits": 4, "weight_only.group_size": 32, "weight_only.method": "gptq"},
        {"prune": "prune_transformer", "recover": "none", "prune_transformer.heads_of_12": 3, "prune_transformer.ffn_ratio": 0.5,
         **INT8_STATIC, "int8.smoothquant": True, "int8.alpha": 0.85},
        # Session 6: the int8-attention recipe, int4 at its largest group size, and a light FFN
        # prune before int8 attention (docs/quantization.md, docs/pruning-structured.md).
        {"prune": "none", **INT8_STATIC, "int8.smoothquant": True, "int8.alpha": 0.85, "int8.attention": True,
         "int8.attention_float": 1},
        {"prune": "none", "quantize": "weight_only", "weight_only.bits": 4, "weight_only.group_size": 128,
         "weight_only.method": "gptq"},
        {"prune": "prune_transformer", "recover": "none", "prune_transformer.heads_of_12": 0, "prune_transformer.ffn_ratio": 0.1,
         **INT8_STATIC, "int8.smoothquant": True, "int8.alpha": 0.85, "int8.attention": True, "int8.attention_float": 0},
    ],
    "digits": [
        {"prune": "none", "recover": "none", **INT8_STATIC, "int8.smoothquant": False},
        {"prune": "prune_channels", "prune_channels.ratio": 0.3, "prune_channels.scope": "layer", "recover": "finetune",
         "finetune.steps": 200, "finetune.lr": 3e-4, **INT8_STATIC, "int8.smoothquant": False},
    ],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=float), flush=True)


def run_search(task: str, out: Path, budget_min: float, rounds: int, seed: int) -> tuple[dict[str, Any], Any, float]:
    spec = SearchSpec(model=task, out=str(out), objectives=OBJECTIVES, constraints=(f"metric_drop <= {MAX_DROP[task]}",),
                      trials=None, time_budget_s=budget_min * 60, seed=seed, runtime="auto", batch=BATCH, rounds=rounds)
    evaluator = CompressEvaluator(spec)
    t = time.perf_counter()
    study = prepare(spec, evaluator=evaluator, overwrite=True)  # incl. the sensitivity scan
    for params in START[task]:
        study.enqueue_trial(params, skip_if_exists=True)
    spec.time_budget_s = max(1.0, budget_min * 60 - (time.perf_counter() - t))  # the scan counts too
    run_worker(spec, study, evaluator)
    return write_outputs(study, out), study, time.perf_counter() - t


def tp_prune_digits(fp32: torch.nn.Module, example: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(fp32)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]  # the class logits stay
    tp.pruner.MagnitudePruner(model, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=ratio, ignored_layers=[last]).step()
    return model.eval()


def measure_peers(task_name: str, rounds: int, scratch: Path) -> list[dict[str, Any]]:
    """Each peer's task metric, latency ratio (interleaved with fp32 eager) and file size."""
    task = get_task(task_name)
    fp32, inputs = task.model(), task.example_inputs(BATCH)
    part = Part(task_name, scratch, task.input_names(), fp32, list(task.calibration()), inputs, task.dynamic_axes())
    part.attempt("nncf-openvino", lambda: nncf_openvino(part, transformer=task_name == "minilm"))
    part.attempt("ort-quantize-dynamic", lambda: ort_dynamic(part))

    def torch_pruning() -> Method:
        if task_name == "minilm":
            from bench_prune import tp_prune_bert

            model = tp_prune_bert(fp32, inputs, 0.5, 0.5)
        else:
            model = tp_prune_digits(fp32, inputs[0], 0.5)
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return Method("torch-pruning-50", make_runner("torch", model=model, threads=THREADS), runtime="torch",
                      size_bytes=size, size_what="fp32 state_dict bytes")

    part.attempt("torch-pruning-50", torch_pruning)
    base_metrics = task.evaluate(part.methods[0].runner)
    samples, stats = timed_rounds(part.methods, inputs, rounds=rounds, settle=True, seed=0)
    lat = {m.name: latency_from_samples(samples[m.name], runtime=m.runtime, batch=BATCH, threads=THREADS, warmup=WARMUP)
           for m in part.methods}
    primary = task.primary_metric
    peers = []
    for m in part.methods[1:]:
        try:
            metrics = {k: float(v) for k, v in task.evaluate(m.runner).items()}
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            emit({"bench": "search", "task": task_name, "peer": m.name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        metrics.update({"metric_drop": float(base_metrics[primary]) - metrics[primary],
                        "latency_ms": lat[m.name].p50_ms, "latency_ratio": lat[m.name].p50_ms / lat[BASELINE].p50_ms,
                        "size_bytes": m.size_bytes, "size_ratio": m.size_bytes / part.fp32_bytes})
        peers.append({"name": m.name, "runtime": m.runtime, "size_what": m.size_what, "metrics": metrics})
    emit({"bench": "search", "task": task_name, "peer_timing": True, **stats})
    return peers


def report(task: str, out: Path, doc: dict[str, Any], peers: list[dict[str, Any]], elapsed: float, budget_min: float) -> None:
    primary = doc["objectives"][0]["name"]
    keys = [o["name"] for o in doc["objectives"]]
    dirs = [o["direction"] for o in doc["objectives"]]
    front = [t for t in doc["trials"] if t["pareto"]]
    complete = [t for t in doc["trials"] if t["state"] == "COMPLETE"]
    for t in front:
        m = t["metrics"]
        emit({"bench": "search", "task": task, "point": t["number"], "feasible": t["feasible"],
              "techniques": [s["technique"] for s in _steps(out, t)], "params": t["params"],
              **{k: m.get(k) for k in (primary, *SHOWN)}})
    dominated = {}
    for p in peers:
        pv = [p["metrics"][k] for k in keys]
        by = next((t["number"] for t in complete if dominates([t["metrics"][k] for k in keys], pv, dirs)), None)
        dominated[p["name"]] = by
        emit({"bench": "search", "task": task, "peer": p["name"], "runtime": p["runtime"], "dominated_by_trial": by,
              **{k: p["metrics"].get(k) for k in (primary, *SHOWN)}})
    checks: dict[str, Any] = {}

    def best(cond, key, lower=True):
        vals = [t["metrics"][key] for t in complete if cond(t["metrics"])]
        return (min(vals) if lower else max(vals)) if vals else None

    if task == "minilm":
        lat = best(lambda m: m["mean_cosine"] >= 0.99, "latency_ratio")
        checks["latency_ratio_at_cosine_0.99"] = [lat, lat is not None and lat <= 0.08]
        size = best(lambda m: m["mean_cosine"] >= 0.98, "size_bytes")
        checks["size_bytes_at_cosine_0.98"] = [size, size is not None and size <= 12e6]
    else:
        base = doc["baseline"]["metrics"]["accuracy"]
        lat = best(lambda m: m["accuracy"] >= base - 0.5, "latency_ratio")
        checks["latency_ratio_within_0.5_points"] = [lat, lat is not None and lat <= 0.05]
    checks["every_peer_dominated"] = [dominated, bool(peers) and all(v is not None for v in dominated.values())]
    states = {s: sum(t["state"] == s for t in doc["trials"]) for s in ("COMPLETE", "PRUNED", "FAIL")}
    emit({"bench": "search", "task": task, "acceptance": checks, "budget_min": budget_min,
          "full_budget": budget_min >= BUDGET_MIN[task], "elapsed_s": round(elapsed, 1), "trials": states,
          "baseline": doc["baseline"], "machine": machine()})


def _steps(out: Path, trial: dict[str, Any]) -> list[dict[str, Any]]:
    import yaml

    return yaml.safe_load((out / trial["recipe"]).read_text())["steps"] if trial["recipe"] else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("minilm", "digits", "all"), default="all")
    parser.add_argument("--budget", type=float, help="minutes per task (default: 60 MiniLM, 15 digits)")
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per runner in each trial")
    parser.add_argument("--peer-rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/bench-search")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    for task in (["digits", "minilm"] if args.task == "all" else [args.task]):
        budget = args.budget or BUDGET_MIN[task]
        out = Path(args.out) / task
        log(f"{task}: searching for {budget:g} min into {out}")
        try:
            doc, study, elapsed = run_search(task, out, budget, args.rounds, args.seed)
            with tempfile.TemporaryDirectory() as scratch:
                peers = measure_peers(task, args.peer_rounds, Path(scratch))
            record_peers(study, peers)
            report(task, out, write_outputs(study, out), peers, elapsed, budget)
        except Exception as exc:  # noqa: BLE001 - one task failing still lets the other run
            traceback.print_exc(file=sys.stderr)
            emit({"bench": "search", "task": task, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
