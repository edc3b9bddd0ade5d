"""The quickstart, measured: the README's main command on the small zoo, then every model on the test split.

Runs (unless --reuse and they exist) exactly what the README's main command runs after installing:
    evomerge zoo build zoo-small --size small
    evomerge search configs/quickstart.yaml
timing each, then scores with lm-eval on the TEST split (items never seen by the search): the base, each
expert, the uniform average, default TIES and DARE-TIES merges, and the evolved merge (the run's best by
validation score). Writes results/quickstart.md and the search curve results/quickstart_curve.png.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quickstart.py [--reuse]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["mixed", "compositional", "shift", "mirror"]


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="reuse zoo-small/ and runs/quickstart if present")
    ap.add_argument("--out", default=str(ROOT / "results/quickstart.md"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    zoo, run_dir = ROOT / "zoo-small", ROOT / "runs/quickstart"
    exe = str(Path(sys.executable).parent / "evomerge")
    t_zoo = t_search = None
    if not (args.reuse and (zoo / "zoo.json").exists()):
        shutil.rmtree(zoo, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        t_zoo = run([exe, "zoo", "build", str(zoo), "--size", "small"])
    if not (args.reuse and (run_dir / "ledger.jsonl").exists()):
        shutil.rmtree(run_dir, ignore_errors=True)
        t_search = run([exe, "search", "configs/quickstart.yaml"])

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.build import build_into
    from evomerge.merge.load import parse_recipe
    from evomerge.merge.plan import make_plan
    from evomerge.merge.recipe import Recipe
    from evomerge.run.rundir import RunDir
    from evomerge.run.status import status
    from workers.score import Scorer

    torch.set_num_threads(2)
    st = status(run_dir)
    models = {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}
    two = {"shift": {"path": models["shift"]}, "mirror": {"path": models["mirror"]}}

    def with_params(params: dict) -> dict:
        return {"base": {"path": models["base"]}, **{k: {**v, "parameters": params} for k, v in two.items()}}

    candidates = {
        "uniform average (linear 0.5/0.5)": parse_recipe({"method": "linear", "models": {
            k: {**v, "parameters": {"weight": 0.5}} for k, v in two.items()}}),
        "TIES (weight 1, density 0.5)": parse_recipe({"method": "ties", "base": "base",
                                                       "models": with_params({"weight": 1.0, "density": 0.5})}),
        "DARE-TIES (weight 0.5, density 0.5)": parse_recipe({"method": "dare_ties", "base": "base",
                                                              "models": with_params({"weight": 0.5, "density": 0.5})}),
        f"evolved (search best by validation, evaluation #{st['best']['id']})": Recipe.model_validate(
            st["best"]["recipe"]),
    }
    tok = AutoTokenizer.from_pretrained(models["base"])
    scorer = Scorer([{"name": f"zoo_{t}_test", "metric": "acc"} for t in TASKS], [str(zoo / "tasks")])
    rows = []
    for name in ("base", "shift", "mirror"):
        m = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
        rows.append((name if name == "base" else f"expert `{name}`", scorer.score(m, tok)))
    resident = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    for label, recipe in candidates.items():
        build_into(make_plan(recipe), dict(resident.state_dict()))
        rows.append((label, scorer.score(resident, tok)))
    n = len(scorer.score(resident, tok)["items"]["zoo_mixed_test"])

    # the search curve
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = RunDir(run_dir).records()
    ev = sorted((r for r in recs if r["type"] == "eval"), key=lambda r: r["id"])
    vals = {r["id"]: r["fitness"] for r in recs if r["type"] == "validation"}
    best, curve = -1.0, []
    for r in ev:
        best = max(best, r["fitness"] if r["fitness"] is not None else -1.0)
        curve.append(best)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([r["id"] for r in ev], [r["fitness"] for r in ev], s=12, alpha=0.5, label="candidate (search split)")
    ax.plot(range(len(curve)), curve, color="C1", label="best so far")
    ax.scatter(list(vals), list(vals.values()), marker="*", s=80, color="C2", label="validation of a new best")
    for label, res in rows[:3]:
        ax.axhline(res["metrics"]["zoo_mixed_test"], ls=":", lw=1, color="gray")
        ax.text(len(ev) - 1, res["metrics"]["zoo_mixed_test"], f" {label} (test)", fontsize=7, va="bottom",
                ha="right", color="gray")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("accuracy on mixed")
    ax.set_title("quickstart search: CMA-ES over task-arithmetic weights (small zoo)")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    png = Path(args.out).with_name("quickstart_curve.png")
    fig.savefig(png, dpi=120)

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    evolved = rows[-1][1]["metrics"]["zoo_mixed_test"]
    others = {label: res["metrics"]["zoo_mixed_test"] for label, res in rows[1:-1]}
    lines = [
        "# Quickstart: the README's main command, measured", "",
        "Commands (what the README's main command runs after installing; then this script scores the test split):",
        "", "```", "evomerge zoo build zoo-small --size small", "evomerge search configs/quickstart.yaml",
        "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quickstart.py" + (" --reuse" if args.reuse else ""), "```", "",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; commit {git}; {os.cpu_count()} CPU cores "
        "(shared with other work), no GPU.", "",
        f"- zoo build: {f'{t_zoo:.0f} s' if t_zoo else 'reused'}; search: "
        f"{f'{t_search:.0f} s' if t_search else 'reused'} for {st['evaluations']} evaluations "
        f"({st['failures']} failed) with 2 workers; total "
        f"{'%.1f min' % ((t_zoo + t_search) / 60) if t_zoo and t_search else 'n/a (reused)'} (goal: ≤ 10 min).",
        "- search: CMA-ES (popsize 8, σ0 0.25, seed 0) over 4 task-arithmetic weights (2 blocks × 2 experts) on "
        "the 200 items of `zoo_mixed_search`; each new best is scored on the 200 `zoo_mixed_validation` items and "
        "the evolved merge is the best by validation.",
        f"- evolved recipe (evaluation #{st['best']['id']}: search {st['best']['fitness']:.3f}, validation "
        f"{st['best']['validation']:.3f}): weights "
        + ", ".join(f"{m} {p['parameters']['weight']}" for m, p in st['best']['recipe']['models'].items()
                    if p.get('parameters')), "",
        f"## Test split (n = {n} items per task; accuracy, 95% Wilson interval for mixed)", "",
        "| model | mixed | compositional | shift | mirror |", "|---|---|---|---|---|",
    ]
    for label, res in rows:
        m = res["metrics"]
        lo, hi = wilson(m["zoo_mixed_test"], n)
        lines.append(f"| {label} | {m['zoo_mixed_test']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{m['zoo_compositional_test']:.3f} | {m['zoo_shift_test']:.3f} | {m['zoo_mirror_test']:.3f} |")
    beaten = all(evolved > v for v in others.values())
    lines += ["", f"The evolved merge {'beats' if beaten else 'does NOT beat'} every expert and hand-set merge on "
              f"`mixed` (test): {evolved:.3f} vs best other {max(others.values()):.3f}.",
              "The compositional task was not part of the search objective; its scores are reported as measured.",
              "", "![search curve](quickstart_curve.png)", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
