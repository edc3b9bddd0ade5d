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

import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.check import preflight
from evomerge.run.config import SearchConfig, load_config
from evomerge.run.pool import WorkerPool, cause
from evomerge.run.progress import Progress
from evomerge.run.records import budget_of, with_rescores
from evomerge.run.rundir import BUDGET_KEYS, RunDir
from evomerge.run.spaces import make_optimizer, make_policy, make_space
from evomerge.search.fitness.policy import Request, is_full
from evomerge.search.optimizers import Ask
from evomerge.search.optimizers.replay import ReplayMismatch, ask_event, has_ask_events, replay


@dataclass
class _Job:
    kind: str  # eval | validate | rescore (an estimated candidate scored again on every item)
    ask: Ask
    recipe: dict[str, Any]
    attempt: int = 0  # workers lost on this candidate on nodes still alive (a second one fails it)
    requeued: int = 0  # times it was redone because its worker or node was lost
    deaths: list[str | None] = field(default_factory=list)  # nodes of the workers lost on it
    worker: int = -1
    started: float = field(default_factory=time.time)
    request: Request = field(default_factory=Request)  # what the worker scores it on (the fitness policy's)


class Controller:
    def __init__(self, cfg: SearchConfig, run_dir: str | Path, *, address: str | None = None, resume: bool = False,
                 progress: bool = True, worker_cls: type | None = None, on_start=None):
        """`worker_cls` replaces workers.actor.MergeWorker (benchmarks use a fake scorer with its interface);
        `on_start` is called once everything that can refuse the run has passed (a hybrid writes its top-level
        config then)."""
        self.cfg, self.rd, self.address, self.show = cfg, RunDir(Path(run_dir).resolve()), address, progress
        self.worker_cls, self.on_start = worker_cls, on_start
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
        self.policy = make_policy(self.cfg)
        self.policy.restore(records)
        for rec in self.policy.after(self.evals):  # e.g. a calibration that finished just before a crash
            self.rd.append(rec)
        self.opt = make_optimizer(self.cfg, self.space, self.rd.path)
        # the incumbent is full-scored: a policy's cheaper fitness (raced, estimated) never chooses the best
        full = with_rescores(records)
        self.best = max((r for r in full if is_full(r)), key=lambda r: r["fitness"], default=None)
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
        self.pool = WorkerPool(self.cfg, self.address, self.worker_cls, self.space)
        try:
            self.idle = self.pool.start()  # a refusal here (resources, a worker that cannot start) stops Ray too
            # the config (a new budget) is written once everything that can refuse the run has passed, before the
            # first record: a refused resume leaves config.yaml as it was. Any other change (accepted by
            # `resume --accept-edits`: where and how fast it runs) is recorded in the ledger first
            text = self.cfg.to_yaml()
            edits = [e for e in self.rd.config_edits(text) if e.split(":", 1)[0] not in BUDGET_KEYS]
            if edits:
                self.rd.append({"type": "config_edit", "changes": edits, "time": time.time()})
            self.rd.write_config(text)
            if self.on_start is not None:
                self.on_start()
            self._loop()
        finally:
            self.pool.stop()
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

    # ---- the loop ------------------------------------------------------------------------------------
    def _next_job(self, in_flight_evals: int) -> _Job | None:
        if self.val_queue:
            return self.val_queue.popleft()
        if self.rescore_queue:
            return self.rescore_queue.popleft()
        if self.retry:
            return self.retry.popleft()
        if self.policy.holding(self.evals, in_flight_evals):
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

    def _dispatch(self, job: _Job):
        """Hand a job to its worker: a candidate on what the fitness policy asks for, a re-score and a validation
        on every item."""
        actor = self.pool.workers[job.worker]
        if job.kind == "eval":
            job.request = self.policy.request(self.evals)
            extra = (job.request.samples,) if job.request.samples is not None else ()
            return actor.evaluate.remote(job.ask.id, job.recipe, job.attempt, job.request.threshold, *extra)
        if job.kind == "rescore":  # every item, never raced
            return actor.evaluate.remote(job.ask.id, job.recipe, job.attempt, None)
        return actor.validate.remote(job.recipe)

    def _loop(self) -> None:
        import ray

        in_flight: dict[Any, _Job] = {}
        timeout = self.cfg.workers.timeout_s
        with Progress(self.show, budget_of(self.cfg), len(self.evals)) as prog:
            prog.update(self)
            while True:
                while self.idle:
                    job = self._next_job(sum(1 for j in in_flight.values() if j.kind == "eval"))
                    if job is None:
                        break
                    job.worker, job.started = self.idle.pop(0), time.time()
                    in_flight[self._dispatch(job)] = job
                if not in_flight:
                    if self.pool.starting and (self.retry or self.val_queue or not self.opt.stop()):
                        self.idle += self.pool.collect_started(timeout=1.0)  # only replacements can take the work
                        continue
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                if ready and len(in_flight) > 1:  # take every other result that is already there too
                    ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
                done = [in_flight.pop(ref) for ref in ready]
                self._commit([self._finish(job, ref) for job, ref in zip(done, ready, strict=True)])
                self.idle += [job.worker for job in done if not self.pool.busy_starting(job.worker)]
                now = time.time()
                for ref, job in list(in_flight.items()):
                    if now - job.started > timeout:
                        in_flight.pop(ref)
                        self.pool.replace(job.worker)
                        self._commit([self._failure(job, f"timed out after {timeout:g} s (workers.timeout_s)")])
                self.idle += self.pool.collect_started(timeout=0)
                prog.update(self)

    def _finish(self, job: _Job, ref) -> dict[str, Any] | None:
        """The ledger record for a finished job (None when the job is redone instead)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            res = ray.get(ref)
        except RayTaskError as e:
            return self._failure(job, cause(e))
        except RayActorError as e:
            # A lost node and a crashed worker process look the same when the error arrives (the cluster
            # declares a node dead ~15 s later), so the candidate is always redone once; it fails when its
            # worker is lost again and the node of the earlier loss is still alive (a poisonous candidate).
            node = self.pool.nodes[job.worker]
            self.pool.replace(job.worker)
            job.deaths.append(node)
            job.requeued += 1
            job.attempt = sum(1 for n in job.deaths if not self.pool.node_lost(n))
            if job.attempt < 2:
                (self.val_queue if job.kind == "validate" else self.retry).appendleft(job)
                return None
            return self._failure(job, f"worker died twice on this candidate: {cause(e)}")
        if job.kind == "validate":
            return {"type": "validation", "id": job.ask.id, "metrics": res["metrics"], "fitness": res["fitness"],
                    "error": None}
        if job.kind == "rescore":
            return {"type": "rescore", "id": job.ask.id, "metrics": res["metrics"], "fitness": res["fitness"],
                    "error": None, "items_scored": res.get("items_scored"), "t_wall": time.time() - job.started,
                    "time": time.time()}
        res = self.policy.result(res, job.request)
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
            self._maybe_rescore(rec)
            if is_full(rec) and (self.best is None or rec["fitness"] > self.best["fitness"]):
                self._new_best(rec)
        for rec in self.policy.after(self.evals):
            self.rd.append(rec)
        self._give_up_if_nothing_worked()

    def _new_best(self, rec: dict[str, Any]) -> None:
        self.best = rec
        if self.cfg.validation:
            self.val_queue.append(_Job("validate", Ask(rec["id"], None), rec["recipe"]))

    def _maybe_rescore(self, rec: dict[str, Any]) -> None:
        """A candidate the fitness policy does not trust near the top (an estimate near or above the full-scored
        incumbent) is scored again on every item; only that score can make it the best."""
        if rec["id"] in self._rescoring or not self.policy.wants_full_score(rec, self.best):
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
        everything; the best record is kept whole in self.best). Per-item scores stay while the fitness policy
        needs them (until the item-response model is calibrated)."""
        out = {k: rec[k] for k in ("id", "fitness", "raced", "estimated") if k in rec}
        if rec.get("error"):
            out["error"] = rec["error"][:500]
        if self.policy.keeps_items():
            out["items"] = rec.get("items")
        return out

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

    def summary(self) -> dict[str, Any]:
        from evomerge.run.status import status

        return status(self.rd.path)


def _vector(x: Any) -> list[float] | None:
    """The candidate's vector for the ledger (None for members that are not vectors: M2N2's recipe form,
    whose record's recipe holds it)."""
    try:
        return [float(v) for v in x]
    except TypeError:
        return None
