"""The report's figures (PNG through run/plots.py) and the series they draw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.run.report.data import FAILED_ROW, Stage


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
