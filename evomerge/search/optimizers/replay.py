"""Exact resume for any ask/tell optimizer: replay the run's events in the order they happened.

The controller records an `ask` event each time the optimizer hands a candidate out and an `eval` event
each time one is told (both in the run's ledger, in order). A seeded optimizer built again with the same
settings and driven through the same sequence of asks and tells is in exactly the state the interrupted
one was in, whatever the optimizer keeps internally (pycma's strategy, an Optuna sampler's trials and
random state, M2N2's archive), so the resumed run goes on to ask what the uninterrupted run would have
asked; no optimizer state is ever pickled. Candidates asked and never told (in flight when the run died)
come back from `replay` to be evaluated again, ahead of anything new.

    pending = replay(opt, records, tell=lambda r: opt.tell(r["id"], r["fitness"]))

A replayed ask must hand out the candidate the ledger recorded (same id, same vector, bit for bit); if it
does not (another optimizer version, a changed config), `ReplayMismatch` says where.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from evomerge.search.optimizers.protocol import Ask


class ReplayMismatch(ValueError):
    """The optimizer built from the run's settings does not ask what the ledger recorded."""


def ask_event(a: Ask) -> dict[str, Any]:
    """The ledger record of one ask: its id, and its vector where the candidate is one."""
    try:
        x = [float(v) for v in a.x]
    except TypeError:  # M2N2 members in recipe form: the id and the seed fix them
        x = None
    return {"type": "ask", "id": int(a.id), "x": x}


def has_ask_events(records: Iterable[dict[str, Any]]) -> bool:
    return any(r.get("type") == "ask" for r in records)


def replay(opt: Any, records: Iterable[dict[str, Any]], tell: Callable[[dict[str, Any]], None]) -> list[Ask]:
    """Drive `opt` through the recorded asks and tells (`tell(record)` tells one `eval` record); returns
    the asks that were never told, in the order they were asked."""
    open_: dict[int, Ask] = {}
    for n, r in enumerate(records):
        kind = r.get("type")
        if kind == "ask":
            a = opt.ask()
            if a is None or a.id != r["id"]:
                raise ReplayMismatch(f"record {n + 1}: the ledger asked candidate {r['id']}, the optimizer "
                                     f"{'nothing' if a is None else a.id}")
            if r.get("x") is not None:
                got, want = np.asarray(a.x, dtype=float), np.asarray(r["x"], dtype=float)
                if got.shape != want.shape or not np.array_equal(got, want):
                    gap = np.max(np.abs(got - want)) if got.shape == want.shape else float("nan")
                    raise ReplayMismatch(f"record {n + 1}: candidate {r['id']} differs from the ledger's "
                                         f"(shape {got.shape} vs {want.shape}, max |difference| {gap:.3g})")
            open_[a.id] = a
        elif kind == "eval":
            if r["id"] not in open_:
                raise ReplayMismatch(f"record {n + 1}: candidate {r['id']} is told but was never asked "
                                     f"(or was told twice)")
            del open_[r["id"]]
            tell(r)
    return list(open_.values())
