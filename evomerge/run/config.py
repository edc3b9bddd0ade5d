"""The search configuration: one YAML file, validated with pydantic, every mistake named with its key.

Relative paths (models, task include paths, run directory) are resolved against the config file's folder,
so a config and the models next to it can be moved together.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    name: str
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    metric: str = "acc"
    gen_kwargs: dict[str, Any] | None = Field(default=None, description="lm-eval generation settings for this "
                                              "generate_until task (until, max_gen_toks, do_sample, temperature, ...)")
    function: str | None = Field(default=None, description="score this task with your own function "
                                 "(module:function or path/to/file.py:function) instead of lm-eval; runs your code")

    @field_validator("gen_kwargs")
    @classmethod
    def _gen_kwargs_ok(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from workers.eval_options import check_gen_kwargs

        return check_gen_kwargs(v)

    @model_validator(mode="after")
    def _function_ok(self) -> TaskSpec:
        if self.function is not None:
            from workers.eval_options import check_function_spec

            check_function_spec(self.function)
            if self.gen_kwargs:
                raise ValueError(f"task {self.name}: gen_kwargs belong to lm-eval tasks, not to a scoring function")
        return self


class RacingSpec(_Strict):
    """Stop scoring a candidate once it cannot reach the top-k with probability 1 - delta (search/fitness/racing.py)."""

    chunks: int = Field(default=4, ge=2, description="items, shuffled with the run's seed, are scored in this "
                                                     "many chunks")
    delta: float = Field(default=0.05, gt=0, lt=1)
    top_k: int = Field(default=1, ge=1, description="race against the k-th best full evaluation")


class EstimateSpec(_Strict):
    """Score candidates on a few informative items and estimate the full-set score (evomerge.search.fitness.irt)."""

    items: int = Field(default=20, ge=2, description="anchor items scored per candidate (over all tasks)")
    calibration: int = Field(default=8, ge=3, description="the first N evaluations score every item; the "
                                                             "item-response model is fitted on them")
    rescore_margin: float = Field(default=0.05, ge=0, le=1,
                                  description="an estimate above the full-scored best minus this is scored again on "
                                              "every item, and only full scores choose the best (estimates of good "
                                              "candidates run low; results/fitness_policies.md)")


class Objective(_Strict):
    tasks: list[TaskSpec] = Field(min_length=1)
    include_path: list[str] = []
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    apply_chat_template: bool | str = Field(default=False, description="render prompts with the scoring model's "
                                            "chat template (or the one of its templates named here)")
    fewshot_as_multiturn: bool = Field(default=False, description="few-shot examples as user/assistant turns")
    system_instruction: str | None = None
    chat_template_args: dict[str, Any] = Field(default={}, description="passed to the chat template, e.g. "
                                               "{enable_thinking: false}")
    multi: bool = Field(default=False, description="each task its own objective (Pareto front; optuna nsga2/tpe)")
    racing: RacingSpec | None = None
    estimate: EstimateSpec | None = None

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _function_shorthand(cls, v: Any) -> Any:
        from workers.eval_options import expand_function_shorthand

        return expand_function_shorthand(v)

    @model_validator(mode="after")
    def _prompt_options_ok(self) -> Objective:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template (few-shot turns are chat turns)")
        if self.chat_template_args and not self.apply_chat_template:
            raise ValueError("chat_template_args needs apply_chat_template")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must differ: {sorted({n for n in names if names.count(n) > 1})} twice")
        return self


class SpaceSpec(_Strict):
    method: str | list[str] = Field(description="a merge method, or a list of them to search the method too")
    granularity: Literal["model", "layer"] | int = "model"
    filters: list[str] = []
    embed_head: bool = Field(default=True, description="with granularity layer or N: embeddings and final "
                             "norm/head get values of their own (false: they follow layer group 0)")
    search: list[str] | None = None
    bounds: dict[str, tuple[float, float]] = {}
    fixed: dict[str, Any] = {}
    x0: float | dict[str, float] | None = None
    dtype: str | None = None

    @model_validator(mode="after")
    def _bounds_ok(self) -> SpaceSpec:
        for name, (lo, hi) in self.bounds.items():
            _check_range(f"space.bounds.{name}", lo, hi)
        if isinstance(self.x0, (int, float)) and not math.isfinite(self.x0):
            raise ValueError(f"space.x0 is {self.x0}: it must be a finite number")
        x0 = self.x0 if isinstance(self.x0, dict) else {n: self.x0 for n in self.bounds} if self.x0 is not None else {}
        for name, v in x0.items():
            if not math.isfinite(v):
                raise ValueError(f"space.x0{'.' + name if isinstance(self.x0, dict) else ''} is {v}: it must be a "
                                 "finite number")
            if name in self.bounds and not self.bounds[name][0] <= v <= self.bounds[name][1]:
                raise ValueError(f"space.x0{'.' + name if isinstance(self.x0, dict) else ''} = {v} lies outside "
                                 f"space.bounds.{name} {list(self.bounds[name])}: the search starts inside its bounds")
        return self


def _check_range(where: str, lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where} [{lo}, {hi}] must be two finite numbers (not NaN or inf)")
    if not lo < hi:
        raise ValueError(f"{where} [{lo}, {hi}] must be [low, high] with low < high")


class DataflowSpec(_Strict):
    """The data-flow (layer-path) space: see evomerge/search/dfs_space.py."""

    head: str | None = Field(default=None, description="model A (tokenizer, embeddings, head); hybrid: the PS merge")
    partners: list[str] = Field(min_length=1, description="the other models whose layers the path may use")
    repeats: int = Field(default=3, ge=1, le=16)
    scales: Literal["matrix", "layer", "none"] = "matrix"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    max_hops: int | None = Field(default=None, ge=2)
    budget: int | None = Field(default=None, ge=1, description="evaluations (default: optimizer.budget)")
    popsize: int | None = Field(default=None, ge=2)
    sigma0: float = Field(default=0.3, gt=0)

    @model_validator(mode="after")
    def _scale_bounds_ok(self) -> DataflowSpec:
        _check_range("dataflow.scale_bounds", *self.scale_bounds)
        return self


class M2N2Spec(_Strict):
    """M2N2 over recipe-form members (evomerge/search/optimizers/m2n2.py, evomerge/merge/piecewise.py)."""

    seeds: list[str] | None = Field(default=None, description="models that seed the archive (default: all)")
    archive_size: int = Field(default=20, ge=2)
    alpha: float = Field(default=1.0, ge=0, description="fitness-sharing exponent (0: no sharing)")
    attraction: bool = True
    crossover: bool = True
    split_point: bool = True
    slerp: Literal["global", "segment"] = "global"
    blocks: int = Field(default=4096, ge=1, description="split points fall on this grid of equal blocks")
    lag: int | None = Field(default=None, ge=1, description="children in flight (default: workers.count)")
    seed_runs: list[str] = Field(default=[], description="earlier m2n2 run directories whose best members also "
                                                         "seed the archive")
    seed_top: int = Field(default=5, ge=1, description="how many of each earlier run's best members")


class OptimizerSpec(_Strict):
    kind: Literal["cmaes", "optuna"] = "cmaes"
    sampler: Literal["cmaes", "tpe", "gp", "random", "nsga2"] = Field(
        default="cmaes", description="with kind: optuna (cmaes with defaults = the EvoMerge paper's PS set-up; "
                                     "gp = Optuna's Gaussian-process sampler, for small budgets)")
    storage: str | None = Field(default=None, description="kind: optuna: a SQLite file or an Optuna storage URL")
    seed: int = 0
    popsize: int | None = Field(default=None, ge=2)
    sigma0: float = Field(default=1 / 6, gt=0)
    budget: int = Field(default=100, ge=1, description="evaluations")
    diagonal: bool = False
    restarts: int = Field(default=9, ge=0, description="kind: cmaes: when CMA-ES converges before the budget is "
                                                         "spent, restart with twice the population (IPOP)")
    asynchronous: bool = Field(default=False, description="kind: cmaes: hand every free worker a candidate and tell "
                               "pycma the first popsize results that arrive (no worker waits for a generation's "
                               "slowest candidate); what it asks then depends on arrival order, which the ledger "
                               "records, so resume stays exact but two fresh runs with several workers may differ")


class VllmSpec(_Strict):
    """The vLLM engine each worker builds once (workers.backend: vllm)."""

    max_model_len: int = Field(default=2048, ge=16, description="longest prompt + continuation, in tokens")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1, description="share of the GPU for vLLM")
    kv_cache_gb: float | None = Field(default=None, gt=0, description="KV cache size (default: 0.25 on CPU)")
    enforce_eager: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        default=None, description="the engine's dtype (default: workers.dtype; auto: the checkpoint's)")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per engine (workers.gpus must cover it)")
    max_num_seqs: int | None = Field(default=None, ge=1, description="sequences per engine step (lm-eval's "
                                                                      "max_batch_size)")
    enable_prefix_caching: bool | None = Field(default=None, description="default: vLLM's (on); the cache is "
                                                                          "reset after every weight swap")


class WorkersSpec(_Strict):
    count: int = Field(default=1, ge=1)
    cpus: float = Field(default=1, ge=0)
    gpus: float = Field(default=0, ge=0)
    backend: Literal["hf", "vllm"] = "hf"
    vllm: VllmSpec = VllmSpec()
    device_sources: Literal["auto", "always", "never"] = Field(
        default="auto", description="keep source weights in GPU memory (auto: when they fit) or stream them")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None, description="default: 64 on hf, auto on vllm (the engine schedules every request)")
    timeout_s: float = Field(default=900, gt=0, description="per candidate")
    trust_remote_code: bool = False


class SearchConfig(_Strict):
    models: dict[str, str] = Field(min_length=2)
    base: str | None = None
    search: Literal["parameter", "dataflow", "hybrid", "m2n2"] = "parameter"
    space: SpaceSpec | None = None
    dataflow: DataflowSpec | None = None
    m2n2: M2N2Spec | None = None
    objective: Objective
    validation: Objective | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    workers: WorkersSpec = WorkersSpec()
    run_dir: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _base_known(self) -> SearchConfig:
        if self.base is not None and self.base not in self.models:
            raise ValueError(f"base '{self.base}' is not one of the models {sorted(self.models)}")
        if self.search in ("parameter", "hybrid") and self.space is None:
            raise ValueError(f"search: {self.search} needs a `space:` section (the parameter-space merge)")
        if self.search in ("dataflow", "hybrid"):
            d = self.dataflow
            if d is None:
                raise ValueError(f"search: {self.search} needs a `dataflow:` section (head, partners, ...)")
            if self.search == "dataflow" and d.head is None:
                raise ValueError("dataflow.head is required: the model that supplies embeddings and head")
            if self.search == "hybrid" and d.head is not None:
                raise ValueError("dataflow.head must be left out in a hybrid search: model A is the PS merge")
            for n in [d.head, *d.partners]:
                if n is not None and n not in self.models:
                    raise ValueError(f"dataflow names model '{n}', not one of the models {sorted(self.models)}")
            if self.workers.backend == "vllm" and self.workers.vllm.tensor_parallel_size > 1:
                raise ValueError("data-flow candidates on vLLM run on one device per engine: "
                                 "workers.vllm.tensor_parallel_size must be 1")
        if self.objective.racing is not None:
            if len(self.objective.tasks) != 1 or self.objective.multi or self.search == "m2n2":
                raise ValueError("objective.racing needs a single-task, single-objective search (not m2n2: its "
                                 "competition needs every item's score)")
        if self.objective.estimate is not None:
            if self.objective.racing is not None:
                raise ValueError("objective.estimate and objective.racing exclude each other: choose one")
            if self.search == "m2n2":
                raise ValueError("objective.estimate cannot be used with m2n2: its competition needs every "
                                 "item's score")
        if self.validation is not None and (self.validation.estimate or self.validation.racing):
            raise ValueError("validation scores every item: estimate and racing belong to `objective`")
        w = self.workers
        if w.backend == "vllm" and w.vllm.tensor_parallel_size > 1 and w.gpus < w.vllm.tensor_parallel_size:
            raise ValueError(f"workers.vllm.tensor_parallel_size {w.vllm.tensor_parallel_size} needs "
                             f"workers.gpus >= {w.vllm.tensor_parallel_size} (each worker's engine spans its GPUs)")
        o = self.optimizer
        if o.kind != "optuna" and (o.sampler != "cmaes" or o.storage):
            raise ValueError(f"optimizer.{'storage' if o.storage else 'sampler'} belongs to optimizer.kind: optuna; "
                             "set kind: optuna, or drop it (kind: cmaes is pycma)")
        if o.asynchronous and (o.kind != "cmaes" or self.search == "m2n2"):
            raise ValueError("optimizer.asynchronous belongs to pycma CMA-ES (kind: cmaes): Optuna's samplers and "
                             "M2N2 already hand out a candidate whenever a worker is free; drop it")
        if self.search == "m2n2" and o.kind != "cmaes":
            raise ValueError("search: m2n2 is its own optimizer (optimizer.kind is ignored by it): leave "
                             "optimizer.kind out, or choose search: parameter for Optuna")
        if self.search == "m2n2" and self.objective.multi:
            raise ValueError("objective.multi cannot be used with search: m2n2: its competition is per item on one "
                             "combined objective (task weights set each task's share); drop multi, or use "
                             "search: parameter with optimizer.kind: optuna, sampler: nsga2")
        if o.kind == "optuna" and o.storage and o.sampler == "cmaes":
            raise ValueError("optimizer.storage cannot be used with sampler: cmaes: Optuna's CMA-ES sampler keeps its "
                             "state in the storage as a pickle, and loading a pickle can run code. Use the storage "
                             "with tpe, gp, random or nsga2, or drop it (resume rebuilds the study from the ledger)")
        if self.objective.multi:
            if self.optimizer.kind != "optuna" or self.optimizer.sampler == "cmaes":
                raise ValueError("objective.multi needs optimizer.kind: optuna with sampler nsga2, tpe, gp or "
                                 "random (CMA-ES optimises one objective)")
            if len(self.objective.tasks) < 2:
                raise ValueError("objective.multi needs two or more tasks (one objective each)")
        if self.search == "m2n2":
            seeds = (self.m2n2 or M2N2Spec()).seeds or list(self.models)
            unknown = [n for n in seeds if n not in self.models]
            if unknown:
                raise ValueError(f"m2n2.seeds names {unknown}, not among the models {sorted(self.models)}")
            if len(seeds) < 2:
                raise ValueError("m2n2 needs at least two seed models")
            if self.workers.backend != "hf":
                raise ValueError("M2N2 candidates are scored with workers.backend: hf in this version")
        return self

    def fingerprint(self, ignore_budget: bool = True) -> str:
        """Hash of everything that defines the search: not the budget, nor where and how fast it runs (the
        worker count, resources and timeout), which may change on resume."""
        d = self.model_dump(mode="json")
        d.pop("run_dir", None)
        for key in ("count", "cpus", "gpus", "timeout_s", "device_sources"):  # where it runs (OPERATIONAL_KEYS)
            d["workers"].pop(key, None)
        if ignore_budget:
            d["optimizer"].pop("budget", None)
            if d.get("dataflow"):
                d["dataflow"].pop("budget", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _resolve(p: str, root: Path) -> str:
    if p.startswith("hf:"):  # a hub model: evomerge.merge.sources.local_model_dir fetches it on each node
        return p
    if "+" in p and not (root / p).expanduser().exists():  # BASE+ADAPTER (a LoRA adapter on its base)
        base, _, adapter = p.rpartition("+")
        if base and adapter:
            return f"{_resolve(base, root)}+{_resolve(adapter, root)}"
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (root / q).resolve())


def parse_config(data: Any, root: Path, source: str = "config") -> SearchConfig:
    if not isinstance(data, dict):
        raise EvomergeError(f"{source}: expected a YAML mapping", "see configs/quickstart.yaml for the layout")
    try:
        cfg = SearchConfig.model_validate(data)
    except ValidationError as e:
        from workers.eval_options import unknown_key_hint

        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            hint = unknown_key_hint(err["loc"], SearchConfig) if err["type"] == "extra_forbidden" else ""
            lines.append(f"  - {loc}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}{hint}")
        raise EvomergeError(f"{source}: invalid search config:\n" + "\n".join(lines),
                            "fix the keys named above (configs/quickstart.yaml is a commented example)") from None
    models = {n: _resolve(p, root) for n, p in cfg.models.items()}
    paths = [_resolve(p, root) for p in cfg.objective.include_path]
    objective = cfg.objective.model_copy(update={"include_path": paths})
    from workers.eval_options import resolve_functions, with_prompt_options

    objective = resolve_functions(objective, root)
    upd: dict[str, Any] = {"models": models, "objective": objective}
    if cfg.validation is not None:
        upd["validation"] = with_prompt_options(resolve_functions(cfg.validation.model_copy(
            update={"include_path": [_resolve(p, root) for p in cfg.validation.include_path]}), root), objective)
    if cfg.run_dir is not None:
        upd["run_dir"] = _resolve(cfg.run_dir, root)
    if cfg.m2n2 is not None and cfg.m2n2.seed_runs:
        upd["m2n2"] = cfg.m2n2.model_copy(update={"seed_runs": [_resolve(p, root) for p in cfg.m2n2.seed_runs]})
    return cfg.model_copy(update=upd)


def load_config(path: str | Path) -> SearchConfig:
    from evomerge.merge.yaml_io import read_yaml

    p = Path(path)
    return parse_config(read_yaml(p), p.parent.resolve(), str(p))
