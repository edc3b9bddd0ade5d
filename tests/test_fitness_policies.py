"""One suite over every fitness policy (full, racing, IRT estimate), on synthetic searches with known truth
(evomerge.search.fitness.sim): racing's false-stop rate stays within its delta, the recorded fitness of the pick
is its true score, and the picks lose little true score for the items they save."""

import numpy as np
import pytest

from evomerge.search.fitness.sim import POLICIES, make_world, run_policy

WORLDS = range(12)


@pytest.fixture(scope="module")
def outcomes():
    return {p: [run_policy(make_world(s), p, seed=s) for s in WORLDS] for p in POLICIES}


def mean(xs):
    return float(np.mean(list(xs)))


def test_full_scoring_is_the_reference(outcomes):
    assert all(o.loss == 0 and o.pick_bias == 0 and o.bias == 0 for o in outcomes["full"])


def test_racing_stops_a_candidate_that_would_reach_the_threshold_at_most_delta_of_the_time(outcomes):
    rs = outcomes["racing"]
    at_risk, false = sum(o.at_risk for o in rs), sum(o.false_stops for o in rs)
    assert at_risk >= 50 and false / at_risk <= 0.05
    assert sum(o.raced for o in rs) > 100  # it does stop candidates (and saves items)
    assert mean(o.items for o in rs) < 0.75 * mean(o.items for o in outcomes["full"])
    assert all(o.pick_bias == 0 for o in rs) and mean(o.loss for o in rs) <= 0.005
    assert abs(mean(o.bias for o in rs)) <= 0.03  # raced candidates record their mean on the items seen


def test_estimate_picks_by_full_scores_and_loses_less_than_trusting_estimates(outcomes):
    est, unchecked = outcomes["estimate"], outcomes["estimate-unchecked"]
    assert all(o.pick_bias == 0 for o in est)  # the pick's recorded fitness is its full-set score
    assert mean(o.loss for o in est) < 0.6 * mean(o.loss for o in unchecked)
    assert mean(o.items for o in est) < 0.5 * mean(o.items for o in outcomes["full"])


def test_policies_are_deterministic_per_seed():
    w = make_world(3)
    for p in POLICIES:
        assert run_policy(w, p, seed=3) == run_policy(w, p, seed=3)
