"""The merges a user would set by hand, scored for the report (`evomerge report --baselines`): each source model
and the simple merges, cached in RUN_DIR/baselines.json."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evomerge.run.report.data import load_run, now_utc

BASELINES = "baselines.json"


def _baselines_key(cfg) -> str:
    d = {"models": cfg.models, "base": cfg.base, "objective": cfg.objective.model_dump(mode="json"),
         "validation": cfg.validation.model_dump(mode="json") if cfg.validation else None,
         "space": cfg.space.model_dump(mode="json") if cfg.space else None, "dtype": cfg.workers.dtype}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def cached_baselines(run_dir: Path, cfg) -> list[dict[str, Any]]:
    """The cached baseline scores of this run's models and tasks ([] if none, or cached for another config)."""
    p = Path(run_dir) / BASELINES
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return []
    return data.get("rows", []) if data.get("key") == _baselines_key(cfg) else []


def _baseline_candidates(cfg) -> list[tuple[str, str, Any]]:
    """(label, kind, model path or Recipe): every source, their uniform average and the search's start."""
    from evomerge.merge.load import parse_recipe

    out: list[tuple[str, str, Any]] = [(f"source: {n}", "source", p) for n, p in cfg.models.items()]
    inputs = [n for n in cfg.models if n != cfg.base] if cfg.base and len(cfg.models) > 2 else list(cfg.models)
    avg = parse_recipe({"method": "linear", "models": {n: {"path": cfg.models[n],
                                                           "parameters": {"weight": 1.0 / len(inputs)}}
                                                       for n in inputs}})
    out.append((f"uniform average: {', '.join(inputs)}", "merge", avg))
    if cfg.search in ("parameter", "hybrid"):
        from evomerge.run.spaces import make_space

        space = make_space(cfg)
        start = space.to_recipe(space.x0)
        out.append((f"search start (x0): {start.method}", "merge", start))
    return out


def score_baselines(run_dir: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Score the baselines with the run's objective and validation tasks (in this process, transformers on
    CPU/float32 unless workers.dtype says otherwise) and cache them in RUN_DIR/baselines.json. Cheap to call
    again: a cache for the same models and tasks is returned as it is."""
    from evomerge.merge.atomic import write_atomic

    cfg, _, _ = load_run(run_dir)
    rows = cached_baselines(Path(run_dir), cfg)
    if rows:
        return rows
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.build import build_into
    from evomerge.merge.plan import make_plan
    from evomerge.merge.sources import local_model_dir
    from workers.score import Scorer

    def scorer(obj):
        return Scorer([t.model_dump() for t in obj.tasks], obj.include_path, obj.limit, obj.num_fewshot,
                      cfg.workers.batch_size)

    dtype = getattr(torch, cfg.workers.dtype)
    ref = cfg.base or next(iter(cfg.models))
    tok = AutoTokenizer.from_pretrained(local_model_dir(ref, cfg.models[ref]))
    scorers = {"objective": scorer(cfg.objective), **({"validation": scorer(cfg.validation)} if cfg.validation
                                                      else {})}
    candidates = _baseline_candidates(cfg)
    resident = None
    rows = []
    with _quiet_libraries(), Progress(TextColumn("[bold]baselines[/] {task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress,
                                      transient=True) as prog:
        task = prog.add_task("", total=len(candidates))
        for label, kind, what in candidates:
            prog.update(task, description=label)
            if kind == "source":
                model = AutoModelForCausalLM.from_pretrained(local_model_dir(label, what), dtype=dtype)
            else:
                if resident is None:
                    resident = AutoModelForCausalLM.from_pretrained(local_model_dir(ref, cfg.models[ref]),
                                                                    dtype=dtype)
                plan = make_plan(what)
                try:
                    build_into(plan, dict(resident.state_dict()))
                finally:
                    plan.close()
                model = resident
            model.eval()
            row = {"label": label, "kind": kind, "metrics": {}}
            for part, sc in scorers.items():
                res = sc.score(model, tok)
                row["metrics"].update(res["metrics"])
                row[part] = res["fitness"]
            rows.append(row)
            prog.advance(task)
    data = {"key": _baselines_key(cfg), "written": now_utc(), "rows": rows,
            "note": "scored by `evomerge report --baselines` with the run's objective and validation tasks"}
    write_atomic(Path(run_dir) / BASELINES, json.dumps(data, indent=1))
    return rows


@contextmanager
def _quiet_libraries():
    """lm-eval's and transformers' progress bars and repeated warnings (e.g. "`pretrained` model kwarg is not of
    type `str`" once per model) would drown the one progress bar this command shows: silenced while it scores."""
    import logging

    names = ("lm_eval", "lm-eval", "transformers", "datasets")
    levels = {n: logging.getLogger(n).level for n in names}
    tqdm_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_verbosity = None
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
        if hf_verbosity is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(hf_verbosity)
            hf_logging.enable_progress_bar()
