"""Racing: stop decisions on synthetic score streams, and a search that races on the zoo."""

import numpy as np
import pytest

from evomerge.racing import chunks, should_stop, upper_bound


def test_upper_bound_properties():
    assert upper_bound(10, 10, 10, 0.05) == 1.0  # everything scored: the exact mean
    assert upper_bound(0, 0, 100, 0.05) == 1.0  # nothing scored: no information
    assert upper_bound(5, 20, 100, 0.05) > 5 / 20  # optimistic about the rest
    assert upper_bound(5, 20, 100, 0.01) > upper_bound(5, 20, 100, 0.2)  # more confidence, looser bound
    assert upper_bound(20, 20, 100, 0.05) == 1.0  # capped


def test_racing_decisions_on_synthetic_streams():
    rng = np.random.default_rng(0)
    total, threshold = 400, 0.8
    stopped_weak = stopped_strong = 0
    for _ in range(200):
        for p, is_weak in ((0.5, True), (0.85, False)):
            s = (rng.random(total) < p).astype(float)
            stop_at = next((n for n in (100, 200, 300) if should_stop(s[:n].sum(), n, total, threshold)), None)
            if is_weak:
                stopped_weak += stop_at is not None
            else:
                stopped_strong += stop_at is not None
    assert stopped_weak == 200  # a clearly weaker candidate is always stopped, at the first chunk
    assert stopped_strong <= 200 * 0.05  # a candidate above the threshold is rarely stopped (delta = 0.05)
    assert not should_stop(10, 20, 100, None)  # no threshold yet: never stop
    parts = chunks(10, 4)
    assert len(parts) == 4 and [i for c in parts for i in c] == list(range(10))  # consecutive, covering
    assert chunks(3, 8) == [range(0, 1), range(1, 2), range(2, 3)]


def test_a_racing_search_scores_fewer_items(micro_zoo, ray_local, tmp_path):
    from evomerge.config import parse_config
    from evomerge.controller import Controller
    from evomerge.rundir import RunDir

    cfg = parse_config({
        "models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
        "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5},
        "objective": {"include_path": str(micro_zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}],
                      "racing": {"chunks": 4}},
        "optimizer": {"seed": 0, "budget": 10, "popsize": 5, "sigma0": 0.5}, "workers": {"count": 1, "cpus": 1}},
        micro_zoo)
    Controller(cfg, tmp_path / "run", progress=False).run()
    evals = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"]
    assert len(evals) == 10 and evals[0]["raced"] is False and evals[0]["items_scored"] == 100
    for r in evals:
        assert r["items_scored"] == len(r["items"]["zoo_mixed_search"])
        if r["raced"]:
            assert r["items_scored"] < 100 and r["fitness"] < max(e["fitness"] for e in evals if not e["raced"])
    assert any(r["raced"] for r in evals)  # sigma0 0.5 samples clearly worse merges: some are stopped early
    with pytest.raises(Exception, match="racing needs a single-task"):
        d = yaml_of(cfg)
        d["objective"]["tasks"].append({"name": "zoo_shift_search"})
        parse_config(d, micro_zoo)


def yaml_of(cfg):
    import yaml

    return yaml.safe_load(cfg.to_yaml())
