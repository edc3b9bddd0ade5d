"""The search's progress bar: evaluations against the budget, the best search fitness and, with a validation
objective, the best validated score (the one `export` picks by) next to it."""

from __future__ import annotations

import math
from typing import Any


class Progress:
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

    def update(self, ctl: Any) -> None:
        if not self.enabled:
            return
        self.p.update(self.task, completed=len(ctl.evals), description=self.describe(ctl))

    @staticmethod
    def describe(ctl: Any) -> str:
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
