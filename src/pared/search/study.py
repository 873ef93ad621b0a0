"""The search loop: an Optuna study whose trials are ``pared compress`` jobs.

State lives in the Optuna storage (SQLite ``DIR/study.db`` by default, or any RDB URL such as
PostgreSQL for many workers), so a search survives being killed:

- a finished trial is never rerun: ``--resume`` and ``--join`` load the study;
- ``--resume`` (the previous run is dead) marks its RUNNING trials FAIL and enqueues their params
  again; live workers sharing a study find dead workers' trials by heartbeat instead;
- a trial that raises, runs out of memory (``MemoryError``) or yields a NaN objective is FAIL with
  the reason recorded, and the study goes on;
- a store from another Optuna schema or another pared major version is refused naming both
  (exit 2), and a damaged SQLite file is refused naming it (exit 3), before any trial runs;
- a full disk under the store ends the search with one line, ``no space left writing <store>``
  (exit 5); the failed write is rolled back, so the store loads and ``--resume`` goes on;
- SQLite connections wait ``SQLITE_BUSY_TIMEOUT_S`` for a lock other workers hold (a few local
  workers; many workers belong on PostgreSQL).

Determinism: see ``pared.search.sampler``: a resumed search proposes the same params as an
uninterrupted one with the same seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import math
import os
import re
import shutil
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pared import __version__
from pared.config import config_to_dict
from pared.errors import EnvironmentIOError, InputRefused, UsageError
from pared.search import output
from pared.search.evaluate import CompressEvaluator, Evaluator
from pared.search.objectives import (
    Constraint,
    Objective,
    metrics_from_report,
    parse_constraint,
    parse_objectives,
)
from pared.search.sampler import PerTrialSeedSampler, _quiet, superseded
from pared.search.space import ModelInfo, build_recipe, select_spaces

DB_FILE = "study.db"
HEARTBEAT_S = 10
GRACE_S = 30  # a RUNNING trial without a heartbeat for this long belonged to a dead worker
MAX_RETRY = 3  # a trial killed this many times (an OOM kill, say) is left FAIL
SAMPLERS = ("tpe", "nsga2", "random")
SPEC_ATTR, BASELINE_ATTR, INFO_ATTR = "pared_spec", "pared_baseline", "pared_info"
VERSION_ATTR = "pared_version"  # the pared that created the study; resuming across majors is refused
# How long an SQLite connection waits for a lock that another worker holds before it fails with
# "database is locked". Every store write is one short transaction, so a few local workers queue
# well inside it; with no wait, 8 workers on one study fail (tests/test_search.py). Many workers:
# PostgreSQL (docs/search.md).
SQLITE_BUSY_TIMEOUT_S = 60

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclasses.dataclass
class SearchSpec:
    """Everything that defines a search (``pared search`` options, one to one).

    The fields in ``IDENTITY`` define the study: resuming with any of them changed is refused.
    """

    model: str
    out: str
    objectives: tuple[str, ...] = ("metric", "latency")
    constraints: tuple[str, ...] = ()
    techniques: tuple[str, ...] | None = None
    trials: int | None = 50
    time_budget_s: float | None = None
    seed: int = 0
    sampler: str = "tpe"
    storage: str | None = None
    study_name: str = "pared"
    runtime: str = "auto"
    threads: int = 2
    batch: int = 8
    rounds: int = 20
    sensitivity: bool = True
    weights: str | None = None
    input_shape: str | None = None
    trust_pickle: bool = False

    IDENTITY = ("model", "objectives", "constraints", "techniques", "seed", "sampler", "runtime", "batch")

    def validate(self) -> None:
        """Raise ``UsageError`` for a budget, sampler or size that cannot work."""
        if self.trials is None and self.time_budget_s is None:
            raise UsageError("give a budget: a trial count, a time budget, or both")
        if self.trials is not None and self.trials < 1:
            raise UsageError(f"the trial budget must be >= 1, got {self.trials}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UsageError(f"the time budget must be > 0, got {self.time_budget_s}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}")
        if min(self.threads, self.batch, self.rounds) < 1:
            raise UsageError("threads, batch and rounds must be >= 1")
        if self.techniques is not None and not self.techniques:
            raise UsageError("empty search space: --techniques names no technique")

    def identity(self) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in self.IDENTITY}

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out) / DB_FILE).resolve()}"


def search(spec: SearchSpec, *, evaluator: Evaluator | None = None, resume: bool = False,
           join: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume, or join) a search; returns the final ``search.json`` content.

    Args:
        spec: the search.
        evaluator: how a trial is measured (default: ``pared compress`` of ``spec.model``).
        resume: continue a stopped search: its RUNNING trials are retried, finished ones kept.
        join: work on a study other workers share (created if absent); leaves their trials be.
        overwrite: delete an existing search in ``spec.out`` (and its study) first.

    Raises:
        UsageError: bad spec, objective, constraint or space, or a resume that changes the search.
        EnvironmentIOError: the storage cannot be opened.
    """
    evaluator = evaluator or CompressEvaluator(spec)
    study = prepare(spec, evaluator=evaluator, resume=resume, join=join, overwrite=overwrite)
    run_worker(spec, study, evaluator)
    with store_writes(spec):
        return output.write_outputs(study, Path(spec.out))


def prepare(spec: SearchSpec, *, evaluator: Evaluator | None = None, resume: bool = False,
            join: bool = False, overwrite: bool = False) -> optuna.Study:
    """Check everything, then create or load the study; on ``resume`` retry its RUNNING trials.

    Every bad input (spec, objective, constraint, empty space, unreachable storage) is refused
    here, before any trial runs.
    """
    spec.validate()
    out = Path(spec.out)
    if resume and join:
        raise UsageError("--resume and --join are exclusive (resume: the old run is dead; join: it is not)")
    if resume and spec.storage is None and not (out / DB_FILE).is_file():
        raise UsageError(f"nothing to resume: {out / DB_FILE} does not exist")
    storage = open_storage(spec, fresh=not (resume or join), overwrite=overwrite)
    evaluator = evaluator or CompressEvaluator(spec)
    with store_writes(spec):
        study = _load_or_create(spec, storage, evaluator, resume=resume, join=join)
        (out / output.POINTS).mkdir(parents=True, exist_ok=True)
        if resume:
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                # Retry first: a kill between the two steps then leaves a RUNNING trial whose retry
                # exists (not enqueued twice), never a FAIL without one.
                retry_trial(study, trial)
                reason = "interrupted: its process died"
                storage.set_trial_user_attr(trial._trial_id, "error", reason)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return study


def run_worker(spec: SearchSpec, study: optuna.Study, evaluator: Evaluator) -> int:
    """Run trials until the budget is spent; on Ctrl-C retry the running trial later, then re-raise.

    Returns:
        How many trials this worker evaluated (got as far as running their recipe).
    """
    worker = _Worker(spec, study, evaluator)
    deadline = None if spec.time_budget_s is None else time.monotonic() + spec.time_budget_s
    with store_writes(spec):
        while _more_to_do(study, spec.trials, deadline):
            run_trial(study, worker)
    return worker.evaluated


@contextlib.contextmanager
def store_writes(spec: SearchSpec) -> Iterator[None]:
    """Turn a full disk under the study store into one ``EnvironmentIOError`` naming the store.

    SQLite (or PostgreSQL) rolls the failed transaction back, so the store keeps every write
    before it: a trial left RUNNING is failed and retried by ``--resume``.

    Raises:
        EnvironmentIOError: ``no space left writing <store>`` (exit 5).
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, EnvironmentIOError) or not _no_space(exc):
            raise
        store = _store_path(spec)
        raise EnvironmentIOError(f"no space left writing {store} (the store keeps every finished "
                                 "trial: free some space, then continue with --resume)") from exc


def _no_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is a full disk or quota: ``OSError``
    ENOSPC/EDQUOT, SQLite's SQLITE_FULL ("database or disk is full", behind Optuna's
    ``StorageInternalError`` and SQLAlchemy's ``OperationalError``) or PostgreSQL's disk_full
    (SQLSTATE 53100)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(exc) or getattr(exc, "sqlstate", None) == "53100":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _store_path(spec: SearchSpec) -> str:
    """The SQLite file of the store, or its URL without the password."""
    from sqlalchemy.engine import make_url

    url = spec.storage_url()
    database = make_url(url).database if url.startswith("sqlite") else None
    return str(Path(database).resolve()) if database and database != ":memory:" else _redact(url)


def run_trial(study: optuna.Study, worker: _Worker) -> None:
    """Ask, evaluate, tell: Optuna's ``optimize`` loop for one trial, with a daemon heartbeat.

    ``study.optimize`` runs its heartbeat in a non-daemon thread; a Ctrl-C landing while that
    thread starts leaves it beating forever and the process never exits. Here the beat thread
    is a daemon, and a Ctrl-C enqueues the trial again, marks it FAIL and propagates.
    """
    with _quiet():
        optuna.storages.fail_stale_trials(study)  # dead workers' trials: FAIL, then retried
        trial = study.ask()
    stop = threading.Event()
    threading.Thread(target=_beat, args=(study._storage, trial._trial_id, stop), daemon=True).start()
    try:
        values = worker.objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except Exception as exc:  # noqa: BLE001 - a failing trial is recorded and the study goes on
        if _no_space(exc):  # nothing more can be recorded: the trial stays RUNNING for --resume
            raise
        if "error" not in trial.user_attrs:
            trial.set_user_attr("error", _one_line(exc))
        study.tell(trial, state=TrialState.FAIL)
    except KeyboardInterrupt:
        # Each step is one store transaction, and a second Ctrl-C may stop the shutdown between
        # any two: retry first, so the store then holds a RUNNING trial whose retry exists
        # (--resume fails it without enqueuing it twice), never a FAIL without a retry.
        trial.set_user_attr("error", "interrupted (Ctrl-C)")
        retry_trial(study, study._storage.get_trial(trial._trial_id))
        study.tell(trial, state=TrialState.FAIL)
        output.write_outputs(study, worker.out)
        raise
    else:
        study.tell(trial, values)
    finally:
        stop.set()
    gc.collect()
    worker.after_trial(study, study._storage.get_trial(trial._trial_id))


def _beat(storage: Any, trial_id: int, stop: threading.Event) -> None:
    while True:
        try:
            storage.record_heartbeat(trial_id)
        except Exception as exc:
            if _no_space(exc):
                return  # the trial's own next write reports the full disk, once
            raise
        if stop.wait(HEARTBEAT_S):
            return


def open_storage(spec: SearchSpec, *, fresh: bool, overwrite: bool) -> optuna.storages.RDBStorage:
    """The study's RDB storage, checked reachable before any trial runs.

    Raises:
        UsageError: a fresh search would overwrite an existing one without ``overwrite``.
        EnvironmentIOError: the storage URL cannot be opened.
    """
    out = Path(spec.out)
    if fresh and out.exists() and any(out.iterdir()):
        if not ((out / DB_FILE).exists() or (out / "search.json").exists()):
            raise UsageError(f"{out} is not empty and holds no search: choose a new --out")  # never delete it
        if not overwrite:
            raise UsageError(f"{out} already holds a search: pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(out)
    if spec.storage is None:
        out.mkdir(parents=True, exist_ok=True)
    url = spec.storage_url()
    if url.startswith("sqlite"):
        _check_sqlite_file(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if url.startswith("postgresql"):
        kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    storage = _rdb_storage(url, kwargs)
    if fresh and overwrite and spec.storage is not None:
        try:
            optuna.delete_study(study_name=spec.study_name, storage=storage)
        except KeyError:
            pass
    return storage


def _check_sqlite_file(url: str) -> None:
    """Refuse an SQLite study store that is not a database or is damaged (garbage bytes, a
    truncated copy), naming the file; a missing or empty file is a new store.

    Raises:
        InputRefused: SQLite's ``quick_check`` fails or reports damage.
    """
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or not Path(database).is_file() or Path(database).stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{Path(database).resolve().as_uri()}?mode=ro", uri=True)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        reason = " ".join(" ".join(problems[:3]).split())[:300]
        raise InputRefused(f"study store {database} is corrupt or not an SQLite database ({reason}); "
                           "move it away and start a new search, or restore it from a backup")


def _schema_error(url: str, exc: RuntimeError) -> UsageError:
    """Optuna's refusal of a store whose table schema another Optuna version set up, naming both."""
    found = re.search(r"set up by optuna ([^)\s]+)", str(exc))
    stored = found.group(1) if found else "an unknown version"
    if "optuna storage upgrade" in str(exc):
        fix = (f"it is older: back it up, then migrate it with "
               f"`optuna storage upgrade --storage {_redact(url)}`")
    else:
        fix = f"it is newer: install optuna {stored} or later, or start a new search"
    return UsageError(f"the study store {_redact(url)} was set up by optuna {stored}, "
                      f"this pared runs optuna {optuna.__version__}: {fix}")


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            with _quiet():
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=retry_trial)
        except (IntegrityError, ProgrammingError):
            # Workers starting together on an empty database race to create Optuna's tables;
            # the loser finds them made on its next try.
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
        except RuntimeError as exc:
            if "table schema" not in str(exc):
                raise EnvironmentIOError(f"cannot open the study storage {_redact(url)}: {exc}") from None
            raise _schema_error(url, exc) from None
        except Exception as exc:  # noqa: BLE001 - drivers raise many types; the user needs one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EnvironmentIOError(f"cannot open the study storage {_redact(url)}: {reason}") from None
    raise AssertionError("unreachable")


def _load_or_create(spec: SearchSpec, storage: optuna.storages.RDBStorage, evaluator: Evaluator, *,
                    resume: bool, join: bool) -> optuna.Study:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    existed = spec.study_name in names
    if existed and not _half_created(spec, storage):
        if not (resume or join):
            raise UsageError(f"study {spec.study_name!r} already exists in {_redact(spec.storage_url())}: "
                             "pass --resume or --join to continue it, --overwrite to replace it")
        return load_study(spec, storage)
    if resume and not existed:
        raise UsageError(f"nothing to resume: no study {spec.study_name!r} in {_redact(spec.storage_url())}")
    started = time.perf_counter()
    baseline = evaluator.baseline_metrics()
    one_eval = time.perf_counter() - started
    objectives = parse_objectives(spec.objectives, list(baseline), evaluator.primary_metric)
    for text in spec.constraints:
        parse_constraint(text, list(baseline))
    info = evaluator.model_info(sensitivity=False)
    select_spaces(spec.techniques, info)  # empty space: fail fast
    if spec.sensitivity and _sensitivity_affordable(spec, info, one_eval):
        info = evaluator.model_info(sensitivity=True)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.study_name,
                                    directions=[o.direction for o in objectives])
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it first
        return load_study(spec, storage)
    study.set_user_attr(VERSION_ATTR, __version__)
    study.set_user_attr(SPEC_ATTR, spec.identity())
    study.set_user_attr(BASELINE_ATTR, {"primary": evaluator.primary_metric, "metrics": baseline})
    study.set_user_attr(INFO_ATTR, dataclasses.asdict(info))
    return load_study(spec, storage)


def _sensitivity_affordable(spec: SearchSpec, info: ModelInfo, one_eval_s: float) -> bool:
    """The scan costs two evaluations per layer group; under a time budget it may take at most
    a tenth of it (on a loaded 2-core machine MiniLM's scan alone took over 20 minutes)."""
    cost = 2 * len(info.groups) * one_eval_s
    if spec.time_budget_s is None or cost <= 0.1 * spec.time_budget_s:
        return True
    print(f"sensitivity scan skipped: about {cost:.0f}s, over a tenth of the time budget", file=sys.stderr)
    return False


def _half_created(spec: SearchSpec, storage: optuna.storages.BaseStorage) -> bool:
    """A study killed between its creation and its attributes (it has no trials): deleted, so
    the search starts afresh instead of refusing a study "not made by pared"."""
    study = optuna.load_study(study_name=spec.study_name, storage=storage)
    for _ in range(25):  # a live creator writes them within milliseconds
        if SPEC_ATTR in study.user_attrs or study.get_trials(deepcopy=False):
            return False
        time.sleep(0.2)
    optuna.delete_study(study_name=spec.study_name, storage=storage)
    return True


def load_study(spec: SearchSpec, storage: optuna.storages.BaseStorage | str) -> optuna.Study:
    """Load the study with pared's per-trial seeded sampler; refuse one made for another search."""
    study = optuna.load_study(study_name=spec.study_name, storage=storage)
    for _ in range(50):  # the creator writes the attributes right after creating the study
        if {SPEC_ATTR, INFO_ATTR} <= set(study.user_attrs):
            break
        time.sleep(0.2)
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise UsageError(f"study {spec.study_name!r} was not made by pared search")
    made_by = study.user_attrs.get(VERSION_ATTR)  # absent in studies from before it was recorded
    if made_by is not None and _major(str(made_by)) != _major(__version__):
        raise UsageError(f"study {spec.study_name!r} in {_redact(spec.storage_url())} was made by pared {made_by}, "
                         f"this is pared {__version__} (another major version): resume it with pared {made_by}, "
                         "or start a new search (a new --out, or --overwrite)")
    changed = {k: (stored.get(k), v) for k, v in spec.identity().items() if stored.get(k) != v}
    if changed:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise UsageError(f"this study was made by a different search ({diff}); use a new --out or --study-name")
    constraints = _constraints(study)
    study.sampler = PerTrialSeedSampler(spec.sampler, spec.seed, len(constraints))
    return study


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a killed or interrupted trial's params again (at most ``MAX_RETRY`` times)."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY or trial.number in superseded(study.get_trials(deepcopy=False)):
        return
    # Params are fixed only when the trial had drawn them all (its recipe is recorded); a trial
    # killed while drawing is redrawn whole, with the same seed, so it draws the same values.
    done = "recipe" in trial.user_attrs
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params if done else {},
        distributions=trial.distributions if done else {},
        system_attrs={"failed_trial": history[0], "retry_history": history}))


def _more_to_do(study: optuna.Study, budget: int | None, deadline: float | None) -> bool:
    if deadline is not None and time.monotonic() >= deadline:
        return False
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    live = [t for t in trials if t.number not in gone]
    if any(t.state == TrialState.WAITING for t in live):
        return True
    return budget is None or len(live) < budget


class _Worker:
    """One process's view of the study: the space, objectives and constraints, and the trial job."""

    def __init__(self, spec: SearchSpec, study: optuna.Study, evaluator: Evaluator) -> None:
        self.spec, self.study, self.evaluator = spec, study, evaluator
        self.out = Path(spec.out)
        baseline = study.user_attrs[BASELINE_ATTR]
        self.primary, self.baseline = baseline["primary"], baseline["metrics"]
        self.info = ModelInfo(**{k: tuple(v) if k == "groups" else v for k, v in study.user_attrs[INFO_ATTR].items()})
        self.slots = select_spaces(spec.techniques, self.info)
        self.objectives: list[Objective] = parse_objectives(spec.objectives, list(self.baseline), self.primary)
        self.constraints: list[Constraint] = _constraints(study)
        self.evaluated = 0

    def objective(self, trial: optuna.Trial) -> list[float]:
        recipe = build_recipe(trial, self.slots, self.info)
        if not recipe:
            trial.set_user_attr("error", "pruned: every slot is 'none', nothing to compress")
            raise optuna.TrialPruned("every slot is 'none'")
        trial.set_user_attr("recipe", [config_to_dict(c) for c in recipe])
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.evaluated += 1
        try:
            report = self.evaluator.run(recipe, self.out / output.POINTS / output.trial_name(trial.number),
                                        on_metrics=lambda m: self._prune_hopeless(trial, m))
        except UsageError as exc:
            # The spec was checked before any trial, so a usage error here means this sampled
            # combination does not fit the model (a group size that does not divide a pruned
            # width, more clusters than a layer has weights). PRUNED, unlike FAIL, is data for
            # TPE: it learns to avoid the region instead of sampling it again and again.
            trial.set_user_attr("error", f"infeasible: {_one_line(exc)}")
            raise optuna.TrialPruned(str(exc)) from None
        metrics = metrics_from_report(report)
        trial.set_user_attr("metrics", {k: _jsonable(v) for k, v in metrics.items()})
        trial.set_user_attr("baseline", output.baseline_of(report))
        base = float(report["baseline"]["metrics"][self.primary])
        trial.set_user_attr("constraints", [c.violation(metrics, base) for c in self.constraints])
        values = [float(metrics[o.name]) for o in self.objectives]
        bad = [o.name for o, v in zip(self.objectives, values, strict=True) if not math.isfinite(v)]
        if bad:
            exc = FloatingPointError(f"non-finite objective(s) {bad}")
            trial.set_user_attr("error", _one_line(exc))
            raise exc
        return values

    def _prune_hopeless(self, trial: optuna.Trial, metrics: dict[str, dict[str, float]]) -> None:
        """Before timing: stop a trial whose task metric already breaks a constraint."""
        base, comp = metrics["baseline"], metrics["compressed"]
        partial = {k: float(v) for k, v in comp.items()}
        partial["metric_drop"] = float(base[self.primary]) - float(comp[self.primary])
        for c in self.constraints:
            if c.name in partial and c.violation(partial, float(base[self.primary])) > 0:
                trial.set_user_attr("metrics", {k: _jsonable(v) for k, v in partial.items()})
                trial.set_user_attr("error", f"pruned before timing: {c} broken ({c.name}={partial[c.name]:.6g})")
                raise optuna.TrialPruned(f"{c} broken")

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        output.write_outputs(study, self.out)
        state = trial.state.name
        print(f"trial {trial.number}: {state} {trial.values or trial.user_attrs.get('error', '')}", file=sys.stderr, flush=True)


def _constraints(study: optuna.Study) -> list[Constraint]:
    metrics = list(study.user_attrs.get(BASELINE_ATTR, {}).get("metrics", {}))
    return [parse_constraint(text, metrics) for text in study.user_attrs[SPEC_ATTR]["constraints"]]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    hint = " (try a smaller --batch)" if isinstance(exc, MemoryError) else ""
    return f"{type(exc).__name__}: {text[0] if text else ''}{hint}"[:500]


def _major(version: str) -> str:
    """The part of a version that must match to resume: ``1.4.2`` -> ``1``; ``0.3.1`` -> ``0.3``
    (before 1.0 a minor release may break compatibility)."""
    parts = version.split(".")
    return ".".join(parts[:2]) if parts[0] == "0" else parts[0]


def _redact(url: str) -> str:
    """The URL without its password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["SearchSpec", "search", "prepare", "run_worker", "load_study", "open_storage",
           "retry_trial", "store_writes"]
