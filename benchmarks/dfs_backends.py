"""Data-flow candidates per minute: the vllm backend's one engine (workers/vllm_dfs.py) vs the hf backend's
path model (workers/path_model.py), side by side in one process, on SmolLM2-135M paths.

Model A is SmolLM2-135M-Instruct (30 layers), the partner a derived fine-tune of it (benchmarks/_common.py:
derive_finetunes); the data-flow space is the one a search would use (`repeats`, `scales: layer`,
`max_hops`), and the candidates are what CMA-ES asks first: model A itself, then the space's start point plus
sigma0 * N(0, I) noise, clipped to the bounds (seeded). The vllm engine is built once with `max_hops` layers;
the hf backend builds each path as a model of exactly its hops (no copy). Each candidate goes through both
backends, interleaved (a busy machine slows both alike): build (vllm: stream the changed slots into the
engine; hf: the path model) and score (lm-eval `evaluate` on a task dict built once). Candidates per minute =
60 / mean(build + score), the first candidate (model A, warm-up) reported apart. Per-item agreement is
reported: the same greedy verdicts (log-likelihood task) and the same greedy generations on every item, and
the largest per-item log-likelihood difference, absolute and relative (float32, 30+ layers, different kernels). With
`--export-gap` (the default), each candidate is also exported (`evomerge export`'s model directory, scales
folded into the weights) and scored on the log-likelihood task by transformers, to show how far the exported
model's log-likelihoods are from the scored path model's (the norms' eps, when the scales' product drifts).

Run (an environment with both backends, e.g. the CI one):
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/dfs_backends.py [--candidates 6]
        [--max-hops 40] [--repeats 1] [--tasks ll,gen] [--out results/backends.md]
It measures and appends a section to the results file; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import BENCH, REPO, derive_finetunes, fmt, header_md, machine_facts, md_table, write_section  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def smollm2_models() -> dict[str, str]:
    from evomerge.zoo.real import ensure_smollm2

    base = ensure_smollm2(BENCH / "smollm2")
    fts = derive_finetunes(base, BENCH / "smollm2-ft", ["ft1", "ft2"], scale=0.02, seed=0)
    return {"a": str(base), "b": str(fts["ft1"])}


def items_file() -> Path:
    zoo = BENCH / "zoo_micro"
    if not (zoo / "zoo.json").exists():
        from evomerge.zoo.build import build_zoo

        build_zoo(zoo, "micro", seed=0)
    return zoo / "tasks" / "zoo_mixed_search.jsonl"


def candidates(models: dict[str, str], n: int, repeats: int, max_hops: int, seed: int):
    """(space, [path recipes]): model A, then CMA-ES-like draws around the start point."""
    import numpy as np

    from evomerge.merge.sources import open_source
    from evomerge.search.dfs_space import DataflowSpace

    layers = {k: open_source(k, p).num_layers for k, p in models.items()}
    space = DataflowSpace(models=models, layers=layers, repeats=repeats, scales="layer", max_hops=max_hops)
    rng = np.random.default_rng(seed)
    xs = [space.x0] + [np.clip(space.x0 + 0.3 * rng.standard_normal(space.dim), space.lower, space.upper)
                       for _ in range(n - 1)]
    return space, [space.to_recipe(x) for x in xs]


def export_gap(i: int, recipe, got: dict, scorer, task: str, tmp: Path, d_vllm: float) -> dict:
    """Score the candidate's exported model (transformers) on the log-likelihood task; its distance from the
    hf path model's per-item log-likelihoods."""
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.export.path_dir import write_path_model

    out = write_path_model(recipe, tmp / f"export{i}")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(out), batch_size=64)
    res = evaluate(lm=lm, task_dict=scorer.task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    ex = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    ll = [s["filtered_resps"][0][0] for s in ex]
    ll_hf = [s["filtered_resps"][0][0] for s in got["hf"]]
    p = np.cumprod([h.scale for h in recipe.path])
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return {"i": i + 1, "hops": len(recipe.path), "p_min": float(p.min()), "p_max": float(p.max()), "vllm": d_vllm,
            "export": max(abs(a - b) for a, b in zip(ll, ll_hf, strict=True)), "items": len(ll),
            "same": sum(a["acc"] == b["acc"] for a, b in zip(ex, got["hf"], strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-hops", type=int, default=40)
    ap.add_argument("--tasks", default="ll,gen")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-export-gap", dest="export_gap", action="store_false")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "backends.md")
    args = ap.parse_args()
    import torch
    from backend_throughput import write_tasks
    from lm_eval.evaluator import evaluate

    from workers.actor import HfBackend
    from workers.score import Scorer
    from workers.vllm_backend import alias_vllm_version
    from workers.vllm_dfs import VllmPathBackend

    vllm_version = alias_vllm_version()
    if vllm_version is None:
        raise SystemExit("vLLM is not installed in this environment (see README, 'vLLM backend')")
    load_before = os.getloadavg()
    models = smollm2_models()
    space, recipes = candidates(models, args.candidates, args.repeats, args.max_hops, args.seed)
    hops = [len(r.path) for r in recipes]
    rows, gaps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        include, names = write_tasks(items_file(), Path(tmp) / "tasks")
        wanted = {"ll": "bench_ll", "gen": "bench_gen"}
        names = [wanted[t] for t in args.tasks.split(",")]
        gpu = torch.cuda.is_available()
        t0 = time.perf_counter()
        hf = HfBackend({"models": models, "search": "dataflow", "head": "a", "dtype": args.dtype,
                        "gpus": 1 if gpu else 0, "cpus": torch.get_num_threads(), "batch_size": args.batch_size})
        t_hf_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        vb = VllmPathBackend(models, head="a", slots=args.max_hops, dtype=args.dtype, max_model_len=256,
                             gpu_memory_utilization=0.45 if gpu else 0.85)
        t_vllm_start = time.perf_counter() - t0
        for task in names:
            scorer = Scorer([{"name": task, "metric": "acc" if task == "bench_ll" else "exact_match"}], [include])
            per = {"hf": [], "vllm": []}
            agree, ll_diff, ll_rel = True, 0.0, 0.0
            for i, r in enumerate(recipes):
                got = {}
                for be_name in ("hf", "vllm"):
                    be = hf if be_name == "hf" else vb
                    t0 = time.perf_counter()
                    be.load(r)
                    t1 = time.perf_counter()
                    out = evaluate(lm=be.lm, task_dict=scorer.task_dict, log_samples=True, bootstrap_iters=0,
                                   verbosity="ERROR")
                    t2 = time.perf_counter()
                    got[be_name] = sorted(out["samples"][task], key=lambda s: s["doc_id"])
                    metric = "acc" if task == "bench_ll" else "exact_match"
                    fit = sum(s[metric] for s in got[be_name]) / len(got[be_name])
                    per[be_name].append((i, t1 - t0, t2 - t1, fit))
                metric = "acc" if task == "bench_ll" else "exact_match"
                agree &= [s[metric] for s in got["hf"]] == [s[metric] for s in got["vllm"]]
                if task == "bench_ll":
                    pairs = [(a["filtered_resps"][0][0], b["filtered_resps"][0][0])
                             for a, b in zip(got["hf"], got["vllm"], strict=True)]
                    d = max(abs(a - b) for a, b in pairs)
                    ll_diff = max(ll_diff, d)
                    ll_rel = max(ll_rel, max(abs(a - b) / max(abs(a), 1e-9) for a, b in pairs))
                    if args.export_gap:
                        gaps.append(export_gap(i, r, got, scorer, task, Path(tmp), d))
                else:
                    gens = [[s["filtered_resps"][0] for s in got[b]] for b in ("hf", "vllm")]
                    agree &= gens[0] == gens[1]
            for be_name in ("hf", "vllm"):
                steady = [p for p in per[be_name] if p[0] > 0]
                build = statistics.mean(p[1] for p in steady)
                score = statistics.mean(p[2] for p in steady)
                rows.append({"task": task, "items": len(got["hf"]), "backend": be_name,
                             "start_s": t_hf_start if be_name == "hf" else t_vllm_start,
                             "first_s": per[be_name][0][1] + per[be_name][0][2], "build_s": build,
                             "score_s": score, "cand_per_min": 60 / (build + score), "agree": agree,
                             "ll_diff": ll_diff if task == "bench_ll" else None, "ll_rel": ll_rel,
                             "fitness": [round(p[3], 4) for p in per[be_name]]})
            print(json.dumps(rows[-2:]), flush=True)
        vb.close()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    facts = machine_facts(None)
    facts["vllm"] = vllm_version
    facts["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    argv = ["HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", sys.executable.replace(str(REPO) + "/", ""),
            "benchmarks/dfs_backends.py", *sys.argv[1:]]
    by = {(r["task"], r["backend"]): r for r in rows}
    table = []
    for r in rows:
        ratio = r["cand_per_min"] / by[(r["task"], "hf")]["cand_per_min"]
        table.append([r["task"], r["items"], r["backend"], fmt(r["start_s"], 1), fmt(r["first_s"], 2),
                      fmt(r["build_s"], 3), fmt(r["score_s"], 3), fmt(r["cand_per_min"], 1), f"{ratio:.2f}×",
                      ("yes" if r["agree"] else "NO") + (
                          f" (max Δll {r['ll_diff']:.1e}, relative {r['ll_rel']:.1e})" if r["ll_diff"] is not None
                          else "")])
    text = header_md("Data-flow candidates: vllm (one engine) vs hf (path model), SmolLM2-135M paths", argv, facts)
    text += (f"Load: `uptime` before the run: load average {load_before[0]:.2f}, {load_before[1]:.2f}, "
             f"{load_before[2]:.2f}; after: `{uptime}` (2 cores shared with other work: compare the two backends "
             "only side by side, within this table).\n\n")
    text += (f"Model A: SmolLM2-135M-Instruct (30 layers); partner: a derived fine-tune (scale 0.02). Space: "
             f"repeats {args.repeats}, scales layer, max_hops {args.max_hops} ({space.T} slots); the vllm engine "
             f"has {args.max_hops} layers. {args.candidates} candidates (model A, then the start point + 0.3·N(0, I), "
             f"seed {args.seed}) with {', '.join(map(str, hops))} hops, interleaved hf/vllm. build = the path model "
             "(hf, no copy) or streaming the changed slots into the engine (vllm: reload_weights + prefix-cache "
             "reset); score = lm-eval evaluate on the task dict built once. Means over candidates 2..n (the first, "
             "model A, is `first s`). `same items`: every item's score (greedy verdict, exact match) and every "
             "greedy generation equal on both backends on every candidate; Δll: the largest difference of an "
             "item's log-likelihood. dtype {args.dtype}, hf batch size {args.batch_size}, vllm "
             "batch auto.\n\n")
    text += md_table(["task", "items", "backend", "start s", "first s", "build s", "score s", "cand/min", "vs hf",
                      "same items"], table) + "\n"
    if gaps:
        text += ("\nThe exported model of each candidate (scales folded into the weights, one norm eps per model) "
                 "against the scored path model: max over the log-likelihood items of |Δ log-likelihood|. The "
                 "vllm engine computes the path model's function (it sets each hop's norm eps to eps / P²); an "
                 "exported path differs from both where P, the running product of the input scales, drifts "
                 "far from 1.\n\n")
        text += md_table(["candidate", "hops", "P min..max", "vllm vs hf path", "export vs hf path",
                          "same verdicts (export vs hf path)"],
                         [[g["i"], g["hops"], f"{g['p_min']:.3g}..{g['p_max']:.3g}", f"{g['vllm']:.1e}",
                           f"{g['export']:.1e}", f"{g['same']}/{g['items']}"] for g in gaps]) + "\n"
    write_section(args.out, f"<!-- dfs {facts['device']} -->", text)
    print(text)


if __name__ == "__main__":
    main()
