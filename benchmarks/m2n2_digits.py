"""M2N2 on sklearn's digits: the reference experiment of SakanaAI/natural_niches, with evomerge's optimizer.

Same set-up as the reference (shared/reference/algorithms.md §3): load_digits, first 80% train (1,437) and the
last 360 test, pixels 0-16 unnormalised; MLP 64-256-10 ReLU flattened [W1 | b1 | W2 | b2] (19,210 params);
archive 20; every child scored on the whole training set (one evaluation = one forward pass); the reported
model is the member with the highest raw training accuracy, scored on the test set.

From scratch (50,000 evaluations, two N(0, 0.01^2) seeds, mutation N(0, 0.01^2)): M2N2, M2N2 without
crossover, GA (the reference's: no sharing, alpha 0, no attraction), and a CMA-ES baseline that finishes:
separable (diagonal) CMA-ES (pycma, CMA_diagonal), popsize 20, sigma0 0.01, x0 ~ N(0, 0.01^2), 2,500
generations; the reference's full-covariance CMA-ES extrapolates to 34-62 h per run here.
Pre-trained (10,000 evaluations, no mutation): two MLPs trained with Adam (lr 0.003, 10 full-batch steps)
on digits 0-4 and 5-9; M2N2, without attraction, without split point, and brute-force SLERP (10,000 values
of t, the best by training accuracy).

Run:  .venv/bin/python benchmarks/m2n2_digits.py [--seeds 3] [--threads 1] [--out results/m2n2_digits.md]
      [--reference DIR --reference-python PY]
With --reference (a checkout of SakanaAI/natural_niches) and a Python that has its dependencies (jax, optax,
scikit-learn, tqdm; e.g. `python -m venv nn && nn/bin/pip install jax==0.4.31 jaxlib==0.4.31 "optax<0.3"
scikit-learn tqdm`), the reference's own M2N2 runs too, seed 42, from scratch and pre-trained, in the same
run and under the same thread limit, so the speed-up column compares runs side by side; without it that
column uses the reference times recorded below (measured once, on another day).
It measures and writes tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, header_md, machine_facts, md_table, write_results  # noqa: E402

from evomerge.search.optimizers.m2n2 import M2N2  # noqa: E402

H = 256
N_PARAMS = (1 + 64) * H + (1 + H) * 10

# the paper's numbers (read off the repository's figure) and the reference measured on this kind of machine
PAPER = {"scratch": {"M2N2": 87.0, "M2N2 without crossover": 77.0, "GA": 68.0, "CMA-ES": 86.0},
         "pre-trained": {"M2N2": 68.5, "M2N2 without attraction": 66.0, "brute-force SLERP": 57.7}}
REFERENCE = {  # natural_niches, jax 0.4.31 CPU, seed 42, 2 shared cores: (test accuracy %, seconds per run)
    "scratch": {"M2N2": (86.67, 524), "M2N2 without crossover": (77.78, 461), "GA": (65.28, 312)},
    "pre-trained": {"M2N2": (68.89, 105), "M2N2 without attraction": (66.11, None),
                    "M2N2 without split point": (57.78, None), "brute-force SLERP": (57.78, None)}}


# Runs the reference's own M2N2 loop (natural_niches_fn.run_natural_niches, unchanged) in its checkout and
# prints its final test accuracy and wall time as JSON (no pickle: the reference's main.py would write one).
REF_DRIVER = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
from natural_niches_fn import run_natural_niches
t0 = time.perf_counter()
r = run_natural_niches(runs=1, pop_size=20, total_forward_passes=int(sys.argv[1]), store_train_results=False,
                       no_matchmaker=False, no_crossover=False, no_splitpoint=False, use_pre_trained=sys.argv[2] == "1")
print("RESULT " + json.dumps({"test_acc": float(r[0]["test_values"][-1]), "wall_s": time.perf_counter() - t0}))
"""


def run_reference(ref_dir: Path, python: str, evals: int, pre_trained: bool, threads: int) -> tuple[float, float]:
    """(test accuracy, seconds) of the reference's M2N2 run with seed 42 (its first run), on the CPU."""
    import os
    import subprocess

    env = {**os.environ, "JAX_PLATFORM_NAME": "cpu", "JAX_PLATFORMS": "cpu"}
    if threads == 1:  # the same thread limit as ours
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([python, "-c", REF_DRIVER, str(evals), "1" if pre_trained else "0"], cwd=ref_dir, env=env,
                         capture_output=True, text=True)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise SystemExit(f"the reference run failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    out = json.loads(line[len("RESULT "):])
    return out["test_acc"], out["wall_s"]


def load():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    n = int(len(X) * 0.8)
    return X[:n].astype(np.float32), y[:n], X[n:].astype(np.float32), y[n:]


def forward(p: np.ndarray, X: np.ndarray) -> np.ndarray:
    o = 64 * H
    W1, b1 = p[:o].reshape(64, H), p[o:o + H]
    o += H
    W2, b2 = p[o:o + H * 10].reshape(H, 10), p[o + H * 10:]
    h = X @ W1
    h += b1
    np.maximum(h, 0, out=h)
    return h @ W2 + b2


def correct(p, X, y) -> np.ndarray:
    return (forward(p, X).argmax(axis=1) == y).astype(np.float32)


def pretrained(Xtr, ytr, seed: int = 42):
    """Two MLPs trained with Adam (lr 0.003, 10 full-batch steps) on digits 0-4 and 5-9."""
    import torch

    out = []
    g = torch.Generator().manual_seed(seed)
    for mask in (ytr < 5, ytr >= 5):
        p = (torch.randn(N_PARAMS, generator=g) * 0.01).requires_grad_()
        opt = torch.optim.Adam([p], lr=0.003)
        X, y = torch.from_numpy(Xtr[mask]), torch.from_numpy(ytr[mask])
        for _ in range(10):
            o = 64 * H
            W1, b1 = p[:o].view(64, H), p[o:o + H]
            o += H
            W2, b2 = p[o:o + H * 10].view(H, 10), p[o + H * 10:]
            loss = torch.nn.functional.cross_entropy(torch.relu(X @ W1 + b1) @ W2 + b2, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(p.detach().numpy().astype(np.float32))
    return out


def run_m2n2(seeds, data, evals, **kw) -> tuple[float, float, list[float]]:
    Xtr, ytr, Xte, yte = data
    opt = M2N2(seeds, archive_size=20, max_evals=evals, **kw)
    curve = []
    t0 = time.perf_counter()
    while not opt.stop():
        a = opt.ask()
        s = correct(a.x, Xtr, ytr)
        opt.tell(a.id, float(s.mean()), s)
        if a.id % 1000 == 999:
            curve.append(float(correct(opt.best()[0], Xte, yte).mean()))
    wall = time.perf_counter() - t0
    return float(correct(opt.best()[0], Xte, yte).mean()), wall, curve


def run_cma(seed, data, evals) -> tuple[float, float, list[float]]:
    import cma

    Xtr, ytr, Xte, yte = data
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    es = cma.CMAEvolutionStrategy(rng.normal(size=N_PARAMS) * 0.01, 0.01,
                                  {"popsize": 20, "seed": seed, "CMA_diagonal": True, "verbose": -9})
    best, best_acc, done, curve = None, -1.0, 0, []
    while done < evals:
        X = es.ask()
        accs = []
        for x in X:
            acc = float(correct(np.asarray(x, dtype=np.float32), Xtr, ytr).mean())
            accs.append(acc)
            if acc > best_acc:
                best, best_acc = np.asarray(x, dtype=np.float32), acc
        es.tell(X, [-a for a in accs])
        done += len(X)
        if done % 1000 < 20:
            curve.append(float(correct(best, Xte, yte).mean()))
    return float(correct(best, Xte, yte).mean()), time.perf_counter() - t0, curve


def brute_force(models, data, steps=10000) -> tuple[float, float, list[float]]:
    Xtr, ytr, Xte, yte = data
    m = M2N2(models, archive_size=2)
    t0 = time.perf_counter()
    best, best_acc = None, -1.0
    for t in np.linspace(0, 1, steps):
        child = m._slerp(models[0], models[1], N_PARAMS, float(t))  # split at the end: one t everywhere
        acc = float(correct(child, Xtr, ytr).mean())
        if acc > best_acc:
            best, best_acc = child, acc
    return float(correct(best, Xte, yte).mean()), time.perf_counter() - t0, []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch-evals", type=int, default=50000)
    ap.add_argument("--pretrained-evals", type=int, default=10000)
    ap.add_argument("--skip", default="", help="comma-separated method names to skip")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "m2n2_digits.md")
    ap.add_argument("--reference", type=Path, default=None,
                    help="a checkout of SakanaAI/natural_niches: run its M2N2 side by side (seed 42)")
    ap.add_argument("--reference-python", default=None, help="a Python with the reference's dependencies")
    args = ap.parse_args()
    if args.reference is not None and not (args.reference / "natural_niches_fn.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no natural_niches_fn.py there (a natural_niches checkout?)")
    if args.reference is not None and not args.reference_python:
        raise SystemExit("--reference needs --reference-python (a Python with jax, optax, scikit-learn, tqdm)")
    import threadpoolctl

    threadpoolctl.threadpool_limits(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    data = load()
    skip = set(filter(None, args.skip.split(",")))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    curves: dict[str, list[float]] = {}

    def record(setting, name, seed, res):
        acc, wall, curve = res
        results.setdefault((setting, name), []).append((acc, wall))
        if seed == 42 and curve:
            curves[f"{setting}: {name}"] = curve
        print(json.dumps({"setting": setting, "method": name, "seed": seed, "test_acc": acc, "wall_s": wall}),
              flush=True)

    measured_ref: dict[tuple[str, str], tuple[float, float]] = {}
    if args.reference is not None:
        for setting, evals in (("scratch", args.scratch_evals), ("pre-trained", args.pretrained_evals)):
            acc, wall = run_reference(args.reference, args.reference_python, evals, setting == "pre-trained",
                                      args.threads)
            measured_ref[(setting, "M2N2")] = (100 * acc, wall)
            print(json.dumps({"setting": setting, "method": "M2N2 (reference)", "seed": 42, "test_acc": acc,
                              "wall_s": wall}), flush=True)
    for run in range(args.seeds):
        seed = 42 + run
        rng = np.random.default_rng(seed)
        scratch = [(rng.normal(size=N_PARAMS) * 0.01).astype(np.float32) for _ in range(2)]
        E = args.scratch_evals
        variants = {"M2N2": {}, "M2N2 without crossover": {"crossover": False},
                    "GA": {"alpha": 0.0, "attraction": False}}
        for name, kw in variants.items():
            if name not in skip:
                record("scratch", name, seed, run_m2n2(scratch, data, E, seed=seed, mutation_std=0.01, **kw))
        if "CMA-ES" not in skip:
            record("scratch", "CMA-ES (separable)", seed, run_cma(seed, data, E))
        models = pretrained(data[0], data[1], seed)
        E = args.pretrained_evals
        for name, kw in {"M2N2": {}, "M2N2 without attraction": {"attraction": False},
                         "M2N2 without split point": {"split_point": False}}.items():
            if name not in skip:
                record("pre-trained", name, seed, run_m2n2(models, data, E, seed=seed, **kw))
        if "brute-force SLERP" not in skip:
            record("pre-trained", "brute-force SLERP", seed, brute_force(models, data))

    rows = []
    for (setting, name), vals in results.items():
        accs = [100 * a for a, _ in vals]
        walls = [w for _, w in vals]
        key = name.replace(" (separable)", "")
        paper = PAPER[setting].get(key)
        ref_acc, ref_wall = measured_ref.get((setting, name)) or REFERENCE[setting].get(name, (None, None))
        if (setting, name) in measured_ref:  # side by side: our seed-42 run against the reference's
            walls = walls[:1]
        mean_wall = statistics.mean(walls)
        rows.append([setting, name, str(len(vals)),
                     f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.2f}",
                     f"≈{paper:.1f}" if paper else "–", f"{ref_acc:.2f}" if ref_acc else "–",
                     f"{mean_wall:.1f}", f"{ref_wall:.0f}" + (" (this run)" if (setting, name) in measured_ref else "")
                     if ref_wall else "–",
                     f"{ref_wall / mean_wall:.1f}×" if ref_wall else "–"])
    facts = machine_facts(None)
    facts["threads"] = str(args.threads)
    argv = [".venv/bin/python", "benchmarks/m2n2_digits.py", *sys.argv[1:]]
    text = header_md("M2N2 on digits: the natural_niches reference experiment", argv, facts)
    text += (f"Test accuracy (%) of the member with the highest training accuracy after {args.scratch_evals} "
             f"(from scratch) or {args.pretrained_evals} (pre-trained) evaluations; seeds 42.. (mean ± std "
             "over the seeds run). `reference here`: SakanaAI/natural_niches run on this kind of machine (seed "
             "42, jax CPU; its wall time includes its per-step test evaluation); *(this run)*: run side by side "
             "in this run, under the same thread limit, and compared with our seed-42 run only; otherwise a "
             "time recorded earlier. `speed-up`: reference seconds per run / ours.\n\n")
    text += md_table(["setting", "method", "seeds", "test acc (ours)", "paper", "reference here",
                      "s per run (ours)", "s per run (reference)", "speed-up"], rows) + "\n"
    write_results(args.out, text, {"results": {f"{s}|{n}": v for (s, n), v in results.items()},
                                   "curves": curves})


if __name__ == "__main__":
    main()
