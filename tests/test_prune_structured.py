"""Structured pruning: channel groups, heads and FFN neurons, N:M masks, sensitivity.

Every architecture is pruned, run, shape-checked, counted, exported to ONNX and reloaded from
the saved state_dict + JSON in a fresh process. Bad inputs must fail loudly, naming the layer.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import pared
from pared.apply import Context
from pared.artefact import save_artefact
from pared.config import config_from_dict, config_to_dict
from pared.errors import UsageError
from pared.measure import count_params
from pared.onnx_export import export_onnx
from pared.prune.graph import OUTPUT_REASON, build_dependency_graph
from pared.prune.heads import PrunedMultiheadAttention, TransformerPruneConfig, prune_mha
from pared.prune.nm import SemiStructuredConfig, follows_nm, nm_mask
from pared.prune.sensitivity import allocate_ratios, save_sensitivity, sensitivity
from pared.prune.structured import ChannelPruneConfig, apply_layers, global_keep_counts, kept_count
from pared.runtime import make_runner
from pared.testing import resnet as R

FACTORY = "pared.testing.resnet:"


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _bert_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # a padded sentence
    return ids, mask


def _prune(model: nn.Module, recipe: list, inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, Context]:
    ctx = Context(calib=[inputs])
    return pared.compress_(model, recipe, context=ctx), ctx


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("cfg", [
    ChannelPruneConfig(ratio=0.3, scope="global", per_layer={"fc1": 0.5}, round_to=8, exclude=("x",)),
    TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.25, importance="fluctuation", reconstruct=True, scope="global"),
    SemiStructuredConfig(n=1, m=4),
])
def test_configs_round_trip(cfg) -> None:
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(data) == cfg


@pytest.mark.parametrize("make", [
    lambda: ChannelPruneConfig(ratio=-0.1),
    lambda: ChannelPruneConfig(ratio=1.0),
    lambda: ChannelPruneConfig(per_layer={"fc1": 1.5}),
    lambda: ChannelPruneConfig(round_to=0),
    lambda: TransformerPruneConfig(head_ratio=1.0),
    lambda: TransformerPruneConfig(ffn_ratio=-0.1),
    lambda: SemiStructuredConfig(n=4, m=4),
])
def test_out_of_range_ratios_are_usage_errors(make) -> None:
    with pytest.raises(UsageError, match="must be|need"):
        make()


# -------------------------------------------------------------------------- channel pruning


def _conv_bn_expected_params() -> int:
    # conv1 3->8 (no bias) + bn 8, conv2 8->8 (+bias) + bn 8, fc1 8*16 -> 16, fc2 16 -> 10
    return 3 * 8 * 9 + 2 * 8 + 8 * 8 * 9 + 8 + 2 * 8 + 128 * 16 + 16 + 16 * 10 + 10


CASES = {
    # name: (factory, input shape, expected params after ratio 0.5)
    "mlp": ("tiny_mlp3", (4, 16), 16 * 16 + 16 + 16 * 16 + 16 + 16 * 8 + 8),
    "conv_bn": ("tiny_conv_bn", (4, 3, 8, 8), _conv_bn_expected_params()),
    # all channels halved == the same layout at half width, with stem input and fc output intact
    "resnet": ("tiny_resnet", (2, 3, 32, 32), count_params(R.resnet18_layout(4, 10))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_channel_pruning_runs_shrinks_and_matches_expected_params(case: str) -> None:
    factory, shape, expected = CASES[case]
    model = getattr(R, factory)()
    x = _x(shape)
    ref = model(x)
    pruned, ctx = _prune(copy.deepcopy(model), [ChannelPruneConfig(ratio=0.5)], (x,))
    out = pruned(x)
    assert out.shape == ref.shape
    assert count_params(pruned) == expected
    summary = ctx.summary[-1]
    assert summary["realized"]["params"] == pytest.approx(expected / count_params(model))
    assert summary["theoretical"]["params"] == pytest.approx(0.25)
    assert summary["skipped"] and OUTPUT_REASON in summary["skipped"][0]["reason"]  # final layer whole
    if case == "resnet":  # exactly the width-4 network's shapes, layer by layer
        want = {k: v.shape for k, v in R.resnet18_layout(4, 10).state_dict().items()}
        assert {k: v.shape for k, v in pruned.state_dict().items()} == want


@pytest.mark.parametrize("case", list(CASES))
def test_ratio_zero_is_identity(case: str) -> None:
    factory, shape, _ = CASES[case]
    model = getattr(R, factory)()
    x = _x(shape)
    pruned, _ = _prune(copy.deepcopy(model), [ChannelPruneConfig(ratio=0.0)], (x,))
    assert count_params(pruned) == count_params(model)
    assert torch.equal(pruned(x), model(x))


def test_residual_adds_couple_producers_into_one_group() -> None:
    graph = build_dependency_graph(R.tiny_resnet(), (_x((1, 3, 32, 32)),))
    stem = next(g for g in graph.groups if "conv1" in g.producers)
    assert set(stem.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert {"bn1", "layer1.0.bn2", "layer1.1.bn2"} <= set(stem.passengers)
    assert "layer2.0.downsample.0" in stem.consumers
    stage4 = next(g for g in graph.groups if "layer4.0.downsample.0" in g.producers)
    assert "fc" in stage4.consumers and stage4.prunable
    assert not next(g for g in graph.groups if g.producers == ["fc"]).prunable


def test_flatten_maps_a_channel_to_a_block_of_features() -> None:
    model = R.tiny_conv_bn()
    x = _x((2, 3, 8, 8))
    pruned, ctx = _prune(copy.deepcopy(model), [ChannelPruneConfig(ratio=0.5, include=("conv2",))], (x,))
    kept = ctx.structure["0:prune_channels"]["layers"]["conv2"]["out"]
    assert pruned.fc1.in_features == 8 * 16
    cols = [c * 16 + r for c in kept for r in range(16)]
    assert torch.equal(pruned.fc1.weight, model.fc1.weight[:, cols])


def test_global_scope_removes_the_ratio_of_all_channels() -> None:
    model = R.tiny_resnet()
    x = _x((2, 3, 32, 32))
    _, ctx = _prune(copy.deepcopy(model), [ChannelPruneConfig(ratio=0.5, scope="global")], (x,))
    groups = ctx.summary[-1]["groups"]
    before = sum(g["channels_before"] for g in groups)
    after = sum(g["channels_after"] for g in groups)
    assert after == pytest.approx(before / 2, abs=len(groups))
    assert len({g["channels_after"] / g["channels_before"] for g in groups}) > 1  # non-uniform


def test_pure_selection_helpers() -> None:
    assert kept_count(32, 0.5) == 16 and kept_count(10, 0.5, round_to=8) == 8 and kept_count(3, 0.9) == 1
    counts = global_keep_counts({0: torch.tensor([1.0, 1.0, 1.0, 1.0]), 1: torch.tensor([0.1, 10.0, 0.1, 10.0])}, 0.25)
    assert counts == {0: 4, 1: 2}


def test_taylor_importance_uses_the_task_gradients(digits_fp32: nn.Module) -> None:
    from pared.tasks import get_task

    task = get_task("digits")
    ctx = Context(calib=task.calibration(), task=task)
    pruned = pared.compress_(copy.deepcopy(digits_fp32), ChannelPruneConfig(ratio=0.25, importance="taylor"), context=ctx)
    assert pruned(task.example_inputs(4)[0]).shape == (4, 10)
    assert ctx.summary[-1]["importance"] == "taylor"
    with pytest.raises(UsageError, match="TrainableTask"):
        pared.compress_(copy.deepcopy(digits_fp32), ChannelPruneConfig(importance="taylor"), calib=task.calibration())


# --------------------------------------------------------------------------- bad inputs


class _ChannelScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c, 1, 1) * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight  # a per-channel parameter pared does not know how to slice


class _WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.scale, self.conv2 = nn.Conv2d(3, 8, 3), _ChannelScale(8), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.scale(self.conv1(x)))


class _FixedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(-1, 128))  # 128 is hard-coded: breaks if channels go


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


@pytest.mark.parametrize(("model", "shape", "named"), [
    (_WithCustom(), (1, 3, 8, 8), "module 'scale'"),
    (_FixedView(), (1, 3, 4, 4), "view"),
    (_Grouped(), (1, 3, 6, 6), "grouped convolution"),
])
def test_unsupported_coupling_is_an_error_naming_it(model: nn.Module, shape, named: str) -> None:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match=named) as info:
        _prune(model, [ChannelPruneConfig(ratio=0.5)], (_x(shape),))
    assert "on_unsupported='skip'" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_unsupported_groups_can_be_skipped_and_are_listed() -> None:
    model = _WithCustom()
    x = _x((1, 3, 8, 8))
    pruned, ctx = _prune(model, [ChannelPruneConfig(ratio=0.5, on_unsupported="skip")], (x,))
    assert pruned.conv1.out_channels == 8
    assert "module 'scale'" in ctx.summary[-1]["skipped"][0]["reason"]


def test_naming_the_output_layer_or_an_unknown_rule_is_refused() -> None:
    x = _x((2, 16))
    with pytest.raises(UsageError, match="'fc3'.*model output"):
        _prune(R.tiny_mlp3(), [ChannelPruneConfig(include=("fc3",))], (x,))
    with pytest.raises(UsageError, match="matched no"):
        _prune(R.tiny_mlp3(), [ChannelPruneConfig(include=("nope",))], (x,))


def test_a_plan_that_breaks_the_model_is_rolled_back() -> None:
    model = R.tiny_mlp3()
    x = _x((2, 16))
    ref = model(x)
    with pytest.raises(UsageError, match="left unchanged"):  # fc1 shrinks but fc2 still reads 32
        apply_layers(model, {"fc1": {"out": list(range(8)), "in": None}}, check_inputs=(x,))
    assert torch.equal(model(x), ref) and model.fc1.out_features == 32


def test_untraceable_model_is_a_usage_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UsageError, match="torch.fx"):
        _prune(Branchy(), [ChannelPruneConfig()], (_x((1, 4)),))


# --------------------------------------------------------------------------- transformers


def test_bert_heads_and_ffn_neurons_are_removed() -> None:
    pytest.importorskip("transformers")
    model = R.tiny_bert_encoder()
    inputs = _bert_inputs()
    ref = model(*inputs)
    pruned, ctx = _prune(copy.deepcopy(model), [TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.5)], inputs)
    out = pruned(*inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    for layer in pruned.bert.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2 and att.all_head_size == 16 and att.query.out_features == 16
        assert layer.attention.output.dense.in_features == 16
        assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    # per layer: q/k/v/o lose 2 heads x 8 dims x 32 (+ q/k/v biases), FFN 32 neurons x 32 x 2 (+ bias)
    removed = 2 * ((4 * 16 * 32 + 3 * 16) + (2 * 32 * 32 + 32))
    assert count_params(model) - count_params(pruned) == removed
    assert {e["kind"] for e in ctx.summary[-1]["layers"]} == {"bert_attention", "ffn"}
    same, _ = _prune(copy.deepcopy(model), [TransformerPruneConfig(head_ratio=0.0, ffn_ratio=0.0)], inputs)
    assert torch.equal(same(*inputs), ref)


def test_fluctuation_importance_with_reconstruction_beats_magnitude() -> None:
    pytest.importorskip("transformers")
    model = R.tiny_bert_encoder()
    with torch.no_grad():  # give the FFN a few dominant, nearly constant neurons to find
        for layer in model.bert.encoder.layer:
            layer.output.dense.weight.mul_(torch.linspace(0.1, 3.0, 64))
    inputs = _bert_inputs()
    ref = model(*inputs)
    cos = {}
    for imp, rec in (("magnitude", False), ("fluctuation", False), ("fluctuation", True)):
        cfg = TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.5, importance=imp, reconstruct=rec)
        pruned, _ = _prune(copy.deepcopy(model), [cfg], inputs)
        with torch.no_grad():
            cos[(imp, rec)] = float(torch.nn.functional.cosine_similarity(pruned(*inputs), ref).mean())
    assert cos[("fluctuation", True)] >= cos[("fluctuation", False)] - 1e-6
    assert cos[("fluctuation", True)] > 0.99


def test_global_head_scope_keeps_the_total_and_varies_per_layer() -> None:
    pytest.importorskip("transformers")
    model = R.tiny_bert_encoder()
    with torch.no_grad():  # make layer 1's heads matter far more than layer 0's
        model.bert.encoder.layer[1].attention.output.dense.weight.mul_(10.0)
    inputs = _bert_inputs()
    cfg = TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.0, importance="fluctuation", scope="global")
    pruned, _ = _prune(copy.deepcopy(model), [cfg], inputs)
    heads = [layer.attention.self.num_attention_heads for layer in pruned.bert.encoder.layer]
    assert heads == [1, 4]  # all of layer 0 ranks lowest, but every layer keeps at least one head
    with pytest.raises(UsageError, match="reconstruct needs importance='fluctuation'"):
        TransformerPruneConfig(reconstruct=True)


def test_pruned_mha_equals_nn_mha_when_all_heads_are_kept() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    same = prune_mha(mha, [0, 1, 2, 3])
    x = _x((2, 5, 32))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal}, {"need_weights": False, "attn_mask": causal}):
        a, wa = mha(x, x, x, **kwargs)
        b, wb = same(x, x, x, **kwargs)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if wa is not None:
            torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5)


def test_mha_heads_are_removed_and_odd_variants_refused() -> None:
    model = R.tiny_mha_model()
    x = _x((2, 5, 32))
    pruned, _ = _prune(copy.deepcopy(model), [TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.0)], (x,))
    assert isinstance(pruned.attn, PrunedMultiheadAttention) and pruned.attn.num_heads == 2
    assert pruned.attn.in_proj_weight.shape == (3 * 16, 32) and pruned.attn.out_proj.in_features == 16
    assert count_params(model) - count_params(pruned) == 4 * 16 * 32 + 3 * 16
    assert pruned(x).shape == x.shape
    odd = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(UsageError, match="add_bias_kv.*'0'"):
        pared.compress_(odd, TransformerPruneConfig(head_ratio=0.5))


# ------------------------------------------------------------------------------------ N:M


def test_nm_mask_keeps_n_of_every_m() -> None:
    scores = _x((6, 16)).abs()
    mask = nm_mask(scores, 2, 4)
    assert (mask.reshape(-1, 4).sum(dim=1) == 2).all()
    kept = scores.reshape(-1, 4).masked_select(mask.reshape(-1, 4)).reshape(-1, 2)
    dropped = scores.reshape(-1, 4).masked_select(~mask.reshape(-1, 4)).reshape(-1, 2)
    assert (kept.min(dim=1).values >= dropped.max(dim=1).values).all()


def test_two_four_pattern_holds_in_every_group_of_every_linear() -> None:
    pytest.importorskip("transformers")
    model = R.tiny_bert_encoder()
    inputs = _bert_inputs()
    pruned, ctx = _prune(copy.deepcopy(model), [SemiStructuredConfig()], inputs)
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12
    for lin in linears:
        groups = lin.weight.reshape(-1, 4)
        assert ((groups != 0).sum(dim=1) <= 2).all() and follows_nm(lin.weight, 2, 4)
    assert ctx.summary[-1]["zero_fraction"] == pytest.approx(0.5)
    assert "no speed-up" in ctx.summary[-1]["speedup_note"]


def test_nm_refuses_widths_that_are_not_a_multiple_of_m() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(UsageError, match=r"'?0 \(in_features=6\)"):
        pared.compress_(model, SemiStructuredConfig())


# ------------------------------------------------------------------- save, reload, export


ARTEFACTS = {
    # name: (factory, recipe, inputs)
    "mlp": ("tiny_mlp3", [ChannelPruneConfig(ratio=0.5), SemiStructuredConfig()], lambda: (_x((4, 16)),)),
    "conv_bn": ("tiny_conv_bn", [ChannelPruneConfig(ratio=0.5, scope="global")], lambda: (_x((4, 3, 8, 8)),)),
    "resnet": ("tiny_resnet", [ChannelPruneConfig(ratio=0.5)], lambda: (_x((2, 3, 32, 32)),)),
    "bert": ("tiny_bert_encoder", [TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.5)], _bert_inputs),
    "mha": ("tiny_mha_model", [TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.0),
                               ChannelPruneConfig(ratio=0.5, include=("ffn.0",))], lambda: (_x((2, 5, 32)),)),
}

_RELOAD = textwrap.dedent("""
    import json, sys, torch
    import pared.prune.heads, pared.prune.nm, pared.prune.structured  # register the techniques
    from pared.artefact import load_artefact
    from safetensors.torch import load_file
    results = {}
    for directory in sys.argv[1:]:
        model = load_artefact(directory)
        data = load_file(directory + "/expected.safetensors")
        inputs = [data[k] for k in sorted(k for k in data if k.startswith("input"))]
        with torch.no_grad():
            out = model(*inputs)
        results[directory] = {"max_diff": float((out - data["output"]).abs().max()),
                              "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path, tuple]]:
    from safetensors.torch import save_file

    if "bert" in ARTEFACTS:
        pytest.importorskip("transformers")
    out = {}
    for name, (factory, recipe, make_inputs) in ARTEFACTS.items():
        inputs = make_inputs()
        model, ctx = _prune(getattr(R, factory)(), recipe, inputs)
        directory = tmp_path_factory.mktemp(name)
        save_artefact(model, directory, recipe=recipe, source={"kind": "factory", "spec": FACTORY + factory},
                      structure=ctx.structure)
        with torch.no_grad():
            expected = {f"input{i}": t for i, t in enumerate(inputs)} | {"output": model(*inputs)}
        save_file(expected, str(directory / "expected.safetensors"))
        out[name] = (model, directory, inputs)
    return out


def test_every_pruned_model_reloads_in_a_fresh_process(saved) -> None:
    dirs = [str(d) for _, d, _ in saved.values()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(pared.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _RELOAD, *dirs], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (model, directory, _) in saved.items():
        got = results[str(directory)]
        assert got["max_diff"] == 0.0, name
        assert got["shapes"] == {k: list(v.shape) for k, v in model.state_dict().items()}, name
    manifest = json.loads((saved["resnet"][1] / "pared.json").read_text())
    layers = manifest["structure"]["0:prune_channels"]["layers"]
    assert layers["conv1"]["out"] and len(layers["conv1"]["out"]) == 4  # JSON, no pickle


@pytest.mark.parametrize("name", ["resnet", "bert", "mha"])
def test_pruned_models_export_to_onnx(saved, name: str, tmp_path: Path) -> None:
    model, _, inputs = saved[name]
    names = [f"in{i}" for i in range(len(inputs))]
    path = export_onnx(model, inputs, tmp_path / "m.onnx", input_names=names, dynamic_axes={n: {0: "b"} for n in names})
    run = make_runner("onnxruntime", onnx_path=path, threads=1, input_names=names)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(run(*inputs)), model(*inputs), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------- recovery and sensitivity


def test_digits_half_channels_with_finetune_loses_at_most_one_point(digits_fp32: nn.Module) -> None:
    from pared.tasks import get_task
    from pared.train import FinetuneConfig

    task = get_task("digits")
    base = task.evaluate(digits_fp32)["accuracy"]
    ctx = Context(calib=task.calibration(), task=task)
    recipe = [ChannelPruneConfig(ratio=0.5), FinetuneConfig(epochs=6, lr=2e-3, batch_size=64)]
    pruned = pared.compress_(copy.deepcopy(digits_fp32), recipe, context=ctx)
    after = task.evaluate(pruned)["accuracy"]
    assert ctx.summary[0]["realized"]["params"] < 0.3
    assert base - after <= 1.0, (base, after)


class _MLPTask:
    """A regression task on tiny_mlp3: the metric is minus the MSE to the unpruned outputs."""

    primary_metric = "neg_mse"

    def __init__(self) -> None:
        self.x = _x((64, 16), seed=3)
        self.ref = R.tiny_mlp3()(self.x).detach()

    def calibration(self) -> list[tuple[torch.Tensor]]:
        return [(self.x[:8],)]

    def evaluate(self, run) -> dict[str, float]:
        with torch.no_grad():
            return {"neg_mse": -float(((run(self.x) - self.ref) ** 2).mean())}


def test_sensitivity_measures_every_group_and_allocates_the_target(tmp_path: Path) -> None:
    task = _MLPTask()
    result = sensitivity(R.tiny_mlp3, task, ratios=(0.25, 0.5, 0.75))
    assert set(result["layers"]) == {"fc1", "fc2"} and result["baseline"] == 0.0
    for entry in result["layers"].values():
        assert set(entry["drops"]) == {"0.25", "0.5", "0.75"} and entry["channels"] == 32
        assert entry["drops"]["0.75"] >= entry["drops"]["0.25"] >= 0
    paths = save_sensitivity(result, tmp_path)
    assert json.loads(Path(paths["json"]).read_text()) == result
    assert paths["plot"] is not None or "matplotlib" in paths["note"]
    per_layer = allocate_ratios(result, 0.5)
    assert sum(per_layer.values()) / 2 == pytest.approx(0.5, abs=1e-3)
    pruned, _ = _prune(R.tiny_mlp3(), [ChannelPruneConfig(ratio=0.0, per_layer=per_layer)], (task.x[:8],))
    assert pruned.fc1.out_features + pruned.fc2.out_features == pytest.approx(32, abs=2)


def test_allocate_ratios_prunes_the_insensitive_group_more() -> None:
    result = {"ratios": [0.25, 0.5, 0.75], "layers": {
        "a": {"channels": 100, "drops": {"0.25": 0.0, "0.5": 0.1, "0.75": 0.3}},
        "b": {"channels": 100, "drops": {"0.25": 1.0, "0.5": 5.0, "0.75": 9.0}},
    }}
    alloc = allocate_ratios(result, 0.5)
    assert alloc["a"] > 0.5 > alloc["b"]
    assert (alloc["a"] + alloc["b"]) / 2 == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(UsageError, match="above"):
        allocate_ratios(result, 0.9)
