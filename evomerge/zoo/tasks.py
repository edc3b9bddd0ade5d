"""Write the zoo's evaluation items as lm-eval tasks: ``zoo_<task>_<split>.yaml`` + ``.jsonl`` side by side.

Output type ``loglikelihood`` with metric ``acc``: lm-eval's ``is_greedy`` (is the target, terminator
included, the greedy continuation of the prompt) — exact match of greedy decoding, at the cost of one
forward pass per item. ``target_delimiter`` is empty: the prompt ends with ``=`` and the target follows
it directly. ``data_files`` paths are absolute because lm-eval does not resolve relative ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def task_name(task: str, split: str) -> str:
    return f"zoo_{task}_{split}"


def task_config(name: str, data_file: Path) -> dict:
    """The lm-eval task config for one JSONL file of {prompt, target, skill} rows."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_tasks(task_dir: Path, items: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, str]]:
    """Write every task/split; returns {task: {split: task name}}."""
    task_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, dict[str, str]] = {}
    for task, splits in items.items():
        names[task] = {}
        for split, rows in splits.items():
            name = task_name(task, split)
            data = task_dir / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, data), sort_keys=False))
            names[task][split] = name
    return names


def read_items(task_dir: Path, task: str, split: str) -> list[dict[str, str]]:
    """The items of one task/split, in doc_id order."""
    path = Path(task_dir) / f"{task_name(task, split)}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
