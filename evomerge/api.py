"""evomerge from Python: the same operations as the command line, for notebooks and scripts.

    from evomerge import api

    api.merge("recipe.yml", "out/merged")                 # any recipe or mergekit config -> a model directory
    model = api.merge_into("recipe.yml", model)           # ... or into a resident transformers model, in place
    st = api.search("search.yaml", "runs/a")              # a search; returns its status (as `status --json`)
    st = api.resume("runs/a", budget=200)                 # more evaluations (exactly as if never stopped)
    api.status("runs/a")["best"]                          # where it stands
    api.export("runs/a", "out/best")                      # the best recipe (by validation) as a model directory

Every function raises `evomerge.EvomergeError` (what is wrong, and how to fix it) on a bad input, and changes
nothing on disk when it does. Recipes may be given as a path, a dict (the YAML's content) or a Recipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.load import load_recipe, parse_recipe
from evomerge.merge.recipe import Recipe


def recipe(source: str | Path | dict[str, Any] | Any) -> Any:
    """A recipe from a YAML path, a dict or a recipe object: an evomerge recipe, a mergekit merge config, a
    data-flow path or an M2N2 piecewise member (validated as `evomerge merge` validates it)."""
    if isinstance(source, (str, Path)):
        return load_recipe(source)
    if isinstance(source, dict):
        return parse_recipe(source, "recipe")
    if hasattr(source, "to_dict") and hasattr(source, "content_hash"):
        return source
    raise EvomergeError(f"a recipe must be a YAML path, a dict or a Recipe, got {type(source).__name__}",
                        "pass the recipe's path, its parsed YAML, or api.recipe(...)'s result")


def merge(source: str | Path | dict[str, Any] | Any, out: str | Path, *, device: str = "cpu",
          max_shard_bytes: int = 5 * 2**30, progress: Callable[[int, int], None] | None = None) -> Path:
    """Build a recipe (or mergekit config) into a Hugging Face model directory `out` (which must not exist);
    returns its path. Data-flow paths are written with their input scales folded into the weights."""
    from evomerge.merge.dataflow import PathRecipe
    from evomerge.merge.export.files import check_output_path
    from evomerge.merge.export.model_dir import write_model_dir
    from evomerge.merge.export.path_dir import write_path_model
    from evomerge.merge.export.piecewise_dir import write_piecewise_model
    from evomerge.merge.piecewise import PiecewiseRecipe
    from evomerge.merge.plan import make_plan

    r = recipe(source)
    out = Path(out)
    check_output_path(out)
    if isinstance(r, PathRecipe):
        return Path(write_path_model(r, out, progress=progress))
    if isinstance(r, PiecewiseRecipe):
        return Path(write_piecewise_model(r, out))
    _check_device(device)
    plan = make_plan(r)
    try:
        write_model_dir(plan, out, device=device, max_shard_bytes=max_shard_bytes, progress=progress)
    finally:
        plan.close()
    return out


def merge_into(source: str | Path | dict[str, Any] | Any, model: Any = None, *, dtype: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> Any:
    """Build a parameter-space recipe into a resident transformers model, in place, and return it: `model` (of
    the sources' architecture; its parameters are overwritten), or, when None, the recipe's reference model
    loaded from its directory (`dtype`: the recipe's output dtype unless given). This is what a worker does for
    every candidate: no file is written."""
    from evomerge.merge.build import build_into
    from evomerge.merge.plan import make_plan
    from evomerge.merge.sources import local_model_dir

    r = recipe(source)
    if not isinstance(r, Recipe):
        raise EvomergeError(f"merge_into builds parameter-space recipes; this is a '{r.method}' recipe, whose "
                            "model has another shape than its sources", "write it with evomerge.merge(recipe, out)")
    plan = make_plan(r)
    try:
        if model is None:
            import torch
            from transformers import AutoModelForCausalLM

            ref = plan.reference
            model = AutoModelForCausalLM.from_pretrained(local_model_dir(ref, r.models[ref].path),
                                                         dtype=getattr(torch, dtype or plan.out_dtype))
        build_into(plan, dict(model.state_dict()), progress=progress)
    finally:
        plan.close()
    return model


def check(config: str | Path, *, address: str | None = None):
    """The pre-flight report of a search config (as `evomerge check`): sources, shapes, vocabularies, tasks and
    resources, without reading a weight. Returns the report; `report.raise_if_failed()` raises on an error."""
    from evomerge.run.check import check_config
    from evomerge.run.config import load_config

    return check_config(load_config(config), str(config), address or os.environ.get("RAY_ADDRESS"))


def search(config: str | Path, run_dir: str | Path | None = None, *, address: str | None = None,
           progress: bool = True, report_every: float = 0.0) -> dict[str, Any]:
    """Run a search (as `evomerge search`): the same pre-flight, then the search into `run_dir` (default: the
    config's run_dir), which must not hold one. Returns the run's status (as `evomerge status --json`)."""
    from evomerge.run.check import check_config
    from evomerge.run.config import load_config
    from evomerge.run.rundir import check_new_run_dir

    cfg = load_config(config)
    rd = Path(run_dir) if run_dir is not None else (Path(cfg.run_dir) if cfg.run_dir else None)
    if rd is None:
        raise EvomergeError("no run directory given", "pass --run-dir DIR (run_dir= from Python) or set "
                            "run_dir in the config")
    check_new_run_dir(rd)
    address = address or os.environ.get("RAY_ADDRESS")
    check_config(cfg, str(config), address).raise_if_failed()
    return _run(cfg, rd, address, False, progress, report_every)


def resume(run_dir: str | Path, *, budget: int | None = None, accept_edits: bool = False,
           address: str | None = None, progress: bool = True, report_every: float = 0.0) -> dict[str, Any] | None:
    """Continue a stopped or killed search (as `evomerge resume`), raising its budget to `budget` evaluations if
    given; `accept_edits`: take hand edits of RUN/config.yaml that change only where and how fast it runs (worker
    count, resources, timeout), recorded in the ledger. Returns its status, or None when there is nothing to do
    (the budget is spent: raise it)."""
    from evomerge.run.config import load_config
    from evomerge.run.rundir import RunDir
    from evomerge.run.stage_layout import with_budget
    from evomerge.run.status import check_resumable, work_left

    rd = RunDir(run_dir)
    if not rd.exists():
        raise EvomergeError(f"no search to resume in {run_dir} (no config.yaml)", "check the path")
    if budget is not None and budget < 1:  # the whole request is checked before anything is written
        raise EvomergeError(f"--budget {budget}: a budget is a number of evaluations, at least 1",
                            "give --budget N larger than the evaluations done so far")
    check_resumable(rd, accept_edits)
    cfg = load_config(rd.config_path)
    if budget is not None:
        cfg = with_budget(cfg, Path(run_dir), budget)
    if work_left(run_dir, cfg) is None:
        return None
    return _run(cfg, Path(run_dir), address or os.environ.get("RAY_ADDRESS"), True, progress, report_every)


def _run(cfg, run_dir: Path, address: str | None, resume: bool, progress: bool, report_every: float):
    from evomerge.run.report.write import Refresher
    from evomerge.run.stages import run_search

    with Refresher(run_dir, every=report_every) as rep:  # RUN_DIR/report: refreshed while it runs, then final
        st = run_search(cfg, run_dir, address=address, resume=resume, progress=progress)
    return {**st, "report": str(rep.path) if rep.path else st.get("report")}


def status(run_dir: str | Path) -> dict[str, Any]:
    """Where a search stands (as `evomerge status --json`): evaluations, budget, failures, the best record (by
    validation where there is one) with its recipe and metrics, the Pareto front of a multi-objective run."""
    from evomerge.run.status import status as run_status

    return run_status(run_dir)


def export(run_dir: str | Path, out: str | Path, *, pick: int | None = None) -> Path:
    """Build a run's best recipe (by validation score where there is one; `pick`: a Pareto-front member of a
    multi-objective run) as a model directory, with OUT.mergekit.yml beside it where a mergekit form exists."""
    from evomerge.run.status import export_best

    return export_best(run_dir, out, pick)


def report(run_dir: str | Path, out: str | Path | None = None, *, baselines: bool = False,
           progress: bool = False) -> Path:
    """Write the run report (one HTML page and its PNGs; default RUN_DIR/report) and return the page's path."""
    from evomerge.run.report.write import build_report

    return build_report(run_dir, out, baselines=baselines, progress=progress)


def to_mergekit(source: str | Path | dict[str, Any] | Any) -> str:
    """A parameter-space recipe as mergekit YAML (what `evomerge convert` prints)."""
    from evomerge.merge.mergekit_out import mergekit_yaml

    return mergekit_yaml(recipe(source))


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvomergeError("--device cuda was given but no CUDA device is available", "use --device cpu")
    elif device != "cpu":
        raise EvomergeError(f"--device '{device}' is not supported", "use cpu or cuda")
