"""Fitness policies on synthetic searches with known truth: what each records, what it would pick, at what cost.

A world is a task of `items` items with 2PL parameters and a stream of `candidates` (abilities rising
noisily, as a search's do); each candidate's full response vector is drawn once, so its TRUE fitness is
its mean over every item (what the objective means). A policy sees the candidates in order and, like the
controller, records a fitness for each and picks a winner:

    full       every item; the pick is the best mean (the reference: loss 0, bias 0)
    racing     chunks of shuffled items, stopped once the Serfling bound (delta split over the looks) says
               it cannot beat the best full score so far; a raced candidate never becomes the pick
    estimate   the first `calibration` candidates on every item, then the IRT anchors only; an estimate
               above the full-scored incumbent minus `margin` is re-scored on every item, and only full
               scores pick (the controller's rule, objective.estimate.rescore_margin)
    estimate-unchecked   as estimate, picking by the estimates themselves (evomerge before issue 28)

Per policy and world: items scored, the pick's true-score loss against the true best, the bias of the
pick's recorded fitness, the mean bias of all recorded fitnesses, and (racing) how often a candidate
whose true score would have beaten the threshold was stopped. Plain numpy; used by
tests/test_fitness_policies.py and benchmarks/fitness_policies.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.search.fitness.irt import Estimator, _sigmoid
from evomerge.search.fitness.racing import race

POLICIES = ("full", "racing", "estimate", "estimate-unchecked")


@dataclass
class World:
    responses: np.ndarray  # candidates x items, 0/1

    @property
    def truth(self) -> np.ndarray:
        return self.responses.mean(axis=1)


def make_world(seed: int, candidates: int = 60, items: int = 200) -> World:
    rng = np.random.default_rng([seed, 2028])
    a, b = np.exp(rng.normal(0.0, 0.5, items)), rng.normal(-0.5, 1.2, items)
    theta = np.linspace(-1.0, 1.0, candidates) + rng.normal(0.0, 0.6, candidates)
    p = _sigmoid(a[None, :] * (theta[:, None] - b[None, :]))
    return World((rng.random(p.shape) < p).astype(float))


@dataclass
class Outcome:
    policy: str
    items: int  # items scored over the whole run
    pick: int  # candidate index
    loss: float  # true best - true score of the pick
    pick_bias: float  # recorded - true, for the pick
    bias: float  # mean recorded - true over every candidate with a recorded fitness
    false_stops: int = 0  # racing: stopped although its true score reached the threshold
    at_risk: int = 0  # racing: candidates whose true score reached the threshold they raced against
    raced: int = 0


def run_policy(world: World, policy: str, *, seed: int = 0, chunks: int = 4, delta: float = 0.05,
               calibration: int = 8, anchors: int = 20, margin: float = 0.05) -> Outcome:
    y, truth = world.responses, world.truth
    n, m = y.shape
    recorded = np.full(n, np.nan)
    eligible = np.zeros(n, dtype=bool)  # may be picked (a full score)
    items = 0
    false_stops = at_risk = raced = 0
    if policy == "full":
        recorded[:], eligible[:], items = truth, True, n * m
    elif policy == "racing":
        best = None
        for i in range(n):
            r = race(lambda ids, i=i: y[i, ids], m, best, chunks, delta, seed)
            items += len(r["ids"])
            recorded[i] = r["fitness"]
            at_risk += int(best is not None and truth[i] >= best)
            if r["raced"]:
                raced += 1
                false_stops += int(truth[i] >= best)
            else:
                eligible[i] = True
                best = r["fitness"] if best is None else max(best, r["fitness"])
    elif policy in ("estimate", "estimate-unchecked"):
        rows = {i: {"t": list(y[i])} for i in range(calibration)}
        recorded[:calibration], eligible[:calibration], items = truth[:calibration], True, calibration * m
        est = Estimator.calibrate(rows, ["t"], anchors)
        idx = est.anchors["t"]
        best = float(truth[:calibration].max())
        full_of: dict[int, float] = {}
        for i in range(calibration, n):
            items += len(idx)
            recorded[i] = est.metrics({"t": list(y[i, idx])})["t"]
            if policy == "estimate-unchecked":
                eligible[i] = True
            elif recorded[i] > best - margin:  # re-score on every item; only that score can make it the pick
                items += m
                full_of[i] = float(truth[i])
                eligible[i] = True
                best = max(best, full_of[i])
        score_for_pick = recorded.copy()
        for i, f in full_of.items():
            score_for_pick[i] = f
        pick = int(np.nanargmax(np.where(eligible, score_for_pick, np.nan)))
        rec_pick = score_for_pick[pick]
        return Outcome(policy, items, pick, float(truth.max() - truth[pick]), float(rec_pick - truth[pick]),
                       float(np.nanmean(recorded - truth)))
    else:
        raise ValueError(f"unknown policy {policy}; choose from {POLICIES}")
    pick = int(np.nanargmax(np.where(eligible, recorded, np.nan)))
    return Outcome(policy, items, pick, float(truth.max() - truth[pick]), float(recorded[pick] - truth[pick]),
                   float(np.nanmean(recorded - truth)), false_stops, at_risk, raced)
