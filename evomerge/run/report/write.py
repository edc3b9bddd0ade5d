"""The run report: one self-contained HTML page, and its PNGs, that says how a search went.

    evomerge report RUN_DIR [--out DIR] [--baselines]     # default DIR: RUN_DIR/report

    DIR/index.html     the page: summary, curves, per-task scores, the best recipe (heatmap or path), M2N2's
                       archive, the Pareto front, workers, failures, config, recipe, mergekit YAML, commands;
                       the pictures are embedded (data URIs), so the file alone opens offline, anywhere
    DIR/*.png          the same pictures as files

Everything comes from the run directory (config.yaml and the ledger); the report never runs a model unless
asked: `--baselines` scores each source model, their uniform average and (parameter-space searches) the
search's start point with the run's own objective and validation tasks, once, and caches the scores in
RUN_DIR/baselines.json (keyed by the models and tasks), so later reports and refreshes show them for free.
Source scores that a search records anyway are used without it: M2N2 evaluates its seed models first, a
data-flow search evaluates model A alone first.

`evomerge search` and `resume` write the report at the end and refresh it while they run (`Refresher`, a
background thread that rebuilds it every N seconds when the ledger has grown; no hook in the controller).
Files are built in a temporary directory next to DIR and moved into place one by one (os.replace), the page
last, so a reader never sees a half-written file and a failed build leaves the previous report untouched.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.run.report.baselines import score_baselines
from evomerge.run.report.data import load_run
from evomerge.run.report.page import render
from evomerge.run.rundir import INDEX, REPORT_DIR

# ---- reading the run --------------------------------------------------------------------------------------------


# ---- baselines: source models and simple merges ------------------------------------------------------------------


# ---- figures ----------------------------------------------------------------------------------------------------


# ---- the page ---------------------------------------------------------------------------------------------------


# ---- writing ----------------------------------------------------------------------------------------------------

OWNED = ("progress.png", "recipe.png", "path.png", "archive.png", "pareto.png", "workers.png", "time.png",
         "tasks.png")


def _owned(name: str) -> bool:
    return any(name == f or name.endswith("-" + f) for f in OWNED)


def build_report(run_dir: str | Path, out: str | Path | None = None, *, baselines: bool = False,
                 live: bool = False, refresh_s: float = 60, progress: bool = False) -> Path:
    """Write the report of a run into `out` (default RUN_DIR/report); returns its index.html. `baselines`:
    score the source models and simple merges first (cached). `live`: the page reloads itself every
    `refresh_s` seconds (refreshes during a search)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    run = Path(run_dir).resolve()
    cfg, stages, st = load_run(run)  # raises for a bad RUN_DIR before anything is written
    dest = Path(out).resolve() if out is not None else run / REPORT_DIR
    if dest.exists() and not dest.is_dir():
        raise EvomergeError(f"--out {dest} is a file", "give a directory (it is created if missing)")
    if baselines:
        score_baselines(run, progress=progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        page = render(run, cfg, stages, st, tmp, live, refresh_s)
        (tmp / INDEX).write_text(page, encoding="utf-8")
        dest.mkdir(exist_ok=True)
        made = sorted(p.name for p in tmp.iterdir() if p.name != INDEX)
        for name in made:
            _replace(tmp / name, dest / name)
        _replace(tmp / INDEX, dest / INDEX)  # the page last: it never points at a picture not yet there
        for old in dest.iterdir():
            if old.suffix == ".png" and _owned(old.name) and old.name not in made:
                old.unlink(missing_ok=True)  # a picture of an earlier build that no longer applies
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / INDEX


def _replace(src: Path, dst: Path) -> None:
    import os

    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(src, 0o644)  # mkstemp's files are private; a report is for reading
    os.replace(src, dst)


class Refresher:
    """Rebuilds RUN_DIR/report every `every` seconds while a search runs, when a ledger has grown, from a
    background thread (the controller loop is untouched; the ledger is read like `status` reads it), and once
    more, final, on exit. A failed refresh never stops the search."""

    def __init__(self, run_dir: str | Path, every: float = 120.0, final: bool = True):
        self.run, self.every, self.final = Path(run_dir), every, final
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple = ()
        self.path: Path | None = None
        self.error: str | None = None

    def _signature(self) -> tuple:
        out = []
        for p in (self.run, self.run / "ps", self.run / "dfs"):
            try:
                out.append((p / "ledger.jsonl").stat().st_size)
            except OSError:
                out.append(-1)
        return tuple(out)

    def _build(self, live: bool) -> None:
        try:
            self.path = build_report(self.run, live=live, refresh_s=self.every)
            self.error = None
        except Exception as e:  # noqa: BLE001 - the report must never take the search down
            self.error = f"{type(e).__name__}: {e}"

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            sig = self._signature()
            if sig != self._seen and any(v > 0 for v in sig):
                self._seen = sig
                self._build(live=True)

    def __enter__(self) -> Refresher:
        if self.every > 0:
            self._thread = threading.Thread(target=self._loop, name="evomerge-report", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        refused = exc and exc[0] is not None and issubclass(exc[0], EvomergeError)  # e.g. a bad config
        if self.final and not refused and (self.run / "config.yaml").is_file():
            self._build(live=False)
            if self.error:
                print(f"warning: the run report was not written: {self.error}", file=sys.stderr)
