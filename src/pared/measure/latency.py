"""Wall-clock latency of one inference call: warm-up, timed runs, median and p90.

The runner is any callable (a torch module, an onnxruntime session's ``run`` wrapped in a
lambda, an OpenVINO compiled model), so the same code times every runtime pared exports to.
Thread counts are set by the caller on the runtime; here they are only recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pared.errors import UsageError


@dataclass
class Latency:
    """Latency of one call of a batch, in milliseconds.

    Attributes:
        p50_ms: median of the timed runs.
        p90_ms: 90th percentile (numpy's linear interpolation).
        mean_ms: arithmetic mean.
        runs: number of timed runs.
        warmup: number of untimed runs before them.
        batch: batch size of each call.
        threads: intra-op threads the caller configured (recorded, not set here).
        runtime: what ran the model, e.g. ``"torch"``, ``"onnxruntime"``, ``"openvino"``.
    """

    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    warmup: int
    batch: int
    threads: int
    runtime: str

    def to_dict(self) -> dict[str, Any]:
        """Return the report form: p50, p90, mean (ms), runs, warmup, batch, threads, runtime."""
        return {
            "p50": self.p50_ms,
            "p90": self.p90_ms,
            "mean": self.mean_ms,
            "runs": self.runs,
            "warmup": self.warmup,
            "batch": self.batch,
            "threads": self.threads,
            "runtime": self.runtime,
        }


def measure_latency(
    run: Callable[..., Any],
    inputs: tuple[Any, ...],
    *,
    runtime: str,
    batch: int,
    threads: int,
    warmup: int = 3,
    runs: int = 20,
    min_time_s: float = 0.0,
) -> Latency:
    """Time ``run(*inputs)`` with ``time.perf_counter``.

    Args:
        run: the callable to time; its result is discarded.
        inputs: positional arguments of each call. If any is a torch tensor, calls run under
            ``torch.inference_mode()``; if any is on CUDA, each timed call ends with a device
            synchronize so the time covers the kernels and not only their launch.
        runtime: label recorded in the result.
        batch: batch size of ``inputs``, recorded.
        threads: thread count the caller configured, recorded.
        warmup: untimed calls first (allocator, kernel selection and caches settle).
        runs: minimum number of timed calls.
        min_time_s: if positive, keep timing until both ``runs`` calls and this much timed
            wall-clock have accumulated (short models then get more samples).

    Returns:
        A ``Latency`` built from the per-call samples.

    Raises:
        UsageError: ``runs`` < 1, ``warmup`` < 0 or ``min_time_s`` < 0.
    """
    _check_counts(runs=runs, warmup=warmup, min_time_s=min_time_s)
    call = _timed_caller(run, inputs)
    with _inference_context(inputs):
        for _ in range(warmup):
            call()
        samples: list[float] = []
        total_ms = 0.0
        while len(samples) < runs or total_ms < min_time_s * 1e3:
            samples.append(call())
            total_ms += samples[-1]
    return latency_from_samples(
        samples, runtime=runtime, batch=batch, threads=threads, warmup=warmup
    )


def interleaved_latency(
    runners: dict[str, Callable[..., Any]],
    inputs: dict[str, tuple[Any, ...]] | tuple[Any, ...],
    *,
    rounds: int = 10,
    warmup: int = 2,
    rotate: bool = False,
    settle: bool = True,
) -> dict[str, list[float]]:
    """Time several runners round-robin, one call of each per round.

    Timing A then B in two blocks lets a frequency ramp, a noisy neighbour or thermal throttling
    land on one of them only; alternating spreads such drift over all runners equally, which is
    what a before/after comparison needs.

    Args:
        runners: name -> callable; called in the dict's order each round.
        inputs: one argument tuple shared by all runners, or name -> tuple per runner.
        rounds: timed rounds; each runner gets exactly this many samples.
        warmup: untimed rounds first, also round-robin.
        rotate: start each round one runner later, so the first runner of a round changes.
        settle: make one untimed call of the same runner right before each timed call. On a
            2-core machine a call made right after another runtime's call is slowed by that
            runtime's worker threads winding down, by different amounts per runtime (OpenVINO
            measured 0.8 ms after itself and 6.2 ms after PyTorch on digits); settling times
            each runner in its own steady state while keeping the rounds interleaved.

    Returns:
        name -> list of per-call milliseconds, in round order. Build a ``Latency`` from a
        list with ``latency_from_samples``.

    Raises:
        UsageError: no runners, ``rounds`` < 1, ``warmup`` < 0, or per-runner inputs missing
            a runner's name.
    """
    if not runners:
        raise UsageError("interleaved_latency needs at least one runner")
    _check_counts(runs=rounds, warmup=warmup, min_time_s=0.0)
    per_runner = _inputs_per_runner(runners, inputs)
    calls = {name: _timed_caller(fn, per_runner[name]) for name, fn in runners.items()}
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    all_inputs = tuple(x for args in per_runner.values() for x in args)
    with _inference_context(all_inputs):
        for round_index in range(warmup + rounds):
            shift = round_index % len(names) if rotate else 0
            for name in names[shift:] + names[:shift]:
                if settle:
                    calls[name]()
                elapsed = calls[name]()
                if round_index >= warmup:
                    samples[name].append(elapsed)
    return samples


def latency_from_samples(
    samples_ms: Sequence[float], *, runtime: str, batch: int, threads: int, warmup: int
) -> Latency:
    """Summarise per-call milliseconds into a ``Latency``.

    Args:
        samples_ms: timed calls, in milliseconds (warm-up calls excluded).
        runtime: label recorded in the result.
        batch: batch size of each call.
        threads: thread count the caller configured.
        warmup: how many untimed calls preceded the samples.

    Returns:
        ``Latency`` with p50 = median, p90 = 90th percentile, mean, and runs = len(samples).

    Raises:
        UsageError: ``samples_ms`` is empty.
    """
    if len(samples_ms) == 0:
        raise UsageError("no latency samples to summarise")
    arr = np.asarray(samples_ms, dtype=np.float64)
    return Latency(
        p50_ms=float(np.percentile(arr, 50)),
        p90_ms=float(np.percentile(arr, 90)),
        mean_ms=float(arr.mean()),
        runs=int(arr.size),
        warmup=warmup,
        batch=batch,
        threads=threads,
        runtime=runtime,
    )


def _timed_caller(run: Callable[..., Any], inputs: tuple[Any, ...]) -> Callable[[], float]:
    """Return a zero-argument function that calls ``run(*inputs)`` and returns milliseconds."""
    sync = _cuda_sync if _on_cuda(inputs) else None

    def call() -> float:
        start = time.perf_counter()
        run(*inputs)
        if sync is not None:
            sync()
        return (time.perf_counter() - start) * 1e3

    return call


def _inference_context(inputs: tuple[Any, ...]) -> contextlib.AbstractContextManager[Any]:
    """``torch.inference_mode()`` when torch tensors are involved, else nothing.

    Shared with memory.py and energy.py so every measurement runs the model the same way.
    """
    if any(isinstance(x, torch.Tensor) for x in inputs):
        return torch.inference_mode()
    return contextlib.nullcontext()


def _on_cuda(inputs: tuple[Any, ...]) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)


def _cuda_sync() -> None:
    torch.cuda.synchronize()


def _inputs_per_runner(
    runners: dict[str, Callable[..., Any]], inputs: dict[str, tuple[Any, ...]] | tuple[Any, ...]
) -> dict[str, tuple[Any, ...]]:
    if not isinstance(inputs, dict):
        return {name: tuple(inputs) for name in runners}
    missing = [name for name in runners if name not in inputs]
    if missing:
        raise UsageError(f"interleaved_latency: no inputs for runner(s) {missing}")
    return {name: tuple(inputs[name]) for name in runners}


def _check_counts(*, runs: int, warmup: int, min_time_s: float) -> None:
    if runs < 1:
        raise UsageError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise UsageError(f"warmup must be 0 or more, got {warmup}")
    if min_time_s < 0:
        raise UsageError(f"min_time_s must be 0 or more, got {min_time_s}")
