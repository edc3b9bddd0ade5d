"""Search overhead: how much of a search's wall time is spent outside building and scoring candidates.

Part A runs real searches (task-arithmetic weights, CMA-ES) on the micro zoo with 1 and 2 workers; part B
replaces the workers with a fake scorer that sleeps a fixed time per candidate ("build" + "score"), with
1, 2 and 64 simulated workers, to isolate the controller, Ray and bookkeeping.

For each run, over the search loop (from the first dispatch to the last result; Ray start-up and worker
initialisation are reported apart):
  candidates per minute;
  mean build and score seconds per candidate (as the workers measured them);
  per-candidate overhead: controller-side wall time of a candidate minus its build + score
      (dispatch, transfer, recording);
  "outside build+score" fraction: 1 - sum(build + score) / (workers x loop wall time), which also counts
      workers idling at CMA-ES generation ends.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_overhead.py [--out results/search_overhead.md]
It measures and writes a table; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class FakeWorker:
    """The MergeWorker interface with a fixed-cost fake build and score (no torch, no model)."""

    build_s, score_s = 0.05, 0.15

    def __init__(self, spec):
        self.name = f"fake:{os.getpid()}"

    def evaluate(self, cand_id, recipe, attempt=0):
        t0 = time.perf_counter()
        time.sleep(self.build_s)
        t1 = time.perf_counter()
        time.sleep(self.score_s)
        t2 = time.perf_counter()
        w = [m.get("parameters", {}).get("weight", 0.0) for m in recipe["models"].values()]
        w = [x for x in w if isinstance(x, float)]
        fit = 1.0 - sum((x - 0.6) ** 2 for x in w)
        return {"metrics": {"fake": fit}, "items": {"fake": [fit]}, "fitness": fit, "t_build": t1 - t0,
                "t_score": t2 - t1, "worker": self.name}

    def validate(self, recipe):
        return {}

    def ready(self):
        return self.name


def measure(run_dir: Path, workers: int) -> dict:
    from evomerge.run.rundir import RunDir

    ev = [r for r in RunDir(run_dir).records() if r["type"] == "eval" and r["fitness"] is not None]
    start = min(r["time"] - r["t_wall"] for r in ev)
    end = max(r["time"] for r in ev)
    wall = end - start
    busy = sum(r["t_build"] + r["t_score"] for r in ev)
    return {"n": len(ev), "loop_s": wall, "per_min": 60 * len(ev) / wall,
            "build": statistics.mean(r["t_build"] for r in ev), "score": statistics.mean(r["t_score"] for r in ev),
            "dispatch": statistics.mean(r["t_wall"] - r["t_build"] - r["t_score"] for r in ev),
            "outside": 1 - busy / (workers * wall)}


def run(cfg, run_dir: Path, worker_cls=None) -> tuple[dict, float]:
    from evomerge.run.controller import Controller

    t0 = time.perf_counter()
    Controller(cfg, run_dir, progress=False, worker_cls=worker_cls).run()
    total = time.perf_counter() - t0
    return measure(run_dir, cfg.workers.count), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results/search_overhead.md"))
    ap.add_argument("--zoo", default=str(ROOT / ".bench/zoo_micro"))
    ap.add_argument("--budget", type=int, default=24)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from evomerge.run.config import parse_config
    from evomerge.zoo.build import build_zoo

    zoo = Path(args.zoo)
    if not (zoo / "zoo.json").exists():
        build_zoo(zoo, "micro", seed=0)
    ray.init(include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-overhead-"))
    rows = []

    def cfg(workers: int, popsize: int, budget: int, extra_workers: dict | None = None):
        return parse_config({
            "models": {"base": str(zoo / "models/base"), "shift": str(zoo / "models/shift"),
                       "mirror": str(zoo / "models/mirror")}, "base": "base",
            "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0, 1.5]}, "x0": 0.5},
            "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}]},
            "optimizer": {"seed": 0, "budget": budget, "popsize": popsize, "sigma0": 0.3},
            "workers": {"count": workers, "cpus": 1 if extra_workers is None else 0, **(extra_workers or {})},
        }, zoo)

    for w in (1, 2):
        m, total = run(cfg(w, 8, args.budget), tmp / f"real{w}")
        rows.append(("real (micro zoo, 100 items)", w, 8, m, total))
    for w, build_s, score_s in ((1, 0.05, 0.15), (2, 0.05, 0.15), (64, 0.05, 0.15), (64, 0.5, 1.5)):
        pop = max(8, w)
        fake = type("FakeWorker", (FakeWorker,), {"build_s": build_s, "score_s": score_s})
        m, total = run(cfg(w, pop, 4 * pop, {}), tmp / f"fake{w}-{score_s}", fake)
        rows.append((f"fake scorer ({build_s:g} s build + {score_s:g} s score)", w, pop, m, total))
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    lines = [
        "# Search overhead: time outside building and scoring candidates", "",
        "Command:", "", "```", "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_overhead.py", "```", "",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; commit {git}; "
        f"{os.cpu_count()} cores; python {platform.python_version()}. The machine may be shared: absolute times "
        "vary, the fractions are what to read.", "",
        "Search: CMA-ES over the two task-arithmetic weights of the micro zoo's experts. The loop is timed from "
        "the first dispatch to the last result; `total` includes Ray start-up and worker initialisation.", "",
        "| workers | candidates | popsize | per minute | build s | score s | dispatch s/candidate | "
        "outside build+score | loop s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, w, pop, m, total in rows:
        lines.append(f"| {w} ({kind}) | {m['n']} | {pop} | {m['per_min']:.1f} | {m['build']:.3f} | {m['score']:.3f} | "
                     f"{m['dispatch']:.4f} | {100 * m['outside']:.1f}% | {m['loop_s']:.1f} | {total:.1f} |")
    lines += ["", "Goal: under 5% of wall time outside build+score. 'Outside' counts workers idling at CMA-ES "
              "generation ends (a generation is handed out whole and must be told whole) as well as the "
              "controller's own dispatch and recording.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
