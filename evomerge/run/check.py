"""Pre-flight check of a search config, without reading a weight: what `evomerge check` prints and what
`evomerge search` runs before it starts anything.

It reads the config, every source's config.json and safetensors headers (names, shapes, dtypes), LoRA
adapter headers, tokenizer vocabularies and the lm-eval task index, and compares the resources the workers
ask for with what the machine (or the Ray cluster at `--address`) offers. Every problem found is listed, not
just the first, each with its fix; the memory figures are estimates (see `estimate_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.dataflow import Hop
from evomerge.run.config import SearchConfig
from evomerge.run.resources import available_resources, estimate_memory, human_size, shape_numel
from evomerge.run.spaces import make_space
from evomerge.search.dfs_space import DataflowSpace


@dataclass
class Finding:
    section: str  # sources | compatibility | vocabulary | tasks | resources | memory
    status: str  # ok | warn | error
    detail: str
    fix: str | None = None


@dataclass
class CheckReport:
    config: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def add(self, section: str, status: str, detail: str, fix: str | None = None) -> None:
        self.findings.append(Finding(section, status, detail, fix))

    def error(self, section: str, e: EvomergeError) -> None:
        self.add(section, "error", e.problem, e.fix)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "error"]

    def raise_if_failed(self) -> None:
        """An EvomergeError naming every problem (the first one's fix), if there is any."""
        errs = self.errors
        if not errs:
            return
        lines = [f"[{f.section}] {f.detail}" for f in errs]
        head = f"{self.config}: pre-flight check found {len(errs)} problem(s):\n  - " if len(errs) > 1 else \
            f"{self.config}: pre-flight check: "
        raise EvomergeError(head + "\n  - ".join(lines), errs[0].fix)

    def render(self, console) -> None:
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=f"sources ({self.config})")
        for col in ("model", "kind", "architecture", "layers", "hidden", "vocab rows", "tokens", "dtypes",
                    "parameters", "size"):
            t.add_column(col)
        for s in self.sources:
            t.add_row(*(escape(str(s.get(k, "-"))) for k in ("name", "kind", "architecture", "layers", "hidden",
                                                             "vocab", "tokens", "dtypes", "params", "size")))
        console.print(t)
        if self.tasks:
            tt = Table(title="tasks")
            for col in ("objective", "task", "metric", "found"):
                tt.add_column(col)
            for r in self.tasks:
                tt.add_row(r["objective"], escape(r["task"]), r["metric"], "yes" if r["found"] else "[red]no[/]")
            console.print(tt)
        if self.resources:
            rt = Table(title="resources and memory per worker (estimated)", show_header=False)
            for k, v in self.resources.items():
                rt.add_row(k, escape(str(v)))
            for k, v in self.memory.items():
                rt.add_row(f"memory: {k}", human_size(v))
            console.print(rt)
        ct = Table(title="checks")
        for col in ("check", "", "detail"):
            ct.add_column(col)
        colour = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "error": "[bold red]error[/]"}
        for f in self.findings:
            ct.add_row(f.section, colour[f.status], escape(f.detail) + (f"\n[dim]fix: {escape(f.fix)}[/]"
                                                                         if f.fix and f.status != "ok" else ""))
        console.print(ct)


def _source_row(name: str, src) -> dict[str, Any]:
    from evomerge.merge.vocab import read_vocab, text_config, tokenizer_dir

    cfg = text_config(src.config)
    numel = sum(shape_numel(i.shape) for i in src.tensors.values())
    adapter = getattr(src, "adapter_path", None)
    try:
        tokens: Any = len(read_vocab(tokenizer_dir(src), name))
    except EvomergeError:
        tokens = "none"
    return {"name": name, "kind": f"LoRA adapter on {src.path.name}" if adapter else
            ("hub model" if src.ref.startswith("hf:") else "model"),
            "architecture": ",".join(src.config.get("architectures") or [str(cfg.get("model_type", "?"))]),
            "layers": cfg.get("num_hidden_layers", "?"), "hidden": cfg.get("hidden_size", "?"),
            "vocab": cfg.get("vocab_size", "?"), "tokens": tokens,
            "dtypes": ",".join(sorted({i.dtype for i in src.tensors.values()})), "params": f"{numel / 1e6:.2f}M",
            "size": human_size(sum(i.end - i.start for i in src.tensors.values()))}


def _check_sources(cfg: SearchConfig, report: CheckReport) -> dict[str, Any]:
    from evomerge.merge.sources import open_source

    opened = {}
    for name, path in cfg.models.items():
        try:
            src = open_source(name, path)
        except EvomergeError as e:
            report.error("sources", e)
            report.sources.append({"name": name, "kind": "missing"})
            continue
        opened[name] = src
        report.sources.append(_source_row(name, src))
    if len(opened) == len(cfg.models):
        report.add("sources", "ok", f"{len(opened)} models: config.json and safetensors headers read")
    return opened


def _check_compatible(cfg: SearchConfig, opened: dict[str, Any], report: CheckReport) -> None:
    from evomerge.merge.plan import check_compatible
    from evomerge.merge.vocab import find_conflict, read_vocab, tokenizer_dir, vocab_rows

    if cfg.search == "dataflow":
        names = [cfg.dataflow.head, *cfg.dataflow.partners]
    elif cfg.search == "m2n2":
        names = (cfg.m2n2.seeds if cfg.m2n2 and cfg.m2n2.seeds else list(cfg.models))
    else:
        names = list(cfg.models)
    names = [n for n in dict.fromkeys(names) if n in opened]
    if len(names) < 2:
        return
    reference = cfg.base if cfg.base in names else names[0]
    # vocabularies first: a conflict explains a vocab_size mismatch better than the shape check does
    vocabs, rows = {}, {}
    for n in names:
        try:
            vocabs[n] = read_vocab(tokenizer_dir(opened[n]), n)
            rows[n] = vocab_rows(opened[n])
        except EvomergeError as e:
            report.error("vocabulary", e)
    conflict = find_conflict(vocabs, rows, reference) if reference in vocabs else None
    if conflict is not None:
        report.error("vocabulary", conflict)
    elif len(vocabs) == len(names):
        sizes = {n: len(v) for n, v in vocabs.items()}
        if len(set(rows.values())) > 1:
            report.add("vocabulary", "error", "vocabularies differ in size (added tokens): " + ", ".join(
                f"{n} {rows[n]} rows" for n in names) + "; a search builds every candidate into one resident "
                "model, so its sources need one vocabulary",
                "merge the sources once with `evomerge merge` and tokenizer_source: union (or base), or resize "
                "them to one vocabulary")
        else:
            report.add("vocabulary", "ok", f"one tokenizer ({sizes[reference]} tokens, {rows[reference]} rows)")
    if cfg.search == "dataflow":
        try:
            _check_dataflow(cfg, report)
        except EvomergeError as e:
            report.error("compatibility", e)
        return
    space = None
    try:
        check_compatible({n: opened[n] for n in names}, reference)
    except EvomergeError as e:
        if not (conflict is not None or "vocab_size" in e.problem or "embed" in e.problem or "lm_head" in e.problem):
            report.error("compatibility", e)
        return
    if cfg.search in ("parameter", "hybrid") and len(opened) == len(cfg.models):
        try:
            from evomerge.merge.plan import make_plan

            space = make_space(cfg)
            make_plan(space.to_recipe(space.x0), sources={n: opened[n] for n in cfg.models}).jobs.clear()
        except EvomergeError as e:
            report.error("compatibility", e)
            return
    report.add("compatibility", "ok", f"{len(names)} models share architecture, tensor names and shapes"
               + (f"; the search space has {space.dim} dimensions" if space is not None else ""))
    if cfg.search == "hybrid" and cfg.workers.backend == "vllm":  # stage 2's model A is a merge of these
        _check_vllm_paths({n: opened[n] for n in [reference, *cfg.dataflow.partners] if n in opened}, reference,
                          report)


def _check_vllm_paths(sources: dict[str, Any], head: str, report: CheckReport) -> None:
    from workers.vllm_dfs import check_engine_paths

    try:
        check_engine_paths(sources, head)
    except EvomergeError as e:
        report.error("compatibility", e)
        return
    report.add("compatibility", "ok", "data-flow paths run in one vLLM engine (unused layers are identities)")


def _check_dataflow(cfg: SearchConfig, report: CheckReport) -> None:
    from evomerge.merge.dataflow import Hop, check_path, open_path_sources

    space = make_space(cfg)
    recipe = space.to_recipe(space.x0)
    sources = open_path_sources(recipe)
    try:
        check_path(recipe.model_copy(update={"path": tuple(Hop(model=m, layer=i) for m, i in space.layer_index)}),
                   sources)
        if cfg.workers.backend == "vllm":
            _check_vllm_paths(sources, recipe.head, report)
    finally:
        for s in sources.values():
            s.close()
    report.add("compatibility", "ok", f"each of the {len(space.layer_index)} layers can follow any other "
               f"(data-flow space of {space.dim} dimensions)")


def check_tasks(cfg: SearchConfig, report: CheckReport) -> None:
    """lm-eval tasks found the way workers.score.Scorer finds them (include_path first, then built-ins)."""
    from lm_eval.tasks import TaskManager

    from workers.eval_options import check_prompt_options, import_functions

    check_prompt_options(cfg, report)
    try:
        functions = import_functions(cfg)
        if functions:
            report.add("tasks", "ok", f"scoring function(s) imported: {', '.join(functions)}")
    except EvomergeError as e:
        report.error("tasks", e)
    for label, obj in (("objective", cfg.objective), ("validation", cfg.validation)):
        if obj is None:
            continue
        obj = obj.model_copy(update={"tasks": [t for t in obj.tasks if not t.function]})  # lm-eval's only
        if not obj.tasks:
            continue
        bad = [p for p in obj.include_path if not Path(p).is_dir()]
        for p in bad:
            report.add("tasks", "error", f"{label}: task include_path '{p}' is not a directory",
                       "point it at your task YAML folder")
        paths = [p for p in obj.include_path if p not in bad]
        manager = TaskManager(include_path=paths or None, include_defaults=not paths)
        found = set(manager.all_tasks)
        if paths and any(t.name not in found for t in obj.tasks):
            found = set(TaskManager(include_path=paths, include_defaults=True).all_tasks)
        for t in obj.tasks:
            report.tasks.append({"objective": label, "task": t.name, "metric": t.metric, "found": t.name in found})
        missing = [t.name for t in obj.tasks if t.name not in found]
        if missing:
            report.add("tasks", "error", f"{label}: lm-eval task(s) not found: {', '.join(missing)}",
                       "check the task names, or add the folder of their YAML files to include_path")
        elif not bad:
            _check_task_contents(label, obj, paths, report)


def _check_task_contents(label: str, obj, paths: list[str], report: CheckReport) -> None:
    """Load the tasks as the workers will (their documents, not a model): each must have items to score and
    compute the metric the objective names."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=paths or None, include_defaults=not paths)
    if any(t.name not in manager.all_tasks for t in obj.tasks):
        manager = TaskManager(include_path=paths, include_defaults=True)
    problems = 0
    for t in obj.tasks:
        try:
            task = manager.load([t.name])["tasks"][t.name]
            docs = task.eval_docs
        except StopIteration:  # what the datasets json/csv loaders raise on an empty file
            report.add("tasks", "error", f"{label}: task {t.name} has no items to score (its data file is empty)",
                       "check the task's data file and split")
            problems += 1
            continue
        except Exception as e:  # noqa: BLE001 - any failure to load is the user's to see
            report.add("tasks", "error", f"{label}: task {t.name} cannot be loaded: {type(e).__name__}: {e}",
                       "check the task's YAML and its data files (offline: they must be on this machine)")
            problems += 1
            continue
        if len(docs) == 0:
            report.add("tasks", "error", f"{label}: task {t.name} has no items to score",
                       "check the task's data file and split")
            problems += 1
        if t.gen_kwargs and task.config.output_type != "generate_until":
            report.add("tasks", "error", f"{label}: task {t.name} has gen_kwargs, but it is a "
                       f"{task.config.output_type} task", "gen_kwargs apply to generate_until tasks only: drop them")
            problems += 1
        metrics = [m["metric"] if isinstance(m, dict) else str(m) for m in (task.config.metric_list or [])]
        if metrics and t.metric.split(",")[0] not in metrics:
            report.add("tasks", "error", f"{label}: task {t.name} has no metric '{t.metric}'",
                       f"its metrics: {', '.join(metrics)}")
            problems += 1
        else:
            for r in report.tasks:
                if r["task"] == t.name and r["objective"] == label:
                    r["items"] = len(docs)
    if not problems:
        report.add("tasks", "ok", f"{label}: {len(obj.tasks)} task(s) found and loaded")


def check_config(cfg: SearchConfig, config_name: str = "config", address: str | None = None,
                 resources: bool = True) -> CheckReport:
    """Everything checkable before a search starts, without reading a weight (see the module docstring)."""
    report = CheckReport(config=config_name)
    opened = _check_sources(cfg, report)
    try:
        _check_compatible(cfg, opened, report)
        try:
            check_tasks(cfg, report)
        except EvomergeError as e:
            report.error("tasks", e)
        if resources:
            _check_resources(cfg, report, address, opened)
    finally:
        for s in opened.values():
            s.close()
    return report


def preflight(cfg: SearchConfig):
    """Everything checkable before any weight is loaded: sources, the space, the tasks."""
    space = make_space(cfg)  # for M2N2 this also checks the seeds fit together and computes their Gram
    if cfg.search == "m2n2":
        pass
    elif isinstance(space, DataflowSpace):
        from evomerge.merge.dataflow import check_path, open_path_sources

        recipe = space.to_recipe(space.x0)
        sources = open_path_sources(recipe)
        try:
            check_path(recipe.model_copy(update={"path": tuple(
                Hop(model=m, layer=layer) for m, layer in space.layer_index)}), sources)  # every layer usable
            if cfg.workers.backend == "vllm":
                from workers.vllm_dfs import check_engine_paths

                check_engine_paths(sources, recipe.head)  # one engine runs every path, or the reason it cannot
        finally:
            for src in sources.values():
                src.close()
    else:
        from evomerge.merge.plan import make_plan

        for sub in getattr(space, "spaces", [space]):  # every searched method
            make_plan(sub.to_recipe(sub.x0)).close()  # sources compatible, parameters valid
    _check_tasks(cfg)
    from workers.eval_options import import_functions

    import_functions(cfg)  # the user's scoring functions import here before any worker starts
    return space


def _check_tasks(cfg: SearchConfig) -> None:
    """The tasks exist, load, have items and compute the metric asked for (the same check as `evomerge check`)."""
    from evomerge.run.check import CheckReport, check_tasks

    report = CheckReport(config="config")
    check_tasks(cfg, report)
    report.raise_if_failed()


def _check_resources(cfg: SearchConfig, report: CheckReport, address: str | None, opened: dict[str, Any]) -> None:
    w = cfg.workers
    try:
        avail = available_resources(address)
    except EvomergeError as e:
        report.error("resources", e)
        return
    report.resources = {
        "requested": f"{w.count} workers x ({w.cpus:g} CPUs, {w.gpus:g} GPUs), backend {w.backend}, {w.dtype}",
        "available": f"{avail['cpus']:g} CPUs, {avail['gpus']:g} GPUs, {human_size(avail['memory'])} memory "
                     f"({human_size(avail['memory_available'])} free) on {avail['where']}",
    }
    if w.gpus > 0 and avail["node_gpus"] < w.gpus:
        report.add("resources", "error", f"each worker asks for {w.gpus:g} GPU(s) but {avail['where']} has "
                   f"{avail['node_gpus']:g} per node", "set workers.gpus: 0 (CPU workers) or run on GPU machines")
    elif w.cpus > avail["node_cpus"]:
        report.add("resources", "error", f"each worker asks for {w.cpus:g} CPUs but {avail['where']} has "
                   f"{avail['node_cpus']:g} per node", f"set workers.cpus to at most {avail['node_cpus']:g}")
    else:
        fit = min(w.count, int(avail["cpus"] // w.cpus) if w.cpus else w.count,
                  int(avail["gpus"] // w.gpus) if w.gpus else w.count)
        if fit < w.count:
            report.add("resources", "warn", f"{w.count} workers requested, {fit} fit at once on {avail['where']}",
                       "lower workers.count, or add nodes (the others wait for room)")
        else:
            report.add("resources", "ok", f"{w.count} worker(s) fit")
    source_bytes = sum(sum(i.end - i.start for i in s.tensors.values()) for s in opened.values())
    ref = opened.get(cfg.base) if cfg.base in opened else next(iter(opened.values()), None)
    mem = estimate_memory(cfg, ref, source_bytes)
    if not mem:
        return
    report.memory = mem
    per_worker = mem["total per worker"]
    if avail["memory"] and per_worker > avail["memory"]:
        report.add("memory", "error", f"one worker needs about {human_size(per_worker)} (resident model "
                   f"{human_size(mem['resident model'])}, sources {human_size(source_bytes)}, "
                   f"scoring {human_size(mem['scoring'])})"
                   f" but a node has {human_size(avail['memory'])}",
                   "use machines with more memory, a smaller workers.dtype (bfloat16) or batch_size, or smaller "
                   "models")
    else:
        shared = mem["total per worker"] - source_bytes
        together = source_bytes + shared * max(1, min(w.count, int(avail["node_cpus"] // w.cpus) if w.cpus else
                                                       w.count))
        if avail["memory_available"] and together > avail["memory_available"]:
            report.add("memory", "warn", f"the workers of one node need about {human_size(together)}, "
                       f"{human_size(avail['memory_available'])} is free now", "lower workers.count or batch_size")
        else:
            report.add("memory", "ok", f"about {human_size(per_worker)} per worker")
