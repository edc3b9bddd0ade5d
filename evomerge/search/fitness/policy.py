"""Fitness policies: what a candidate must be scored on, how what comes back becomes its fitness, and what is
recorded so that a resumed run behaves the same. The controller asks its policy and never names one — the way
Optuna asks a pruner or pycma its termination criteria.

A policy sees plain ledger records (dicts with `fitness`, `items`, `raced`, `estimated`); it builds no model and
talks to no worker. The controller, for every candidate:

    if policy.holding(done, in_flight)   -> hand out nothing new yet (the IRT estimate waits for its calibration)
    req = policy.request(done)          -> what the worker scores: every item, racing against a threshold, or
                                           a few anchor items
    res = policy.result(res, req)       -> the worker's result as a fitness (an estimate from the anchors)
    policy.wants_full_score(rec, best)  -> score it again on every item before it may become the best
    policy.after(done)                  -> records to append to the ledger (a calibration)

and, when a run resumes, `policy.restore(records)` rebuilds the policy's state from what it recorded. A record
may choose the best only if it was scored on every item (`is_full`), whatever the policy.

A new policy is one class here (and a line in `evomerge/run/spaces.py::make_policy` mapping its config section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Request:
    """What the worker scores a candidate on: every item (the default), chunk by chunk against a racing
    `threshold`, or only the doc ids in `samples` (per task)."""

    threshold: float | None = None
    samples: dict[str, list[int]] | None = None


def is_full(rec: dict[str, Any]) -> bool:
    """Whether a record's fitness is a score on every item (a raced or estimated one is not, and never chooses
    the best)."""
    return rec.get("fitness") is not None and not rec.get("raced") and not rec.get("estimated")


class FullSet:
    """Every candidate on every item of the objective (`objective.limit` makes the set a fixed subset: the first
    `limit` items of each task, the same for every candidate)."""

    name = "full"

    def restore(self, records: list[dict[str, Any]]) -> None:
        pass

    def holding(self, done: dict[int, dict[str, Any]], in_flight: int) -> bool:
        return False

    def request(self, done: dict[int, dict[str, Any]]) -> Request:
        return Request()

    def result(self, res: dict[str, Any], req: Request) -> dict[str, Any]:
        return res

    def wants_full_score(self, rec: dict[str, Any], best: dict[str, Any] | None) -> bool:
        return False

    def after(self, done: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        return []

    def keeps_items(self) -> bool:
        """Whether the controller must keep each record's per-item scores in memory (for a later fit)."""
        return False


class Racing(FullSet):
    """Stop scoring a candidate once it cannot reach the k-th best full score so far with probability 1 - delta
    (the bound and the chunks are the worker's: search/fitness/racing.py). Needs k full scores first."""

    name = "racing"

    def __init__(self, top_k: int):
        self.top_k = top_k

    def request(self, done: dict[int, dict[str, Any]]) -> Request:
        full = sorted((r["fitness"] for r in done.values() if is_full(r)), reverse=True)
        return Request(threshold=full[self.top_k - 1] if len(full) >= self.top_k else None)


class Estimate(FullSet):
    """Item-response-theory estimate (search/fitness/irt.py): the first `calibration` candidates score every item;
    then the model is fitted, recorded in the ledger (an `irt` record, so a resumed run estimates with the very
    same model), and every later candidate scores only the `items` anchors. An estimate within `margin` of the
    full-scored best (or above it) is scored again on every item, and only that score can make it the best."""

    name = "estimate"

    def __init__(self, calibration: int, items: int, margin: float, tasks: list[str], weights: list[float]):
        self.calibration, self.items, self.margin = calibration, items, margin
        self.tasks, self.weights = tasks, weights
        self.estimator: Any = None

    def restore(self, records: list[dict[str, Any]]) -> None:
        from evomerge.search.fitness.irt import Estimator

        fits = [r for r in records if r["type"] == "irt"]
        self.estimator = Estimator.from_record(fits[-1]) if fits else None

    def holding(self, done: dict[int, dict[str, Any]], in_flight: int) -> bool:
        if self.estimator is not None:
            return False
        ok = sum(1 for r in done.values() if r["fitness"] is not None and not r.get("raced"))
        return ok + in_flight >= self.calibration

    def request(self, done: dict[int, dict[str, Any]]) -> Request:
        return Request(samples=self.estimator.samples()) if self.estimator is not None else Request()

    def result(self, res: dict[str, Any], req: Request) -> dict[str, Any]:
        if req.samples is None:
            return res
        metrics = self.estimator.metrics(res["items"])
        fitness = sum(w * metrics[t] for t, w in zip(self.tasks, self.weights, strict=True)) / sum(self.weights)
        return {**res, "metrics": metrics, "fitness": fitness, "estimated": True, "sampled": req.samples}

    def wants_full_score(self, rec: dict[str, Any], best: dict[str, Any] | None) -> bool:
        f = rec.get("fitness")
        if not rec.get("estimated") or f is None:
            return False
        return best is None or f > best["fitness"] - self.margin

    def after(self, done: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Once `calibration` candidates have scored every item: fit, and the record that keeps the fit."""
        if self.estimator is not None:
            return []
        full = {i: r["items"] for i, r in sorted(done.items()) if is_full(r)}
        if len(full) < self.calibration:
            return []
        from evomerge.search.fitness.irt import Estimator

        rows = dict(list(full.items())[:self.calibration])
        self.estimator = Estimator.calibrate(rows, self.tasks, self.items)
        return [self.estimator.to_record()]

    def keeps_items(self) -> bool:
        return self.estimator is None
