"""``UserTask``: wrap your own model, inputs and evaluator as a pared task."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pared.calib import CalibData
from pared.errors import UsageError
from pared.tasks.base import Runner


@dataclass
class UserTask:
    """A task built from plain callables; implements the ``Task`` protocol.

    Args:
        name: shown in reports.
        model_fn: returns a fresh fp32 model (``model()`` puts it in eval mode).
        example_inputs_fn: ``batch_size -> tuple`` of input tensors, batch dimension first.
        evaluate_fn: ``run -> {metric: value}``; call ``run(*inputs)`` and convert its result with
            ``torch.as_tensor(out).float()``, since ``run`` may be an ONNX session wrapper.
        calibration_data: a ``CalibData`` or any iterable of inputs; None means no calibration.
        primary_metric: the key of ``evaluate_fn``'s dict that quality gates use.
        input_names_list: ONNX input names; default ``input0, input1, ...``.
        dynamic_axes_map: ONNX dynamic axes; default dim 0 of every input is ``batch``.

    Example:
        >>> x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
        >>> def evaluate(run):
        ...     logits = torch.as_tensor(run(x)).float()
        ...     return {"accuracy": 100.0 * float((logits.argmax(1) == y).float().mean())}
        >>> task = UserTask(
        ...     "mine",
        ...     model_fn=lambda: torch.nn.Linear(16, 4),
        ...     example_inputs_fn=lambda b: (x[:b],),
        ...     evaluate_fn=evaluate,
        ...     calibration_data=[(x[i : i + 32],) for i in range(0, 128, 32)],
        ... )
    """

    name: str
    model_fn: Callable[[], torch.nn.Module]
    example_inputs_fn: Callable[[int], tuple[torch.Tensor, ...]]
    evaluate_fn: Callable[[Runner], dict[str, float]]
    calibration_data: CalibData | Iterable[Any] | None = None
    primary_metric: str = "accuracy"
    input_names_list: list[str] | None = None
    dynamic_axes_map: dict[str, dict[int, str]] | None = None

    def model(self) -> torch.nn.Module:
        """``model_fn()`` in eval mode."""
        return self.model_fn().eval()

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``example_inputs_fn(batch_size)`` as a tuple (a lone tensor is wrapped)."""
        out = self.example_inputs_fn(batch_size)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def calibration(self) -> CalibData:
        """The calibration data as ``CalibData``.

        Raises:
            UsageError: the task was created without ``calibration_data``.
        """
        if self.calibration_data is None:
            raise UsageError(
                f"task {self.name!r} has no calibration data; pass calibration_data= to UserTask"
            )
        data = self.calibration_data
        return data if isinstance(data, CalibData) else CalibData(data)

    def evaluate(self, run: Runner) -> dict[str, float]:
        """``evaluate_fn(run)`` with values as floats; the primary metric must be present."""
        metrics = {k: float(v) for k, v in self.evaluate_fn(run).items()}
        if self.primary_metric not in metrics:
            raise UsageError(
                f"task {self.name!r}: evaluate_fn returned {sorted(metrics)}, "
                f"which lacks the primary metric {self.primary_metric!r}"
            )
        return metrics

    def input_names(self) -> list[str]:
        """The given names, or ``input0, input1, ...`` from ``example_inputs(1)``."""
        if self.input_names_list is not None:
            return list(self.input_names_list)
        return [f"input{i}" for i in range(len(self.example_inputs(1)))]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The given map, or the batch dimension of every input."""
        if self.dynamic_axes_map is not None:
            return {k: dict(v) for k, v in self.dynamic_axes_map.items()}
        return {name: {0: "batch"} for name in self.input_names()}
