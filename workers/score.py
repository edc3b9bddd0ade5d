"""Scoring a resident model with lm-eval: tasks built once, `evaluate` per candidate.

    scorer = Scorer(tasks=[{"name": "zoo_mixed_search", "metric": "acc", "weight": 1}], include_path=[DIR])
    result = scorer.score(model, tokenizer)   # metrics per task, per-item scores, weighted fitness
    result = scorer.score_lm(lm)               # the same for any lm-eval LM (e.g. the vLLM backend's)

The TaskManager and task objects are built once (indexing lm-eval's ~14,000 built-in tasks costs seconds,
so with an include path only those tasks are indexed); `lm_eval.evaluator.evaluate` is then called on
the same task dict for every candidate, with no RNG reseeding and no bootstrap. The HFLM wrapper is
built once around the resident model, whose weights change in place between candidates.
"""

from __future__ import annotations

import math
from typing import Any

from evomerge.errors import EvomergeError


class Scorer:
    def __init__(self, tasks: list[dict[str, Any]], include_path: list[str] | None = None,
                 limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 64, seed: int = 0):
        """`seed`: the run's seed, which shuffles the items into racing chunks."""
        from lm_eval.tasks import TaskManager

        self.specs = [dict(t) for t in tasks]
        self.seed = seed
        self.limit = limit
        self.batch_size = batch_size
        paths = list(include_path or [])
        manager = TaskManager(include_path=paths or None, include_defaults=not paths)
        names = [t["name"] for t in self.specs]
        missing = [n for n in names if n not in manager.all_tasks]
        if missing and paths:  # maybe a built-in task: index the defaults too
            manager = TaskManager(include_path=paths, include_defaults=True)
            missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            raise EvomergeError(f"lm-eval task(s) not found: {', '.join(missing)}",
                                "check the task names, or add the folder of their YAML files to include_path")
        self.task_dict = manager.load(names)
        for name, task in self.task_dict["tasks"].items():
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
                task.set_fewshot_seed(seed=1234)
            del name
        self._lm = None
        self._model_id = None

    def _lm_for(self, model, tokenizer):
        if self._lm is None or self._model_id != id(model):
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            self._model_id = id(model)
        return self._lm

    def score(self, model, tokenizer) -> dict[str, Any]:
        """Score a resident transformers model (wrapped in lm-eval's HFLM once)."""
        return self.score_lm(self._lm_for(model, tokenizer))

    def item_count(self, name: str) -> int:
        n = len(self.task_dict["tasks"][name].eval_docs)
        return min(n, self.limit) if self.limit else n

    def score_lm(self, lm, samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """{"metrics": {task: value}, "items": {task: [per-item value by doc_id]}, "fitness": weighted mean}.
        `samples`: score only these doc ids per task (racing scores a candidate chunk by chunk)."""
        from lm_eval.evaluator import evaluate

        out = evaluate(lm=lm, task_dict=self.task_dict, limit=None if samples else self.limit, samples=samples,
                       log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        metrics: dict[str, float] = {}
        items: dict[str, list[float]] = {}
        for spec in self.specs:
            name, metric = spec["name"], spec.get("metric", "acc")
            res = out["results"][name]
            key = next((k for k in res if k == metric or k.startswith(metric + ",")), None)
            if key is None:
                known = sorted({k.split(",")[0] for k in res if k != "alias" and not k.endswith("_stderr")})
                raise EvomergeError(f"task {name} has no metric '{metric}'", f"its metrics: {', '.join(known)}")
            metrics[name] = float(res[key])
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            items[name] = [float(s[metric]) for s in samples]
        total_w = sum(s.get("weight", 1.0) for s in self.specs)
        fitness = sum(s.get("weight", 1.0) * metrics[s["name"]] for s in self.specs) / total_w
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite scores {metrics}")
        return {"metrics": metrics, "items": items, "fitness": fitness}

    def race(self, lm, threshold: float, chunks: int, delta: float) -> dict[str, Any]:
        """Score a one-task objective chunk by chunk (items shuffled with the run's seed); stop once the
        candidate cannot reach `threshold` with probability 1 - delta over all looks (search/fitness/racing.py). The
        result carries `raced` and `items_scored`; a raced candidate's fitness is its mean on the items it
        was scored on (listed in `sampled`), an estimate of its full-set score, not a bound."""
        from evomerge.search.fitness.racing import race

        (spec,) = self.specs
        name = spec["name"]
        total = self.item_count(name)
        out = race(lambda ids: self.score_lm(lm, samples={name: ids})["items"][name], total, threshold, chunks,
                   delta, self.seed)
        res = {"metrics": {name: out["fitness"]}, "items": {name: out["scores"]}, "fitness": out["fitness"],
               "raced": out["raced"], "items_scored": len(out["ids"])}
        if out["raced"]:
            res.update(sampled={name: out["ids"]}, bound=out["bound"])
        return res
