"""Estimate a candidate's full-set score from a few items with item-response theory (as MERGE3 does).

A two-parameter logistic (2PL) model says candidate j answers item i correctly with probability

    p_i(theta_j) = sigmoid(a_i * (theta_j - b_i))        a_i: discrimination, b_i: difficulty

The search first scores `calibration` candidates on every item; the item parameters are fitted on that
response matrix (joint MAP with weak priors, scipy L-BFGS). It then picks the `items` anchor items that
tell good candidates apart best (largest Fisher information a^2 p (1 - p) around the abilities of the better
calibration candidates). Every later candidate is scored on the anchors only; its ability is the MAP
estimate from those answers, and its estimated full-set score is the p-IRT estimate

    (sum of the observed anchor scores + sum over the other items of p_i(theta)) / number of items.

Items must score in [0, 1] (accuracy-like metrics); fractional scores are treated as soft labels.
One model per task: a multi-task objective gets anchors in proportion to each task's item count.
Everything here is plain numpy over score matrices; it knows nothing about models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError

PRIOR_THETA = 1.0  # sd of the ability prior (abilities are standardised by it)
PRIOR_LOG_A = 0.5  # sd of log discrimination
PRIOR_B = 2.0  # sd of difficulty


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class Irt2PL:
    """Fitted item parameters of one task, and the calibration respondents' abilities."""

    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray  # calibration respondents

    @property
    def n_items(self) -> int:
        return len(self.a)

    def p(self, theta: float) -> np.ndarray:
        return _sigmoid(self.a * (theta - self.b))

    def information(self, theta: float) -> np.ndarray:
        p = self.p(theta)
        return self.a ** 2 * p * (1 - p)

    def ability(self, idx: list[int] | np.ndarray, y: list[float] | np.ndarray) -> float:
        """MAP ability from scores `y` on items `idx` (Newton steps on a concave log-posterior)."""
        idx, y = np.asarray(idx, dtype=int), np.asarray(y, dtype=float)
        a, b = self.a[idx], self.b[idx]
        t = float(np.mean(self.theta))
        for _ in range(50):
            p = _sigmoid(a * (t - b))
            grad = float(np.sum(a * (y - p))) - t / PRIOR_THETA ** 2
            hess = -float(np.sum(a ** 2 * p * (1 - p))) - 1 / PRIOR_THETA ** 2
            step = grad / hess
            t -= float(np.clip(step, -2.0, 2.0))
            if abs(step) < 1e-8:
                break
        return t

    def estimate(self, idx: list[int] | np.ndarray, y: list[float] | np.ndarray) -> float:
        """p-IRT estimate of the full-set mean score from scores `y` on items `idx`."""
        idx = np.asarray(idx, dtype=int)
        p = self.p(self.ability(idx, y))
        seen = np.zeros(self.n_items, dtype=bool)
        seen[idx] = True
        return float((np.sum(y) + np.sum(p[~seen])) / self.n_items)

    def anchors(self, n: int) -> list[int]:
        """The n items that separate the better half of the calibration candidates (and a step beyond the
        best of them, where the search is headed) most: largest summed Fisher information there."""
        n = min(n, self.n_items)
        top = np.sort(self.theta)[len(self.theta) // 2:]
        points = [*top, float(top.max()) + 0.5]
        info = sum(self.information(t) for t in points)
        order = np.lexsort((np.arange(self.n_items), -info))  # ties broken by item index: deterministic
        return sorted(int(i) for i in order[:n])


def fit_2pl(scores: np.ndarray, iters: int = 500) -> Irt2PL:
    """Joint MAP fit of a 2PL model to a respondents x items matrix of scores in [0, 1]."""
    from scipy.optimize import minimize

    y = np.asarray(scores, dtype=float)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"need a respondents x items matrix with at least 2 of each, got shape {y.shape}")
    if np.any(y < 0) or np.any(y > 1) or not np.all(np.isfinite(y)):
        raise EvomergeError("the item-response estimate needs per-item scores in [0, 1] (accuracy-like)",
                            "use it with accuracy or exact-match metrics, or turn objective.estimate off")
    n, m = y.shape
    # start: abilities from standardised totals, difficulties from item means
    tot = y.mean(axis=1)
    theta0 = (tot - tot.mean()) / (tot.std() + 1e-6)
    mean = np.clip(y.mean(axis=0), 0.02, 0.98)
    x0 = np.concatenate([theta0, np.zeros(m), -np.log(mean / (1 - mean))])

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        th, la, b = x[:n], x[n:n + m], x[n + m:]
        a = np.exp(la)
        z = a[None, :] * (th[:, None] - b[None, :])
        # Bernoulli log-likelihood, stable: y*z - log(1+e^z)
        ll = np.sum(y * z - np.logaddexp(0.0, z))
        r = y - _sigmoid(z)  # d ll / d z
        g_th = np.sum(r * a[None, :], axis=1) - th / PRIOR_THETA ** 2
        g_la = np.sum(r * (th[:, None] - b[None, :]), axis=0) * a - la / PRIOR_LOG_A ** 2
        g_b = -np.sum(r, axis=0) * a - b / PRIOR_B ** 2
        lp = ll - 0.5 * (np.sum(th ** 2) / PRIOR_THETA ** 2 + np.sum(la ** 2) / PRIOR_LOG_A ** 2
                         + np.sum(b ** 2) / PRIOR_B ** 2)
        return -lp, -np.concatenate([g_th, g_la, g_b])

    res = minimize(loss, x0, jac=True, method="L-BFGS-B", options={"maxiter": iters})
    x = res.x
    return Irt2PL(a=np.exp(x[n:n + m]), b=x[n + m:], theta=x[:n])


@dataclass(frozen=True)
class Estimator:
    """Per-task IRT models and anchors for an objective: which items to score, and the estimated metrics."""

    models: dict[str, Irt2PL]
    anchors: dict[str, list[int]]
    calibrated_on: list[int]  # evaluation ids of the calibration candidates

    @classmethod
    def calibrate(cls, rows: dict[int, dict[str, list[float]]], tasks: list[str], items: int) -> Estimator:
        """Fit on `rows` (eval id -> per-task item scores on every item), anchors split across tasks in
        proportion to their item counts (at least 2 each)."""
        ids = sorted(rows)
        sizes = {t: len(rows[ids[0]][t]) for t in tasks}
        total = sum(sizes.values())
        models, anchors = {}, {}
        for t in tasks:
            mat = np.array([rows[i][t] for i in ids], dtype=float)
            models[t] = fit_2pl(mat)
            share = max(2, round(items * sizes[t] / total))
            anchors[t] = models[t].anchors(share)
        return cls(models, anchors, ids)

    def samples(self) -> dict[str, list[int]]:
        return {t: list(v) for t, v in self.anchors.items()}

    def metrics(self, items: dict[str, list[float]]) -> dict[str, float]:
        """Estimated full-set metric per task from scores on the anchors (in anchor order)."""
        return {t: self.models[t].estimate(self.anchors[t], items[t]) for t in self.models}

    def to_record(self) -> dict[str, Any]:
        return {"type": "irt", "calibrated_on": self.calibrated_on,
                "tasks": {t: {"a": [round(float(v), 8) for v in m.a], "b": [round(float(v), 8) for v in m.b],
                              "theta": [round(float(v), 8) for v in m.theta], "anchors": self.anchors[t]}
                          for t, m in self.models.items()}}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Estimator:
        models = {t: Irt2PL(np.array(v["a"]), np.array(v["b"]), np.array(v["theta"])) for t, v in rec["tasks"].items()}
        return cls(models, {t: list(v["anchors"]) for t, v in rec["tasks"].items()}, list(rec["calibrated_on"]))
