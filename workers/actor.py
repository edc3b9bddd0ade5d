"""The worker: a long-lived Ray actor that owns sources, a resident model and the scorers.

Each call builds one candidate recipe in place into the resident model and scores it with lm-eval. The
controller creates one actor per worker slot, with the CPU/GPU resources the config asks for.

Testing hook (fault injection, used by the test suite): EVOMERGE_TEST_FAULTS="kill:ID,raise:ID,hang:ID"
makes the worker die (process exit), raise, or hang on the first attempt at candidate ID; "kill_build:ID"
and "kill_score:ID" kill it halfway through building the candidate's weights or at its first scoring
request; "delay:MS" makes every first attempt wait MS milliseconds first (keeps candidates in flight for
cluster tests).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from evomerge.merge.load import any_recipe
from workers.build import CandidateBuilder
from workers.score import Scorer, hf_batch_size


def _faults() -> dict[str, set[int]]:
    spec = os.environ.get("EVOMERGE_TEST_FAULTS", "")
    out: dict[str, set[int]] = {}
    for part in filter(None, spec.split(",")):
        kind, _, ident = part.partition(":")
        out.setdefault(kind, set()).add(int(ident))
    return out


def _die_midway_through_build(backend) -> None:
    """Fault injection: the process exits once half of the resident model's tensors have been written."""
    builder = getattr(backend, "builder", None)
    if builder is None:
        os._exit(17)

    class Dying(dict):
        count = 0

        def __getitem__(self, key):
            Dying.count += 1
            if Dying.count > len(self) // 2:
                os._exit(17)
            return super().__getitem__(key)

    builder.params = Dying(builder.params)


def _die_at_first_request(lm) -> None:
    """Fault injection: the process exits at the candidate's first scoring request (mid-score)."""
    for name in ("loglikelihood", "generate_until", "loglikelihood_rolling"):
        if hasattr(lm, name):
            setattr(lm, name, lambda *a, **k: os._exit(17))


class HfBackend:
    """transformers backend. Parameter-space candidates are built in place into one resident model (scored
    through one HFLM); data-flow candidates are path models over the resident source models (see
    workers/path_model.py). Each part is set up on the first candidate that needs it."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        torch.set_num_threads(max(1, int(spec.get("cpus") or 1)))
        self.spec = spec
        self.device = "cuda" if spec.get("gpus") else "cpu"
        self.builder: CandidateBuilder | None = None
        self.paths = None
        self._ps_lm = None
        self.lm = None
        if spec.get("search", "parameter") != "dataflow":
            self._ps()

    def _ps(self):
        if self.builder is None:
            from lm_eval.models.huggingface import HFLM
            from transformers import AutoTokenizer

            spec, models = self.spec, self.spec["models"]
            trust = spec.get("trust_remote_code", False)
            self.builder = CandidateBuilder(models, resident_from=spec.get("base"), device=self.device,
                                            dtype=spec.get("dtype", "float32"), trust_remote_code=trust,
                                            device_sources=spec.get("device_sources", "auto"))
            tok_dir = self.builder.sources[spec.get("base") or next(iter(models))].path  # local, also for hf:
            tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)
            self._ps_lm = HFLM(pretrained=self.builder.model, tokenizer=tok,
                               batch_size=hf_batch_size(spec.get("batch_size"), self.builder.model))
        return self.builder

    def load(self, recipe) -> None:
        import torch

        if getattr(recipe, "method", None) == "dataflow":
            self.lm = self._path_lm(recipe)
            return
        if getattr(recipe, "method", None) == "piecewise":
            model = self._ps().build_piecewise(recipe)
        else:
            model = self._ps().build(recipe)
        self.lm = self._ps_lm
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not torch.isfinite(p).all():
                    raise FloatingPointError(f"the merged weights of {name} are not finite")

    def _path_lm(self, recipe):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoTokenizer

        from evomerge.merge.sources import local_model_dir
        from workers.path_model import PathBuilder

        if self.paths is None:
            self.paths = PathBuilder(self.device, self.spec.get("dtype", "float32"),
                                     self.spec.get("trust_remote_code", False))
            self._path_tok: dict[str, Any] = {}
        model = self.paths.build(recipe)
        head = recipe.models[recipe.head].path
        if head not in self._path_tok:
            self._path_tok[head] = AutoTokenizer.from_pretrained(local_model_dir(recipe.head, head))
        return HFLM(pretrained=model, tokenizer=self._path_tok[head],
                    batch_size=hf_batch_size(self.spec.get("batch_size"), model))

    def base_lm(self):
        """The LM around the model before any candidate: the base (model A itself for a data-flow search)."""
        if self.spec.get("search") == "dataflow":
            from evomerge.merge.sources import open_source
            from workers.vllm_dfs import identity_path

            head = self.spec["head"]
            src = open_source(head, self.spec["models"][head])
            n = src.num_layers or 0
            src.close()
            return self._path_lm(identity_path(head, self.spec["models"][head], n))
        self._ps()
        return self._ps_lm


def make_backend(spec: dict[str, Any]):
    if spec.get("backend", "hf") == "vllm":
        from workers.vllm_backend import VllmBackend

        v = spec.get("vllm") or {}
        kv = v.get("kv_cache_gb")
        kw = dict(dtype=v.get("dtype") or spec.get("dtype", "float32"), max_model_len=v.get("max_model_len", 2048),
                  gpu_memory_utilization=v.get("gpu_memory_utilization", 0.85),
                  kv_cache_bytes=int(kv * 2**30) if kv else None, enforce_eager=v.get("enforce_eager", True),
                  device_sources=spec.get("device_sources", "auto"),
                  trust_remote_code=spec.get("trust_remote_code", False), seed=spec.get("seed", 0),
                  batch_size=spec.get("batch_size") or "auto",
                  engine_args={k: v.get(k) for k in ("tensor_parallel_size", "max_num_seqs", "enable_prefix_caching")})
        if spec.get("search") == "dataflow":
            from workers.vllm_dfs import VllmPathBackend

            return VllmPathBackend(spec["models"], head=spec["head"], slots=spec["path_slots"], **kw)
        return VllmBackend(spec["models"], base=spec.get("base"), **kw)
    return HfBackend(spec)


class MergeWorker:
    def __init__(self, spec: dict[str, Any]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        from workers.eval_options import prompt_options

        obj = spec["objective"]
        self.spec_objective = obj
        self.scorer = Scorer(obj["tasks"], obj.get("include_path"), obj.get("limit"), obj.get("num_fewshot"),
                             spec.get("batch_size"), seed=spec.get("seed", 0), options=prompt_options(obj))
        val = spec.get("validation")
        self.val_scorer = (Scorer(val["tasks"], val.get("include_path"), val.get("limit"), val.get("num_fewshot"),
                                  spec.get("batch_size"), options=prompt_options(val)) if val else None)
        self.backend = make_backend(spec)
        self.base_scores: dict[str, float] | None = None
        self.faults = _faults()
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def evaluate(self, cand_id: int, recipe: dict[str, Any], attempt: int = 0,
                 threshold: float | None = None, samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """Build and score one candidate: on every item, chunk by chunk against a racing `threshold`, or on
        the doc ids in `samples` only (the controller estimates the full-set score from them)."""
        if attempt == 0 and cand_id in self.faults.get("kill", ()):
            os._exit(17)
        if attempt == 0 and cand_id in self.faults.get("hang", ()):
            time.sleep(3600)
        if attempt == 0 and self.faults.get("delay"):
            time.sleep(max(self.faults["delay"]) / 1000)
        t0 = time.perf_counter()
        if cand_id in self.faults.get("raise", ()):
            raise RuntimeError(f"injected fault in candidate {cand_id}")
        if attempt == 0 and cand_id in self.faults.get("kill_build", ()):
            _die_midway_through_build(self.backend)
        self.backend.load(any_recipe(recipe))
        t1 = time.perf_counter()
        if attempt == 0 and cand_id in self.faults.get("kill_score", ()):
            _die_at_first_request(self.backend.lm)
        racing = (self.spec_objective.get("racing") or None)
        if racing and threshold is not None:
            res = self.scorer.race(self.backend.lm, threshold, racing["chunks"], racing["delta"])
        else:
            res = self.scorer.score_lm(self.backend.lm, samples=samples)
            res.update(raced=False, items_scored=sum(len(v) for v in res["items"].values()))
        t2 = time.perf_counter()
        if not math.isfinite(res["fitness"]):
            raise FloatingPointError(f"fitness is {res['fitness']}")
        return {**res, "t_build": t1 - t0, "t_score": t2 - t1, "worker": self.name}

    def validate(self, recipe: dict[str, Any]) -> dict[str, Any]:
        if self.val_scorer is None:
            return {}
        self.backend.load(any_recipe(recipe))
        return self.val_scorer.score_lm(self.backend.lm)

    def dry_run(self) -> dict[str, float]:
        """Call the scoring functions (if any) once on the base model, before the first candidate: a missing
        or broken function stops the search here, with its error, instead of failing every evaluation."""
        if self.base_scores is None:
            scores: dict[str, float] = {}
            for sc in (self.scorer, self.val_scorer):
                if sc is not None and sc.functions:
                    scores.update(sc.dry_run(self.backend.base_lm()))
            self.base_scores = scores
        return self.base_scores

    def ready(self) -> dict[str, Any]:
        import ray

        self.dry_run()

        try:
            node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - outside Ray (direct use, tests)
            node = None
        return {"name": self.name, "node": node}
