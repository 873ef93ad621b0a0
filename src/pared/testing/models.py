"""Tiny deterministic models (< 100k parameters) every technique's tests run on."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp(d_in: int = 16, hidden: int = 32, d_out: int = 8, *, seed: int = 0) -> nn.Sequential:
    """``Linear -> ReLU -> Linear`` with seeded initialisation, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)).eval()


class TinyCNN(nn.Module):
    """Conv(3->8) + BatchNorm + ReLU + Linear for (B, 3, 6, 6) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


def tiny_cnn(*, seed: int = 1) -> TinyCNN:
    """A ``TinyCNN`` with non-trivial BatchNorm statistics (so folding them matters), in eval mode."""
    torch.manual_seed(seed)
    m = TinyCNN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def random_batches(shape: tuple[int, ...], n: int = 4, *, seed: int = 2) -> list[tuple[torch.Tensor]]:
    """``n`` seeded standard-normal input batches of ``shape`` (calibration data for tests)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen),) for _ in range(n)]
