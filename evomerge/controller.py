"""The controller: ask -> recipe -> dispatch to a free worker -> record -> tell. It holds no tensors.

A single controller drives long-lived Ray workers (`workers.actor.MergeWorker`). A candidate goes to a
worker as soon as that worker is free and the optimizer can hand one out (CMA-ES hands out a whole
generation, then waits for it). Every finished evaluation is appended to the run's ledger before the
optimizer is told, so a resumed run replays exactly what was recorded and redoes only what was in flight.

Faults: a candidate whose build or scoring raises is recorded with its error and told as a failure (the
optimizer penalises it); a worker process that dies mid-candidate is replaced and the candidate retried
once on whichever worker is free first, then recorded as failed; a candidate running past
`workers.timeout_s` kills its worker (replaced) and is recorded as failed. When a whole node is lost, its
workers' candidates are redone elsewhere, and a loss on a node the cluster has since declared dead does
not count against the candidate. Replacement workers start wherever the cluster has room and take work
once ready; a slot whose worker cannot start is retired after three tries, and the search stops with an
error only when no worker is left.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.config import SearchConfig, load_config
from evomerge.dataflow import Hop
from evomerge.dfs_space import DataflowSpace
from evomerge.errors import EvomergeError
from evomerge.optimizers import CMAES, Ask
from evomerge.optimizers.replay import ReplayMismatch, ask_event, has_ask_events, replay
from evomerge.rundir import RunDir
from evomerge.runs import budget_of
from evomerge.space import ParameterSpace


def make_space(cfg: SearchConfig):
    from evomerge.sources import open_source

    if cfg.search == "m2n2":
        from evomerge.config import M2N2Spec
        from evomerge.piecewise import M2N2Space

        spec = cfg.m2n2 or M2N2Spec()
        seeds = spec.seeds or list(cfg.models)
        return M2N2Space({n: cfg.models[n] for n in seeds}, spec.blocks)
    if cfg.search == "dataflow":
        d = cfg.dataflow
        names = [d.head, *[p for p in d.partners if p != d.head]]
        layers = {n: open_source(n, cfg.models[n]).num_layers or 0 for n in names}
        return DataflowSpace(models={n: cfg.models[n] for n in names}, layers=layers, repeats=d.repeats,
                             scales=d.scales, scale_bounds=d.scale_bounds, max_hops=d.max_hops)
    ref = cfg.base or next(iter(cfg.models))
    num_layers = open_source(ref, cfg.models[ref]).num_layers or 1
    s = cfg.space
    if isinstance(s.method, str):
        return ParameterSpace(method=s.method, models=cfg.models, base=cfg.base, num_layers=num_layers,
                              granularity=s.granularity, filters=s.filters, embed_head=s.embed_head,
                              search=s.search, bounds=s.bounds, fixed=s.fixed, x0=s.x0, seed=cfg.seed,
                              dtype=s.dtype)
    from evomerge.methods import get_method
    from evomerge.space import MethodChoiceSpace

    spaces = []
    for name in s.method:  # each method takes the settings that name its parameters
        known = {p.name for p in get_method(name).tensor_params + get_method(name).global_params}
        own = lambda d, known=known: {k: v for k, v in d.items() if k in known}  # noqa: E731
        x0 = own(s.x0) if isinstance(s.x0, dict) else s.x0
        search = [p for p in s.search if p in known] if s.search is not None else None
        spaces.append(ParameterSpace(method=name, models=cfg.models, base=cfg.base, num_layers=num_layers,
                                     granularity=s.granularity, filters=s.filters, embed_head=s.embed_head,
                                     search=search or None, bounds=own(s.bounds), fixed=own(s.fixed), x0=x0,
                                     seed=cfg.seed, dtype=s.dtype))
    return MethodChoiceSpace(spaces)


def make_optimizer(cfg: SearchConfig, space, run_dir: Path | None = None):
    o = cfg.optimizer
    if o.kind == "optuna" and cfg.search in ("parameter", "dataflow"):
        from evomerge.optimizers import OptunaOptimizer

        storage = o.storage
        if storage and "://" not in storage and not Path(storage).is_absolute() and run_dir is not None:
            inside = (run_dir / storage).resolve()
            if not inside.is_relative_to(Path(run_dir).resolve()):
                raise EvomergeError(f"optimizer.storage '{o.storage}' points outside the run directory",
                                    "give a file name inside the run directory (e.g. study.db) or an absolute "
                                    "path or URL you choose deliberately")
            storage = str(inside)
        explicit = o.model_fields_set
        budget, popsize, sigma0 = o.budget, o.popsize, o.sigma0 if "sigma0" in explicit else None
        if cfg.search == "dataflow":  # the dataflow section's own settings win, as with pycma
            d = cfg.dataflow
            budget, popsize, sigma0 = d.budget or budget, d.popsize or popsize, d.sigma0
        return OptunaOptimizer(space.dim, space.x0, space.lower, space.upper, sampler=o.sampler, seed=o.seed,
                               max_evals=budget, popsize=popsize,
                               objectives=len(cfg.objective.tasks) if cfg.objective.multi else 1,
                               sigma0=sigma0, storage=storage,
                               categorical=getattr(space, "categorical", None),
                               use_x0=cfg.search == "dataflow" or (cfg.space is not None and cfg.space.x0 is not None))
    if cfg.search == "m2n2":
        from evomerge.config import M2N2Spec
        from evomerge.optimizers import M2N2
        from evomerge.piecewise import PiecewiseAlgebra

        m = cfg.m2n2 or M2N2Spec()
        return M2N2(space.seeds(m.seed_runs, m.seed_top), archive_size=m.archive_size, alpha=m.alpha,
                    attraction=m.attraction, crossover=m.crossover, split_point=m.split_point, slerp=m.slerp,
                    seed=o.seed, max_evals=o.budget, lag=m.lag or cfg.workers.count,
                    algebra=PiecewiseAlgebra(space.gram))
    if cfg.search == "dataflow":
        d = cfg.dataflow
        return CMAES(space.dim, space.x0, d.sigma0, space.lower, space.upper, seed=o.seed,
                     popsize=d.popsize or o.popsize, max_evals=d.budget or o.budget, diagonal=o.diagonal,
                     eval_x0=True, restarts=o.restarts)
    return CMAES(space.dim, space.x0, o.sigma0, space.lower, space.upper, seed=o.seed, popsize=o.popsize,
                 max_evals=o.budget, diagonal=o.diagonal, restarts=o.restarts)


def preflight(cfg: SearchConfig):
    """Everything checkable before any weight is loaded: sources, the space, the tasks."""
    space = make_space(cfg)  # for M2N2 this also checks the seeds fit together and computes their Gram
    if cfg.search == "m2n2":
        pass
    elif isinstance(space, DataflowSpace):
        from evomerge.dataflow import check_path, open_path_sources

        recipe = space.to_recipe(space.x0)
        sources = open_path_sources(recipe)
        try:
            check_path(recipe.model_copy(update={"path": tuple(
                Hop(model=m, layer=layer) for m, layer in space.layer_index)}), sources)  # every layer usable
            if cfg.workers.backend == "vllm":
                from workers.vllm_dfs import check_engine_paths

                check_engine_paths(sources, recipe.head)  # one engine runs every path, or the reason it cannot
        finally:
            for src in sources.values():
                src.close()
    else:
        from evomerge.plan import make_plan

        for sub in getattr(space, "spaces", [space]):  # every searched method
            make_plan(sub.to_recipe(sub.x0)).close()  # sources compatible, parameters valid
    _check_tasks(cfg)
    from evomerge.eval_options import import_functions

    import_functions(cfg)  # the user's scoring functions import here before any worker starts
    return space


def _check_tasks(cfg: SearchConfig) -> None:
    """The tasks exist, load, have items and compute the metric asked for (the same check as `evomerge check`)."""
    from evomerge.check import CheckReport, check_tasks

    report = CheckReport(config="config")
    check_tasks(cfg, report)
    report.raise_if_failed()


@dataclass
class _Job:
    kind: str  # eval | validate
    ask: Ask
    recipe: dict[str, Any]
    attempt: int = 0  # workers lost on this candidate on nodes still alive (a second one fails it)
    requeued: int = 0  # times it was redone because its worker or node was lost
    deaths: list[str | None] = field(default_factory=list)  # nodes of the workers lost on it
    worker: int = -1
    started: float = field(default_factory=time.time)
    samples: dict[str, list[int]] | None = None  # doc ids scored (estimated fitness), None for every item


def worker_spec(cfg: SearchConfig) -> dict[str, Any]:
    w = cfg.workers
    return {"models": cfg.models, "base": cfg.base, "dtype": w.dtype, "cpus": w.cpus, "gpus": w.gpus,
            "batch_size": w.batch_size, "trust_remote_code": w.trust_remote_code, "backend": w.backend,
            "search": cfg.search, "seed": cfg.seed, "head": cfg.dataflow.head if cfg.dataflow else None,
            "vllm": w.vllm.model_dump(), "device_sources": w.device_sources,
            "objective": cfg.objective.model_dump(),
            "validation": cfg.validation.model_dump() if cfg.validation else None}


class Controller:
    def __init__(self, cfg: SearchConfig, run_dir: str | Path, *, address: str | None = None, resume: bool = False,
                 progress: bool = True, worker_cls: type | None = None):
        """`worker_cls` replaces workers.actor.MergeWorker (benchmarks use a fake scorer with its interface)."""
        self.cfg, self.rd, self.address, self.show = cfg, RunDir(Path(run_dir).resolve()), address, progress
        self.worker_cls = worker_cls
        if self.rd.exists() and not resume:
            raise EvomergeError(f"run directory {self.rd.path} already holds a search",
                                f"continue it with `evomerge resume {self.rd.path}`, or choose a new --run-dir")
        if resume and not self.rd.exists():
            raise EvomergeError(f"no search to resume in {self.rd.path} (no config.yaml)",
                                "check the path, or start it with `evomerge search CONFIG --run-dir DIR`")
        if resume:
            old = load_config(self.rd.config_path)
            if old.fingerprint() != cfg.fingerprint():
                raise EvomergeError(f"the config differs from the one {self.rd.path} was started with",
                                    "resume with the run's own config (only optimizer.budget may change)")

    # ---- lifecycle ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        created = not self.rd.path.exists()
        self.rd.lock()
        failed = True
        try:
            out = self._run()
            failed = False
            return out
        finally:
            self.rd.unlock()
            recorded = self.rd.ledger_path.exists() and self.rd.ledger_path.stat().st_size > 0
            if failed and created and not recorded:
                shutil.rmtree(self.rd.path, ignore_errors=True)  # refused before recording anything: no trace

    def _run(self) -> dict[str, Any]:
        self.space = preflight(self.cfg) if self.worker_cls is None else make_space(self.cfg)
        if self.show and hasattr(self.space, "reach"):
            from rich.console import Console

            lines = "\n".join(f"  {line}" for line in self.space.reach())
            Console(stderr=True).print(f"[bold]search space[/]\n{lines}", highlight=False)
        if not self.rd.exists():  # a new run: its config first (a resumed run's is rewritten below, if at all)
            self.rd.write_config(self.cfg.to_yaml())
        records = self.rd.open_ledger()
        self.evals = {r["id"]: r for r in records if r["type"] == "eval"}
        self._check_recorded_vectors()
        self.n_failed = sum(1 for r in self.evals.values() if r["fitness"] is None)
        self.validated = {r["id"] for r in records if r["type"] == "validation"}
        self.val_best = max(((r["fitness"], r["id"]) for r in records
                             if r["type"] == "validation" and r["fitness"] is not None), default=None)
        irt = [r for r in records if r["type"] == "irt"]
        if irt:
            from evomerge.irt import Estimator

            self.estimator: Any = Estimator.from_record(irt[-1])
        else:
            self.estimator = None
            self._calibrate()  # the calibration finished just before a crash
        self.opt = make_optimizer(self.cfg, self.space, self.rd.path)
        # the incumbent is full-scored: calibration rows, and estimated candidates once re-scored on every item
        from evomerge.runs import with_rescores

        full = with_rescores(records)
        self.best = max((r for r in full if r["fitness"] is not None and not r.get("raced")
                         and not r.get("estimated")), key=lambda r: r["fitness"], default=None)
        self.rescore_queue: deque[_Job] = deque()
        self._rescore_src: dict[int, dict[str, Any]] = {}
        self._rescoring: set[int] = {r["id"] for r in records if r["type"] == "rescore"}
        for r in sorted((r for r in full if r.get("estimated") and r["fitness"] is not None),
                        key=lambda r: -r["fitness"]):
            self._maybe_rescore(r)  # queued by a run that stopped before the re-score was recorded
        self.retry: deque[_Job] = deque()
        # the ledger records every ask and every tell in order: replaying them onto the freshly built optimizer
        # restores it exactly (whatever it keeps inside); what was asked and never told is redone first
        self._record_asks = has_ask_events(records) or not self.evals
        if has_ask_events(records):
            try:
                pending = replay(self.opt, records, self._tell)
            except ReplayMismatch as e:
                raise EvomergeError(f"cannot resume {self.rd.path}: {e}",
                                    "the optimizer built from this config no longer asks what the run asked (a "
                                    "changed config or evomerge version): resume with the version that started "
                                    "it, or start a new run directory") from e
            self.retry.extend(_Job("eval", a, self.space.to_recipe(a.x).to_dict()) for a in pending)
            self.evals = {i: self._slim(r) for i, r in self.evals.items()}
        elif hasattr(self.opt, "restore"):  # a ledger from before ask events: rebuilt from the evaluations
            self.opt.restore(records, self._objectives if self.cfg.objective.multi else None)
            self.evals = {i: self._slim(r) for i, r in self.evals.items()}
        del records  # (before ask events) replaying optimizers get each record again from self.evals
        self.val_queue: deque[_Job] = deque()
        if self.best is not None and self.cfg.validation and self.best["id"] not in self.validated:
            self.val_queue.append(_Job("validate", Ask(self.best["id"], None), self.best["recipe"]))
        try:
            self._start_ray()  # a refusal here (resources, a worker that cannot start) must stop Ray too
            # the config (a new budget) is written once everything that can refuse the run has passed, before the
            # first record: a refused resume leaves config.yaml as it was
            self.rd.write_config(self.cfg.to_yaml())
            self._loop()
        finally:
            self._stop_ray()
        self._give_up_if_nothing_worked(at_end=True)
        return self.summary()

    def _check_recorded_vectors(self) -> None:
        """A resumed run replays its ledger onto the same search space: refuse one whose recorded vectors have
        another length (the space's layout changed since the run started, e.g. the data-flow space of issue 28),
        rather than tell the optimizer the fitness of candidates it did not ask."""
        dim = getattr(self.space, "dim", None) if self.cfg.search != "m2n2" else None
        lengths = sorted({len(r["x"]) for r in self.evals.values() if r.get("x") is not None})
        if dim is not None and any(n != dim for n in lengths):
            raise EvomergeError(f"the ledger of {self.rd.path} holds vectors of {', '.join(map(str, lengths))} "
                                f"genes; this version's search space for its config has {dim}",
                                "the space's layout changed since the run started: start a new run directory "
                                "(or resume with the evomerge version that started it)")

    def _start_ray(self) -> None:
        import ray

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            # without --address / RAY_ADDRESS, a Ray of the search's own: never a cluster that someone else
            # started on this machine (Ray's default would join it silently)
            ray.init(address=self.address or "local", **kw)
        res = ray.cluster_resources()
        w = self.cfg.workers
        for key, want in (("CPU", w.cpus * w.count), ("GPU", w.gpus * w.count)):
            have = res.get(key, 0)
            if want > have:
                raise EvomergeError(f"the workers ask for {want:g} {key}s in all, the cluster has {have:g}",
                                    f"lower workers.count or workers.{key.lower()}s, or add nodes")
        self._spec = worker_spec(self.cfg)
        if isinstance(self.space, DataflowSpace):  # the longest path: a vLLM engine is built with that many layers
            self._spec["path_slots"] = min(self.space.max_hops or self.space.T + 1, self.space.T + 1)
        self.workers = [self._new_worker() for _ in range(w.count)]
        self.nodes: list[str | None] = [None] * w.count
        self.start_failures = [0] * w.count
        try:
            infos = ray.get([a.ready.remote() for a in self.workers])
        except Exception as e:  # noqa: BLE001 - report the worker's own error
            from evomerge.errors import environment_fix

            raise EvomergeError(f"a worker failed to start: {_cause(e)}",
                                environment_fix(e) or "see the message; rerun with --debug") from e
        self.nodes = [i.get("node") if isinstance(i, dict) else None for i in infos]

    def _new_worker(self):
        import ray

        from workers.actor import MergeWorker

        cls = self.worker_cls or MergeWorker
        env = {k: v for k, v in os.environ.items()
               if k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "EVOMERGE_TEST_FAULTS", "TOKENIZERS_PARALLELISM",
                        "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL", "EVOMERGE_THREADS")}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        w = self.cfg.workers
        if w.backend == "vllm":
            env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            if not w.gpus:  # vLLM on CPU: keep the engine inside the actor's process
                env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return ray.remote(cls).options(num_cpus=w.cpus, num_gpus=w.gpus, max_restarts=0, max_task_retries=0,
                                       runtime_env={"env_vars": env}).remote(self._spec)

    def _stop_ray(self) -> None:
        import ray

        for a in getattr(self, "workers", []):
            ray.kill(a, no_restart=True)
        if getattr(self, "_owns_ray", False):
            ray.shutdown()

    # ---- the loop ------------------------------------------------------------------------------------
    def _next_job(self) -> _Job | None:
        if self.val_queue:
            return self.val_queue.popleft()
        if self.rescore_queue:
            return self.rescore_queue.popleft()
        if self.retry:
            return self.retry.popleft()
        if self._holding_for_calibration():
            return None
        while not self.opt.stop():
            a = self.opt.ask()
            if a is None:
                return None
            if a.id in self.evals:  # replaying a ledger from before ask events
                self.opt.tell(a.id, self.evals[a.id]["fitness"], self._item_row(self.evals[a.id]))
                self.evals[a.id] = self._slim(self.evals[a.id])
                continue
            job = _Job("eval", a, self.space.to_recipe(a.x).to_dict())
            if self._record_asks:
                self.rd.append(ask_event(a), sync=False)  # made durable by the next commit's sync
            return job
        return None

    def _loop(self) -> None:
        import ray

        self.starting: dict[Any, int] = {}  # ready() of a replacement worker -> its slot
        self.retired: set[int] = set()
        self.idle = list(range(len(self.workers)))
        in_flight: dict[Any, _Job] = {}
        timeout = self.cfg.workers.timeout_s
        with _Progress(self.show, budget_of(self.cfg), len(self.evals)) as prog:
            prog.update(self)
            while True:
                while self.idle:
                    self._inflight_evals = sum(1 for j in in_flight.values() if j.kind == "eval")
                    job = self._next_job()
                    if job is None:
                        break
                    job.worker, job.started = self.idle.pop(0), time.time()
                    actor = self.workers[job.worker]
                    if job.kind == "eval":
                        job.samples = self.estimator.samples() if self.estimator is not None else None
                        extra = (job.samples,) if job.samples is not None else ()
                        ref = actor.evaluate.remote(job.ask.id, job.recipe, job.attempt, self._race_threshold(),
                                                    *extra)
                    elif job.kind == "rescore":  # every item, never raced
                        ref = actor.evaluate.remote(job.ask.id, job.recipe, job.attempt, None)
                    else:
                        ref = actor.validate.remote(job.recipe)
                    in_flight[ref] = job
                if not in_flight:
                    if self.starting and (self.retry or self.val_queue or not self.opt.stop()):
                        self._collect_started(timeout=1.0)  # work is left and only replacements can take it
                        continue
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                if ready and len(in_flight) > 1:  # take every other result that is already there too
                    ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
                done = [in_flight.pop(ref) for ref in ready]
                self._commit([self._finish(job, ref) for job, ref in zip(done, ready, strict=True)])
                self.idle += [job.worker for job in done if not self._is_starting(job.worker)]
                now = time.time()
                for ref, job in list(in_flight.items()):
                    if now - job.started > timeout:
                        in_flight.pop(ref)
                        self._replace_worker(job.worker)
                        self._commit([self._failure(job, f"timed out after {timeout:g} s (workers.timeout_s)")])
                self._collect_started(timeout=0)
                prog.update(self)

    def _is_starting(self, slot: int) -> bool:
        return slot in self.starting.values() or slot in self.retired

    def _collect_started(self, timeout: float) -> None:
        """Replacement workers that finished starting become idle; one that failed to start is replaced
        again, and its slot retired after three failures in a row."""
        import ray

        if not self.starting:
            return
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=timeout)
        for ref in ready:
            slot = self.starting.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the replacement died while starting
                self.start_failures[slot] += 1
                if self.start_failures[slot] < 3:
                    self._replace_worker(slot)
                    continue
                self.retired.add(slot)
                if len(self.retired) == len(self.workers):
                    raise EvomergeError(f"no worker could be started (the last one: {_cause(e)})",
                                        "check the workers' environment and resources, then "
                                        "`evomerge resume RUN_DIR`") from e
                continue
            self.start_failures[slot] = 0
            self.nodes[slot] = info.get("node") if isinstance(info, dict) else None
            self.idle.append(slot)

    @staticmethod
    def _node_lost(node: str | None) -> bool:
        """Whether the cluster has declared `node` dead."""
        import ray

        if node is None:
            return False
        try:
            return not any(n.get("NodeID") == node and n.get("Alive") for n in ray.nodes())
        except Exception:  # noqa: BLE001 - the GCS is unreachable: do not guess
            return False

    def _finish(self, job: _Job, ref) -> dict[str, Any] | None:
        """The ledger record for a finished job (None when the job is redone instead)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            res = ray.get(ref)
        except RayTaskError as e:
            return self._failure(job, _cause(e))
        except RayActorError as e:
            # A lost node and a crashed worker process look the same when the error arrives (the cluster
            # declares a node dead ~15 s later), so the candidate is always redone once; it fails when its
            # worker is lost again and the node of the earlier loss is still alive (a poisonous candidate).
            node = self.nodes[job.worker]
            self._replace_worker(job.worker)
            job.deaths.append(node)
            job.requeued += 1
            job.attempt = sum(1 for n in job.deaths if not self._node_lost(n))
            if job.attempt < 2:
                (self.val_queue if job.kind == "validate" else self.retry).appendleft(job)
                return None
            return self._failure(job, f"worker died twice on this candidate: {_cause(e)}")
        if job.kind == "validate":
            return {"type": "validation", "id": job.ask.id, "metrics": res["metrics"], "fitness": res["fitness"],
                    "error": None}
        if job.kind == "rescore":
            return {"type": "rescore", "id": job.ask.id, "metrics": res["metrics"], "fitness": res["fitness"],
                    "error": None, "items_scored": res.get("items_scored"), "t_wall": time.time() - job.started,
                    "time": time.time()}
        if job.samples is not None:  # scored on the anchors: estimate the full-set metrics (evomerge.irt)
            metrics = self.estimator.metrics(res["items"])
            res = {**res, "metrics": metrics, "fitness": self._weighted(metrics), "estimated": True,
                   "sampled": job.samples}
        return {"type": "eval", "id": job.ask.id, "x": _vector(job.ask.x), "recipe": job.recipe,
                "fitness": res["fitness"], "metrics": res["metrics"], "items": res["items"], "error": None,
                **({"estimated": True, "sampled": res["sampled"]} if res.get("estimated") else {}),
                **({"sampled": res.get("sampled"), "bound": res.get("bound")} if res.get("raced") else {}),
                "worker": res["worker"], "attempt": job.attempt, "requeued": job.requeued,
                "raced": res.get("raced", False), "items_scored": res.get("items_scored"),
                "t_build": res["t_build"], "t_score": res["t_score"], "t_wall": time.time() - job.started,
                "time": time.time()}

    def _failure(self, job: _Job, error: str) -> dict[str, Any]:
        if job.kind in ("validate", "rescore"):
            return {"type": "validation" if job.kind == "validate" else "rescore", "id": job.ask.id,
                    "metrics": None, "fitness": None, "error": error}
        return {"type": "eval", "id": job.ask.id, "x": _vector(job.ask.x), "recipe": job.recipe,
                "fitness": None, "metrics": None, "items": None, "error": error, "worker": None,
                "attempt": job.attempt, "requeued": job.requeued, "t_build": None, "t_score": None,
                "t_wall": time.time() - job.started,
                "time": time.time()}

    def _commit(self, records: list[dict[str, Any] | None]) -> None:
        """Append records to the ledger (one fsync for the batch), then tell the optimizer: a crash
        between the two replays the tells on resume."""
        records = [r for r in records if r is not None]
        if not records:
            return
        for rec in records:
            self.rd.append(rec, sync=False)
        self.rd.sync()
        for rec in records:
            if rec["type"] == "validation":
                self.validated.add(rec["id"])
                if rec["fitness"] is not None and (self.val_best is None or rec["fitness"] > self.val_best[0]):
                    self.val_best = (rec["fitness"], rec["id"])
                continue
            if rec["type"] == "rescore":
                src = self._rescore_src.pop(rec["id"], None)
                f = rec["fitness"]
                if src is not None and f is not None and (self.best is None or f > self.best["fitness"]):
                    self._new_best({**src, "fitness": f, "metrics": rec["metrics"], "estimated": False,
                                    "estimate": src["fitness"]})
                continue
            self._tell(rec)
            self.evals[rec["id"]] = self._slim(rec)
            self.n_failed += rec["fitness"] is None
            f = rec["fitness"]
            if rec.get("estimated"):
                self._maybe_rescore(rec)
            elif f is not None and not rec.get("raced") and (self.best is None or f > self.best["fitness"]):
                self._new_best(rec)
        self._calibrate()
        self._give_up_if_nothing_worked()

    def _new_best(self, rec: dict[str, Any]) -> None:
        self.best = rec
        if self.cfg.validation:
            self.val_queue.append(_Job("validate", Ask(rec["id"], None), rec["recipe"]))

    def _maybe_rescore(self, rec: dict[str, Any]) -> None:
        """An estimate near or above the full-scored incumbent is not trusted (estimates are noisy, and those of
        the best candidates run low): the candidate is scored again on every item, and only that score can
        make it the best."""
        f = rec["fitness"]
        margin = self.cfg.objective.estimate.rescore_margin
        if f is None or rec["id"] in self._rescoring or (self.best is not None and f <= self.best["fitness"] - margin):
            return
        self._rescoring.add(rec["id"])
        self._rescore_src[rec["id"]] = rec
        self.rescore_queue.append(_Job("rescore", Ask(rec["id"], None), rec["recipe"]))

    def _tell(self, rec: dict[str, Any]) -> None:
        """Tell the optimizer one recorded evaluation (live, or replayed on resume)."""
        if self.cfg.objective.multi:
            objs = self._objectives(rec) if rec["fitness"] is not None else None
            self.opt.tell(rec["id"], rec["fitness"], objectives=objs)
        else:
            self.opt.tell(rec["id"], rec["fitness"], self._item_row(rec))

    def _holding_for_calibration(self) -> bool:
        """With objective.estimate, exactly `calibration` evaluations score every item: once that many have
        succeeded or are in flight, new candidates wait for the fit (and then score the anchors only)."""
        spec = self.cfg.objective.estimate
        if spec is None or self.estimator is not None:
            return False
        ok = sum(1 for r in self.evals.values() if r["fitness"] is not None and not r.get("raced"))
        return ok + getattr(self, "_inflight_evals", 0) >= spec.calibration

    def _give_up_if_nothing_worked(self, at_end: bool = False) -> None:
        """Stop a search whose evaluations all fail (a broken source, task or environment): after
        max(3, workers) failures in a row from the start, or at the end, rather than burn the budget."""
        n = len(self.evals)
        if not n or self.n_failed < n:
            return
        if at_end or n >= max(3, self.cfg.workers.count):
            first = self.evals[min(self.evals)]["error"]
            raise EvomergeError(f"all {n} evaluations so far failed; the first error: {first}",
                                f"fix what the error names, then `evomerge resume {self.rd.path}`")

    def _slim(self, rec: dict[str, Any]) -> dict[str, Any]:
        """What the controller keeps of a told evaluation: enough to schedule (fitness, racing, failures),
        not its recipe, metrics or per-item scores, so memory stays flat over long runs (the ledger has
        everything; the best record is kept whole in self.best). Per-item scores stay until the
        item-response model is calibrated."""
        out = {k: rec[k] for k in ("id", "fitness", "raced", "estimated") if k in rec}
        if rec.get("error"):
            out["error"] = rec["error"][:500]
        if self.cfg.objective.estimate is not None and self.estimator is None:
            out["items"] = rec.get("items")
        return out

    def _weighted(self, metrics: dict[str, float]) -> float:
        tasks = self.cfg.objective.tasks
        return sum(t.weight * metrics[t.name] for t in tasks) / sum(t.weight for t in tasks)

    def _calibrate(self) -> None:
        """Once `calibration` evaluations have scored every item, fit the item-response model and record it
        in the ledger (so a resumed search estimates with the very same model)."""
        spec = self.cfg.objective.estimate
        if spec is None or self.estimator is not None:
            return
        full = {i: r["items"] for i, r in sorted(self.evals.items())
                if r["fitness"] is not None and not r.get("estimated") and not r.get("raced")}
        if len(full) < spec.calibration:
            return
        from evomerge.irt import Estimator

        rows = dict(list(full.items())[:spec.calibration])
        self.estimator = Estimator.calibrate(rows, [t.name for t in self.cfg.objective.tasks], spec.items)
        self.rd.append(self.estimator.to_record())

    def _race_threshold(self) -> float | None:
        """The k-th best full (not raced) fitness so far, when racing is on and k evaluations are complete."""
        racing = self.cfg.objective.racing
        if racing is None:
            return None
        full = sorted((r["fitness"] for r in self.evals.values() if r["fitness"] is not None
                       and not r.get("raced")), reverse=True)
        return full[racing.top_k - 1] if len(full) >= racing.top_k else None

    def _objectives(self, rec: dict[str, Any]) -> list[float]:
        return [float(rec["metrics"][t.name]) for t in self.cfg.objective.tasks]

    def _item_row(self, rec: dict[str, Any]) -> list[float] | None:
        """The record's per-item scores as one row, tasks in objective order (what M2N2 competes on). Each
        task's items are scaled so that the task holds its objective weight's share of the row (a task with
        many items does not drown one with few): the row's mean is the weighted objective."""
        if rec.get("items") is None:
            return None
        tasks = self.cfg.objective.tasks
        n = {t.name: len(rec["items"][t.name]) for t in tasks}
        total, wsum = sum(n.values()), sum(t.weight for t in tasks)
        return [float(v) * t.weight * total / (n[t.name] * wsum) for t in tasks for v in rec["items"][t.name]]

    def _replace_worker(self, i: int) -> None:
        """Kill slot i's worker and start another (anywhere the cluster has room); it takes work once ready."""
        import ray

        try:
            ray.kill(self.workers[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        self.workers[i] = self._new_worker()
        self.nodes[i] = None
        self.starting[self.workers[i].ready.remote()] = i

    def summary(self) -> dict[str, Any]:
        from evomerge.runs import status

        return status(self.rd.path)


def _vector(x: Any) -> list[float] | None:
    """The candidate's vector for the ledger (None for members that are not vectors: M2N2's recipe form,
    whose record's recipe holds it)."""
    try:
        return [float(v) for v in x]
    except TypeError:
        return None


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = f"{type(cause).__name__}: {cause}"
    return text.strip().splitlines()[0][:500] if text.strip() else type(cause).__name__


class _Progress:
    """A rich progress bar with the best fitness so far (silent when disabled)."""

    def __init__(self, enabled: bool, budget: int, done: int):
        self.enabled, self.budget, self.done = enabled, budget, done

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("[bold]search[/]"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)
            self.p.__enter__()
            self.task = self.p.add_task("", total=self.budget, completed=self.done)
        return self

    def update(self, ctl: Controller) -> None:
        if not self.enabled:
            return
        self.p.update(self.task, completed=len(ctl.evals), description=self.describe(ctl))

    @staticmethod
    def describe(ctl: Controller) -> str:
        """The search fitness of the best so far and, with a validation objective, the best validated score
        (the one `export` picks by): an estimated or raced fitness can run ahead of what validates."""
        best = ctl.best["fitness"] if ctl.best else math.nan
        text = f"best {best:.4f}"
        if ctl.cfg.validation:
            vb = getattr(ctl, "val_best", None)
            text += f"  validated {vb[0]:.4f} (#{vb[1]})" if vb else "  validated -"
        return f"{text}  failures {ctl.n_failed}"

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
