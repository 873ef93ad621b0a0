"""Mixed precision: plans, their resolution and application, sensitivities, the knapsack allocator."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pared.recipe  # noqa: F401 - registers every technique (artefact replay)
from pared.apply import Context, compress_
from pared.config import config_from_dict, config_to_dict
from pared.errors import InputRefused, UsageError
from pared.quant import MixedPrecisionConfig, QuantEmbeddingNBits, QuantLinearNBits
from pared.quant.mixed import (
    allocate_plan,
    fixed_bytes,
    layer_bytes,
    layer_sensitivity,
    parse_precision,
    relative_error,
    resolve_plan,
)


class EmbedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 96)
        self.fc3 = nn.Linear(96, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(ids))))))


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(seed))


CALIB = [(_ids(i),) for i in range(6)]


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_precisions_parse_and_bad_ones_are_refused() -> None:
    assert parse_precision("fp32") is None
    assert parse_precision("int8") == (8, 32)
    assert parse_precision("int4", 128) == (4, 128)
    assert parse_precision("int4/g64") == (4, 64)
    for bad in ("int3", "int16", "int4/g48", "fp32/g32", "INT4", "int4/", "", "fp16"):
        with pytest.raises(UsageError, match="is not a precision"):
            parse_precision(bad)


def test_config_round_trips_and_validates() -> None:
    cfg = MixedPrecisionConfig(plan={"fc1": "int8", "*": "int4/g64"}, method="rtn")
    back = config_from_dict(config_to_dict(cfg))
    assert back == cfg and list(back.plan) == ["fc1", "*"]
    with pytest.raises(UsageError, match=r"plan\['fc1'\]: 'int3' is not a precision"):
        MixedPrecisionConfig(plan={"fc1": "int3"})
    with pytest.raises(UsageError, match="exactly one of plan or budget_bytes"):
        MixedPrecisionConfig()
    with pytest.raises(UsageError, match="exactly one of plan or budget_bytes"):
        MixedPrecisionConfig(plan={"*": "int4"}, budget_bytes=1000)
    with pytest.raises(UsageError, match="group_size"):
        MixedPrecisionConfig(plan={"*": "int4"}, group_size=48)
    with pytest.raises(UsageError, match="choices"):
        MixedPrecisionConfig(budget_bytes=1000, choices=("int4", "int2"))
    with pytest.raises(UsageError, match="plan"):
        config_from_dict({"technique": "mixed_precision", "plan": {"fc1": 4}})


def test_first_matching_rule_wins_and_unmatched_layers_stay_fp32() -> None:
    plan = resolve_plan(EmbedMLP(), {"fc2": "int8/g32", "fc*": "int4", "embed": "fp32"})
    assert plan == {"embed": None, "fc1": (4, 32), "fc2": (8, 32), "fc3": (4, 32)}
    assert resolve_plan(EmbedMLP(), {"fc1": "int4"})["fc3"] is None
    with pytest.raises(UsageError, match=r"matched no Linear or Embedding layer: \['fc9'\]"):
        resolve_plan(EmbedMLP(), {"fc9": "int4"})
    with pytest.raises(UsageError, match="group size 64 does not divide the 96 input channels of 'fc3'"):
        resolve_plan(EmbedMLP(), {"*": "int4/g64"})


def test_plan_applies_the_weight_only_modules_and_exports_to_onnx_runtime(tmp_path) -> None:
    from pared.artefact import load_artefact, save_artefact
    from pared.onnx_export import export_onnx
    from pared.runtime import OnnxRuntimeRunner

    cfg = MixedPrecisionConfig(plan={"embed": "int8", "fc2": "fp32", "fc1": "int8/g64", "*": "int4"})
    ctx = Context(calib=CALIB)
    q = compress_(EmbedMLP().eval(), cfg, context=ctx)
    assert isinstance(q.embed, QuantEmbeddingNBits) and q.embed.bits == 8
    assert isinstance(q.fc1, QuantLinearNBits) and (q.fc1.bits, q.fc1.group_size) == (8, 64)
    assert type(q.fc2) is nn.Linear
    assert isinstance(q.fc3, QuantLinearNBits) and (q.fc3.bits, q.fc3.group_size) == (4, 32)
    assert ctx.summary[-1]["layers"] == {"int8/g32": 1, "int8/g64": 1, "fp32": 1, "int4/g32": 1}
    ids = _ids(9)
    with torch.no_grad():
        path = export_onnx(q, (ids,), tmp_path / "m.onnx", input_names=["ids"])
        out = torch.as_tensor(OnnxRuntimeRunner(path, threads=1, input_names=["ids"])(ids))
        assert torch.allclose(out, q(ids), atol=1e-4)
        (tmp_path / "art").mkdir()
        save_artefact(q, tmp_path / "art", recipe=[cfg], source=None, structure=ctx.structure)
        assert torch.equal(load_artefact(tmp_path / "art", model=EmbedMLP().eval())(ids), q(ids))


def test_layer_bytes_are_the_real_buffer_bytes() -> None:
    model = EmbedMLP().eval()
    plan = {"embed": "int4/g64", "fc1": "int8/g64", "fc2": "int4/g32", "fc3": "fp32"}
    q = compress_(copy.deepcopy(model), MixedPrecisionConfig(plan=plan, method="rtn"))
    layers = dict(model.named_modules())
    predicted = fixed_bytes(model) + sum(layer_bytes(n, layers[n], p) for n, p in plan.items())
    assert predicted == _weight_bytes(q)
    # int4 with groups of 32: half a byte per weight plus a 2-byte (fp16) scale and half a byte of zero point per group.
    assert layer_bytes("fc2", layers["fc2"], "int4/g32") == 96 * 128 // 2 + 96 * 4 * 2 + 96 * 2


def test_sensitivity_orders_precisions_and_leaves_the_model_unchanged() -> None:
    model = EmbedMLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = layer_sensitivity(model, CALIB, ("int4/g32", "int8/g32", "int4/g64", "fp32"), method="gptq")
    assert set(sens) == {"embed", "fc1", "fc2", "fc3"}
    for name, errors in sens.items():
        assert errors["fp32"] == 0.0
        assert 0 < errors["int8/g32"] < errors["int4/g32"], name
    assert "int4/g64" not in sens["fc3"]  # 64 does not divide fc3's 96 inputs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert relative_error(torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])) == float("inf")


def _brute_force(sens, sizes, budget):  # type: ignore[no-untyped-def]
    names = list(sens)
    best = None
    for combo in itertools.product(*(list(sens[n]) for n in names)):
        size = sum(sizes[n][c] for n, c in zip(names, combo))
        err = sum(sens[n][c] for n, c in zip(names, combo))
        if size <= budget and (best is None or err < best - 1e-12):
            best = err
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30), st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=5),
       st.integers(10, 100))
def test_allocator_finds_the_least_error_plan_within_the_budget(layers, budget: int) -> None:
    # Two options per layer: small-and-lossy, or larger-and-exact (fp32-like).
    sens = {f"l{i}": {"int4": 0.5 + e1, "int8": e2 * 0.5, "fp32": 0.0} for i, (_, _, e1, e2) in enumerate(layers)}
    sizes = {f"l{i}": {"int4": s1, "int8": s1 + s2, "fp32": s1 + s2 + 7} for i, (s1, s2, _, _) in enumerate(layers)}
    smallest = sum(s["int4"] for s in sizes.values())
    if smallest > budget:
        with pytest.raises(UsageError, match="below the smallest plan"):
            allocate_plan(sens, sizes, budget, resolution=budget)
        return
    plan = allocate_plan(sens, sizes, budget, resolution=budget)  # one byte per step: exact
    assert list(plan) == list(sens)
    assert sum(sizes[n][p] for n, p in plan.items()) <= budget
    assert sum(sens[n][p] for n, p in plan.items()) == pytest.approx(_brute_force(sens, sizes, budget))


def test_allocator_beats_greedy_where_greedy_fails() -> None:
    # Greedy by error-per-byte upgrades "a" first and then cannot afford "b"; the optimum skips "a".
    sens = {"a": {"int4": 1.0, "int8": 0.0}, "b": {"int4": 5.0, "int8": 0.0}}
    sizes = {"a": {"int4": 10, "int8": 11}, "b": {"int4": 10, "int8": 20}}
    assert allocate_plan(sens, sizes, 30, resolution=30) == {"a": "int4", "b": "int8"}


def test_budget_mode_allocates_records_the_plan_and_reloads(tmp_path) -> None:
    from pared.artefact import load_artefact, save_artefact

    model = EmbedMLP().eval()
    int4_everywhere = compress_(copy.deepcopy(model), MixedPrecisionConfig(plan={"*": "int4"}, method="rtn"))
    budget = _weight_bytes(int4_everywhere) + 6000  # room for a few int8 layers, not for fp32 ones
    cfg = MixedPrecisionConfig(budget_bytes=budget, method="rtn", choices=("int4/g32", "int8/g32", "fp32"))
    ctx = Context(calib=CALIB)
    q = compress_(copy.deepcopy(model), cfg, context=ctx)
    plan = ctx.structure["0:mixed_precision"]["plan"]
    assert set(plan) == {"embed", "fc1", "fc2", "fc3"} and "int8/g32" in plan.values()
    assert _weight_bytes(q) <= budget
    ids = _ids(3)
    with torch.no_grad():
        fp, mixed, int4 = model(ids), q(ids), int4_everywhere(ids)
        assert relative_error(fp, mixed) < relative_error(fp, int4)
        save_artefact(q, tmp_path, recipe=[cfg], source=None, structure=ctx.structure)
        assert torch.equal(load_artefact(tmp_path, model=EmbedMLP().eval())(ids), mixed)
    with pytest.raises(UsageError, match="below what the model's other tensors take"):
        compress_(copy.deepcopy(model), MixedPrecisionConfig(budget_bytes=100), calib=CALIB)
    with pytest.raises(UsageError, match="calibration data"):
        compress_(copy.deepcopy(model), MixedPrecisionConfig(budget_bytes=budget))


def test_bad_models_and_artefacts_are_refused() -> None:
    with pytest.raises(UsageError, match="keeps every layer in fp32"):
        compress_(EmbedMLP(), MixedPrecisionConfig(plan={"*": "fp32"}))
    bad = EmbedMLP()
    with torch.no_grad():
        bad.fc2.weight[0, 0] = float("inf")
    with pytest.raises(InputRefused, match="'fc2'"):
        compress_(bad, MixedPrecisionConfig(plan={"*": "int4"}, method="rtn"))
    with pytest.raises(InputRefused, match="cannot rebuild"):
        compress_(EmbedMLP(), MixedPrecisionConfig(budget_bytes=10**6), context=Context(skeleton=True, structure={}))


def test_builtin_int4_mixed_recipe_on_a_small_bert_encoder() -> None:
    transformers = pytest.importorskip("transformers")
    from pared.recipe import load_recipe
    from pared.tasks.minilm import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)
    model = SentenceEncoder(transformers.BertModel(config)).eval()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    calib = [(ids, torch.ones_like(ids))]
    q = compress_(copy.deepcopy(model), load_recipe("int4-mixed"), calib=calib)
    emb, layer = q.bert.embeddings, q.bert.encoder.layer[0]
    assert type(emb.token_type_embeddings) is nn.Embedding
    assert isinstance(emb.position_embeddings, QuantEmbeddingNBits) and emb.position_embeddings.bits == 8
    assert isinstance(emb.word_embeddings, QuantEmbeddingNBits) and emb.word_embeddings.bits == 4
    assert isinstance(layer.attention.self.query, QuantLinearNBits) and layer.attention.self.query.bits == 4
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(*calib[0]), q(*calib[0])).min()
    assert cos > 0.9
