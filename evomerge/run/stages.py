"""Running a search: one controller for a parameter-space or data-flow search; two stages for the hybrid.

The hybrid (PS+DFS, Akiba et al. 2024) keeps everything in one run directory:

    RUN/config.yaml      the hybrid config (what `resume` reads)
    RUN/ps/              stage 1: the parameter-space search (a complete run directory of its own)
    RUN/ps-best/         the best PS merge, exported (atomically) when stage 1 has used its budget
    RUN/dfs/             stage 2: the data-flow search whose model A ("ps_merge") is RUN/ps-best

`resume RUN` continues whichever stage was running: a finished stage is not started again, the export is
skipped when RUN/ps-best exists, and each stage's controller resumes from its own ledger.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.config import SearchConfig, load_config
from evomerge.run.rundir import RunDir
from evomerge.run.stage_layout import stage_configs, stage_dirs, stage_done


def run_search(cfg: SearchConfig, run_dir: str | Path, *, address: str | None = None, resume: bool = False,
               progress: bool = True, worker_cls: type | None = None) -> dict[str, Any]:
    from evomerge.run.controller import Controller

    run_dir = Path(run_dir).resolve()
    if cfg.search != "hybrid":
        st = Controller(cfg, run_dir, address=address, resume=resume, progress=progress,
                        worker_cls=worker_cls).run()
        if cfg.search == "dataflow":
            _picture(run_dir)
        return st
    top = RunDir(run_dir)
    if top.exists() and not resume:
        raise EvomergeError(f"run directory {run_dir} already holds a search",
                            f"continue it with `evomerge resume {run_dir}`, or choose a new --run-dir")
    if resume:
        if not top.exists():
            raise EvomergeError(f"no search to resume in {run_dir} (no config.yaml)", "check the path")
        if load_config(top.config_path).fingerprint() != cfg.fingerprint():
            raise EvomergeError(f"the config differs from the one {run_dir} was started with",
                                "resume with the run's own config (only budgets may change)")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    top.lock()
    owns_ray = False
    text = cfg.to_yaml()

    def started() -> None:  # a resumed run's config (a new budget) is written once a stage has passed every check
        top.write_config(text)  # that can refuse it: a refused resume leaves it as it was

    failed = True
    try:
        if not resume:
            started()
        import ray

        if not ray.is_initialized():  # one Ray for both stages
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
            owns_ray = True
        ps_cfg, dfs_cfg = stage_configs(cfg, run_dir)
        dirs = stage_dirs(run_dir)
        if not stage_done(dirs["ps"], ps_cfg.optimizer.budget):
            Controller(ps_cfg, dirs["ps"], resume=RunDir(dirs["ps"]).exists(), progress=progress,
                       worker_cls=worker_cls, on_start=started).run()
        if not dirs["ps-best"].exists():
            from evomerge.run.status import export_best

            export_best(dirs["ps"], dirs["ps-best"])
        Controller(dfs_cfg, dirs["dfs"], resume=RunDir(dirs["dfs"]).exists(), progress=progress,
                   worker_cls=worker_cls, on_start=started).run()
        started()
        from evomerge.run.status import status

        _picture(run_dir)
        failed = False
        return status(run_dir)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
        top.unlock()
        if failed and created and not any(run_dir.glob("*/ledger.jsonl")):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # refused before recording anything: no trace


def _picture(run_dir: Path) -> None:
    from evomerge.run.plots import write_best_path_picture

    write_best_path_picture(run_dir)
