"""Which optimizer finds the best merge for the fewest evaluations? Head to head on the small zoo.

Equal evaluation budgets, several seeds each: pycma CMA-ES, Optuna CMA-ES (the EvoMerge paper's defaults),
Optuna TPE, Optuna GP, Optuna random (the floor), all over configs/quickstart.yaml's space (task arithmetic, one weight
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

ARMS = {  # label: (config file, optimizer overrides, objective overrides, space overrides)
    "pycma CMA-ES": ("configs/quickstart.yaml", {"kind": "cmaes"}, {}, {}),
    "pycma CMA-ES, asynchronous": ("configs/quickstart.yaml", {"kind": "cmaes", "asynchronous": True}, {}, {}),
    "Optuna CMA-ES": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "cmaes"}, {}, {}),
    "Optuna TPE": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "tpe"}, {}, {}),
    "Optuna GP": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "gp"}, {}, {}),
    "Optuna random": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "random"}, {}, {}),
    "grid of hand-set merges": ("configs/quickstart.yaml", {"kind": "grid"}, {}, {}),
    "M2N2 (recipe form)": ("configs/m2n2-zoo.yaml", {}, {}, {}),
    "Optuna TPE, method searched": ("configs/quickstart.yaml", {"kind": "optuna", "sampler": "tpe"}, {},
                                    {"method": ["task_arithmetic", "ties", "dare_linear", "della"],
                                     "search": ["weight", "density"], "fixed": {"normalize": False}}),
    "pycma CMA-ES, racing": ("configs/quickstart.yaml", {"kind": "cmaes"},
                             {"racing": {"chunks": 4, "delta": 0.05, "top_k": 1}}, {}),
    "pycma CMA-ES, 50-item subset": ("configs/quickstart.yaml", {"kind": "cmaes"}, {"limit": 50}, {}),
    "pycma CMA-ES, 20-item subset": ("configs/quickstart.yaml", {"kind": "cmaes"}, {"limit": 20}, {}),
    "pycma CMA-ES, IRT 20 anchors (8 calibration)": (
        "configs/quickstart.yaml", {"kind": "cmaes"}, {"estimate": {"items": 20, "calibration": 8}}, {}),
    "pycma CMA-ES, IRT 8 anchors (4 calibration)": (
        "configs/quickstart.yaml", {"kind": "cmaes"}, {"estimate": {"items": 8, "calibration": 4}}, {}),
    "pycma CMA-ES, IRT 10 anchors (3 calibration)": (
        "configs/quickstart.yaml", {"kind": "cmaes"}, {"estimate": {"items": 10, "calibration": 3}}, {}),
    "pycma CMA-ES, IRT 8 anchors (3 calibration)": (
        "configs/quickstart.yaml", {"kind": "cmaes"}, {"estimate": {"items": 8, "calibration": 3}}, {}),
    "pycma CMA-ES, IRT 6 anchors (4 calibration)": (
        "configs/quickstart.yaml", {"kind": "cmaes"}, {"estimate": {"items": 6, "calibration": 4}}, {}),
    "pycma CMA-ES, IRT 8 anchors (4 calibration) from a 100-item pool": (
        "configs/quickstart.yaml", {"kind": "cmaes"}, {"limit": 100, "estimate": {"items": 8, "calibration": 4}},
        {}),
}
CHEAP = ("racing", "subset", "IRT")


class HandSetGrid:
    """The floor a user gets without a search: one uniform weight per model (the same in every layer group),
    every pair on an 8 x 8 grid over the bounds, in a seeded random order. Speaks ask/tell."""

    def __init__(self, space, seed: int, max_evals: int):
        import itertools

        import numpy as np

        from evomerge.search.optimizers import Ask

        self.Ask = Ask
        models = sorted({d.model for d in space.dims if d.model})
        lo, hi = space.dims[0].lower, space.dims[0].upper
        vals = np.linspace(lo, hi, 8)
        grid = list(itertools.product(vals, repeat=len(models)))
        order = np.random.default_rng(seed).permutation(len(grid))[:max_evals]
        self.xs = [np.array([grid[k][models.index(d.model)] for d in space.dims]) for k in order]
        self.next, self.told = 0, 0

    def ask(self):
        if self.next >= len(self.xs):
            return None
        self.next += 1
        return self.Ask(self.next - 1, self.xs[self.next - 1])

    def tell(self, ask_id, fitness, items=None, objectives=None):
        self.told += 1

    def stop(self):
        return {"grid": len(self.xs)} if self.told >= len(self.xs) else {}


def chosen(label: str, only: str) -> bool:
    """--only: comma-separated arm labels (exact) or fragments of labels."""
    frags = only.split(",")
    return label in frags or any(f in label for f in frags if f not in ARMS)


def validation_curve(run: Path) -> list[float]:
    """Best validation score so far per evaluation (validated new bests only; NaN before the first)."""
    from evomerge.run.rundir import RunDir

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
    ap.add_argument("--only", default="", help="comma-separated label fragments: run only those arms")
    ap.add_argument("--few-seeds", type=int, default=None,
                    help="run the cheaper-fitness arms and Optuna random (the floor) on this many seeds only "
                         "(default: all --seeds)")
    ap.add_argument("--merge", action="store_true", help="keep the other arms' rows from the existing results "
                                                         "file (its raw JSON) and replace only the arms run now")
    ap.add_argument("--add-seeds", action="store_true",
                    help="with --merge: keep the seeds already recorded for the arms run now and run only the "
                         "missing ones (finishes a stopped run)")
    args = ap.parse_args()
    from evomerge.run.rundir import RunDir
    from evomerge.run.stages import run_search
    from evomerge.run.status import export_best, status

    zoo = ensure_zoo(args.zoo)
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a Ray of its own, never a cluster someone else started
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    score = TestScorer(zoo, zoo / "models" / "shift")
    n_val = sum(1 for _ in (zoo / "tasks" / "zoo_mixed_validation.jsonl").open())
    work = Path(tempfile.mkdtemp(prefix="optimizers-"))
    per: dict[str, list[dict]] = {}
    curves: dict[str, list[float]] = {}
    commands = [" ".join(["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/optimizers.py", *sys.argv[1:]])]
    if args.merge and args.out.exists():
        import json

        text = args.out.read_text()
        old = json.loads(text[text.index("<!-- raw -->"):].split("```json\n", 1)[1].split("\n```", 1)[0])
        keep = [k for k in old["runs"] if args.add_seeds or not (args.only and chosen(k, args.only))]
        per = {k: old["runs"][k] for k in keep}
        curves = {k: v for k, v in old["curves"].items() if k in keep}
        commands = old.get("commands", []) + commands
    def report() -> None:
        """Write the table from the runs so far (after every seed: a stopped run keeps what it measured)."""
        def ms(vals):
            vals = [v for v in vals if v is not None]
            return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.3f}"

        ref = per.get("pycma CMA-ES") or next(iter(per.values()))
        full = statistics.mean(r["test"] for r in ref)
        full_items = statistics.mean(r["items"] for r in ref)
        n_test = sum(1 for _ in (zoo / "tasks" / "zoo_mixed_test.jsonl").open())
        half = 1.96 * math.sqrt(full * (1 - full) / n_test)

        def row(label: str, rs: list[dict]) -> list[str]:
            test = statistics.mean(r["test"] for r in rs)
            items = statistics.mean(r["items"] for r in rs)
            verdict = "yes" if test >= full - half else "no"
            methods = sorted({r["best_method"] for r in rs})
            return [label, str(len(rs)), ms(r["validation"] for r in rs), ms(r["test"] for r in rs), verdict,
                    f"{statistics.mean(r['evals'] for r in rs):.0f}", f"{items:.0f}", f"{full_items / items:.1f}×",
                    f"{statistics.mean(r['validation_items'] for r in rs):.0f}",
                    f"{statistics.mean(r['wall'] for r in rs):.1f}", ", ".join(methods)]

        rows = [row(label, per[label]) for label in ARMS if label in per]
        facts = machine_facts(None)
        argv = ["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/optimizers.py", *sys.argv[1:]]
        text = header_md("Optimizers head to head on the small zoo", argv, facts)
        text += (f"Budget {args.budget} evaluations per run, seeds 0..{args.seeds - 1} (mean ± std; the hand-set grid "
                 "does not depend on the seed and runs once). Validation: the best candidate's score on "
                 f"`zoo_mixed_validation` ({n_val} items, never used to steer the search except to pick the exported "
                 "model; every new best is validated on all of it); test: the exported model on `zoo_mixed_test` "
                 f"({n_test} items). *Equal quality*: test ≥ the full-set pycma CMA-ES score {full:.3f} minus its "
                 f"95% binomial half-width {half:.3f}. Items scored: search items per run (summed per evaluation, "
                 "calibration and re-scoring included); *fewer*: the full-set pycma CMA-ES items divided by this "
                 "arm's; validation items are counted apart.\n\n")
        text += md_table(["optimizer", "seeds", "validation", "test (mixed)", "equal quality", "evaluations",
                          "items scored", "fewer items", "validation items", "s per run", "best method"], rows)
        text += "\n\n![best validation so far, seed 0](optimizers_curves.png)\n"
        if len(commands) > 1:
            text += "\nRows come from these runs, in order (later ones replace the arms they ran):\n\n" + "".join(
                f"    {c}\n" for c in commands)
        write_results(args.out, text, {"runs": per, "curves": curves, "commands": commands})

    fresh: set[str] = set()
    try:
        for seed in range(args.seeds):
            for label, (cfg_file, opt_over, obj_over, space_over) in ARMS.items():
                if args.only and not chosen(label, args.only):
                    continue
                if label == "grid of hand-set merges" and seed > 0:
                    continue  # the grid does not depend on the seed (only its order does)
                few = any(c in label for c in CHEAP) or label == "Optuna random"
                if few and args.few_seeds is not None and seed >= args.few_seeds:
                    continue
                if args.add_seeds and any(r["seed"] == seed for r in per.get(label, [])):
                    continue  # recorded by an earlier run of this file
                base = zoo_config(cfg_file, zoo)
                grid = opt_over.get("kind") == "grid"
                opt = base.optimizer.model_copy(update={"budget": args.budget, "seed": seed,
                                                        **({} if grid else opt_over)})
                obj = base.objective.model_copy(update=obj_over) if obj_over else base.objective
                space = base.space.model_copy(update=space_over) if space_over else base.space
                cfg = base.model_copy(update={"optimizer": opt, "objective": obj, "space": space, "seed": seed})
                cfg = type(cfg).model_validate(cfg.model_dump())  # re-run the config's own checks
                run = work / f"{seed}-{label.replace(' ', '_').replace(',', '')}"
                t0 = time.perf_counter()
                if grid:
                    import evomerge.run.controller as ctl

                    real = ctl.make_optimizer
                    ctl.make_optimizer = lambda c, sp, rd=None: HandSetGrid(sp, c.seed, c.optimizer.budget)
                    try:
                        run_search(cfg, run, progress=False)
                    finally:
                        ctl.make_optimizer = real
                else:
                    run_search(cfg, run, progress=False)
                wall = time.perf_counter() - t0
                st = status(run)
                out = export_best(run, run.parent / f"{run.name}-best")
                test = score(out)["zoo_mixed_test"]
                recs = RunDir(run).records()
                items = sum(r.get("items_scored") or 0 for r in recs if r["type"] in ("eval", "rescore"))
                val_items = n_val * sum(1 for r in recs if r["type"] == "validation")
                methods = sorted({r["recipe"]["method"] for r in recs if r["type"] == "eval"})
                if label not in fresh and not args.add_seeds:
                    per[label], fresh = [], fresh | {label}
                per.setdefault(label, [])
                per[label].append({"seed": seed, "validation": st["best"]["validation"],
                                                  "search": st["best"]["fitness"], "test": test, "wall": wall,
                                                  "evals": st["evaluations"], "items": items,
                                                  "validation_items": val_items,
                                                  "best_method": st["best"]["recipe"]["method"],
                                                  "methods_tried": methods})
                if seed == 0:
                    curves[label] = validation_curve(run)
                print(label, per[label][-1], flush=True)
            report()
        plot_curves({k: v for k, v in curves.items() if not any(c in k for c in CHEAP)},
                    args.out.with_name("optimizers_curves.png"))
        report()
    finally:
        shutil.rmtree(work, ignore_errors=True)



if __name__ == "__main__":
    main()
