"""Int8 quantization suite on CPU: pared against fp32 and four peer quantizers, in one run.

Prints one JSON object per line on stdout (progress goes to stderr). Parts:

- ``minilm``: all-MiniLM-L6-v2 at batch 1 and 8 (x 128 tokens), scored on the 512 evaluation
  sentences (mean/min cosine and top-10 neighbour overlap against the fp32 embeddings).
- ``resnet``: the ResNet-18-layout CNN (``pared.testing.resnet``, width 32, 224x224, random
  weights and random calibration images) at batch 16 and 1. The weights are random, so the
  metrics are output fidelity against fp32 on 32 held-out random images (cosine of the logits and
  the relative MSE), not accuracy.
- ``digits``: the digits CNN, accuracy on its 450 test images only (no timing).

Methods (2 intra-op threads each; a peer that is not installed or fails gives one line with
``"skipped"`` or ``"error"`` and the rest run):

- ``torch-fp32-eager``: the baseline of every ratio.
- ``pared-int8-openvino`` / ``-onnxruntime``: ``compress_`` with the built-in recipe (``int8``
  on MiniLM: SmoothQuant 0.85 + static int8; ``int8-static`` on the CNNs), QDQ ONNX.
- ``pared-int8-attention-openvino`` (MiniLM): the built-in ``int8-attention`` recipe (``int8``
  plus int8 attention matmuls).
- ``pared-cle-bc-int8-openvino`` (CNNs): cross-layer equalization, then static int8 with bias
  correction.
- ``pared-auto-int8-openvino`` (digits, MiniLM): the same as ``pared-int8`` with
  ``calibration="auto"`` (per-layer choice by output error).
- ``ort-quantize-dynamic`` (MiniLM): ``quantize_dynamic`` on the fp32 export, int8 weights.
- ``ort-quantize-static``: ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
  min-max calibration on the task's calibration batches); MatMul only on MiniLM (as the issue
  asks), its default op set on the CNNs.
- ``torchao-int8-dyn-eager`` (MiniLM): torchao ``quantize_(Int8DynamicActivationInt8WeightConfig())``
  in PyTorch eager. On the CNNs it would quantize the classifier only, so it is skipped there.
- ``nncf-openvino``: ``nncf.quantize`` of the fp32 export read by OpenVINO (``model_type``
  TRANSFORMER on MiniLM), calibrated on the same batches, saved as OpenVINO IR and run by OpenVINO.

Timing reuses ``bench_int8.timed_rounds`` (interleaved rounds, settle, busy rounds set aside).
After the timed lines each part prints an ``"acceptance"`` line: the issue's targets with the
measured value next to each.

Usage:
    python benchmarks/bench_quant.py > quant.jsonl
    python benchmarks/bench_quant.py --part resnet --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import Method, machine, safetensors_bytes, timed_rounds  # noqa: E402 - shared timing harness

import pared  # noqa: E402
from pared.measure import latency_from_samples  # noqa: E402
from pared.onnx_export import export_onnx  # noqa: E402
from pared.quant import CrossLayerEqualizationConfig, Int8Config  # noqa: E402
from pared.recipe import load_recipe  # noqa: E402
from pared.runtime import make_runner  # noqa: E402
from pared.tasks.digits import DigitsTask  # noqa: E402
from pared.tasks.minilm import MiniLMTask  # noqa: E402
from pared.testing.resnet import resnet18_layout  # noqa: E402

THREADS = 2
WARMUP = 3
BASELINE = "torch-fp32-eager"
TARGETS = {
    "minilm": {"ratio_b8_max": 0.15, "mean_cosine_min": 0.998, "top10_min": 0.95, "size_max_bytes": 23_000_000},
    "resnet": {"ratio_b16_max": 0.12},
    "digits": {"accuracy_drop_max": 0.3},
}


def log(msg: str) -> None:
    print(f"[bench_quant {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


class Part:
    """One model's run: the fp32 baseline and its ONNX export, the methods built so far, and what
    pared's steps reported for each pared variant."""

    def __init__(self, name: str, scratch: Path, names: list[str], fp32: nn.Module, calib: list[tuple[torch.Tensor, ...]],
                 example: tuple[torch.Tensor, ...], axes: dict[str, dict[int, str]]) -> None:
        self.name, self.scratch, self.names = name, scratch, names
        self.fp32, self.calib, self.example, self.axes = fp32, calib, example, axes
        self.fp32_bytes = safetensors_bytes(fp32, scratch)
        self.methods = [Method(BASELINE, make_runner("torch", model=fp32, threads=THREADS), runtime="torch",
                               size_bytes=self.fp32_bytes, size_what="safetensors state_dict (fp32)")]
        self.fp32_onnx = scratch / f"{name}_fp32.onnx"
        export_onnx(fp32, example, self.fp32_onnx, input_names=names, dynamic_axes=axes)
        self.summaries: dict[str, list[dict[str, Any]]] = {}

    def pared(self, name: str, configs: list[Any], runtimes: tuple[str, ...] = ("openvino",)) -> None:
        """Build ``compress_(fp32, configs)`` exported to QDQ ONNX, one method per runtime."""

        def build() -> list[Method]:
            ctx = pared.Context(calib=self.calib)
            model = pared.compress_(copy.deepcopy(self.fp32), configs, context=ctx)
            self.summaries[name] = ctx.summary
            path = self.scratch / f"{name}.onnx"
            export_onnx(model, self.example, path, input_names=self.names, dynamic_axes=self.axes)
            return [Method(f"{name}-{rt}", make_runner(rt, onnx_path=path, threads=THREADS, input_names=self.names),
                           runtime=rt, size_bytes=path.stat().st_size, size_what="ONNX file (QDQ, int8 initializers)")
                    for rt in runtimes]

        self.attempt(name, build)

    def attempt(self, name: str, build: Callable[[], Method | list[Method] | None]) -> None:
        log(f"{self.name}: building {name}")
        t = time.perf_counter()
        try:
            built = build()
        except ModuleNotFoundError as exc:
            emit({"bench": "quant", "part": self.name, "method": name, "skipped": f"not installed: {exc.name}"})
            return
        except Exception as exc:  # noqa: BLE001 - a failing method is reported, the rest run
            traceback.print_exc(file=sys.stderr)
            emit({"bench": "quant", "part": self.name, "method": name, "error": f"{type(exc).__name__}: {exc}"})
            return
        if built is None:
            return
        self.methods.extend(built if isinstance(built, list) else [built])
        log(f"{self.name}: built {name} in {time.perf_counter() - t:.1f}s")

    def skip(self, name: str, reason: str) -> None:
        emit({"bench": "quant", "part": self.name, "method": name, "skipped": reason})


# --------------------------------------------------------------------------- builders


def ort_dynamic(part: Part) -> Method:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = part.scratch / "ort_dynamic.onnx"
    with contextlib.chdir(part.scratch):  # the quantizer may drop helper files into the cwd
        quantize_dynamic(str(part.fp32_onnx), str(out), weight_type=QuantType.QInt8)
    run = make_runner("onnxruntime", onnx_path=out, threads=THREADS, input_names=part.names)
    return Method("ort-quantize-dynamic", run, runtime="onnxruntime", size_bytes=out.stat().st_size,
                  size_what="ONNX file (ORT dynamic, int8 weights)")


def ort_static(part: Part, ops: list[str] | None) -> Method:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{n: t.numpy() for n, t in zip(part.names, b)} for b in part.calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    out = part.scratch / "ort_static.onnx"
    kwargs = {"op_types_to_quantize": ops} if ops else {}
    with contextlib.chdir(part.scratch):
        quantize_static(str(part.fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **kwargs)
    run = make_runner("onnxruntime", onnx_path=out, threads=THREADS, input_names=part.names)
    what = "ONNX file (ORT static QDQ, " + ("MatMul only" if ops else "default ops") + ")"
    return Method("ort-quantize-static", run, runtime="onnxruntime", size_bytes=out.stat().st_size, size_what=what)


def nncf_openvino(part: Part, *, transformer: bool) -> Method:
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(part.fp32_onnx))
    feeds = [{n: t.numpy() for n, t in zip(part.names, b)} for b in part.calib]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    # NNCF draws its progress bar on stdout, which must hold JSON lines only.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(ov_model, nncf.Dataset(feeds), subset_size=len(feeds), **kwargs)
    xml = part.scratch / "nncf.xml"
    ov.save_model(quantized, str(xml))
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    run = make_runner("openvino", onnx_path=xml, threads=THREADS, input_names=part.names)
    return Method("nncf-openvino", run, runtime="openvino", size_bytes=size,
                  size_what="OpenVINO IR (.xml + .bin, NNCF int8, fp16-compressed float constants)")


def torchao_dynamic(fp32: nn.Module, example: tuple[torch.Tensor, ...]) -> Method:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(fp32)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    run = make_runner("torch", model=model, threads=THREADS)
    with torch.inference_mode():
        run(*example)
    size = sum(t.numel() * t.element_size() for p in (*model.parameters(), *model.buffers()) for t in _plain_tensors(p))
    return Method("torchao-int8-dyn-eager", run, runtime="torch", size_bytes=size,
                  size_what="bytes of the tensors (int8 data + scales) held by the quantized model")


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a (possibly nested) tensor subclass such as torchao's int8 weights."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    return [x for name in flatten()[0] for x in _plain_tensors(getattr(t, name))]


# --------------------------------------------------------------------------- timing


def time_part(part: Part, inputs: tuple[torch.Tensor, ...], batch: int, rounds: int, metrics: dict[str, Any]) -> dict[str, float]:
    log(f"{part.name}: timing {len(part.methods)} methods at batch {batch}, {rounds} rounds")
    samples, stats = timed_rounds(part.methods, inputs, rounds=rounds, settle=True, seed=batch)
    lat = {m.name: latency_from_samples(samples[m.name], runtime=m.runtime, batch=batch, threads=THREADS, warmup=WARMUP)
           for m in part.methods}
    base = lat[BASELINE].p50_ms
    ratios = {}
    for m in part.methods:
        ratios[m.name] = lat[m.name].p50_ms / base
        emit({"bench": "quant", "part": part.name, "method": m.name, "batch": batch, "threads": THREADS,
              "runtime": m.runtime, "p50_ms": round(lat[m.name].p50_ms, 3), "p90_ms": round(lat[m.name].p90_ms, 3),
              "ratio_vs_fp32_eager": round(ratios[m.name], 4), "size_bytes": m.size_bytes,
              "size_ratio": round(m.size_bytes / part.fp32_bytes, 4), "metrics": metrics.get(m.name, {}),
              "runs": lat[m.name].runs, "size_what": m.size_what})
    emit({"bench": "quant", "part": part.name, "batch": batch, "timing": True, **stats})
    return ratios


def evaluate(part: Part, score: Callable[[Any], dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in part.methods:
        t = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[m.name] = {k: float(f"{v:.6g}") for k, v in score(m.runner).items()}
        except Exception as exc:  # noqa: BLE001
            out[m.name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{part.name}: evaluated {m.name} in {time.perf_counter() - t:.1f}s: {out[m.name]}")
    return out


def summary_line(part: Part) -> None:
    """What pared's steps reported (auto's choices, kept-float layers, CLE pairs), per variant."""
    keep = ("technique", "calibration_choice", "outlier_fallback", "kept_float", "pairs", "bias_corrected", "smoothed")
    emit({"bench": "quant", "part": part.name, "pared_steps": {
        name: [{k: v for k, v in step.items() if k in keep} for step in steps] for name, steps in part.summaries.items()}})


# --------------------------------------------------------------------------- parts


def run_minilm(rounds: int, quick: bool, scratch: Path) -> None:
    task = MiniLMTask(n_eval=64) if quick else MiniLMTask()
    fp32 = task.model()
    part = Part("minilm", scratch, task.input_names(), fp32, list(task.calibration()), task.example_inputs(8),
                task.dynamic_axes())
    recipe = load_recipe("int8")
    part.pared("pared-int8", recipe, ("openvino", "onnxruntime"))
    part.pared("pared-int8-attention", load_recipe("int8-attention"))
    part.pared("pared-auto-int8", [dataclasses.replace(c, calibration="auto") if isinstance(c, Int8Config) else c
                                   for c in recipe])
    part.attempt("ort-quantize-dynamic", lambda: ort_dynamic(part))
    part.attempt("ort-quantize-static", lambda: ort_static(part, ["MatMul"]))
    part.attempt("torchao-int8-dyn-eager", lambda: torchao_dynamic(fp32, task.example_inputs(1)))
    part.attempt("nncf-openvino", lambda: nncf_openvino(part, transformer=True))
    log("minilm: fp32 reference embeddings")
    task.reference_embeddings()
    metrics = evaluate(part, task.evaluate)
    summary_line(part)
    ratios = {b: time_part(part, task.example_inputs(b), b, rounds, metrics) for b in (1, 8)}
    sizes = {m.name: m.size_bytes for m in part.methods}
    acceptance_minilm(ratios, metrics, sizes)


def acceptance_minilm(ratios: dict[int, dict[str, float]], metrics: dict[str, Any], sizes: dict[str, int]) -> None:
    t = TARGETS["minilm"]
    ours = "pared-int8-openvino"
    if ours not in metrics:
        return
    m = metrics[ours]
    checks: dict[str, Any] = {
        "ratio_b8": [ratios[8][ours], ratios[8][ours] <= t["ratio_b8_max"]],
        "mean_cosine": [m.get("mean_cosine"), m.get("mean_cosine", 0) >= t["mean_cosine_min"]],
        "top10_overlap": [m.get("top10_overlap"), m.get("top10_overlap", 0) >= t["top10_min"]],
        "size_bytes": [sizes[ours], sizes[ours] <= t["size_max_bytes"]],
    }
    peer = "nncf-openvino"
    if peer in metrics and "mean_cosine" in metrics[peer]:
        for method in (ours, "pared-int8-attention-openvino"):
            if method not in metrics:
                continue
            m, p = metrics[method], metrics[peer]
            more_accurate = all(m[k] >= p[k] for k in ("mean_cosine", "top10_overlap"))
            checks[f"{method}_at_least_as_accurate_as_nncf"] = [
                {k: [m[k], p[k]] for k in ("mean_cosine", "top10_overlap")}, more_accurate]
            checks[f"{method}_faster_than_nncf_b8"] = [[ratios[8][method], ratios[8][peer]], ratios[8][method] < ratios[8][peer]]
    emit({"bench": "quant", "part": "minilm", "acceptance": checks, "targets": t})


def logits_fidelity(fp32: nn.Module, images: torch.Tensor) -> Callable[[Any], dict[str, float]]:
    with torch.inference_mode():
        ref = torch.cat([fp32(images[i:i + 16]) for i in range(0, len(images), 16)])

    def score(run: Any) -> dict[str, float]:
        with torch.inference_mode():
            out = torch.cat([run(images[i:i + 16]) for i in range(0, len(images), 16)]).float()
        return {"logit_cosine": float(F.cosine_similarity(out, ref, dim=1).mean()),
                "relative_mse": float(((out - ref) ** 2).mean() / (ref**2).mean())}

    return score


def run_resnet(rounds: int, scratch: Path) -> None:
    fp32 = resnet18_layout(32, 1000)
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 224, 224, generator=gen),) for _ in range(8)]
    held_out = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    part = Part("resnet", scratch, ["x"], fp32, calib, (held_out[:1],), {"x": {0: "batch"}})
    part.pared("pared-int8", load_recipe("int8-static"), ("openvino", "onnxruntime"))
    part.pared("pared-cle-bc-int8", [CrossLayerEqualizationConfig(), Int8Config(bias_correction=True)])
    part.skip("ort-quantize-dynamic", "dynamic quantization of convolutions (ConvInteger) is not a speed option: "
                                      "4.1x slower than fp32 on digits in bench_int8")
    part.attempt("ort-quantize-static", lambda: ort_static(part, None))
    part.skip("torchao-int8-dyn-eager", "Int8DynamicActivationInt8WeightConfig quantizes Linear layers only "
                                        "(here the classifier alone)")
    part.attempt("nncf-openvino", lambda: nncf_openvino(part, transformer=False))
    metrics = evaluate(part, logits_fidelity(fp32, held_out))
    summary_line(part)
    ratios = {b: time_part(part, (held_out[:b],), b, rounds, metrics) for b in (16, 1)}
    checks: dict[str, Any] = {}
    for name in ("pared-int8-openvino", "pared-cle-bc-int8-openvino"):
        if name in ratios[16]:
            checks[f"{name}_ratio_b16"] = [ratios[16][name], ratios[16][name] <= TARGETS["resnet"]["ratio_b16_max"]]
    a, b = metrics.get("pared-int8-openvino", {}), metrics.get("pared-cle-bc-int8-openvino", {})
    if "relative_mse" in a and "relative_mse" in b:
        checks["cle_bc_no_worse_relative_mse"] = [[b["relative_mse"], a["relative_mse"]], b["relative_mse"] <= a["relative_mse"]]
    emit({"bench": "quant", "part": "resnet", "acceptance": checks, "targets": TARGETS["resnet"]})


def run_digits(scratch: Path) -> None:
    task = DigitsTask()
    part = Part("digits", scratch, task.input_names(), task.model(), list(task.calibration()),
                task.example_inputs(64), task.dynamic_axes())
    part.pared("pared-int8", [Int8Config()])
    part.pared("pared-cle-bc-int8", [CrossLayerEqualizationConfig(), Int8Config(bias_correction=True)])
    part.pared("pared-auto-int8", [Int8Config(calibration="auto")])
    part.attempt("ort-quantize-static", lambda: ort_static(part, None))
    part.attempt("nncf-openvino", lambda: nncf_openvino(part, transformer=False))
    metrics = evaluate(part, task.evaluate)
    summary_line(part)
    base = metrics[BASELINE]["accuracy"]
    for name, m in metrics.items():
        emit({"bench": "quant", "part": "digits", "method": name, "metrics": m,
              "accuracy_drop": round(base - m["accuracy"], 4) if "accuracy" in m else None})
    checks: dict[str, Any] = {}
    for name in ("pared-int8-openvino", "pared-cle-bc-int8-openvino", "pared-auto-int8-openvino"):
        if "accuracy" in metrics.get(name, {}):
            drop = base - metrics[name]["accuracy"]
            checks[f"{name}_drop"] = [round(drop, 4), drop <= TARGETS["digits"]["accuracy_drop_max"]]
    a, b = metrics.get("pared-int8-openvino", {}), metrics.get("pared-cle-bc-int8-openvino", {})
    if "accuracy" in a and "accuracy" in b:
        checks["cle_bc_no_worse"] = [[b["accuracy"], a["accuracy"]], b["accuracy"] >= a["accuracy"]]
    emit({"bench": "quant", "part": "digits", "acceptance": checks, "targets": TARGETS["digits"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("minilm", "resnet", "digits", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per batch size (default 20, 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiniLM eval sentences, 5 rounds")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 20)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        scratch = Path(tmp)
        for name in ("digits", "resnet", "minilm") if args.part == "all" else (args.part,):
            try:
                {"minilm": lambda: run_minilm(rounds, args.quick, scratch),
                 "resnet": lambda: run_resnet(rounds, scratch),
                 "digits": lambda: run_digits(scratch)}[name]()
            except Exception as exc:  # noqa: BLE001 - one failing part does not hide the others
                traceback.print_exc(file=sys.stderr)
                emit({"bench": "quant", "part": name, "error": f"{type(exc).__name__}: {exc}"})
    emit({"bench": "quant", "summary": True, "machine": machine(), "threads": THREADS, "rounds": rounds,
          "warmup": WARMUP, "quick": args.quick, "elapsed_s": round(time.perf_counter() - t0, 1),
          "versions": _versions()})
    return 0


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("nncf", "torchao", "onnxruntime", "openvino"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing peer is reported as such
            out[mod] = "not installed"
    return out


if __name__ == "__main__":
    sys.exit(main())
