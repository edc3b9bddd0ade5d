"""`evomerge zoo ...`: build the tiny expert zoo. Imports torch/transformers only inside commands."""

from __future__ import annotations

from pathlib import Path

import typer

from evomerge.errors import EvomergeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The tiny expert zoo: a base and skill experts on which merging measurably helps.")


@app.callback()
def _zoo() -> None:
    """Keeps `build` a sub-command (a Typer app with one command would otherwise collapse into it)."""


@app.command()
def build(out: Path = typer.Argument(..., help="directory to build the zoo in (must be new or empty)"),
          size: str = typer.Option("micro", help="micro (~25 s), small (~35-90 s), deep (4 experts, 6 layers, "
                                                 "~5 min), real (SmolLM2-135M, 2 experts, ~20+ min) or real3 "
                                                 "(SmolLM2-135M, 3 experts, 500 test items, generation tasks)"),
          seed: int = typer.Option(0, help="same seed => identical weights"),
          threads: int = typer.Option(1, help="torch CPU threads (part of what makes a build reproducible)")) -> None:
    """Train a base and one expert per skill, write lm-eval tasks and zoo.json, print their scores."""
    import os

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from evomerge.zoo.sizes import SIZES

    if size in ("real", "real3"):
        return _build_real(out, seed, threads, size)
    if size not in SIZES:
        import difflib

        sizes = [*SIZES, "real", "real3"]
        hint = difflib.get_close_matches(size, sizes, n=1)
        raise EvomergeError(f"--size '{size}' is not a zoo size" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                            f"choose one of {', '.join(sizes)}")
    if out.exists() and any(out.iterdir()):
        raise EvomergeError(f"{out} already exists and is not empty", "give a new directory or remove it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from evomerge.zoo.build import build_zoo

    con = Console()
    columns = (TextColumn("[bold]training[/] {task.description:>8s}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn())
    with Progress(*columns, console=con, transient=True) as prog:
        bars: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = prog.add_task(phase, total=total)
            prog.update(bars[phase], completed=done)

        manifest = build_zoo(out, size, seed, threads=threads, progress=progress)

    scores = manifest["scores"]["models"]
    tasks = list(next(iter(scores.values())))
    table = Table(title=f"zoo {size} (seed {seed}): exact match on the test split")
    table.add_column("model")
    for t in tasks:
        table.add_column(f"{t} (n={manifest['tasks'][t]['counts']['test']})", justify="right")
    for name, row in scores.items():
        table.add_row(name, *(f"{row[t]:.3f}" for t in tasks))
    con.print(table)
    con.print(f"[green]built[/] {out} in {manifest['build_seconds']:.1f} s")


def _build_real(out: Path, seed: int, threads: int, size: str = "real") -> None:
    """`--size real` / `--size real3`: SmolLM2-135M as the base and two / three fully fine-tuned experts
    (evomerge.zoo.real)."""
    import os

    from rich.console import Console

    if out.exists() and any(out.iterdir()):
        raise EvomergeError(f"{out} already exists and is not empty", "give a new directory or remove it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from evomerge.zoo.real import build_real_zoo

    con = Console()

    def progress(phase: str, done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            con.print(f"training {phase}: {done}/{total} steps")

    manifest = build_real_zoo(out, seed, threads=threads, size=size, progress=progress)
    con.print(f"[green]built[/] {out} ({size}, experts {', '.join(manifest['experts'])}) in "
              f"{manifest['build_seconds']:.1f} s (per expert: {manifest['expert_seconds']})")
