"""A run read back for its report: its config, each stage's records (a hybrid has two) and its status."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

FAILED_ROW = "failed (worker lost or unknown)"


@dataclass
class Stage:
    """One controller's run directory: a whole run, or one stage (ps, dfs) of a hybrid."""

    key: str  # "" for a single-stage run
    path: Path
    cfg: Any  # SearchConfig
    records: list[dict[str, Any]]
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == "eval"]

    @property
    def label(self) -> str:
        return {"ps": "stage 1: parameter space", "dfs": "stage 2: data-flow"}.get(self.key, "")

    def validations(self) -> list[tuple[int, float, int]]:
        """(evaluations completed when it was recorded, validation fitness, evaluation id), in ledger order."""
        out, seen = [], 0
        for r in self.records:
            if r["type"] == "eval":
                seen += 1
            elif r["type"] == "validation" and r.get("fitness") is not None:
                out.append((seen, r["fitness"], r["id"]))
        return out


def load_run(run_dir: str | Path) -> tuple[Any, list[Stage], dict[str, Any]]:
    """(config, stages, status) of a run directory; EvomergeError with a fix when it is not one."""
    from evomerge.run.config import load_config
    from evomerge.run.rundir import RunDir
    from evomerge.run.status import status

    p = Path(run_dir)
    if not p.exists():
        raise EvomergeError(f"'{run_dir}' does not exist", "give the run directory of a search (its --run-dir, "
                                                          "e.g. runs/quickstart)")
    rd = RunDir(p)
    if not rd.exists():
        raise EvomergeError(f"'{run_dir}' is not a run directory (no config.yaml)",
                            "give the run directory of a search (its --run-dir, e.g. runs/quickstart)")
    cfg = load_config(rd.config_path)
    if cfg.search == "hybrid":
        from evomerge.run.stage_layout import stage_dirs

        dirs = stage_dirs(p)
        stages = [Stage(k, dirs[k], load_config(dirs[k] / "config.yaml"), RunDir(dirs[k]).records())
                  for k in ("ps", "dfs") if RunDir(dirs[k]).exists()]
    else:
        stages = [Stage("", p, cfg, rd.records())]
    for s in stages:
        s.status = status(s.path)
    return cfg, stages, status(p)


def ledger_baselines(cfg, stages: list[Stage]) -> list[tuple[str, dict[str, float]]]:
    """Sources the search scored itself: M2N2's seed models (ids 0..K-1), a data-flow run's model A alone."""
    out = []
    for s in stages:
        evals = {r["id"]: r for r in s.evals if r["fitness"] is not None}
        if s.cfg.search == "m2n2":
            from evomerge.run.config import M2N2Spec

            seeds = (s.cfg.m2n2 or M2N2Spec()).seeds or list(s.cfg.models)
            for k, name in enumerate(seeds):
                r = evals.get(k)
                if r and r["recipe"].get("pieces") == [{"start": 0, "coefs": [float(i == k) for i in
                                                                               range(len(seeds))]}]:
                    out.append((f"seed: {name} (evaluation #{k})", r["metrics"]))
        elif s.cfg.search == "dataflow":
            r = evals.get(0)
            path = (r or {}).get("recipe", {}).get("path", [])
            head = (r or {}).get("recipe", {}).get("head")
            if r and all(h["model"] == head and h["layer"] == i and h.get("scale", 1.0) == 1.0
                         for i, h in enumerate(path)):
                out.append((f"model A alone: {head} (evaluation #0)", r["metrics"]))
    return out


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
