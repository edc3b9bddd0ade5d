"""Pictures of searches and recipes (matplotlib, written as PNG files atomically)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _save(fig, out: Path) -> Path:
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def plot_path(recipe, layers: dict[str, int], out: str | Path, title: str | None = None) -> Path:
    """The layer path of a data-flow recipe, like Akiba et al.'s figure: one row per source layer (model A's
    layers at the bottom), hops left to right, each marker coloured by model and labelled with its input
    scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [recipe.head, *[m for m in layers if m != recipe.head]]
    rows: dict[tuple[str, int], int] = {}
    for m in order:
        for layer in range(layers[m]):
            rows[(m, layer)] = len(rows)
    colors = dict(zip(order, plt.get_cmap("tab10").colors, strict=False))
    n = len(recipe.path)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n + 2), max(2.5, 0.32 * len(rows) + 1.2)))
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
    try:
        return _save(fig, Path(out))
    finally:
        plt.close(fig)


def write_best_path_picture(run_dir: str | Path) -> Path | None:
    """RUN/best_path.png for a data-flow or hybrid run whose best recipe is a path; None otherwise."""
    from evomerge.recipe import any_recipe
    from evomerge.runs import status
    from evomerge.sources import open_source

    st = status(run_dir)
    if st["best"] is None or st["best"]["recipe"].get("method") != "dataflow":
        return None
    recipe = any_recipe(st["best"]["recipe"])
    layers = {n: open_source(n, m.path).num_layers or 0 for n, m in recipe.models.items()}
    b = st["best"]
    score = f"fitness {b['fitness']:.3f}" + (f", validation {b['validation']:.3f}" if b["validation"] else "")
    return plot_path(recipe, layers, Path(run_dir) / "best_path.png",
                     title=f"best path (evaluation {b['id']}: {score})")
