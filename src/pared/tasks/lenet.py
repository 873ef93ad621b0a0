"""LeNet-300-100 and LeNet-5 style models on scikit-learn's 8x8 digits (the Deep Compression benchmarks).

Han et al. measured Deep Compression on LeNet-300-100 and LeNet-5 with MNIST (28x28, 70k images).
pared ships no downloaded data, so these tasks use the same architectures adapted to the bundled
digits (8x8, 16 grey levels, 1797 images; the split of ``pared.tasks.digits``):

- ``lenet300``: ``LeNet300``, an MLP 64-300-100-10 on the flattened image (50,200 weights +
  410 biases; the MNIST original has 784 inputs and 266,200 weights).
- ``lenet5``: ``LeNet5``, LeNet-5's 5x5 convolutions (6 and 16 channels, zero padding 2 so an
  8x8 image keeps its size) and one 2x2 max-pool after the second (two pools would leave 2x2
  maps, and pooling after the first cost 1 point of accuracy), then 256-120-84-10
  fully-connected (44,190 weights + 236 biases; the MNIST original has 61,470 weights).

Both are trained once, deterministically, and cached as safetensors like ``DigitsTask``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from pared.atomic import atomic_write_bytes
from pared.calib import CalibData
from pared.tasks.base import Runner, cache_dir, chunks
from pared.tasks.digits import CALIB_BATCH, CALIB_IMAGES, NUM_CLASSES, _one_thread, accuracy, digits_data

EPOCHS = 60
LR = 5e-3
_CACHE_FORMAT = "1"  # bump when an architecture or the training recipe changes


class LeNet300(nn.Module):
    """LeNet-300-100 for 8x8 images: flatten -> 300 -> 100 -> 10, ReLU between."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) pixels in [0, 1] -> (B, 10) logits."""
        x = F.relu(self.fc1(self.flatten(x)))  # (B, 300)
        x = F.relu(self.fc2(x))  # (B, 100)
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 for 8x8 images: conv5x5(6) -> conv5x5(16) -> pool -> 256 -> 120 -> 84 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) pixels in [0, 1] -> (B, 10) logits."""
        x = F.relu(self.conv1(x))  # (B, 6, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)  # (B, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def train_lenet(model: nn.Module, *, epochs: int = EPOCHS, seed: int = 0) -> nn.Module:
    """Train ``model`` in place on the digits training split: Adam (lr 5e-3, cosine), batch 64.

    Deterministic for a seed (seeded shuffling, one thread); the model is left in eval mode.
    """
    x_train, y_train, _, _ = digits_data()
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    with _one_thread():
        for _ in range(epochs):
            for idx in torch.randperm(len(x_train), generator=order).split(64):
                opt.zero_grad()
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
            sched.step()
    return model.eval()


class _LeNetTask:
    """Shared task plumbing: the digits split, cached training, accuracy."""

    name = ""
    primary_metric = "accuracy"
    architecture: type[nn.Module] = nn.Module

    def fresh(self, *, seed: int = 0) -> nn.Module:
        """An untrained model with seeded initialisation."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.architecture()

    def model(self) -> nn.Module:
        """A fresh fp32 model in eval mode (trained and cached on first use)."""
        model = self.fresh()
        state = _load_weights(self.weights_path())
        if state is None:
            state = train_lenet(self.fresh()).state_dict()
            tensors = {k: v.detach().contiguous() for k, v in state.items()}
            atomic_write_bytes(self.weights_path(), save(tensors, metadata=_metadata()))
        model.load_state_dict(state)
        return model.eval()

    def weights_path(self) -> Path:
        """Where the trained weights are cached."""
        return cache_dir() / f"{self.name}.safetensors"

    def input_names(self) -> list[str]:
        """``["x"]``."""
        return ["x"]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Only the batch is dynamic."""
        return {"x": {0: "batch"}}

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """The first ``batch_size`` test images (cycling), shape (B, 1, 8, 8)."""
        x_test = digits_data()[2]
        return (x_test[torch.arange(batch_size) % len(x_test)],)

    def calibration(self) -> CalibData:
        """The first 128 training images in 8 batches of 16."""
        return CalibData(chunks((digits_data()[0][:CALIB_IMAGES],), CALIB_BATCH))

    def train_batches(self, batch_size: int, *, seed: int) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """One shuffled epoch of ``((images,), labels)`` from the training split."""
        x_train, y_train, _, _ = digits_data()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        return [((x_train[idx],), y_train[idx]) for idx in order.split(batch_size)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits against the labels."""
        return F.cross_entropy(output, target)

    def evaluate(self, run: Runner) -> dict[str, float]:
        """``{"accuracy": percent}`` on the 450 test images."""
        _, _, x_test, y_test = digits_data()
        return {"accuracy": accuracy(run, x_test, y_test)}


class Lenet300Task(_LeNetTask):
    """``LeNet300`` on digits (about 98% test accuracy)."""

    name = "lenet300"
    architecture = LeNet300


class Lenet5Task(_LeNetTask):
    """``LeNet5`` on digits (about 99% test accuracy)."""

    name = "lenet5"
    architecture = LeNet5


def _metadata() -> dict[str, str]:
    return {"format": _CACHE_FORMAT, "epochs": str(EPOCHS), "lr": str(LR), "seed": "0"}


def _load_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """Cached weights if present, readable and made by the current recipe; otherwise None."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if f.metadata() != _metadata():
                return None
        return load_file(path)
    except (OSError, ValueError, SafetensorError):
        return None  # a corrupt or truncated cache is retrained, not trusted
