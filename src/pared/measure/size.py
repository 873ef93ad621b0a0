"""Model size: parameter count over the state_dict, and bytes on disk.

Counting ``state_dict()`` tensors rather than ``parameters()`` is deliberate: quantized modules
keep their int8/int4 weights as buffers (or inside packed tuples), so only the state_dict view
makes a parameter count comparable before and after compression.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from pared.errors import UsageError

# Running statistics describe the data, not the learned function, and vanish when BatchNorm is
# folded into the preceding layer; counting them would make folding look like compression.
_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def count_params(model: nn.Module) -> int:
    """Count the weight elements a model stores, each shared tensor once.

    Every tensor in ``model.state_dict()`` is counted (parameters, and floating or integer
    buffers such as int8 weights, scales and zero points), including tensors nested in tuples
    the way ``torch.ao`` packs quantized linear weights. Excluded: BatchNorm/InstanceNorm
    running statistics, ``num_batches_tracked`` and boolean buffers (masks, not weights).

    Args:
        model: any ``nn.Module``; may live on any device, including ``meta``.

    Returns:
        The number of elements. Tied tensors (same storage pointer and shape, or the same
        object under two names) count once.

    Example:
        >>> count_params(nn.Linear(10, 5))
        55
    """
    skip = _norm_stat_names(model)
    seen_ids: set[int] = set()
    seen_ptrs: set[tuple[int, tuple[int, ...]]] = set()
    total = 0
    for name, value in model.state_dict(keep_vars=True).items():
        if name in skip:
            continue
        for tensor in _tensors_in(value):
            if tensor.dtype == torch.bool or not _first_time(tensor, seen_ids, seen_ptrs):
                continue
            total += tensor.numel()
    return total


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a file, or the total size of all files below a directory.

    Symlinks to files are followed (a Hugging Face snapshot is a tree of links into a blob
    store); symlinked directories are not, so a link loop cannot recurse forever.

    Args:
        path: a file or a directory.

    Returns:
        Bytes on disk as ``stat().st_size`` reports them (apparent size, not allocated blocks).

    Raises:
        UsageError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise UsageError(f"cannot measure size: no such file or directory: {path}")
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            entry = Path(root) / name
            if entry.is_file():  # skips dangling links and sockets
                total += entry.stat().st_size
    return total


def _norm_stat_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NormBase):
            names.update(f"{prefix}.{s}" if prefix else s for s in _NORM_STATS)
    return names


def _tensors_in(value: object) -> Iterator[torch.Tensor]:
    # torch.ao quantized Linear stores ``(weight, bias)`` as one state_dict entry; dtypes and
    # other non-tensor extras are metadata and hold no weights.
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)


def _first_time(
    tensor: torch.Tensor, seen_ids: set[int], seen_ptrs: set[tuple[int, tuple[int, ...]]]
) -> bool:
    """Record ``tensor``; false if it (or a tensor on the same storage and shape) was seen."""
    if id(tensor) in seen_ids:
        return False
    seen_ids.add(id(tensor))
    ptr = _data_ptr(tensor)
    # Meta tensors and storage-less wrapper subclasses report 0 or raise; object identity is
    # then the only tie signal we have.
    if ptr == 0:
        return True
    key = (ptr, tuple(tensor.shape))
    if key in seen_ptrs:
        return False
    seen_ptrs.add(key)
    return True


def _data_ptr(tensor: torch.Tensor) -> int:
    try:
        return int(tensor.data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


def activation_bytes(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of every leaf module's output tensors in one forward on ``example_inputs``.

    An upper-bound proxy for activation traffic used by the energy estimate: each
    intermediate result written once and read once is counted once.
    """
    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return total
