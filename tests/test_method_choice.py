"""The merge method as a searched choice (evomerge.search.space.MethodChoiceSpace)."""

import numpy as np
import pytest


def _space(family, methods):
    from evomerge.search.space import MethodChoiceSpace, ParameterSpace

    models = {"base": str(family["base"]), "e1": str(family["expert1"]), "e2": str(family["expert2"])}
    return MethodChoiceSpace([ParameterSpace(method=m, models=models, base="base", num_layers=3) for m in methods])


def test_choice_gene_picks_the_method_and_blocks_round_trip(family):
    s = _space(family, ["task_arithmetic", "ties", "dare_ties"])
    assert s.categorical == {0: 3} and s.dim == 1 + 2 + 4 + 4  # weights; weights and densities
    assert s.lower[0] == 0.0 and s.upper[0] == 1.0
    rng = np.random.default_rng(0)
    seen = set()
    for gene, want in [(0.0, "task_arithmetic"), (0.34, "ties"), (0.99, "dare_ties"), (1.0, "dare_ties")]:
        x = rng.uniform(s.lower, s.upper)
        x[0] = gene
        r = s.to_recipe(x)
        seen.add(r.method)
        assert r.method == want
        i = s.choose(gene)
        block = x[s.offsets[i]:s.offsets[i] + s.spaces[i].dim]
        np.testing.assert_allclose(s.from_recipe(r)[s.offsets[i]:s.offsets[i] + s.spaces[i].dim], block, atol=1e-6)
        assert s.choose(s.from_recipe(r)[0]) == i
    assert s.to_recipe(s.x0).method == "ties"  # the middle method to start with


def test_choice_needs_distinct_methods(family):
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match="two or more different"):
        _space(family, ["ties", "ties"])


def test_optuna_sees_a_categorical_and_restores_it():
    from evomerge.search.optimizers import OptunaOptimizer

    opt = OptunaOptimizer(3, [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], sampler="tpe", seed=0, max_evals=12,
                          categorical={0: 4})
    got = []
    for _ in range(12):
        a = opt.ask()
        assert a.x[0] in (0.125, 0.375, 0.625, 0.875)  # the middle of a bin
        got.append({"type": "eval", "id": a.id, "x": list(a.x), "fitness": float(a.x[1]), "error": None})
        opt.tell(a.id, float(a.x[1]))
    assert len({g["x"][0] for g in got}) > 1
    again = OptunaOptimizer(3, [0.5] * 3, [0] * 3, [1] * 3, sampler="tpe", seed=0, max_evals=14, categorical={0: 4})
    again.restore(got)
    trials = again.study.get_trials()
    assert [t.params["x0000"] for t in trials] == [int(g["x"][0] * 4) for g in got]
    assert again.ask().id == 12


def test_a_search_over_methods_with_tpe(micro_zoo, ray_local, tmp_path):
    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir
    from evomerge.run.status import export_best

    cfg = parse_config({
        "models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
        "space": {"method": ["task_arithmetic", "ties", "dare_linear"], "search": ["weight", "density"],
                  "bounds": {"weight": [0.0, 1.5]}, "fixed": {"normalize": False}},
        "objective": {"include_path": str(micro_zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}],
                      "limit": 20},
        "optimizer": {"kind": "optuna", "sampler": "tpe", "seed": 1, "budget": 8},
        "workers": {"count": 2, "cpus": 1}}, micro_zoo)
    Controller(cfg, tmp_path / "run", progress=False).run()
    evals = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"]
    assert len(evals) == 8 and all(r["fitness"] is not None for r in evals)
    methods = {r["recipe"]["method"] for r in evals}
    assert len(methods) >= 2 and methods <= {"task_arithmetic", "ties", "dare_linear"}
    for r in evals:  # task arithmetic never gets a density; the others do
        params = r["recipe"]["models"]["shift"]["parameters"]
        assert ("density" in params) == (r["recipe"]["method"] != "task_arithmetic")
        assert r["recipe"]["parameters"].get("normalize") is False
    out = export_best(tmp_path / "run", tmp_path / "best")
    assert (out / "model.safetensors").exists() or any(out.glob("*.safetensors"))
