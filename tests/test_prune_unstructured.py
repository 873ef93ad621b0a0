"""Unstructured pruning (issue 4): criteria, the cubic schedule, one-shot and gradual pruning, and
sparse storage in the pared artefact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from pared.apply import Context, compress_
from pared.artefact import MANIFEST, WEIGHTS, load_artefact, save_artefact, sparse_decode, sparse_encode
from pared.config import config_from_dict, config_to_dict
from pared.errors import InputRefused, UsageError
from pared.prune import (
    GradualPruneConfig,
    MagnitudePruneConfig,
    cubic_sparsity,
    keep_masks,
    keep_zeros_,
    magnitude,
    sparsity_of,
    taylor,
)
from pared.prune.unstructured import GradualPruner
from pared.quant import Int8Config, QuantLinear
from pared.recipe import load_recipe
from pared.tasks import get_task
from pared.testing.models import tiny_cnn, tiny_mlp
from pared.train import FinetuneConfig, train

PROPS = settings(max_examples=200, deadline=None, database=None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: a second intra-op thread only adds synchronisation on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Blobs:
    """A tiny 3-class classification task with training batches."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.y = torch.arange(240) % 3
        self.x = torch.randn(240, 16, generator=gen) + 2 * nn.functional.one_hot(self.y, 16).float()

    def train_batches(self, batch_size: int, *, seed: int):
        order = torch.randperm(240, generator=torch.Generator().manual_seed(seed))
        return [((self.x[i],), self.y[i]) for i in order.split(batch_size)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


# ------------------------------------------------------------------------------ criteria


def test_importance_callables() -> None:
    w = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    g = torch.tensor([[0.1, 0.1], [3.0, -4.0]])
    assert torch.equal(magnitude(w), w.abs())
    assert torch.equal(magnitude(w, g), w.abs())
    assert torch.allclose(taylor(w, g), torch.tensor([[0.1, 0.2], [0.0, 2.0]]))
    with pytest.raises(UsageError, match="gradient"):
        taylor(w, None)
    with pytest.raises(UsageError, match="shape"):
        taylor(w, g[0])


# ------------------------------------------------------------------------------ schedule


def test_cubic_schedule() -> None:
    kw = {"initial": 0.1, "final": 0.9, "steps": 100, "frequency": 10, "begin": 20}
    assert cubic_sparsity(0, **kw) == 0.0  # before begin
    assert cubic_sparsity(20, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(120, **kw) == 0.9 and cubic_sparsity(500, **kw) == 0.9
    t = 50  # an event: 30 steps into the ramp
    assert cubic_sparsity(t, **kw) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 30 / 100) ** 3)
    assert cubic_sparsity(55, **kw) == cubic_sparsity(50, **kw)  # held between events
    values = [cubic_sparsity(s, **kw) for s in range(0, 200)]
    assert values == sorted(values)  # never decreases
    jumps = [values[i] - values[i - 1] for i in range(31, 120, 10)]
    assert jumps == sorted(jumps, reverse=True)  # prunes fast first, then slower (cubic)
    assert cubic_sparsity(5, initial=0.0, final=0.8, steps=0) == 0.8  # no ramp: one shot


# ------------------------------------------------------------------------------ masks

_vals = st.one_of(st.just(0.0), st.floats(-3, 3, allow_nan=False, width=32))
tensors = st.one_of(
    st.lists(_vals, min_size=1, max_size=80).map(torch.tensor),
    st.tuples(st.floats(-1, 1, width=32), st.integers(1, 30)).map(lambda a: torch.full((a[1],), a[0])),
)
ratios = st.floats(0.0, 0.999)


@PROPS
@given(w=tensors, s=ratios)
def test_layer_masks_reach_the_sparsity_and_keep_zeros(w: torch.Tensor, s: float) -> None:
    mask = keep_masks({"a": w}, {"a": magnitude(w)}, s)["a"]
    pruned = w.masked_fill(~mask, 0.0)
    assert sparsity_of(pruned) >= s  # at least the requested sparsity
    fewest = next(k for k in range(w.numel() + 1) if k / w.numel() >= s)
    assert int((~mask).sum()) == max(fewest, int((w == 0).sum()))
    assert not bool(mask[w == 0].any())  # a zero is always pruned (masks only shrink)
    if bool((~mask).any()):
        kept_min = pruned.abs()[mask].min() if mask.any() else torch.tensor(float("inf"))
        dropped_max = w.abs()[~mask].max()
        assert bool(dropped_max <= kept_min)  # the smallest magnitudes go


@PROPS
@given(a=tensors, b=tensors, s=ratios)
def test_global_masks_rank_all_layers_together(a: torch.Tensor, b: torch.Tensor, s: float) -> None:
    ws = {"a": a, "b": b}
    masks = keep_masks(ws, {k: magnitude(v) for k, v in ws.items()}, s, scope="global")
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros / (a.numel() + b.numel()) >= s
    for k in ws:
        assert masks[k].shape == ws[k].shape and not bool(masks[k][ws[k] == 0].any())


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(bad: float) -> None:
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        MagnitudePruneConfig(sparsity=bad)
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        GradualPruneConfig(final_sparsity=bad)
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        MagnitudePruneConfig(per_layer={"fc1": bad})


@pytest.mark.parametrize("kwargs", [
    {"per_layer": {"0": 0.5}, "scope": "global"},
    {"frequency": 0},
    {"steps": -1},
    {"steps": 100, "finetune": {"steps": 50}},
    {"finetune": {"learning_rate": 0.1}},
])
def test_bad_gradual_config(kwargs) -> None:
    with pytest.raises(UsageError):
        GradualPruneConfig(**kwargs)


def test_configs_round_trip() -> None:
    for cfg in (MagnitudePruneConfig(sparsity=0.3, per_layer={"fc*": 0.9}, importance="taylor"),
                GradualPruneConfig(final_sparsity=0.8, scope="global", finetune={"lr": 0.01, "steps": 2000})):
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


# ------------------------------------------------------------------------------ one shot


def test_one_shot_layer_and_global() -> None:
    ctx = Context()
    model = compress_(tiny_mlp(), MagnitudePruneConfig(sparsity=0.75, per_layer={"2": 0.5}), context=ctx)
    assert sparsity_of(model[0].weight) == 0.75 and sparsity_of(model[2].weight) == 0.5
    assert [r["layer"] for r in ctx.summary[-1]["layers"]] == ["0", "2"]
    model = compress_(tiny_cnn(), MagnitudePruneConfig(sparsity=0.6, scope="global"))
    total = sum(w.numel() for w in _weights(model).values())
    zeros = sum(int((w == 0).sum()) for w in _weights(model).values())
    assert zeros / total >= 0.6 and (zeros - 1) / total < 0.6
    assert model.bn.weight.ne(0).all()  # only Linear/Conv2d weights are pruned


def test_selection_rules() -> None:
    model = compress_(tiny_mlp(), MagnitudePruneConfig(sparsity=0.5, exclude=("2",)))
    assert sparsity_of(model[0].weight) == 0.5 and sparsity_of(model[2].weight) == 0.0
    with pytest.raises(UsageError, match="matched no"):
        compress_(tiny_mlp(), MagnitudePruneConfig(include=("fc9",)))
    with pytest.raises(UsageError, match="fc9"):
        compress_(tiny_mlp(), MagnitudePruneConfig(per_layer={"fc9": 0.2}))


def test_nan_weight_is_refused() -> None:
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(InputRefused, match="'0'"):
        compress_(model, MagnitudePruneConfig())


def test_taylor_uses_gradients() -> None:
    task = Blobs()
    ctx = Context(task=task)
    model = compress_(tiny_mlp(d_out=3), MagnitudePruneConfig(sparsity=0.5, importance="taylor"), context=ctx)
    assert sparsity_of(model[0].weight) == 0.5
    by_magnitude = compress_(tiny_mlp(d_out=3), MagnitudePruneConfig(sparsity=0.5))
    assert not torch.equal(model[0].weight == 0, by_magnitude[0].weight == 0)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    with pytest.raises(UsageError, match="training data"):
        compress_(tiny_mlp(), MagnitudePruneConfig(importance="taylor"))


def test_finetune_after_pruning_keeps_zeros() -> None:
    task = Blobs()
    model = compress_(tiny_mlp(d_out=3), MagnitudePruneConfig(sparsity=0.8))
    zeros = {n: w == 0 for n, w in _weights(model).items()}
    compress_(model, FinetuneConfig(steps=30, lr=0.05, weight_decay=0.01, optimizer="adamw"),
              context=Context(task=task))
    for n, w in _weights(model).items():
        assert torch.equal(w == 0, zeros[n])
    copied = copy.deepcopy(model)  # a deep copy loses the gradient hook; keep_zeros_ restores it
    keep_zeros_(copied)
    compress_(copied, FinetuneConfig(steps=10, lr=0.05), context=Context(task=task))
    assert torch.equal(copied[0].weight == 0, zeros["0"])


# ------------------------------------------------------------------------------ gradual


def test_gradual_schedule_while_training() -> None:
    task = Blobs()
    seen: list[float] = []
    cfg = GradualPruneConfig(initial_sparsity=0.2, final_sparsity=0.9, steps=40, frequency=10,
                             finetune={"steps": 60, "lr": 0.02, "batch_size": 32})
    model = tiny_mlp(d_out=3)
    zero_sets: list[torch.Tensor] = []

    def watch(step: int, m: nn.Module) -> None:
        seen.append(sparsity_of(m[0].weight))
        zero_sets.append(m[0].weight == 0)

    pruner = GradualPruner({"0": model[0], "2": model[2]}, {"0": 0.9, "2": 0.9}, cfg)
    pruner(0, model)
    assert 0.2 <= sparsity_of(model[0].weight) < 0.2 + 1 / 512
    train(model, task, cfg.training(), after_step=[pruner, watch], progress=False)
    expected = [cubic_sparsity(s, initial=0.2, final=0.9, steps=40, frequency=10) for s in range(1, 61)]
    assert all(v >= e for v, e in zip(seen, expected)) and all(v < e + 1 / 512 for v, e in zip(seen, expected))
    for before, after in zip(zero_sets, zero_sets[1:]):
        assert bool((after | ~before).all())  # once pruned, a weight stays zero
    ctx = Context(task=task)
    model = compress_(tiny_mlp(d_out=3), cfg, context=ctx)
    assert ctx.summary[-1]["finetune"]["steps"] == 60
    assert all(r["sparsity"] >= 0.9 for r in ctx.summary[-1]["layers"])
    with pytest.raises(UsageError, match="training data"):
        compress_(tiny_mlp(), cfg)


def test_gradual_taylor() -> None:
    cfg = GradualPruneConfig(initial_sparsity=0.3, final_sparsity=0.8, steps=20, frequency=5, importance="taylor",
                             scope="global", finetune={"steps": 30, "lr": 0.02, "batch_size": 32})
    model = compress_(tiny_mlp(d_out=3), cfg, context=Context(task=Blobs()))
    ws = _weights(model)
    zeros = sum(int((w == 0).sum()) for w in ws.values())
    assert zeros / sum(w.numel() for w in ws.values()) >= 0.8
    assert len(model[0].weight._backward_hooks) == 1  # only keep-zeros; the Taylor hooks are gone


# ------------------------------------------------------------------------------ sparse storage


def test_sparse_encoding_is_bit_exact() -> None:
    t = torch.zeros(300)
    t[::7] = torch.randn(43)
    t[1] = -0.0  # a signed zero is a value, not a pruned weight
    state = {"w": t, "dense": torch.randn(100), "i8": (t * 50).to(torch.int8), "tiny": torch.zeros(3)}
    tensors, sparse = sparse_encode(state)
    assert set(sparse) == {"w", "i8"} and "w::sparse_mask" in tensors and "tiny" in tensors
    assert tensors["w::sparse_values"].numel() == 44
    out = sparse_decode(tensors, sparse, source=Path("x"))
    for k in state:
        assert out[k].dtype == state[k].dtype
        assert torch.equal(out[k].view(torch.uint8), state[k].view(torch.uint8))  # bits, so -0.0 counts


def test_tampered_sparse_manifest_is_refused() -> None:
    tensors, sparse = sparse_encode({"w": torch.zeros(100).index_fill_(0, torch.tensor([3]), 1.0)})
    for bad in ({"w": {"shape": [50], "dtype": "float32"}}, {"w": {"shape": [100], "dtype": "int8"}},
                {"w": {"shape": "100", "dtype": "float32"}}, {"w": {"shape": [100], "dtype": []}}, {}, [1]):
        with pytest.raises(InputRefused, match="x.safetensors"):
            sparse_decode(tensors, bad, source=Path("x.safetensors"))


def test_pruned_int8_artefact_is_sparse_too(tmp_path: Path) -> None:
    model = compress_(tiny_mlp(d_in=64, hidden=128), [MagnitudePruneConfig(sparsity=0.9), Int8Config(mode="weight")])
    assert isinstance(model[0], QuantLinear) and sparsity_of(model[0].weight_q) >= 0.9  # 0 quantizes to 0
    recipe = [MagnitudePruneConfig(sparsity=0.9), Int8Config(mode="weight")]
    manifest = save_artefact(model, tmp_path, recipe=recipe, source=None)
    assert "0.weight_q" in manifest["sparse"]
    dense = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense))
    assert (tmp_path / WEIGHTS).stat().st_size < 0.4 * dense.stat().st_size
    loaded = load_artefact(tmp_path, model=tiny_mlp(d_in=64, hidden=128))
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_sparse90_digits_mlp_acceptance(tmp_path: Path) -> None:
    """Issue 4: a 90%-sparse digits MLP: artefact <= 0.2x the dense fp32 file, drop <= 1 point."""
    task = get_task("lenet300")
    fp32 = task.model()
    recipe = load_recipe("sparse90")
    ctx = Context(task=task)
    model = compress_(copy.deepcopy(fp32), recipe, context=ctx)
    for w in (model.fc1.weight, model.fc2.weight, model.fc3.weight):
        assert sparsity_of(w) >= 0.9
    dense = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, str(dense))
    (tmp_path / "art").mkdir()
    save_artefact(model, tmp_path / "art", recipe=recipe, source={"kind": "builtin", "name": "lenet300"})
    ratio = (tmp_path / "art" / WEIGHTS).stat().st_size / dense.stat().st_size
    assert ratio <= 0.2, ratio
    base, acc = task.evaluate(fp32)["accuracy"], task.evaluate(model)["accuracy"]
    assert base - acc <= 1.0, (base, acc)
    loaded = load_artefact(tmp_path / "art")  # rebuilt from the built-in source
    assert task.evaluate(loaded)["accuracy"] == acc
    manifest = json.loads((tmp_path / "art" / MANIFEST).read_text())
    assert set(manifest["sparse"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
