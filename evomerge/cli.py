"""The `evomerge` command line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer

from evomerge.errors import EvomergeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Evolutionary merge-recipe search for language models.")
_state = {"debug": False}


def _add_subcommands() -> None:
    from evomerge.zoo.cli import app as zoo_app

    app.add_typer(zoo_app, name="zoo")


_add_subcommands()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks for errors")) -> None:
    _state["debug"] = debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _console(stderr: bool = False):
    """Rich's console; piped to a file or another program it would cut tables to 80 columns, so it is given the
    room the text needs there (COLUMNS still wins when set)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty())
    width = 240 if piped and "COLUMNS" not in os.environ else None
    return Console(stderr=stderr, width=width)


def _parse_size(s: str) -> int:
    units = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "b": 1}
    t = s.strip().lower()
    for u, mult in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise EvomergeError(f"--shard-size '{s}' is not a size", "write e.g. 2GB, 500MB or a byte count") from None


@app.command()
def merge(config: Path = typer.Argument(..., help="an evomerge recipe or a mergekit merge config (YAML)"),
          out: Path = typer.Option(..., "--out", "-o", help="output model directory (must not exist)"),
          device: str = typer.Option("cpu", help="cpu or cuda"),
          shard_size: str = typer.Option("5GB", help="largest safetensors shard"),
          quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Build one recipe into a Hugging Face model directory."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge import api
    from evomerge.merge.dataflow import PathRecipe

    t0 = time.perf_counter()
    recipe = api.recipe(config)
    con = _console(stderr=True)
    if isinstance(recipe, PathRecipe):  # a layer path: exported as a plain model with the scales folded in
        api.merge(recipe, out)
        if not quiet:
            con.print(f"[green]wrote[/] {out}  (dataflow path of {len(recipe.path)} layers, "
                      f"recipe {recipe.content_hash()}, {time.perf_counter() - t0:.1f} s)")
        return
    n = {"tensors": 0}
    with Progress(TextColumn("[bold]merging[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} tensors"), TimeElapsedColumn(), console=con, disable=quiet, transient=True) as prog:
        task = prog.add_task(f"{recipe.method} ({len(recipe.models)} models)", total=None)

        def show(i: int, total: int) -> None:
            n["tensors"] = total
            prog.update(task, completed=i, total=total)

        api.merge(recipe, out, device=device, max_shard_bytes=_parse_size(shard_size), progress=show)
    if not quiet:
        dtype = getattr(recipe, "out_dtype", None) or getattr(recipe, "dtype", None) or "the sources' dtype"
        con.print(f"[green]wrote[/] {out}  ({recipe.method}, {n['tensors']} tensors, {dtype}, "
                  f"recipe {recipe.content_hash()}, {time.perf_counter() - t0:.1f} s)")


@app.command()
def convert(config: Path = typer.Argument(..., help="recipe or mergekit config"),
            to: str = typer.Option("mergekit", help="mergekit or evomerge")) -> None:
    """Print a recipe as a mergekit config, or a mergekit config as an evomerge recipe."""
    from evomerge.merge.load import load_recipe
    from evomerge.merge.mergekit_out import mergekit_yaml

    recipe = load_recipe(config)
    if to == "mergekit" and getattr(recipe, "method", None) == "dataflow":
        import yaml

        from evomerge.merge.dataflow import check_path, open_path_sources, to_mergekit_passthrough

        sources = open_path_sources(recipe)
        kind = check_path(recipe, sources)
        sys.stdout.write(yaml.safe_dump(to_mergekit_passthrough(recipe, kind), sort_keys=False))
    elif to == "mergekit":
        sys.stdout.write(mergekit_yaml(recipe))
    elif to == "evomerge":
        sys.stdout.write(recipe.to_yaml())
    else:
        raise EvomergeError(f"--to '{to}' is not a format", "use mergekit or evomerge")


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from rich.table import Table

    from evomerge.merge.methods import get_method, method_names

    table = Table(title="merge methods")
    for col in ("method", "per-model parameters", "global parameters", "inputs", "what it does"):
        table.add_column(col)
    for name in method_names():
        m = get_method(name)

        def fmt(ps):
            return ", ".join(p.name + ("*" if p.required else f"={p.default}") for p in ps) or "-"

        inputs = ("base + " if m.needs_base else "") + (
            f"{m.min_inputs}" if m.max_inputs == m.min_inputs else f"{m.min_inputs}+")
        table.add_row(name, fmt(m.tensor_params), fmt(m.global_params), inputs, m.doc)
    _console().print(table)
    _console().print("* required")


@app.command()
def check(config: Path = typer.Argument(..., help="search config (YAML)"),
          address: str | None = typer.Option(None, "--address", help="Ray cluster whose resources to compare "
                                                                      "(default: RAY_ADDRESS, else this machine)")
          ) -> None:
    """Pre-flight report of a search config without reading a weight: sources, architectures, shapes, dtypes,
    vocabularies, tasks, resources requested vs available, estimated memory per worker."""
    from evomerge.run.check import check_config
    from evomerge.run.config import load_config

    report = check_config(load_config(config), str(config), address or os.environ.get("RAY_ADDRESS"))
    report.render(_console())
    report.raise_if_failed()
    warns = sum(f.status == "warn" for f in report.findings)
    _console().print("[green]ready to search[/]" + (f" ({warns} warning(s) above)" if warns else ""))


def _print_status(st: dict) -> None:
    from rich.table import Table

    con = _console()
    t = Table(title=f"search in {st['run_dir']}", show_header=False)
    t.add_row("evaluations", f"{st['evaluations']} of {st['budget']}  ({st['failures']} failed)")
    if st["evaluations_per_minute"]:
        t.add_row("evaluations per minute", f"{st['evaluations_per_minute']:.1f}")
    b = st["best"]
    if b is not None:
        by_validation = b["validation"] is not None
        t.add_row("best (what export builds)", f"#{b['id']}: fitness {b['fitness']:.4f}" + (
            f", validation {b['validation']:.4f}  (picked by validation)" if by_validation else ""))
        top = st.get("best_fitness")
        if by_validation and top is not None and top > b["fitness"]:
            t.add_row("best search fitness", f"{top:.4f}  (not the pick: it validated lower, or was not validated)")
        for task, v in (b["metrics"] or {}).items():
            t.add_row(f"  {task}", f"{v:.4f}")
    con.print(t)
    if st.get("front"):
        f = Table(title="Pareto front (one objective per task)")
        tasks = list(st["front"][0]["metrics"])
        for col in ("pick", "evaluation", *tasks):
            f.add_column(col)
        for i, r in enumerate(st["front"]):
            f.add_row(str(i), f"#{r['id']}", *(f"{r['metrics'][k]:.4f}" for k in tasks))
        con.print(f)
        con.print(f"export a member: evomerge export {st['run_dir']} --pick N --out DIR")
    con.print(f"export it: evomerge export {st['run_dir']} --out DIR")
    if st.get("report"):
        con.print(f"report: {st['report']}")


_REPORT_EVERY = typer.Option(120.0, "--report-every", help="refresh RUN_DIR/report every this many seconds "
                             "while searching (0: only at the end)")


@app.command()
def search(config: Path = typer.Argument(..., help="search config (YAML); see configs/quickstart.yaml"),
           run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory (default: config's run_dir)"),
           address: str | None = typer.Option(None, "--address",
                                                 help="Ray cluster to join ('auto' or HOST:PORT; default: "
                                                      "RAY_ADDRESS, else an embedded local Ray)"),
           quiet: bool = typer.Option(False, "--quiet", "-q"), report_every: float = _REPORT_EVERY) -> None:
    """Run an evolutionary merge search."""
    from evomerge import api

    _print_status(api.search(config, run_dir, address=address, progress=not quiet, report_every=report_every))


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="the run directory of a stopped or killed search"),
           budget: int | None = typer.Option(None, help="raise the evaluation budget"),
           accept_edits: bool = typer.Option(False, "--accept-edits", help="take hand edits of RUN/config.yaml "
                                             "that change only where and how fast the search runs (worker count, "
                                             "cpus, gpus, timeout_s, device_sources); recorded in the ledger"),
           address: str | None = typer.Option(None, "--address"),
           quiet: bool = typer.Option(False, "--quiet", "-q"), report_every: float = _REPORT_EVERY) -> None:
    """Continue a search from its run directory (a killed controller loses only what was in flight)."""
    from evomerge import api

    st = api.resume(run_dir, budget=budget, accept_edits=accept_edits, address=address, progress=not quiet,
                    report_every=report_every)
    if st is None:
        from evomerge.run.config import load_config
        from evomerge.run.records import budget_of

        spent = budget if budget is not None else budget_of(load_config(Path(run_dir) / "config.yaml"))
        _console().print(f"nothing to do: the budget is spent ({spent} evaluations), raise it with "
                         f"--budget N (evomerge resume {run_dir} --budget N)")
        return
    _print_status(st)


@app.command()
def status(run_dir: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Where a search stands: budget used, best so far, failures."""
    import json

    from evomerge.run.status import status as run_status

    st = run_status(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
    else:
        _print_status(st)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="the run directory of a search"),
           out: Path | None = typer.Option(None, "--out", "-o", help="report directory (default: RUN_DIR/report)"),
           baselines: bool = typer.Option(False, "--baselines", help="first score the source models and simple "
                                          "merges with the run's tasks (once: cached in RUN_DIR/baselines.json)"),
           quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Write the run report: one self-contained HTML page and its PNGs (curves, recipe, workers, commands)."""
    from evomerge.run.report.write import build_report

    path = build_report(run_dir, out, baselines=baselines, progress=not quiet)
    if not quiet:
        _console().print(f"[green]wrote[/] {path}")


@app.command()
def export(run_dir: Path = typer.Argument(...),
           out: Path = typer.Option(..., "--out", "-o", help="output model directory (must not exist)"),
           pick: int | None = typer.Option(None, "--pick", help="multi-objective runs: export Pareto-front "
                                                                  "member N (as `status` numbers them)")) -> None:
    """Build the best recipe of a run (by validation score where there is one) as a model directory."""
    from evomerge.run.status import export_best

    path = export_best(run_dir, out, pick)
    mk = path.parent / f"{path.name}.mergekit.yml"
    _console().print(f"[green]wrote[/] {path} (a model card with the scores inside)"
                     + (f" and {mk}" if mk.exists() else " (no mergekit form for this kind of merge)"))


def main() -> None:
    try:
        app(standalone_mode=False)
    except EvomergeError as e:
        if _state["debug"]:
            raise
        from rich.markup import escape

        err = _console(stderr=True)
        err.print(f"[bold red]error:[/] {escape(e.problem)}", highlight=False, soft_wrap=True)
        if e.fix:
            err.print(f"  [bold]fix:[/] {escape(e.fix)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if _state["debug"]:
            raise
        from rich.markup import escape

        from evomerge.errors import environment_fix

        fix = environment_fix(e)
        if fix:
            msg = f"[bold red]error:[/] the Python environment is broken: {escape(f'{type(e).__name__}: {e}')}\n"
            _console(stderr=True).print(msg + f"  [bold]fix:[/] {escape(fix)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        msg = f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}\n"
        msg += "  rerun with --debug for the traceback and report it"
        _console(stderr=True).print(msg, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
