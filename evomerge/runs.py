"""Reading a run directory: its status and the export of its best recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.rundir import RunDir


def _load(run_dir: str | Path) -> tuple[RunDir, Any, list[dict[str, Any]]]:
    from evomerge.config import load_config

    rd = RunDir(run_dir)
    if not rd.exists():
        raise EvomergeError(f"'{run_dir}' is not a run directory (no config.yaml)", "give the --run-dir of a search")
    return rd, load_config(rd.config_path), rd.records()


def best_record(evals: list[dict[str, Any]], validations: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The best evaluation: by validation score where there is one, else by fitness."""
    ok = [r for r in evals if r["fitness"] is not None]
    if not ok:
        return None
    validated = [r for r in ok if validations.get(r["id"], {}).get("fitness") is not None]
    if validated:
        return max(validated, key=lambda r: (validations[r["id"]]["fitness"], r["fitness"]))
    return max(ok, key=lambda r: r["fitness"])


def status(run_dir: str | Path) -> dict[str, Any]:
    """The stable JSON status of a run (see `evomerge status --json`)."""
    rd, cfg, records = _load(run_dir)
    evals = [r for r in records if r["type"] == "eval"]
    vals = {r["id"]: r for r in records if r["type"] == "validation"}
    best = best_record(evals, vals)
    times = [r["time"] for r in evals]
    span = (max(times) - min(times)) / 60 if len(times) > 1 else 0.0
    per_min = (len(times) - 1) / span if span > 0 else None
    top = max((r for r in evals if r["fitness"] is not None), key=lambda r: r["fitness"], default=None)
    return {
        "run_dir": str(rd.path),
        "evaluations": len(evals),
        "budget": cfg.optimizer.budget,
        "failures": sum(1 for r in evals if r["fitness"] is None),
        "evaluations_per_minute": per_min,
        "best_fitness": top["fitness"] if top else None,
        "best": None if best is None else {
            "id": best["id"], "fitness": best["fitness"],
            "validation": vals.get(best["id"], {}).get("fitness"),
            "metrics": best["metrics"], "recipe": best["recipe"]},
    }


def export_best(run_dir: str | Path, out: str | Path) -> Path:
    """Build the run's best recipe into a model directory with a card that holds the scores."""
    from evomerge.export.model_dir import write_model_dir
    from evomerge.plan import make_plan

    st = status(run_dir)
    if st["best"] is None:
        raise EvomergeError(f"{run_dir} has no successful evaluation yet", "let the search run longer")
    recipe = Recipe.model_validate(st["best"]["recipe"])
    b = st["best"]
    extra = (f"## Search\n\nevomerge search in `{st['run_dir']}`: {st['evaluations']} evaluations "
             f"({st['failures']} failed) of a budget of {st['budget']}. This recipe is evaluation {b['id']}: "
             f"fitness {b['fitness']:.4f}"
             + (f", validation {b['validation']:.4f}" if b["validation"] is not None else "") + ".\n\n"
             "| task | score |\n|---|---|\n" + "".join(f"| {t} | {v:.4f} |\n" for t, v in b["metrics"].items()))
    plan = make_plan(recipe)
    try:
        path = write_model_dir(plan, out, card_extra=extra)
    finally:
        plan.close()
    from evomerge.rundir import write_atomic

    write_atomic(path.parent / f"{path.name}.mergekit.yml", (path / "mergekit_config.yml").read_text())
    return path
