"""Racing: stop scoring a candidate once it cannot reach the current top-k with high probability.

A candidate's items are scored in chunks. After each chunk, with s the sum of its per-item scores (each in
[0, 1]) over the n items scored so far and N items in all, the full-set mean is (s + S_rest) / N. The rest
of the items are assumed exchangeable with the scored ones, so S_rest / (N - n) is bounded above, with
probability 1 - delta, by p_hat + sqrt(ln(1/delta) / (2 n)) (Hoeffding), capped at 1. If even that
upper bound leaves the candidate below the threshold (the k-th best full-set fitness so far), scoring stops.

    should_stop(scored_sum=12, scored=40, total=200, threshold=0.8, delta=0.05)  -> True
"""

from __future__ import annotations

import math


def upper_bound(scored_sum: float, scored: int, total: int, delta: float) -> float:
    """A 1 - delta upper confidence bound of the full-set mean score."""
    if scored >= total:
        return scored_sum / total
    if scored == 0:
        return 1.0
    p_hat = scored_sum / scored
    rest = min(1.0, p_hat + math.sqrt(math.log(1.0 / delta) / (2.0 * scored)))
    return (scored_sum + rest * (total - scored)) / total


def should_stop(scored_sum: float, scored: int, total: int, threshold: float | None, delta: float = 0.05) -> bool:
    return threshold is not None and scored < total and upper_bound(scored_sum, scored, total, delta) < threshold


def chunks(n: int, count: int) -> list[range]:
    """Item index ranges [0, n) in `count` nearly equal consecutive chunks."""
    count = max(1, min(count, n))
    edges = [round(i * n / count) for i in range(count + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]
