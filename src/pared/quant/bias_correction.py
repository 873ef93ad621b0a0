"""Bias correction: remove the expected output shift that weight quantization adds.

Rounding a layer's weights changes its output by ``(W_q - W) x``. Averaged over the data, this
error is not zero: each output channel moves by ``E[(W_q - W) x]``, and a following ReLU or
BatchNorm-free residual path turns that shift into a systematic error. Subtracting it from the
bias removes the shift exactly on the calibration data (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019, the empirical variant).

Linear and Conv2d are linear in their input, so ``E[conv(x, dW)] = conv(E[x], dW)``: calibration
only has to keep the mean input (over the batch dimension, and for Linear over every leading
dimension), not the inputs themselves. Zero padding is included exactly because the mean is taken
per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MeanInput:
    """Running mean of a layer's input over its batch (Conv2d) or every leading (Linear) dimension."""

    def __init__(self, per_position: bool) -> None:
        self.per_position = per_position
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        flat = x.reshape(-1, *x.shape[1:]) if self.per_position else x.reshape(-1, x.shape[-1])
        s = flat.sum(dim=0)
        self.total = s if self.total is None else self.total + s
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        assert self.total is not None and self.count, "bias correction saw no calibration input"
        return self.total / self.count


def mean_input_for(layer: nn.Module) -> MeanInput:
    """The accumulator a layer's bias correction needs (per position for convolutions)."""
    return MeanInput(per_position=isinstance(layer, nn.Conv2d))


def output_shift(layer: nn.Module, weight_error: torch.Tensor, mean_input: torch.Tensor) -> torch.Tensor:
    """``E[(W_q - W) x]`` per output channel of a Linear or Conv2d, from the mean input.

    Args:
        layer: the float layer (its stride, padding, dilation and groups are used).
        weight_error: ``W_q - W`` (dequantized minus float weight), the layer's weight shape.
        mean_input: ``MeanInput.mean()`` of the layer's calibration inputs.
    """
    if isinstance(layer, nn.Conv2d):
        y = F.conv2d(mean_input.unsqueeze(0), weight_error, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return y.mean(dim=(0, 2, 3))
    return weight_error.float() @ mean_input
