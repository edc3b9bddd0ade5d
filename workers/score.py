"""Scoring a resident model with lm-eval: tasks built once, `evaluate` per candidate.

    scorer = Scorer(tasks=[{"name": "zoo_mixed_search", "metric": "acc", "weight": 1}], include_path=[DIR])
    result = scorer.score(model, tokenizer)   # metrics per task, per-item scores, weighted fitness
    result = scorer.score_lm(lm)               # the same for any lm-eval LM (e.g. the vLLM backend's)

Prompt options (`options`: apply_chat_template, fewshot_as_multiturn, system_instruction, chat_template_args)
go to lm-eval's `evaluate` on every call; a task's `gen_kwargs` update its generation settings once. A task
with `function:` is scored by the user's function (workers/user_function.py) instead of lm-eval.

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
                 limit: int | None = None, num_fewshot: int | None = None, batch_size: int | str | None = 64,
                 seed: int = 0, options: dict[str, Any] | None = None):
        """`seed`: the run's seed, which shuffles the items into racing chunks. `options`: lm-eval's prompt
        options (workers.eval_options.PROMPT_OPTIONS)."""
        self.specs = [dict(t) for t in tasks]
        self.seed = seed
        self.limit = limit
        self.batch_size = batch_size
        self.options = {k: v for k, v in (options or {}).items() if v not in (None, False, {})}
        self.functions = {}
        if any(t.get("function") for t in self.specs):
            from workers.user_function import UserFunction

            self.functions = {t["name"]: UserFunction(t["name"], t["function"]) for t in self.specs
                              if t.get("function")}
        self.task_dict = {"tasks": {}}
        names = [t["name"] for t in self.specs if not t.get("function")]
        if names:
            self._load_tasks(names, list(include_path or []), num_fewshot)
        self._lm = None
        self._model_id = None

    def _load_tasks(self, names: list[str], paths: list[str], num_fewshot: int | None) -> None:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=paths or None, include_defaults=not paths)
        missing = [n for n in names if n not in manager.all_tasks]
        if missing and paths:  # maybe a built-in task: index the defaults too
            manager = TaskManager(include_path=paths, include_defaults=True)
            missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            raise EvomergeError(f"lm-eval task(s) not found: {', '.join(missing)}",
                                "check the task names, or add the folder of their YAML files to include_path")
        self.task_dict = manager.load(names)
        gen = {t["name"]: t["gen_kwargs"] for t in self.specs if t.get("gen_kwargs")}
        for name, task in self.task_dict["tasks"].items():
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
                task.set_fewshot_seed(seed=1234)
            if name in gen:
                if task.get_config("output_type") != "generate_until":
                    raise EvomergeError(f"task {name} has gen_kwargs but is a {task.get_config('output_type')} task",
                                        "gen_kwargs apply to generate_until tasks only: drop them")
                task.set_config(key="generation_kwargs", value=dict(gen[name]), update=True)

    def _lm_for(self, model, tokenizer):
        if self._lm is None or self._model_id != id(model):
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=hf_batch_size(self.batch_size, model))
            self._model_id = id(model)
        return self._lm

    def _set_prompt_options(self, lm) -> None:
        """Put this objective's chat-template settings on the LM (one LM serves the objective and validation)."""
        defaults = getattr(lm, "_evomerge_defaults", None)
        if defaults is None:  # the LM's own settings, kept on the LM: every scorer restores the same ones
            defaults = {k: getattr(lm, k) for k in ("chat_template_args", "hf_chat_template", "enable_thinking")
                        if hasattr(lm, k)}
            lm._evomerge_defaults = defaults
        for k, v in defaults.items():
            setattr(lm, k, dict(v) if isinstance(v, dict) else v)
        want = self.options.get("apply_chat_template")
        if not want:
            return
        args = dict(self.options.get("chat_template_args") or {})
        text = lm.chat_template(want) if isinstance(want, str) else None
        if "hf_chat_template" in defaults:  # lm-eval's VLLM passes the template and enable_thinking itself
            if "enable_thinking" in args:
                lm.enable_thinking = args.pop("enable_thinking")
            if text is not None:
                lm.hf_chat_template = text
        elif text is not None:
            args["chat_template"] = text
        if hasattr(lm, "chat_template_args"):
            lm.chat_template_args = {**(defaults.get("chat_template_args") or {}), **args}

    def dry_run(self, lm) -> dict[str, float]:
        """Call every scoring function on the model `lm` holds now (the base model, before any candidate), so
        a broken function stops a search before its first evaluation; fixes each function's item count."""
        out = {}
        for name, fn in self.functions.items():
            try:
                scores = fn(lm)
            except RuntimeError as e:
                raise EvomergeError(f"{e} (dry call on the base model, before the search)",
                                    "fix the function: it must return one score in [0, 1] per item") from e
            out[name] = sum(scores) / len(scores)
        return out

    def score(self, model, tokenizer) -> dict[str, Any]:
        """Score a resident transformers model (wrapped in lm-eval's HFLM once)."""
        return self.score_lm(self._lm_for(model, tokenizer))

    def item_count(self, name: str, lm=None) -> int:
        if name in self.functions:
            fn = self.functions[name]
            if fn.n is None and lm is not None:
                fn(lm)
            n = fn.n or 0
        else:
            n = len(self.task_dict["tasks"][name].eval_docs)
        return min(n, self.limit) if self.limit else n

    def score_lm(self, lm, samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """{"metrics": {task: value}, "items": {task: [per-item value by doc_id]}, "fitness": weighted mean}.
        `samples`: score only these doc ids per task (racing scores a candidate chunk by chunk)."""
        metrics: dict[str, float] = {}
        items: dict[str, list[float]] = {}
        out: dict[str, Any] = {"results": {}, "samples": {}}
        if self.task_dict["tasks"]:
            from lm_eval.evaluator import evaluate

            lm_samples = {k: v for k, v in samples.items() if k not in self.functions} if samples else None
            self._set_prompt_options(lm)
            out = evaluate(lm=lm, task_dict=self.task_dict, limit=None if samples else self.limit,
                           samples=lm_samples, log_samples=True, bootstrap_iters=0, verbosity="ERROR",
                           system_instruction=self.options.get("system_instruction"),
                           apply_chat_template=bool(self.options.get("apply_chat_template")),
                           fewshot_as_multiturn=bool(self.options.get("fewshot_as_multiturn")))
        for spec in self.specs:
            name, metric = spec["name"], spec.get("metric", "acc")
            if name in self.functions:
                fn = self.functions[name]
                if samples and name in samples:
                    ids = list(samples[name])
                elif self.limit and (fn.n is None or fn.n > self.limit):
                    ids = list(range(self.item_count(name, lm)))
                else:
                    ids = None
                items[name] = fn(lm, ids) if ids is None or ids else []
                metrics[name] = sum(items[name]) / len(items[name]) if items[name] else 0.0
                continue
            res = out["results"][name]
            key = next((k for k in res if k == metric or k.startswith(metric + ",")), None)
            if key is None:
                known = sorted({k.split(",")[0] for k in res if k != "alias" and not k.endswith("_stderr")})
                raise EvomergeError(f"task {name} has no metric '{metric}'", f"its metrics: {', '.join(known)}")
            metrics[name] = float(res[key])
            # a task with several filters (e.g. gsm8k's strict-match and flexible-extract) logs one sample per
            # filter and item: keep the filter of the metric chosen (`metric: exact_match,flexible-extract`)
            flt = key.split(",", 1)[1] if "," in key else None
            rows = sorted((s for s in out["samples"][name] if flt is None or s.get("filter", flt) == flt),
                          key=lambda s: s["doc_id"])
            items[name] = [float(s[metric.split(",")[0]]) for s in rows]
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
        total = self.item_count(name, lm)
        out = race(lambda ids: self.score_lm(lm, samples={name: ids})["items"][name], total, threshold, chunks,
                   delta, self.seed)
        res = {"metrics": {name: out["fitness"]}, "items": {name: out["scores"]}, "fitness": out["fitness"],
               "raced": out["raced"], "items_scored": len(out["ids"])}
        if out["raced"]:
            res.update(sampled={name: out["ids"]}, bound=out["bound"])
        return res


def hf_batch_size(batch_size: int | str | None, model=None) -> int | str:
    """workers.batch_size for lm-eval's HFLM: 64 by default; `auto` is lm-eval's largest-batch search on a GPU
    (on CPU it would run forward passes at the model's full context length to find one: 64 there)."""
    if batch_size is None:
        return 64
    if batch_size == "auto":
        device = getattr(getattr(model, "device", None), "type", "cpu")
        return "auto" if device == "cuda" else 64
    return int(batch_size)
