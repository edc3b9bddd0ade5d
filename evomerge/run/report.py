"""The run report: one self-contained HTML page, and its PNGs, that says how a search went.

    evomerge report RUN_DIR [--out DIR] [--baselines]     # default DIR: RUN_DIR/report

    DIR/index.html     the page: summary, curves, per-task scores, the best recipe (heatmap or path), M2N2's
                       archive, the Pareto front, workers, failures, config, recipe, mergekit YAML, commands;
                       the pictures are embedded (data URIs), so the file alone opens offline, anywhere
    DIR/*.png          the same pictures as files

Everything comes from the run directory (config.yaml and the ledger); the report never runs a model unless
asked: `--baselines` scores each source model, their uniform average and (parameter-space searches) the
search's start point with the run's own objective and validation tasks, once, and caches the scores in
RUN_DIR/baselines.json (keyed by the models and tasks), so later reports and refreshes show them for free.
Source scores that a search records anyway are used without it: M2N2 evaluates its seed models first, a
data-flow search evaluates model A alone first.

`evomerge search` and `resume` write the report at the end and refresh it while they run (`Refresher`, a
background thread that rebuilds it every N seconds when the ledger has grown; no hook in the controller).
Files are built in a temporary directory next to DIR and moved into place one by one (os.replace), the page
last, so a reader never sees a half-written file and a failed build leaves the previous report untouched.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
import shlex
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.rundir import INDEX, REPORT_DIR

BASELINES = "baselines.json"
FAILED_ROW = "failed (worker lost or unknown)"


# ---- reading the run --------------------------------------------------------------------------------------------

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


# ---- baselines: source models and simple merges ------------------------------------------------------------------

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
    with Progress(TextColumn("[bold]baselines[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, transient=True) as prog:
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
    data = {"key": _baselines_key(cfg), "written": _now(), "rows": rows,
            "note": "scored by `evomerge report --baselines` with the run's objective and validation tasks"}
    write_atomic(Path(run_dir) / BASELINES, json.dumps(data, indent=1))
    return rows


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


# ---- figures ----------------------------------------------------------------------------------------------------

@dataclass
class Figure:
    file: str
    caption: str


def _window(cfg) -> int:
    """Evaluations per generation (CMA-ES popsize; M2N2: children in flight), for the median curve."""
    if cfg.search == "dataflow" and cfg.dataflow and cfg.dataflow.popsize:
        return cfg.dataflow.popsize
    if cfg.optimizer.popsize:
        return cfg.optimizer.popsize
    return max(4, 2 * cfg.workers.count)


def fig_progress(s: Stage, out: Path, prefix: str) -> Figure:
    from evomerge.run.plots import plot_progress

    name = f"{prefix}progress.png"
    vals = [(n, v) for n, v, _ in s.validations()]
    w = _window(s.cfg)
    plot_progress(s.evals, vals, w, out / name, f"fitness{' - ' + s.label if s.label else ''}")
    return Figure(name, f"Fitness of each evaluation in the order they finished, the best so far, the median of "
                        f"each {w} evaluations (a generation), and the held-out validation score of each new best "
                        "(the exported model is the best by validation).")


def heatmap_maps(s: Stage, best: dict[str, Any]) -> list[dict[str, Any]]:
    """Per parameter: layer group (x filter) x source model values of the best vector (clipped to bounds,
    as the space does when it makes the recipe)."""
    from evomerge.run.spaces import make_space

    space, x = make_space(s.cfg), list(best["x"])
    if hasattr(space, "spaces"):  # the method was searched too: the chosen method's block
        i = space.choose(x[0])
        space, x = space.spaces[i], x[space.offsets[i]:space.offsets[i] + space.spaces[i].dim]
    maps: dict[str, dict[str, Any]] = {}
    for d, v in zip(space.dims, x, strict=True):
        m = maps.setdefault(d.param, {"param": d.param, "rows": [], "cols": [], "cells": {},
                                      "bounds": [d.lower, d.upper]})
        group = d.group
        if group.startswith("layers ") and len(set(group[7:].split("-"))) == 1:
            group = f"layer {group[7:].split('-')[0]}"  # "layers 3-3" is one layer
        row = group + (f" [{d.filter}]" if d.filter else "")
        col = d.model or "(global)"
        for key, seq in ((row, m["rows"]), (col, m["cols"])):
            if key not in seq:
                seq.append(key)
        m["cells"][(row, col)] = min(d.upper, max(d.lower, float(v)))
        m["bounds"] = [min(m["bounds"][0], d.lower), max(m["bounds"][1], d.upper)]
    for m in maps.values():  # input to output: embeddings, the layer groups, then the final norm/head
        m["rows"].sort(key=lambda r: 1 if r.startswith("head") else 0)
        m["values"] = [[m["cells"].get((r, c)) for c in m["cols"]] for r in m["rows"]]
    return list(maps.values())


def fig_recipe(s: Stage, out: Path, prefix: str) -> tuple[Figure | None, str]:
    """The stage best's picture: PS heatmap, DFS path or M2N2 pieces (or why there is none)."""
    from evomerge.run import plots

    best = (s.status or {}).get("best")
    if best is None:
        return None, "no successful evaluation yet"
    rec = next((r for r in s.evals if r["id"] == best["id"]), None)
    method = best["recipe"].get("method")
    title = f"best (evaluation #{best['id']}, fitness {best['fitness']:.4f}" + (
        f", validation {best['validation']:.4f})" if best.get("validation") is not None else ")")
    try:
        if method == "dataflow":
            from evomerge.merge.load import any_recipe

            recipe = any_recipe(best["recipe"])
            name = f"{prefix}path.png"
            plots.plot_path(recipe, plots.path_layers(recipe), out / name, title=f"path of the {title}")
            return Figure(name, f"The best layer path: hop by hop, which model's layer runs (model A "
                                f"`{recipe.head}` at the bottom), labelled with its input scale where not 1."), ""
        if method == "piecewise":
            name = f"{prefix}recipe.png"
            r = best["recipe"]
            plots.plot_pieces(list(r["seeds"]), r["blocks"], r["pieces"], out / name,
                              f"coefficients of the {title}")
            n = len(r["pieces"])
            return Figure(name, "The best M2N2 member as a recipe: each seed model's coefficient along the "
                                f"flattened parameters ({n} piece{'s' if n > 1 else ''})."), ""
        if rec is None or not rec.get("x"):
            return None, "the best evaluation has no vector"
        name = f"{prefix}recipe.png"
        plots.plot_heatmaps(heatmap_maps(s, rec), out / name, f"{method}: {title}")
        return Figure(name, "The best parameter-space recipe: the value of each searched parameter per layer "
                            "group (rows) and source model (columns), colours spanning the search bounds."), ""
    except Exception as e:  # noqa: BLE001 - e.g. the sources moved since the run: the rest of the report stands
        return None, f"no picture of the recipe: {type(e).__name__}: {str(e)[:300]}"


def coverage_series(s: Stage) -> dict[str, list[float]]:
    """M2N2's archive after each evaluation, replayed from the ledger's per-item scores (the archive update
    depends on nothing else): how many items some member solves, the best member's mean score, and the
    items any candidate so far solved."""
    import numpy as np

    from evomerge.run.config import M2N2Spec
    from evomerge.search.optimizers.m2n2 import shared_fitness

    spec = s.cfg.m2n2 or M2N2Spec()
    tasks = [t.name for t in s.cfg.objective.tasks]
    scores: np.ndarray | None = None
    filled = np.zeros(spec.archive_size, dtype=bool)
    seen = None
    cov, best, anyone = [], [], []
    for r in sorted(s.evals, key=lambda r: r["id"]):
        row = None if r["fitness"] is None or not r.get("items") else np.asarray(
            [v for t in tasks for v in r["items"][t]], dtype=np.float32)
        if scores is None and row is not None:
            scores = np.zeros((spec.archive_size, len(row)), dtype=np.float32)
            seen = np.zeros(len(row), dtype=np.float32)
        if scores is not None:
            row = np.zeros(scores.shape[1], dtype=np.float32) if row is None else row
            if row.shape == (scores.shape[1],):
                _, f = shared_fitness(np.vstack([scores, row[None, :]]), spec.alpha)
                worst = int(np.argmin(f))
                if worst < spec.archive_size:
                    scores[worst], filled[worst] = row, True
                seen = np.maximum(seen, row)
        if scores is None or not filled.any():
            cov.append(math.nan), best.append(math.nan), anyone.append(math.nan)
            continue
        cov.append(float(scores[filled].max(axis=0).mean()))
        best.append(float(scores[filled].mean(axis=1).max()))
        anyone.append(float(seen.mean()))
    return {"archive coverage (items some member solves)": cov, "best member's mean score": best,
            "items any candidate so far solved": anyone}


def fig_coverage(s: Stage, out: Path, prefix: str) -> Figure:
    from evomerge.run.plots import plot_coverage

    name = f"{prefix}archive.png"
    plot_coverage(coverage_series(s), out / name, "M2N2 archive diversity")
    return Figure(name, "M2N2's archive replayed from the ledger: the share of items that at least one archive "
                        "member solves (per-item coverage) against the best single member's score; the gap is "
                        "what the archive's diversity holds beyond its best member.")


def fig_pareto(s: Stage, out: Path, prefix: str) -> Figure | None:
    from evomerge.run.plots import plot_pareto

    tasks = [t.name for t in s.cfg.objective.tasks]
    front = s.status.get("front") or []
    if not front:
        return None
    name = f"{prefix}pareto.png"
    pts = [(r["metrics"][tasks[0]], r["metrics"][tasks[1]]) for r in s.evals if r["fitness"] is not None]
    fpts = [(r["metrics"][tasks[0]], r["metrics"][tasks[1]]) for r in front]
    plot_pareto(pts, fpts, [f"{i}: #{r['id']}" for i, r in enumerate(front)], (tasks[0], tasks[1]), out / name,
                "Pareto front")
    more = f" (the first two of {len(tasks)} objectives; the table has all)" if len(tasks) > 2 else ""
    return Figure(name, f"Every evaluation on the objectives{more}; the front numbered as `evomerge export "
                        "--pick N` takes its members.")


def worker_spans(evals: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, bool]]]:
    """worker -> [(start, end, ok)] seconds since the first evaluation started; failures whose worker is not
    recorded (lost, timed out, raised) share one row."""
    timed = [r for r in evals if r.get("time") is not None and r.get("t_wall") is not None]
    if not timed:
        return {}
    t0 = min(r["time"] - r["t_wall"] for r in timed)
    spans: dict[str, list[tuple[float, float, bool]]] = {}
    for r in sorted(timed, key=lambda r: r["time"] - r["t_wall"]):
        who = r.get("worker") or FAILED_ROW
        spans.setdefault(who, []).append((r["time"] - r["t_wall"] - t0, r["time"] - t0, r["fitness"] is not None))
    if FAILED_ROW in spans:
        spans[FAILED_ROW] = spans.pop(FAILED_ROW)
    return spans


def time_split(evals: list[dict[str, Any]], spans: dict[str, list[tuple[float, float, bool]]]) -> dict[str, float]:
    """Worker-seconds: building, scoring, other (dispatch, transfer, lm-eval set-up), failed candidates, and
    idle (each worker's lifetime, first start to last end, minus its busy time)."""
    ok = [r for r in evals if r["fitness"] is not None and r.get("t_wall") is not None]
    build = sum(r.get("t_build") or 0.0 for r in ok)
    score = sum(r.get("t_score") or 0.0 for r in ok)
    other = sum(max(0.0, r["t_wall"] - (r.get("t_build") or 0.0) - (r.get("t_score") or 0.0)) for r in ok)
    failed = sum(r.get("t_wall") or 0.0 for r in evals if r["fitness"] is None)
    idle = 0.0
    for who, sp in spans.items():
        if who != FAILED_ROW:
            idle += max(0.0, max(e for _, e, _ in sp) - min(s for s, _, _ in sp) - sum(e - s for s, e, _ in sp))
    return {"build": build, "score": score, "other": other, "failed": failed, "idle": idle}


def fig_workers(s: Stage, out: Path, prefix: str) -> tuple[list[Figure], list[list[str]]]:
    from evomerge.run.plots import plot_time_split, plot_workers

    spans = worker_spans(s.evals)
    if not spans:
        return [], []
    figs = [Figure(f"{prefix}workers.png", "Each worker over time: busy with an evaluation (blue), a failed "
                                           "candidate (red), idle (gaps: waiting for the optimizer's next "
                                           "generation, validating a new best, starting)."),
            Figure(f"{prefix}time.png", "Where the workers' time went: building candidates, scoring them, other "
                                        "time inside an evaluation (dispatch, transfer), failed candidates, "
                                        "and idle time (validation of new bests is not timed and counts here).")]
    plot_workers(spans, out / figs[0].file, "worker utilisation")
    split = time_split(s.evals, spans)
    plot_time_split(split, out / figs[1].file, "where time went")
    rows = []
    for who, sp in spans.items():
        busy = sum(e - st for st, e, _ in sp)
        life = max(e for _, e, _ in sp) - min(st for st, _, _ in sp)
        rows.append([who, str(sum(1 for *_, ok in sp if ok)), str(sum(1 for *_, ok in sp if not ok)),
                     f"{busy:.1f}", f"{max(0.0, life - busy):.1f}",
                     "-" if who == FAILED_ROW else f"{100 * busy / life:.0f}%" if life > 0 else "-"])
    return figs, rows


# ---- the page ---------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:0 24px 40px}
header{background:#263238;color:#fff;padding:18px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cfd8dc}
nav{max-width:1180px;margin:12px auto 0;padding:0 24px;font-size:13px}nav a{margin-right:14px;color:#1565c0}
section{background:#fff;border:1px solid #e0e3e7;border-radius:8px;padding:14px 20px;margin:16px 0}
h2{font-size:18px;margin:2px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
td,th{border-bottom:1px solid #eceff1;padding:4px 12px 4px 0;text-align:left;vertical-align:top}
th{color:#546e7a;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0 16px}figure img{max-width:100%;height:auto;border:1px solid #eceff1}
figcaption{color:#546e7a;font-size:12.5px;max-width:900px}
pre{background:#f3f5f7;border:1px solid #e0e3e7;border-radius:6px;padding:10px;overflow:auto;font-size:12px;
max-height:520px}
details summary{cursor:pointer;color:#1565c0;margin:6px 0}.live{background:#fff8e1;border-color:#ffe082}
.note{color:#6d4c41}code{background:#f3f5f7;padding:1px 4px;border-radius:3px}
"""

PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">$refresh
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>evomerge report: $name</title><style>$css</style></head>
<body><header><h1>evomerge report: $name</h1><p>$subtitle</p></header>
<nav>$nav</nav><main>
$sections
<p class="note">Written $when by <code>evomerge report</code>; rebuild it with <code>$again</code>.</p>
</main></body></html>
""")


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    num = ' class="num"'
    body = "".join("<tr>" + "".join(f"<td{num if i >= numeric_from else ''}>{_esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _img(tmp: Path, fig: Figure) -> str:
    data = base64.b64encode((tmp / fig.file).read_bytes()).decode()
    return (f'<figure><img alt="{_esc(fig.file)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(fig.caption)} <span class=note>({_esc(fig.file)})</span></figcaption></figure>")


def _pre(text: str, summary: str | None = None, open_: bool = False) -> str:
    block = f"<pre>{_esc(text)}</pre>"
    return f"<details{' open' if open_ else ''}><summary>{_esc(summary)}</summary>{block}</details>" if summary \
        else block


def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _kind(cfg) -> str:
    o = cfg.optimizer
    opt = f"optuna {o.sampler}" if o.kind == "optuna" else "CMA-ES" if cfg.search != "m2n2" else "M2N2"
    multi = ", multi-objective" if cfg.objective.multi else ""
    racing = ", racing" if cfg.objective.racing else ""
    kind = {"parameter": "parameter-space", "dataflow": "data-flow (layer path)", "hybrid": "PS+DFS hybrid",
            "m2n2": "M2N2"}[cfg.search]
    return f"{kind} search, {opt}{multi}{racing}"


def _span(evals: list[dict[str, Any]]) -> float | None:
    t = [(r["time"] - (r.get("t_wall") or 0.0), r["time"]) for r in evals if r.get("time") is not None]
    return max(e for _, e in t) - min(s for s, _ in t) if t else None


def section_summary(run: Path, cfg, stages: list[Stage], st: dict[str, Any], live: bool) -> str:
    b = st.get("best")
    evals = [r for s in stages for r in s.evals]
    span = _span(evals)
    rows = [("run directory", str(run)), ("search", _kind(cfg)),
            ("models", ", ".join(f"{n}{' (base)' if n == cfg.base else ''}" for n in cfg.models)),
            ("objective", ", ".join(f"{t.name} ({t.metric}, weight {t.weight:g})" for t in cfg.objective.tasks)
             + (f"; {cfg.objective.limit} items per task" if cfg.objective.limit else "")),
            ("validation", ", ".join(t.name for t in cfg.validation.tasks) if cfg.validation else "none")]
    for s in stages:
        sst = s.status
        raced = sum(1 for r in s.evals if r.get("raced"))
        estimated = sum(1 for r in s.evals if r.get("estimated"))
        redone = sum(1 for r in s.evals if r.get("requeued"))
        rows.append((f"evaluations{' (' + s.label + ')' if s.label else ''}",
                     f"{sst['evaluations']} of {sst['budget']}, {sst['failures']} failed"
                     + (f", {raced} raced (stopped early)" if raced else "")
                     + (f", {estimated} estimated from anchor items (IRT)" if estimated else "")
                     + (f", {redone} redone after their worker was lost" if redone else "")
                     + (f", {sst['evaluations_per_minute']:.1f} per minute" if sst["evaluations_per_minute"] else "")))
    if span is not None:
        length = f"{span:.0f} s" if span < 120 else f"{span / 60:.1f} min"
        rows.append(("time span", f"{length} from the first evaluation's start to the last one's end"))
    if b is not None:
        rows.append(("best (exported)", f"evaluation #{b['id']}" + (f" of stage {b['stage']}" if b.get("stage")
                                                                  else "")
                     + f": fitness {b['fitness']:.4f}"
                     + (f", validation {b['validation']:.4f}" if b.get("validation") is not None else "")
                     + (" (chosen by validation)" if b.get("validation") is not None else " (by fitness)")))
    else:
        rows.append(("best", "no successful evaluation yet"))
    banner = (f'<p class="note">The search is running: this page was written {_now()} and is rewritten while it '
              "runs (your browser reloads it).</p>") if live else ""
    return banner + _kv(rows)


def section_tasks(run: Path, cfg, stages: list[Stage], st: dict[str, Any], tmp: Path) -> str:
    from evomerge.run.plots import plot_task_bars

    b = st.get("best")
    if b is None:
        return "<p>No successful evaluation yet.</p>"
    stage = next((s for s in stages if s.key == b.get("stage", s.key)), stages[-1])
    val = next((r for r in stage.records if r["type"] == "validation" and r["id"] == b["id"]
                and r.get("metrics")), None)
    best_scores = {**(b.get("metrics") or {}), **((val or {}).get("metrics") or {})}
    tasks = [t.name for t in cfg.objective.tasks] + ([t.name for t in cfg.validation.tasks] if cfg.validation
                                                     else [])
    rows: list[tuple[str, dict[str, float]]] = [(f"best (#{b['id']})", best_scores)]
    rows += ledger_baselines(cfg, stages)
    cached = cached_baselines(run, cfg)
    rows += [(r["label"], r["metrics"]) for r in cached]
    fig = Figure("tasks.png", "Per-task scores of the best against the source models and simple merges "
                              "(objective tasks, then validation tasks; a missing bar: not scored).")
    plot_task_bars(tasks, rows, tmp / fig.file, "per-task scores")
    table = _table(["model", *tasks], [[label, *(_f(sc.get(t)) for t in tasks)] for label, sc in rows])
    note = ("" if cached else '<p class="note">Source models and simple merges are not in the ledger: '
            f"<code>evomerge report {_esc(shlex.quote(str(run)))} --baselines</code> scores them once with the "
            "same tasks (cached in the run directory).</p>")
    return _img(tmp, fig) + table + note


def section_stage(s: Stage, tmp: Path) -> str:
    prefix = f"{s.key}-" if s.key else ""
    parts = []
    if not s.evals:
        return "<p>No evaluation recorded yet.</p>"
    parts.append(_img(tmp, fig_progress(s, tmp, prefix)))
    fig, why = fig_recipe(s, tmp, prefix)
    parts.append(_img(tmp, fig) if fig else f'<p class="note">{_esc(why)}</p>')
    if s.cfg.search == "m2n2":
        parts.append(_img(tmp, fig_coverage(s, tmp, prefix)))
    if s.cfg.objective.multi:
        fig = fig_pareto(s, tmp, prefix)
        tasks = [t.name for t in s.cfg.objective.tasks]
        if fig:
            parts.append(_img(tmp, fig))
        parts.append("<h3>Pareto front</h3>" + _table(["pick", "evaluation", *tasks], [
            [str(i), f"#{r['id']}", *(_f(r["metrics"][t]) for t in tasks)]
            for i, r in enumerate(s.status.get("front") or [])]))
    figs, rows = fig_workers(s, tmp, prefix)
    if figs:
        parts.append("<h3>Workers</h3>" + "".join(_img(tmp, f) for f in figs)
                     + _table(["worker", "evaluations", "failed", "busy s", "idle s", "utilisation"], rows))
    fails = [r for r in s.evals if r["fitness"] is None]
    if fails:
        parts.append(f"<h3>Failures ({len(fails)})</h3>" + _table(
            ["evaluation", "error", "attempts (workers lost)", "requeued"],
            [[f"#{r['id']}", (r.get("error") or "")[:400], str(r.get("attempt", 0)), str(r.get("requeued", 0))]
             for r in fails], numeric_from=2))
    return "".join(parts)


def mergekit_text(recipe_dict: dict[str, Any]) -> str:
    """The recipe's mergekit YAML, or why there is none."""
    import yaml

    from evomerge.merge.load import any_recipe

    recipe = any_recipe(recipe_dict)
    method = recipe_dict.get("method")
    if method == "piecewise":
        return "# M2N2 merges split tensors between coefficients, which mergekit cannot express: export a model."
    try:
        if method == "dataflow":
            from evomerge.merge.dataflow import check_path, open_path_sources, to_mergekit_passthrough

            sources = open_path_sources(recipe)
            try:
                kind = check_path(recipe, sources)
            finally:
                for src in sources.values():
                    src.close()
            return yaml.safe_dump(to_mergekit_passthrough(recipe, kind), sort_keys=False, default_flow_style=None,
                                  width=100)
        from evomerge.merge.mergekit_config import mergekit_yaml

        return mergekit_yaml(recipe)
    except EvomergeError as e:
        return f"# no mergekit form: {e.problem}"
    except Exception as e:  # noqa: BLE001 - e.g. the sources moved: the report still stands
        return f"# no mergekit form: {type(e).__name__}: {e}"


def section_recipe(st: dict[str, Any]) -> str:
    from evomerge.merge.load import any_recipe

    b = st.get("best")
    if b is None:
        return "<p>No successful evaluation yet.</p>"
    recipe = any_recipe(b["recipe"])
    return (f"<p>Evaluation #{b['id']}{' (stage ' + b['stage'] + ')' if b.get('stage') else ''}; recipe hash "
            f"<code>{_esc(recipe.content_hash())}</code>.</p>"
            + _pre(recipe.to_yaml(), "evomerge recipe (YAML)", open_=True)
            + _pre(mergekit_text(b["recipe"]), "mergekit configuration (YAML)", open_=True))


def section_commands(run: Path, cfg, st: dict[str, Any]) -> str:
    q = shlex.quote(str(run))
    lines = [f"evomerge status {q}                      # where it stands",
             f"evomerge resume {q}                      # continue after Ctrl-C, a crash or kill -9",
             f"evomerge resume {q} --budget N           # or raise the budget",
             f"evomerge export {q} --out merged         # the best (by validation) as a model directory"
             + (" + mergekit YAML" if (st.get("best") or {}).get("recipe", {}).get("method") != "piecewise" else "")]
    if cfg.objective.multi:
        lines.append(f"evomerge export {q} --pick N --out merged  # Pareto-front member N")
    lines.append(f"evomerge report {q} --baselines          # this page, with source models scored")
    return _pre("\n".join(lines))


def render(run: Path, cfg, stages: list[Stage], st: dict[str, Any], tmp: Path, live: bool,
           refresh_s: float) -> str:
    """The page's HTML; its PNGs are written into `tmp` on the way."""
    secs: list[tuple[str, str, str]] = [("summary", "Summary", section_summary(run, cfg, stages, st, live)),
                                        ("tasks", "Per-task scores", section_tasks(run, cfg, stages, st, tmp))]
    for s in stages:
        title = f"Search{' - ' + s.label if s.label else ''}"
        secs.append((f"search-{s.key}" if s.key else "search", title, section_stage(s, tmp)))
    secs += [("recipe", "Best recipe", section_recipe(st)),
             ("config", "Config", _pre(cfg.to_yaml(), "the run's config.yaml (paths resolved)")),
             ("commands", "Commands", section_commands(run, cfg, st))]
    body = "\n".join(f'<section id="{k}"{" class=live" if live and k == "summary" else ""}><h2>{_esc(t)}</h2>'
                     f"{h}</section>" for k, t, h in secs)
    nav = "".join(f'<a href="#{k}">{_esc(t)}</a>' for k, t, _ in secs)
    b = st.get("best")
    subtitle = f"{_kind(cfg)} · {st['evaluations']} of {st['budget']} evaluations" + (
        f" · best #{b['id']}: fitness {b['fitness']:.4f}" + (f", validation {b['validation']:.4f}"
                                                             if b.get("validation") is not None else "")
        if b else "")
    refresh = f'\n<meta http-equiv="refresh" content="{max(5, int(refresh_s))}">' if live else ""
    return PAGE.substitute(refresh=refresh, name=_esc(run.name), css=CSS, subtitle=_esc(subtitle), nav=nav,
                           sections=body, when=_esc(_now()),
                           again=_esc(f"evomerge report {shlex.quote(str(run))}"))


# ---- writing ----------------------------------------------------------------------------------------------------

OWNED = ("progress.png", "recipe.png", "path.png", "archive.png", "pareto.png", "workers.png", "time.png",
         "tasks.png")


def _owned(name: str) -> bool:
    return any(name == f or name.endswith("-" + f) for f in OWNED)


def build_report(run_dir: str | Path, out: str | Path | None = None, *, baselines: bool = False,
                 live: bool = False, refresh_s: float = 60, progress: bool = False) -> Path:
    """Write the report of a run into `out` (default RUN_DIR/report); returns its index.html. `baselines`:
    score the source models and simple merges first (cached). `live`: the page reloads itself every
    `refresh_s` seconds (refreshes during a search)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    run = Path(run_dir).resolve()
    cfg, stages, st = load_run(run)  # raises for a bad RUN_DIR before anything is written
    dest = Path(out).resolve() if out is not None else run / REPORT_DIR
    if dest.exists() and not dest.is_dir():
        raise EvomergeError(f"--out {dest} is a file", "give a directory (it is created if missing)")
    if baselines:
        score_baselines(run, progress=progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        page = render(run, cfg, stages, st, tmp, live, refresh_s)
        (tmp / INDEX).write_text(page, encoding="utf-8")
        dest.mkdir(exist_ok=True)
        made = sorted(p.name for p in tmp.iterdir() if p.name != INDEX)
        for name in made:
            _replace(tmp / name, dest / name)
        _replace(tmp / INDEX, dest / INDEX)  # the page last: it never points at a picture not yet there
        for old in dest.iterdir():
            if old.suffix == ".png" and _owned(old.name) and old.name not in made:
                old.unlink(missing_ok=True)  # a picture of an earlier build that no longer applies
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / INDEX


def _replace(src: Path, dst: Path) -> None:
    import os

    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(src, 0o644)  # mkstemp's files are private; a report is for reading
    os.replace(src, dst)


class Refresher:
    """Rebuilds RUN_DIR/report every `every` seconds while a search runs, when a ledger has grown, from a
    background thread (the controller loop is untouched; the ledger is read like `status` reads it), and once
    more, final, on exit. A failed refresh never stops the search."""

    def __init__(self, run_dir: str | Path, every: float = 120.0, final: bool = True):
        self.run, self.every, self.final = Path(run_dir), every, final
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple = ()
        self.path: Path | None = None
        self.error: str | None = None

    def _signature(self) -> tuple:
        out = []
        for p in (self.run, self.run / "ps", self.run / "dfs"):
            try:
                out.append((p / "ledger.jsonl").stat().st_size)
            except OSError:
                out.append(-1)
        return tuple(out)

    def _build(self, live: bool) -> None:
        try:
            self.path = build_report(self.run, live=live, refresh_s=self.every)
            self.error = None
        except Exception as e:  # noqa: BLE001 - the report must never take the search down
            self.error = f"{type(e).__name__}: {e}"

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            sig = self._signature()
            if sig != self._seen and any(v > 0 for v in sig):
                self._seen = sig
                self._build(live=True)

    def __enter__(self) -> Refresher:
        if self.every > 0:
            self._thread = threading.Thread(target=self._loop, name="evomerge-report", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        refused = exc and exc[0] is not None and issubclass(exc[0], EvomergeError)  # e.g. a bad config
        if self.final and not refused and (self.run / "config.yaml").is_file():
            self._build(live=False)
            if self.error:
                print(f"warning: the run report was not written: {self.error}", file=sys.stderr)
