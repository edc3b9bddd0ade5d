"""Score a resident model on zoo tasks with lm-eval: the TaskManager and task dict are built once.

    scorer = LmEvalScorer(zoo_dir, ["zoo_mixed_test"])
    result = scorer.evaluate(model, tokenizer)   # {task: (accuracy, [per-item 0/1 in doc order])}

The same scorer can be re-evaluated after the model's weights change in place (merges built with
``build_into``). Results equal ``evomerge.zoo.score.score_items`` on the same items.
"""

from __future__ import annotations

from pathlib import Path


class LmEvalScorer:
    """lm-eval's ``evaluate`` on a fixed task dict of zoo tasks (loglikelihood, metric ``acc``)."""

    def __init__(self, zoo_dir: str | Path, task_names: list[str]):
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(Path(zoo_dir) / "tasks"), include_defaults=False)
        self.task_names = list(task_names)
        self.task_dict = manager.load(self.task_names)

    def evaluate(self, model, tokenizer, batch_size: int = 64) -> dict[str, tuple[float, list[int]]]:
        """{task: (accuracy, per-item scores sorted by doc_id)} for `model` as it is now."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluate(lm=lm, task_dict=self.task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        result = {}
        for name in self.task_names:
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            result[name] = (out["results"][name]["acc,none"], [int(s["acc"]) for s in samples])
        return result
