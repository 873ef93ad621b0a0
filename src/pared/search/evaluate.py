"""How a trial is measured: the ``pared compress`` job, and the sensitivity scan before trials.

A trial's metrics are exactly what ``pared compress`` would report for its recipe: the same
``compress_task`` (apply, export, evaluate through the deployed runtime, time interleaved
against fp32 PyTorch eager in the same run), so nothing is re-implemented here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pared.config import BaseConfig
from pared.search.space import ModelInfo, model_info

if TYPE_CHECKING:
    from pared.search.study import SearchSpec


class Evaluator(Protocol):
    """What the search needs from whatever measures a trial."""

    primary_metric: str

    def baseline_metrics(self) -> dict[str, float]:
        """Task metrics of the float model (names the objectives and constraints may use)."""
        ...

    def model_info(self, *, sensitivity: bool) -> ModelInfo:
        """The model's structure, and per-group sensitivity when asked for."""
        ...

    def run(self, recipe: list[BaseConfig], out_dir: Path,
            on_metrics: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """Compress with ``recipe`` into ``out_dir``; return the ``report.json`` content."""
        ...


class CompressEvaluator:
    """Trials as ``pared compress`` jobs on ``spec.model`` (built-in, factory or HF directory)."""

    def __init__(self, spec: SearchSpec) -> None:
        self.spec = spec
        self._task: Any = None
        self._source: dict[str, Any] | None = None

    @property
    def task(self) -> Any:
        if self._task is None:
            from pared.cli import _task_for

            self._task, self._source = _task_for(self.spec.model, weights=self.spec.weights,
                                                 input_shape=self.spec.input_shape, trust_pickle=self.spec.trust_pickle)
        return self._task

    @property
    def primary_metric(self) -> str:
        return str(self.task.primary_metric)

    def baseline_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.task.evaluate(self.task.model()).items()}

    def model_info(self, *, sensitivity: bool) -> ModelInfo:
        from pared.train import TrainableTask

        info = model_info(self.task.name, self.task.model(), trainable=isinstance(self.task, TrainableTask))
        if not sensitivity:
            return info
        return model_info(self.task.name, self.task.model(), trainable=info.trainable,
                          sensitivity=measure_sensitivity(self.task, info))

    def run(self, recipe: list[BaseConfig], out_dir: Path,
            on_metrics: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        from pared.pipeline import compress_task

        self.task  # noqa: B018 - builds the task and its source record
        spec = self.spec
        return compress_task(self.task, recipe, out_dir, recipe_name=out_dir.name, runtime=spec.runtime,
                             threads=spec.threads, batch=spec.batch, latency_rounds=spec.rounds,
                             overwrite=True, source=self._source, on_metrics=on_metrics)


def measure_sensitivity(task: Any, info: ModelInfo) -> dict[str, dict[str, float]]:
    """Primary-metric drop of int8 (static) and of 50% magnitude pruning on each group alone.

    Eager PyTorch, one ``compress_`` + one evaluation per (group, technique): a few seconds on
    the digits CNN, a few minutes on MiniLM, before any trial. Groups with only embeddings, and
    measurements a technique refuses, are left out.
    """
    import torch

    from pared.apply import Context, compress_
    from pared.prune import MagnitudePruneConfig
    from pared.quant import Int8Config

    torch.manual_seed(0)
    fp32 = task.model()
    metric = task.primary_metric
    baseline = float(task.evaluate(fp32)[metric])
    probes = {"int8": lambda rule: Int8Config(mode="static", include=(rule,), embeddings=False),
              "prune50": lambda rule: MagnitudePruneConfig(sparsity=0.5, include=(rule,))}
    out: dict[str, dict[str, float]] = {}
    for group in info.groups:
        rule = info.group_rule(group)
        members = [n for n in info.layers_of("Linear", "Conv2d") if n == group or n.startswith(group + ".")]
        if not members:
            continue
        for key, make in probes.items():
            try:
                model = compress_(copy.deepcopy(fp32), make(rule), context=Context(calib=task.calibration(), task=task))
            except Exception:  # noqa: BLE001 - a technique refusing a group only means no figure
                continue
            out.setdefault(group, {})[key] = baseline - float(task.evaluate(model)[metric])
    return out
