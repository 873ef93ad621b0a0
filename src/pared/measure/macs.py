"""Multiply-accumulates of one forward pass, counted at the ATen level.

``torch.utils.flop_counter.FlopCounterMode`` sees every ATen op a forward dispatches, so a module
that swapped ``nn.Linear`` for ``F.linear(x, dequantize(w))`` still counts as a matmul. Its
registry misses a few ops that inference actually hits on CPU; the formulas below fill them in.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def count_macs(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> int:
    """Count the multiply-accumulates of one forward on ``example_inputs``.

    Counted: convolutions, ``mm``/``addmm``/``bmm``/``baddbmm`` (so linear, matmul, einsum),
    ``mv``/``dot`` and scaled-dot-product attention (the QK^T and PV products, ignoring causal
    masking). Element-wise ops, norms and softmax are not MACs and count zero.

    The forward runs under ``torch.no_grad()`` with the model temporarily in ``eval()`` mode
    (so BatchNorm statistics are not updated) and with PyTorch's fused multi-head-attention
    fast path off (the fused kernel is opaque to the counter; the decomposed path does the same
    arithmetic). Training flags are restored afterwards.

    Args:
        model: the module to run.
        example_inputs: positional inputs of one forward; the batch size in them is counted.

    Returns:
        MACs, i.e. counted FLOPs // 2.

    Example:
        >>> count_macs(nn.Linear(64, 32), (torch.zeros(4, 64),))
        8192
    """
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with _eval_mode(model), _mha_fastpath_off(), torch.no_grad(), counter:
        model(*example_inputs)
    return int(counter.get_total_flops()) // 2


def _sdpa_flops(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FLOPs of QK^T plus PV for shapes (..., Lq, E), (..., Lk, E), (..., Lk, Ev).

    Query heads are the leading dims, so grouped-query attention (fewer KV heads) counts by
    query heads, which is how the kernel broadcasts.
    """
    *lead, len_q, dim_qk = query_shape
    len_k = key_shape[-2]
    dim_v = value_shape[-1]
    return 2 * math.prod(lead) * len_q * len_k * (dim_qk + dim_v)


def _mv_flops(mat_shape: Sequence[int], vec_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return 2 * mat_shape[0] * mat_shape[1]


def _dot_flops(a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return 2 * a_shape[0]


def _extra_formulas() -> dict[Any, Any]:
    # Only the CPU kernel name is missing from torch's own registry; the CUDA flash/efficient/
    # cudnn variants are already there. Looked up by name so an older torch without the op
    # simply skips it.
    formulas: dict[Any, Any] = {aten.mv: _mv_flops, aten.dot: _dot_flops}
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    ):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = _sdpa_flops
    return formulas


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)
