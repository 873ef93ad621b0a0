"""A cheap, deterministic trial evaluator for the search's storage tests (kill/resume, PostgreSQL).

The search machinery (storage, sampler, retries, outputs) is what those tests check; a real
``pared compress`` per trial would make three SIGKILL rounds take minutes. The metrics are a
fixed function of the recipe, so two runs agree exactly when they ran the same trials. Search
quality on real models is tested with the digits task in test_search.py.

Run as a script it is one search worker: ``python search_synthetic.py OUT [--storage URL]
[--join|--resume] [--trials N] [--seed S] [--sleep SECONDS]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pared.atomic import atomic_directory, atomic_write_text
from pared.config import config_to_dict
from pared.search.space import ModelInfo, model_info
from pared.tasks.digits import DigitsCNN


class SyntheticEvaluator:
    """Metrics derived from a hash of the recipe; ``sleep`` seconds per trial."""

    primary_metric = "accuracy"

    def __init__(self, sleep: float = 0.0, faults: dict[str, BaseException | float] | None = None) -> None:
        """``faults``: a recipe whose JSON contains the key raises the exception, or reports
        that float (NaN, say) as its accuracy."""
        self.sleep, self.faults, self.calls = sleep, faults or {}, 0

    def baseline_metrics(self) -> dict[str, float]:
        return {"accuracy": 99.0}

    def model_info(self, *, sensitivity: bool) -> ModelInfo:
        sens = {"features.0": {"int8": 0.4, "prune50": 2.0}} if sensitivity else None
        return model_info("digits", DigitsCNN(), trainable=True, sensitivity=sens)

    def run(self, recipe, out_dir: Path, on_metrics) -> dict[str, Any]:
        self.calls += 1
        steps = [config_to_dict(c) for c in recipe]
        text = json.dumps(steps, sort_keys=True)
        h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        acc = 99.0 - 3.0 * h
        for key, fault in self.faults.items():
            if key in text:
                if isinstance(fault, BaseException):
                    raise fault
                acc = fault
        time.sleep(self.sleep)
        metrics = {"baseline": {"accuracy": 99.0}, "compressed": {"accuracy": acc}}
        if on_metrics is not None:
            on_metrics(metrics)
        ratio = 0.05 + 0.5 * (1.0 - h)
        side = lambda ms, size, m: {"metrics": m, "latency_ms": {"p50": ms}, "size_bytes": size,  # noqa: E731
                                    "macs": 1000, "energy_j": {"value": ms * 1e-3},
                                    "load_and_run_memory_bytes": 3 * size}
        report = {"primary_metric": "accuracy", "task": "digits",
                  "baseline": side(1.0, 100_000, metrics["baseline"]),
                  "compressed": side(ratio, int(100_000 * ratio), metrics["compressed"]),
                  "ratios": {"latency_p50": ratio, "size": ratio, "energy": ratio},
                  "recipe": {"name": out_dir.name, "steps": steps}}
        with atomic_directory(out_dir, overwrite=True) as tmp:
            atomic_write_text(tmp / "report.json", json.dumps(report))
        return report


def main() -> None:
    from pared.search import SearchSpec, search

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--storage")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--join", action="store_true")
    args = parser.parse_args()
    spec = SearchSpec(model="digits", out=args.out, trials=args.trials, seed=args.seed, sampler=args.sampler,
                      storage=args.storage, constraints=("metric_drop <= 2",))
    evaluator = SyntheticEvaluator(args.sleep)
    search(spec, evaluator=evaluator, resume=args.resume, join=args.join)
    print(json.dumps({"calls": evaluator.calls}))


if __name__ == "__main__":
    main()
