"""The report page: its sections as HTML, in one self-contained file."""

from __future__ import annotations

import base64
import html
import math
import shlex
from pathlib import Path
from string import Template
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.report.baselines import cached_baselines
from evomerge.run.report.data import Stage, ledger_baselines, now_utc
from evomerge.run.report.figures import Figure, fig_coverage, fig_pareto, fig_progress, fig_recipe, fig_workers

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:0 24px 40px}
header{background:#263238;color:#fff;padding:18px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cfd8dc}
nav{max-width:1180px;margin:12px auto 0;padding:0 24px;font-size:13px}nav a{margin-right:14px;color:#1565c0}
section{background:#fff;border:1px solid #e0e3e7;border-radius:8px;padding:14px 20px;margin:16px 0}
h2{font-size:18px;margin:2px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
td,th{border-bottom:1px solid #eceff1;padding:4px 12px 4px 0;text-align:left;vertical-align:top}
th{color:#546e7a;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0 16px}figure img{max-width:100%;height:auto;border:1px solid #eceff1}
figcaption{color:#546e7a;font-size:12.5px;max-width:900px}
pre{background:#f3f5f7;border:1px solid #e0e3e7;border-radius:6px;padding:10px;overflow:auto;font-size:12px;
max-height:520px}
details summary{cursor:pointer;color:#1565c0;margin:6px 0}.live{background:#fff8e1;border-color:#ffe082}
.note{color:#6d4c41}code{background:#f3f5f7;padding:1px 4px;border-radius:3px}
"""


PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">$refresh
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>evomerge report: $name</title><style>$css</style></head>
<body><header><h1>evomerge report: $name</h1><p>$subtitle</p></header>
<nav>$nav</nav><main>
$sections
<p class="note">Written $when by <code>evomerge report</code>; rebuild it with <code>$again</code>.</p>
</main></body></html>
""")


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    num = ' class="num"'
    body = "".join("<tr>" + "".join(f"<td{num if i >= numeric_from else ''}>{_esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _img(tmp: Path, fig: Figure) -> str:
    data = base64.b64encode((tmp / fig.file).read_bytes()).decode()
    return (f'<figure><img alt="{_esc(fig.file)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(fig.caption)} <span class=note>({_esc(fig.file)})</span></figcaption></figure>")


def _pre(text: str, summary: str | None = None, open_: bool = False) -> str:
    block = f"<pre>{_esc(text)}</pre>"
    return f"<details{' open' if open_ else ''}><summary>{_esc(summary)}</summary>{block}</details>" if summary \
        else block


def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _kind(cfg) -> str:
    o = cfg.optimizer
    opt = f"optuna {o.sampler}" if o.kind == "optuna" else "CMA-ES" if cfg.search != "m2n2" else "M2N2"
    multi = ", multi-objective" if cfg.objective.multi else ""
    racing = ", racing" if cfg.objective.racing else ""
    kind = {"parameter": "parameter-space", "dataflow": "data-flow (layer path)", "hybrid": "PS+DFS hybrid",
            "m2n2": "M2N2"}[cfg.search]
    return f"{kind} search, {opt}{multi}{racing}"


def _span(evals: list[dict[str, Any]]) -> float | None:
    t = [(r["time"] - (r.get("t_wall") or 0.0), r["time"]) for r in evals if r.get("time") is not None]
    return max(e for _, e in t) - min(s for s, _ in t) if t else None


def section_summary(run: Path, cfg, stages: list[Stage], st: dict[str, Any], live: bool) -> str:
    b = st.get("best")
    evals = [r for s in stages for r in s.evals]
    span = _span(evals)
    rows = [("run directory", str(run)), ("search", _kind(cfg)),
            ("models", ", ".join(f"{n}{' (base)' if n == cfg.base else ''}" for n in cfg.models)),
            ("objective", ", ".join(f"{t.name} ({t.metric}, weight {t.weight:g})" for t in cfg.objective.tasks)
             + (f"; {cfg.objective.limit} items per task" if cfg.objective.limit else "")),
            ("validation", ", ".join(t.name for t in cfg.validation.tasks) if cfg.validation else "none")]
    for s in stages:
        sst = s.status
        raced = sum(1 for r in s.evals if r.get("raced"))
        estimated = sum(1 for r in s.evals if r.get("estimated"))
        redone = sum(1 for r in s.evals if r.get("requeued"))
        rows.append((f"evaluations{' (' + s.label + ')' if s.label else ''}",
                     f"{sst['evaluations']} of {sst['budget']}, {sst['failures']} failed"
                     + (f", {raced} raced (stopped early)" if raced else "")
                     + (f", {estimated} estimated from anchor items (IRT)" if estimated else "")
                     + (f", {redone} redone after their worker was lost" if redone else "")
                     + (f", {sst['evaluations_per_minute']:.1f} per minute" if sst["evaluations_per_minute"] else "")))
    if span is not None:
        length = f"{span:.0f} s" if span < 120 else f"{span / 60:.1f} min"
        rows.append(("time span", f"{length} from the first evaluation's start to the last one's end"))
    if b is not None:
        rows.append(("best (exported)", f"evaluation #{b['id']}" + (f" of stage {b['stage']}" if b.get("stage")
                                                                  else "")
                     + f": fitness {b['fitness']:.4f}"
                     + (f", validation {b['validation']:.4f}" if b.get("validation") is not None else "")
                     + (" (chosen by validation)" if b.get("validation") is not None else " (by fitness)")))
    else:
        rows.append(("best", "no successful evaluation yet"))
    banner = (f'<p class="note">The search is running: this page was written {now_utc()} and is rewritten while it '
              "runs (your browser reloads it).</p>") if live else ""
    return banner + _kv(rows)


def section_tasks(run: Path, cfg, stages: list[Stage], st: dict[str, Any], tmp: Path) -> str:
    from evomerge.run.plots import plot_task_bars

    b = st.get("best")
    if b is None:
        return "<p>No successful evaluation yet.</p>"
    stage = next((s for s in stages if s.key == b.get("stage", s.key)), stages[-1])
    val = next((r for r in stage.records if r["type"] == "validation" and r["id"] == b["id"]
                and r.get("metrics")), None)
    best_scores = {**(b.get("metrics") or {}), **((val or {}).get("metrics") or {})}
    tasks = [t.name for t in cfg.objective.tasks] + ([t.name for t in cfg.validation.tasks] if cfg.validation
                                                     else [])
    rows: list[tuple[str, dict[str, float]]] = [(f"best (#{b['id']})", best_scores)]
    rows += ledger_baselines(cfg, stages)
    cached = cached_baselines(run, cfg)
    rows += [(r["label"], r["metrics"]) for r in cached]
    fig = Figure("tasks.png", "Per-task scores of the best against the source models and simple merges "
                              "(objective tasks, then validation tasks; a missing bar: not scored).")
    plot_task_bars(tasks, rows, tmp / fig.file, "per-task scores")
    table = _table(["model", *tasks], [[label, *(_f(sc.get(t)) for t in tasks)] for label, sc in rows])
    note = ("" if cached else '<p class="note">Source models and simple merges are not in the ledger: '
            f"<code>evomerge report {_esc(shlex.quote(str(run)))} --baselines</code> scores them once with the "
            "same tasks (cached in the run directory).</p>")
    return _img(tmp, fig) + table + note


def section_stage(s: Stage, tmp: Path) -> str:
    prefix = f"{s.key}-" if s.key else ""
    parts = []
    if not s.evals:
        return "<p>No evaluation recorded yet.</p>"
    parts.append(_img(tmp, fig_progress(s, tmp, prefix)))
    fig, why = fig_recipe(s, tmp, prefix)
    parts.append(_img(tmp, fig) if fig else f'<p class="note">{_esc(why)}</p>')
    if s.cfg.search == "m2n2":
        parts.append(_img(tmp, fig_coverage(s, tmp, prefix)))
    if s.cfg.objective.multi:
        fig = fig_pareto(s, tmp, prefix)
        tasks = [t.name for t in s.cfg.objective.tasks]
        if fig:
            parts.append(_img(tmp, fig))
        parts.append("<h3>Pareto front</h3>" + _table(["pick", "evaluation", *tasks], [
            [str(i), f"#{r['id']}", *(_f(r["metrics"][t]) for t in tasks)]
            for i, r in enumerate(s.status.get("front") or [])]))
    figs, rows = fig_workers(s, tmp, prefix)
    if figs:
        parts.append("<h3>Workers</h3>" + "".join(_img(tmp, f) for f in figs)
                     + _table(["worker", "evaluations", "failed", "busy s", "idle s", "utilisation"], rows))
    fails = [r for r in s.evals if r["fitness"] is None]
    if fails:
        parts.append(f"<h3>Failures ({len(fails)})</h3>" + _table(
            ["evaluation", "error", "attempts (workers lost)", "requeued"],
            [[f"#{r['id']}", (r.get("error") or "")[:400], str(r.get("attempt", 0)), str(r.get("requeued", 0))]
             for r in fails], numeric_from=2))
    return "".join(parts)


def mergekit_text(recipe_dict: dict[str, Any]) -> str:
    """The recipe's mergekit YAML, or why there is none."""
    import yaml

    from evomerge.merge.load import any_recipe

    recipe = any_recipe(recipe_dict)
    method = recipe_dict.get("method")
    if method == "piecewise":
        return "# M2N2 merges split tensors between coefficients, which mergekit cannot express: export a model."
    try:
        if method == "dataflow":
            from evomerge.merge.dataflow import check_path, open_path_sources, to_mergekit_passthrough

            sources = open_path_sources(recipe)
            try:
                kind = check_path(recipe, sources)
            finally:
                for src in sources.values():
                    src.close()
            return yaml.safe_dump(to_mergekit_passthrough(recipe, kind), sort_keys=False, default_flow_style=None,
                                  width=100)
        from evomerge.merge.mergekit_out import mergekit_yaml

        return mergekit_yaml(recipe)
    except EvomergeError as e:
        return f"# no mergekit form: {e.problem}"
    except Exception as e:  # noqa: BLE001 - e.g. the sources moved: the report still stands
        return f"# no mergekit form: {type(e).__name__}: {e}"


def section_recipe(st: dict[str, Any]) -> str:
    from evomerge.merge.load import any_recipe

    b = st.get("best")
    if b is None:
        return "<p>No successful evaluation yet.</p>"
    recipe = any_recipe(b["recipe"])
    return (f"<p>Evaluation #{b['id']}{' (stage ' + b['stage'] + ')' if b.get('stage') else ''}; recipe hash "
            f"<code>{_esc(recipe.content_hash())}</code>.</p>"
            + _pre(recipe.to_yaml(), "evomerge recipe (YAML)", open_=True)
            + _pre(mergekit_text(b["recipe"]), "mergekit configuration (YAML)", open_=True))


def section_commands(run: Path, cfg, st: dict[str, Any]) -> str:
    q = shlex.quote(str(run))
    lines = [f"evomerge status {q}                      # where it stands",
             f"evomerge resume {q}                      # continue after Ctrl-C, a crash or kill -9",
             f"evomerge resume {q} --budget N           # or raise the budget",
             f"evomerge export {q} --out merged         # the best (by validation) as a model directory"
             + (" + mergekit YAML" if (st.get("best") or {}).get("recipe", {}).get("method") != "piecewise" else "")]
    if cfg.objective.multi:
        lines.append(f"evomerge export {q} --pick N --out merged  # Pareto-front member N")
    lines.append(f"evomerge report {q} --baselines          # this page, with source models scored")
    return _pre("\n".join(lines))


def render(run: Path, cfg, stages: list[Stage], st: dict[str, Any], tmp: Path, live: bool,
           refresh_s: float) -> str:
    """The page's HTML; its PNGs are written into `tmp` on the way."""
    secs: list[tuple[str, str, str]] = [("summary", "Summary", section_summary(run, cfg, stages, st, live)),
                                        ("tasks", "Per-task scores", section_tasks(run, cfg, stages, st, tmp))]
    for s in stages:
        title = f"Search{' - ' + s.label if s.label else ''}"
        secs.append((f"search-{s.key}" if s.key else "search", title, section_stage(s, tmp)))
    secs += [("recipe", "Best recipe", section_recipe(st)),
             ("config", "Config", _pre(cfg.to_yaml(), "the run's config.yaml (paths resolved)")),
             ("commands", "Commands", section_commands(run, cfg, st))]
    body = "\n".join(f'<section id="{k}"{" class=live" if live and k == "summary" else ""}><h2>{_esc(t)}</h2>'
                     f"{h}</section>" for k, t, h in secs)
    nav = "".join(f'<a href="#{k}">{_esc(t)}</a>' for k, t, _ in secs)
    b = st.get("best")
    subtitle = f"{_kind(cfg)} · {st['evaluations']} of {st['budget']} evaluations" + (
        f" · best #{b['id']}: fitness {b['fitness']:.4f}" + (f", validation {b['validation']:.4f}"
                                                             if b.get("validation") is not None else "")
        if b else "")
    refresh = f'\n<meta http-equiv="refresh" content="{max(5, int(refresh_s))}">' if live else ""
    return PAGE.substitute(refresh=refresh, name=_esc(run.name), css=CSS, subtitle=_esc(subtitle), nav=nav,
                           sections=body, when=_esc(now_utc()),
                           again=_esc(f"evomerge report {shlex.quote(str(run))}"))
