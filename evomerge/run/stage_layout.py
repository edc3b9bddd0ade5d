"""A hybrid (PS then DFS) run directory: where its stages live and the config each stage runs."""

from __future__ import annotations

from pathlib import Path

from evomerge.run.config import SearchConfig
from evomerge.run.rundir import RunDir


def stage_configs(cfg: SearchConfig, run_dir: Path) -> tuple[SearchConfig, SearchConfig]:
    """The two stage configs of a hybrid search."""
    ps = cfg.model_copy(update={"search": "parameter", "dataflow": None, "run_dir": None})
    d = cfg.dataflow
    models = {PS_MERGE: str(run_dir / "ps-best"), **{n: cfg.models[n] for n in d.partners}}
    dfs = cfg.model_copy(update={"search": "dataflow", "models": models, "base": None, "space": None,
                                 "dataflow": d.model_copy(update={"head": PS_MERGE}), "run_dir": None})
    return ps, dfs


def with_budget(cfg: SearchConfig, run_dir: Path, budget: int) -> SearchConfig:
    """`resume --budget N`: the budget of the stage still to run. A plain search's; in a hybrid, the PS
    stage's while it runs (the DFS stage keeps the budget it had), else the DFS stage's (the PS merge it
    builds on is exported and stays as it is)."""
    o, d = cfg.optimizer, cfg.dataflow
    if cfg.search == "hybrid":
        if stage_dirs(Path(run_dir))["ps-best"].exists():
            return cfg.model_copy(update={"dataflow": d.model_copy(update={"budget": budget})})
        return cfg.model_copy(update={"optimizer": o.model_copy(update={"budget": budget}),
                                      "dataflow": d.model_copy(update={"budget": d.budget or o.budget})})
    cfg = cfg.model_copy(update={"optimizer": o.model_copy(update={"budget": budget})})
    if cfg.search == "dataflow" and d.budget is not None:
        cfg = cfg.model_copy(update={"dataflow": d.model_copy(update={"budget": budget})})
    return cfg


def stage_dirs(run_dir: Path) -> dict[str, Path]:
    return {"ps": run_dir / "ps", "ps-best": run_dir / "ps-best", "dfs": run_dir / "dfs"}


def stage_done(run_dir: Path, budget: int) -> bool:
    rd = RunDir(run_dir)
    return rd.exists() and sum(1 for r in rd.records() if r["type"] == "eval") >= budget


PS_MERGE = "ps_merge"
