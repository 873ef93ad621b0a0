"""Int8 on CPU: pared's recipe against fp32 and the two stock dynamic quantizers, in one process.

Prints one JSON object per line on stdout (progress goes to stderr):

- one line per (method, batch size) with p50/p90 latency, the p50 ratio against fp32 PyTorch
  eager measured in the same interleaved run, the artefact size and the task metrics;
- one ``"timing": true`` line per batch size: how many rounds were used and how many were set
  aside because other processes were busy;
- one line per method that could not be built or run, with ``"error"``;
- one summary line per task with the machine and library versions.

Methods (all at 2 intra-op threads):

- ``torch-fp32-eager``: the task's fp32 model in PyTorch eager (the baseline of every ratio);
- ``pared-fp32-openvino``: the same fp32 model exported to ONNX and run by OpenVINO, so a reader
  can tell the runtime's own gain from the gain of compression;
- ``pared-int8-openvino`` / ``pared-int8-onnxruntime``: ``compress_`` with the built-in ``int8``
  recipe, exported as QDQ ONNX, run by each runtime;
- ``pared-int8-openvino-bf16`` / ``pared-fp32-openvino-bf16``: the same files in OpenVINO with the
  ops left in float run in bf16 (AMX / AVX512-BF16 CPUs; fp32 elsewhere);
- ``pared-int8-attention-openvino`` (MiniLM): the built-in ``int8-attention`` recipe (``int8`` plus
  the attention matmuls in int8), in OpenVINO;
- ``ort-quantize-dynamic``: ONNX Runtime's ``quantize_dynamic`` (int8 weights) on the fp32 export;
- ``torch-ao-dynamic``: ``torch.ao.quantization.quantize_dynamic`` on the Linear layers, eager.

Latency: per batch size, ``--rounds`` rounds after 3 untimed ones; each round is one
``pared.measure.interleaved_latency`` call over all methods in a fresh seeded order, so slow drift
hits every method alike. Two guards against this shared 2-core machine (see docs/benchmarks.md):

- settle: each timed call directly follows one untimed call of the same method. Without it a
  call is slowed by what the previous runtime's worker threads still do after returning (most
  likely spin-waiting). Measured: OpenVINO on digits at batch 64 took 0.8 ms right after itself
  and 6.2 ms right after PyTorch. ``--no-settle`` times the plain round-robin instead.
- busy rounds: a round during which other processes used more than 10% of a core (read from
  ``/proc/stat``) is set aside and repeated; the timing line of each batch says how many.

Metrics are evaluated once per method, through the same runner that is timed.

Usage:
    python benchmarks/bench_int8.py --task all > int8.jsonl
    python benchmarks/bench_int8.py --task minilm --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pared.apply import compress_
from pared.measure import interleaved_latency, latency_from_samples
from pared.onnx_export import export_onnx
from pared.recipe import load_recipe
from pared.runtime import make_runner
from pared.tasks import Task, get_task
from pared.tasks.minilm import MiniLMTask

THREADS = 2
WARMUP = 3
BATCHES = {"minilm": (1, 8), "digits": (1, 64)}
BASELINE = "torch-fp32-eager"
FOREIGN_LIMIT = 0.10  # a round is set aside when other processes used over 10% of a core
MAX_EXTRA = 2  # at most this many extra attempts per wanted round
# CPU features that decide which int8 kernels the runtimes can use (VNNI: int8 dot products; AMX:
# int8 matrix tiles).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def log(msg: str) -> None:
    print(f"[bench_int8 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


class Method:
    """One way of running the task's model: a runner plus what its size and runtime are."""

    def __init__(
        self,
        name: str,
        runner: Callable[..., Any],
        *,
        runtime: str,
        size_bytes: int,
        size_what: str,
    ) -> None:
        self.name, self.runner, self.runtime = name, runner, runtime
        self.size_bytes, self.size_what = size_bytes, size_what


def safetensors_bytes(model: torch.nn.Module, scratch: Path) -> int:
    path = scratch / "fp32.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def pickle_bytes(model: torch.nn.Module) -> int:
    # Measured in memory only: the bytes torch.save would write. Never written, never loaded.
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def build_methods(
    task: Task, fp32: torch.nn.Module, scratch: Path, export_batch: int
) -> tuple[list[Method], list[dict[str, Any]]]:
    """Every method that builds, and an error record for each one that does not."""
    names = task.input_names()
    inputs = task.example_inputs(export_batch)
    axes = task.dynamic_axes()
    methods: list[Method] = []
    errors: list[dict[str, Any]] = []
    fp32_bytes = safetensors_bytes(fp32, scratch)

    def attempt(name: str, build: Callable[[], Method | list[Method]]) -> None:
        log(f"building {name}")
        t = time.perf_counter()
        try:
            built = build()
        except Exception as exc:  # noqa: BLE001 - a failing method is reported, the rest run
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            errors.append({"method": name, "error": f"{type(exc).__name__}: {exc}"})
            return
        methods.extend(built if isinstance(built, list) else [built])
        log(f"built {name} in {time.perf_counter() - t:.1f}s")

    attempt(BASELINE, lambda: Method(
        BASELINE, make_runner("torch", model=fp32, threads=THREADS), runtime="torch",
        size_bytes=fp32_bytes, size_what="safetensors state_dict (fp32)"))

    fp32_onnx = scratch / "fp32.onnx"

    def fp32_openvino() -> Method:
        export_onnx(fp32, inputs, fp32_onnx, input_names=names, dynamic_axes=axes)
        run = make_runner("openvino", onnx_path=fp32_onnx, threads=THREADS, input_names=names)
        return Method("pared-fp32-openvino", run, runtime="openvino",
                      size_bytes=fp32_onnx.stat().st_size, size_what="ONNX file (fp32)")

    attempt("pared-fp32-openvino", fp32_openvino)

    def pared_int8() -> list[Method]:
        model = compress_(copy.deepcopy(fp32), load_recipe("int8"), calib=task.calibration())
        path = scratch / "pared_int8.onnx"
        export_onnx(model, inputs, path, input_names=names, dynamic_axes=axes)
        size = path.stat().st_size
        out = []
        for rt in ("openvino", "openvino-bf16", "onnxruntime"):
            run = make_runner(rt, onnx_path=path, threads=THREADS, input_names=names)
            out.append(Method(f"pared-int8-{rt}", run, runtime=rt, size_bytes=size,
                              size_what="ONNX file (QDQ, int8 initializers)"))
        return out

    attempt("pared-int8-openvino+onnxruntime", pared_int8)

    def pared_int8_attention() -> Method:
        model = compress_(copy.deepcopy(fp32), load_recipe("int8-attention"), calib=task.calibration())
        path = scratch / "pared_int8_attention.onnx"
        export_onnx(model, inputs, path, input_names=names, dynamic_axes=axes)
        run = make_runner("openvino", onnx_path=path, threads=THREADS, input_names=names)
        return Method("pared-int8-attention-openvino", run, runtime="openvino", size_bytes=path.stat().st_size,
                      size_what="ONNX file (QDQ, int8 initializers)")

    if task.name == "minilm":  # attention quantization is for Hugging Face transformers
        attempt("pared-int8-attention-openvino", pared_int8_attention)

    def fp32_openvino_bf16() -> Method:
        if not fp32_onnx.is_file():
            raise RuntimeError("no fp32 ONNX export (pared-fp32-openvino failed)")
        run = make_runner("openvino-bf16", onnx_path=fp32_onnx, threads=THREADS, input_names=names)
        return Method("pared-fp32-openvino-bf16", run, runtime="openvino-bf16",
                      size_bytes=fp32_onnx.stat().st_size, size_what="ONNX file (fp32)")

    attempt("pared-fp32-openvino-bf16", fp32_openvino_bf16)

    def ort_dynamic() -> Method:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        if not fp32_onnx.is_file():
            raise RuntimeError("no fp32 ONNX export to quantize (pared-fp32-openvino failed)")
        out = scratch / "ort_dynamic.onnx"
        # ONNX Runtime's quantizer may drop helper files into the working directory.
        with contextlib.chdir(scratch):
            quantize_dynamic(str(fp32_onnx), str(out), weight_type=QuantType.QInt8)
        run = make_runner("onnxruntime", onnx_path=out, threads=THREADS, input_names=names)
        run(*task.example_inputs(1))  # fail here, not mid-timing, if a kernel is missing
        what = "ONNX file (ORT dynamic, int8 weights)"
        size = out.stat().st_size
        return Method(
            "ort-quantize-dynamic", run, runtime="onnxruntime", size_bytes=size, size_what=what
        )

    attempt("ort-quantize-dynamic", ort_dynamic)

    def torch_ao() -> Method:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in torch 2.x
            model = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8
            )
            run = make_runner("torch", model=model, threads=THREADS)
            with torch.inference_mode():
                run(*task.example_inputs(1))
            size = pickle_bytes(model)
        what = "torch.save(state_dict) into BytesIO (pickle, measured in memory, never loaded)"
        return Method("torch-ao-dynamic", run, runtime="torch", size_bytes=size, size_what=what)

    attempt("torch-ao-dynamic", torch_ao)
    return methods, errors


def evaluate_all(task: Task, methods: list[Method]) -> dict[str, dict[str, float] | str]:
    out: dict[str, dict[str, float] | str] = {}
    for m in methods:
        t = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[m.name] = task.evaluate(m.runner)
        except Exception as exc:  # noqa: BLE001
            out[m.name] = f"{type(exc).__name__}: {exc}"
        log(f"evaluated {m.name} in {time.perf_counter() - t:.1f}s: {out[m.name]}")
    return out


class CpuMeter:
    """CPU ticks used by other processes (and the hypervisor's steal) while a block runs.

    ``/proc/stat`` counts busy ticks of the whole machine and ``/proc/self/stat`` this process's;
    the difference is what everything else took. Both tick at ``SC_CLK_TCK`` (usually 100 Hz), so
    blocks shorter than a few ticks read 0 or 1.
    """

    def __init__(self) -> None:
        self.available = Path("/proc/stat").is_file() and Path("/proc/self/stat").is_file()

    def _busy_own(self) -> tuple[int, int]:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(cpu[:8]) - cpu[3] - cpu[4]  # user nice system irq softirq steal
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(fields[11]) + int(fields[12])  # utime + stime, all threads

    @contextlib.contextmanager
    def foreign(self) -> Iterator[dict[str, float]]:
        out = {"foreign_ticks": 0.0, "wall_ticks": 0.0}
        if not self.available:
            yield out
            return
        tick = os.sysconf("SC_CLK_TCK")
        busy0, own0 = self._busy_own()
        t0 = time.perf_counter()
        yield out
        busy1, own1 = self._busy_own()
        out["wall_ticks"] = (time.perf_counter() - t0) * tick
        out["foreign_ticks"] = max(0, (busy1 - busy0) - (own1 - own0))


def timed_rounds(
    methods: list[Method], inputs: tuple[torch.Tensor, ...], *, rounds: int, settle: bool, seed: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``rounds`` clean interleaved rounds of every method, after ``WARMUP`` untimed rounds.

    Each round is one ``interleaved_latency`` call over all methods, in a fresh seeded order. With
    ``settle``, every timed call directly follows one untimed call of the same method, so what
    the previous runtime's worker threads still do does not land on it. A round during which other
    processes used more than ``FOREIGN_LIMIT`` of one core is set aside and run again (at most
    ``MAX_EXTRA`` x rounds extra attempts), because 2-thread runtimes on a 2-core machine slow down
    very unequally when a core is taken away (PyTorch's OpenMP far more than OpenVINO or ONNX
    Runtime). If too few clean rounds come, the least disturbed busy ones fill up to ``rounds``,
    and the returned stats say how many.
    """
    rng = random.Random(seed)
    meter = CpuMeter()
    taken: list[tuple[float, dict[str, list[float]]]] = []  # (foreign share, samples)
    clean = attempts = 0
    while clean < rounds and attempts < WARMUP + rounds * (1 + MAX_EXTRA):
        order = methods[:]
        rng.shuffle(order)
        runners: dict[str, Callable[..., Any]] = {}
        for m in order:
            if settle:
                runners[m.name + "#settle"] = m.runner
            runners[m.name] = m.runner
        with meter.foreign() as load:
            got = interleaved_latency(runners, inputs, rounds=1, warmup=0)
        attempts += 1
        if attempts <= WARMUP:
            continue
        share = load["foreign_ticks"] / max(load["wall_ticks"], 1e-9)
        busy = load["foreign_ticks"] > 2 and share > FOREIGN_LIMIT
        taken.append((share if busy else 0.0, got))
        if busy:
            time.sleep(0.5)  # let the neighbour's burst pass
        else:
            clean += 1
    # Clean rounds first; if too few came, the least disturbed busy ones fill up to ``rounds``.
    used = sorted(taken, key=lambda t: t[0])[:rounds]
    samples = {m.name: [x for _, got in used for x in got[m.name]] for m in methods}
    stats = {
        "rounds_used": len(used),
        "rounds_busy_used": sum(1 for share, _ in used if share > 0),
        "rounds_busy_discarded": len(taken) - len(used),
        "foreign_cpu_share_max_used": round(max((share for share, _ in used), default=0.0), 3),
        "cpu_meter": meter.available,
    }
    return samples, stats


def run_task(name: str, *, quick: bool, rounds: int, settle: bool) -> None:
    t0 = time.perf_counter()
    task: Task = MiniLMTask(n_eval=64) if (quick and name == "minilm") else get_task(name)
    torch.set_num_threads(THREADS)
    log(f"task {name}: loading the fp32 model")
    fp32 = task.model()
    batches = BATCHES[name]
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as tmp:
        methods, errors = build_methods(task, fp32, Path(tmp), export_batch=max(batches))
        for err in errors:
            emit({"bench": "int8", "task": name, "threads": THREADS, **err})
        if not any(m.name == BASELINE for m in methods):
            raise RuntimeError("the fp32 eager baseline failed to build: nothing to compare")
        if name == "minilm":
            log("computing the fp32 reference embeddings")
            task.reference_embeddings()  # type: ignore[attr-defined]
        metrics = evaluate_all(task, methods)
        fp32_bytes = next(m.size_bytes for m in methods if m.name == BASELINE)
        for batch in batches:
            inputs = task.example_inputs(batch)
            log(f"timing {len(methods)} methods at batch {batch}: {rounds} rounds")
            samples, stats = timed_rounds(methods, inputs, rounds=rounds, settle=settle, seed=batch)
            log(f"batch {batch}: {stats}")
            lat = {
                m.name: latency_from_samples(
                    samples[m.name], runtime=m.runtime, batch=batch, threads=THREADS, warmup=WARMUP
                )
                for m in methods
            }
            base_p50 = lat[BASELINE].p50_ms
            for m in methods:
                line: dict[str, Any] = {
                    "bench": "int8", "task": name, "method": m.name, "batch": batch,
                    "threads": THREADS,
                    "p50_ms": round(lat[m.name].p50_ms, 3),
                    "p90_ms": round(lat[m.name].p90_ms, 3),
                    "ratio_vs_fp32_eager": round(lat[m.name].p50_ms / base_p50, 4),
                    "size_bytes": m.size_bytes,
                    "size_ratio": round(m.size_bytes / fp32_bytes, 4),
                    "metrics": metrics[m.name] if isinstance(metrics[m.name], dict) else {},
                    "runtime": m.runtime,
                    "runs": lat[m.name].runs,
                    "size_what": m.size_what,
                }
                if isinstance(metrics[m.name], str):
                    line["error"] = f"evaluate failed: {metrics[m.name]}"
                emit(line)
            emit({"bench": "int8", "task": name, "batch": batch, "timing": True, "settle": settle,
                  **stats})
    emit({
        "bench": "int8", "task": name, "summary": True, "machine": machine(), "threads": THREADS,
        "batches": list(batches), "rounds": rounds, "warmup": WARMUP, "settle": settle,
        "quick": quick, "n_eval": getattr(task, "n_eval", None),
        "methods": [m.name for m in methods], "failed": [e["method"] for e in errors],
        "elapsed_s": round(time.perf_counter() - t0, 1),
    })


def machine() -> dict[str, Any]:
    import onnxruntime
    import openvino

    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return {
        "processor": platform.processor(),
        "cpu_model": model,
        "int8_isa": [f for f in ISA_FLAGS if f in flags],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
        "quantized_engine": torch.backends.quantized.engine,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("minilm", "digits", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per batch size (default 20, 5 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64 MiniLM eval sentences, 5 rounds")
    parser.add_argument("--no-settle", action="store_true",
                        help="time each call right after the previous method's call "
                             "(no untimed call of the same method first)")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 20)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    for name in ("minilm", "digits") if args.task == "all" else (args.task,):
        run_task(name, quick=args.quick, rounds=rounds, settle=not args.no_settle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
