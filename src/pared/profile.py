"""``pared profile``: every measurement of one float model, in the report's units."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pared.measure import (
    count_macs,
    count_params,
    energy_per_inference,
    file_bytes,
    load_and_run_memory_bytes,
    measure_latency,
    peak_memory_bytes,
)
from pared.measure.size import activation_bytes
from pared.runtime import make_runner
from pared.tasks import Task


def profile_task(task: Task, *, batch: int = 8, threads: int = 2, rounds: int = 20) -> dict[str, Any]:
    """Measure ``task``'s fp32 model in PyTorch eager.

    Returns:
        ``{"params", "size_bytes", "macs", "latency_ms", "load_and_run_memory_bytes", "peak_memory_bytes",
        "energy_j", "metrics"}`` and the method of each memory figure.
    """
    torch.set_num_threads(threads)
    model = task.model()
    inputs = task.example_inputs(batch)
    run = make_runner("torch", model=model, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        size = file_bytes(path)
    macs = count_macs(model, inputs)
    peak, method = peak_memory_bytes(run, inputs)
    loaded, load_method = load_and_run_memory_bytes(
        lambda: make_runner("torch", model=copy.deepcopy(model), threads=threads), inputs
    )
    energy = energy_per_inference(
        run, inputs, macs=macs, mac_dtype="fp32", weight_bytes=size, activation_bytes=activation_bytes(model, inputs)
    )
    return {
        "task": task.name,
        "params": count_params(model),
        "size_bytes": size,
        "macs": macs,
        "latency_ms": measure_latency(run, inputs, runtime="torch", batch=batch, threads=threads, runs=rounds).to_dict(),
        "load_and_run_memory_bytes": loaded,
        "load_and_run_memory_method": load_method,
        "peak_memory_bytes": peak,
        "peak_memory_method": method,
        "energy_j": energy.to_dict(),
        "metrics": task.evaluate(run),
    }
