"""Merge throughput: evomerge vs mergekit on a real SmolLM2-135M base and three fine-tunes, side by side.

Models: SmolLM2-135M (float32, 134.5M parameters, tied embeddings; `benchmarks/smollm2.py`) as the base,
and three "fine-tunes" = base + small seeded perturbations (1% of each tensor's rms, with a shared and an
own component), saved as HF model directories with the tokenizer under .bench/.

For every method (all 19; slerp, nearswap and arcee_fusion merge the base and one fine-tune, nuslerp the base
and two, linear and karcher the three fine-tunes, the others base + 3) it measures, in ONE run and interleaved
(mergekit, evomerge, ... per method) so that machine load hits both alike:

  (a) mergekit, whole process: wall time of `mergekit-yaml CONFIG OUT` (default flags);
  (b) mergekit, merge only: a driver in the mergekit venv imports mergekit, warms the page cache, then
      times only `mergekit.merge.run_merge(config, out, MergeOptions(quiet=True))`;
  (c) evomerge, whole process: wall time of `evomerge merge CONFIG --out OUT` (the same mergekit YAML);
  (d) evomerge, merge only: in-process `make_plan` + `write_model_dir` after imports, warm page cache;
  (e) evomerge, in place: `make_plan` + `build_into` into a resident float32 SmolLM2 (`model.state_dict()`),
      run twice; the second (steady state, as search workers do per candidate) is reported.

Every measured thing runs in its own process, so peak memory is per thing: the kernel's peak RSS (which
also counts memory-mapped input pages that are merely page cache) and the sampled peak of RssAnon
(private memory). GB/s = (input bytes read + output bytes written) / seconds; the copy bound is that byte
count over this machine's memory-copy bandwidth, measured in the same run next to each method (numpy copy
of a 512 MB array, read + write counted). Each measurement is repeated (--reps, median reported); when
mergekit's first whole-process run of a method takes longer than --slow-s, that method gets 1 repetition.
Also measured: `evomerge --help` / `mergekit-yaml --help` wall time (start-up).

Timings on a shared machine swing a lot; only the side-by-side ratios of one run mean something. This
script measures and writes tables; it asserts nothing about time.

Run (25-50 minutes on a shared 2-core machine, mostly mergekit's sorting methods; creates the mergekit
venv and the models on first use):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/merge_throughput.py \
        [--out results/merge_throughput.md] [--reps 3] [--slow-s 60] [--methods ties,slerp] [--workdir DIR]

Writes the markdown report to --out and the raw measurements next to it (.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
           "della", "slerp", "model_stock", "della_linear", "nuslerp", "multislerp", "karcher", "sce", "nearswap",
           "arcee_fusion", "ram", "ramplus_tl")
# The speed goals (evomerge at least this many times faster than mergekit). Methods added later
# (della_linear onwards) have no goal: their rows only report the ratios.
FAST_GOAL = {m: 5.0 for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                              "model_stock")}
SLOW_GOAL = {m: 2.0 for m in ("linear", "task_arithmetic", "slerp")}
LINEAR_FAMILY = ("linear", "task_arithmetic", "slerp", "model_stock")  # in-place goal: within 3x of the bound
SPARSE_FAMILY = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della")  # within 10x
STARTUP_GOAL_S = 1.5

COPY_DRIVER = r"""
import json, sys, time
import numpy as np
n = 512 * 2**20
a = np.ones(n // 8); b = np.empty_like(a); np.copyto(b, a)
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter(); np.copyto(b, a); best = min(best, time.perf_counter() - t0)
print(json.dumps({"seconds": best, "bytes": 2 * n, "gbps": 2 * n / best / 1e9}))
"""

RSS_PROBE = r"""
def rss_anon_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def warm(dirs):
    from pathlib import Path
    for d in dirs:
        for f in sorted(Path(d).glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
"""

MERGEKIT_DRIVER = RSS_PROBE + r"""
import json, sys, time
t0 = time.perf_counter()
import torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
import_s = time.perf_counter() - t0
cfg_path, out = sys.argv[1], sys.argv[2]
source = open(cfg_path).read()
config = MergeConfiguration.model_validate(yaml.safe_load(source))
options = MergeOptions(quiet=True)
options.apply_global_options()
warm(sys.argv[3:])
anon0 = rss_anon_mb()
t0 = time.perf_counter()
run_merge(config, out, options=options, config_source=source)
merge_s = time.perf_counter() - t0
print(json.dumps({"merge_s": merge_s, "import_s": import_s, "anon_before_mb": anon0}))
"""

EVOMERGE_DRIVER = RSS_PROBE + r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from evomerge.merge.export.model_dir import write_model_dir
from evomerge.merge.plan import make_plan
from evomerge.merge.load import load_recipe
import_s = time.perf_counter() - t0
cfg_path, out = sys.argv[1], sys.argv[2]
recipe = load_recipe(cfg_path)
warm(sys.argv[3:])
anon0 = rss_anon_mb()
t0 = time.perf_counter()
plan = make_plan(recipe)
plan_s = time.perf_counter() - t0
write_model_dir(plan, out)
plan.close()
merge_s = time.perf_counter() - t0
print(json.dumps({"merge_s": merge_s, "plan_s": plan_s, "import_s": import_s, "anon_before_mb": anon0}))
"""

INPLACE_DRIVER = RSS_PROBE + r"""
# As a search worker does (workers/build.py CandidateBuilder): sources opened once, one resident float32
# model, every candidate planned against the open sources and built in place.
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from evomerge.merge.build import build_into
from evomerge.merge.plan import make_plan, open_sources
from evomerge.merge.load import load_recipe
import_s = time.perf_counter() - t0
cfg_path, resident = sys.argv[1], sys.argv[2]
recipe = load_recipe(cfg_path)
warm(sys.argv[3:])
anon0 = rss_anon_mb()
model = AutoModelForCausalLM.from_pretrained(resident, dtype=torch.float32)
model.eval()
params = dict(model.state_dict())
sources = open_sources(recipe)
anon_model = rss_anon_mb()
runs = []
for _ in range(2):
    t0 = time.perf_counter()
    plan = make_plan(recipe, sources=sources)
    t1 = time.perf_counter()
    build_into(plan, params)
    t2 = time.perf_counter()
    runs.append({"plan_s": t1 - t0, "build_s": t2 - t1, "total_s": t2 - t0})
print(json.dumps({"runs": runs, "merge_s": runs[-1]["total_s"], "build_s": runs[-1]["build_s"],
                  "plan_s": runs[-1]["plan_s"], "import_s": import_s, "anon_before_mb": anon0,
                  "anon_with_model_mb": anon_model}))
"""


PROFILE_DRIVER = r"""
# Where the in-place build's time goes: one warm build on 1 thread under torch.profiler, top ops.
import json, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM
from evomerge.merge.build import build_into
from evomerge.merge.plan import make_plan, open_sources
from evomerge.merge.load import load_recipe
recipe = load_recipe(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
params = dict(model.state_dict())
sources = open_sources(recipe)
plan = make_plan(recipe, sources=sources)
build_into(plan, params)
t0 = time.perf_counter(); c0 = time.process_time()
build_into(plan, params)
warm = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
torch.set_num_threads(1)
t0 = time.perf_counter()
build_into(plan, params, threads=1)
one = time.perf_counter() - t0
t0 = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    build_into(plan, params, threads=1)
profiled_wall = time.perf_counter() - t0
ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
total = sum(e.self_cpu_time_total for e in ev)
top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
        "calls": e.count} for e in ev[:6]]
print(json.dumps({"warm": warm, "one_thread_s": one, "profiled_wall_s": profiled_wall,
                  "profiled_total_s": total / 1e6, "top": top}))
"""


def method_config(method: str, base: str, fts: list[str]) -> dict:
    """The mergekit config merged by every tool for `method` (float32 throughout)."""
    def models(params: dict | None, paths: list[str]) -> list[dict]:
        return [{"model": p, **({"parameters": dict(params)} if params else {})} for p in paths]

    w = {"weight": 0.3}
    if method == "linear":
        weights = (0.4, 0.3, 0.3)
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": p, "parameters": {"weight": x}} for p, x in zip(fts, weights, strict=True)]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": models(None, [base, fts[0]]),
                "parameters": {"t": [0.2, 0.8]}, "dtype": "float32"}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": base, "models": models(None, fts), "dtype": "float32"}
    if method == "nuslerp":
        return {"merge_method": "nuslerp", "base_model": base, "dtype": "float32",
                "models": [{"model": p, "parameters": {"weight": x}} for p, x in zip(fts[:2], (0.4, 0.6), strict=True)]}
    if method == "multislerp":
        return {"merge_method": "multislerp", "base_model": base, "dtype": "float32",
                "models": [{"model": p, "parameters": {"weight": x}}
                           for p, x in zip(fts, (0.4, 0.3, 0.3), strict=True)]}
    if method == "karcher":
        return {"merge_method": "karcher", "models": models(None, fts), "dtype": "float32"}
    if method in ("nearswap", "arcee_fusion"):
        return {"merge_method": method, "base_model": base, "models": models(None, fts[:1]), "dtype": "float32",
                **({"parameters": {"t": 0.001}} if method == "nearswap" else {})}
    if method in ("sce", "ram", "ramplus_tl"):
        return {"merge_method": method, "base_model": base, "models": models(None, fts), "dtype": "float32",
                **({"parameters": {"select_topk": 0.5}} if method == "sce" else {})}
    params = {
        "task_arithmetic": w,
        "ties": {**w, "density": 0.5},
        "dare_ties": {**w, "density": 0.5},
        "dare_linear": {**w, "density": 0.5},
        "breadcrumbs": {**w, "density": 0.9, "gamma": 0.01},
        "breadcrumbs_ties": {**w, "density": 0.9, "gamma": 0.01},
        "della": {**w, "density": 0.5, "epsilon": 0.1},
        "della_linear": {**w, "density": 0.5, "epsilon": 0.1},
    }[method]
    return {"merge_method": method, "base_model": base, "models": models(params, fts), "dtype": "float32"}


def config_inputs(cfg: dict) -> list[str]:
    paths = [m["model"] for m in cfg["models"]]
    if cfg.get("base_model") and cfg["base_model"] not in paths:
        paths.append(cfg["base_model"])
    return paths


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=C.REPO / "results" / "merge_throughput.md")
    ap.add_argument("--workdir", type=Path, default=C.BENCH / "throughput")
    ap.add_argument("--models-dir", type=Path, default=C.BENCH, help="where smollm2/ and smollm2-ft/ live")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median reported)")
    ap.add_argument("--slow-s", type=float, default=60.0,
                    help="a method whose first mergekit whole-process run takes longer gets 1 repetition")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the torch.profiler breakdown of methods that miss their in-place goal")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m}")

    from smollm2 import ensure_smollm2

    t_start = time.perf_counter()
    mk_python = C.mergekit_python()
    mk_yaml = mk_python.parent / "mergekit-yaml"
    evo_bin = Path(sys.executable).parent / "evomerge"
    facts = C.machine_facts(mk_python)
    base = ensure_smollm2(args.models_dir / "smollm2")
    fts = C.derive_finetunes(base, args.models_dir / "smollm2-ft", ["ft1", "ft2", "ft3"], scale=0.01, seed=1234)
    base_s, fts_s = str(base.resolve()), [str(fts[k].resolve()) for k in ("ft1", "ft2", "ft3")]

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "configs").mkdir(parents=True)
    drivers = {}
    for name, code in (("copy", COPY_DRIVER), ("mergekit_merge_only", MERGEKIT_DRIVER),
                       ("evomerge_merge_only", EVOMERGE_DRIVER), ("evomerge_inplace", INPLACE_DRIVER),
                       ("profile", PROFILE_DRIVER)):
        drivers[name] = work / f"driver_{name}.py"
        drivers[name].write_text(code)
    out_dir = work / "out"

    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        largest = max(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())
    out_bytes = C.weight_bytes(base)

    cfgs, inputs, in_bytes = {}, {}, {}
    for m in methods:
        cfg = method_config(m, base_s, fts_s)
        cfgs[m] = work / "configs" / f"{m}.yml"
        cfgs[m].write_text(yaml.safe_dump(cfg, sort_keys=False))
        inputs[m] = config_inputs(cfg)
        in_bytes[m] = sum(C.weight_bytes(Path(p)) for p in inputs[m])
    C.warm_page_cache([Path(p) for p in [base_s, *fts_s]])

    def clean() -> None:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.sync()  # no writeback of the previous output during the next measurement

    def measure(kind: str, m: str) -> dict:
        clean()
        cfg = str(cfgs[m])
        if kind == "mk_whole":
            cmd = [str(mk_yaml), cfg, str(out_dir)]
        elif kind == "evo_whole":
            cmd = [str(evo_bin), "merge", cfg, "--out", str(out_dir)]
        elif kind == "mk_merge":
            cmd = [str(mk_python), str(drivers["mergekit_merge_only"]), cfg, str(out_dir), *inputs[m]]
        elif kind == "evo_merge":
            cmd = [sys.executable, str(drivers["evomerge_merge_only"]), cfg, str(out_dir), *inputs[m]]
        elif kind == "evo_inplace":
            cmd = [sys.executable, str(drivers["evomerge_inplace"]), cfg, base_s, *inputs[m]]
        else:
            raise ValueError(kind)
        load = os.getloadavg()[0]
        r = C.run_measured(cmd)
        if r.rc != 0:
            raise RuntimeError(f"{kind} {m} failed (rc {r.rc}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
        rec = {"wall_s": r.wall_s, "max_rss_mb": r.max_rss_mb, "peak_anon_mb": r.peak_anon_mb,
               "loadavg_1m_before": load}
        if kind in ("mk_merge", "evo_merge", "evo_inplace"):
            rec.update(C.last_json(r.stdout))
            rec["seconds"] = rec["merge_s"]
        else:
            rec["seconds"] = r.wall_s
        if kind in ("mk_whole", "evo_whole", "mk_merge", "evo_merge"):
            got = C.weight_bytes(out_dir)  # file sizes: payload + header (metadata differs by tool)
            if abs(got - out_bytes) > 2**20:
                raise RuntimeError(f"{kind} {m}: output weights are {got} bytes, expected {out_bytes}")
        return rec

    def copy_bw() -> dict:
        r = C.run_measured([sys.executable, str(drivers["copy"])])
        return C.last_json(r.stdout)

    # ---- start-up -----------------------------------------------------------------------------------
    startup = {"evomerge --help": [], "mergekit-yaml --help": []}
    for _ in range(3):
        for name, cmd in (("evomerge --help", [str(evo_bin), "--help"]),
                          ("mergekit-yaml --help", [str(mk_yaml), "--help"])):
            r = C.run_measured(cmd)
            startup[name].append({"wall_s": r.wall_s, "max_rss_mb": r.max_rss_mb, "peak_anon_mb": r.peak_anon_mb})

    # ---- the measurements, interleaved ----------------------------------------------------------------
    kinds = ("mk_whole", "evo_whole", "mk_merge", "evo_merge", "evo_inplace")
    res: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in kinds} for m in methods}
    bw: dict[str, list[dict]] = {m: [] for m in methods}
    slow: set[str] = set()
    for rep in range(args.reps):
        for m in methods:
            if rep > 0 and m in slow:
                continue
            bw[m].append(copy_bw())
            for k in kinds:
                rec = measure(k, m)
                res[m][k].append(rec)
                print(f"rep {rep + 1} {m:<17} {k:<12} {rec['seconds']:8.2f} s  peak anon {rec['peak_anon_mb']:7.0f} MB"
                      f"  max rss {rec['max_rss_mb']:7.0f} MB", flush=True)
                if rep == 0 and k == "mk_whole" and rec["seconds"] > args.slow_s:
                    slow.add(m)
    clean()
    elapsed = time.perf_counter() - t_start

    # ---- tables -------------------------------------------------------------------------------------
    summary = {}
    for m in methods:
        gbps = median([b["gbps"] for b in bw[m]])
        moved = in_bytes[m] + out_bytes
        s = {"bytes_moved": moved, "input_bytes": in_bytes[m], "output_bytes": out_bytes, "copy_gbps": gbps,
             "bound_s": moved / (gbps * 1e9), "reps": len(res[m]["mk_whole"])}
        for k in kinds:
            recs = res[m][k]
            s[k] = {"seconds": median([r["seconds"] for r in recs]),
                    "wall_s": median([r["wall_s"] for r in recs]),
                    "max_rss_mb": max(r["max_rss_mb"] for r in recs),
                    "peak_anon_mb": max(r["peak_anon_mb"] for r in recs),
                    "anon_before_mb": median([r.get("anon_before_mb", float("nan")) for r in recs]),
                    "all_seconds": [r["seconds"] for r in recs]}
            if k == "evo_inplace":
                s[k]["build_s"] = median([r["build_s"] for r in recs])
                s[k]["plan_s"] = median([r["plan_s"] for r in recs])
                s[k]["first_total_s"] = median([r["runs"][0]["total_s"] for r in recs])
                s[k]["anon_with_model_mb"] = median([r["anon_with_model_mb"] for r in recs])
            if k == "evo_merge":
                s[k]["plan_s"] = median([r["plan_s"] for r in recs])
            s[k]["gbps"] = moved / s[k]["seconds"] / 1e9
            s[k]["x_bound"] = s[k]["seconds"] / s["bound_s"]
        s["ratio_whole"] = s["mk_whole"]["seconds"] / s["evo_whole"]["seconds"]
        s["ratio_merge"] = s["mk_merge"]["seconds"] / s["evo_merge"]["seconds"]
        s["evo_overhead_s"] = s["evo_whole"]["seconds"] - s["evo_merge"]["seconds"]
        s["mk_overhead_s"] = s["mk_whole"]["seconds"] - s["mk_merge"]["seconds"]
        summary[m] = s
    st = {k: median([r["wall_s"] for r in v]) for k, v in startup.items()}

    labels = {"mk_whole": "(a) mergekit process", "mk_merge": "(b) mergekit merge only",
              "evo_whole": "(c) evomerge process", "evo_merge": "(d) evomerge merge only",
              "evo_inplace": "(e) evomerge in place"}
    rows = []
    for m in methods:
        s = summary[m]
        for k in ("mk_whole", "mk_merge", "evo_whole", "evo_merge", "evo_inplace"):
            v = s[k]
            extra = ""
            if k == "evo_inplace":
                extra = f" (build {v['build_s']:.2f} + plan {v['plan_s']:.2f}; 1st run {v['first_total_s']:.2f})"
            rows.append([m, labels[k], C.fmt(v["seconds"]) + extra, C.fmt(v["gbps"]), C.fmt(v["x_bound"], 1),
                         f"{v['max_rss_mb']:.0f}", f"{v['peak_anon_mb']:.0f}",
                         ", ".join(C.fmt(x) for x in v["all_seconds"])])
    ratio_rows = []
    for m in methods:
        s = summary[m]
        goal = FAST_GOAL.get(m, SLOW_GOAL.get(m))
        ratio_rows.append([m, f"{s['input_bytes'] / 1e9:.2f} + {s['output_bytes'] / 1e9:.2f}", C.fmt(s["copy_gbps"]),
                           C.fmt(s["bound_s"]), C.fmt(s["ratio_whole"], 1), C.fmt(s["ratio_merge"], 1),
                           f"≥ {goal:g}×" if goal else "—", C.fmt(s["evo_overhead_s"]), C.fmt(s["mk_overhead_s"])])

    # ---- goals ---------------------------------------------------------------------------------------
    goals = []

    def goal(text: str, ok: bool, detail: str) -> None:
        goals.append([text, "reached" if ok else "**missed**", detail])

    for group, factor in (([m for m in methods if m in FAST_GOAL], 5.0),
                          ([m for m in methods if m in SLOW_GOAL], 2.0)):
        if not group:
            continue
        for what, key in (("merge only", "ratio_merge"), ("whole process", "ratio_whole")):
            miss = [f"{m} {summary[m][key]:.1f}×" for m in group if summary[m][key] < factor]
            goal(f"≥ {factor:g}× faster than mergekit, {what}: {', '.join(group)}", not miss,
                 ("missed: " + ", ".join(miss)) if miss else
                 "min " + f"{min(summary[m][key] for m in group):.1f}×")
    goal(f"evomerge start-up (`evomerge --help`) ≤ {STARTUP_GOAL_S} s", st["evomerge --help"] <= STARTUP_GOAL_S,
         f"{st['evomerge --help']:.2f} s (median of 3; `mergekit-yaml --help` {st['mergekit-yaml --help']:.2f} s)")
    for group, factor in (([m for m in methods if m in LINEAR_FAMILY], 3.0),
                          ([m for m in methods if m in SPARSE_FAMILY], 10.0)):
        if not group:
            continue
        miss = [f"{m} {summary[m]['evo_inplace']['x_bound']:.1f}×" for m in group
                if summary[m]["evo_inplace"]["x_bound"] > factor]
        goal(f"in place within {factor:g}× of the copy-bandwidth bound: {', '.join(group)}", not miss,
             ("missed: " + ", ".join(miss)) if miss else
             "max " + f"{max(summary[m]['evo_inplace']['x_bound'] for m in group):.1f}×")
    # Peak memory: private memory the merge adds over the process after imports, vs output size + a few tensors.
    limit_mb = (out_bytes + 4 * largest) / 2**20
    mem_rows = []
    worst = {}
    for m in methods:
        s = summary[m]
        for k in ("evo_merge", "evo_inplace", "mk_merge"):
            add = s[k]["peak_anon_mb"] - s[k]["anon_before_mb"]
            worst.setdefault(k, []).append((add, m))
        mem_rows.append([m] + [f"{s[k]['peak_anon_mb'] - s[k]['anon_before_mb']:.0f}" for k in
                               ("mk_merge", "evo_merge", "evo_inplace")] +
                        [f"{s[k]['peak_anon_mb']:.0f}" for k in ("mk_whole", "evo_whole")])
    for k, text in (("evo_merge", "write to disk"), ("evo_inplace", "in place (resident model = the output)")):
        add, m = max(worst[k])
        goal(f"peak memory ≤ output size + a few tensors ({text})", add <= limit_mb,
             f"max added private memory {add:.0f} MB ({m}) vs limit {limit_mb:.0f} MB = output "
             f"{out_bytes / 2**20:.0f} MB + 4 × largest tensor {largest / 2**20:.0f} MB")

    # ---- why: profile the in-place builds that miss their goal -------------------------------------
    prof_md: list[str] = []
    raw_prof = {}
    if not args.no_profile:
        for m in methods:
            if m not in LINEAR_FAMILY + SPARSE_FAMILY:  # no in-place goal
                continue
            factor = 3.0 if m in LINEAR_FAMILY else 10.0
            if summary[m]["evo_inplace"]["x_bound"] <= factor:
                continue
            r = C.run_measured([sys.executable, str(drivers["profile"]), str(cfgs[m]), base_s])
            if r.rc != 0:
                prof_md.append(f"- {m}: profile failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            p = C.last_json(r.stdout)
            raw_prof[m] = p
            ops = "; ".join(f"`{o['op']}` {o['share']:.0%} ({o['calls']} calls)" for o in p["top"])
            prof_md.append(f"- **{m}**: warm in-place build {p['warm']['wall_s']:.2f} s wall / "
                           f"{p['warm']['cpu_s']:.2f} s CPU; on 1 thread {p['one_thread_s']:.2f} s. "
                           f"Profiled on 1 thread, torch ops account for {p['profiled_total_s']:.2f} s of "
                           f"{p['profiled_wall_s']:.2f} s "
                           f"(the rest: numpy RNG/argsort, Python). Top ops by self CPU time: {ops}.")
        elapsed = time.perf_counter() - t_start

    loads = [r["loadavg_1m_before"] for m in methods for k in kinds for r in res[m][k]]
    md = [C.header_md("Merge throughput: evomerge vs mergekit (SmolLM2-135M, float32)",
                      C.this_command("merge_throughput.py"), facts)]
    md += [
        f"Models: SmolLM2-135M base ({out_bytes / 1e6:.0f} MB float32, tied embeddings, 30 layers) + 3 fine-tunes "
        "(base + 1% seeded perturbations), page cache warm. slerp, nearswap, arcee_fusion: base + 1; nuslerp: "
        "base + 2; linear, karcher: the 3 fine-tunes; others: base + 3. Configs: mergekit YAML (density 0.5; "
        "breadcrumbs density 0.9, gamma 0.01; della(_linear) epsilon 0.1; sce select_topk 0.5; nearswap t 0.001; "
        "ram/ramplus_tl/multislerp/nuslerp/karcher defaults), "
        f"read by both tools. 1-minute load average before the measurements: {min(loads):.1f}–{max(loads):.1f} "
        f"on {facts['nproc']} cores (the machine is shared). {args.reps} repetitions (median) except methods "
        f"whose first mergekit run took > {args.slow_s:g} s: {', '.join(sorted(slow)) or 'none'} (1 repetition). "
        "Runs interleaved per method.",
        "",
        "Columns: GB/s = (input + output bytes) / s. × bound = time / (bytes moved / copy bandwidth), the copy "
        "bandwidth measured next to each method in this run (numpy 512 MB copy, read+write counted). max RSS = "
        "kernel peak RSS of that process (includes page-cache pages of memory-mapped inputs); peak anon = "
        "sampled peak of private (anonymous) memory.",
        "",
        "## Goals", "",
        C.md_table(["goal", "status", "measured"], goals), "",
        "## Speed ratios (mergekit time / evomerge time)", "",
        C.md_table(["method", "GB in + out", "copy GB/s", "copy bound s", "whole process ×", "merge only ×", "goal",
                    "evomerge process − merge s", "mergekit process − merge s"], ratio_rows), "",
        "## All measurements", "",
        C.md_table(["method", "what", "seconds (median)", "GB/s", "× bound", "max RSS MB", "peak anon MB",
                    "all runs s"], rows), "",
        "## Memory", "",
        "Private memory added by the merge = peak anon − anon of the same process after imports (before "
        "loading the resident model for in place). Whole-process columns are plain peak anon.", "",
        C.md_table(["method", "(b) mergekit merge only +MB", "(d) evomerge merge only +MB",
                    "(e) evomerge in place +MB", "(a) mergekit process peak anon MB",
                    "(c) evomerge process peak anon MB"], mem_rows), "",
        "## Start-up", "",
        C.md_table(["command", "median wall s", "runs s", "max RSS MB"],
                   [[k, C.fmt(st[k]), ", ".join(C.fmt(r["wall_s"]) for r in v),
                     f"{max(r['max_rss_mb'] for r in v):.0f}"] for k, v in startup.items()]), "",
        "Copy bandwidth measurements (GB/s): "
        + ", ".join(f"{m} " + "/".join(C.fmt(b['gbps']) for b in bw[m]) for m in methods) + ".", "",
        f"Total wall time of this benchmark: {elapsed / 60:.1f} min.", "",
    ]
    if prof_md:
        md += ["## Where the in-place time goes (methods that miss their in-place goal)", "", *prof_md, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    raw = {"facts": facts, "summary": summary, "profile": raw_prof, "raw": res, "copy_bw": bw, "startup": startup,
           "slow_methods": sorted(slow), "largest_tensor_bytes": largest, "elapsed_s": elapsed}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
