"""PS vs DFS vs PS+DFS on the small zoo, next to the experts and hand-made frankenmerges (test split).

Runs three searches with the project's configs (configs/quickstart.yaml for PS, configs/dataflow-zoo.yaml
for DFS, configs/hybrid-zoo.yaml for PS+DFS), each into a fresh run directory, then scores on the test
split (never seen by any search): the base, both experts, hand-made layer paths (A's layers then B's,
interleaved, no scaling) and the exported best of each search (chosen by validation). Writes
results/dataflow.md, results/dataflow_curves.png (best search fitness per evaluation) and
results/dataflow_best_path.png (the best path found).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dataflow_zoo.py [--zoo zoo-small] [--out results/dataflow.md]
It measures and writes tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, header_md, machine_facts, md_table, write_results  # noqa: E402
from _zoo_search import TEST_TASKS as TASKS  # noqa: E402
from _zoo_search import TestScorer, curve, ensure_zoo, plot_curves, zoo_config  # noqa: E402

CONFIGS = {"PS": "configs/quickstart.yaml", "DFS": "configs/dataflow-zoo.yaml", "PS+DFS": "configs/hybrid-zoo.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo-small")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "dataflow.md")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from evomerge.merge.dataflow import parse_path_recipe
    from evomerge.merge.load import any_recipe
    from evomerge.run.plots import plot_path
    from evomerge.run.stages import run_search
    from evomerge.run.status import export_best
    from workers.path_model import PathBuilder

    zoo = ensure_zoo(args.zoo)
    models = {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}
    score_model = TestScorer(zoo, zoo / "models" / "shift")

    rows: list[tuple[str, str, dict[str, float]]] = []
    for n in ("base", "shift", "mirror"):
        rows.append((f"`{n}`" + (" (expert A)" if n == "shift" else " (expert B)" if n == "mirror" else ""),
                     "", score_model(AutoModelForCausalLM.from_pretrained(models[n]))))
    pb = PathBuilder()
    hand = {
        "A then B (shift L0-1, mirror L0-1)": [("shift", 0), ("shift", 1), ("mirror", 0), ("mirror", 1)],
        "A, B, A (shift L0, mirror L0-1, shift L1)": [("shift", 0), ("mirror", 0), ("mirror", 1), ("shift", 1)],
        "interleaved (shift L0, mirror L0, shift L1, mirror L1)": [("shift", 0), ("mirror", 0), ("shift", 1),
                                                                   ("mirror", 1)],
        "A twice (shift L0-1, shift L0-1)": [("shift", 0), ("shift", 1), ("shift", 0), ("shift", 1)],
    }
    for label, hops in hand.items():
        r = parse_path_recipe({"method": "dataflow", "head": "shift",
                               "models": {"shift": {"path": models["shift"]},
                                          "mirror": {"path": models["mirror"]}},
                               "path": [{"model": m, "layer": k} for m, k in hops]})
        rows.append((f"frankenmerge: {label}", "hand-made path, no scaling", score_model(pb.build(r))))

    work = Path(tempfile.mkdtemp(prefix="dataflow-zoo-"))
    curves: dict[str, list[float]] = {}
    timings: dict[str, float] = {}
    best_path = None
    try:
        for label, cfg_file in CONFIGS.items():
            cfg = zoo_config(cfg_file, zoo)
            run = work / label.replace("+", "_")
            t0 = time.perf_counter()
            st = run_search(cfg, run, progress=False)
            timings[label] = time.perf_counter() - t0
            if label == "PS+DFS":
                ps_c, dfs_c = curve(run / "ps"), curve(run / "dfs")
                curves[label] = ps_c + [max(ps_c[-1], v) for v in dfs_c]
                curves["PS+DFS: DFS stage alone"] = [float("nan")] * len(ps_c) + dfs_c
            else:
                curves[label] = curve(run)
            out = export_best(run, work / f"best_{run.name}")
            best = st["best"]
            recipe = any_recipe(best["recipe"])
            desc = (f"{len(recipe.path)}-hop path, A = {recipe.head}" if recipe.method == "dataflow"
                    else f"{recipe.method}, {len(recipe.models)} models")
            if "stage" in st:
                desc += f" (final model from stage `{best.get('stage')}`)"
            rows.append((f"**{label}** search best", f"{desc}; {st['evaluations']} evals"
                         + (f" + {st['stages']['ps']['evaluations']} PS" if "stages" in st else "")
                         + f", {timings[label] / 60:.1f} min",
                         score_model(AutoModelForCausalLM.from_pretrained(out))))
            if recipe.method == "dataflow" and (best_path is None or label == "PS+DFS"):
                from evomerge.merge.sources import open_source

                layers = {n: open_source(n, m.path).num_layers for n, m in recipe.models.items()}
                best_path = (recipe, layers, label, best)
        facts = machine_facts(None)
        png = args.out.with_name("dataflow_curves.png")
        styles = {"PS": dict(lw=3, alpha=0.5), "PS+DFS": dict(ls="--"),
                  "PS+DFS: DFS stage alone": dict(ls=":", color="0.3")}
        plot_curves(curves, png, styles, marks=[(len(curve(work / "PS_DFS" / "ps")), "hybrid: DFS stage starts")])
        if best_path is not None:
            recipe, layers, label, best = best_path
            plot_path(recipe, layers, args.out.with_name("dataflow_best_path.png"),
                      title=f"{label}: best path (fitness {best['fitness']:.3f})")
            path_yaml = recipe.to_yaml()
        else:
            path_yaml = "(no search ended with a path)\n"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    argv = ["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/dataflow_zoo.py", *sys.argv[1:]]
    table = md_table(["model", "what", *[t.replace("zoo_", "").replace("_test", "") for t in TASKS]],
                     [[name, what, *[f"{m[t]:.3f}" for t in TASKS]] for name, what, m in rows])
    text = header_md("Data-flow search on the small zoo: PS vs DFS vs PS+DFS (test split)", argv, facts)
    text += ("Accuracy (exact greedy continuation) on the test split of each task; the searches optimise "
             "`zoo_mixed_search` and pick their exported model by `zoo_mixed_validation`. Configs: "
             + ", ".join(f"{k} `{v}`" for k, v in CONFIGS.items()) + ".\n\n" + table + "\n\n"
             "![search curves](dataflow_curves.png)\n\n![best path](dataflow_best_path.png)\n\n"
             f"Best path found:\n\n```yaml\n{path_yaml}```\n")
    write_results(args.out, text, {"curves": curves, "timings_s": timings})


if __name__ == "__main__":
    main()
