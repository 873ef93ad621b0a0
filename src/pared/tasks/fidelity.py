"""Tasks for models pared knows nothing about: score the compressed model by output fidelity.

A factory model with an input shape, or a Hugging Face encoder directory, has no labelled data
here; what can still be measured honestly is how close the compressed outputs stay to the fp32
outputs on fixed inputs (cosine similarity and SQNR).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pared.calib import CalibData
from pared.tasks.base import Runner, run_batches
from pared.tasks.minilm import MiniLMTask

_SEED = 1234


class FidelityTask:
    """Random-normal inputs of a fixed shape; metrics compare outputs to the fp32 model's."""

    primary_metric = "mean_cosine"

    def __init__(self, name: str, model: nn.Module, input_shape: tuple[int, ...], *, n_eval: int = 64) -> None:
        self.name = name
        self._model = model.eval()
        self.sample_shape = input_shape[1:]
        gen = torch.Generator().manual_seed(_SEED)
        self._eval = torch.randn((n_eval, *self.sample_shape), generator=gen)
        self._calib = torch.randn((64, *self.sample_shape), generator=gen)
        self._reference: torch.Tensor | None = None

    def model(self) -> nn.Module:
        """The factory's model (a deep copy, so compression never touches the reference)."""
        import copy

        return copy.deepcopy(self._model)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``batch_size`` deterministic random inputs."""
        gen = torch.Generator().manual_seed(_SEED + 1)
        return (torch.randn((batch_size, *self.sample_shape), generator=gen),)

    def calibration(self) -> CalibData:
        """64 random inputs in batches of 8, disjoint from the evaluation inputs."""
        return CalibData([(self._calib[i : i + 8],) for i in range(0, 64, 8)])

    def evaluate(self, run: Runner) -> dict[str, float]:
        """``mean_cosine``, ``min_cosine`` and ``sqnr_db`` of outputs vs the fp32 model."""
        batches = [(self._eval[i : i + 8],) for i in range(0, len(self._eval), 8)]
        if self._reference is None:
            self._reference = run_batches(self._model, batches).flatten(1)
        out = run_batches(run, batches).flatten(1)
        ref = self._reference
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
        noise = (out - ref).pow(2).sum()
        sqnr = 10 * torch.log10(ref.pow(2).sum() / noise.clamp(min=1e-30))
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sqnr_db": float(sqnr)}

    def input_names(self) -> list[str]:
        return ["input"]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"input": {0: "batch"}}


def fidelity_task(name: str, model: nn.Module, input_shape: tuple[int, ...]) -> FidelityTask:
    """A ``FidelityTask`` for a factory model and its input shape (batch dimension first)."""
    return FidelityTask(name, model, input_shape)


def hf_encoder_task(directory: Path) -> MiniLMTask:
    """A BERT-style Hugging Face encoder directory scored like the built-in MiniLM task."""
    return MiniLMTask(model_dir=str(directory))
