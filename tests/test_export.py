"""QDQ ONNX export of int8 models: valid files, integer weights, runtimes agree with eager."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pared.apply import compress_
from pared.onnx_export import (
    export_onnx,
    fold_constant_quantize,
    remove_unused_initializers,
    store_block_scales_fp16,
)
from pared.quant import Int8Config, QuantLinear
from pared.errors import UsageError
from pared.runtime import OnnxRuntimeRunner, OpenVinoRunner, make_runner
from pared.testing.models import TinyCNN, random_batches, tiny_cnn, tiny_mlp

AXES = {"x": {0: "batch"}}


def _mlp(d_in: int = 64, hidden: int = 128, d_out: int = 16, seed: int = 0) -> nn.Module:
    return tiny_mlp(d_in, hidden, d_out, seed=seed)


def _cnn() -> TinyCNN:
    return tiny_cnn()


def _batches(shape: tuple[int, ...], n: int, seed: int) -> list[tuple[torch.Tensor]]:
    return random_batches(shape, n, seed=seed)


CASES = {"mlp": (_mlp, (8, 64)), "cnn": (_cnn, (4, 3, 6, 6))}


@pytest.fixture(scope="module")
def static_models(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[nn.Module, Path, torch.Tensor]]:
    out = {}
    for name, (make, shape) in CASES.items():
        q = compress_(make(), Int8Config(mode="static"), calib=_batches(shape, 4, seed=2))
        x = _batches((32, *shape[1:]), 1, seed=3)[0][0]
        target = tmp_path_factory.mktemp(name) / "m.onnx"
        path = export_onnx(q, (x[:2],), target, input_names=["x"], dynamic_axes=AXES)
        out[name] = (q, path, x)
    return out


def _initializers(model: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
    return [(i.name, numpy_helper.to_array(i)) for i in model.graph.initializer]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_static_export_is_valid_qdq_with_int8_weights(static_models, name: str) -> None:
    q, path, _ = static_models[name]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    n_layers = sum(isinstance(m, QuantLinear) for m in q.modules()) + (name == "cnn")
    # one activation Q/DQ pair per layer, one weight DQ per layer; the weight Q was folded
    assert ops.count("QuantizeLinear") == n_layers
    assert ops.count("DequantizeLinear") == 2 * n_layers
    inits = _initializers(model)
    int8 = [a for _, a in inits if a.dtype == np.int8]
    assert len(int8) == n_layers and all(a.ndim >= 2 for a in int8)
    weights = {k: v for k, v in q.state_dict().items() if k.endswith("weight_q")}
    assert sorted(a.size for a in int8) == sorted(int(v.numel()) for v in weights.values())
    for w in weights.values():  # stored values are exactly pared's integer weights
        assert any(np.array_equal(a, w.numpy()) or np.array_equal(a, w.numpy().T) for a in int8)
    floats = [(k, a) for k, a in inits if a.dtype == np.float32]
    if name == "mlp":
        assert all(a.size < 1000 for _, a in floats), [(k, a.size) for k, a in floats]
    assert not any(a.size == w.numel() for _, a in floats for w in weights.values())


@pytest.mark.parametrize("name", list(CASES))
def test_openvino_matches_eager_quantized_model(static_models, name: str) -> None:
    q, path, x = static_models[name]
    with torch.no_grad():
        ref = q(x)
    y = OpenVinoRunner(path, threads=1, input_names=["x"])(x)
    assert y.shape == ref.shape
    assert _rel_err(y, ref) < 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_openvino_bf16_runtime_runs_float_ops_in_bf16_where_supported(static_models, name: str) -> None:
    q, path, x = static_models[name]
    with torch.no_grad():
        ref = q(x)
    run = make_runner("openvino-bf16", onnx_path=path, threads=1, input_names=["x"])
    assert run.runtime == "openvino-bf16" and run.effective_precision in ("bf16", "f32")
    # bf16 keeps 8 mantissa bits: ~0.4% per op, int8 ops are exact either way
    assert _rel_err(run(x), ref) < (3e-2 if run.effective_precision == "bf16" else 1e-3)


def test_openvino_reads_inputs_in_place_without_changing_them_or_keeping_them(static_models) -> None:
    """Inputs are shared with OpenVINO (no copy); a strided view, the caller's tensor and the
    result of the previous call must all survive the next call unchanged."""
    q, path, x = static_models["mlp"]
    run = OpenVinoRunner(path, threads=1, input_names=["x"])
    wide = torch.stack([x, -x], dim=2).flatten(1)[:, ::2]  # non-contiguous, same values as x
    assert not wide.is_contiguous() and torch.equal(wide, x)
    before = wide.clone()
    first = run(wide)
    assert torch.equal(wide, before)
    second = run(x + 1.0)
    assert not torch.equal(first, second)
    assert torch.equal(first, run(x))  # the first output was a copy, not OpenVINO's buffer
    with torch.no_grad():
        assert _rel_err(first, q(x)) < 1e-3


def test_unknown_openvino_precision_is_refused(static_models) -> None:
    _, path, _ = static_models["mlp"]
    with pytest.raises(UsageError, match="precision must be f32 or bf16"):
        OpenVinoRunner(path, threads=1, input_names=["x"], precision="f16")


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_graph_math_equals_eager(static_models, name: str) -> None:
    """The exported graph, run as written (no runtime rewrites), is pared's simulation."""
    q, path, x = static_models[name]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    y = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        assert _rel_err(y, q(x)) < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_onnxruntime_matches_eager_quantized_model(static_models, name: str) -> None:
    q, path, x = static_models[name]
    with torch.no_grad():
        ref = q(x)
    y = OnnxRuntimeRunner(path, threads=1, input_names=["x"])(x)
    assert y.shape == ref.shape
    # (the MLP lands at ~9.5e-4: see the xfail below for where the difference comes from)
    assert _rel_err(y, ref) < 1e-3


def test_onnxruntime_fused_kernels_equal_eager_exactly() -> None:
    q = compress_(_mlp(16, 32, 8), Int8Config(), calib=_batches((8, 16), 4, seed=2))
    x = _batches((32, 16), 1, seed=11)[0][0]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(q, (x[:2],), Path(tmp) / "m.onnx", input_names=["x"], dynamic_axes=AXES)
        y = OnnxRuntimeRunner(path, threads=1, input_names=["x"])(x)
    with torch.no_grad():
        assert _rel_err(y, q(x)) < 1e-5


def test_dynamic_export_uses_integer_matmul() -> None:
    ref = _mlp()
    q = compress_(copy.deepcopy(ref), Int8Config(mode="dynamic"))
    x = _batches((16, 64), 1, seed=4)[0][0]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(q, (x[:2],), Path(tmp) / "d.onnx", input_names=["x"], dynamic_axes=AXES)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2
        assert "QuantizeLinear" not in ops
        assert sum(a.dtype == np.int8 for _, a in _initializers(model)) == 2
        y = OnnxRuntimeRunner(path, threads=1, input_names=["x"])(x)
    with torch.no_grad():
        assert _rel_err(y, q(x)) < 2e-2
        assert _rel_err(y, ref(x)) < 5e-2


def test_int8_onnx_is_at_most_0_3x_fp32(tmp_path: Path) -> None:
    torch.manual_seed(5)
    fp32 = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    x = torch.randn(4, 512)
    q = compress_(copy.deepcopy(fp32), Int8Config(), calib=[(x,)])
    f = export_onnx(fp32, (x,), tmp_path / "fp32.onnx", input_names=["x"])
    i = export_onnx(q, (x,), tmp_path / "int8.onnx", input_names=["x"])
    ratio = i.stat().st_size / f.stat().st_size
    assert ratio <= 0.3, ratio
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pared-tmp")] == []


# ---------------------------------------------------------------- graph rewrites


def _hand_built() -> onnx.ModelProto:
    w = np.array([[0.5, -1.26, 3.0], [0.01, 0.0, -0.2]], np.float32)
    nodes = [
        # per-channel int8 weight with initializer scale and zero point -> folded
        helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zp"], ["Wq"], axis=0),
        helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zp"], ["Wd"], axis=0),
        # per-tensor uint8 with scale from a Constant node and no zero point -> folded
        helper.make_node(
            "Constant", [], ["c_scale"], value=numpy_helper.from_array(np.array(0.02, np.float32))
        ),
        helper.make_node("QuantizeLinear", ["B", "c_scale"], ["Bq"]),
        helper.make_node("DequantizeLinear", ["Bq", "c_scale"], ["Bd"]),
        # a graph input is not constant -> left alone
        helper.make_node("QuantizeLinear", ["X", "c_scale"], ["Xq"]),
        helper.make_node("DequantizeLinear", ["Xq", "c_scale"], ["Xd"]),
        helper.make_node("MatMul", ["Xd", "Wd"], ["XW"]),
        helper.make_node("Add", ["XW", "Bd"], ["Y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array([3.0 / 127, 0.2 / 127], np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"),
        numpy_helper.from_array(np.array([0.07, 9.0, -1.0], np.float32), "B"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def test_fold_constant_quantize_on_hand_built_graph() -> None:
    model = _hand_built()
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    before = _run(model, x)

    assert fold_constant_quantize(model.graph) == 2
    remove_unused_initializers(model.graph)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1  # only the one on the graph input remains
    inits = dict(_initializers(model))
    assert "W" not in inits and "B" not in inits  # float originals dropped
    w_scale = np.array([3.0 / 127, 0.2 / 127], np.float32)
    w = np.array([[0.5, -1.26, 3.0], [0.01, 0.0, -0.2]], np.float32)
    expected_w = np.clip(np.rint(w / w_scale[:, None]), -128, 127).astype(np.int8)
    assert inits["Wq"].dtype == np.int8 and np.array_equal(inits["Wq"], expected_w)
    assert inits["Wq"].tolist() == [[21, -53, 127], [6, 0, -127]]
    assert inits["Bq"].dtype == np.uint8 and inits["Bq"].tolist() == [4, 255, 0]  # saturates, no wrap
    np.testing.assert_array_equal(_run(model, x), before)


def test_fold_constant_quantize_is_a_no_op_without_constants() -> None:
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["X", "s"], ["Y"])],
        "g",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.UINT8, [2])],
    )
    assert fold_constant_quantize(graph) == 0 and len(graph.node) == 1


def test_block_scales_become_fp16_only_where_exact() -> None:
    exact = np.array([0.5, 0.125, 3.0], np.float32)
    inexact = np.array([0.1, 0.2, 0.3], np.float32)  # not representable in fp16
    nodes = [
        helper.make_node("MatMulNBits", ["X", "B", "S1", "Z"], ["Y1"], domain="com.microsoft", K=32, N=3, bits=4, block_size=32),
        helper.make_node("MatMulNBits", ["X", "B", "S1", "Z"], ["Y2"], domain="com.microsoft", K=32, N=3, bits=4, block_size=32),
        helper.make_node("MatMulNBits", ["X", "B", "S2", "Z"], ["Y3"], domain="com.microsoft", K=32, N=3, bits=4, block_size=32),
        helper.make_node("Mul", ["X", "S1"], ["Y4"]),  # not a block-quantized op: untouched
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("Y1", "Y2", "Y3", "Y4")],
        initializer=[numpy_helper.from_array(exact, "S1"), numpy_helper.from_array(inexact, "S2")],
    )
    assert store_block_scales_fp16(graph) == 1  # S1 once, though two nodes read it
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert len(casts) == 1 and graph.node[0] is casts[0]  # first, so it precedes its readers
    half = {i.name: numpy_helper.to_array(i) for i in graph.initializer}["S1_fp16"]
    assert half.dtype == np.float16 and np.array_equal(half.astype(np.float32), exact)
    readers = [list(n.input) for n in graph.node if n.op_type != "Cast"]
    assert readers[0][2] == readers[1][2] == casts[0].output[0] and readers[2][2] == "S2" and readers[3][1] == "S1"


# ---------------------------------------------------------------- quantizer placement passes


def test_residual_cnn_reads_quantized_block_inputs(tmp_path: Path) -> None:
    from pared.testing.resnet import resnet18_layout

    torch.manual_seed(0)
    fp32 = resnet18_layout(8, 10).eval()
    calib = [(torch.randn(2, 3, 64, 64),) for _ in range(3)]
    q = compress_(copy.deepcopy(fp32), Int8Config(), calib=calib)
    x = torch.randn(4, 3, 64, 64)
    path = export_onnx(q, (x,), tmp_path / "r.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    # The stem pool was moved below the conv's Q/DQ (it runs on the int8 grid) ...
    assert [producers[p.input[0]].op_type for p in pools] == ["DequantizeLinear"]
    # ... and every residual add with an identity shortcut reads a dequantized block input.
    identity_adds = [n for n in graph.node if n.op_type == "Add"
                     and not all(producers[i].op_type == "Conv" for i in n.input)]
    assert len(identity_adds) == 5  # 8 blocks, 3 with a conv shortcut
    assert all(any(producers[i].op_type in ("DequantizeLinear", "MaxPool") for i in n.input) for n in identity_adds)
    with torch.no_grad():
        ref, eager = fp32(x), q(x)
    out = OnnxRuntimeRunner(path, threads=1, input_names=["x"])(x)
    assert _rel_err(out, eager) < 0.02 and _rel_err(out, ref) < 0.05


def test_hoisting_the_quantizer_above_maxpool_is_exact() -> None:
    from pared.onnx_export import hoist_quantize_above_maxpool

    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 5])], initializer=[scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": np.random.default_rng(0).normal(2.0, 3.0, (1, 2, 9, 9)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert hoist_quantize_above_maxpool(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "DequantizeLinear", "MaxPool"]
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(after, before)
