"""Build a zoo: a tiny base with partial competence in two skills, and one briefly fine-tuned expert per skill.

The design follows what was measured to make merging help at toy scale (see results/zoo.md): the base is
pretrained on a mixture in which each target skill is rare (the rest filler) plus a little of the
compositional task, so it represents every skill a little; each expert is then fine-tuned briefly at a
low learning rate on its own skill, so task vectors are small deltas from a shared base.

Layout of DIR (fixed; tools rely on it):
    models/base, models/<skill>   Hugging Face model directories (safetensors + char tokenizer)
    tasks/zoo_<task>_<split>.yaml lm-eval tasks (+ .jsonl data), tasks: skills, mixed, compositional
    zoo.json                      models, tasks, splits, item counts, size, seed, scores, build time
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evomerge.zoo.skills import EXPERT_SKILLS, SPLITS, TASKS, ItemStream, make_eval_items
from evomerge.zoo.tasks import read_items, write_tasks
from evomerge.zoo.train import TrainSpec, deterministic, train

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ZooSize:
    """Everything that defines a zoo besides its seed."""

    hidden: int
    layers: int
    base: TrainSpec
    expert: TrainSpec
    counts: dict[str, int]  # items per split, for every task
    mixture: dict[str, float] = field(default_factory=lambda: {
        "copy": 0.91, "reverse": 0.035, "shift": 0.035, "compositional": 0.02})
    min_len: int = 4
    max_len: int = 8


SIZES = {
    "micro": ZooSize(hidden=64, layers=2, base=TrainSpec(steps=600, lr=3e-3, batch=32, warmup=30),
                     expert=TrainSpec(steps=150, lr=3e-4, batch=32),
                     counts={"search": 100, "validation": 100, "test": 200}),
    "small": ZooSize(hidden=128, layers=2, base=TrainSpec(steps=1500, lr=2e-3, batch=64, warmup=50),
                     expert=TrainSpec(steps=200, lr=2e-4, batch=32),
                     counts={"search": 200, "validation": 200, "test": 500}),
}


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_zoo(out: str | Path, size: str | ZooSize = "micro", seed: int = 0, *, threads: int = 1,
              progress: Progress | None = None) -> dict:
    """Train and save a zoo under `out`; returns (and writes) its zoo.json manifest.

    Same `size` and `seed` (and thread count) give bit-identical weights.
    """
    from transformers import LlamaForCausalLM

    from evomerge.tiny import char_tokenizer, tiny_config
    from evomerge.zoo.score import accuracy

    start = time.perf_counter()
    spec = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    items, held_out = make_eval_items(spec.counts, seed, spec.min_len, spec.max_len)
    task_names = write_tasks(out / "tasks", items)
    tokenizer = char_tokenizer()

    def phase(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    with deterministic(seed, threads):
        base = LlamaForCausalLM(tiny_config("llama", hidden=spec.hidden, layers=spec.layers))
        stream = ItemStream(spec.mixture, f"zoo-base-{seed}", spec.min_len, spec.max_len, held_out)
        train(base, tokenizer, stream, spec.base, phase("base"))
        models = {"base": base}
        for k, skill in enumerate(EXPERT_SKILLS):
            expert = copy.deepcopy(base)
            stream = ItemStream({skill: 1.0}, f"zoo-{skill}-{seed}", spec.min_len, spec.max_len, held_out)
            train(expert, tokenizer, stream, spec.expert, phase(skill))
            models[skill] = expert
        for name, model in models.items():
            _save(model, tokenizer, out / "models" / name)
        scores = {name: {task: round(accuracy(model, tokenizer, items[task]["test"]), 4) for task in TASKS}
                  for name, model in models.items()}

    manifest = {
        "models": {name: {"path": str((out / "models" / name).resolve()), "skill": None if name == "base"
                          else name} for name in models},
        "tasks": {task: {"splits": task_names[task], "counts": {s: len(items[task][s]) for s in SPLITS}}
                  for task in TASKS},
        "splits": list(SPLITS),
        "size": size if isinstance(size, str) else "custom",
        "config": asdict(spec),
        "seed": seed,
        "threads": threads,
        "scores": {"split": "test", "metric": "exact_match", "models": scores},
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_zoo(path: str | Path) -> dict:
    """The manifest of a built zoo."""
    return json.loads((Path(path) / "zoo.json").read_text())


def zoo_items(path: str | Path, task: str, split: str) -> list[dict[str, str]]:
    """The items of one task/split of a built zoo."""
    return read_items(Path(path) / "tasks", task, split)
