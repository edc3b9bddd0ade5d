"""What a config searches with: its space (parameter, method choice, data-flow, M2N2), its optimizer and
its fitness policy, each built from the config (the pre-flight that checks them is run/check.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.config import SearchConfig
from evomerge.run.rundir import RunDir
from evomerge.search.dfs_space import DataflowSpace
from evomerge.search.optimizers import CMAES
from evomerge.search.space import ParameterSpace


def make_space(cfg: SearchConfig):
    from evomerge.merge.sources import open_source

    if cfg.search == "m2n2":
        from evomerge.run.config import M2N2Spec
        from evomerge.search.piecewise_space import M2N2Space

        spec = cfg.m2n2 or M2N2Spec()
        seeds = spec.seeds or list(cfg.models)
        return M2N2Space({n: cfg.models[n] for n in seeds}, spec.blocks)
    if cfg.search == "dataflow":
        d = cfg.dataflow
        names = [d.head, *[p for p in d.partners if p != d.head]]
        layers = {n: open_source(n, cfg.models[n]).num_layers or 0 for n in names}
        return DataflowSpace(models={n: cfg.models[n] for n in names}, layers=layers, repeats=d.repeats,
                             scales=d.scales, scale_bounds=d.scale_bounds, max_hops=d.max_hops)
    ref = cfg.base or next(iter(cfg.models))
    num_layers = open_source(ref, cfg.models[ref]).num_layers or 1
    s = cfg.space
    if isinstance(s.method, str):
        return ParameterSpace(method=s.method, models=cfg.models, base=cfg.base, num_layers=num_layers,
                              granularity=s.granularity, filters=s.filters, embed_head=s.embed_head,
                              search=s.search, bounds=s.bounds, fixed=s.fixed, x0=s.x0, seed=cfg.seed,
                              dtype=s.dtype)
    from evomerge.merge.methods import get_method
    from evomerge.search.space import MethodChoiceSpace

    spaces = []
    for name in s.method:  # each method takes the settings that name its parameters
        known = {p.name for p in get_method(name).tensor_params + get_method(name).global_params}
        own = lambda d, known=known: {k: v for k, v in d.items() if k in known}  # noqa: E731
        x0 = own(s.x0) if isinstance(s.x0, dict) else s.x0
        search = [p for p in s.search if p in known] if s.search is not None else None
        spaces.append(ParameterSpace(method=name, models=cfg.models, base=cfg.base, num_layers=num_layers,
                                     granularity=s.granularity, filters=s.filters, embed_head=s.embed_head,
                                     search=search or None, bounds=own(s.bounds), fixed=own(s.fixed), x0=x0,
                                     seed=cfg.seed, dtype=s.dtype))
    return MethodChoiceSpace(spaces)


def make_optimizer(cfg: SearchConfig, space, run_dir: Path | None = None):
    o = cfg.optimizer
    if o.kind == "optuna" and cfg.search in ("parameter", "dataflow"):
        from evomerge.search.optimizers import OptunaOptimizer

        storage = o.storage
        if storage and "://" not in storage and not Path(storage).is_absolute() and run_dir is not None:
            inside = (run_dir / storage).resolve()
            if not inside.is_relative_to(Path(run_dir).resolve()):
                raise EvomergeError(f"optimizer.storage '{o.storage}' points outside the run directory",
                                    "give a file name inside the run directory (e.g. study.db) or an absolute "
                                    "path or URL you choose deliberately")
            storage = str(inside)
        explicit = o.model_fields_set
        budget, popsize, sigma0 = o.budget, o.popsize, o.sigma0 if "sigma0" in explicit else None
        if cfg.search == "dataflow":  # the dataflow section's own settings win, as with pycma
            d = cfg.dataflow
            budget, popsize, sigma0 = d.budget or budget, d.popsize or popsize, d.sigma0
        return OptunaOptimizer(space.dim, space.x0, space.lower, space.upper, sampler=o.sampler, seed=o.seed,
                               max_evals=budget, popsize=popsize,
                               objectives=len(cfg.objective.tasks) if cfg.objective.multi else 1,
                               sigma0=sigma0, storage=storage,
                               categorical=getattr(space, "categorical", None),
                               use_x0=cfg.search == "dataflow" or (cfg.space is not None and cfg.space.x0 is not None))
    if cfg.search == "m2n2":
        from evomerge.run.config import M2N2Spec
        from evomerge.search.optimizers import M2N2
        from evomerge.search.piecewise_space import PiecewiseAlgebra

        m = cfg.m2n2 or M2N2Spec()
        return M2N2(space.seeds(_earlier_runs(m.seed_runs), m.seed_top), archive_size=m.archive_size, alpha=m.alpha,
                    attraction=m.attraction, crossover=m.crossover, split_point=m.split_point, slerp=m.slerp,
                    seed=o.seed, max_evals=o.budget, lag=m.lag or cfg.workers.count,
                    algebra=PiecewiseAlgebra(space.gram))
    if cfg.search == "dataflow":
        d = cfg.dataflow
        return CMAES(space.dim, space.x0, d.sigma0, space.lower, space.upper, seed=o.seed,
                     popsize=d.popsize or o.popsize, max_evals=d.budget or o.budget, diagonal=o.diagonal,
                     eval_x0=True, restarts=o.restarts, asynchronous=o.asynchronous)
    return CMAES(space.dim, space.x0, o.sigma0, space.lower, space.upper, seed=o.seed, popsize=o.popsize,
                 max_evals=o.budget, diagonal=o.diagonal, restarts=o.restarts, asynchronous=o.asynchronous)


def _earlier_runs(runs: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The ledger records of each earlier run an M2N2 search seeds from (m2n2.seed_runs)."""
    out = {}
    for run in runs:
        rd = RunDir(run)
        if not rd.exists():
            raise EvomergeError(f"m2n2.seed_runs: '{run}' is not a run directory", "give an earlier m2n2 --run-dir")
        out[run] = rd.records()
    return out


def make_policy(cfg: SearchConfig):
    """The fitness policy the objective asks for (search/fitness/policy.py): every item by default, racing, or the
    item-response-theory estimate (the config refuses both at once)."""
    from evomerge.search.fitness.policy import Estimate, FullSet, Racing

    o = cfg.objective
    if o.racing is not None:
        return Racing(o.racing.top_k)
    if o.estimate is not None:
        e = o.estimate
        return Estimate(e.calibration, e.items, e.rescore_margin, [t.name for t in o.tasks],
                        [t.weight for t in o.tasks])
    return FullSet()
