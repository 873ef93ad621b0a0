"""pared search: bad input refused before any trial, failing trials recorded, outputs, a real
digits search, and resume after SIGKILL proposing exactly what an uninterrupted run does."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from pared.errors import EnvironmentIOError, InputRefused, UsageError
from pared.quant import Int8Config
from pared.recipe import load_recipe
from pared.search import SearchSpec, register_space, registered_spaces, search
from pared.search import space as space_module
from pared.search.cli_support import parse_duration
from pared.search.objectives import dominates, pareto_indices, parse_constraint, parse_objectives
from pared.search.sampler import logical_index, superseded
from pared.search.study import load_study, open_storage

sys.path.insert(0, str(Path(__file__).parent))
from search_synthetic import SyntheticEvaluator  # noqa: E402

WORKER = Path(__file__).parent / "search_synthetic.py"


def spec(tmp_path: Path, **kw) -> SearchSpec:
    base = dict(model="digits", out=str(tmp_path / "s"), trials=6, constraints=("metric_drop <= 2",))
    return SearchSpec(**{**base, **kw})


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, message", [
    ({"techniques": ()}, "empty search space"),
    ({"techniques": ("prune_transformer",)}, "empty search space"),  # applies to no CNN
    ({"techniques": ("no_such",)}, "unknown technique"),
    ({"objectives": ("accurcy",)}, "unknown metric"),
    ({"objectives": ()}, "at least one objective"),
    ({"constraints": ("latency_ratoi <= 0.2",)}, "unknown metric"),
    ({"constraints": ("latency_ratio < 0.2",)}, "is not"),
    ({"constraints": ("size_bytes <= 5%",)}, "only meaningful for metric_drop"),
    ({"trials": 0}, "trial budget must be >= 1"),
    ({"trials": None, "time_budget_s": 0.0}, "time budget must be > 0"),
    ({"trials": None}, "give a budget"),
    ({"sampler": "grid"}, "unknown sampler"),
])
def test_bad_input_is_refused_before_any_trial(tmp_path, kw, message):
    evaluator = SyntheticEvaluator()
    with pytest.raises(UsageError, match=message):
        search(spec(tmp_path, **kw), evaluator=evaluator)
    assert evaluator.calls == 0


def test_unreachable_storage_is_a_clear_error_before_any_trial(tmp_path):
    evaluator = SyntheticEvaluator()
    url = "postgresql://pared:secret@127.0.0.1:1/pared"  # nothing listens on port 1
    with pytest.raises(EnvironmentIOError, match=r"cannot open the study storage postgresql://pared:\*\*\*@127.0.0.1:1"):
        search(spec(tmp_path, storage=url), evaluator=evaluator)
    assert evaluator.calls == 0


def test_existing_search_needs_resume_or_overwrite(tmp_path):
    search(spec(tmp_path, trials=1), evaluator=SyntheticEvaluator())
    with pytest.raises(UsageError, match="already holds a search"):
        search(spec(tmp_path, trials=1), evaluator=SyntheticEvaluator())
    with pytest.raises(UsageError, match=r"different search \(seed: 0 -> 1\)"):
        search(spec(tmp_path, trials=2, seed=1), evaluator=SyntheticEvaluator(), resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no search"):
        search(spec(tmp_path, out=str(tmp_path / "other")), evaluator=SyntheticEvaluator(), overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()
    with pytest.raises(UsageError, match="nothing to resume"):
        search(spec(tmp_path, out=str(tmp_path / "empty")), evaluator=SyntheticEvaluator(), resume=True)


def test_objectives_constraints_and_durations():
    objs = parse_objectives(["metric", "latency", "size"], ["accuracy"], "accuracy")
    assert [(o.name, o.direction) for o in objs] == [
        ("accuracy", "maximize"), ("latency_ratio", "minimize"), ("size_bytes", "minimize")]
    rel = parse_constraint("metric_drop <= 1%", ["accuracy"])
    assert rel.violation({"metric_drop": 0.5}, baseline=99.0) < 0 < rel.violation({"metric_drop": 1.5}, baseline=99.0)
    assert parse_constraint("accuracy >= 98", ["accuracy"]).violation({"accuracy": 97.0}, 99.0) == 1.0
    assert parse_duration("15m") == 900 and parse_duration("90s") == 90 and parse_duration("1h") == 3600
    with pytest.raises(UsageError):
        parse_duration("soon")
    dirs = ["maximize", "minimize"]
    assert dominates([1.0, 0.1], [0.9, 0.2], dirs) and not dominates([1.0, 0.1], [1.0, 0.1], dirs)
    assert pareto_indices([[1.0, 0.5], [0.9, 0.1], [0.8, 0.6], [1.0, 0.5]], dirs) == [0, 1, 3]



def test_memory_is_an_objective_and_a_constraint(tmp_path):
    objs = parse_objectives(["metric", "memory"], ["accuracy"], "accuracy")
    assert [(o.name, o.direction) for o in objs] == [("accuracy", "maximize"), ("memory_bytes", "minimize")]
    doc = search(spec(tmp_path, trials=8, sampler="random", objectives=("metric", "memory"),
                      constraints=("memory_bytes <= 90000",)), evaluator=SyntheticEvaluator())
    done = [r for r in doc["trials"] if r["state"] == "COMPLETE"]
    assert done
    for r in done:  # the synthetic report's memory is 3x its file size
        assert r["metrics"]["memory_bytes"] == 3 * r["metrics"]["size_bytes"]
        assert r["feasible"] == (r["metrics"]["memory_bytes"] <= 90_000)
    assert {r["feasible"] for r in done} == {True, False}, "the bound should split this sample"

# ---------------------------------------------------------------------------- extension


def test_a_technique_joins_the_search_by_registering_its_space(tmp_path):
    @register_space("test_int8_dynamic_only", slot="test_slot", order=45)
    def _space(trial, info):
        return Int8Config(mode="dynamic", calibration=trial.suggest_categorical("t.cal", ["minmax"]))

    try:
        doc = search(spec(tmp_path, trials=3, techniques=("test_int8_dynamic_only",)), evaluator=SyntheticEvaluator())
        used = [load_recipe(str(tmp_path / "s" / t["recipe"])) for t in doc["trials"] if t["recipe"]]
        assert used and all(r == [Int8Config(mode="dynamic")] for r in used)
        assert all(t["params"]["test_slot"] in ("none", "test_int8_dynamic_only") for t in doc["trials"])
    finally:
        space_module._SPACES.pop("test_int8_dynamic_only")
    assert "test_int8_dynamic_only" not in registered_spaces()


# ---------------------------------------------------------------------------- trials and outputs


def test_a_combination_that_does_not_fit_the_model_is_pruned_as_infeasible_not_failed(tmp_path):
    """TPE ignores FAIL trials and would sample the same dead region again (1,269 of 1,324
    trials in a 15-minute digits run did); PRUNED trials count against their region."""
    from pared.errors import UsageError

    faults = {'"technique": "cluster"': UsageError("cluster: 128 clusters for layer 'a', which has only 72 weights")}
    doc = search(spec(tmp_path, trials=10, sampler="random", seed=3, techniques=("cluster", "int8")),
                 evaluator=SyntheticEvaluator(faults=faults))
    clustered = [r for r in doc["trials"] if r["params"].get("quantize") == "cluster"]
    assert clustered, "the seed must sample the cluster slot at least once"
    assert all(r["state"] == "PRUNED" and r["error"].startswith("infeasible: UsageError: cluster: 128 clusters") for r in clustered)
    assert not [r for r in doc["trials"] if r["state"] == "FAIL"]


def test_failing_nan_and_oom_trials_are_recorded_and_the_study_goes_on(tmp_path):
    faults = {'"technique": "cluster"': RuntimeError("boom"), '"technique": "weight_only"': float("nan"),
              '"mode": "static"': MemoryError()}
    # Only dynamic int8 escapes the faults; no constraint, so its synthetic accuracy (a hash of the
    # recipe JSON, which changes whenever a config gains a field) cannot prune it.
    doc = search(spec(tmp_path, trials=14, sampler="random", seed=3, techniques=("cluster", "weight_only", "int8"),
                      constraints=()),
                 evaluator=SyntheticEvaluator(faults=faults))
    rows = doc["trials"]
    assert len(rows) == 14
    by_state = {s: [r for r in rows if r["state"] == s] for s in ("COMPLETE", "FAIL", "PRUNED")}
    failed = {r["error"].split(":")[0] for r in by_state["FAIL"]}
    assert failed >= {"RuntimeError", "FloatingPointError"}, failed
    assert all(r["params"].get("quantize") != "weight_only" for r in by_state["COMPLETE"])  # NaN never COMPLETE
    assert any("smaller --batch" in r["error"] for r in by_state["FAIL"] if r["error"].startswith("MemoryError"))
    assert by_state["COMPLETE"], "the study went on past the failures"
    # contract: every finished trial has these keys; Pareto points are feasible and non-dominated
    for r in rows:
        assert set(r) >= {"number", "state", "params", "metrics", "feasible", "pareto", "recipe", "artefact", "error"}
    front = [r for r in rows if r["pareto"]]
    assert front and all(r["feasible"] for r in front)
    names = [o["name"] for o in doc["objectives"]]
    assert names == ["accuracy", "latency_ratio"]
    for r in front:
        assert (tmp_path / "s" / r["artefact"] / "report.json").is_file()
        assert load_recipe(str(tmp_path / "s" / r["recipe"]))  # re-runnable with pared compress
    off_front = [r for r in by_state["COMPLETE"] if not r["pareto"]]
    assert all(not (tmp_path / "s" / "points" / f"trial-{r['number']:04d}").exists() for r in off_front)
    assert "| trial | recipe | accuracy | latency_ratio |" in (tmp_path / "s" / "pareto.md").read_text()


def test_constraint_prunes_before_timing(tmp_path):
    doc = search(spec(tmp_path, trials=10, sampler="random", constraints=("metric_drop <= 0.5",)),
                 evaluator=SyntheticEvaluator())
    pruned = [r for r in doc["trials"] if r["state"] == "PRUNED" and "broken" in (r["error"] or "")]
    assert pruned and all(r["metrics"]["metric_drop"] > 0.5 for r in pruned)
    assert all(r["metrics"]["metric_drop"] <= 0.5 for r in doc["trials"] if r["feasible"])


def test_real_digits_search_then_resume_with_a_bigger_budget(tmp_path):
    s = spec(tmp_path, trials=1, techniques=("int8",), runtime="torch", rounds=2, batch=4,
             sensitivity=True, constraints=("metric_drop <= 1",))
    torch.manual_seed(0)
    doc = search(s)
    assert doc["baseline"]["metrics"]["accuracy"] > 95
    assert set(doc["sensitivity"]) >= {"features.0", "classifier.3"}
    s.trials = 2
    doc = search(s, resume=True)
    assert [r["number"] for r in doc["trials"]] == [0, 1]
    done = [r for r in doc["trials"] if r["state"] == "COMPLETE"]
    assert done, doc["trials"]
    for r in done:
        m = r["metrics"]
        assert m["accuracy"] > 90 and m["size_bytes"] > 0 and m["latency_ratio"] > 0 and math.isfinite(m["energy_j"])
    point = next(r for r in done if r["pareto"])
    report = json.loads((tmp_path / "s" / point["artefact"] / "report.json").read_text())
    assert report["compressed"]["metrics"]["accuracy"] == point["metrics"]["accuracy"]


# ---------------------------------------------------------------------------- kill and resume


def _finished(out: Path, storage: str | None = None) -> set[tuple[str, str, str]]:
    s = SearchSpec(model="digits", out=str(out), trials=8, constraints=("metric_drop <= 2",), storage=storage)
    study = load_study(s, open_storage(s, fresh=False, overwrite=False))
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    return {(t.state.name, json.dumps(t.params, sort_keys=True), json.dumps(t.values))
            for t in trials if t.number not in gone and t.state.is_finished()}


def _worker(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(WORKER), str(out), "--trials", "8", "--sleep", "0.2", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _n_done(out: Path) -> int:
    try:
        return len(json.loads((out / "search.json").read_text())["trials"])
    except (OSError, ValueError):
        return 0


def test_sigkill_three_times_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Kills at random moments (the second by Ctrl-C: the trial is marked FAIL and enqueued on the
    way out), each followed by --resume; the finished trials equal an uninterrupted run's."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _worker(whole)
    rng = random.Random(7)
    proc = _worker(killed)
    for round_, sig in enumerate((signal.SIGKILL, signal.SIGINT, signal.SIGKILL)):
        start = _n_done(killed)
        deadline = time.monotonic() + 60
        while _n_done(killed) <= start and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside a trial, or between two
        assert proc.poll() is None, f"the worker ended before kill {round_ + 1}: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) != 0
        proc = _worker(killed, "--resume")
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()[-2000:]
    a, b = _finished(whole), _finished(killed)
    assert len(a) == 8
    assert a == b
    study_trials = json.loads((killed / "search.json").read_text())["trials"]
    numbers = [t["number"] for t in study_trials]
    assert len(numbers) == len(set(numbers))
    assert any("run again" in (t["error"] or "") for t in study_trials)  # the interrupted trials


def test_ctrl_c_prints_the_exact_resume_command(tmp_path, monkeypatch, capsys):
    import pared.search
    from pared import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pared.search, "search", interrupted)
    argv = ["pared", "search", "--model", "digits", "--out", str(tmp_path / "s"), "--constraint", "metric_drop <= 0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert f"pared search --model digits --out {tmp_path / 's'} --constraint 'metric_drop <= 0.5' --resume" in err


def test_logical_index_skips_retried_trials():
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    t = [optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, values=[1.0],
                                   system_attrs={"retry_history": [1]} if n == 3 else None) for n in range(4)]
    for number, trial in enumerate(t):  # trial 1 was killed and rerun as trial 3
        trial.number = number
    assert [logical_index(t, n) for n in range(4)] == [0, 1, 1, 2]


def test_sensitivity_scan_is_skipped_when_it_would_eat_the_time_budget(tmp_path, capsys):
    from pared.search.space import model_info
    from pared.search.study import _sensitivity_affordable
    from pared.tasks.digits import DigitsCNN

    info = model_info("digits", DigitsCNN(), trainable=True)  # 5 groups: 10 evaluations
    assert _sensitivity_affordable(spec(tmp_path, time_budget_s=None), info, one_eval_s=60.0)
    assert _sensitivity_affordable(spec(tmp_path, time_budget_s=600.0), info, one_eval_s=6.0)
    assert not _sensitivity_affordable(spec(tmp_path, time_budget_s=600.0), info, one_eval_s=6.1)
    assert "sensitivity scan skipped" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test's own bare study.ask()
def test_a_dead_workers_trial_is_failed_after_the_grace_period_and_retried(tmp_path, monkeypatch):
    import pared.search.study as study_module
    from pared.search.study import prepare, run_worker

    monkeypatch.setattr(study_module, "HEARTBEAT_S", 1)
    monkeypatch.setattr(study_module, "GRACE_S", 2)
    s = spec(tmp_path, trials=3)
    study = prepare(s, evaluator=SyntheticEvaluator(), join=True)
    dead = study.ask()  # a worker that took a trial, beat once, and died
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3)
    run_worker(s, study, SyntheticEvaluator())  # a live worker joining the study
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert dead.number in superseded(trials)
    retry = [t for t in trials if t.system_attrs.get("retry_history") == [dead.number]]
    assert len(retry) == 1 and retry[0].state.is_finished()
    assert sum(t.number not in superseded(trials) for t in trials) == 3


# ---------------------------------------------------------------------------- the study store


def _set_store_schema(db: Path, revision: str, optuna_version: str) -> None:
    """Make ``db`` look as if another Optuna version had set up its tables."""
    import sqlite3

    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = ?", (revision,))
        con.execute("UPDATE version_info SET library_version = ?", (optuna_version,))


@pytest.mark.parametrize("revision, made_by, fix", [
    ("v99.0.0.a", "99.0.0", "it is newer: install optuna 99.0.0 or later"),
    ("v3.0.0.d", "3.0.0", "it is older: back it up, then migrate it with `optuna storage upgrade --storage sqlite:///"),
])
def test_store_from_another_optuna_version_is_refused_naming_both(tmp_path, revision, made_by, fix):
    search(spec(tmp_path, trials=1), evaluator=SyntheticEvaluator())
    _set_store_schema(tmp_path / "s" / "study.db", revision, made_by)
    evaluator = SyntheticEvaluator()
    with pytest.raises(UsageError) as info:
        search(spec(tmp_path, trials=2), evaluator=evaluator, resume=True)
    message = str(info.value)
    assert f"set up by optuna {made_by}, this pared runs optuna {optuna.__version__}" in message
    assert fix in message and info.value.exit_code == 2 and evaluator.calls == 0


def test_study_from_another_pared_major_version_is_refused_naming_both(tmp_path):
    from pared import __version__
    from pared.search.study import VERSION_ATTR

    search(spec(tmp_path, trials=1), evaluator=SyntheticEvaluator())
    s = spec(tmp_path, trials=2)
    study = optuna.load_study(study_name=s.study_name, storage=s.storage_url())
    assert study.user_attrs[VERSION_ATTR] == __version__
    study.set_user_attr(VERSION_ATTR, "7.0.0")
    with pytest.raises(UsageError, match=rf"made by pared 7\.0\.0, this is pared {__version__} \(another major"):
        search(s, evaluator=SyntheticEvaluator(), resume=True)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header only"])
def test_corrupt_sqlite_store_is_refused_naming_the_file(tmp_path, damage, monkeypatch, capsys):
    from pared import cli

    search(spec(tmp_path, trials=2), evaluator=SyntheticEvaluator())
    db = tmp_path / "s" / "study.db"
    data = db.read_bytes()
    db.write_bytes({"garbage": os.urandom(len(data)), "truncated": data[: len(data) // 2],
                    "header only": data[:100]}[damage])
    evaluator = SyntheticEvaluator()
    with pytest.raises(InputRefused, match=f"study store {db} is corrupt or not an SQLite database"):
        search(spec(tmp_path, trials=3), evaluator=evaluator, resume=True)
    assert evaluator.calls == 0
    # through the CLI: one line, exit 3, no traceback (no model is loaded before the check)
    argv = ["pared", "search", "--model", "digits", "--out", str(tmp_path / "s"), "--resume"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(cli.warnings, "formatwarning", cli.warnings.formatwarning)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 3 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: study store {db} is corrupt")


_SLOW_SHUTDOWN = """
import sys, time
sys.path.insert(0, {tests!r})
from search_synthetic import SyntheticEvaluator
import pared.search.study as study

class Marked(SyntheticEvaluator):
    def run(self, recipe, out_dir, on_metrics):
        print("in trial", file=sys.stderr, flush=True)
        return super().run(recipe, out_dir, on_metrics)

real_retry = study.retry_trial
def slow_retry(*args, **kwargs):  # the first Ctrl-C's shutdown, made slow enough to interrupt
    print("shutting down", file=sys.stderr, flush=True)
    time.sleep(60)
    return real_retry(*args, **kwargs)

study.retry_trial = slow_retry
study.CompressEvaluator = lambda spec: Marked(sleep=60)
from pared import cli
sys.argv = ["pared", "search", "--model", "digits", "--out", {out!r}, "--trials", "3",
            "--constraint", "metric_drop <= 2"]
cli.main()
"""


def test_second_ctrl_c_during_the_shutdown_exits_at_once_leaving_a_store_that_resumes(tmp_path):
    import queue
    import threading

    out = tmp_path / "s"
    code = _SLOW_SHUTDOWN.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen: list[str] = []

    def wait_for(marker: str) -> None:
        while not seen or marker not in seen[-1]:
            try:
                seen.append(lines.get(timeout=60))
            except queue.Empty:
                proc.kill()
                pytest.fail(f"no {marker!r} from the search: {''.join(seen)[-2000:]}")

    try:
        wait_for("in trial")
        proc.send_signal(signal.SIGINT)
        wait_for("shutting down")
        second = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert time.monotonic() - second < 10  # not the 60 s the shutdown would have taken
    finally:
        proc.kill()
    time.sleep(0.2)
    err = "".join(seen) + "".join(lines.get() for _ in range(lines.qsize()))
    assert "Traceback" not in err and "--resume" in err
    # the store loads; the interrupted trial (RUNNING, no retry yet) is failed and retried on resume
    search(spec(tmp_path, trials=3), evaluator=SyntheticEvaluator(), resume=True)
    study = load_study(spec(tmp_path), open_storage(spec(tmp_path), fresh=False, overwrite=False))
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == optuna.trial.TrialState.FAIL and 0 in superseded(trials)
    assert sum(t.state.is_finished() and t.number not in superseded(trials) for t in trials) == 3


def test_resume_reads_no_trial_artefact_and_clears_a_half_written_one(tmp_path):
    """Case 33: a search keeps no checkpoint to fall back to. Trial state lives in the store; a
    trial's artefact folder is written atomically and never read back by --resume."""
    from pared.atomic import TMP_PREFIX

    search(spec(tmp_path, trials=2), evaluator=SyntheticEvaluator())
    points = tmp_path / "s" / "points"
    half = points / f"{TMP_PREFIX}999999999-x"  # what a trial killed mid-write leaves (writer gone)
    half.mkdir()
    (half / "report.json").write_text('{"trunc')
    reports = list(points.glob("trial*/report.json"))
    assert reports
    for report in reports:
        report.write_bytes(report.read_bytes()[:5])  # every finished point damaged
    doc = search(spec(tmp_path, trials=4), evaluator=SyntheticEvaluator(), resume=True)
    # Reading a damaged report back would fail a trial; a constraint may still prune one (the
    # synthetic metrics are a hash of the recipe).
    assert len(doc["trials"]) == 4 and all(t["state"] in ("COMPLETE", "PRUNED") for t in doc["trials"])
    assert any(t["state"] == "COMPLETE" for t in doc["trials"])
    assert not half.exists()


# ---------------------------------------------------------------------------- store: full disk, contention


def _cap_sqlite_growth(monkeypatch, db: Path) -> None:
    """New SQLite connections may not grow ``db`` past its current size: the next write that
    needs a page fails with SQLite's own SQLITE_FULL ("database or disk is full"), as on a full
    disk, and SQLite rolls that transaction back."""
    import contextlib
    import sqlite3
    import sqlite3.dbapi2  # what SQLAlchemy connects through

    with contextlib.closing(sqlite3.connect(db)) as con:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
    real = sqlite3.dbapi2.connect

    def capped(*args, **kwargs):
        con = real(*args, **kwargs)
        con.execute(f"PRAGMA max_page_count = {pages}")
        return con

    monkeypatch.setattr(sqlite3.dbapi2, "connect", capped)


def test_full_disk_under_the_store_is_one_line_exit_5_and_the_store_resumes(tmp_path, monkeypatch, capsys):
    """Case 34 for the search store."""
    import pared.search.study as study_module
    from pared import cli

    search(spec(tmp_path, trials=2), evaluator=SyntheticEvaluator())
    db = tmp_path / "s" / "study.db"
    with monkeypatch.context() as full:
        _cap_sqlite_growth(full, db)
        full.setattr(study_module, "CompressEvaluator", lambda _spec: SyntheticEvaluator())
        full.setattr(sys, "argv", ["pared", "search", "--model", "digits", "--out", str(tmp_path / "s"),
                                   "--constraint", "metric_drop <= 2", "--trials", "60", "--resume"])
        full.setattr(cli.warnings, "formatwarning", cli.warnings.formatwarning)
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 5, err
    assert "Traceback" not in err and "Exception in thread" not in err
    errors = [line for line in err.splitlines() if line.startswith(("error", "internal error"))]
    assert errors == [err.strip().splitlines()[-1]]
    assert errors[0].startswith(f"error: no space left writing {db} ")
    # the store loads; a resume fails the trial the full disk interrupted, retries it, and finishes
    s = spec(tmp_path)
    stopped = len(load_study(s, open_storage(s, fresh=False, overwrite=False)).get_trials(deepcopy=False))
    assert 2 < stopped < 60
    doc = search(spec(tmp_path, trials=stopped + 2), evaluator=SyntheticEvaluator(), resume=True)
    trials = load_study(s, open_storage(s, fresh=False, overwrite=False)).get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials)
    assert sum(t.number not in superseded(trials) for t in trials) == stopped + 2
    assert len(doc["trials"]) >= stopped + 2


def test_eight_workers_on_one_sqlite_study_lose_no_trial_and_run_none_twice(tmp_path):
    """Case 37, contention: 8 threads, each with its own storage and SQLite connections (SQLite
    locks the file for them as for processes), wait on each other's locks
    (``SQLITE_BUSY_TIMEOUT_S``); with no wait, they fail with "database is locked"."""
    import threading

    from pared.search.output import trial_name
    from pared.search.study import prepare, run_worker

    s = spec(tmp_path, trials=10, sampler="random")
    prepare(s, evaluator=SyntheticEvaluator())
    ran: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    class Recording(SyntheticEvaluator):
        def run(self, recipe, out_dir, on_metrics):
            with lock:
                ran.append(out_dir.name)
            return super().run(recipe, out_dir, on_metrics)

    def worker() -> None:
        try:
            run_worker(s, load_study(s, open_storage(s, fresh=False, overwrite=False)), Recording())
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors
    trials = load_study(s, open_storage(s, fresh=False, overwrite=False)).get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]  # none lost mid-way
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len(ran) == len(set(ran))  # no trial ran twice ...
    assert set(ran) == {trial_name(t.number) for t in trials if "recipe" in t.user_attrs}  # ... or not at all
    assert 10 <= len(trials) <= 10 + 7  # each extra worker may start one last trial


def test_int8_space_offers_attention_only_for_hugging_face_attention():
    import optuna

    pytest.importorskip("transformers")
    from pared.quant import Int8Config
    from pared.search.space import model_info
    from pared.search.techniques import int8_space
    from pared.tasks.digits import DigitsCNN
    from pared.testing.bert import tiny_bert

    bert, cnn = model_info("tokens", tiny_bert(2), trainable=True), model_info("digits", DigitsCNN(), trainable=True)
    assert bert.hf_attention and not cnn.hf_attention
    params = {"int8.mode": "static", "int8.smoothquant": False, "int8.calibration": "minmax", "int8.attention": True,
              "int8.attention_float": 1}
    steps = int8_space(optuna.trial.FixedTrial(params), bert)
    assert isinstance(steps[-1], Int8Config) and steps[-1].attention and steps[-1].attention_float == 1
    off = int8_space(optuna.trial.FixedTrial({**params, "int8.attention": False}), bert)
    assert not off[-1].attention and off[-1].attention_float == 0
    cnn_steps = int8_space(optuna.trial.FixedTrial({**params, "int8.float.features.0": False}), cnn)
    assert not cnn_steps[-1].attention
