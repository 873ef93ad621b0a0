"""Activation swap: selection by type and name, replacements, HF BERT, bad input, reload, export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pared
from pared.activation_swap import REPLACEMENTS, ActivationSwapConfig, QuickGELU
from pared.apply import Context
from pared.artefact import load_artefact, save_artefact
from pared.config import config_from_dict, config_to_dict
from pared.errors import UsageError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 8), nn.Tanh()
    ).eval()


def test_swaps_by_type_and_computes_the_replacement() -> None:
    model = _mlp()
    expected = copy.deepcopy(model)
    expected[1], expected[3] = nn.ReLU(), nn.Hardswish()
    ctx = Context()
    out = pared.compress_(
        model,
        ActivationSwapConfig(mapping={"type:GELU": "relu", "type:SiLU": "hardswish"}),
        context=ctx,
    )
    assert (
        isinstance(out[1], nn.ReLU)
        and isinstance(out[3], nn.Hardswish)
        and isinstance(out[5], nn.Tanh)
    )
    x = torch.randn(4, 8)
    torch.testing.assert_close(out(x), expected(x))
    assert ctx.summary[-1] == {
        "technique": "activation_swap",
        "swapped": 2,
        "by_kind": {"GELU -> relu": 1, "SiLU -> hardswish": 1},
    }


def test_first_rule_wins_and_exclude_keeps() -> None:
    model = _mlp()
    cfg = ActivationSwapConfig(
        mapping={"1": "gelu_tanh", "type:GELU": "relu", "re:[35]": "hardtanh"}, exclude=("5",)
    )
    out = pared.compress_(model, cfg)
    assert isinstance(out[1], nn.GELU) and out[1].approximate == "tanh"
    assert isinstance(out[3], nn.Hardtanh) and isinstance(out[5], nn.Tanh)


@pytest.mark.parametrize("name", sorted(REPLACEMENTS))
def test_every_replacement_is_a_fresh_parameter_free_module(name: str) -> None:
    a, b = REPLACEMENTS[name](), REPLACEMENTS[name]()
    assert a is not b and not list(a.parameters())
    assert a(torch.linspace(-4, 4, 9)).shape == (9,)


def test_approximations_stay_close_to_gelu() -> None:
    x = torch.linspace(-6, 6, 1001)
    exact = nn.GELU()(x)
    assert float((nn.GELU(approximate="tanh")(x) - exact).abs().max()) < 1e-3
    assert float((QuickGELU()(x) - exact).abs().max()) < 0.03


def test_hf_bert_gelu_activation_is_swapped() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    bert = BertModel(cfg).eval()
    ctx = Context()
    out = pared.compress_(
        bert, ActivationSwapConfig(mapping={"type:GELUActivation": "quick_gelu"}), context=ctx
    )
    assert ctx.summary[-1]["swapped"] == 2
    assert all(
        isinstance(layer.intermediate.intermediate_act_fn, QuickGELU) for layer in out.encoder.layer
    )
    ids = torch.randint(0, 50, (2, 7))
    assert torch.isfinite(out(input_ids=ids).last_hidden_state).all()


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({}, "at least one"),
        ({"type:GELU": "fast"}, "unknown replacement"),
    ],
)
def test_bad_configs_are_refused(mapping: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        config_from_dict({"technique": "activation_swap", "mapping": mapping})


def test_a_rule_matching_no_activation_is_refused() -> None:
    model = _mlp()
    with pytest.raises(UsageError, match="matched no eligible layer"):
        pared.compress_(
            model, ActivationSwapConfig(mapping={"type:Linear": "relu"})
        )  # not an activation
    with pytest.raises(UsageError, match="matched no eligible layer"):
        pared.compress_(model, ActivationSwapConfig(mapping={"encoder.act": "relu"}))
    assert isinstance(model[1], nn.GELU)  # nothing half-done


def test_config_round_trip_reload_and_export(tmp_path) -> None:
    import onnxruntime as ort

    from pared.onnx_export import export_onnx

    cfg = ActivationSwapConfig(mapping={"type:GELU": "quick_gelu", "type:SiLU": "hardswish"})
    assert config_from_dict(config_to_dict(cfg)) == cfg
    out = pared.compress_(_mlp(), cfg)
    save_artefact(out, tmp_path, recipe=[cfg], source=None)
    back = load_artefact(tmp_path, model=_mlp())
    x = torch.randn(5, 8)
    assert isinstance(back[1], QuickGELU) and torch.equal(back(x), out(x))
    path = export_onnx(
        out, (x,), tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "batch"}}
    )
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    np.testing.assert_allclose(got, out(x).detach().numpy(), atol=1e-5, rtol=1e-5)
