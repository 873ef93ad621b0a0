"""The task contract: a model, its inputs, calibration data and an evaluator.

A task is what pared measures quality against. ``evaluate`` takes a *runner*, any callable
``run(*inputs) -> tensor``, so the same evaluator scores a torch module, a compressed module or an
exported ONNX session wrapper.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pared.calib import CalibData

Runner = Callable[..., torch.Tensor]
"""``run(*inputs) -> output``: a torch module or an ONNX session wrapper (CPU tensors in, out)."""


@runtime_checkable
class Task(Protocol):
    """What every task provides; see ``docs/tasks.md``."""

    name: str
    primary_metric: str

    def model(self) -> torch.nn.Module:
        """A fresh fp32 model in eval mode; ``forward(*inputs) -> Tensor``."""
        ...

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Deterministic inputs for latency, MACs and export; batch dimension first."""
        ...

    def calibration(self) -> CalibData:
        """Calibration batches, disjoint from the evaluation data."""
        ...

    def evaluate(self, run: Runner) -> dict[str, float]:
        """Task metrics computed by calling ``run(*inputs)`` on the evaluation set."""
        ...

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes per input name."""
        ...

    def input_names(self) -> list[str]:
        """Names of the model's positional inputs, in order."""
        ...


def cache_dir() -> Path:
    """pared's cache dir, created if missing: ``$PARED_CACHE_DIR``, else ``~/.cache/pared``."""
    path = Path(os.environ.get("PARED_CACHE_DIR") or Path.home() / ".cache" / "pared")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_batches(run: Runner, batches: Iterable[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Call ``run`` on each batch and concatenate the outputs along dim 0 as a float CPU tensor.

    ``torch.as_tensor`` accepts the numpy arrays an ONNX runner may return, so evaluators need no
    special case for non-torch runners.
    """
    outs: list[torch.Tensor] = []
    with torch.inference_mode():
        for inputs in batches:
            out: Any = run(*inputs)
            outs.append(torch.as_tensor(out).detach().float().cpu())
    return torch.cat(outs, dim=0)


def chunks(tensors: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Split aligned tensors into fixed-size batches along dim 0 (the last may be smaller)."""
    n = tensors[0].shape[0]
    return [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, n, batch_size)]
