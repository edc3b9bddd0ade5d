"""CMA-ES (pycma) behind the ask/tell protocol, one candidate at a time.

pycma works a generation at a time: the generation is sampled when its first candidate is asked, handed
out one by one, and told to pycma once every member has a fitness. A failed candidate (fitness None) is
told with a penalty: the worst fitness of its generation minus the spread of the generation (or
`penalty` if nothing in it succeeded), never dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.search.optimizers.protocol import Ask, failure_value


class CMAES:
    def __init__(self, dim: int, x0: list[float], sigma0: float, lower: list[float], upper: list[float], *,
                 seed: int = 0, popsize: int | None = None, max_evals: int | None = None,
                 penalty: float = 0.0, diagonal: bool = False, eval_x0: bool = False, restarts: int = 0):
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
                          "diagonal": diagonal, "eval_x0": eval_x0, "restarts": restarts}
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

    def tell(self, ask_id: int, fitness: float | None, items: Any = None) -> None:
        if ask_id not in self._gen_ids or ask_id >= self._gen_ids[0] + self._handed:
            raise ValueError(f"candidate {ask_id} was not handed out in the current generation "
                             f"({self._gen_ids[0] if self._gen_ids else '-'}..)")
        if ask_id in self._fit:
            raise ValueError(f"candidate {ask_id} was already told")
        if fitness is not None and not math.isfinite(fitness):
            fitness = None
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
        if self._gen or self.restarted < self.restarts:
            return {}
        return self._converged()

    def best(self) -> tuple[np.ndarray, float] | None:
        return self._best

    @property
    def pending(self) -> int:
        """Candidates handed out and not yet told."""
        return self._handed - len(self._fit) if self._gen else 0
