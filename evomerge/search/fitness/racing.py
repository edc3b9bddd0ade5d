"""Racing: stop scoring a candidate once it cannot reach the current top-k with probability 1 - delta.

A candidate's N items are scored in chunks. The items are shuffled with the run's seed before they are cut
into chunks (an ordered task file would otherwise bias every chunk), so after n items the scored ones are
a uniform sample drawn WITHOUT replacement from the N. Serfling's inequality bounds the full-set mean mu
from the sample mean p_hat of n such draws of values in [0, 1]:

    P(mu - p_hat >= eps) <= exp(-2 n eps^2 / (1 - (n - 1) / N))

so mu <= p_hat + sqrt(ln(1/d) (1 - (n - 1)/N) / (2 n)) with probability 1 - d (also capped by the trivial
(s + N - n) / N: every unscored item a 1). The decision is taken at every chunk boundary but the last
(`looks` = chunks - 1 times), each look at d = delta / looks, so by the union bound a candidate whose
full-set mean reaches the threshold is stopped with probability at most delta over the whole race.

A stopped ("raced") candidate is recorded with its mean on the items it saw (flagged `raced`), an
estimate of its full-set score, never the upper bound (which is optimistic by construction).

    order = item_order(200, seed=0); parts = chunks(200, 4, seed=0)
    should_stop(scored_sum=12, scored=40, total=200, threshold=0.8, delta=0.05, looks=3)  -> True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def upper_bound(scored_sum: float, scored: int, total: int, delta: float) -> float:
    """A 1 - delta upper confidence bound of the full-set mean score from `scored` of `total` items drawn
    uniformly without replacement (Serfling), scores in [0, 1]."""
    if scored >= total:
        return scored_sum / total
    if scored == 0:
        return 1.0
    p_hat = scored_sum / scored
    eps = math.sqrt(math.log(1.0 / delta) * (1.0 - (scored - 1) / total) / (2.0 * scored))
    return min(1.0, p_hat + eps, (scored_sum + (total - scored)) / total)


def should_stop(scored_sum: float, scored: int, total: int, threshold: float | None, delta: float = 0.05,
                looks: int = 1) -> bool:
    """Whether the candidate cannot reach `threshold`: its upper bound at delta / looks is below it. `looks`:
    how many times the race may decide (chunks - 1), so the whole race errs with probability <= delta."""
    return (threshold is not None and scored < total
            and upper_bound(scored_sum, scored, total, delta / max(1, looks)) < threshold)


def item_order(n: int, seed: int) -> list[int]:
    """Item ids 0..n-1 in the run's shuffled order (the same for every candidate of a run)."""
    return [int(i) for i in np.random.default_rng([int(seed), 28]).permutation(n)]


def chunks(n: int, count: int, seed: int) -> list[list[int]]:
    """Item ids [0, n) shuffled with `seed`, cut into `count` nearly equal chunks (each sorted by id)."""
    count = max(1, min(count, n))
    order = item_order(n, seed)
    edges = [round(i * n / count) for i in range(count + 1)]
    return [sorted(order[a:b]) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def race(score: Callable[[list[int]], Sequence[float]], total: int, threshold: float | None, count: int,
         delta: float, seed: int) -> dict[str, Any]:
    """Score items chunk by chunk with `score(ids) -> scores in id order`, stopping once `should_stop`.

    Returns {"ids": the item ids scored (sorted), "scores": their scores (same order), "raced": stopped
    early, "fitness": the mean on the items scored (the exact full-set mean when not raced), "bound": the
    upper bound the decision used (None when not raced)}."""
    parts = chunks(total, count, seed)
    looks = len(parts) - 1
    got: dict[int, float] = {}
    for part in parts:
        values = [float(v) for v in score(part)]
        if len(values) != len(part):
            raise ValueError(f"scored {len(values)} items, asked for {len(part)}")
        got.update(zip(part, values, strict=True))
        s, n = sum(got.values()), len(got)
        if n < total and should_stop(s, n, total, threshold, delta, looks):
            ids = sorted(got)
            return {"ids": ids, "scores": [got[i] for i in ids], "raced": True, "fitness": s / n,
                    "bound": upper_bound(s, n, total, delta / looks)}
    ids = sorted(got)
    return {"ids": ids, "scores": [got[i] for i in ids], "raced": False, "fitness": sum(got.values()) / total,
            "bound": None}
