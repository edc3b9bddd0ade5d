"""The one user-facing error type: what is wrong, and how to fix it."""

from __future__ import annotations


class EvomergeError(Exception):
    """A problem with the user's input (config, path, model, recipe, checkpoint).

    The CLI prints it as one message with its fix and exits non-zero, without a traceback
    unless `--debug` is given.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
