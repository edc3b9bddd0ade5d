"""Soak: a long search with a fast fake scorer on 8 simulated workers. Does the controller's memory stay flat,
and does a checkpoint (a ledger append + fsync) cost the same at evaluation 5,000 as at evaluation 50?

The workers are Ray actors with the MergeWorker interface that sleep a few milliseconds and return a fitness
and per-item scores (100 items, like a real evaluation's record); the controller, optimizer (pycma CMA-ES on
a 16-dimensional per-layer task-arithmetic space), ledger and Ray are the real ones. A thread in the
controller's process samples its resident memory (VmRSS) and Python heap (tracemalloc) with the number of
evaluations recorded; every ledger sync is timed. Optionally a second run kills nothing but resumes the
finished run with a larger budget, to show resume cost at that ledger size.

Run:  .venv/bin/python benchmarks/soak.py [--evals 5000] [--workers 8]
Writes results/soak.md and results/soak.png. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, header_md, machine_facts, md_table, write_results  # noqa: E402


class FastFakeWorker:
    """The MergeWorker interface: a few milliseconds per candidate, a fitness from the recipe's weights and
    100 per-item scores (so each ledger record is the size of a real one)."""

    def __init__(self, spec):
        import random

        self.name = f"fake:{os.getpid()}"
        self.rng = random.Random(os.getpid())

    def evaluate(self, cand_id, recipe, attempt=0, threshold=None, samples=None):
        t0 = time.perf_counter()
        time.sleep(0.002)
        ws = []
        for m in recipe["models"].values():
            w = m.get("parameters", {}).get("weight")
            ws += w if isinstance(w, list) else [w] if isinstance(w, float) else []
        p = 1.0 - sum((x - 0.6) ** 2 for x in ws) / max(1, len(ws))
        items = [1.0 if self.rng.random() < p else 0.0 for _ in range(100)]
        fit = sum(items) / len(items)  # noisy, like a real score on 100 items: CMA-ES keeps searching
        t1 = time.perf_counter()
        return {"metrics": {"fake": fit}, "items": {"fake": items}, "fitness": fit, "t_build": (t1 - t0) / 2,
                "t_score": (t1 - t0) / 2, "worker": self.name, "raced": False, "items_scored": 100}

    def validate(self, recipe):
        return {}

    def ready(self):
        return {"name": self.name, "node": None}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(cfg, run: Path, samples: list, syncs: list, stop: threading.Event) -> float:
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    ctl = Controller(cfg, run, progress=False, worker_cls=FastFakeWorker)
    real_sync = RunDir.sync

    def timed_sync(self):
        t0 = time.perf_counter()
        real_sync(self)
        syncs.append((len(getattr(ctl, "evals", {})), time.perf_counter() - t0, self._synced))

    def one():
        cur, _ = tracemalloc.get_traced_memory()
        samples.append((len(getattr(ctl, "evals", {})), rss_mib(), cur / 2**20,
                        (run / "ledger.jsonl").stat().st_size if (run / "ledger.jsonl").exists() else 0))

    def sample():
        while not stop.wait(0.25):
            one()

    real_summary = ctl.summary

    def summary():  # the search loop is over: stop sampling before the end-of-run status reads the ledger
        stop.set()
        return real_summary()

    ctl.summary = summary
    RunDir.sync = timed_sync
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        ctl.run()
    finally:
        RunDir.sync = real_sync
        stop.set()
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evals", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "soak.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from evomerge.run.config import parse_config
    from evomerge.zoo.tiny import make_family

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    fam = make_family(work / "family", "llama", n_experts=2, hidden=64, layers=8)
    cfg = parse_config({
        "models": {"base": str(fam["base"]), "a": str(fam["expert1"]), "b": str(fam["expert2"])}, "base": "base",
        "space": {"method": "task_arithmetic", "granularity": "layer", "search": ["weight"],
                  "bounds": {"weight": [0.0, 1.2]}},
        "objective": {"tasks": [{"name": "fake"}]},
        "optimizer": {"budget": args.evals, "popsize": 16, "sigma0": 0.3, "seed": 0},
        "workers": {"count": args.workers, "cpus": 0.25}}, work)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tracemalloc.start()
    samples: list = []
    syncs: list = []
    try:
        wall = soak(cfg, work / "run", samples, syncs, threading.Event())
        # resume the finished run with 500 more evaluations: the cost of replaying a long ledger
        from evomerge.run.controller import Controller
        from evomerge.run.rundir import RunDir

        more = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"budget": args.evals + 500})})
        n_before = sum(1 for r in RunDir(work / "run").records() if r["type"] == "eval")
        t0 = time.perf_counter()
        Controller(more, work / "run", resume=True, progress=False, worker_cls=FastFakeWorker).run()
        resume_wall = time.perf_counter() - t0
        ledger_bytes = (work / "run" / "ledger.jsonl").stat().st_size
    finally:
        ray.shutdown()
    evals = max(s[0] for s in samples)

    def at(frac):
        target = frac * evals
        return min(samples, key=lambda s: abs(s[0] - target))

    points = [at(f) for f in (0.05, 0.25, 0.5, 0.75, 1.0)]
    rows = [[f"{p[0]}", f"{p[1]:.1f}", f"{p[2]:.2f}", f"{p[3] / 2**20:.2f}"] for p in points]
    # checkpoint cost by ledger size: median sync time per 10% of the run
    buckets = []
    for k in range(10):
        lo, hi = k * evals / 10, (k + 1) * evals / 10
        ts = [t for n, t, _ in syncs if lo <= n < hi]
        if ts:
            buckets.append([f"{int(lo)}–{int(hi)}", str(len(ts)), f"{statistics.median(ts) * 1e3:.2f}",
                            f"{statistics.mean(ts) * 1e3:.2f}", f"{max(ts) * 1e3:.1f}"])
    first, last = points[0], points[-1]
    rss_slope = (last[1] - first[1]) / max(1, last[0] - first[0]) * 1000
    heap_slope = (last[2] - first[2]) / max(1, last[0] - first[0]) * 1000
    bytes_per_eval = ledger_bytes / (n_before + 500)
    plot(samples, syncs, args.out.with_suffix(".png"))

    facts = machine_facts(None)
    argv = [".venv/bin/python", "benchmarks/soak.py", *sys.argv[1:]]
    text = header_md("Soak: controller memory and checkpoint cost over a long run", argv, facts)
    text += (f"{n_before} evaluations on {args.workers} simulated workers (Ray actors with a 2 ms fake scorer "
             "returning 100 per-item scores, so the fitness is noisy as a real one), pycma CMA-ES over 16 weights "
             "(restarting with a larger population when it converges), the real controller, ledger and Ray. "
             f"Wall time {wall:.0f} s ({n_before / wall:.0f} evaluations/s; memory sampled every 0.25 s until the "
             f"loop ended, last sample at {evals}). Then the finished run was resumed with "
             f"500 more evaluations: {resume_wall:.1f} s including Ray start-up and replaying {n_before} records "
             "into the optimizer.\n\n")
    text += "## Controller memory over the run\n\n"
    text += md_table(["evaluations recorded", "RSS (MiB)", "Python heap (MiB, tracemalloc)", "ledger (MiB)"], rows)
    text += (f"\n\nGrowth from {first[0]} to {last[0]} evaluations: RSS {rss_slope:+.2f} MiB and Python heap "
             f"{heap_slope:+.3f} MiB per 1,000 evaluations ({heap_slope * 2**20 / 1000:.0f} bytes per "
             "evaluation: the controller's slim record of each evaluation and pycma's tell history). "
             f"Ledger: {bytes_per_eval:.0f} bytes per evaluation, append-only.\n\n")
    text += "## Checkpoint cost (one ledger append group + fsync) by position in the run\n\n"
    text += md_table(["evaluations", "syncs", "median (ms)", "mean (ms)", "max (ms)"], buckets)
    text += "\n\n![memory and checkpoint cost](soak.png)\n"
    write_results(args.out, text, {"samples": samples, "syncs_per_bucket": buckets, "wall": wall,
                                   "resume_wall": resume_wall, "ledger_bytes": ledger_bytes})


def plot(samples, syncs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    n = [s[0] for s in samples]
    a.plot(n, [s[1] for s in samples], label="RSS (MiB)")
    a.plot(n, [s[2] for s in samples], label="Python heap (MiB)")
    a.plot(n, [s[3] / 2**20 for s in samples], label="ledger on disk (MiB)")
    a.set_xlabel("evaluations recorded")
    a.set_title("controller memory")
    a.legend()
    b.scatter([s[0] for s in syncs], [s[1] * 1e3 for s in syncs], s=2, alpha=0.4)
    b.set_yscale("log")
    b.set_xlabel("evaluations recorded")
    b.set_ylabel("ms")
    b.set_title("checkpoint (append + fsync) time")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
