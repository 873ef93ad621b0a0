"""Early exit: graph cutting, per-sample exits, MAC accounting, head distillation, reload, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pared
from pared.apply import Context
from pared.artefact import load_artefact, save_artefact
from pared.config import config_from_dict, config_to_dict
from pared.early_exit import EarlyExitConfig, EarlyExitModel, split_at
from pared.errors import UsageError
from pared.measure import count_macs
from pared.testing.models import random_batches
from pared.train import kd_loss

AFTER = ("2", "5")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 5),
    ).eval()


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.block(x))


class _Task:
    """Unlabelled random images: the heads learn only from the model's own output."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(5)
        self.x = torch.randn(256, 3, 6, 6, generator=gen)

    def train_batches(self, batch_size: int, *, seed: int):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
        return [((self.x[i],), None) for i in order.split(batch_size)]

    def loss(self, output, target):  # never used: early exit passes its own distillation loss
        raise AssertionError


def _wrapped(threshold: float = 0.9, steps: int = 0) -> tuple[nn.Module, nn.Module, Context]:
    fp32 = _cnn()
    ctx = Context(calib=random_batches((4, 3, 6, 6)), task=_Task())
    model = pared.compress_(
        copy.deepcopy(fp32),
        EarlyExitConfig(after=AFTER, threshold=threshold, steps=steps),
        context=ctx,
    )
    return fp32, model, ctx


def test_segments_compose_to_the_original_forward() -> None:
    model = _cnn()
    segments, order = split_at(model, ("5", "2"))
    assert order == ["2", "5"]  # forward order, whatever order the config gave
    x = torch.randn(3, 3, 6, 6)
    h = segments[0](x)
    assert h.shape == (3, 8, 6, 6)
    torch.testing.assert_close(segments[2](segments[1](h)), model(x))


def test_threshold_one_never_exits_and_matches_the_backbone() -> None:
    fp32, model, _ = _wrapped(threshold=1.0)
    x = torch.randn(10, 3, 6, 6)
    assert isinstance(model, EarlyExitModel)
    torch.testing.assert_close(model(x), fp32(x))
    assert model.last_exit_counts == [0, 0, 10]


def test_low_threshold_exits_at_the_first_head_and_saves_macs() -> None:
    fp32, model, _ = _wrapped(threshold=1e-6)
    x = torch.randn(10, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.heads[0](model.backbone[:3](x)))
    assert model.last_exit_counts == [10, 0, 0]
    assert count_macs(model, (x,)) < 0.1 * count_macs(fp32, (x,))


def test_each_sample_takes_its_own_exit() -> None:
    _, model, _ = _wrapped()
    x = torch.randn(64, 3, 6, 6)
    with torch.no_grad():
        exits = model.all_exits(x)
        conf = [e.softmax(-1).amax(-1) for e in exits[:-1]]
        model.threshold = float(conf[0].median())  # about half leave at the first head
        out = model(x)
    first = conf[0] >= model.threshold
    second = ~first & (conf[1] >= model.threshold)
    rest = ~first & ~second
    torch.testing.assert_close(out[first], exits[0][first])
    torch.testing.assert_close(out[second], exits[1][second], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[rest], exits[2][rest], atol=1e-5, rtol=1e-5)
    assert model.last_exit_counts == [int(first.sum()), int(second.sum()), int(rest.sum())]
    # MACs counted on the real run fall between all-first-exit and all-final
    full = count_macs(model.backbone, (x,))
    assert count_macs(model, (x,)) < full


def test_heads_learn_the_final_output_by_distillation() -> None:
    fp32, untrained, _ = _wrapped(steps=0)
    _, trained, ctx = _wrapped(steps=40)
    x = torch.randn(128, 3, 6, 6, generator=torch.Generator().manual_seed(9))

    def distance(
        model: EarlyExitModel,
    ) -> list[float]:  # held-out KL of each head to the final output
        with torch.no_grad():
            outs = model.all_exits(x)
        return [float(kd_loss(o, outs[-1], 1.0)) for o in outs[:-1]]

    assert all(t < 0.5 * u for t, u in zip(distance(trained), distance(untrained), strict=True))
    # the backbone is frozen and untouched, BatchNorm statistics included
    for key, value in fp32.state_dict().items():
        assert torch.equal(trained.backbone.state_dict()[key], value), key
    assert ctx.summary[-1]["train_steps"] == 40
    assert all(p.requires_grad for p in trained.backbone.parameters())


def test_artefact_reload_and_config_round_trip(tmp_path) -> None:
    cfg = EarlyExitConfig(after=AFTER, threshold=0.5, steps=5)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    ctx = Context(calib=random_batches((4, 3, 6, 6)), task=_Task())
    model = pared.compress_(_cnn(), cfg, context=ctx)
    save_artefact(model, tmp_path, recipe=[cfg], source=None, structure=ctx.structure)
    back = load_artefact(tmp_path, model=_cnn(seed=7))
    x = torch.randn(16, 3, 6, 6)
    assert torch.equal(back(x), model(x))
    assert back.last_exit_counts == model.last_exit_counts


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"after": ["2", "2"]},
        {"after": ["2"], "threshold": 0.0},
        {"after": ["2"], "threshold": 1.5},
        {"after": ["2"], "steps": -1},
        {"after": ["2"], "head_pool": 0},
        {"after": ["2"], "lr": 0.0},
    ],
)
def test_bad_fields_are_refused(fields: dict) -> None:
    with pytest.raises(UsageError):
        config_from_dict({"technique": "early_exit", **fields})


def test_bad_blocks_are_refused() -> None:
    ctx = Context(calib=random_batches((2, 3, 6, 6)))
    with pytest.raises(UsageError, match="no module of the model: \\['features.9'\\]"):
        pared.compress_(_cnn(), EarlyExitConfig(after=("2", "features.9"), steps=0), context=ctx)
    with pytest.raises(UsageError, match="used again after block 'block'"):
        pared.compress_(
            _Residual(), EarlyExitConfig(after=("block",), steps=0), calib=random_batches((2, 8))
        )
    with pytest.raises(UsageError, match="training batches"):
        pared.compress_(
            _cnn(), EarlyExitConfig(after=AFTER), context=ctx
        )  # steps > 0, no trainable task


def test_a_block_called_twice_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.act(x)))

    with pytest.raises(UsageError, match="called 2 times"):
        split_at(Twice(), ("act",))


def test_export_is_refused(tmp_path) -> None:
    from pared.onnx_export import export_onnx

    _, model, _ = _wrapped()
    with pytest.raises(UsageError, match="cannot be exported"):
        export_onnx(model, (torch.randn(2, 3, 6, 6),), tmp_path / "m.onnx", input_names=["x"])


def test_compress_refuses_an_onnx_runtime_before_any_work(tmp_path) -> None:
    from pared.pipeline import compress_task

    class _NeverLoaded:
        name, primary_metric = "never", "accuracy"

        def model(self):
            raise AssertionError("the model must not be loaded for a refused runtime")

    with pytest.raises(UsageError, match="PyTorch only"):
        compress_task(
            _NeverLoaded(), [EarlyExitConfig(after=AFTER)], tmp_path / "out", runtime="openvino"
        )
