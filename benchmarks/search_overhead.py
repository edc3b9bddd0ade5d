"""Search overhead: how much of a search's wall time is spent outside building and scoring candidates.

Part A runs real searches (task-arithmetic weights, CMA-ES) on the micro zoo with 1 and 2 workers; part B
replaces the workers with a fake scorer that sleeps a fixed time per candidate ("build" + "score"), with
1, 2 and 64 simulated workers, to isolate the controller, Ray and bookkeeping. Part C (`--part realistic`)
draws each candidate's time from a seeded lognormal (coefficient of variation 0.5 and 1.0; every 50th candidate
a 10x straggler), at 2, 16 and 64 simulated workers, generational CMA-ES against asynchronous
(`optimizer.asynchronous: true`), plus the short-candidate case (0.2 s) at 64 workers.

For each run, over the search loop (from the first dispatch to the last result; Ray start-up and worker
initialisation are reported apart):
  candidates per minute;
  mean build and score seconds per candidate (as the workers measured them);
  per-candidate overhead: controller-side wall time of a candidate minus its build + score
      (dispatch, transfer, recording);
  "outside build+score" fraction: 1 - sum(build + score) / (workers x loop wall time), which also counts
      workers idling at CMA-ES generation ends;
  (part C) "busy until the budget is out": the same fraction up to the moment the last candidate was handed
      out (what the scheduler controls; after it, workers idle only because the budget is spent).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_overhead.py [--part all|realistic]
          [--out results/search_overhead.md]
It measures and writes a table; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
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
        self.task = spec["objective"]["tasks"][0]["name"]  # results keyed as a real worker keys them

    def durations(self, cand_id: int) -> tuple[float, float]:
        return self.build_s, self.score_s

    def evaluate(self, cand_id, recipe, attempt=0, *policy):  # *policy: a racing threshold, IRT samples
        build_s, score_s = self.durations(cand_id)
        t0 = time.perf_counter()
        time.sleep(build_s)
        t1 = time.perf_counter()
        time.sleep(score_s)
        t2 = time.perf_counter()
        w = [m.get("parameters", {}).get("weight", 0.0) for m in recipe["models"].values()]
        w = [x for x in w if isinstance(x, float)]
        fit = 1.0 - sum((x - 0.6) ** 2 for x in w)
        return {"metrics": {self.task: fit}, "items": {self.task: [fit]}, "fitness": fit, "t_build": t1 - t0,
                "t_score": t2 - t1, "worker": self.name}

    def validate(self, recipe):
        return {}

    def ready(self):
        return self.name


class VariableWorker(FakeWorker):
    """Candidate times from a seeded lognormal with mean `mean_s` and coefficient of variation `cv` (a quarter
    build, the rest scoring); every `straggler`-th candidate takes 10 times as long."""

    mean_s, cv, straggler = 1.0, 0.5, 50

    def durations(self, cand_id: int) -> tuple[float, float]:
        sigma = math.sqrt(math.log(1 + self.cv ** 2))
        d = self.mean_s * math.exp(random.Random(cand_id * 7919 + 17).gauss(-sigma ** 2 / 2, sigma))
        if cand_id % self.straggler == self.straggler - 1:
            d *= 10
        return 0.25 * d, 0.75 * d


def busy_until_handed_out(run_dir: Path, workers: int) -> float:
    """Share of worker time in build+score from the first dispatch to the moment the last candidate was handed
    out (each candidate's dispatch time is its record's time minus its wall time)."""
    from evomerge.run.rundir import RunDir

    ev = [r for r in RunDir(run_dir).records() if r["type"] == "eval" and r["fitness"] is not None]
    starts = [r["time"] - r["t_wall"] for r in ev]
    t0, t_last = min(starts), max(starts)
    busy = 0.0
    for r in ev:
        # the candidate's build+score, placed at the end of its wall time, clipped to [t0, t_last]
        b1 = r["time"]
        b0 = b1 - (r["t_build"] + r["t_score"])
        busy += max(0.0, min(b1, t_last) - max(b0, t0))
    return busy / (workers * (t_last - t0)) if t_last > t0 else 1.0


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
    ap.add_argument("--part", choices=["all", "realistic"], default="all")
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
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a cluster of another run
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-overhead-"))
    rows = []

    def cfg(workers: int, popsize: int, budget: int, extra_workers: dict | None = None, asynchronous=False):
        return parse_config({
            "models": {"base": str(zoo / "models/base"), "shift": str(zoo / "models/shift"),
                       "mirror": str(zoo / "models/mirror")}, "base": "base",
            "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0, 1.5]}, "x0": 0.5},
            "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}]},
            "optimizer": {"seed": 0, "budget": budget, "popsize": popsize, "sigma0": 0.3,
                          "asynchronous": asynchronous},
            "workers": {"count": workers, "cpus": 1 if extra_workers is None else 0, **(extra_workers or {})},
        }, zoo)

    realistic = []
    if args.part == "all":
        for w in (1, 2):
            m, total = run(cfg(w, 8, args.budget), tmp / f"real{w}")
            rows.append(("real (micro zoo, 100 items)", w, 8, m, total))
        for w, build_s, score_s in ((1, 0.05, 0.15), (2, 0.05, 0.15), (64, 0.05, 0.15), (64, 0.5, 1.5)):
            pop = max(8, w)
            fake = type("FakeWorker", (FakeWorker,), {"build_s": build_s, "score_s": score_s})
            m, total = run(cfg(w, pop, 4 * pop, {}), tmp / f"fake{w}-{score_s}", fake)
            rows.append((f"fake scorer ({build_s:g} s build + {score_s:g} s score)", w, pop, m, total))
    cases = [(w, cv, 1.0) for w in (2, 16, 64) for cv in (0.5, 1.0)] + [(64, 0.5, 0.2)]
    for w, cv, mean in cases:
        pop = 8 if w < 16 else 16
        budget = max(48, 12 * w)
        for mode in (False, True):
            worker = type("VariableWorker", (VariableWorker,), {"mean_s": mean, "cv": cv})
            d = tmp / f"var{w}-{cv}-{mean}-{mode}"
            m, total = run(cfg(w, pop, budget, {}, asynchronous=mode), d, worker)
            m["handed_out"] = busy_until_handed_out(d, w)
            realistic.append((w, cv, mean, pop, "asynchronous" if mode else "generational", m, total))
            print(realistic[-1], flush=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    lines = [
        "# Search overhead: time outside building and scoring candidates", "",
        "Command:", "", "```", "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_overhead.py"
        + (" --part realistic" if args.part == "realistic" else ""), "```", "",
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
    if realistic:
        lines += ["## Realistic candidate times: generational vs asynchronous CMA-ES", "",
                  "Simulated workers (Ray actors that sleep); each candidate's time drawn from a seeded lognormal "
                  "(mean as given, coefficient of variation 0.5 or 1.0), every 50th candidate 10x longer. "
                  "Budget: max(48, 12 x workers) evaluations. `busy (whole loop)` is the share of worker time in "
                  "build+score from the first dispatch to the last result; `busy until the budget is out` stops "
                  "at the last hand-out (after it, workers idle only because nothing is left to evaluate). "
                  "Goal: >= 97% busy at every size.", "",
                  "| workers | CV | mean s | popsize | mode | candidates | per minute | dispatch s/candidate | "
                  "busy until the budget is out | busy (whole loop) | loop s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for w, cv, mean, pop, mode, m, _total in realistic:
            lines.append(f"| {w} | {cv:g} | {mean:g} | {pop} | {mode} | {m['n']} | {m['per_min']:.1f} | "
                         f"{m['dispatch']:.4f} | {100 * m['handed_out']:.1f}% | {100 * (1 - m['outside']):.1f}% | "
                         f"{m['loop_s']:.1f} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
