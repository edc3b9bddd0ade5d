"""The optimizer protocol: ask for candidates, tell their fitness (higher is better).

    opt = CMAES(dim=6, x0=[0.5] * 6, sigma0=1 / 6, lower=[0] * 6, upper=[1] * 6, seed=0)
    while not opt.stop():
        a = opt.ask()            # None: nothing can be handed out until pending candidates are told
        ...                      # evaluate a.x somewhere
        opt.tell(a.id, fitness)  # or opt.tell(a.id, None) for a failed candidate (the optimizer penalises it)
                                 # M2N2 also takes the per-item scores: opt.tell(a.id, fitness, items)

State is replayable: an optimizer built with the same settings and told the same (id, fitness) pairs in
the same order asks the same candidates, so a run's ledger is enough to rebuild it on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


def failure_value(ok: list[float], penalty: float) -> float:
    """What a failed candidate is told, by every optimizer that ranks values: the worst successful value
    (`ok`) minus their spread, so it ranks below every success without distorting the scale; `penalty`
    when nothing has succeeded. (M2N2, which competes per item, scores a failure 0 on every item.)"""
    if not ok:
        return penalty
    return min(ok) - (max(ok) - min(ok)) - 1e-9


@dataclass(frozen=True)
class Ask:
    id: int
    x: np.ndarray


class Optimizer(Protocol):
    dim: int

    def ask(self) -> Ask | None: ...

    def tell(self, ask_id: int, fitness: float | None, items: Any = None) -> None:
        """`items`: the candidate's per-item scores, for optimizers that use them (M2N2); others ignore them."""
        ...

    def stop(self) -> dict[str, Any]: ...

    def best(self) -> tuple[np.ndarray, float] | None: ...

    def settings(self) -> dict[str, Any]: ...
