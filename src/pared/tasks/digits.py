"""The ``digits`` task: a small CNN on scikit-learn's bundled 8x8 handwritten digits.

The data ships inside scikit-learn, so nothing is downloaded. The CNN is trained once,
deterministically, and its weights are cached as safetensors in pared's cache directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from pared.atomic import atomic_write_bytes
from pared.calib import CalibData
from pared.errors import UsageError
from pared.tasks.base import Runner, cache_dir, chunks, run_batches

NUM_CLASSES = 10
EPOCHS = 30
EVAL_BATCH = 64
CALIB_IMAGES = 128
CALIB_BATCH = 16
_CACHE_FORMAT = "1"  # bump when the architecture or recipe changes, so old weights are retrained


class DigitsCNN(torch.nn.Module):
    """Three 3x3 conv blocks and a two-layer classifier for (B, 1, 8, 8) images.

    Args:
        width: channels of the first conv; later layers use 2x and 4x, the hidden layer 4x.
            ``width=16`` has about 89k parameters; ``width=8`` is the half-width student.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        if width < 1:
            raise UsageError(f"DigitsCNN width must be >= 1, got {width}")
        self.width = width
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = torch.nn.Sequential(
            *_conv_block(1, w1),
            *_conv_block(w1, w2),
            torch.nn.MaxPool2d(2),  # 8x8 -> 4x4
            *_conv_block(w2, w3),
        )
        self.classifier = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(w3 * 4 * 4, w3),
            torch.nn.ReLU(),
            torch.nn.Linear(w3, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) pixels in [0, 1] -> (B, 10) logits."""
        return self.classifier(self.features(x))


def _conv_block(c_in: int, c_out: int) -> list[torch.nn.Module]:
    return [
        torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),  # BN supplies the bias
        torch.nn.BatchNorm2d(c_out),
        torch.nn.ReLU(),
    ]


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified 75/25 split: ``(x_train, y_train, x_test, y_test)``.

    Images are float32 (N, 1, 8, 8) in [0, 1]; labels int64 (N,). Fresh tensors on every call,
    so callers may modify them.
    """
    return tuple(torch.from_numpy(a.copy()) for a in _split())  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]  # raw pixels are 0..16
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def train_digits_cnn(width: int = 16, *, epochs: int = EPOCHS, seed: int = 0) -> DigitsCNN:
    """Train a ``DigitsCNN`` on the training split with Adam, batch 64; no cache involved.

    Deterministic for a given seed: initialisation and shuffling use their own seeded generators,
    the global RNG state is restored afterwards, and training runs on one thread.

    Returns:
        The trained model in eval mode.
    """
    x_train, y_train, _, _ = digits_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(width)
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
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


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # 8x8 convs are overhead-bound: a second thread only adds synchronisation (10x slower on a
    # busy 2-core machine), and one thread also keeps float reductions in a fixed order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def accuracy(run: Runner, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent (0..100) of ``x`` whose argmax logit under ``run`` equals ``y``."""
    logits = run_batches(run, chunks((x,), EVAL_BATCH))
    if logits.shape != (len(x), NUM_CLASSES):
        raise UsageError(f"digits runner must return (batch, 10) logits, got {tuple(logits.shape)}")
    return 100.0 * float((logits.argmax(dim=1) == y).double().mean())


class DigitsTask:
    """``DigitsCNN`` on the digits test split; ``model()`` trains once, then loads cached weights.

    Args:
        width: the CNN's width (16 is the built-in task).

    Example:
        >>> task = DigitsTask()
        >>> task.evaluate(task.model())["accuracy"]  # about 98-99
    """

    name = "digits"
    primary_metric = "accuracy"

    def __init__(self, width: int = 16) -> None:
        self.width = width

    def model(self) -> torch.nn.Module:
        """A fresh fp32 ``DigitsCNN`` in eval mode (trained and cached on first use)."""
        model = DigitsCNN(self.width)
        state = _load_weights(self.weights_path(), self.width)
        if state is None:
            state = train_digits_cnn(self.width).state_dict()
            _save_weights(self.weights_path(), state, self.width)
        model.load_state_dict(state)
        return model.eval()

    def weights_path(self) -> Path:
        """Where the trained weights are cached."""
        return cache_dir() / f"digits_cnn_w{self.width}.safetensors"

    def input_names(self) -> list[str]:
        """``["x"]``."""
        return ["x"]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Only the batch is dynamic."""
        return {"x": {0: "batch"}}

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """The first ``batch_size`` test images (cycling past the end), shape (B, 1, 8, 8)."""
        x_test = digits_data()[2]
        return (x_test[torch.arange(batch_size) % len(x_test)],)

    def calibration(self) -> CalibData:
        """The first 128 training images in 8 batches of 16."""
        x_train = digits_data()[0][:CALIB_IMAGES]
        return CalibData(chunks((x_train,), CALIB_BATCH))

    def train_batches(self, batch_size: int, *, seed: int) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """One shuffled epoch of ``((images,), labels)`` from the training split (for fine-tuning)."""
        x_train, y_train, _, _ = digits_data()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        return [((x_train[idx],), y_train[idx]) for idx in order.split(batch_size)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits against the labels."""
        return F.cross_entropy(output, target)

    def evaluate(self, run: Runner) -> dict[str, float]:
        """``{"accuracy": percent}`` on the 450 test images, in batches of 64."""
        _, _, x_test, y_test = digits_data()
        return {"accuracy": accuracy(run, x_test, y_test)}


def _metadata(width: int) -> dict[str, str]:
    return {"format": _CACHE_FORMAT, "width": str(width), "epochs": str(EPOCHS), "seed": "0"}


def _save_weights(path: Path, state: dict[str, torch.Tensor], width: int) -> None:
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=_metadata(width)))


def _load_weights(path: Path, width: int) -> dict[str, torch.Tensor] | None:
    """Cached weights if present, readable and made by the current recipe; otherwise None."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if f.metadata() != _metadata(width):
                return None
        return load_file(path)
    except (OSError, ValueError, SafetensorError):
        return None  # a corrupt or truncated cache is retrained, not trusted
