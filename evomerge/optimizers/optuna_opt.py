"""Optuna samplers behind the ask/tell protocol: CMA-ES, TPE, random, NSGA-II (multi-objective).

    opt = OptunaOptimizer(dim, x0, lower, upper, sampler="cmaes", seed=0, max_evals=100)
    a = opt.ask(); ...; opt.tell(a.id, fitness)              # or tell(a.id, None, objectives=[...])

`sampler: cmaes` with Optuna's defaults is exactly the EvoMerge paper's parameter-space set-up: the mean
starts in the middle of the bounds (0.5 on [0, 1]), sigma0 = range / 6, popsize 4 + floor(3 ln n). TPE is
multivariate; NSGA-II takes one value per objective. Candidate ids are Optuna trial numbers.

Storage: with `storage` (a SQLite file path, or any Optuna storage URL such as postgresql://...), the
study lives there (`optuna-dashboard <storage>` watches it live) and is loaded again on resume. Without
one, `restore(records)` rebuilds the study from the run's ledger: every recorded evaluation becomes a
completed trial, so the sampler continues from everything the run has seen (it need not ask exactly what an
uninterrupted run would have asked, as pycma's replay does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.optimizers.protocol import Ask

SAMPLERS = ("cmaes", "tpe", "random", "nsga2")


class OptunaOptimizer:
    def __init__(self, dim: int, x0: list[float], lower: list[float], upper: list[float], *, sampler: str = "cmaes",
                 seed: int = 0, max_evals: int | None = None, popsize: int | None = None,
                 sigma0: float | None = None, objectives: int = 1, storage: str | None = None,
                 study_name: str = "evomerge", use_x0: bool = False, categorical: dict[int, int] | None = None):
        """`categorical`: {dimension: number of choices} for dimensions that encode a choice on [0, 1] (bin k
        of K is [k/K, (k+1)/K)); the sampler sees them as Optuna categoricals where it supports them."""
        import optuna

        if sampler not in SAMPLERS:
            raise ValueError(f"unknown Optuna sampler {sampler}; choose from {SAMPLERS}")
        if objectives > 1 and sampler not in ("nsga2", "random", "tpe"):
            raise ValueError(f"sampler {sampler} optimises one objective; use nsga2, tpe or random for several")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dim, self.lower, self.upper = dim, list(lower), list(upper)
        self.names = [f"x{i:04d}" for i in range(dim)]
        self.categorical = dict(categorical or {})
        self.dist = {n: (optuna.distributions.CategoricalDistribution(list(range(self.categorical[i])))
                         if i in self.categorical else optuna.distributions.FloatDistribution(lo, hi))
                     for i, (n, lo, hi) in enumerate(zip(self.names, lower, upper, strict=True))}
        if sampler == "cmaes":  # CMA-ES leaves categoricals to its independent (random) sampler
            start = {n: v for i, (n, v) in enumerate(zip(self.names, x0, strict=True)) if i not in self.categorical}
            s = optuna.samplers.CmaEsSampler(x0=start if use_x0 else None,
                                             sigma0=sigma0, popsize=popsize, seed=seed, n_startup_trials=0,
                                             warn_independent_sampling=False)
        elif sampler == "tpe":
            s = optuna.samplers.TPESampler(seed=seed, multivariate=True, warn_independent_sampling=False)
        elif sampler == "nsga2":
            s = optuna.samplers.NSGAIISampler(seed=seed, population_size=popsize or 20)
        else:
            s = optuna.samplers.RandomSampler(seed=seed)
        if storage is not None and "://" not in storage:
            storage = f"sqlite:///{Path(storage).resolve()}"
        self.storage = storage
        directions = ["maximize"] * objectives
        self.study = optuna.create_study(study_name=study_name, storage=storage, sampler=s, directions=directions,
                                         load_if_exists=storage is not None)
        self.objectives = objectives
        self.max_evals = max_evals
        self._settings = {"kind": "optuna", "sampler": sampler, "dim": dim, "seed": seed, "max_evals": max_evals,
                          "popsize": popsize, "sigma0": sigma0, "objectives": objectives, "storage": storage}
        self._trials: dict[int, Any] = {}
        self._told = 0  # evaluations recorded (the run's ledger is the count; see restore)
        self._best: tuple[np.ndarray, float] | None = None

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    # ---- ask / tell ---------------------------------------------------------------------------------------------
    def ask(self) -> Ask | None:
        if self.max_evals is not None and self._told + len(self._trials) >= self.max_evals:
            return None
        trial = self.study.ask(self.dist)
        self._trials[trial.number] = trial
        return Ask(trial.number, self._vector(trial.params))

    def tell(self, ask_id: int, fitness: float | None, items: Any = None,
             objectives: list[float] | None = None) -> None:
        import optuna

        trial = self._trials.pop(ask_id)
        if objectives is None and fitness is not None and self.objectives == 1:
            objectives = [fitness]
        if objectives is None or len(objectives) != self.objectives or not all(np.isfinite(objectives)):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, objectives if self.objectives > 1 else objectives[0])
        self._told += 1
        if fitness is not None and np.isfinite(fitness) and (self._best is None or fitness > self._best[1]):
            self._best = (self._vector(trial.params), float(fitness))

    def stop(self) -> dict[str, Any]:
        if self.max_evals is not None and self._told >= self.max_evals:
            return {"max_evals": self.max_evals}
        return {}

    def best(self) -> tuple[np.ndarray, float] | None:
        return self._best

    @property
    def pending(self) -> int:
        return len(self._trials)

    # ---- resume -----------------------------------------------------------------------------------------------
    def restore(self, records: list[dict[str, Any]], objectives_of=None) -> set[int]:
        """Bring the study in line with the run's ledger; returns the ids the ledger already holds.

        With a storage: trials the ledger records but the study never heard of the end of (a crash between
        the two writes) are told now; trials left running by a dead controller are failed and their
        parameters enqueued again, so the candidates in flight are redone. Without a storage: every recorded
        evaluation is added as a finished trial."""
        import optuna

        by_id = {r["id"]: r for r in records if r["type"] == "eval" and r.get("x") is not None}
        if self.storage is None:
            known = {r["id"] for r in records if r["type"] == "eval"}
            for i in range(max(known, default=-1) + 1):  # trial numbers stay the ledger's ids
                if i not in by_id:
                    self.study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
                    continue
                r = by_id[i]
                vals = self._values(r, objectives_of)
                params = self._params(r["x"])
                if vals is None:
                    t = optuna.trial.create_trial(params=params, distributions=self.dist,
                                                  state=optuna.trial.TrialState.FAIL)
                else:
                    t = optuna.trial.create_trial(params=params, distributions=self.dist,
                                                  values=vals if self.objectives > 1 else None,
                                                  value=vals[0] if self.objectives == 1 else None)
                self.study.add_trial(t)
            self._told = len(by_id)
            return set(by_id)
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.RUNNING:
                if t.number in by_id:
                    vals = self._values(by_id[t.number], objectives_of)
                    self.study.tell(t.number, vals if vals is None or self.objectives > 1 else vals[0],
                                    state=None if vals is not None else optuna.trial.TrialState.FAIL)
                else:
                    self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                    self.study.enqueue_trial(t.params, skip_if_exists=False)
        self._told = len(by_id)
        return set(by_id)

    def _vector(self, params: dict[str, Any]) -> np.ndarray:
        """Trial parameters -> the plain vector the protocol speaks (a choice k of K -> the middle of bin k)."""
        return np.array([(params[n] + 0.5) / self.categorical[i] if i in self.categorical else params[n]
                         for i, n in enumerate(self.names)], dtype=float)

    def _params(self, x: list[float]) -> dict[str, Any]:
        return {n: (min(self.categorical[i] - 1, max(0, int(v * self.categorical[i])))
                    if i in self.categorical else v) for i, (n, v) in enumerate(zip(self.names, x, strict=True))}

    def _values(self, r: dict[str, Any], objectives_of) -> list[float] | None:
        if r["fitness"] is None:
            return None
        return list(objectives_of(r)) if objectives_of is not None else [float(r["fitness"])]
