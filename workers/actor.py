"""The worker: a long-lived Ray actor that owns sources, a resident model and the scorers.

Each call builds one candidate recipe in place into the resident model and scores it with lm-eval. The
controller creates one actor per worker slot, with the CPU/GPU resources the config asks for.

Testing hook (fault injection, used by the test suite): EVOMERGE_TEST_FAULTS="kill:ID,raise:ID,hang:ID"
makes the worker die (process exit), raise, or hang on the first attempt at candidate ID.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from evomerge.recipe import Recipe
from workers.build import CandidateBuilder
from workers.score import Scorer


def _faults() -> dict[str, set[int]]:
    spec = os.environ.get("EVOMERGE_TEST_FAULTS", "")
    out: dict[str, set[int]] = {}
    for part in filter(None, spec.split(",")):
        kind, _, ident = part.partition(":")
        out.setdefault(kind, set()).add(int(ident))
    return out


class MergeWorker:
    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoTokenizer

        threads = max(1, int(spec.get("cpus") or 1))
        torch.set_num_threads(threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        device = "cuda" if spec.get("gpus") else "cpu"
        models = spec["models"]
        self.builder = CandidateBuilder(models, resident_from=spec.get("base"), device=device,
                                        dtype=spec.get("dtype", "float32"),
                                        trust_remote_code=spec.get("trust_remote_code", False))
        tok_src = models[spec.get("base") or next(iter(models))]
        self.tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=spec.get("trust_remote_code", False))
        obj = spec["objective"]
        self.scorer = Scorer(obj["tasks"], obj.get("include_path"), obj.get("limit"), obj.get("num_fewshot"),
                             spec.get("batch_size", 64))
        val = spec.get("validation")
        self.val_scorer = (Scorer(val["tasks"], val.get("include_path"), val.get("limit"), val.get("num_fewshot"),
                                  spec.get("batch_size", 64)) if val else None)
        self.faults = _faults()
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def _build(self, recipe: dict[str, Any]):
        import torch

        model = self.builder.build(Recipe.model_validate(recipe))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not torch.isfinite(p).all():
                    raise FloatingPointError(f"the merged weights of {name} are not finite")
        return model

    def evaluate(self, cand_id: int, recipe: dict[str, Any], attempt: int = 0) -> dict[str, Any]:
        if attempt == 0 and cand_id in self.faults.get("kill", ()):
            os._exit(17)
        if attempt == 0 and cand_id in self.faults.get("hang", ()):
            time.sleep(3600)
        t0 = time.perf_counter()
        if cand_id in self.faults.get("raise", ()):
            raise RuntimeError(f"injected fault in candidate {cand_id}")
        model = self._build(recipe)
        t1 = time.perf_counter()
        res = self.scorer.score(model, self.tokenizer)
        t2 = time.perf_counter()
        if not math.isfinite(res["fitness"]):
            raise FloatingPointError(f"fitness is {res['fitness']}")
        return {**res, "t_build": t1 - t0, "t_score": t2 - t1, "worker": self.name}

    def validate(self, recipe: dict[str, Any]) -> dict[str, Any]:
        if self.val_scorer is None:
            return {}
        model = self._build(recipe)
        return self.val_scorer.score(model, self.tokenizer)

    def ready(self) -> str:
        return self.name
