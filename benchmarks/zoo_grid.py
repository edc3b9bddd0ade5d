"""Does merging help on the zoo? A task-arithmetic weight grid plus TIES and the uniform average.

    python benchmarks/zoo_grid.py --size small --seed 0            # builds .bench/zoo_small_0 if missing
    python benchmarks/zoo_grid.py --zoo DIR --tag mytag
    python benchmarks/zoo_grid.py --size small --override '{"base": {"steps": 450}}' --tag variant

Scores every merge on each task's validation and test splits with the zoo's fast scorer; the best grid
point is SELECTED ON VALIDATION and reported on TEST. Re-scores the experts and the selected merge on
`mixed`/test with lm-eval (checks agreement, times cost per item). Writes results/zoo_<tag>_grid.json and a
heatmap results/zoo_<tag>_grid.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.zoo import EXPERT_SKILLS, SIZES, TASKS, ZooSize, build_zoo  # noqa: E402
from evomerge.zoo.merges import ResidentMerger, merge_recipe, wilson  # noqa: E402

A, B = EXPERT_SKILLS


def sized(size: str, override: dict) -> ZooSize:
    """SIZES[size] with some fields replaced; `base`/`expert` overrides replace fields of the TrainSpec."""
    spec = SIZES[size]
    fields = {k: dataclasses.replace(getattr(spec, k), **v) if k in ("base", "expert") else v
              for k, v in override.items()}
    return dataclasses.replace(spec, **fields)


def score_all(merger: ResidentMerger) -> dict:
    """{task: {split: [0/1 per item]}} for the resident model, validation and test splits."""
    return {t: {s: merger.scores(t, s) for s in ("validation", "test")} for t in TASKS}


def acc(scores: list[int]) -> float:
    return sum(scores) / len(scores)


def summary(scores: dict) -> dict:
    return {t: {s: round(acc(v), 4) for s, v in splits.items()} for t, splits in scores.items()}


def heatmap(grid: list[dict], weights: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for ax, task in zip(axes, ("mixed", "compositional"), strict=True):
        table = [[next(acc(g["scores"][task]["test"]) for g in grid if g["weights"] == {A: wa, B: wb})
                  for wb in weights] for wa in weights]
        im = ax.imshow(table, origin="lower", vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(table):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(weights)), [f"{w:g}" for w in weights])
        ax.set_yticks(range(len(weights)), [f"{w:g}" for w in weights])
        ax.set_xlabel(f"w_{B}")
        ax.set_ylabel(f"w_{A}")
        ax.set_title(f"{task} (test)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="exact match")
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, help="an existing zoo (default: build one under .bench/)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", help="name of the result files (default: the size)")
    ap.add_argument("--override", type=json.loads, default={},
                    help="JSON of ZooSize fields to change, e.g. '{\"base\": {\"steps\": 450}}'")
    ap.add_argument("--step", type=float, default=0.125)
    ap.add_argument("--max", type=float, default=1.25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tag = args.tag or args.size
    zoo = args.zoo or REPO / ".bench" / f"zoo_{tag}_{args.seed}"
    if not (zoo / "zoo.json").exists():
        print(f"building {args.size} zoo {args.override or ''} (seed {args.seed}) in {zoo}", flush=True)
        build_zoo(zoo, sized(args.size, args.override) if args.override else args.size, args.seed,
                  threads=args.threads)
    manifest = json.loads((zoo / "zoo.json").read_text())
    merger = ResidentMerger(zoo)

    models = {}
    for name in ("base", *EXPERT_SKILLS):
        merger.load_model(name)
        models[name] = score_all(merger)
    n_steps = round(args.max / args.step)
    weights = [round(i * args.step, 4) for i in range(n_steps + 1)]
    t0 = time.perf_counter()
    grid = []
    for wa in weights:
        for wb in weights:
            merger.load(merge_recipe(zoo, "task_arithmetic", {A: wa, B: wb}))
            grid.append({"weights": {A: wa, B: wb}, "scores": score_all(merger)})
    grid_seconds = time.perf_counter() - t0
    others = {}
    for name, recipe in {
        "uniform average (linear 0.5/0.5)": merge_recipe(zoo, "linear", {A: 1.0, B: 1.0}),
        "task arithmetic 1/1 (plain addition)": merge_recipe(zoo, "task_arithmetic", {A: 1.0, B: 1.0}),
        **{f"ties density {d} weights 1/1": merge_recipe(zoo, "ties", {A: 1.0, B: 1.0}, density=d)
           for d in (0.3, 0.5, 0.7)},
    }.items():
        merger.load(recipe)
        others[name] = {"recipe": recipe, "scores": score_all(merger)}

    best = max(grid, key=lambda g: acc(g["scores"]["mixed"]["validation"]))
    best_comp = max(grid, key=lambda g: acc(g["scores"]["compositional"]["validation"]))
    merger.load(merge_recipe(zoo, "task_arithmetic", best["weights"]))

    from evomerge.zoo.lmeval import LmEvalScorer

    scorer = LmEvalScorer(zoo, ["zoo_mixed_test"])
    n_items = manifest["tasks"]["mixed"]["counts"]["test"]
    t0 = time.perf_counter()
    lm_acc, lm_items = scorer.evaluate(merger.model, merger.tokenizer)["zoo_mixed_test"]
    lm_seconds = time.perf_counter() - t0
    agree = lm_items == best["scores"]["mixed"]["test"]
    t0 = time.perf_counter()
    merger.scores("mixed", "test")
    zoo_seconds = time.perf_counter() - t0

    def row(scores: dict) -> dict:
        out = {}
        for task in TASKS:
            s = scores[task]["test"]
            lo, hi = wilson(sum(s), len(s))
            out[task] = {"acc": round(acc(s), 4), "n": len(s), "wilson95": [round(lo, 4), round(hi, 4)]}
        return out

    report = {
        "zoo": str(zoo), "size": manifest["size"], "seed": manifest["seed"],
        "build_seconds": manifest["build_seconds"], "config": manifest["config"],
        "test": {**{name: row(s) for name, s in models.items()},
                 f"best grid (by mixed validation) {best['weights']}": row(best["scores"]),
                 f"best grid (by compositional validation) {best_comp['weights']}": row(best_comp["scores"]),
                 **{name: row(o["scores"]) for name, o in others.items()}},
        "best_weights": best["weights"],
        "grid": [{"weights": g["weights"], "scores": summary(g["scores"])} for g in grid],
        "grid_seconds_per_merge": round(grid_seconds / len(grid), 3),
        "lm_eval": {"task": "zoo_mixed_test", "acc": lm_acc, "agrees_with_zoo_scorer": agree,
                    "seconds": round(lm_seconds, 3), "ms_per_item": round(1000 * lm_seconds / n_items, 3),
                    "zoo_scorer_ms_per_item": round(1000 * zoo_seconds / n_items, 3)},
        "others": {name: {"recipe": o["recipe"]} for name, o in others.items()},
    }
    out = REPO / "results" / f"zoo_{tag}_grid.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    heatmap(grid, weights, REPO / "results" / f"zoo_{tag}_grid.png",
            f"zoo {tag}: task arithmetic base + w_{A}·τ_{A} + w_{B}·τ_{B}")
    print(f"{'model':58s} " + " ".join(f"{t:>14s}" for t in TASKS))
    for name, r in report["test"].items():
        print(f"{name:58s} " + " ".join(f"{r[t]['acc']:14.3f}" for t in TASKS))
    cost = report["lm_eval"]
    print(f"lm-eval mixed/test of the selected merge: {lm_acc:.4f} (agrees: {agree}), {cost['ms_per_item']} "
          f"ms/item (zoo scorer {cost['zoo_scorer_ms_per_item']}); grid {report['grid_seconds_per_merge']} s/merge")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
