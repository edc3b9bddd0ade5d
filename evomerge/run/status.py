"""Reading a run directory: its status and the export of its best recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.load import any_recipe
from evomerge.run.records import best_record, budget_of, pareto_front, score_of, with_rescores
from evomerge.run.rundir import RunDir


def _load(run_dir: str | Path) -> tuple[RunDir, Any, list[dict[str, Any]]]:
    from evomerge.run.config import load_config

    rd = RunDir(run_dir)
    if not rd.exists():
        raise EvomergeError(f"'{run_dir}' is not a run directory (no config.yaml)",
                            "give the directory a search writes its config.yaml and ledger.jsonl to (the one "
                            "`evomerge search` was started with)")
    return rd, load_config(rd.config_path), rd.records()


def _report(run_dir: Path) -> str | None:
    """The run report's page (RUN_DIR/report/index.html, see evomerge.run.report.write) once one has been written."""
    from evomerge.run.rundir import report_index

    p = report_index(run_dir)
    return None if p is None else str(p)


def status(run_dir: str | Path) -> dict[str, Any]:
    """The stable JSON status of a run (see `evomerge status --json`). For a hybrid search: the status of
    its current stage (the data-flow stage once it has started), with `stage` and every stage's summary."""
    rd, cfg, records = _load(run_dir)
    if cfg.search == "hybrid":
        from evomerge.run.stage_layout import stage_dirs

        dirs = stage_dirs(rd.path)
        stages = {k: status(dirs[k]) for k in ("ps", "dfs") if RunDir(dirs[k]).exists()}
        if not stages:
            return {"run_dir": str(rd.path), "report": _report(rd.path), "evaluations": 0,
                    "budget": cfg.optimizer.budget, "failures": 0, "evaluations_per_minute": None,
                    "best_fitness": None, "best": None, "stage": "ps", "stages": {}}
        stage = "dfs" if "dfs" in stages else "ps"
        out = {**stages[stage], "run_dir": str(rd.path), "report": _report(rd.path), "stage": stage,
               "stages": {k: {key: v[key] for key in ("evaluations", "budget", "failures", "best_fitness")}
                          for k, v in stages.items()}}
        # the final model is the data-flow stage's best unless no path beat the PS merge it started from
        ps_best, dfs_best = stages["ps"]["best"], stages.get("dfs", {}).get("best")
        if ps_best is not None and dfs_best is not None and score_of(ps_best) > score_of(dfs_best):
            out["best"] = {**ps_best, "stage": "ps"}
        elif out["best"] is not None:
            out["best"] = {**out["best"], "stage": stage}
        return out
    evals = with_rescores(records)
    vals = {r["id"]: r for r in records if r["type"] == "validation"}
    best = best_record(evals, vals)
    times = [r["time"] for r in evals]
    span = (max(times) - min(times)) / 60 if len(times) > 1 else 0.0
    per_min = (len(times) - 1) / span if span > 0 else None
    top = max((r for r in evals if r["fitness"] is not None and not r.get("raced") and not r.get("estimated")),
              key=lambda r: r["fitness"], default=None)
    extra = {"front": pareto_front(evals, [t.name for t in cfg.objective.tasks])} if cfg.objective.multi else {}
    return {**extra,
        "run_dir": str(rd.path),
        "report": _report(rd.path),
        "evaluations": len(evals),
        "budget": budget_of(cfg),
        "failures": sum(1 for r in evals if r["fitness"] is None),
        "evaluations_per_minute": per_min,
        "best_fitness": top["fitness"] if top else None,
        "best": None if best is None else {
            "id": best["id"], "fitness": best["fitness"],
            "validation": vals.get(best["id"], {}).get("fitness"),
            "metrics": best["metrics"], "recipe": best["recipe"]},
    }


def export_best(run_dir: str | Path, out: str | Path, pick: int | None = None) -> Path:
    """Build the run's best recipe into a model directory with a card that holds the scores (a hybrid
    search: the best of its data-flow stage, whose model A is the best PS merge)."""
    st = status(run_dir)
    from evomerge.merge.export.files import check_output_path

    check_output_path(Path(out))  # before the model is built: a file above --out, a read-only directory
    if st["best"] is None:
        raise EvomergeError(f"{run_dir} has no successful evaluation yet", "let the search run longer")
    if pick is not None:
        front = st.get("front")
        if front is None:
            raise EvomergeError("--pick chooses a member of a multi-objective run's Pareto front; this run has "
                                "one objective", "leave --pick out")
        if not 0 <= pick < len(front):
            raise EvomergeError(f"--pick {pick}: the front has {len(front)} members (0..{len(front) - 1})",
                                "see them with `evomerge status RUN_DIR`")
        st = {**st, "best": {**front[pick], "validation": None}}
    recipe = any_recipe(st["best"]["recipe"])
    b = st["best"]
    stage = f" (stage `{b.get('stage', st['stage'])}` of a PS+DFS hybrid)" if "stage" in st else ""
    extra = (f"## Search\n\nevomerge search in `{st['run_dir']}`{stage}: {st['evaluations']} evaluations "
             f"({st['failures']} failed) of a budget of {st['budget']}. This recipe is evaluation {b['id']}: "
             f"fitness {b['fitness']:.4f}"
             + (f", validation {b['validation']:.4f}" if b["validation"] is not None else "") + ".\n\n"
             "| task | score |\n|---|---|\n" + "".join(f"| {t} | {v:.4f} |\n" for t, v in b["metrics"].items()))
    if recipe.method == "dataflow":
        from evomerge.merge.export.path_dir import write_path_model

        path = write_path_model(recipe, out, card_extra=extra)
    elif recipe.method == "piecewise":
        from evomerge.merge.export.piecewise_dir import write_piecewise_model

        path = write_piecewise_model(recipe, out, card_extra=extra)
    else:
        from evomerge.merge.export.model_dir import write_model_dir
        from evomerge.merge.plan import make_plan

        plan = make_plan(recipe)
        try:
            path = write_model_dir(plan, out, card_extra=extra)
        finally:
            plan.close()
    from evomerge.merge.atomic import write_atomic

    mk = path / "mergekit_config.yml"
    if mk.exists():
        write_atomic(path.parent / f"{path.name}.mergekit.yml", mk.read_text())
    return path


def work_left(run_dir: str | Path, cfg) -> str | None:
    """Why resuming `run_dir` with `cfg` (its config, with any new budget) would do something, or None when its
    budget is spent and nothing is pending (no validation of the best, no re-score of an estimate owed)."""
    rd = RunDir(run_dir)
    if cfg.search == "hybrid":
        from evomerge.run.stage_layout import stage_configs, stage_dirs

        dfs_dir = stage_dirs(rd.path)["dfs"]
        if not RunDir(dfs_dir).exists():
            return "the data-flow stage has not started"
        return work_left(dfs_dir, stage_configs(cfg, rd.path)[1])
    records = rd.records()
    evals = with_rescores(records)
    if len(evals) < budget_of(cfg):
        return f"{len(evals)} of {budget_of(cfg)} evaluations done"
    rescored = {r["id"] for r in records if r["type"] == "rescore"}
    if any(r.get("estimated") and r["fitness"] is not None and r["id"] not in rescored for r in evals):
        return "an estimated candidate may be owed its full re-score"
    if cfg.validation is not None:
        vals = {r["id"]: r for r in records if r["type"] == "validation"}
        best = best_record(evals, vals)
        if best is not None and best["id"] not in vals:
            return "the best candidate is not validated yet"
    return None


def check_resumable(rd: RunDir, accept_edits: bool = False) -> list[str]:
    """Refuse, before anything is written, a run directory `resume` cannot continue as it was started: a ledger
    that is not a readable file, a config.yaml edited by hand since evomerge wrote it (its budget excepted), in
    the run and in each stage of a hybrid. With `accept_edits`, edits of where and how fast the search runs
    (OPERATIONAL_KEYS: worker count, resources, timeout) pass; they are returned, and the controller records
    them in the ledger (a `config_edit` record) when it starts."""
    from evomerge.run.rundir import BUDGET_KEYS, OPERATIONAL_KEYS, scan_ledger
    from evomerge.run.stage_layout import stage_dirs

    accepted: list[str] = []
    for d in [rd.path, *(p for k, p in stage_dirs(rd.path).items() if k != "ps-best")]:
        sub = RunDir(d)
        if d != rd.path and not sub.exists():
            continue
        scan_ledger(sub.ledger_path)
        edits = [e for e in sub.config_edits() if e.split(":", 1)[0] not in BUDGET_KEYS]
        if accept_edits:
            accepted += [e for e in edits if e.split(":", 1)[0] in OPERATIONAL_KEYS]
            edits = [e for e in edits if e.split(":", 1)[0] not in OPERATIONAL_KEYS]
        if edits:
            shown = edits[:8] + ([f"... and {len(edits) - 8} more"] if len(edits) > 8 else [])
            raise EvomergeError(f"{sub.config_path} was edited since the run was created; resuming would mix two "
                                "searches in one ledger. Changed (recorded -> now):\n"
                                + "\n".join(f"  {e}" for e in shown),
                                "put the recorded values back (or start a new --run-dir with the changed config); "
                                f"to change only the budget use `evomerge resume {rd.path} --budget N`; edits of "
                                f"{', '.join(OPERATIONAL_KEYS)} are taken with --accept-edits"
                                + (" (these are not)" if accept_edits else ""))
    return accepted
