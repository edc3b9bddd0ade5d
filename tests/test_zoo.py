"""The tiny expert zoo: deterministic build, layout, lm-eval tasks, scorer agreement, merging helps."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import pytest

from evomerge.zoo import EXPERT_SKILLS, SIZES, SPLITS, TASKS, TrainSpec, build_zoo, load_zoo, zoo_items

# A task-arithmetic merge found with benchmarks/zoo_grid.py on the micro zoo (seed 0).
GOOD_MERGE = {"shift": 0.5, "mirror": 0.5}


@pytest.fixture(scope="module")
def zoo(micro_zoo):
    """The session's micro zoo (seed 0), built once by conftest's `micro_zoo` fixture."""
    return micro_zoo


@pytest.fixture(scope="module")
def merger(zoo):
    from evomerge.zoo.merges import ResidentMerger

    return ResidentMerger(zoo)


def _weights_hash(model_dir) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights(tmp_path):
    """Two builds with one seed are bit-identical (a shortened micro config keeps this test fast)."""
    quick = dataclasses.replace(SIZES["micro"], base=TrainSpec(steps=10, lr=3e-3, batch=16, warmup=5),
                                expert=TrainSpec(steps=3, lr=3e-4, batch=16),
                                counts={"search": 4, "validation": 4, "test": 4})
    hashes = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_zoo(tmp_path / name, quick, seed=seed)
        hashes.append({m: _weights_hash(tmp_path / name / "models" / m) for m in ("base", *EXPERT_SKILLS)})
    assert hashes[0] == hashes[1]
    assert hashes[0]["base"] != hashes[2]["base"]
    assert (tmp_path / "a" / "tasks" / "zoo_mixed_test.jsonl").read_text() == \
        (tmp_path / "b" / "tasks" / "zoo_mixed_test.jsonl").read_text()


def test_layout(zoo):
    manifest = load_zoo(zoo)
    assert set(manifest["models"]) == {"base", *EXPERT_SKILLS}
    for name, info in manifest["models"].items():
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (zoo / "models" / name / f).exists()
        assert info["skill"] == (None if name == "base" else name)
    assert manifest["seed"] == 0 and manifest["size"] == "micro" and manifest["build_seconds"] > 0
    seen: set[str] = set()
    for task in TASKS:
        for split in SPLITS:
            assert (zoo / "tasks" / f"zoo_{task}_{split}.yaml").exists()
            items = zoo_items(zoo, task, split)
            assert len(items) == manifest["tasks"][task]["counts"][split] > 0
            inputs = {it["prompt"].split(":", 1)[1] for it in items}
            assert not inputs & seen, "splits and tasks must not share items"
            seen |= inputs


def test_experts_specialise(zoo):
    scores = load_zoo(zoo)["scores"]["models"]
    for skill in EXPERT_SKILLS:
        other = next(s for s in EXPERT_SKILLS if s != skill)
        assert scores[skill][skill] >= 0.95
        assert scores[skill][skill] > scores["base"][skill]
        assert scores[skill][skill] > scores[other][skill] + 0.1


def test_tasks_load_in_lm_eval_offline(zoo):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(zoo / "tasks"), include_defaults=False)
    names = [f"zoo_{t}_{s}" for t in TASKS for s in SPLITS]
    tasks = manager.load(names)["tasks"]
    manifest = load_zoo(zoo)
    for name in names:
        task, split = name[len("zoo_"):].rsplit("_", 1)
        assert len(tasks[name].eval_docs) == manifest["tasks"][task]["counts"][split]


def test_lm_eval_agrees_with_zoo_scorer(zoo, merger):
    from evomerge.zoo.lmeval import LmEvalScorer

    scorer = LmEvalScorer(zoo, ["zoo_mixed_search", "zoo_compositional_search"])
    for name in ("base", EXPERT_SKILLS[0]):
        merger.load_model(name)
        result = scorer.evaluate(merger.model, merger.tokenizer)
        for task in ("mixed", "compositional"):
            acc, per_item = result[f"zoo_{task}_search"]
            ours = merger.scores(task, "search")
            assert per_item == ours
            assert acc == pytest.approx(sum(ours) / len(ours))


@pytest.mark.parametrize("task", ["mixed", "compositional"])
def test_merging_helps(zoo, merger, task):
    """A fixed task-arithmetic merge beats both experts on the search split."""
    from evomerge.zoo.merges import merge_recipe

    experts = {}
    for skill in EXPERT_SKILLS:
        merger.load_model(skill)
        experts[skill] = sum(merger.scores(task, "search"))
    merger.load(merge_recipe(zoo, "task_arithmetic", GOOD_MERGE))
    merged = sum(merger.scores(task, "search"))
    assert merged > max(experts.values()), (merged, experts)


def test_cli_imports_no_torch():
    code = "import sys, evomerge.zoo.cli; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

