"""Worker backends side by side: candidates per minute, build vs score time, `vllm` vs `hf`, one process.

For each model set, both backends are started once (the hf backend loads the resident model; the vllm
backend builds its engine with the evomerge worker extension), then the same task-arithmetic candidates
(seeded random weights) go through both, interleaved (candidate i on hf, then on vllm), so that a busy
machine slows both alike. Per candidate: build (merge + load into the model/engine), score (lm-eval
`evaluate` on the task dict built once) and their sum; candidates per minute = 60 / mean(build + score),
the first candidate being reported apart as warm-up. Both backends must agree on every item's score; the
table says whether they did.

Model sets: `micro` (the micro zoo: Llama, hidden 128, 2 layers), `smollm2` (SmolLM2-135M and two derived
fine-tunes from .bench, see benchmarks/merge_throughput.py), `random1b` (a ~1.1B Llama with random weights
and two perturbed copies; meant for GPU machines, where no hub download is possible either).
Tasks: the zoo's mixed items, as log-likelihood (`ll`: lm-eval's greedy check, one forward pass per item)
and as greedy generation up to the terminator (`gen`: up to 16 new tokens).

Run (an environment with both backends, e.g. the CI one):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backend_throughput.py [--sets micro,smollm2] [--candidates 6]
        [--out results/backends.md]
It measures and writes a table; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import BENCH, REPO, fmt, header_md, machine_facts, md_table, write_section  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def model_sets(names: list[str], work: Path) -> dict[str, dict]:
    out = {}
    for name in names:
        if name == "micro":
            zoo = BENCH / "zoo_micro"
            if not (zoo / "zoo.json").exists():
                from evomerge.zoo.build import build_zoo

                build_zoo(zoo, "micro", seed=0)
            out[name] = {"models": {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")},
                         "items": zoo / "tasks" / "zoo_mixed_search.jsonl", "max_len": 128}
        elif name == "smollm2":
            from _common import derive_finetunes
            from smollm2 import ensure_smollm2

            base = ensure_smollm2(BENCH / "smollm2")
            fts = derive_finetunes(base, BENCH / "smollm2-ft", ["ft1", "ft2"], scale=0.02, seed=0)
            out[name] = {"models": {"base": str(base), **{k: str(v) for k, v in fts.items()}},
                         "items": BENCH / "zoo_micro" / "tasks" / "zoo_mixed_search.jsonl", "max_len": 256}
        elif name == "random1b":
            out[name] = {"models": random_llama_1b(work), "max_len": 256,
                         "items": BENCH / "zoo_micro" / "tasks" / "zoo_mixed_search.jsonl"}
        else:
            raise SystemExit(f"unknown model set {name}: use micro, smollm2, random1b")
    return out


def random_llama_1b(work: Path) -> dict[str, str]:
    """A TinyLlama-shaped (1.1B) Llama with random weights, and two perturbed copies (bfloat16)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = BENCH / "random1b"
    names = ("base", "ft1", "ft2")
    if all((root / n / "config.json").exists() for n in names):
        return {n: str(root / n) for n in names}
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(ensure_small_tokenizer())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, n in enumerate(names):
        if i:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(state[k] + 0.01 * state[k].float().std() * torch.randn_like(p, dtype=torch.float32))
        model.save_pretrained(root / n)
        tok.save_pretrained(root / n)
    return {n: str(root / n) for n in names}


def ensure_small_tokenizer() -> str:
    from smollm2 import ensure_smollm2

    return str(ensure_smollm2(BENCH / "smollm2"))


def write_tasks(items: Path, out: Path) -> tuple[str, list[str]]:
    """ll: the zoo's log-likelihood task on `items`; gen: the same items, greedy generation."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{prompt}}", "target_delimiter": "",
              "dataset_kwargs": {"data_files": {"test": str(items)}}, "metadata": {"version": 1.0}}
    (out / "bench_ll.yaml").write_text(yaml.safe_dump({
        **common, "task": "bench_ll", "output_type": "loglikelihood", "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    (out / "bench_gen.yaml").write_text(yaml.safe_dump({
        **common, "task": "bench_gen", "output_type": "generate_until", "doc_to_target": "{{target[:-1]}}",
        "generation_kwargs": {"until": ["."], "do_sample": False, "max_gen_toks": 16},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return str(out), ["bench_ll", "bench_gen"]


def recipes(models: dict[str, str], n: int, seed: int):
    from evomerge.merge.load import parse_recipe

    rng = random.Random(seed)
    names = [k for k in models if k != "base"]
    for _ in range(n):
        yield parse_recipe({"method": "task_arithmetic", "base": "base", "models": {
            "base": {"path": models["base"]},
            **{k: {"path": models[k], "parameters": {"weight": round(rng.uniform(0.2, 1.0), 4)}} for k in names}}})


def run_set(name: str, spec: dict, n: int, dtype: str, batch_size: int, work: Path) -> list[dict]:
    import torch

    from workers.actor import HfBackend
    from workers.score import Scorer
    from workers.vllm_backend import VllmBackend

    include, tasks = write_tasks(spec["items"], work / f"tasks_{name}")
    scorers = {t: Scorer([{"name": t, "metric": "acc" if t == "bench_ll" else "exact_match"}], [include])
               for t in tasks}
    gpu = torch.cuda.is_available()
    t0 = time.perf_counter()
    hf = HfBackend({"models": spec["models"], "base": "base", "dtype": dtype, "gpus": 1 if gpu else 0,
                    "cpus": torch.get_num_threads(), "batch_size": batch_size})
    t_hf_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    vb = VllmBackend(spec["models"], base="base", dtype=dtype, max_model_len=spec["max_len"],
                     gpu_memory_utilization=0.45 if gpu else 0.85)
    t_vllm_start = time.perf_counter() - t0
    rows = []
    for task in tasks:
        per = {"hf": [], "vllm": []}
        agree = True
        for i, r in enumerate(recipes(spec["models"], n, seed=1)):
            items = {}
            for be_name, be in (("hf", hf), ("vllm", vb)):
                t0 = time.perf_counter()
                be.load(r)
                t1 = time.perf_counter()
                res = scorers[task].score_lm(be.lm)
                t2 = time.perf_counter()
                items[be_name] = res["items"][task]
                per[be_name].append((i, t1 - t0, t2 - t1, res["fitness"]))
            agree &= items["hf"] == items["vllm"]
        for be_name in ("hf", "vllm"):
            steady = [p for p in per[be_name] if p[0] > 0]
            build = statistics.mean(p[1] for p in steady)
            score = statistics.mean(p[2] for p in steady)
            rows.append({"set": name, "task": task, "items": len(items["hf"]), "backend": be_name,
                         "start_s": t_hf_start if be_name == "hf" else t_vllm_start,
                         "first_s": per[be_name][0][1] + per[be_name][0][2], "build_s": build, "score_s": score,
                         "cand_per_min": 60 / (build + score), "agree": agree,
                         "fitness": [round(p[3], 4) for p in per[be_name]]})
        print(json.dumps(rows[-2:]), flush=True)
    vb.close()
    del hf
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="micro,smollm2")
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "backends.md")
    args = ap.parse_args()
    import torch

    from workers.vllm_backend import alias_vllm_version

    vllm_version = alias_vllm_version()
    if vllm_version is None:
        raise SystemExit("vLLM is not installed in this environment (see README, 'vLLM backend')")
    with tempfile.TemporaryDirectory() as tmp:
        sets = model_sets(args.sets.split(","), Path(tmp))
        rows = []
        for name, spec in sets.items():
            rows += run_set(name, spec, args.candidates, args.dtype, args.batch_size, Path(tmp))
    facts = machine_facts(None)
    facts["vllm"] = vllm_version
    facts["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    argv = ["HF_HUB_OFFLINE=1", sys.executable.replace(str(REPO) + "/", ""), "benchmarks/backend_throughput.py",
            *sys.argv[1:]]
    table = []
    by = {(r["set"], r["task"], r["backend"]): r for r in rows}
    for r in rows:
        other = by[(r["set"], r["task"], "hf")]
        ratio = r["cand_per_min"] / other["cand_per_min"]
        table.append([r["set"], r["task"], r["items"], r["backend"], fmt(r["start_s"], 1), fmt(r["first_s"], 2),
                      fmt(r["build_s"], 3), fmt(r["score_s"], 3), fmt(r["cand_per_min"], 1), f"{ratio:.2f}×",
                      "yes" if r["agree"] else "NO"])
    text = header_md("Worker backends: vllm vs hf, side by side", argv, facts)
    text += (f"{args.candidates} task-arithmetic candidates per model set and task, interleaved hf/vllm; build = "
             "merge + load into the resident model (hf) or the engine (vllm, inside its worker via the "
             "evomerge extension + reload_weights + prefix-cache reset); score = lm-eval evaluate on the task "
             "dict built once. Means over candidates 2..n (the first is `first s`). `same items`: both "
             "backends gave every item the same score on every candidate. dtype "
             f"{args.dtype}, hf batch size {args.batch_size}, vllm batch auto.\n\n")
    text += md_table(["set", "task", "items", "backend", "start s", "first s", "build s", "score s",
                      "cand/min", "vs hf", "same items"], table) + "\n"
    write_section(args.out, f"<!-- {facts['device']} -->", text)
    print(text)


if __name__ == "__main__":
    main()
