"""Optuna samplers behind the ask/tell protocol: CMA-ES, TPE, GP (Bayesian), random, NSGA-II (multi-objective).

    opt = OptunaOptimizer(dim, x0, lower, upper, sampler="cmaes", seed=0, max_evals=100)
    a = opt.ask(); ...; opt.tell(a.id, fitness)              # or tell(a.id, None, objectives=[...])

`sampler: cmaes` with Optuna's defaults is exactly the EvoMerge paper's parameter-space set-up: the mean
starts in the middle of the bounds (0.5 on [0, 1]), sigma0 = range / 6, popsize 4 + floor(3 ln n). TPE is
multivariate; GP is Optuna's Gaussian-process sampler (10 random trials first); NSGA-II, TPE and random
take one value per objective. Candidate ids are Optuna trial numbers.

Failures are treated as pycma's are: a failed trial is told the worst value seen so far minus the spread
of the values seen (per objective; `penalty` before anything succeeded), so every sampler learns to avoid
the region instead of forgetting the trial (Optuna's FAIL state would).

Resume: the run's ledger is the truth. The controller replays its asks and tells in order onto a fresh
study with the same seeded sampler (`evomerge.search.optimizers.replay`), which then asks exactly what the
uninterrupted run would have; no sampler state is pickled. With `storage` (a SQLite file path, or any
Optuna storage URL such as postgresql://...) the study is mirrored there for `optuna-dashboard <storage>`,
and rebuilt from the ledger on resume (the stored study is replaced). `restore(records)` serves ledgers
written before ask events were recorded: every recorded evaluation becomes a finished trial, so the
sampler continues from what the run has seen, without the exactness of a replay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.search.optimizers.protocol import Ask, failure_value

SAMPLERS = ("cmaes", "tpe", "gp", "random", "nsga2")
MULTI_OBJECTIVE = ("nsga2", "tpe", "gp", "random")  # the samplers that take several objectives


class OptunaOptimizer:
    def __init__(self, dim: int, x0: list[float], lower: list[float], upper: list[float], *, sampler: str = "cmaes",
                 seed: int = 0, max_evals: int | None = None, popsize: int | None = None,
                 sigma0: float | None = None, objectives: int = 1, storage: str | None = None,
                 study_name: str = "evomerge", use_x0: bool = False, categorical: dict[int, int] | None = None,
                 penalty: float = 0.0):
        """`categorical`: {dimension: number of choices} for dimensions that encode a choice on [0, 1] (bin k
        of K is [k/K, (k+1)/K)); the sampler sees them as Optuna categoricals where it supports them."""
        import optuna

        if sampler not in SAMPLERS:
            raise ValueError(f"unknown Optuna sampler {sampler}; choose from {SAMPLERS}")
        if objectives > 1 and sampler not in MULTI_OBJECTIVE:
            raise ValueError(f"sampler {sampler} optimises one objective; use {', '.join(MULTI_OBJECTIVE)} for several")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dim, self.lower, self.upper = dim, list(lower), list(upper)
        self.names = [f"x{i:04d}" for i in range(dim)]
        self.categorical = dict(categorical or {})
        self.dist = {n: (optuna.distributions.CategoricalDistribution(list(range(self.categorical[i])))
                         if i in self.categorical else optuna.distributions.FloatDistribution(lo, hi))
                     for i, (n, lo, hi) in enumerate(zip(self.names, lower, upper, strict=True))}
        if sampler == "cmaes":  # CMA-ES leaves categoricals to its independent (random) sampler
            start = {n: v for i, (n, v) in enumerate(zip(self.names, x0, strict=True)) if i not in self.categorical}
            import warnings

            with warnings.catch_warnings():  # x0 / sigma0 are deprecated in Optuna 4.9 (removal in 6.0), still ours
                warnings.simplefilter("ignore", FutureWarning)
                s = optuna.samplers.CmaEsSampler(x0=start if use_x0 else None,
                                                 sigma0=sigma0, popsize=popsize, seed=seed, n_startup_trials=0,
                                                 warn_independent_sampling=False)
        elif sampler == "tpe":
            s = optuna.samplers.TPESampler(seed=seed, multivariate=True)
        elif sampler == "gp":
            s = optuna.samplers.GPSampler(seed=seed, n_startup_trials=10, warn_independent_sampling=False)
        elif sampler == "nsga2":
            s = optuna.samplers.NSGAIISampler(seed=seed, population_size=popsize or 20)
        else:
            s = optuna.samplers.RandomSampler(seed=seed)
        if storage is not None and "://" not in storage:
            storage = f"sqlite:///{Path(storage).resolve()}"
        self.storage = storage
        directions = ["maximize"] * objectives
        if storage is not None:  # a mirror of the ledger: rebuilt from it (by replay) every time the run starts
            try:
                optuna.delete_study(study_name=study_name, storage=storage)
            except KeyError:
                pass
        self.study = optuna.create_study(study_name=study_name, storage=storage, sampler=s, directions=directions)
        self.objectives = objectives
        self.max_evals = max_evals
        self._settings = {"kind": "optuna", "sampler": sampler, "dim": dim, "seed": seed, "max_evals": max_evals,
                          "popsize": popsize, "sigma0": sigma0, "objectives": objectives, "storage": storage,
                          "penalty": penalty}
        self.penalty = penalty
        self._ok: list[list[float]] = []  # the values told for successful trials (one list per objective)
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
        if ask_id not in self._trials:
            raise ValueError(f"candidate {ask_id} was not handed out, or was told already")
        trial = self._trials.pop(ask_id)
        if objectives is None and fitness is not None and self.objectives == 1:
            objectives = [fitness]
        if objectives is None or len(objectives) != self.objectives or not all(np.isfinite(objectives)):
            values = [failure_value(ok, self.penalty) for ok in self._ok] if self._ok else \
                [self.penalty] * self.objectives
        else:
            values = [float(v) for v in objectives]
            self._ok = self._ok or [[] for _ in values]
            for ok, v in zip(self._ok, values, strict=True):
                ok.append(v)
        self.study.tell(trial, values if self.objectives > 1 else values[0])
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
        """A ledger without ask events (written by an older evomerge): every recorded evaluation is added
        as a finished trial (a failed one with the failure value, one never finished as a FAIL placeholder,
        so trial numbers stay the ledger's ids); returns the ids the ledger holds."""
        import optuna

        by_id = {r["id"]: r for r in records if r["type"] == "eval" and r.get("x") is not None}
        for i in range(max(by_id, default=-1) + 1):
            if i not in by_id:
                self.study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
                continue
            vals = self._values(by_id[i], objectives_of)
            if vals is None:
                vals = [failure_value(ok, self.penalty) for ok in self._ok] if self._ok else \
                    [self.penalty] * self.objectives
            else:
                self._ok = self._ok or [[] for _ in vals]
                for ok, v in zip(self._ok, vals, strict=True):
                    ok.append(v)
            self.study.add_trial(optuna.trial.create_trial(
                params=self._params(by_id[i]["x"]), distributions=self.dist,
                values=vals if self.objectives > 1 else None, value=vals[0] if self.objectives == 1 else None))
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
