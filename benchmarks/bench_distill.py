"""Distillation on CPU: a 3-layer MiniLM student against the 6-layer fp32 teacher, in one run.

Prints one JSON object per line on stdout (progress goes to stderr):

- ``part: "minilm"``: the student is built by ``drop_layers`` (every=2: teacher layers 1, 3, 5,
  initialised from the teacher's weights) and distilled by the ``distill`` step on
  ``corpus.train_sentences()`` (unlabeled, disjoint from the 512 evaluation sentences): the
  task's embedding loss (1 - cosine) plus hidden-state and attention-map terms against teacher
  layers 1, 3, 5. A ``distill`` line gives the wall and process CPU time of building and
  distilling the student (teacher targets included). Quality is ``MiniLMTask().evaluate``
  (mean cosine and top-10 neighbour overlap against the teacher's fp32 embeddings) of the model
  that is timed. Every method is saved (safetensors for eager, ONNX for OpenVINO) and timed in a
  fresh process, interleaved (``bench_int8.timed_rounds`` with settle), at batch 8 x 128 and
  1 x 128 tokens: eager PyTorch ran 40% slower in the process that had just trained. Methods:
  ``teacher-fp32-eager`` (the baseline), ``student-fp32-eager``, ``teacher-fp32-openvino``,
  ``student-fp32-openvino``,
  ``student-int8-openvino`` (the student followed by the built-in ``int8`` recipe: SmoothQuant
  then static int8, QDQ ONNX) and ``teacher-int8-openvino`` (int8 alone, to separate the gains).
  Each timing line carries ``ratio_vs_fp32_eager`` and ``ratio_vs_teacher_same_runtime``.
- ``part: "digits"``: half-width digits CNNs trained for the same steps with the same seed, with
  and without logit distillation (weight 0.5, T 4) from the width-16 teacher, for seeds 0, 1, 2;
  test accuracy per seed and the mean. Two students: ``scratch`` (width 8, random init,
  ``--digits-steps``) and ``pruned-teacher`` (the teacher with 50% of its channels removed by
  ``prune_channels``, so initialised from its weights; a third of the steps).
- one ``summary`` line with the machine, versions and elapsed time.

Usage:
    python benchmarks/bench_distill.py > distill.jsonl
    python benchmarks/bench_distill.py --part minilm --steps 600 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import Method, machine, timed_rounds  # noqa: E402 - shared timing harness

import pared  # noqa: E402
from pared.apply import Context  # noqa: E402
from pared.distill import DistillConfig  # noqa: E402
from pared.measure import count_params, latency_from_samples  # noqa: E402
from pared.onnx_export import export_onnx  # noqa: E402
from pared.recipe import load_recipe  # noqa: E402
from pared.runtime import make_runner  # noqa: E402
from pared.student import DropLayersConfig  # noqa: E402
from pared.train import FinetuneConfig  # noqa: E402

THREADS = 2
WARMUP = 3
BASELINE = "teacher-fp32-eager"


def log(msg: str) -> None:
    print(f"[bench_distill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def state_bytes(model: nn.Module, path: Path) -> int:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


# ----------------------------------------------------------------------------------- MiniLM


def distill_recipe(steps: int, lr: float, batch_size: int, hidden: float = 1.0, attention: float = 1.0,
                   autocast: str | None = None) -> list[Any]:
    """drop_layers (every 2nd) then distill: embeddings + hidden states + attention maps."""
    return [
        DropLayersConfig(every=2),
        DistillConfig(steps=steps, lr=lr, batch_size=batch_size, optimizer="adamw", schedule="cosine",
                      hidden=hidden, attention=attention, train_mode=False, freeze=("*word_embeddings",),
                      autocast=autocast),
    ]


def run_minilm(args: argparse.Namespace, scratch: Path) -> None:
    from pared.tasks import corpus
    from pared.tasks.minilm import MiniLMTask

    part = "minilm"
    torch.set_num_threads(THREADS)
    task = MiniLMTask(n_eval=args.n_eval)
    teacher = task.model()
    recipe = distill_recipe(args.steps, args.lr, args.batch_size, args.hidden, args.attention, args.autocast)
    log(f"distilling: {[pared.config_to_dict(c) for c in recipe]}")
    # Training runs on --train-threads threads (default 1): on a shared machine a second OpenMP
    # thread mostly spin-waits for a core, which inflates CPU time without speeding anything up.
    # CPU seconds on one thread bound the time on 2 cores from above.
    torch.set_num_threads(args.train_threads)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    ctx = Context(task=task)
    student = pared.compress_(copy.deepcopy(teacher), recipe, context=ctx)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    torch.set_num_threads(THREADS)
    log(f"distilled in {wall:.0f}s wall, {cpu:.0f}s CPU")
    emit({"bench": "distill", "part": part, "distill": True, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
          "train_threads": args.train_threads, "steps": ctx.summary[-1]["steps"],
          "final_loss": round(ctx.summary[-1]["final_loss"], 5), "pairs": ctx.summary[-1]["pairs"],
          "kept_layers": ctx.summary[0]["kept"], "recipe": [pared.config_to_dict(c) for c in recipe]})

    log("computing the fp32 reference embeddings")
    task.reference_embeddings()
    if args.quality_only:  # latency depends on the structure only; a full run times it
        emit({"bench": "distill", "part": part, "metrics": {"student-fp32-eager": rounded(task.evaluate(student))},
              "eval_sentences": task.n_eval, "quality_only": True})
        return
    calib = task.calibration()
    int8_student = pared.compress_(copy.deepcopy(student), load_recipe("int8"), context=Context(calib=calib, task=task))
    int8_teacher = pared.compress_(copy.deepcopy(teacher), load_recipe("int8"), context=Context(calib=calib, task=task))
    x8 = task.example_inputs(8)
    names, axes = task.input_names(), task.dynamic_axes()

    # Every method is saved to a file here and timed in a fresh process (--time-only): eager
    # PyTorch in the process that just trained ran 40% slower (126.5 against 88 ms for the teacher),
    # which made every ratio against it look better than it is.
    plan: list[dict[str, Any]] = []
    params: dict[str, int] = {}
    runners: dict[str, Any] = {}
    for name, model in (("teacher-fp32-eager", teacher), ("student-fp32-eager", student)):
        path = scratch / f"{name}.safetensors"
        plan.append({"name": name, "runtime": "torch", "file": str(path), "size_bytes": state_bytes(model, path),
                     "size_what": "safetensors (fp32)", "student": name.startswith("student")})
        params[name] = count_params(model)
        runners[name] = make_runner("torch", model=model, threads=THREADS)
    for name, model in (("teacher-fp32-openvino", teacher), ("student-fp32-openvino", student),
                        ("student-int8-openvino", int8_student), ("teacher-int8-openvino", int8_teacher)):
        log(f"exporting {name}")
        path = scratch / f"{name}.onnx"
        export_onnx(model, x8, path, input_names=names, dynamic_axes=axes)
        plan.append({"name": name, "runtime": "openvino", "file": str(path), "size_bytes": path.stat().st_size,
                     "size_what": "ONNX file"})
        runners[name] = make_runner("openvino", onnx_path=path, threads=THREADS, input_names=names)
    metrics = {}
    for name, runner in runners.items():
        log(f"evaluating {name}")
        metrics[name] = rounded(task.evaluate(runner))
    del runners
    emit({"bench": "distill", "part": part, "metrics": metrics, "params": params,
          "eval_sentences": task.n_eval, "train_sentences": len(corpus.train_sentences())})
    plan_file = scratch / "timing_plan.json"
    plan_file.write_text(json.dumps({"methods": plan, "metrics": metrics}))
    log("timing in a fresh process")
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--time-only", str(plan_file), "--rounds", str(args.rounds)], check=True)


def time_plan(plan_file: Path, rounds: int) -> None:
    """Time the methods a MiniLM run saved, in this fresh process, and print their lines."""
    from pared.tasks.minilm import MiniLMTask

    part = "minilm"
    torch.set_num_threads(THREADS)
    plan = json.loads(plan_file.read_text())
    task = MiniLMTask()
    names = task.input_names()
    methods: list[Method] = []
    for entry in plan["methods"]:
        if entry["runtime"] == "torch":
            model = task.model()
            if entry.get("student"):
                model = pared.compress_(model, [DropLayersConfig(every=2)])
            model.load_state_dict(load_file(entry["file"]), strict=True)
            runner = make_runner("torch", model=model.eval(), threads=THREADS)
        else:
            runner = make_runner("openvino", onnx_path=Path(entry["file"]), threads=THREADS, input_names=names)
        methods.append(Method(entry["name"], runner, runtime=entry["runtime"], size_bytes=entry["size_bytes"],
                              size_what=entry["size_what"]))
    metrics = plan["metrics"]
    for batch in (8, 1):
        inputs = task.example_inputs(batch)
        log(f"timing {len(methods)} methods at batch {batch}, {rounds} rounds")
        samples, stats = timed_rounds(methods, inputs, rounds=rounds, settle=True, seed=batch)
        lat = {m.name: latency_from_samples(samples[m.name], runtime=m.runtime, batch=batch, threads=THREADS,
                                            warmup=WARMUP) for m in methods}
        base = lat[BASELINE].p50_ms
        for m in methods:
            same_runtime_teacher = "teacher-fp32-openvino" if m.runtime == "openvino" else BASELINE
            emit({"bench": "distill", "part": part, "method": m.name, "batch": batch, "threads": THREADS,
                  "runtime": m.runtime, "p50_ms": round(lat[m.name].p50_ms, 3), "p90_ms": round(lat[m.name].p90_ms, 3),
                  "ratio_vs_fp32_eager": round(lat[m.name].p50_ms / base, 4),
                  "ratio_vs_teacher_same_runtime": round(lat[m.name].p50_ms / lat[same_runtime_teacher].p50_ms, 4),
                  "size_bytes": m.size_bytes, "size_what": m.size_what, "metrics": metrics[m.name],
                  "runs": lat[m.name].runs, "fresh_process": True})
        emit({"bench": "distill", "part": part, "batch": batch, "timing": True, **stats})


# ----------------------------------------------------------------------------------- digits


def run_digits(args: argparse.Namespace) -> None:
    from pared.prune.structured import ChannelPruneConfig
    from pared.tasks.digits import DigitsCNN, DigitsTask

    part = "digits"
    torch.set_num_threads(1)  # 8x8 convs are overhead-bound (see pared.tasks.digits)
    task = DigitsTask()
    teacher = task.model()
    teacher_acc = task.evaluate(teacher)["accuracy"]
    # Two half-width students: random init, and the teacher with half its channels pruned
    # (initialised from its weights; fewer steps, since it starts close).
    pruned = pared.compress_(copy.deepcopy(teacher), ChannelPruneConfig(ratio=0.5),
                             context=Context(calib=task.calibration(), task=task))

    def scratch() -> nn.Module:
        return DigitsCNN(width=8)

    students = {"scratch": (scratch, args.digits_steps), "pruned-teacher": (lambda: copy.deepcopy(pruned), args.digits_steps // 3)}
    kd = {"distill": 0.5, "temperature": 4.0}
    for student_name, (build, steps) in students.items():
        common = {"steps": steps, "lr": 3e-3 if student_name == "scratch" else 1e-3, "batch_size": 64}
        runs: dict[str, list[float]] = {"plain": [], "kd": []}
        for seed in (0, 1, 2):
            for kind in ("plain", "kd"):
                torch.manual_seed(seed)
                student = build()
                cfg = FinetuneConfig(seed=seed, **common) if kind == "plain" else DistillConfig(seed=seed, **kd, **common)
                t0 = time.perf_counter()
                pared.compress_(student, cfg, context=Context(task=task))
                acc = task.evaluate(student)["accuracy"]
                runs[kind].append(acc)
                emit({"bench": "distill", "part": part, "student": student_name, "kind": kind, "seed": seed,
                      "accuracy": round(acc, 3), "train_s": round(time.perf_counter() - t0, 1)})
        mean = {k: sum(v) / len(v) for k, v in runs.items()}
        emit({"bench": "distill", "part": part, "student": student_name, "teacher_width16_accuracy": round(teacher_acc, 3),
              "student_params": count_params(build()), "teacher_params": count_params(teacher), **common, **kd,
              "mean_accuracy_plain": round(mean["plain"], 3), "mean_accuracy_kd": round(mean["kd"], 3),
              "kd_beats_plain": mean["kd"] > mean["plain"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("minilm", "digits", "all"), default="all")
    parser.add_argument("--steps", type=int, default=3000, help="MiniLM distillation steps")
    parser.add_argument("--batch-size", type=int, default=16, help="MiniLM sentences per step")
    parser.add_argument("--lr", type=float, default=3e-4, help="MiniLM peak learning rate (AdamW, cosine)")
    parser.add_argument("--hidden", type=float, default=1.0, help="MiniLM hidden-state loss weight")
    parser.add_argument("--attention", type=float, default=1.0, help="MiniLM attention-map loss weight")
    parser.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                        help="MiniLM: mixed precision for the distillation steps (bf16 uses AMX where the CPU has it)")
    parser.add_argument("--train-threads", type=int, default=1, help="threads while distilling")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per batch size")
    parser.add_argument("--n-eval", type=int, default=512, help="MiniLM evaluation sentences (512 = all)")
    parser.add_argument("--quality-only", action="store_true", help="MiniLM: distil and evaluate the student, no timing")
    parser.add_argument("--digits-steps", type=int, default=150, help="digits student training steps")
    parser.add_argument("--time-only", type=Path, default=None, metavar="PLAN",
                        help="internal: time the methods a MiniLM run saved (run in a fresh process)")
    args = parser.parse_args(argv)
    if args.time_only is not None:
        time_plan(args.time_only, args.rounds)
        return 0
    t0 = time.perf_counter()
    parts = ("digits", "minilm") if args.part == "all" else (args.part,)
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        for part in parts:
            log(f"part {part}")
            if part == "minilm":
                run_minilm(args, Path(tmp))
            else:
                run_digits(args)
    emit({"bench": "distill", "summary": True, "machine": machine(), "threads": THREADS, "rounds": args.rounds,
          "parts": list(parts), "elapsed_s": round(time.perf_counter() - t0, 1),
          "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
