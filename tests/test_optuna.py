"""Optuna samplers behind the optimizer protocol, in searches, and their resume."""

import numpy as np
import pytest

from evomerge.search.optimizers import OptunaOptimizer


def sphere(x):
    return -float(np.sum((np.asarray(x) - 0.3) ** 2))


@pytest.mark.parametrize("sampler", ["cmaes", "tpe", "gp", "random", "nsga2"])
def test_each_sampler_through_the_protocol(sampler):
    opt = OptunaOptimizer(3, [0.5] * 3, [0.0] * 3, [1.0] * 3, sampler=sampler, seed=1,
                          max_evals=14 if sampler == "gp" else 30)
    seen = []
    while not opt.stop():
        batch = []
        while len(batch) < 4 and (a := opt.ask()) is not None:
            batch.append(a)
        for a in batch:
            assert a.x.shape == (3,) and np.all((a.x >= 0) & (a.x <= 1))
            opt.tell(a.id, None if a.id == 3 else sphere(a.x))  # one failure, told as such
            seen.append(a.id)
    assert sorted(seen) == list(range(opt.max_evals))
    assert opt.ask() is None and opt.best()[1] == max(sphere(list(t.params.values())) for t in opt.study.trials
                                                     if t.number != 3)
    # the failure is kept, told below every success told before it (not forgotten as an Optuna FAIL)
    values = {t.number: t.value for t in opt.study.trials}
    assert all(t.state.name == "COMPLETE" for t in opt.study.trials) and values[3] < min(values[n] for n in range(3))


def test_optuna_cmaes_defaults_are_the_evomerge_paper_setup():
    opt = OptunaOptimizer(6, [0.5] * 6, [0.0] * 6, [1.0] * 6, sampler="cmaes", seed=0, max_evals=8)
    xs = [opt.ask().x for _ in range(8)]
    # mean at the middle of the bounds, sigma0 = 1/6: the first generation spreads about 0.5 by ~1/6
    assert abs(np.mean(xs) - 0.5) < 0.1 and 0.08 < np.std(xs) < 0.3


def test_restore_from_records_continues_without_reusing_ids():
    opt = OptunaOptimizer(2, [0.5] * 2, [0.0] * 2, [1.0] * 2, sampler="tpe", seed=0, max_evals=10)
    records = []
    for _ in range(5):
        a = opt.ask()
        records.append({"type": "eval", "id": a.id, "x": list(a.x), "fitness": sphere(a.x)})
        opt.tell(a.id, sphere(a.x))
    del records[3]  # in flight when the controller died: not recorded
    again = OptunaOptimizer(2, [0.5] * 2, [0.0] * 2, [1.0] * 2, sampler="tpe", seed=0, max_evals=10)
    assert again.restore(records) == {0, 1, 2, 4}
    ids = []
    while (a := again.ask()) is not None:
        ids.append(a.id)
        again.tell(a.id, sphere(a.x))
    assert ids == [5, 6, 7, 8, 9, 10] and again.stop()  # budget counts recorded evaluations (4 + 6)


def test_search_with_optuna_storage_resumes_the_study(micro_zoo, ray_local, tmp_path):
    import optuna

    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    def cfg(budget):
        return parse_config({
            "models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
            "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}},
            "objective": {"include_path": str(micro_zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}],
                          "limit": 20},
            "optimizer": {"kind": "optuna", "sampler": "tpe", "storage": "study.db", "seed": 0, "budget": budget},
            "workers": {"count": 2, "cpus": 1}}, micro_zoo)

    Controller(cfg(5), tmp_path / "run", progress=False).run()
    Controller(cfg(8), tmp_path / "run", resume=True, progress=False).run()
    evals = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"]
    assert sorted(r["id"] for r in evals) == list(range(8)) and all(r["fitness"] is not None for r in evals)
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    done = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert done == {r["id"]: r["fitness"] for r in evals}  # the study is the run's record too


def test_pareto_front_bookkeeping():
    from evomerge.run.records import pareto_front

    def rec(i, a, b):
        return {"id": i, "fitness": (a + b) / 2, "metrics": {"a": a, "b": b}, "recipe": {}}

    evals = [rec(0, 0.9, 0.1), rec(1, 0.5, 0.5), rec(2, 0.4, 0.4), rec(3, 0.1, 0.9), rec(4, 0.5, 0.5),
             {"id": 5, "fitness": None, "metrics": None, "recipe": {}}, rec(6, 0.9, 0.05)]
    front = pareto_front(evals, ["a", "b"])
    assert [r["id"] for r in front] == [0, 1, 3] or [r["id"] for r in front] == [1, 0, 3]
    assert {r["id"] for r in front} == {0, 1, 3}  # 2 and 6 dominated, 4 ties 1 (kept once), 5 failed


def test_multi_objective_search_keeps_a_front_and_exports_a_pick(micro_zoo, ray_local, tmp_path):
    import subprocess
    import sys

    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.status import status

    cfg = parse_config({
        "models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
        "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}},
        "objective": {"include_path": str(micro_zoo / "tasks"), "multi": True, "limit": 20,
                      "tasks": [{"name": "zoo_shift_search"}, {"name": "zoo_mirror_search"}]},
        "optimizer": {"kind": "optuna", "sampler": "nsga2", "popsize": 4, "seed": 0, "budget": 8},
        "workers": {"count": 2, "cpus": 1}}, micro_zoo)
    Controller(cfg, tmp_path / "run", progress=False).run()
    st = status(tmp_path / "run")
    front = st["front"]
    assert front and all(set(r["metrics"]) == {"zoo_shift_search", "zoo_mirror_search"} for r in front)
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(tmp_path / "run"), "--pick",
                          str(len(front) - 1), "--out", str(tmp_path / "picked")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"evaluation {front[-1]['id']}" in (tmp_path / "picked" / "README.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(tmp_path / "run"), "--pick", "99",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "the front has" in bad.stderr and not (tmp_path / "x").exists()
