"""The sampler a search uses: Optuna's, reseeded per trial so that a resumed search proposes
what an uninterrupted one would.

Optuna samplers draw from one RNG seeded at construction, so a resumed process would draw
different params from an uninterrupted one. ``PerTrialSeedSampler`` builds a fresh TPE /
NSGA-II / random sampler for every trial, seeded by the trial's *logical index* (its number
minus the killed-and-retried trials before it), and shows it the history in logical-index order
with the retried trials hidden: trial i's proposal is then a function of (seed, i, the finished
trials before i) only.
"""

from __future__ import annotations

import bisect
import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Heartbeats are "experimental" and constraints_func "deprecated" in Optuna 5, yet both are
    # the documented way to get stale-trial retries and constrained TPE/NSGA-II on Optuna 4.9-5.x.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # pared runs the heartbeat itself around ask/tell (see study.run_trial)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def superseded(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were retried (killed, then enqueued again)."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def logical_index(trials: list[FrozenTrial], number: int) -> int:
    """Trial ``number``'s position in an uninterrupted run: killed-and-retried trials don't count."""
    gone = sorted(superseded(trials))
    return number - bisect.bisect_left(gone, number)


class _InIndexOrder:
    """The study as the sampler sees it: retried trials hidden, the others in logical-index
    order, so a resumed search shows the sampler exactly the history an uninterrupted one does."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=None, use_cache=use_cache)
        gone = sorted(superseded(trials))
        kept = [t for t in trials if t.number not in gone and (states is None or t.state in states)]
        return sorted(kept, key=lambda t: t.number - bisect.bisect_left(gone, t.number))

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)


class PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """Delegates to a fresh TPE / NSGA-II / random sampler seeded by the trial's logical index.

    Optuna samplers draw from one RNG seeded at construction, so a resumed process would draw
    different params from an uninterrupted one. Reseeding per trial makes trial i's proposal a
    function of (seed, i, finished history) only.
    """

    def __init__(self, kind: str, seed: int, n_constraints: int) -> None:
        self.kind, self.seed, self.n_constraints = kind, seed, n_constraints
        self._inner: tuple[int, optuna.samplers.BaseSampler] | None = None

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if self._inner is None or self._inner[0] != trial.number:
            index = logical_index(study.get_trials(deepcopy=False), trial.number)
            self._inner = (trial.number, self._make(self.seed * 1_000_003 + index))
        return self._inner[1]

    def _make(self, seed: int) -> optuna.samplers.BaseSampler:
        with _quiet():
            return self._sampler(seed)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        constraints = self._constraints if self.n_constraints else None
        if self.kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints, population_size=10)
        if self.kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, constant_liar=True,
                                          n_startup_trials=8)

    def _constraints(self, trial: FrozenTrial) -> list[float]:
        return list(trial.user_attrs.get("constraints") or [1.0] * self.n_constraints)

    def infer_relative_search_space(self, study, trial):  # noqa: D102 - Optuna's API
        return self._for(study, trial).infer_relative_search_space(_InIndexOrder(study), trial)

    def sample_relative(self, study, trial, search_space):  # noqa: D102
        return self._for(study, trial).sample_relative(_InIndexOrder(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: D102
        return self._for(study, trial).sample_independent(_InIndexOrder(study), trial, param_name, param_distribution)

    def before_trial(self, study, trial):  # noqa: D102
        self._for(study, trial).before_trial(_InIndexOrder(study), trial)

    def after_trial(self, study, trial, state, values):  # noqa: D102
        self._for(study, trial).after_trial(_InIndexOrder(study), trial, state, values)

    def reseed_rng(self) -> None:  # noqa: D102 - seeds come from the trial index, never from here
        pass
