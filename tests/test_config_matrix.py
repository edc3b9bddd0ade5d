"""Every combination of search kind x optimizer x objective option x backend either is refused when the
config is loaded, with one message naming the conflict, or runs.

Config level: the whole matrix (5 x 6 x 5 x 2 = 300 configs) is checked against an independent table of
what must be refused. Run level: every search kind with every objective option it accepts (the
optimizers spread over them; see RUNS) runs a 4-evaluation search on the micro zoo, sharing one Ray and one
zoo; the vLLM backend's runs are in tests/test_vllm.py (an engine per run
costs too much to repeat here).
"""

from __future__ import annotations

import itertools

import pytest

from evomerge.errors import EvomergeError
from evomerge.run.config import parse_config

SEARCHES = ["parameter", "methods", "dataflow", "hybrid", "m2n2"]
OPTIMIZERS = ["cmaes", "optuna-cmaes", "optuna-tpe", "optuna-gp", "optuna-random", "optuna-nsga2"]
OBJECTIVES = ["plain", "multi", "limit", "racing", "estimate"]
BACKENDS = ["hf", "vllm"]


def expected_conflict(search: str, opt: str, objective: str, backend: str) -> set[str] | None:
    """The keys a refusal must name (any one of them), or None when the combination must run."""
    conflicts: list[set[str]] = []
    if backend == "vllm" and search == "m2n2":  # data-flow and hybrid run on vLLM since issue 32
        conflicts.append({"workers.backend"})
    if search == "m2n2" and opt != "cmaes":
        conflicts.append({"m2n2", "optimizer.kind"})
    if objective == "multi" and (search == "m2n2" or opt in ("cmaes", "optuna-cmaes")):
        conflicts.append({"objective.multi"})
    if search == "m2n2" and objective in ("racing", "estimate"):
        conflicts.append({f"objective.{objective}"})
    return set().union(*conflicts) if conflicts else None


def config(search: str, opt: str, objective: str, backend: str, zoo, budget: int = 4) -> dict:
    models = {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}
    tasks = [{"name": "zoo_mixed_search"}]
    if objective == "multi":
        tasks.append({"name": "zoo_compositional_search"})
    obj: dict = {"include_path": str(zoo / "tasks"), "tasks": tasks, "limit": 16}
    if objective == "limit":
        obj["limit"] = 8
    elif objective == "racing":
        obj["racing"] = {"chunks": 2}
    elif objective == "estimate":
        obj["estimate"] = {"items": 6, "calibration": 3}
    elif objective == "multi":
        obj["multi"] = True
    optimizer: dict = {"seed": 0, "budget": budget, "popsize": 4}
    if opt != "cmaes":
        optimizer.update(kind="optuna", sampler=opt.split("-", 1)[1])
    cfg: dict = {"models": models, "objective": obj, "optimizer": optimizer,
                 "workers": {"count": 1, "cpus": 1, "backend": backend, "batch_size": 64}}
    space = {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5}
    if search == "parameter":
        cfg.update(base="base", space=space)
    elif search == "methods":
        cfg.update(base="base", space={**space, "method": ["task_arithmetic", "ties"],
                                       "search": ["weight", "density"], "bounds": {"weight": [0.0, 1.5],
                                                                                   "density": [0.2, 1.0]}})
    elif search == "dataflow":
        cfg.update(search="dataflow", dataflow={"head": "shift", "partners": ["mirror"], "repeats": 1,
                                                "budget": budget, "popsize": 4})
    elif search == "hybrid":
        cfg.update(search="hybrid", base="base", space=space,
                   dataflow={"partners": ["mirror"], "repeats": 1, "budget": budget, "popsize": 4})
    else:
        cfg.update(search="m2n2", m2n2={"seeds": ["shift", "mirror"], "archive_size": 4})
    return cfg


MATRIX = list(itertools.product(SEARCHES, OPTIMIZERS, OBJECTIVES, BACKENDS))


@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory):
    """Paths only (config validation reads no weights)."""
    return tmp_path_factory.mktemp("fakezoo")


@pytest.mark.parametrize("search,opt,objective,backend", MATRIX)
def test_every_combination_is_accepted_or_refused_with_its_conflict(search, opt, objective, backend, fake_zoo):
    want = expected_conflict(search, opt, objective, backend)
    data = config(search, opt, objective, backend, fake_zoo)
    if want is None:
        parse_config(data, fake_zoo)
        return
    with pytest.raises(EvomergeError) as e:
        parse_config(data, fake_zoo)
    msg = str(e.value)
    assert msg.count("\n  - ") <= 1, f"one message, one conflict: {msg}"
    assert any(k in msg for k in want), f"the refusal must name {want}: {msg}"


# Run level: every search kind with every objective option it accepts, the optimizers spread over them
# (each runs in 2+ search kinds; every multi-objective sampler with multi). `limit` is left out here since
# every run already scores a limited objective (limit: 16); `hybrid` x racing is one controller per stage,
# each covered by parameter x racing and dataflow x racing. One search starts a Ray worker (~10 s), so the
# list is kept short; the optimizers themselves are covered one by one in tests/test_conformance.py.
RUNS = [
    ("parameter", "cmaes", "plain"), ("parameter", "optuna-tpe", "multi"), ("parameter", "optuna-gp", "racing"),
    ("parameter", "optuna-random", "estimate"), ("parameter", "optuna-nsga2", "plain"),
    ("methods", "optuna-cmaes", "plain"), ("methods", "optuna-gp", "multi"), ("methods", "cmaes", "racing"),
    ("methods", "optuna-tpe", "estimate"),
    ("dataflow", "cmaes", "plain"), ("dataflow", "optuna-nsga2", "multi"), ("dataflow", "optuna-tpe", "racing"),
    ("dataflow", "optuna-gp", "estimate"),
    ("hybrid", "optuna-cmaes", "plain"), ("hybrid", "optuna-random", "multi"), ("hybrid", "cmaes", "estimate"),
    ("m2n2", "cmaes", "plain"),
]


def test_the_runs_cover_every_search_kind_with_every_objective_option():
    assert all(expected_conflict(*r, "hf") is None for r in RUNS)
    covered = {(s, o) for s, _, o in RUNS}
    want = {(s, o) for s, opt, o in itertools.product(SEARCHES, OPTIMIZERS, OBJECTIVES)
            if expected_conflict(s, opt, o, "hf") is None and o != "limit"} - {("hybrid", "racing")}
    assert covered == want
    assert all(sum(r[1] == opt for r in RUNS) >= 2 for opt in OPTIMIZERS)


@pytest.mark.parametrize("search,opt,objective", RUNS)
def test_accepted_combination_runs_a_four_evaluation_search(search, opt, objective, micro_zoo, ray_local, tmp_path):
    from evomerge.run.rundir import RunDir
    from evomerge.run.stages import run_search

    cfg = parse_config(config(search, opt, objective, "hf", micro_zoo), micro_zoo)
    run_search(cfg, tmp_path / "run", progress=False)
    dirs = [tmp_path / "run" / "ps", tmp_path / "run" / "dfs"] if search == "hybrid" else [tmp_path / "run"]
    for d in dirs:
        evals = [r for r in RunDir(d).records() if r["type"] == "eval"]
        assert len(evals) == 4 and sum(r["fitness"] is not None for r in evals) >= 3, [r.get("error") for r in evals]


def test_dataflow_settings_reach_the_optuna_sampler(fake_zoo):
    """Issue 28 #8: `search: dataflow` with Optuna used to drop dataflow.popsize / sigma0 / budget."""
    from evomerge.run.spaces import make_optimizer
    from evomerge.search.dfs_space import DataflowSpace

    data = config("dataflow", "optuna-cmaes", "plain", "hf", fake_zoo)
    data["dataflow"].update(popsize=6, sigma0=0.2, budget=9)
    cfg = parse_config(data, fake_zoo)
    space = DataflowSpace(models={"shift": "/m/a", "mirror": "/m/b"}, layers={"shift": 2, "mirror": 2}, repeats=1)
    st = make_optimizer(cfg, space).settings()
    assert (st["popsize"], st["sigma0"], st["max_evals"]) == (6, 0.2, 9)


def test_resume_budget_of_a_hybrid_raises_the_stage_still_to_run(fake_zoo, tmp_path):
    """Issue 28 #8: `resume --budget` of a finished hybrid reopened the PS stage (leaving ps-best stale) and
    did not raise the DFS budget."""
    from evomerge.run.stage_layout import stage_dirs, with_budget

    cfg = parse_config(config("hybrid", "cmaes", "plain", "hf", fake_zoo, budget=4), fake_zoo)
    run = tmp_path / "run"
    running_ps = with_budget(cfg, run, 10)  # PS not exported yet: the PS budget rises, DFS keeps its own
    assert running_ps.optimizer.budget == 10 and running_ps.dataflow.budget == 4
    stage_dirs(run)["ps-best"].mkdir(parents=True)
    done_ps = with_budget(cfg, run, 12)  # PS exported: only the DFS budget rises
    assert done_ps.optimizer.budget == 4 and done_ps.dataflow.budget == 12
    assert done_ps.fingerprint() == cfg.fingerprint()  # still resumable (budgets are not part of the identity)
