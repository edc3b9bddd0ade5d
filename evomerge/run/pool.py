"""The controller's workers: long-lived Ray actors (`workers.actor.MergeWorker`), one per slot, started, replaced
when they die or time out, and retired when they cannot start.

A replacement starts wherever the cluster has room and takes work once ready; a slot whose worker fails to start
three times in a row is retired, and the search stops with an error only when no slot is left. Ray is started
here when the caller has not (`address` or "local": never a cluster that someone else started on this machine).
"""

from __future__ import annotations

import os
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.config import SearchConfig
from evomerge.search.dfs_space import DataflowSpace

# what a worker process inherits from the controller's environment
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "EVOMERGE_TEST_FAULTS", "TOKENIZERS_PARALLELISM",
               "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL", "EVOMERGE_THREADS")


def worker_spec(cfg: SearchConfig, space: Any = None) -> dict[str, Any]:
    """Everything a worker needs to build and score candidates (plain data: it crosses to the worker process).
    For a data-flow space, `path_slots`: the longest path, the layers a vLLM engine is built with."""
    w = cfg.workers
    spec = {"models": cfg.models, "base": cfg.base, "dtype": w.dtype, "cpus": w.cpus, "gpus": w.gpus,
            "batch_size": w.batch_size, "trust_remote_code": w.trust_remote_code, "backend": w.backend,
            "search": cfg.search, "seed": cfg.seed, "head": cfg.dataflow.head if cfg.dataflow else None,
            "vllm": w.vllm.model_dump(), "device_sources": w.device_sources,
            "objective": cfg.objective.model_dump(),
            "validation": cfg.validation.model_dump() if cfg.validation else None}
    if isinstance(space, DataflowSpace):
        spec["path_slots"] = min(space.max_hops or space.T + 1, space.T + 1)
    return spec


def cause(e: BaseException) -> str:
    """The first line of the error a worker raised (Ray wraps it)."""
    inner = getattr(e, "cause", None) or e
    text = f"{type(inner).__name__}: {inner}"
    return text.strip().splitlines()[0][:500] if text.strip() else type(inner).__name__


class WorkerPool:
    def __init__(self, cfg: SearchConfig, address: str | None = None, worker_cls: type | None = None,
                 space: Any = None):
        """`worker_cls` replaces workers.actor.MergeWorker (benchmarks use a fake scorer with its interface);
        `space`: the search space (a data-flow space sizes the workers' vLLM engines)."""
        self.cfg, self.address, self.worker_cls, self.space = cfg, address, worker_cls, space
        self.workers: list[Any] = []
        self.nodes: list[str | None] = []
        self.starting: dict[Any, int] = {}  # ready() of a replacement worker -> its slot
        self.retired: set[int] = set()
        self._owns_ray = False

    def start(self) -> list[int]:
        """Start Ray (unless running) and every worker; wait until all are ready. Returns the idle slots."""
        import ray

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=False)
        res = ray.cluster_resources()
        w = self.cfg.workers
        for key, want in (("CPU", w.cpus * w.count), ("GPU", w.gpus * w.count)):
            have = res.get(key, 0)
            if want > have:
                raise EvomergeError(f"the workers ask for {want:g} {key}s in all, the cluster has {have:g}",
                                    f"lower workers.count or workers.{key.lower()}s, or add nodes")
        self._spec = worker_spec(self.cfg, self.space)
        self.workers = [self._new_worker() for _ in range(w.count)]
        self.nodes = [None] * w.count
        self.start_failures = [0] * w.count
        try:
            infos = ray.get([a.ready.remote() for a in self.workers])
        except Exception as e:  # noqa: BLE001 - report the worker's own error
            from evomerge.errors import environment_fix

            raise EvomergeError(f"a worker failed to start: {cause(e)}",
                                environment_fix(e) or "see the message; rerun with --debug") from e
        self.nodes = [i.get("node") if isinstance(i, dict) else None for i in infos]
        return list(range(w.count))

    def _new_worker(self):
        import ray

        from workers.actor import MergeWorker

        env = {k: v for k, v in os.environ.items() if k in _PASSED_ENV}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        w = self.cfg.workers
        if w.backend == "vllm":
            env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            if not w.gpus:  # vLLM on CPU: keep the engine inside the actor's process
                env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return ray.remote(self.worker_cls or MergeWorker).options(
            num_cpus=w.cpus, num_gpus=w.gpus, max_restarts=0, max_task_retries=0,
            runtime_env={"env_vars": env}).remote(self._spec)

    def stop(self) -> None:
        import ray

        for a in self.workers:
            ray.kill(a, no_restart=True)
        if self._owns_ray:
            ray.shutdown()

    def busy_starting(self, slot: int) -> bool:
        """Whether the slot's worker is a replacement still starting (or the slot is retired)."""
        return slot in self.starting.values() or slot in self.retired

    def replace(self, slot: int) -> None:
        """Kill the slot's worker and start another (anywhere the cluster has room); it takes work once ready."""
        import ray

        try:
            ray.kill(self.workers[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        self.workers[slot] = self._new_worker()
        self.nodes[slot] = None
        self.starting[self.workers[slot].ready.remote()] = slot

    def collect_started(self, timeout: float) -> list[int]:
        """Replacement workers that finished starting (their slots, now idle); one that failed to start is
        replaced again, and its slot retired after three failures in a row."""
        import ray

        if not self.starting:
            return []
        idle = []
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=timeout)
        for ref in ready:
            slot = self.starting.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the replacement died while starting
                self.start_failures[slot] += 1
                if self.start_failures[slot] < 3:
                    self.replace(slot)
                    continue
                self.retired.add(slot)
                if len(self.retired) == len(self.workers):
                    raise EvomergeError(f"no worker could be started (the last one: {cause(e)})",
                                        "check the workers' environment and resources, then "
                                        "`evomerge resume RUN_DIR`") from e
                continue
            self.start_failures[slot] = 0
            self.nodes[slot] = info.get("node") if isinstance(info, dict) else None
            idle.append(slot)
        return idle

    @staticmethod
    def node_lost(node: str | None) -> bool:
        """Whether the cluster has declared `node` dead."""
        import ray

        if node is None:
            return False
        try:
            return not any(n.get("NodeID") == node and n.get("Alive") for n in ray.nodes())
        except Exception:  # noqa: BLE001 - the GCS is unreachable: do not guess
            return False
