"""CMA-ES (pycma) behind the ask/tell protocol, one candidate at a time.

Generational (the default): a generation is sampled when its first candidate is asked, handed out one by one,
and told to pycma once every member has a fitness; until then `ask` returns None, so a worker that finishes
early waits for the generation's slowest candidate.

Asynchronous (`asynchronous=True`): `ask` always hands out a candidate — sampled from the current
distribution, a fresh batch of λ whenever the last is used up — and pycma is told the first λ results that
arrive, whatever batch they were sampled in (as in asynchronous/steady-state CMA-ES: the update uses points
drawn from a distribution up to a few updates old). No worker waits. What it asks then depends on the order
results arrive in, which the ledger records: a resume replays that order exactly.

A failed candidate (fitness None) is told with a penalty, never dropped: generational, the worst fitness of its
generation minus the generation's spread; asynchronous, the worst success so far minus their spread (its batch is
not known when it is told); `penalty` while nothing has succeeded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.search.optimizers.protocol import Ask, failure_value


class CMAES:
    def __init__(self, dim: int, x0: list[float], sigma0: float, lower: list[float], upper: list[float], *,
                 seed: int = 0, popsize: int | None = None, max_evals: int | None = None,
                 penalty: float = 0.0, diagonal: bool = False, eval_x0: bool = False, restarts: int = 0,
                 asynchronous: bool = False):
        """`eval_x0`: hand out x0 itself first, as a generation of one that only counts towards the best
        (a data-flow search starting from model A measures A, so a hybrid never ends below its PS merge).
        `restarts`: when pycma's own termination criteria fire before the budget is spent, start again from
        x0 with twice the population (IPOP-CMA-ES), up to this many times; the best so far is kept."""

        if len(x0) != dim or len(lower) != dim or len(upper) != dim:
            raise ValueError(f"x0, lower and upper must have {dim} entries")
        self.dim = dim
        self.popsize = popsize or 4 + int(3 * math.log(dim))
        self._settings = {"kind": "cmaes", "dim": dim, "x0": [float(v) for v in x0], "sigma0": float(sigma0),
                          "lower": [float(v) for v in lower], "upper": [float(v) for v in upper], "seed": seed,
                          "popsize": self.popsize, "max_evals": max_evals, "penalty": penalty,
                          "diagonal": diagonal, "eval_x0": eval_x0, "restarts": restarts,
                          "asynchronous": asynchronous}
        self.restarts, self.restarted = restarts, 0
        self.es = self._strategy(0)
        self.max_evals = max_evals
        self.penalty = penalty
        self._next_id = 0
        self._gen: list[np.ndarray] = []  # current generation's solutions
        self._gen_ids: list[int] = []
        self._handed = 0
        self._fit: dict[int, float | None] = {}
        self._told = 0
        self._best: tuple[np.ndarray, float] | None = None
        self._history: list[tuple[int, float | None]] = []  # every tell, in order: the serialisable state
        self._reissue: list[Ask] = []  # asks handed out before a restore and never told
        self._x0_first = eval_x0
        self._x0_gen = False  # the current "generation" is x0 alone (not a pycma sample)
        self.asynchronous = asynchronous
        self._sampled: list[np.ndarray] = []  # asynchronous: drawn from the distribution, not yet handed out
        self._out: dict[int, np.ndarray] = {}  # asynchronous: handed out, not yet told
        self._arrived: list[tuple[np.ndarray, float]] = []  # asynchronous: told, not yet given to pycma
        self._ok: list[float] = []  # asynchronous: the successful values told so far (for failure values)

    def _strategy(self, k: int):
        """The k-th pycma strategy (k restarts in: population 2^k times the first)."""
        import cma

        st = self._settings
        # pycma samples from numpy's global RNG by default: give each strategy its own, so two optimizers in
        # one process (or anything else drawing random numbers) cannot change what it asks.
        rng = np.random.default_rng(st["seed"] + 7919 * k)
        opts: dict[str, Any] = {"bounds": [st["lower"], st["upper"]], "popsize": self.popsize * 2 ** k,
                                "seed": st["seed"] + 1 + 7919 * k,  # pycma treats seed 0 as "random"
                                "randn": lambda *shape: rng.standard_normal(shape), "verbose": -9}
        if st["diagonal"]:
            opts["CMA_diagonal"] = True
        return cma.CMAEvolutionStrategy(list(st["x0"]), st["sigma0"], opts)

    def _converged(self) -> dict[str, Any]:
        return {k: v for k, v in self.es.stop().items() if k not in ("maxfevals",)}

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def ask(self) -> Ask | None:
        if self._reissue:
            return self._reissue.pop(0)
        if self.max_evals is not None and self._next_id >= self.max_evals:
            return None
        if self.asynchronous:
            return self._ask_async()
        if not self._gen and self._x0_first:
            self._x0_first, self._x0_gen = False, True
            self._gen = [np.asarray(self._settings["x0"], dtype=float)]
            self._gen_ids = [self._next_id]
            self._handed = 0
            self._fit = {}
        elif not self._gen:
            self._x0_gen = False
            if self._converged() and self.restarted < self.restarts:
                self.restarted += 1
                self.es = self._strategy(self.restarted)
            self._gen = list(self.es.ask())  # kept as pycma handed them out, to be told back as they are
            self._gen_ids = list(range(self._next_id, self._next_id + len(self._gen)))
            self._handed = 0
            self._fit = {}
        if self._handed >= len(self._gen):
            return None  # the rest of the generation is still being evaluated
        i = self._handed
        self._handed += 1
        self._next_id += 1
        return Ask(self._gen_ids[i], self._gen[i].copy())

    def _ask_async(self) -> Ask:
        if self._x0_first:
            self._x0_first = False
            x = np.asarray(self._settings["x0"], dtype=float)
            self._x0_id = self._next_id  # measured, counted towards the best, never told to pycma
        else:
            if not self._sampled:
                if self._converged() and self.restarted < self.restarts:
                    self.restarted += 1
                    self.es = self._strategy(self.restarted)
                    self._arrived = []  # results sampled from the old strategy are not told to the new one
                self._sampled = list(self.es.ask())
            x = self._sampled.pop(0)
        self._out[self._next_id] = x
        self._next_id += 1
        return Ask(self._next_id - 1, x.copy())

    def _tell_async(self, ask_id: int, fitness: float | None) -> None:
        if ask_id not in self._out:
            raise ValueError(f"candidate {ask_id} was not handed out, or was already told")
        x = self._out.pop(ask_id)
        self._told += 1
        self._history.append((ask_id, fitness))
        if fitness is not None and (self._best is None or fitness > self._best[1]):
            self._best = (x.copy(), fitness)
        if ask_id == getattr(self, "_x0_id", None):
            return
        # a failure's value is fixed when it is told (its batch is not known yet): below every success so far
        value = fitness if fitness is not None else failure_value(self._ok, self.penalty)
        if fitness is not None:
            self._ok.append(fitness)
        self._arrived.append((x, value))
        lam = self.es.popsize
        if len(self._arrived) >= lam:
            batch, self._arrived = self._arrived[:lam], self._arrived[lam:]
            # pycma's own arrays (see tell): it finds the genotype of each bounded sample it handed out
            self.es.tell([x for x, _ in batch], [-v for _, v in batch])
            # what is handed out next comes from the updated distribution (pycma also needs an ask between tells)
            self._sampled = list(self.es.ask())

    def tell(self, ask_id: int, fitness: float | None, items: Any = None) -> None:
        if fitness is not None and not math.isfinite(fitness):
            fitness = None
        if self.asynchronous:
            return self._tell_async(ask_id, fitness)
        if ask_id not in self._gen_ids or ask_id >= self._gen_ids[0] + self._handed:
            raise ValueError(f"candidate {ask_id} was not handed out in the current generation "
                             f"({self._gen_ids[0] if self._gen_ids else '-'}..)")
        if ask_id in self._fit:
            raise ValueError(f"candidate {ask_id} was already told")
        self._fit[ask_id] = fitness
        self._told += 1
        self._history.append((ask_id, fitness))
        if fitness is not None and (self._best is None or fitness > self._best[1]):
            self._best = (self._gen[self._gen_ids.index(ask_id)].copy(), fitness)
        if len(self._fit) == len(self._gen):
            ok = [f for f in self._fit.values() if f is not None]
            worst = failure_value(ok, self.penalty)
            values = [self._fit[i] if self._fit[i] is not None else worst for i in self._gen_ids]
            if not self._x0_gen:
                # pycma's own arrays, not copies or lists: it looks each one up to find its genotype (the
                # unrepaired sample behind a bounded candidate); one it does not recognise it repairs again
                self.es.tell(self._gen, [-v for v in values])  # pycma minimises
            self._gen, self._gen_ids, self._fit = [], [], {}

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state: the settings and every tell so far (no pickle).

        `CMAES.from_state(state)` rebuilds the same strategy by replaying the tells, since a seeded
        pycma run asks the same candidates given the same fitness values.
        """
        return {"settings": self.settings(), "told": [[i, f] for i, f in self._history], "asked": self._next_id}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CMAES:
        st = dict(state["settings"])
        st.pop("kind", None)
        if st.get("asynchronous"):
            raise ValueError("an asynchronous CMA-ES resumes by replaying its ledger's asks and tells in order "
                             "(evomerge/search/optimizers/replay.py), not from its tells alone")
        dim = st.pop("dim")
        opt = cls(dim, st.pop("x0"), st.pop("sigma0"), st.pop("lower"), st.pop("upper"), **st)
        told = {int(i): f for i, f in state["told"]}
        pending: list[Ask] = []
        while opt._next_id < state["asked"]:
            a = opt.ask()
            if a is None:
                break
            if a.id in told:
                opt.tell(a.id, told[a.id])
            else:
                pending.append(a)
            if not opt._gen and pending:  # cannot happen: a generation completes only when all are told
                break
        # what was handed out and not told is handed out again first
        opt._reissue = pending
        return opt

    def stop(self) -> dict[str, Any]:
        if self.max_evals is not None and self._told >= self.max_evals:
            return {"max_evals": self.max_evals}
        if self.asynchronous and self._out:
            return {}  # candidates are out: their results still reach the strategy
        if self._gen or self.restarted < self.restarts:
            return {}
        return self._converged()

    def best(self) -> tuple[np.ndarray, float] | None:
        return self._best

    @property
    def pending(self) -> int:
        """Candidates handed out and not yet told."""
        if self.asynchronous:
            return len(self._out)
        return self._handed - len(self._fit) if self._gen else 0
