"""M2N2: Model Merging of Natural Niches (Sakana AI, 2025), behind the ask/tell protocol.

An archive of P members, each with its row of per-item scores s[i, j] (1/0 or real). Per child:

    competition  z_j = sum_i s[i, j]; F[i, j] = c_j s[i, j] / z_j^alpha (z_j = 0 -> 1), c_j = max_i s[i, j]
                 (for 0/1 scores c_j = 1 wherever anyone scores, which is the reference's form); f_i = sum_j F
    parent 1     ~ f / sum f
    parent 2     ~ attraction g(p1, B) = sum_j max(F[B, j] - F[p1, j], 0); when every g is 0 (the reference
                 divides by zero there), parent 2 is drawn by fitness among the others
    crossover    split ~ U{0..n-1}, w ~ U[0, 1); t_i = w before the split, 1 - w after; child = SLERP(x, y; t)
                 with ONE angle over the whole vectors (`slerp: global`, the reference code's choice and the
                 default) or one angle per segment (`slerp: segment`, as the paper's text reads); linear
                 interpolation where sin(angle) <= 1e-6
    mutation     + N(0, mutation_std^2) per element (from-scratch runs only; 0 when merging trained models)
    archive      add the child's row, recompute f, drop the lowest (the child itself if it is the lowest)
    reported     the member with the highest RAW mean score (not the shared fitness)

Ids 0..K-1 are the seed members (evaluated first: they enter the archive like children); then children.

Determinism and workers: child i draws its random numbers from its own stream (seed, i), and is made from
the archive holding exactly the candidates before i - lag + 1 (at least the K seeds), at the moment it does;
tells are applied in id order whatever order they arrive in. So `lag` children can be in flight at once
(lag = 1 is the reference's steady state; lag = number of workers keeps every worker busy) and a run is
reproducible, and resumable by replaying its recorded tells, regardless of worker timing.

Members are whatever the `algebra` operates on: full vectors (VectorAlgebra: the weights of small models) or
piecewise coefficients over seed models (evomerge.merge.piecewise.PiecewiseAlgebra: the recipe form, for LLMs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.search.optimizers.protocol import Ask


class VectorAlgebra:
    """Members as full float vectors (numpy). Split points are element indices, or with `edges` block indices
    into a grid of element offsets (the grid the recipe form of evomerge.merge.piecewise uses)."""

    def __init__(self, dim: int, edges: Sequence[int] | None = None):
        self.edges = None if edges is None else [int(e) for e in edges]
        self.dim = dim if edges is None else len(self.edges) - 1

    def _off(self, k: int) -> int:
        return k if self.edges is None else self.edges[k]

    def dot(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.dot(x, y))

    def combine(self, x: np.ndarray, y: np.ndarray, split: int, a: tuple[float, float],
                b: tuple[float, float]) -> np.ndarray:
        """a[0]*x + b[0]*y before `split`, a[1]*x + b[1]*y from it on."""
        k = self._off(split)
        out = np.empty_like(x)
        out[:k] = a[0] * x[:k] + b[0] * y[:k]
        out[k:] = a[1] * x[k:] + b[1] * y[k:]
        return out

    def segment_dot(self, x: np.ndarray, y: np.ndarray, lo: int, hi: int) -> float:
        lo, hi = self._off(lo), self._off(hi)
        return float(np.dot(x[lo:hi], y[lo:hi]))

    def mutate(self, x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
        noise = rng.standard_normal(x.shape, dtype=np.float32) if x.dtype == np.float32 else rng.standard_normal(
            x.shape)
        noise *= std
        noise += x
        return noise


def shared_fitness(scores: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(F, f): per-item shared fitness and its row sums, for a score matrix (members x items)."""
    s = np.asarray(scores, dtype=np.float32)
    z = s.sum(axis=0)
    z[z == 0] = 1.0
    if alpha != 1.0:
        z **= alpha
    cap = s.max(axis=0) if len(s) else np.zeros(s.shape[1], dtype=np.float32)
    F = s * (cap / z)[None, :]
    return F, F.sum(axis=1, dtype=np.float64)


def attraction(F: np.ndarray, p1: int) -> np.ndarray:
    g = np.maximum(F - F[p1][None, :], 0.0).sum(axis=1)
    g[p1] = 0.0
    return g


def slerp_coefficients(cos_omega: float, t: float) -> tuple[float, float]:
    """(a, b) with SLERP(x, y; t) = a x + b y for unit-angle cosine `cos_omega`; linear when sin <= 1e-6."""
    omega = math.acos(min(1.0, max(-1.0, cos_omega)))
    s = math.sin(omega)
    if s <= 1e-6:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


class M2N2:
    def __init__(self, seeds: Sequence[Any], *, archive_size: int = 20, alpha: float = 1.0, attraction: bool = True,
                 crossover: bool = True, split_point: bool = True, slerp: str = "global", mutation_std: float = 0.0,
                 seed: int = 0, max_evals: int | None = None, lag: int = 1, algebra: Any = None,
                 record: bool = False):
        """`record`: keep every applied tell for `state()` (a search's ledger already holds them; a long
        in-process run need not)."""
        if archive_size < 2:
            raise ValueError("archive_size must be at least 2")
        if slerp not in ("global", "segment"):
            raise ValueError("slerp must be 'global' or 'segment'")
        if lag < 1:
            raise ValueError("lag must be >= 1")
        self.seeds = list(seeds)
        if not self.seeds:
            raise ValueError("M2N2 needs at least one seed member")
        self.algebra = algebra or VectorAlgebra(len(self.seeds[0]))
        self.P, self.alpha, self.use_attraction = archive_size, alpha, attraction
        self.use_crossover, self.use_split, self.slerp = crossover, split_point, slerp
        self.mutation_std, self.seed, self.max_evals, self.lag = mutation_std, seed, max_evals, lag
        self.members: list[Any] = [None] * archive_size
        self.scores: np.ndarray | None = None  # (P, N), allocated on the first tell
        self._next_id = 0
        self._asked: dict[int, Any] = {}  # id -> member handed out, not yet applied
        self._told: dict[int, np.ndarray | None] = {}  # told, waiting for earlier ids
        self._ready: dict[int, Any] = {}  # children made, not yet handed out
        self._applied = 0  # ids < _applied are in the archive's history
        self.record = record
        self._history: list[tuple[int, np.ndarray | None]] = []
        self.parents: dict[int, tuple[int, int, int, float]] = {}  # id -> (p1 slot, p2 slot, split, w)

    # ---- ask / tell -----------------------------------------------------------------------------------------
    def ask(self) -> Ask | None:
        i = self._next_id
        if self.max_evals is not None and i >= self.max_evals:
            return None
        if i < len(self.seeds):
            member = self.seeds[i]
        elif i in self._ready:
            member = self._ready.pop(i)
        else:
            return None  # the archive this child is drawn from is not complete yet
        self._next_id += 1
        self._asked[i] = member
        return Ask(i, member)

    def tell(self, ask_id: int, fitness: float | None, items: Sequence[float] | None = None) -> None:
        """`items`: the candidate's per-item scores (the same items, in the same order, every time); None or
        a failed candidate counts as scoring nothing."""
        if ask_id not in self._asked or ask_id in self._told:
            raise ValueError(f"candidate {ask_id} was not handed out, or was told already")
        row = None if items is None or fitness is None else np.asarray(items, dtype=np.float32)
        self._told[ask_id] = row
        while self._applied in self._told:
            i = self._applied
            r = self._told.pop(i)
            self._apply(self._asked.pop(i), r)
            if self.record:
                self._history.append((i, r))
            self._applied += 1
            self._make_ready()

    def _make_ready(self) -> None:
        """Child i is made from the archive holding exactly max(K, i - lag + 1) applied candidates, the moment
        it does: so what a child is never depends on when the workers report."""
        k, a = len(self.seeds), self._applied
        if a < k or self.scores is None:
            return
        first = k if a == k else a + self.lag - 1
        last = k + self.lag - 1 if a == k else first
        for i in range(first, last + 1):
            if self.max_evals is None or i < self.max_evals:
                self._ready[i] = self._child(i)

    def stop(self) -> dict[str, Any]:
        if self.max_evals is not None and self._applied >= self.max_evals:
            return {"max_evals": self.max_evals}
        return {}

    @property
    def pending(self) -> int:
        return self._next_id - self._applied

    # ---- the archive ----------------------------------------------------------------------------------------
    def _apply(self, member: Any, row: np.ndarray | None) -> None:
        if self.scores is None:
            if row is None:
                return  # nothing known about the item count yet: a failed first candidate is dropped
            self.scores = np.zeros((self.P, len(row)), dtype=np.float32)
        if row is None:
            row = np.zeros(self.scores.shape[1], dtype=np.float32)
        if row.shape != (self.scores.shape[1],):
            raise ValueError(f"per-item scores have {row.shape[0]} items, the archive {self.scores.shape[1]}")
        _, f = shared_fitness(np.vstack([self.scores, row[None, :]]), self.alpha)
        worst = int(np.argmin(f))
        if worst < self.P:
            self.scores[worst] = row
            self.members[worst] = member

    def filled(self) -> np.ndarray:
        return np.array([m is not None for m in self.members])

    def best(self) -> tuple[Any, float] | None:
        """The member with the highest raw mean score, and that score."""
        if self.scores is None or not self.filled().any():
            return None
        raw = np.where(self.filled(), self.scores.mean(axis=1), -np.inf)
        k = int(np.argmax(raw))
        return self.members[k], float(raw[k])

    # ---- making a child -------------------------------------------------------------------------------------
    def _child(self, i: int) -> Any:
        rng = np.random.default_rng([self.seed, i])
        filled = self.filled()
        F, f = shared_fitness(self.scores, self.alpha)
        f = np.where(filled, f, 0.0)
        probs = f / f.sum() if f.sum() > 0 else filled / filled.sum()
        if self.use_attraction:
            p1 = int(rng.choice(self.P, p=probs))
            g = np.where(filled, attraction(F, p1), 0.0)
            if g.sum() > 0:
                p2 = int(rng.choice(self.P, p=g / g.sum()))
            else:  # nobody attracts p1: draw by fitness among the others
                others = probs.copy()
                others[p1] = 0.0
                if others.sum() > 0:
                    p2 = int(rng.choice(self.P, p=others / others.sum()))
                else:
                    rest = filled.copy()
                    rest[p1] = False
                    p2 = int(rng.choice(np.flatnonzero(rest))) if rest.any() else p1
        else:
            p1, p2 = (int(v) for v in rng.choice(self.P, size=2, p=probs))
        x, y = self.members[p1], self.members[p2]
        n = self.algebra.dim
        split, w = int(rng.integers(0, n)), float(rng.random())
        self.parents[i] = (p1, p2, split, w)
        if not self.use_crossover:
            child = x
        else:
            if not self.use_split:
                split = n  # t = w everywhere
            child = self._slerp(x, y, split, w)
        if self.mutation_std > 0:
            child = self.algebra.mutate(child, rng, self.mutation_std)
        return child

    def _slerp(self, x: Any, y: Any, split: int, w: float) -> Any:
        alg = self.algebra
        n = alg.dim
        if self.slerp == "global":
            cos = alg.dot(x, y) / max(math.sqrt(alg.dot(x, x) * alg.dot(y, y)), 1e-300)
            a0, b0 = slerp_coefficients(cos, w)
            a1, b1 = slerp_coefficients(cos, 1.0 - w)
            return alg.combine(x, y, split, (a0, a1), (b0, b1))
        coefs = []
        for lo, hi, t in ((0, split, w), (split, n, 1.0 - w)):
            xx, yy, xy = alg.segment_dot(x, x, lo, hi), alg.segment_dot(y, y, lo, hi), alg.segment_dot(x, y, lo, hi)
            coefs.append(slerp_coefficients(xy / max(math.sqrt(xx * yy), 1e-300), t))
        return alg.combine(x, y, split, (coefs[0][0], coefs[1][0]), (coefs[0][1], coefs[1][1]))

    # ---- state ----------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"kind": "m2n2", "archive_size": self.P, "alpha": self.alpha, "attraction": self.use_attraction,
                "crossover": self.use_crossover, "split_point": self.use_split, "slerp": self.slerp,
                "mutation_std": self.mutation_std, "seed": self.seed, "max_evals": self.max_evals, "lag": self.lag}

    def state(self) -> dict[str, Any]:
        """Settings and every applied tell (JSON). `replay` rebuilds the archive from them: children are a
        function of (seed, id, archive), so re-asking and re-telling in id order reproduces the run."""
        if not self.record:
            raise ValueError("this M2N2 was built with record=False: it keeps no history to save")
        return {"settings": self.settings(), "told": [[i, None if r is None else r.tolist()]
                                                      for i, r in self._history]}

    def replay(self, told: Sequence[tuple[int, Sequence[float] | None]]) -> None:
        for i, r in sorted(told, key=lambda t: t[0]):
            a = self.ask()
            if a is None or a.id != i:
                raise ValueError(f"replay out of step at candidate {i}")
            self.tell(i, None if r is None else 1.0, r)
