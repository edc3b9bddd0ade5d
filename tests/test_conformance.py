"""One conformance suite over every optimizer (as Optuna runs one suite over all its samplers).

Each optimizer is driven by a simulated asynchronous pool of workers on a synthetic objective with a
broken region (candidates there fail), writing `ask` and `eval` events to a ledger file exactly as the
controller does. The suite checks, for every optimizer:

- seeded determinism: two runs with the same seed write the same ledger, byte for byte;
- bounds: every candidate lies inside the box;
- failures alike: a failed candidate is told as the documented failure value (`failure_value`; M2N2: zero
  on every item), so telling None and telling that value lead to the same run; a failure is never the best;
- exact resume: a run killed with SIGKILL at >= 10 points (each resumed by replaying its own ledger) ends
  with the same ledger as a run never interrupted; no optimizer state is pickled;
- multi-objective: works, or is refused when the optimizer is built.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib
from pathlib import Path

import cma  # noqa: F401 - imported once here, not in every forked child
import numpy as np
import optuna  # noqa: F401
import pytest

from evomerge.search.optimizers import CMAES, M2N2, OptunaOptimizer
from evomerge.search.optimizers.protocol import failure_value
from evomerge.search.optimizers.replay import ReplayMismatch, ask_event, replay

DIM, LO, HI, WORKERS = 3, [0.0, -1.0, 0.0], [1.0, 1.0, 2.0], 3
ITEMS = np.random.default_rng(123).uniform(-1, 1, size=(12, DIM))  # M2N2's per-item view of the objective


def _budget(kind: str) -> int:
    return 16 if kind == "optuna-gp" else 30  # GP: 10 random trials, then a Gaussian-process fit per ask


def make(kind: str, seed: int = 0):
    x0 = [0.5, 0.0, 1.0]
    n = _budget(kind)
    if kind == "pycma":
        return CMAES(DIM, x0, 0.3, LO, HI, seed=seed, popsize=5, max_evals=n)
    if kind == "pycma-sep":
        return CMAES(DIM, x0, 0.3, LO, HI, seed=seed, popsize=5, max_evals=n, diagonal=True)
    if kind == "pycma-async":  # told the first popsize results that arrive, whatever batch they were asked in
        return CMAES(DIM, x0, 0.3, LO, HI, seed=seed, popsize=5, max_evals=n, asynchronous=True)
    if kind == "pycma-ipop":  # coarse plateaus (STEPS) stop pycma (tolflatfitness) early: restarts happen
        return CMAES(DIM, [0.85, 0.0, 1.0], 0.3, LO, HI, seed=seed, popsize=4, max_evals=n, restarts=2)
    if kind.startswith("optuna-"):
        return OptunaOptimizer(DIM, x0, LO, HI, sampler=kind.split("-", 1)[1], seed=seed, max_evals=n,
                               popsize=6 if kind == "optuna-nsga2" else None)
    if kind == "m2n2":
        seeds = [np.array(x0), np.array([0.1, 0.5, 0.2]), np.array([0.9, -0.5, 1.8])]
        return M2N2(seeds, archive_size=4, seed=seed, max_evals=n, lag=WORKERS, mutation_std=0.05)
    raise ValueError(kind)


STEPS = {"pycma-ipop": 2}  # fitness plateaus per kind (default 20)
KINDS = ["pycma", "pycma-sep", "pycma-ipop", "pycma-async", "optuna-cmaes", "optuna-tpe", "optuna-gp", "optuna-random",
         "optuna-nsga2", "m2n2"]


def evaluate(x, steps: int = 20) -> tuple[float | None, list[float]]:
    """Fitness (None: failed, in the broken region x[0] > 0.7 or x[1] < -0.6; rounded to 1/steps) and the
    per-item scores M2N2 competes on."""
    x = np.asarray(x, dtype=float)
    if x[0] > 0.7 or x[1] < -0.6:
        return None, [0.0] * len(ITEMS)
    items = [float(v) for v in 1.0 / (1.0 + (ITEMS @ x - 0.4) ** 2)]
    fitness = float(np.mean(items)) - 0.1 * float(np.sum((x - [0.3, 0.2, 0.7]) ** 2))
    return round(fitness * steps) / steps, items  # plateaus, as accuracies on few items have (and pycma restarts)


def tell(opt, rec: dict) -> None:
    if isinstance(opt, M2N2):
        opt.tell(rec["id"], rec["fitness"], rec["items"] if rec["fitness"] is not None else None)
    else:
        opt.tell(rec["id"], rec["fitness"])


def drive(opt, ledger: Path, kill_after: int | None = None, fail_as_value: bool = False, steps: int = 20) -> None:
    """Run (or resume, replaying `ledger`) a search with WORKERS candidates in flight; which one finishes
    next is a function of how many have finished, so an uninterrupted run is reproducible. With
    `kill_after`, SIGKILL this process after that many more ledger writes."""
    records = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
    in_flight = replay(opt, records, lambda r: tell(opt, r))
    done = sum(1 for r in records if r["type"] == "eval")
    successes = [r["fitness"] for r in records if r["type"] == "eval" and r["fitness"] is not None]
    writes = 0
    with open(ledger, "a") as f:
        def write(rec):
            nonlocal writes
            f.write(json.dumps(rec) + "\n")
            f.flush()
            writes += 1
            if kill_after is not None and writes >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        while True:
            while len(in_flight) < WORKERS and not opt.stop() and (a := opt.ask()) is not None:
                write(ask_event(a))
                in_flight.append(a)
            if not in_flight:
                return
            a = in_flight.pop(zlib.crc32(str(done).encode()) % len(in_flight))
            x = a.x if not isinstance(a.x, dict) else None
            fit, items = evaluate(a.x, steps)
            rec = {"type": "eval", "id": int(a.id), "x": None if x is None else [float(v) for v in x],
                   "fitness": fit, "items": items}
            write(rec)
            if fit is None and fail_as_value:  # tell the failure value explicitly instead of None
                if isinstance(opt, M2N2):
                    opt.tell(a.id, 0.0, [0.0] * len(ITEMS))
                else:
                    opt.tell(a.id, _failure_value_for(opt, successes, steps))
            else:
                tell(opt, rec)
            if fit is not None:
                successes.append(fit)
            done += 1


def _failure_value_for(opt, successes: list[float], steps: int) -> float:
    """The documented failure value, computed from outside: pycma's is the worst success of the candidate's
    generation minus the generation's spread (so it is known once the generation is evaluated); Optuna's and
    asynchronous pycma's the worst success told so far minus their spread."""
    if isinstance(opt, CMAES) and not opt.asynchronous:
        gen = [evaluate(x, steps)[0] for x in opt._gen]
        return failure_value([f for f in gen if f is not None], opt.penalty)
    return failure_value(successes, opt.penalty)


def run_in_child(kind: str, ledger: Path, kill_after: int | None = None, **kw) -> int:
    """Run `drive` in a forked child (torch-using samplers stay out of the parent); its exit signal."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        if "torch" in sys.modules:  # one thread: an OpenMP pool the parent started does not survive a fork
            sys.modules["torch"].set_num_threads(1)
        try:
            drive(make(kind), ledger, kill_after, steps=STEPS.get(kind, 20), **kw)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, f"{kind}: the driven run raised (see stderr)"
    return 0


@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_conformance(kind, tmp_path):
    ref, again = tmp_path / "ref.jsonl", tmp_path / "again.jsonl"
    run_in_child(kind, ref)
    run_in_child(kind, again)
    lines = ref.read_text().splitlines()
    assert again.read_text() == ref.read_text(), "the same seed must give the same run"
    recs = [json.loads(line) for line in lines]
    evals = [r for r in recs if r["type"] == "eval"]
    assert len(evals) == _budget(kind) and sorted(r["id"] for r in evals) == list(range(len(evals)))
    xs = np.array([r["x"] for r in evals])
    assert np.all(xs >= np.array(LO) - 1e-12) and np.all(xs <= np.array(HI) + 1e-12), "out of bounds"
    assert any(r["fitness"] is None for r in evals), "the test objective's broken region was never met"

    # failures alike: telling None == telling the documented failure value
    explicit = tmp_path / "explicit.jsonl"
    run_in_child(kind, explicit, fail_as_value=True)
    assert explicit.read_text() == ref.read_text()

    # SIGKILL at >= 10 points spread over the run, each resumed from the ledger it left
    killed = tmp_path / "killed.jsonl"
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    points = sorted(rng.choice(np.arange(1, len(lines)), size=10, replace=False))
    prev = 0
    for p in points:
        assert run_in_child(kind, killed, kill_after=int(p - prev)) == -signal.SIGKILL
        assert len(killed.read_text().splitlines()) == p
        prev = p
    assert run_in_child(kind, killed) == 0
    assert killed.read_text() == ref.read_text(), "a resumed run must ask exactly what an uninterrupted one asks"


@pytest.mark.parametrize("kind", KINDS)
def test_a_failure_is_never_the_best(kind):
    opt = make(kind)
    failed = set()
    while not opt.stop() and (a := opt.ask()) is not None:
        fit, items = evaluate(a.x, STEPS.get(kind, 20))
        if fit is None:
            failed.add(a.id)
        tell(opt, {"id": a.id, "fitness": fit, "items": items})
    assert failed
    best = opt.best()
    assert best is not None and evaluate(best[0])[0] is not None


def test_replay_refuses_a_ledger_the_optimizer_would_not_ask(tmp_path):
    ledger = tmp_path / "l.jsonl"
    run_in_child("pycma", ledger)
    recs = [json.loads(line) for line in ledger.read_text().splitlines()]
    first_ask = next(r for r in recs if r["type"] == "ask")
    first_ask["x"][0] += 1e-9  # not what this optimizer hands out
    with pytest.raises(ReplayMismatch, match="differs from the ledger"):
        replay(make("pycma"), recs, lambda r: None)
    with pytest.raises(ReplayMismatch, match="asked candidate"):
        replay(make("pycma", seed=1), recs[1:], lambda r: None)


@pytest.mark.parametrize("sampler", ["cmaes", "tpe", "gp", "random", "nsga2"])
def test_multi_objective_works_or_is_refused(sampler):
    from evomerge.search.optimizers.optuna_opt import MULTI_OBJECTIVE

    if sampler not in MULTI_OBJECTIVE:
        with pytest.raises(ValueError, match="optimises one objective"):
            OptunaOptimizer(DIM, [0.5, 0.0, 1.0], LO, HI, sampler=sampler, objectives=2, max_evals=6)
        return
    opt = OptunaOptimizer(DIM, [0.5, 0.0, 1.0], LO, HI, sampler=sampler, objectives=2, max_evals=12, seed=0)
    while (a := opt.ask()) is not None:
        fit, _ = evaluate(a.x)
        opt.tell(a.id, fit, objectives=None if fit is None else [fit, -float(a.x[1])])
    assert opt.stop() and all(t.state.name == "COMPLETE" for t in opt.study.trials)
