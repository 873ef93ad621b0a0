"""Int8 attention matmuls, shared SmoothQuant scales for projections that read one tensor, and the
ONNX pass that merges the duplicate nodes those leave behind."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pared.apply import Context, compress_
from pared.artefact import load_artefact, save_artefact
from pared.errors import InputRefused, UsageError
from pared.onnx_export import export_onnx, merge_duplicate_nodes
from pared.quant import Int8Config, SmoothQuantConfig
from pared.quant.attention import AttentionQuant
from pared.runtime import OnnxRuntimeRunner

pytest.importorskip("transformers")
from pared.testing.bert import tiny_bert, token_batch  # noqa: E402

NAMES = ["input_ids", "attention_mask"]
AXES = {n: {0: "batch", 1: "seq"} for n in NAMES}


def _calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [token_batch(8, seed=s) for s in range(4)]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# ---------------------------------------------------------------- shared smoothing scales


def test_query_key_value_share_one_smoothing_scale() -> None:
    ref = tiny_bert(2)
    ctx = Context()
    smoothed = compress_(copy.deepcopy(ref), SmoothQuantConfig(alpha=0.8), calib=_calib(), context=ctx)
    groups = ctx.summary[-1]["shared_input_groups"]
    assert [g[0].split(".")[-1] for g in groups] == ["query", "query"] and all(len(g) == 3 for g in groups)
    block = smoothed.bert.encoder.layer[0].attention.self
    scales = [getattr(block, n)[0].scale for n in ("query", "key", "value")]
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])
    assert not torch.equal(scales[0], smoothed.bert.encoder.layer[0].intermediate.dense[0].scale[:32])
    ids, mask = token_batch(8, seed=20)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids, mask), ref(ids, mask), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- duplicate-node merge


def _graph_with_duplicates() -> onnx.ModelProto:
    s1 = numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "s1")
    s2 = numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "s2")  # same content, other name
    s3 = numpy_helper.from_array(np.array([2.0, 4.0], np.float32), "s3")
    nodes = [
        helper.make_node("Mul", ["x", "s1"], ["a"]),
        helper.make_node("Mul", ["x", "s2"], ["b"]),  # duplicate of a
        helper.make_node("Mul", ["x", "s3"], ["c"]),  # different constant: kept
        helper.make_node("Identity", ["b"], ["b2"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Relu", ["b2"], ["rb"]),  # duplicate of ra once b2 -> b -> a
        helper.make_node("Sum", ["ra", "rb", "c"], ["y"]),
        helper.make_node("Relu", ["a"], ["z"]),  # a graph output: never merged away
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("y", "z")]
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=[s1, s2, s3])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_merge_duplicate_nodes_keeps_the_result() -> None:
    import onnxruntime as ort

    model = _graph_with_duplicates()
    feed = {"x": np.array([1.5, -2.0], np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    merged = merge_duplicate_nodes(model.graph)
    assert merged == 3  # Mul b, the Identity, Relu rb
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Mul") == 2 and ops.count("Relu") == 2 and "Identity" not in ops
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b)


def test_qkv_input_is_quantized_once_in_the_export(tmp_path) -> None:
    q = compress_(tiny_bert(2), [SmoothQuantConfig(alpha=0.8), Int8Config()], calib=_calib())
    path = export_onnx(q, token_batch(2, seed=1), tmp_path / "m.onnx", input_names=NAMES, dynamic_axes=AXES)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # per layer: one QuantizeLinear for Q/K/V, one each for the output projection and the two
    # FFN projections -> 4 per layer; the six projections per layer would be 6 without the merge.
    assert ops.count("QuantizeLinear") == 2 * 4


# ---------------------------------------------------------------- int8 attention


def test_int8_attention_quantizes_the_attention_matmuls(tmp_path) -> None:
    ref = tiny_bert(2)
    ctx = Context()
    q = compress_(copy.deepcopy(ref), [SmoothQuantConfig(alpha=0.8), Int8Config(attention=True)], calib=_calib(), context=ctx)
    assert ctx.summary[-1]["attention_quantized"] == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    quants = [m for m in q.modules() if isinstance(m, AttentionQuant)]
    assert len(quants) == 2 and all(m.records is None for m in quants)
    assert all(0 < float(m.probs_scale) <= 1 / 255 + 1e-7 for m in quants)  # probabilities never exceed 1
    ids, mask = token_batch(8, seed=20)  # padded: the mask path must survive
    with torch.no_grad():
        out, want = q(ids, mask), ref(ids, mask)
    assert _cos(out, want) > 0.98
    # The attention inputs really are on the int8 grid: the eager model differs from one
    # without attention quantizers.
    plain = compress_(copy.deepcopy(ref), [SmoothQuantConfig(alpha=0.8), Int8Config()], calib=_calib())
    with torch.no_grad():
        assert not torch.allclose(plain(ids, mask), out)
    # Exported on an unpadded batch (all-ones mask, as MiniLM's example inputs), run on padded ones.
    example_ids = token_batch(2, seed=1)[0]
    path = export_onnx(q, (example_ids, torch.ones_like(example_ids)), tmp_path / "a.onnx",
                       input_names=NAMES, dynamic_axes=AXES)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 2 * (4 + 4)  # + query, key, value, probabilities
    run = OnnxRuntimeRunner(path, threads=1, input_names=NAMES)
    assert _cos(run(ids, mask), out) > 0.999


def test_attention_calibration_estimator_is_used() -> None:
    def scales(method: str) -> torch.Tensor:
        q = compress_(tiny_bert(1), Int8Config(attention=True, attention_calibration=method), calib=_calib())
        m = next(m for m in q.modules() if isinstance(m, AttentionQuant))
        return torch.stack([m.query_scale, m.key_scale, m.value_scale, m.probs_scale])

    minmax, mse = scales("minmax"), scales("mse")
    assert not torch.equal(minmax, mse) and bool((mse <= minmax + 1e-9).all())


def test_int8_attention_artefact_reloads(tmp_path) -> None:
    ctx = Context()
    recipe = [SmoothQuantConfig(alpha=0.8), Int8Config(attention=True)]
    q = compress_(tiny_bert(2), recipe, calib=_calib(), context=ctx)
    save_artefact(q, tmp_path, recipe=recipe, source=None, structure=ctx.structure)
    loaded = load_artefact(tmp_path, model=tiny_bert(2))
    ids, mask = token_batch(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), q(ids, mask))
    quants = [m for m in loaded.modules() if isinstance(m, AttentionQuant)]
    assert len(quants) == 2 and float(quants[0].query_scale) != 1.0


def test_int8_attention_refusals(tmp_path) -> None:
    with pytest.raises(UsageError, match="attention needs mode 'static'"):
        Int8Config(mode="dynamic", attention=True)
    with pytest.raises(UsageError, match="attention_calibration: expected one of"):
        Int8Config(attention=True, attention_calibration="auto")  # auto needs a layer to score
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(UsageError, match="no Hugging Face attention"):
        compress_(mlp, Int8Config(attention=True), calib=[(torch.randn(2, 4),)])
    ctx = Context()
    recipe = [Int8Config(attention=True)]
    q = compress_(tiny_bert(1), recipe, calib=_calib(), context=ctx)
    key = next(iter(ctx.structure))
    ctx.structure[key]["attention"] = ["bert.encoder.layer.7.attention.self"]  # not in the model
    save_artefact(q, tmp_path, recipe=recipe, source=None, structure=ctx.structure)
    with pytest.raises(InputRefused, match="'attention' list"):
        load_artefact(tmp_path, model=tiny_bert(1))


def test_int8_attention_on_a_causal_decoder_with_grouped_kv_heads() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = transformers.LlamaForCausalLM(config)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=ids).logits

    ref = Logits().eval()
    ctx = Context()
    q = compress_(copy.deepcopy(ref), Int8Config(attention=True), calib=[(torch.randint(0, 100, (4, 12)),)] * 3, context=ctx)
    assert ctx.summary[-1]["attention_quantized"] == ["lm.model.layers.0.self_attn", "lm.model.layers.1.self_attn"]
    ids = torch.randint(0, 100, (2, 12))
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 100
    with torch.no_grad():
        out, want, changed = q(ids), ref(ids), q(later)
    assert _cos(out, want) > 0.99
    torch.testing.assert_close(changed[:, :-1], out[:, :-1])  # still causal: the last token is unseen before


def test_attention_float_keeps_the_most_sensitive_blocks_in_float(tmp_path) -> None:
    ctx = Context()
    recipe = [Int8Config(attention=True, attention_float=1)]
    q = compress_(tiny_bert(3), recipe, calib=_calib(), context=ctx)
    step = ctx.summary[-1]
    kept, errors = step["attention_kept_float"], step["attention_block_errors"]
    assert len(kept) == 1 and len(step["attention_quantized"]) == 2 and len(errors) == 3
    # the block kept in float is the one whose int8 attention alone moved the output most
    assert kept == [max(errors, key=errors.get)] and all(e > 0 for e in errors.values())
    assert kept[0] not in step["attention_quantized"] and not hasattr(q.get_submodule(kept[0]), "int8_attention")
    save_artefact(q, tmp_path, recipe=recipe, source=None, structure=ctx.structure)
    loaded = load_artefact(tmp_path, model=tiny_bert(3))
    ids, mask = token_batch(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), q(ids, mask))
    with pytest.raises(UsageError, match="attention_float is 4 but the model has 3"):
        compress_(tiny_bert(3), Int8Config(attention=True, attention_float=4), calib=_calib())
    with pytest.raises(UsageError, match="attention_float must be >= 0"):
        Int8Config(attention=True, attention_float=-1)
