"""Pictures of searches and recipes (matplotlib, written as PNG files atomically).

Figures are made with matplotlib's object API (`Figure`, no pyplot): the run report is refreshed from a
background thread of the controller process, and pyplot's global state is not thread-safe.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OK, FAIL, RACED, VAL = "#1f77b4", "#d62728", "#9e9e9e", "#2ca02c"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _colors(n: int) -> list:
    import matplotlib

    base = matplotlib.colormaps["tab10"].colors
    return [base[i % len(base)] for i in range(n)]


def _save(fig, out: Path) -> Path:
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp's files are private; pictures are for reading
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def plot_path(recipe, layers: dict[str, int], out: str | Path, title: str | None = None) -> Path:
    """The layer path of a data-flow recipe, like Akiba et al.'s figure: one row per source layer (model A's
    layers at the bottom), hops left to right, each marker coloured by model and labelled with its input
    scale."""
    order = [recipe.head, *[m for m in layers if m != recipe.head]]
    rows: dict[tuple[str, int], int] = {}
    for m in order:
        for layer in range(layers[m]):
            rows[(m, layer)] = len(rows)
    colors = dict(zip(order, _colors(len(order)), strict=True))
    n = len(recipe.path)
    fig = _figure(max(5.0, 0.45 * n + 2), max(2.5, 0.32 * len(rows) + 1.2))
    ax = fig.subplots()
    ys = [rows[(h.model, h.layer)] for h in recipe.path]
    ax.plot(range(n), ys, color="0.75", lw=1, zorder=1)
    for m in order:
        idx = [k for k, h in enumerate(recipe.path) if h.model == m]
        ax.scatter(idx, [ys[k] for k in idx], s=70, color=colors[m], label=m, zorder=2, edgecolor="black", lw=0.4)
    for k, h in enumerate(recipe.path):
        if abs(h.scale - 1.0) > 5e-4:
            ax.annotate(f"{h.scale:.2f}", (k, ys[k]), textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=7)
    ax.set_yticks(list(rows.values()), [f"{m} L{layer}" for m, layer in rows])
    ax.set_xticks(range(n))
    ax.set_xlabel("hop (numbers: input scale, where not 1)")
    for boundary in [len([r for r in rows if r[0] == m]) for m in order][:-1]:
        ax.axhline(boundary - 0.5, color="0.85", lw=0.8)
    ax.set_title(title or f"data-flow path: {n} hops, model A = {recipe.head}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, Path(out))


def write_best_path_picture(run_dir: str | Path) -> Path | None:
    """RUN/best_path.png for a data-flow or hybrid run whose best recipe is a path; None otherwise."""
    from evomerge.merge.load import any_recipe
    from evomerge.run.status import status

    st = status(run_dir)
    if st["best"] is None or st["best"]["recipe"].get("method") != "dataflow":
        return None
    recipe = any_recipe(st["best"]["recipe"])
    b = st["best"]
    score = f"fitness {b['fitness']:.3f}" + (f", validation {b['validation']:.3f}" if b["validation"] else "")
    return plot_path(recipe, path_layers(recipe), Path(run_dir) / "best_path.png",
                     title=f"best path (evaluation {b['id']}: {score})")


def path_layers(recipe) -> dict[str, int]:
    """Layers per model of a path recipe: from the sources' headers, or (sources gone) from the path itself."""
    from evomerge.merge.sources import open_source

    out: dict[str, int] = {}
    for n, m in recipe.models.items():
        try:
            src = open_source(n, m.path)
            try:
                out[n] = src.num_layers or 0
            finally:
                src.close()
        except Exception:  # noqa: BLE001 - a report of an old run whose models moved still draws the path
            out[n] = 1 + max((h.layer for h in recipe.path if h.model == n), default=-1)
    return out


# ---- the run report's figures -----------------------------------------------------------------------------------

def plot_progress(evals: Sequence[dict[str, Any]], validations: Sequence[tuple[int, float]], window: int,
                  out: Path, title: str) -> Path:
    """Fitness of every evaluation in completion order, the best so far, the median of each block of `window`
    evaluations (a CMA-ES generation) and the validation score of each new best where it was recorded
    (`validations`: (evaluations completed when it was recorded, score))."""
    fig = _figure(8, 4.2)
    ax = fig.subplots()
    xs_ok = [k + 1 for k, r in enumerate(evals) if r["fitness"] is not None and not r.get("raced")]
    ys_ok = [r["fitness"] for r in evals if r["fitness"] is not None and not r.get("raced")]
    ax.scatter(xs_ok, ys_ok, s=12, alpha=0.45, color=OK, label="candidate")
    raced = [(k + 1, r["fitness"]) for k, r in enumerate(evals) if r["fitness"] is not None and r.get("raced")]
    if raced:
        ax.scatter(*zip(*raced, strict=True), s=14, facecolors="none", edgecolors=RACED,
                   label="raced (stopped early; mean on the items scored)")
    best, bx, by = -math.inf, [], []
    for k, r in enumerate(evals):
        if r["fitness"] is not None and not r.get("raced"):
            best = max(best, r["fitness"])
        if best > -math.inf:
            bx.append(k + 1)
            by.append(best)
    if bx:
        ax.plot(bx, by, color="C1", lw=2, drawstyle="steps-post", label="best so far")
    mx, my = [], []
    for lo in range(0, len(evals), max(1, window)):
        block = [r["fitness"] for r in evals[lo:lo + window] if r["fitness"] is not None and not r.get("raced")]
        if block:
            mx += [lo + 1, min(lo + window, len(evals)), math.nan]  # one flat segment per block
            my += [statistics.median(block)] * 2 + [math.nan]
    if mx:
        ax.plot(mx, my, color="C4", lw=1.3, label=f"median of each {window} evaluations")
    if validations:
        vx, vy = zip(*validations, strict=True)
        ax.plot(vx, vy, color=VAL, marker="*", ms=11, lw=1.2, drawstyle="steps-post",
                label="validation of the best (held-out)")
    fails = [k + 1 for k, r in enumerate(evals) if r["fitness"] is None]
    if fails:
        lo = min([*ys_ok, *(v for _, v in validations)], default=0.0)
        ax.scatter(fails, [lo] * len(fails), marker="x", color=FAIL, s=30, label=f"failed ({len(fails)})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("evaluations completed")
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out)


def plot_task_bars(tasks: Sequence[str], rows: Sequence[tuple[str, dict[str, float]]], out: Path,
                   title: str) -> Path:
    """Grouped bars: one group per task, one bar per model (the best first); a missing score is no bar."""
    n = max(1, len(rows))
    fig = _figure(max(6.0, 1.1 + len(tasks) * (0.35 * n + 0.6)), 4.2)
    ax = fig.subplots()
    width = 0.8 / n
    for i, ((label, scores), color) in enumerate(zip(rows, _colors(n), strict=True)):
        xs = [t + (i - (n - 1) / 2) * width for t, task in enumerate(tasks) if scores.get(task) is not None]
        ys = [scores[task] for task in tasks if scores.get(task) is not None]
        bars = ax.bar(xs, ys, width=width * 0.92, color=color, label=label,
                      edgecolor="black" if i == 0 else "none", lw=1.2)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(range(len(tasks)), list(tasks), fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, max([1.0, *(v for _, s in rows for v in s.values() if v is not None)]) * 1.08)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_heatmaps(maps: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    """One heatmap per parameter: rows = layer groups (and filters), columns = source models, each cell its
    value. `maps`: [{"param", "rows", "cols", "values" (rows x cols, None = not searched), "bounds"}]."""
    import numpy as np

    widths = [max(2.6, 1.1 * len(m["cols"]) + 1.6) for m in maps]
    height = max(2.4, 0.38 * max(len(m["rows"]) for m in maps) + 1.4)
    fig = _figure(sum(widths) + 1.5, height)
    axes = fig.subplots(1, len(maps), squeeze=False, width_ratios=widths)[0]
    for ax, m in zip(axes, maps, strict=True):
        vals = np.array([[np.nan if v is None else v for v in row] for row in m["values"]], dtype=float)
        lo, hi = m["bounds"]
        im = ax.imshow(vals, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(m["cols"])), m["cols"], fontsize=8, rotation=20)
        ax.set_yticks(range(len(m["rows"])), m["rows"], fontsize=8)
        if vals.size <= 400:
            for (i, j), v in np.ndenumerate(vals):
                if not np.isnan(v):
                    shade = (v - lo) / (hi - lo) if hi > lo else 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if shade > 0.55 else "white")
        ax.set_title(m["param"], fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def plot_pieces(seeds: Sequence[str], blocks: int, pieces: Sequence[dict[str, Any]], out: Path,
                title: str) -> Path:
    """An M2N2 member: each seed model's coefficient along the flattened parameters (block grid)."""
    fig = _figure(8, 3.4)
    ax = fig.subplots()
    starts = [p["start"] for p in pieces] + [blocks]
    for k, (name, color) in enumerate(zip(seeds, _colors(len(seeds)), strict=True)):
        xs, ys = [], []
        for i, p in enumerate(pieces):
            xs += [starts[i], starts[i + 1]]
            ys += [p["coefs"][k]] * 2
        ax.plot(xs, ys, color=color, lw=2, label=name)
    for s in starts[1:-1]:
        ax.axvline(s, color="0.85", lw=0.8, zorder=0)
    ax.set_xlim(0, blocks)
    ax.set_xlabel(f"position in the flattened parameters ({blocks} blocks; embeddings left, head right)")
    ax.set_ylabel("coefficient")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_coverage(series: dict[str, Sequence[float]], out: Path, title: str) -> Path:
    """M2N2's archive over the run: lines that share the x axis (evaluations applied, in id order)."""
    fig = _figure(8, 3.8)
    ax = fig.subplots()
    for k, ((label, ys), color) in enumerate(zip(series.items(), _colors(len(series)), strict=True)):
        ax.plot(range(1, len(ys) + 1), ys, lw=1.8, color=color, label=label, ls="--" if k == 2 else "-")
    ax.set_xlabel("evaluations (in candidate order)")
    ax.set_ylabel("share of items / mean score")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_pareto(points: Sequence[tuple[float, float]], front: Sequence[tuple[float, float]], labels: Sequence[str],
                axes: tuple[str, str], out: Path, title: str) -> Path:
    """All evaluations on two objectives, the Pareto front highlighted and numbered as `export --pick` takes."""
    fig = _figure(6, 5)
    ax = fig.subplots()
    if points:
        ax.scatter(*zip(*points, strict=True), s=14, alpha=0.4, color=OK, label="evaluation")
    if front:
        line = sorted(front)
        ax.plot(*zip(*line, strict=True), color="C1", lw=1, drawstyle="steps-post", zorder=1)
        ax.scatter(*zip(*front, strict=True), s=60, color="C1", edgecolor="black", zorder=2, label="Pareto front")
        for (x, y), lab in zip(front, labels, strict=True):
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_workers(spans: dict[str, list[tuple[float, float, bool]]], out: Path, title: str) -> Path:
    """A timeline per worker: busy (an evaluation ran, blue), failed (red), idle (the gaps). `spans`:
    worker -> [(start, end, ok)] in seconds since the run began."""
    fig = _figure(9, max(2.0, 0.45 * len(spans) + 1.3))
    ax = fig.subplots()
    names = list(spans)
    end = max((e for sp in spans.values() for _, e, _ in sp), default=0.0)
    unit, div = ("minutes", 60.0) if end > 180 else ("seconds", 1.0)
    for i, name in enumerate(names):
        ok = [(s / div, (e - s) / div) for s, e, good in spans[name] if good]
        bad = [(s / div, (e - s) / div) for s, e, good in spans[name] if not good]
        ax.broken_barh(ok, (i - 0.35, 0.7), facecolors=OK, edgecolor="white", lw=0.3)
        ax.broken_barh(bad, (i - 0.35, 0.7), facecolors=FAIL, edgecolor="white", lw=0.3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first evaluation started (gaps: idle)")
    ax.set_title(title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=OK, label="busy"), Patch(color=FAIL, label="failed"),
                       Patch(facecolor="white", edgecolor="0.6", label="idle")], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_time_split(parts: dict[str, float], out: Path, title: str) -> Path:
    """Where the workers' time went: one stacked horizontal bar of seconds, with percentages."""
    fig = _figure(9, 1.9)
    ax = fig.subplots()
    total = sum(parts.values()) or 1.0
    left = 0.0
    palette = {"build": "#ff7f0e", "score": OK, "other": "#8c564b", "failed": FAIL, "idle": "#d9d9d9"}
    for label, sec in parts.items():
        ax.barh(0, sec, left=left, color=palette.get(label, "0.5"), label=f"{label}: {sec:.{0 if sec >= 10 else 1}f} s "
                f"({100 * sec / total:.0f}%)", edgecolor="white")
        left += sec
    ax.set_yticks([])
    ax.set_xlabel("worker-seconds")
    ax.set_xlim(0, total)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, out)
