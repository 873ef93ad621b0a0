"""Runners: one calling convention, ``run(*cpu_tensors) -> cpu float tensor``, over every runtime.

Tasks evaluate and measurement times a runner without knowing whether it is a PyTorch module,
an ONNX Runtime session or an OpenVINO compiled model. Thread counts are set explicitly so
latency figures state what they were measured with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pared.errors import UsageError

RUNTIMES = ("torch", "onnxruntime", "openvino", "openvino-bf16")


class TorchRunner:
    """A PyTorch module in eval mode under ``torch.inference_mode``."""

    runtime = "torch"

    def __init__(self, model: nn.Module, *, threads: int) -> None:
        self.model = model.eval()
        self.threads = threads

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(*inputs)


class OnnxRuntimeRunner:
    """An ONNX file in an ONNX Runtime CPU session (all graph optimisations on)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], *, threads: int, input_names: Sequence[str]) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = list(input_names)
        self.threads = threads

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: _numpy(t) for n, t in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for CPU, latency hint, pinned float precision.

    ``precision="f32"`` (runtime ``openvino``) runs every float op in fp32. ``"bf16"`` (runtime
    ``openvino-bf16``) lets the ops left in float (attention, softmax, norms) run in bf16 on CPUs
    with bf16 units (AMX, AVX512-BF16); int8 ops stay int8 either way. OpenVINO picks bf16 by
    itself on such CPUs, so pinning makes the choice explicit and recorded; on a CPU without bf16
    support OpenVINO falls back to fp32, and ``effective_precision`` says what it used.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int,
        input_names: Sequence[str],
        precision: str = "f32",
    ) -> None:
        import openvino as ov

        if precision not in ("f32", "bf16"):
            raise UsageError(f"OpenVINO precision must be f32 or bf16, got {precision!r}")
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        }
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = list(input_names)
        self.threads = threads
        self.runtime = "openvino" if precision == "f32" else "openvino-bf16"
        used = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
        self.effective_precision = "bf16" if "bf16" in str(used) or "bfloat16" in str(used) else "f32"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        # share_inputs: OpenVINO reads the caller's arrays in place instead of copying them into
        # its own buffers; for a 16x3x224x224 image batch that copy alone is ~1 ms. Safe because
        # infer() is synchronous and the arrays outlive it; the output is copied out below.
        feed = {n: np.ascontiguousarray(_numpy(t)) for n, t in zip(self.input_names, inputs)}
        result = self.request.infer(feed, share_inputs=True)
        return torch.from_numpy(np.array(result[self.compiled.output(0)]))


def make_runner(
    runtime: str, *, model: nn.Module | None = None, onnx_path: Path | None = None, threads: int, input_names: Sequence[str] = ()
) -> Any:
    """Runner for ``runtime``: one of ``RUNTIMES``."""
    if runtime == "torch":
        if model is None:
            raise UsageError("the torch runtime needs a model")
        return TorchRunner(model, threads=threads)
    if onnx_path is None:
        raise UsageError(f"the {runtime} runtime needs an ONNX file")
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(onnx_path, threads=threads, input_names=input_names)
    if runtime in ("openvino", "openvino-bf16"):
        precision = "bf16" if runtime == "openvino-bf16" else "f32"
        return OpenVinoRunner(onnx_path, threads=threads, input_names=input_names, precision=precision)
    raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
