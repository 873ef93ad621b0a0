"""Peak extra memory while a model runs inference.

On CPU there is no allocator that sees every runtime (torch, onnxruntime and OpenVINO each have
their own), so the common denominator is the process's resident set size: sample it while the
runner works and report the rise above the level just before. On CUDA the torch caching
allocator keeps an exact high-water mark, which is preferred.
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from pared.errors import UsageError
from pared.measure.latency import _inference_context

METHOD_RSS = "rss-sampled-delta"
METHOD_CUDA = "cuda-max-allocated"
METHOD_LOAD_RSS = "rss-sampled-load-and-run"
METHOD_LOAD_CUDA = "cuda-max-allocated-load-and-run"

_SAMPLE_INTERVAL_S = 0.001
_PROC_STATUS = Path("/proc/self/status")


def peak_memory_bytes(
    run: Callable[..., Any], inputs: tuple[Any, ...], *, repeats: int = 3, warmup: int = 3
) -> tuple[int, str]:
    """Measure the peak memory ``run(*inputs)`` needs beyond what is already resident.

    CPU (``"rss-sampled-delta"``): after ``warmup`` unobserved calls, garbage collection and
    (on glibc) ``malloc_trim``, a background thread samples the process RSS (psutil) about
    every millisecond during ``repeats`` calls; the result is the highest sample minus the RSS
    just before the first observed call. On Linux the kernel's own high-water mark
    (``VmHWM``) is read before and after; if it rose during the calls, it is exact and replaces
    a lower sample, so a spike shorter than the sampling interval is not missed.

    CUDA (``"cuda-max-allocated"``, when an input tensor or ``run``'s parameters are on a CUDA
    device): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
    ``memory_allocated`` before. This counts torch tensors only, not the allocator's cached
    reserve or the CUDA context.

    Args:
        run: the inference callable.
        inputs: its positional arguments (torch inputs run under ``inference_mode``).
        repeats: calls to observe; more calls give the sampler more chances to see the peak.
        warmup: calls made before the baseline is taken. One-time runtime set-up (thread
            pools, kernel caches, about 30 MB for torch on CPU) then stays out of the figure, so
            the first model measured in a process is not penalised against the next one.

    Returns:
        ``(bytes, method)``; bytes is never negative (memory freed during the run floors at 0).

    Raises:
        UsageError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise UsageError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    with _inference_context(inputs):
        for _ in range(warmup):
            run(*inputs)
    device = _cuda_device(run, inputs)
    if device is not None:
        return _cuda_peak(run, inputs, repeats, device), METHOD_CUDA
    return _rss_peak(run, inputs, repeats), METHOD_RSS


def load_and_run_memory_bytes(
    build: Callable[[], Callable[..., Any]], inputs: tuple[Any, ...], *, calls: int = 3
) -> tuple[int, str]:
    """Measure the memory it takes to load a model and run it: its deployment footprint.

    ``build()`` loads the model and returns a runner (read an ONNX file and compile it, or copy
    a module's weights), which then runs ``calls`` times. The figure is the highest process RSS
    seen meanwhile (sampled about every millisecond, plus the kernel's ``VmHWM`` when it rose)
    minus the RSS just before ``build()``, after garbage collection and ``malloc_trim``. Unlike
    :func:`peak_memory_bytes` it includes the weights, the runtime's buffers for them and what
    the first calls allocate, so a runtime that preallocates everything is charged for it.
    The runner is dropped before returning.

    With an input on a CUDA device the figure is ``torch.cuda.max_memory_allocated`` over the
    same span minus ``memory_allocated`` before (torch tensors only).

    Args:
        build: makes the runner; everything it allocates and keeps counts.
        inputs: the runner's positional arguments.
        calls: runs after loading; the first calls of some runtimes allocate their buffers.

    Returns:
        ``(bytes, method)``; never negative.

    Raises:
        UsageError: ``calls`` < 1.
    """
    if calls < 1:
        raise UsageError(f"need calls >= 1, got {calls}")
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda), None)
    if device is not None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        _load_and_run(build, inputs, calls)
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - baseline), METHOD_LOAD_CUDA
    gc.collect()
    _release_free_heap()
    sampler = _RssSampler()
    hwm_before = _vm_hwm_bytes()
    baseline = sampler.process.memory_info().rss
    with sampler:
        _load_and_run(build, inputs, calls)
    peak = sampler.peak
    hwm_after = _vm_hwm_bytes()
    if hwm_before is not None and hwm_after is not None and hwm_after > hwm_before:
        peak = max(peak, hwm_after)
    gc.collect()
    return max(0, peak - baseline), METHOD_LOAD_RSS


def _load_and_run(build: Callable[[], Callable[..., Any]], inputs: tuple[Any, ...], calls: int) -> None:
    runner = build()
    with _inference_context(inputs):
        for _ in range(calls):
            runner(*inputs)


def _rss_peak(run: Callable[..., Any], inputs: tuple[Any, ...], repeats: int) -> int:
    # Collect first so garbage left by earlier work is not freed mid-run, which would pull the
    # delta down by memory that has nothing to do with this model.
    gc.collect()
    _release_free_heap()
    sampler = _RssSampler()
    hwm_before = _vm_hwm_bytes()
    baseline = sampler.process.memory_info().rss
    with sampler, _inference_context(inputs):
        for _ in range(repeats):
            run(*inputs)
    peak = sampler.peak
    hwm_after = _vm_hwm_bytes()
    if hwm_before is not None and hwm_after is not None and hwm_after > hwm_before:
        peak = max(peak, hwm_after)
    return max(0, peak - baseline)


class _RssSampler:
    """Context manager: a daemon thread records the highest RSS seen while the block runs."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pared-rss-sampler", daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        # The first sample must exist before the runner starts, or a run shorter than thread
        # start-up would report nothing.
        self._started.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        self._sample()
        self._started.set()
        while not self._stop.wait(_SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)


def _release_free_heap() -> None:
    """Hand freed malloc memory back to the OS (glibc only; a no-op elsewhere).

    Without this, activations of an earlier call (or an earlier model) stay resident in the
    heap, the run reuses them without raising RSS, and the delta reads near zero depending on
    what ran before.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _vm_hwm_bytes() -> int | None:
    """The kernel's peak-RSS mark for this process, or None off Linux."""
    try:
        text = _PROC_STATUS.read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cuda_device(run: Callable[..., Any], inputs: tuple[Any, ...]) -> torch.device | None:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_cuda:
            return x.device
    if isinstance(run, nn.Module):
        for p in run.parameters():
            if p.is_cuda:
                return p.device
    return None


def _cuda_peak(
    run: Callable[..., Any], inputs: tuple[Any, ...], repeats: int, device: torch.device
) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    with _inference_context(inputs):
        for _ in range(repeats):
            run(*inputs)
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - baseline)
