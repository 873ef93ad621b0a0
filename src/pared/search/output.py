"""What a search leaves in its folder, rewritten from the storage after every trial.

``search.json`` (the contract ``pared report`` reads), ``pareto.md``, ``recipes/trial-NNNN.yaml``
(re-runnable with ``pared compress --recipe``) and ``points/trial-NNNN/`` (the ``pared compress``
output of each Pareto point; other trials' folders are deleted once they are known to be off
the front). Every file is written atomically, so a kill at any moment leaves the previous
consistent version, and any worker can rewrite them from the shared storage.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from pared.atomic import atomic_write_text
from pared.search.objectives import pareto_indices

POINTS, RECIPES = "points", "recipes"
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def baseline_of(report: dict[str, Any]) -> dict[str, Any]:
    """The fp32 figures a trial's report measured in its own run."""
    base = report["baseline"]
    out = {"latency_ms": float(base["latency_ms"]["p50"]), "size_bytes": int(base["size_bytes"]),
           "macs": int(base["macs"]), "energy_j": float(base["energy_j"]["value"])}
    if "load_and_run_memory_bytes" in base:  # reports written before 2026-11-25 lack it
        out["memory_bytes"] = int(base["load_and_run_memory_bytes"])
    return out


def record_peers(study: optuna.Study, peers: list[dict[str, Any]]) -> None:
    """Store single-technique peer points (name + metrics) so every rewrite lists them."""
    study.set_user_attr("pared_peers", peers)


def write_outputs(study: optuna.Study, out: Path) -> dict[str, Any]:
    """Rewrite ``search.json``, ``pareto.md``, the recipes and the kept points; return the JSON."""
    from pared.search.sampler import superseded
    from pared.search.study import BASELINE_ATTR, INFO_ATTR, SPEC_ATTR

    out = Path(out)
    attrs = study.user_attrs
    spec = attrs[SPEC_ATTR]
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    finished = [t for t in trials if t.state in FINISHED]
    front = _front(finished, study.directions)
    rows = [_trial_row(t, front, out, gone) for t in finished]
    doc = {
        "task": spec["model"],
        "runtime": spec["runtime"],
        "batch": spec["batch"],
        "objectives": [{"name": n, "direction": d.name.lower()}
                       for n, d in zip(_objective_names(study), study.directions, strict=True)],
        "constraints": list(spec["constraints"]),
        "baseline": _baseline(attrs[BASELINE_ATTR], finished),
        "trials": rows,
        "peers": attrs.get("pared_peers", []),
        "sensitivity": _sensitivity_rows(attrs[INFO_ATTR].get("sensitivity", {})),
    }
    (out / RECIPES).mkdir(parents=True, exist_ok=True)
    for t in finished:
        path = out / RECIPES / f"{trial_name(t.number)}.yaml"
        if "recipe" in t.user_attrs and not path.exists():
            atomic_write_text(path, _recipe_yaml(t))
    _drop_dominated_points(out, finished, front)
    atomic_write_text(out / "search.json", json.dumps(doc, indent=2, default=_json_default))
    atomic_write_text(out / "pareto.md", pareto_markdown(doc))
    return doc


def pareto_markdown(doc: dict[str, Any]) -> str:
    """The Pareto front as a markdown table (feasible points; peers listed below it)."""
    names = [o["name"] for o in doc["objectives"]]
    extra = [k for k in ("metric_drop", "latency_ratio", "size_bytes") if k not in names]
    cols = [*names, *extra]
    lines = [f"# Pareto front: {doc['task']} ({doc['runtime']}, batch {doc['batch']})", "",
             "Constraints: " + (", ".join(doc["constraints"]) or "none"), "",
             "| trial | recipe | " + " | ".join(cols) + " | feasible |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for row in doc["trials"]:
        if row["pareto"]:
            m = row["metrics"]
            lines.append(f"| {row['number']} | {row['recipe']} | " + " | ".join(_fmt(c, m.get(c)) for c in cols)
                         + f" | {'yes' if row['feasible'] else 'no'} |")
    for peer in doc["peers"]:
        m = peer["metrics"]
        lines.append(f"| peer | {peer['name']} | " + " | ".join(_fmt(c, m.get(c)) for c in cols) + " | |")
    done = sum(r["state"] == "COMPLETE" for r in doc["trials"])
    lines += ["", f"{len(doc['trials'])} finished trials, {done} complete."]
    return "\n".join(lines) + "\n"


def _front(finished: list[FrozenTrial], directions: list[optuna.study.StudyDirection]) -> set[int]:
    """Trial numbers on the Pareto front of the feasible complete trials (of all complete ones
    when none is feasible, so the user still sees the best compromises)."""
    complete = [t for t in finished if t.state == TrialState.COMPLETE and t.values]
    pool = [t for t in complete if _feasible(t)] or complete
    dirs = [d.name.lower() for d in directions]
    return {pool[i].number for i in pareto_indices([t.values for t in pool], dirs)}


def _feasible(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE and all(v <= 0 for v in t.user_attrs.get("constraints", []))


def _trial_row(t: FrozenTrial, front: set[int], out: Path, gone: set[int]) -> dict[str, Any]:
    point = out / POINTS / trial_name(t.number)
    error = t.user_attrs.get("error")
    if t.number in gone:
        error = (error or "interrupted") + " (its params were run again)"
    return {
        "number": t.number,
        "state": t.state.name,
        "params": t.params,
        "metrics": t.user_attrs.get("metrics", {}),
        "feasible": _feasible(t),
        "pareto": t.number in front,
        "recipe": f"{RECIPES}/{trial_name(t.number)}.yaml" if "recipe" in t.user_attrs else None,
        "artefact": f"{POINTS}/{trial_name(t.number)}" if t.number in front and point.is_dir() else None,
        "error": error,
        "duration_s": t.duration.total_seconds() if t.duration else None,
    }


def _baseline(stored: dict[str, Any], finished: list[FrozenTrial]) -> dict[str, Any]:
    """fp32 figures: task metrics from before the trials; latency, energy and memory the median
    over the trials' runs."""
    runs = [t.user_attrs["baseline"] for t in finished if "baseline" in t.user_attrs]
    out: dict[str, Any] = {"metrics": stored["metrics"], "latency_ms": None, "size_bytes": None, "macs": None, "energy_j": None}
    if runs:
        out["latency_ms"] = statistics.median(r["latency_ms"] for r in runs)
        out.update({k: runs[0][k] for k in ("size_bytes", "macs")})
        out["energy_j"] = statistics.median(r["energy_j"] for r in runs)
        memory = [r["memory_bytes"] for r in runs if "memory_bytes" in r]
        if memory:
            out["memory_bytes"] = statistics.median(memory)
    return out


def _drop_dominated_points(out: Path, finished: list[FrozenTrial], front: set[int]) -> None:
    # Only folders of trials known to be finished and off the front: a running trial's folder,
    # or one another worker just finished, is left alone.
    for t in finished:
        point = out / POINTS / trial_name(t.number)
        if t.number not in front and point.is_dir():
            shutil.rmtree(point, ignore_errors=True)


def _recipe_yaml(t: FrozenTrial) -> str:
    params = ", ".join(f"{k}={v}" for k, v in t.params.items())
    doc = {"name": trial_name(t.number), "description": f"pared search trial {t.number}: {params}",
           "steps": t.user_attrs["recipe"]}
    return yaml.safe_dump(doc, sort_keys=False)


def _objective_names(study: optuna.Study) -> list[str]:
    from pared.search.objectives import parse_objectives
    from pared.search.study import BASELINE_ATTR, SPEC_ATTR

    base = study.user_attrs[BASELINE_ATTR]
    return [o.name for o in parse_objectives(study.user_attrs[SPEC_ATTR]["objectives"], list(base["metrics"]), base["primary"])]


def _sensitivity_rows(sens: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {group: dict(values) for group, values in sens.items()}


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "size_bytes":
        return f"{value / 1e6:.3f} MB"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
