"""Build a zoo: a tiny base with partial competence in two skills, and one briefly fine-tuned expert per skill.

The design follows what was measured to make merging help at toy scale (results/zoo.md): the base is
pretrained on a mixture in which each target skill is rare (the rest filler) plus a little of the
compositional task, so it represents every skill a little; each expert is then fine-tuned briefly at a
low learning rate on its own skill mixed half and half with replay of the base mixture, so task vectors
are small deltas from a shared base and the experts keep the base's other abilities.

Layout of DIR (fixed; tools rely on it):
    models/base, models/<skill>   Hugging Face model directories (safetensors + char tokenizer)
    tasks/zoo_<task>_<split>.yaml lm-eval tasks (+ .jsonl data), tasks: skills, mixed, compositional
    zoo.json                      models, tasks, splits, item counts, size, seed, scores, build time
The YAMLs and zoo.json hold absolute paths: rebuild (same seed => same zoo) rather than move a zoo.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.zoo.sizes import SIZES, ZooSize
from evomerge.zoo.skills import SPLITS, ItemStream, make_eval_items
from evomerge.zoo.tasks import read_items, write_tasks

Progress = Callable[[str, int, int], None]


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_zoo(out: str | Path, size: str | ZooSize = "micro", seed: int = 0, *, threads: int = 1,
              progress: Progress | None = None) -> dict:
    """Train and save a zoo under `out`; returns (and writes) its zoo.json manifest.

    Same `size` and `seed` (and thread count) give bit-identical weights.
    """
    from transformers import LlamaForCausalLM

    from evomerge.zoo.score import accuracy
    from evomerge.zoo.tiny import char_tokenizer, tiny_config
    from evomerge.zoo.train import deterministic, train

    if isinstance(size, str) and size not in SIZES:
        raise EvomergeError(f"'{size}' is not a zoo size", f"choose one of {', '.join(SIZES)}")
    start = time.perf_counter()
    spec = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    cur = spec.curriculum
    items, held_out = make_eval_items(spec.counts, seed, spec.min_len, spec.max_len, cur)
    task_names = write_tasks(out / "tasks", items)
    tokenizer = char_tokenizer()

    def phase(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    with deterministic(seed, threads):
        base = LlamaForCausalLM(tiny_config("llama", hidden=spec.hidden, layers=spec.layers))
        stream = ItemStream(spec.mixture, f"zoo-base-{seed}", spec.min_len, spec.max_len, held_out, cur)
        train(base, tokenizer, stream, spec.base, phase("base"))
        models = {"base": base}
        for skill in cur.experts:
            expert = copy.deepcopy(base)
            stream = ItemStream(spec.expert_mixture(skill), f"zoo-{skill}-{seed}", spec.min_len, spec.max_len,
                                held_out, cur)
            train(expert, tokenizer, stream, spec.expert, phase(skill))
            models[skill] = expert
        for name, model in models.items():
            _save(model, tokenizer, out / "models" / name)
        scores = {name: {task: round(accuracy(model, tokenizer, items[task]["test"]), 4) for task in cur.tasks}
                  for name, model in models.items()}

    manifest = {
        "models": {name: {"path": str((out / "models" / name).resolve()), "skill": None if name == "base"
                          else name} for name in models},
        "tasks": {task: {"splits": task_names[task], "counts": {s: len(items[task][s]) for s in SPLITS}}
                  for task in cur.tasks},
        "splits": list(SPLITS),
        "size": size if isinstance(size, str) else "custom",
        "config": asdict(spec),
        "seed": seed,
        "threads": threads,
        "scores": {"split": "test", "metric": "exact_match", "models": scores},
        "build_seconds": round(time.perf_counter() - start, 2),
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_zoo(path: str | Path) -> dict:
    """The manifest of a built zoo."""
    return json.loads((Path(path) / "zoo.json").read_text())


def zoo_items(path: str | Path, task: str, split: str) -> list[dict[str, str]]:
    """The items of one task/split of a built zoo."""
    return read_items(Path(path) / "tasks", task, split)
