"""Quantization-aware training on digits: how much of the post-training drop QAT recovers.

Prints one JSON object per line on stdout (progress on stderr): per weight setting, the fp32
accuracy, post-training quantization at the same bits (``QATConfig(steps=0)``: the same quantizer,
untrained) and QAT after ``--steps`` steps, each measured on its exported QDQ ONNX file in ONNX
Runtime (the deployed artefact), plus the fraction of the PTQ drop that QAT recovered. Activations
are 8-bit per tensor in every setting. One line times a bf16-autocast QAT run against fp32.

Usage:
    python benchmarks/bench_qat.py > qat.jsonl
    python benchmarks/bench_qat.py --steps 300 --lr 1e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pared.apply import Context, compress_
from pared.onnx_export import export_onnx
from pared.quant import QATConfig
from pared.runtime import make_runner
from pared.tasks.digits import DigitsTask

SETTINGS = ((8, "per_channel"), (4, "per_channel"), (4, "per_tensor"), (3, "per_tensor"), (2, "per_channel"))


def log(msg: str) -> None:
    print(f"[bench_qat {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def deployed_accuracy(task: DigitsTask, model: torch.nn.Module, scratch: Path, name: str) -> float:
    path = export_onnx(model, task.example_inputs(64), scratch / f"{name}.onnx", input_names=task.input_names(),
                       dynamic_axes=task.dynamic_axes())
    return task.evaluate(make_runner("onnxruntime", onnx_path=path, threads=1, input_names=task.input_names()))["accuracy"]


def quantized(task: DigitsTask, fp32: torch.nn.Module, cfg: QATConfig) -> tuple[torch.nn.Module, float]:
    t = time.perf_counter()
    model = compress_(copy.deepcopy(fp32), cfg, context=Context(calib=task.calibration(), task=task))
    return model, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 8x8 convs are overhead-bound; one thread is fastest and deterministic
    task = DigitsTask()
    fp32 = task.model()
    base = task.evaluate(fp32)["accuracy"]
    with tempfile.TemporaryDirectory(prefix="bench_qat_") as tmp:
        scratch = Path(tmp)
        for bits, granularity in SETTINGS:
            common: dict[str, Any] = {"weight_bits": bits, "weight_granularity": granularity}
            ptq, _ = quantized(task, fp32, QATConfig(**common, steps=0))
            qat, seconds = quantized(task, fp32, QATConfig(**common, steps=args.steps, lr=args.lr))
            ptq_acc = deployed_accuracy(task, ptq, scratch, f"ptq{bits}{granularity}")
            qat_acc = deployed_accuracy(task, qat, scratch, f"qat{bits}{granularity}")
            drop = base - ptq_acc
            line = {
                "bench": "qat", "task": "digits", "weight_bits": bits, "weight_granularity": granularity,
                "activation_bits": 8, "steps": args.steps, "lr": args.lr,
                "fp32_accuracy": round(base, 3), "ptq_accuracy_ort": round(ptq_acc, 3),
                "qat_accuracy_ort": round(qat_acc, 3), "ptq_drop": round(drop, 3),
                "recovered_fraction": round((qat_acc - ptq_acc) / drop, 3) if drop > 0 else None,
                "qat_seconds": round(seconds, 1),
            }
            log(str(line))
            print(json.dumps(line), flush=True)
        bf16, seconds = quantized(task, fp32, QATConfig(weight_bits=4, steps=args.steps, lr=args.lr, autocast="bf16"))
        print(json.dumps({"bench": "qat", "task": "digits", "weight_bits": 4, "autocast": "bf16", "steps": args.steps,
                          "qat_accuracy_ort": round(deployed_accuracy(task, bf16, scratch, "bf16"), 3),
                          "qat_seconds": round(seconds, 1), "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
