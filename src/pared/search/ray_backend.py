"""Trials across a Ray cluster: N Ray tasks, each a search worker on one shared Optuna storage.

The study (PostgreSQL, or SQLite when every worker is on this machine) coordinates the
workers: each asks it for the next trial, so no trial is lost or run twice, and a worker that
dies is found by heartbeat and its trial retried. Ray only places the workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pared.errors import UsageError
from pared.search.study import SearchSpec


def _worker(spec_fields: dict[str, Any]) -> int:
    """One Ray task: work on the study until its budget is spent; returns trials it evaluated."""
    import pared.search  # noqa: F401 - registers the spaces in the worker process
    from pared.search.evaluate import CompressEvaluator
    from pared.search.study import load_study, open_storage, run_worker

    spec = SearchSpec(**spec_fields)
    study = load_study(spec, open_storage(spec, fresh=False, overwrite=False))
    return run_worker(spec, study, CompressEvaluator(spec))


def run_on_ray(spec: SearchSpec, workers: int, *, address: str | None = None) -> list[int]:
    """Run ``workers`` search workers as Ray tasks (the study must already exist in the storage).

    Args:
        spec: the search; ``spec.threads`` CPUs are reserved per worker.
        workers: how many trials run at once across the cluster.
        address: a Ray cluster address (``auto``, ``ray://host:10001``); None uses the Ray
            instance this process already started, or starts a local one.

    Returns:
        How many trials each worker evaluated.
    """
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs Ray: pip install 'pared[search]' ray") from None
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": workers * spec.threads}))
    try:
        task = ray.remote(num_cpus=spec.threads)(_worker)
        fields = dataclasses.asdict(spec)
        return list(ray.get([task.remote(fields) for _ in range(workers)]))
    finally:
        if started:
            ray.shutdown()
