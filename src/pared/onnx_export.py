"""Export a (compressed) model to ONNX: the one place that knows about the ONNX format.

pared's quantized modules trace to QuantizeLinear/DequantizeLinear pairs around float weights;
``fold_constant_quantize`` then stores those weights as int8 initializers, so the file holds
integers and runtimes see the standard QDQ pattern they map onto integer kernels.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from pared.atomic import atomic_write_bytes
from pared.errors import ParedError

OPSET = 17


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    *,
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Trace ``model`` on ``example_inputs`` and write a checked ONNX file (atomically).

    Returns:
        The path written.

    Raises:
        ParedError: the exported graph fails ``onnx.checker`` (a bug in pared, exit 1).
    """
    path = Path(path)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), plain_attention(model):
            torch.onnx.export(
                model,
                example_inputs,
                str(raw),
                input_names=input_names,
                output_names=["output"],
                dynamic_axes=dynamic_axes or {},
                opset_version=OPSET,
                custom_opsets=_custom_opsets(model),
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(raw))
    fold_constant_quantize(proto.graph)
    fold_dequantize_transpose(proto.graph)
    merge_duplicate_nodes(proto.graph)
    share_conv_input_quantizers(proto.graph)
    hoist_quantize_above_maxpool(proto.graph)
    store_block_scales_fp16(proto.graph)
    remove_unused_initializers(proto.graph)
    shorten_names(proto.graph)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ParedError(f"exported ONNX failed the checker: {str(exc).splitlines()[0]}") from None
    atomic_write_bytes(path, proto.SerializeToString())
    return path


@contextlib.contextmanager
def plain_attention(model: nn.Module) -> Iterator[None]:
    """Trace Hugging Face attention as plain MatMul/Softmax ops instead of SDPA.

    Mathematically the same; the plain form is what OpenVINO fuses into its attention kernel,
    and it avoids the IsNaN/Select mask guard of the SDPA path (measured 13% faster for MiniLM
    int8 at batch 8 x 128). The PyTorch baseline keeps SDPA, its fastest eager path.
    """
    configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"


def fold_constant_quantize(graph: onnx.GraphProto) -> int:
    """Replace ``QuantizeLinear(constant)`` by its integer result, stored as an initializer.

    Returns the number of folded nodes.
    """
    inits = {i.name: i for i in graph.initializer}
    consts = _constant_nodes(graph)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        x = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = _value(node.input[1], inits, consts)
        zp = _value(node.input[2], inits, consts) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale is None or zp is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and x.ndim > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp_b = scale.reshape(shape), zp.reshape(shape)
        else:
            zp_b = zp
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x / scale) + zp_b.astype(np.int32), info.min, info.max).astype(zp.dtype)
        name = node.output[0]
        graph.initializer.append(numpy_helper.from_array(q, name))
        graph.node.remove(node)
        folded += 1
    return folded


def fold_dequantize_transpose(graph: onnx.GraphProto) -> int:
    """Rewrite ``Transpose(DequantizeLinear(W_int, s, axis=0))`` of 2-D constant weights as
    ``DequantizeLinear(W_int^T, s, axis=1)`` so MatMul reads a dequantized constant directly
    (the pattern runtimes fuse into integer GEMMs)."""
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose":
            continue
        dq = producers.get(node.input[0])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or perm != [1, 0]:
            continue
        if sum(1 for n in graph.node for i in n.input if i == dq.output[0]) != 1:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if w.ndim != 2 or axis != 0:
            continue
        new_w = numpy_helper.from_array(np.ascontiguousarray(w.T), dq.input[0] + "_t")
        graph.initializer.append(new_w)
        new_dq = helper.make_node(
            "DequantizeLinear", [new_w.name, *dq.input[1:]], [node.output[0]], name=dq.name + "_t", axis=1
        )
        idx = list(graph.node).index(node)
        graph.node.insert(idx, new_dq)
        graph.node.remove(node)
        graph.node.remove(dq)
        folded += 1
    return folded


def merge_duplicate_nodes(graph: onnx.GraphProto) -> int:
    """Merge nodes that compute the same value: same operator and attributes, same inputs, with
    constant inputs compared by content; ``Identity`` nodes are dropped.

    Layers that read one tensor each export their own copy of the work done on it (SmoothQuant's
    per-channel multiply, the activation QuantizeLinear): with a shared smoothing scale, the
    query/key/value projections of an attention block export three identical multiply and
    quantize chains. Merged, the runtime quantizes that input once. Returns the number of merged
    nodes.
    """
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # a subgraph may read outer names: leave such a graph as it is
    by_content: dict[tuple, str] = {}
    rename = {}
    inputs = {i.name for i in graph.input}  # an initializer listed as an input can be overridden
    for init in graph.initializer:
        if init.name in inputs:
            continue
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        rename[init.name] = by_content.setdefault(key, init.name)
    outputs = {o.name for o in graph.output}
    seen: dict[tuple, list[str]] = {}
    merged = 0
    for node in list(graph.node):
        node.input[:] = [rename.get(i, i) for i in node.input]
        if "Random" in node.op_type or outputs.intersection(node.output):
            continue
        if node.op_type == "Identity":  # the exporter's alias of a repeated parameter
            rename[node.output[0]] = node.input[0]
            graph.node.remove(node)
            merged += 1
            continue
        key = (node.domain, node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))
        if key in seen:
            rename.update(zip(node.output, seen[key]))
            graph.node.remove(node)
            merged += 1
        else:
            seen[key] = list(node.output)
    gone = {old for old, new in rename.items() if old != new}
    for info in list(graph.value_info):
        if info.name in gone:
            graph.value_info.remove(info)
    return merged


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _qdq_pairs(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """``(QuantizeLinear, DequantizeLinear)`` pairs on activations: a Q whose only reader is a DQ."""
    consumers = _consumers(graph)
    pairs = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        readers = consumers.get(q.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "DequantizeLinear":
            pairs.append((q, readers[0]))
    return pairs


def share_conv_input_quantizers(graph: onnx.GraphProto) -> int:
    """Let the other readers of a quantized conv input (a residual ``Add``, a ``MaxPool``) read
    the dequantized value too.

    In a ResNet block the block input feeds the first conv (through pared's Q/DQ) and the residual
    add (in float), so the producer has to write float and quantize separately. Once every reader
    goes through the Q/DQ, runtimes fuse the quantization into the producing conv, which then
    writes int8: on the ResNet-18-layout CNN in OpenVINO this is most of the gap to NNCF, which
    quantizes residual inputs the same way (docs/quantization.md). The add then sums the int8-grid
    value, an error of at most half a step; limited to conv inputs, because in a transformer the
    same rewrite would put the residual stream on the grid. Returns the number of rewired inputs.
    """
    consumers = _consumers(graph)
    position = {id(n): k for k, n in enumerate(graph.node)}
    rewired = 0
    for q, dq in _qdq_pairs(graph):
        if not any(c.op_type == "Conv" for c in consumers.get(dq.output[0], [])):
            continue
        for reader in consumers.get(q.input[0], []):
            if reader is q or reader.op_type not in ("Add", "MaxPool") or position[id(reader)] < position[id(dq)]:
                continue
            reader.input[:] = [dq.output[0] if i == q.input[0] else i for i in reader.input]
            rewired += 1
    return rewired


def hoist_quantize_above_maxpool(graph: onnx.GraphProto) -> int:
    """``Q(MaxPool(x))`` -> ``MaxPool(DQ(Q(x)))`` where the pool has no other reader.

    Exact (quantization is monotone, so it commutes with max), and the pool then runs on int8 and
    the quantization fuses into the op before it. Returns the number of moved pairs.
    """
    consumers = _consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    moved = 0
    for q, dq in _qdq_pairs(graph):
        pool = producers.get(q.input[0])
        if pool is None or pool.op_type != "MaxPool" or len(pool.output) != 1 or len(consumers[pool.output[0]]) != 1:
            continue
        pooled, dequantized = pool.output[0], dq.output[0]
        q.input[0] = pool.input[0]
        dq.output[0] = pooled + "_dq"
        pool.input[0], pool.output[0] = dq.output[0], dequantized
        graph.node.remove(pool)
        graph.node.insert(list(graph.node).index(dq) + 1, pool)
        moved += 1
    return moved


_BLOCK_SCALE_INPUT = {"MatMulNBits": 2, "GatherBlockQuantized": 2}


def store_block_scales_fp16(graph: onnx.GraphProto) -> int:
    """Store the scales of ``MatMulNBits`` / ``GatherBlockQuantized`` as float16 plus a ``Cast``.

    Both ops need scales of their float type (fp32 here); the exporter folds the modules' fp16
    scale buffers into fp32 initializers. Only scales that fp16 holds exactly are converted, so
    the file's values are unchanged; the runtime folds the ``Cast`` when it loads the model.
    Returns the number of scale tensors converted.
    """
    inits = {i.name: i for i in graph.initializer}
    casts, done = [], {}
    for node in graph.node:
        pos = _BLOCK_SCALE_INPUT.get(node.op_type)
        if node.domain != "com.microsoft" or pos is None or len(node.input) <= pos:
            continue
        name = node.input[pos]
        if name in done:
            node.input[pos] = done[name]
            continue
        init = inits.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        graph.initializer.append(numpy_helper.from_array(half, f"{name}_fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}_fp16"], [f"{name}_fp32"], to=onnx.TensorProto.FLOAT))
        done[name] = node.input[pos] = f"{name}_fp32"
    for cast in reversed(casts):
        graph.node.insert(0, cast)
    return len(casts)


def _custom_opsets(model: nn.Module) -> dict[str, int]:
    # Modules that export ONNX Runtime contrib ops say so with an ``onnx_domain`` attribute.
    domains = {getattr(m, "onnx_domain", None) for m in model.modules()} - {None}
    return {d: 1 for d in domains}


def uses_contrib_ops(path: str | os.PathLike[str]) -> bool:
    """True when the ONNX file uses ONNX Runtime's ``com.microsoft`` operators."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(n.domain == "com.microsoft" for n in proto.graph.node)


def shorten_names(graph: onnx.GraphProto) -> int:
    """Rename the exporter's path-like value names (``/bert/encoder/layer.0/.../MatMul_output_0``)
    to ``t<i>`` and drop node names. They are debugging labels only, and on MiniLM they took about
    130 kB of the 23 MB int8 file. Graph inputs, outputs and parameter-named initializers keep
    their names. Returns the number of renamed values.
    """
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # a subgraph may refer to outer names: leave such a graph as it is
    keep = {v.name for v in (*graph.input, *graph.output)}
    keep |= {i.name for i in graph.initializer if not i.name.startswith("/")}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return mapping.setdefault(name, f"t{len(mapping)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    return len(mapping)


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers no node reads (e.g. the float weights that folding replaced)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def _constant_nodes(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _value(name: str, inits: dict[str, onnx.TensorProto], consts: dict[str, np.ndarray]) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    return consts.get(name)
