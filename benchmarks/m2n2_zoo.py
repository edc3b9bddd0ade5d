"""M2N2 (recipe form) vs CMA-ES parameter-space search on the small zoo, at equal evaluation budgets.

Both searches optimise `zoo_mixed_search` and export their best by `zoo_mixed_validation`; the exported
models, the experts and the base are scored on the test split. M2N2: configs/m2n2-zoo.yaml (seeds: the two
experts). CMA-ES: configs/quickstart.yaml (task arithmetic over base + both experts, one weight per block
and model) with the same budget. Writes results/m2n2_zoo.md and results/m2n2_zoo_curves.png.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/m2n2_zoo.py [--budget 200] [--zoo zoo-small]
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
from _zoo_search import TEST_TASKS, TestScorer, curve, ensure_zoo, plot_curves, zoo_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo-small")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "m2n2_zoo.md")
    args = ap.parse_args()
    from evomerge.merge.load import any_recipe
    from evomerge.run.stages import run_search
    from evomerge.run.status import export_best

    zoo = ensure_zoo(args.zoo)
    score = TestScorer(zoo, zoo / "models" / "shift")
    rows = [[f"`{n}`", "", score(zoo / "models" / n)] for n in ("base", "shift", "mirror")]
    work = Path(tempfile.mkdtemp(prefix="m2n2-zoo-"))
    curves, timings = {}, {}
    try:
        for label, cfg_file in (("CMA-ES (task arithmetic)", "configs/quickstart.yaml"),
                                ("M2N2 (recipe form)", "configs/m2n2-zoo.yaml")):
            base = zoo_config(cfg_file, zoo)
            cfg = base.model_copy(update={"optimizer": base.optimizer.model_copy(update={"budget": args.budget})})
            run = work / label.split()[0]
            t0 = time.perf_counter()
            st = run_search(cfg, run, progress=False)
            timings[label] = time.perf_counter() - t0
            curves[label] = curve(run)
            out = export_best(run, work / f"best-{run.name}")
            recipe = any_recipe(st["best"]["recipe"])
            what = (f"{len(recipe.pieces)} pieces over {len(recipe.models)} seeds" if recipe.method == "piecewise"
                    else f"{recipe.method}")
            val = st["best"]["validation"]
            val = float("nan") if val is None else val
            rows.append([f"**{label}** best", f"{what}; {st['evaluations']} evals, {timings[label] / 60:.1f} min; "
                         f"search {st['best']['fitness']:.3f}, validation {val:.3f}", score(out)])
        plot_curves(curves, args.out.with_name("m2n2_zoo_curves.png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    facts = machine_facts(None)
    argv = ["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/m2n2_zoo.py", *sys.argv[1:]]
    text = header_md("M2N2 (recipe form) vs CMA-ES on the small zoo (test split)", argv, facts)
    text += (f"Equal budgets of {args.budget} evaluations; both search `zoo_mixed_search` and export their best by "
             "`zoo_mixed_validation`. Test accuracy (exact greedy continuation) per task.\n\n")
    text += md_table(["model", "what", *[t.replace("zoo_", "").replace("_test", "") for t in TEST_TASKS]],
                     [[a, b, *[f"{m[t]:.3f}" for t in TEST_TASKS]] for a, b, m in rows]) + "\n\n"
    text += "![search curves](m2n2_zoo_curves.png)\n"
    write_results(args.out, text, {"curves": curves, "timings_s": timings})


if __name__ == "__main__":
    main()
