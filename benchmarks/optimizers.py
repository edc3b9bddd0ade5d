"""Which optimizer finds the best merge for the fewest evaluations? Head to head on the small zoo.

Equal evaluation budgets, several seeds each: pycma CMA-ES, Optuna CMA-ES (the EvoMerge paper's defaults),
Optuna TPE, Optuna random (the floor), all over configs/quickstart.yaml's space (task arithmetic, one weight
per block and model), and M2N2 in recipe form (configs/m2n2-zoo.yaml). Then cheaper fitness: pycma CMA-ES
scoring each candidate on a fixed seeded subset of the search items (`objective.limit`), the final choice
confirmed on the full validation split. Per run: best validation score, final test score (mixed task) of
the exported best, wall time, items scored. Writes results/optimizers.md and results/optimizers_curves.png.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/optimizers.py [--seeds 3] [--budget 64]
It measures and writes tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, header_md, machine_facts, md_table, write_results  # noqa: E402
from _zoo_search import TestScorer, ensure_zoo, plot_curves, zoo_config  # noqa: E402

ARMS = {  # label: (config file, optimizer overrides, objective limit)
    "pycma CMA-ES": ("configs/quickstart.yaml", {"kind": "cmaes"}, None),
    "Optuna CMA-ES": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "cmaes"}, None),
    "Optuna TPE": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "tpe"}, None),
    "Optuna random": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "random"}, None),
    "M2N2 (recipe form)": ("configs/m2n2-zoo.yaml", {}, None),
    "pycma CMA-ES, 20-item subset": ("configs/quickstart.yaml", {"kind": "cmaes"}, 20),
    "pycma CMA-ES, 50-item subset": ("configs/quickstart.yaml", {"kind": "cmaes"}, 50),
}


def validation_curve(run: Path) -> list[float]:
    """Best validation score so far per evaluation (validated new bests only; NaN before the first)."""
    from evomerge.rundir import RunDir

    recs = RunDir(run).records()
    vals = {r["id"]: r["fitness"] for r in recs if r["type"] == "validation" and r["fitness"] is not None}
    evals = sorted((r for r in recs if r["type"] == "eval"), key=lambda r: r["id"])
    best, out = float("nan"), []
    for r in evals:
        v = vals.get(r["id"])
        if v is not None and not (v <= best):
            best = v
        out.append(best)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo-small")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "optimizers.md")
    args = ap.parse_args()
    from evomerge.runs import export_best, status
    from evomerge.stages import run_search

    zoo = ensure_zoo(args.zoo)
    score = TestScorer(zoo, zoo / "models" / "shift")
    n_items = sum(1 for _ in (zoo / "tasks" / "zoo_mixed_search.jsonl").open())
    work = Path(tempfile.mkdtemp(prefix="optimizers-"))
    per: dict[str, list[dict]] = {}
    curves: dict[str, list[float]] = {}
    try:
        for seed in range(args.seeds):
            for label, (cfg_file, opt_over, limit) in ARMS.items():
                base = zoo_config(cfg_file, zoo)
                opt = base.optimizer.model_copy(update={"budget": args.budget, "seed": seed, **opt_over})
                obj = base.objective.model_copy(update={"limit": limit}) if limit else base.objective
                cfg = base.model_copy(update={"optimizer": opt, "objective": obj, "seed": seed})
                run = work / f"{len(per.get(label, []))}-{label.replace(' ', '_').replace(',', '')}"
                t0 = time.perf_counter()
                run_search(cfg, run, progress=False)
                wall = time.perf_counter() - t0
                st = status(run)
                out = export_best(run, run.parent / f"{run.name}-best")
                test = score(out)["zoo_mixed_test"]
                items = (limit or n_items) * st["evaluations"]
                per.setdefault(label, []).append({"seed": seed, "validation": st["best"]["validation"],
                                                  "search": st["best"]["fitness"], "test": test, "wall": wall,
                                                  "evals": st["evaluations"], "items": items})
                if seed == 0:
                    curves[label] = validation_curve(run)
                print(label, per[label][-1], flush=True)
        plot_curves({k: v for k, v in curves.items() if "subset" not in k},
                    args.out.with_name("optimizers_curves.png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ms(vals):
        vals = [v for v in vals if v is not None]
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.3f}"

    full = statistics.mean(r["test"] for r in per["pycma CMA-ES"])
    n_test = sum(1 for _ in (zoo / "tasks" / "zoo_mixed_test.jsonl").open())
    half = 1.96 * math.sqrt(full * (1 - full) / n_test)
    rows = [[label, str(len(rs)), ms(r["validation"] for r in rs), ms(r["test"] for r in rs),
             f"{statistics.mean(r['evals'] for r in rs):.0f}", f"{statistics.mean(r['items'] for r in rs):.0f}",
             f"{statistics.mean(r['wall'] for r in rs):.1f}"] for label, rs in per.items()]
    facts = machine_facts(None)
    argv = ["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/optimizers.py", *sys.argv[1:]]
    text = header_md("Optimizers head to head on the small zoo", argv, facts)
    text += (f"Budget {args.budget} evaluations per run, seeds 0..{args.seeds - 1} (mean ± std). Validation: "
             "the best candidate's score on `zoo_mixed_validation` (200 items, never used to steer the search "
             "except to pick the exported model); test: the exported model on `zoo_mixed_test` "
             f"({n_test} items). Items: search items scored per run. The full-set pycma CMA-ES test score "
             f"{full:.3f} has a 95% binomial half-width of ±{half:.3f}.\n\n")
    text += md_table(["optimizer", "seeds", "validation", "test (mixed)", "evaluations", "items scored",
                      "s per run"], rows) + "\n\n![best validation so far, seed 0](optimizers_curves.png)\n"
    write_results(args.out, text, {"runs": per, "curves": curves})


if __name__ == "__main__":
    main()
