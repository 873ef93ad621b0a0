"""The shared training loop: it trains, resumes from atomic checkpoints and refuses bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pared.apply import Context, compress_
from pared.errors import InputRefused, UsageError
from pared.train import FinetuneConfig, TrainableTask, train


class Regression:
    """y = x @ w_true: a task a Linear layer can fit exactly."""

    def __init__(self, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = self.x @ torch.randn(8, 2, generator=gen)

    def train_batches(self, batch_size: int, *, seed: int):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
        return [((self.x[i],), self.y[i]) for i in order.split(batch_size)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(output, target)


def _linear() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(8, 2)


def test_training_reduces_the_loss() -> None:
    task, model = Regression(), _linear()
    before = task.loss(model(task.x), task.y).item()
    result = train(model, task, FinetuneConfig(epochs=20, lr=0.05, batch_size=32), progress=False)
    after = task.loss(model(task.x), task.y).item()
    assert isinstance(task, TrainableTask)
    assert result.steps == 20 * 8
    assert after < 0.01 * before


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path) -> None:
    task = Regression()
    cfg = FinetuneConfig(steps=30, lr=0.01, batch_size=32, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=10)
    reference = _linear()
    train(reference, task, FinetuneConfig(steps=30, lr=0.01, batch_size=32), progress=False)

    def crash_at_11(step: int, _model: nn.Module) -> None:
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_linear(), task, cfg, after_step=[crash_at_11], progress=False)
    resumed = _linear()
    result = train(resumed, task, cfg, progress=False)
    assert result.resumed_from == 10 and result.steps == 30
    assert torch.equal(resumed.weight, reference.weight) and torch.equal(resumed.bias, reference.bias)
    assert not list((tmp_path / "ckpt").glob(".pared-tmp-*"))


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputRefused, match="cannot be resumed"):
        train(_linear(), Regression(), FinetuneConfig(steps=2, checkpoint_dir=str(tmp_path)), progress=False)


def test_diverging_loss_names_the_step() -> None:
    with pytest.raises(InputRefused, match="at step"):
        train(_linear(), Regression(), FinetuneConfig(steps=50, lr=1e12, optimizer="sgd", batch_size=32), progress=False)


def test_bad_config_values() -> None:
    for kwargs in ({"epochs": 0}, {"lr": -1.0}, {"steps": -2}, {"grad_accum": 0}):
        with pytest.raises(UsageError):
            FinetuneConfig(**kwargs)


def test_finetune_step_needs_a_trainable_task() -> None:
    with pytest.raises(UsageError, match="no training data"):
        compress_(_linear(), FinetuneConfig(steps=1), context=Context(task=object()))
    ctx = Context(task=Regression())
    compress_(_linear(), FinetuneConfig(steps=3, batch_size=32), context=ctx)
    assert ctx.summary[-1]["technique"] == "finetune" and ctx.summary[-1]["steps"] == 3


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    result = train(_linear(), Regression(), FinetuneConfig(epochs=1, batch_size=32, grad_accum=4), progress=False)
    assert result.steps == 2  # 8 micro-batches / 4


class Classify:
    """Two-class toy task whose model() is the fixed teacher (a fresh copy each call)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(256, 8, generator=gen)
        self.y = (self.x[:, 0] > 0).long()
        torch.manual_seed(4)
        self.teacher = nn.Linear(8, 2)
        with torch.no_grad():
            self.teacher.weight.zero_()
            self.teacher.weight[1, 0], self.teacher.weight[0, 0] = 4.0, -4.0
        self.model_calls = 0

    def model(self) -> nn.Module:
        import copy

        self.model_calls += 1
        return copy.deepcopy(self.teacher).eval()

    def train_batches(self, batch_size: int, *, seed: int):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
        return [((self.x[i],), self.y[i]) for i in order.split(batch_size)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target)


def test_pure_distillation_pulls_the_student_to_the_teacher() -> None:
    task = Classify()
    torch.manual_seed(9)
    student = nn.Linear(8, 2)
    before = nn.functional.kl_div(torch.log_softmax(student(task.x), -1), torch.softmax(task.teacher(task.x), -1), reduction="batchmean").item()
    train(student, task, FinetuneConfig(epochs=30, lr=0.05, batch_size=64, distill=1.0, temperature=1.0), progress=False)
    after = nn.functional.kl_div(torch.log_softmax(student(task.x), -1), torch.softmax(task.teacher(task.x), -1), reduction="batchmean").item()
    assert task.model_calls == 1  # the teacher is built once per training run
    assert after < 0.2 * before


def test_distillation_refuses_mismatched_outputs_and_bad_weights() -> None:
    from pared.train import kd_loss

    with pytest.raises(UsageError, match="does not match teacher"):
        kd_loss(torch.zeros(4, 3), torch.zeros(4, 2), 2.0)
    for kwargs in ({"distill": 1.5}, {"distill": -0.1}, {"temperature": 0.0}):
        with pytest.raises(UsageError):
            FinetuneConfig(**kwargs)
    assert kd_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), 2.0).item() == pytest.approx(0.0, abs=1e-6)


class DropoutNet(nn.Module):
    """Linear -> Dropout(0.5) -> Linear: in train mode two calls differ, in eval mode they agree."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2))
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.body[1].training)
        return self.body(x)


def test_train_mode_false_trains_without_dropout() -> None:
    for train_mode in (True, False):
        model = DropoutNet()
        train(model, Regression(), FinetuneConfig(steps=3, batch_size=32, train_mode=train_mode), progress=False)
        assert set(model.seen_training) == {train_mode}
        assert not model.training  # left in eval mode either way


def test_freeze_keeps_selected_modules_fixed() -> None:
    model = DropoutNet()
    first = model.body[0].weight.detach().clone()
    last = model.body[2].weight.detach().clone()
    train(model, Regression(), FinetuneConfig(steps=5, batch_size=32, lr=0.05, freeze=("body.0",)), progress=False)
    assert torch.equal(model.body[0].weight, first) and not torch.equal(model.body[2].weight, last)
    assert model.body[0].weight.requires_grad  # restored after training
    with pytest.raises(UsageError, match="no_such"):
        train(model, Regression(), FinetuneConfig(steps=1, freeze=("no_such",)), progress=False)
    with pytest.raises(UsageError, match="no trainable parameters"):
        train(model, Regression(), FinetuneConfig(steps=1, freeze=("body.*",)), progress=False)


def test_without_cuda_training_stays_on_cpu() -> None:
    from pared.train import on_accelerator, world

    model = _linear()
    with on_accelerator(model) as device:
        assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.weight.device.type == "cpu"  # moved back after training
    assert world() == (0, 1)
