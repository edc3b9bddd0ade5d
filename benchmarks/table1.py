"""The EvoMerge paper's Table 1, in miniature: does a searched merge beat what a user would set by hand?

On a test bed (default: the `deep` zoo, four experts of a 6-layer tiny Llama), this scores on the TEST split:
the base, each expert, the merges a user would try first — each chosen on the VALIDATION split of the
objective (mean of the mixed and compositional tasks) — and the searched merges (PS with CMA-ES over several
seeds, PS with the merge method searched, DFS, PS+DFS, M2N2), each run with `evomerge`'s own search, its
pick exported by validation as `evomerge export` does. Per pick: search / validation / test scores, evaluations
and wall time. Then paired McNemar tests of each search pick against the strongest baseline on the same test
items, per seed and pooled over seeds. Writes results/table1.md (+ raw JSON) and results/table1.png.

Baselines (all per the zoo's experts, scored by the zoo's exact-match scorer, which agrees item for item with
lm-eval's `acc` on these tasks — tests/test_zoo.py):
  uniform average       linear merge of the experts, equal weights
  TA shared weight      task arithmetic, one weight for every expert, grid 0..1.5 step 0.125
  TA per-expert weights task arithmetic, one weight per expert: random search with the PS search's budget
                        (the 4-D grid is too large), uniform in the PS bounds, seeded
  TIES / DARE-TIES      mergekit's usual set-up: weight 1 per expert, density 0.3 / 0.5 / 0.7 (normalize on)
  untuned TIES          weight 1, density 0.5, mergekit's defaults otherwise (no choice on validation)

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/table1.py [--bed deep] [--seeds 3] [--budget 200]
      [--only ps,dfs,...] [--merge]

The real3 bed (`--bed real3`: SmolLM2-135M + experts upper / reverse / double, evomerge/zoo/real.py) runs the
same table at a size a 2-core CPU allows: the zoo's teacher-forced scorer (`evomerge.zoo.real.score_items`,
= lm-eval's `acc` on the loglikelihood tasks), validation and test on the first --val-limit / --test-limit
items of each task, the per-expert TA baseline as a grid (--pe-grid) instead of a random search, and only the
PS search (configs/real3-ps.yaml). Rows are written to the JSON as they come (--out's .json), so a cut-short run
keeps what ran; with --merge the rows on disk that this run does not redo are kept (read when writing).
It measures and writes tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import BENCH, REPO, header_md, machine_facts, md_table  # noqa: E402
from _zoo_search import zoo_config  # noqa: E402

from evomerge.zoo.merges import wilson  # noqa: E402

TASKS = ("mixed", "compositional")
SEARCHES_REAL3 = {
    "ps": ("PS: task arithmetic, 2 layer groups, CMA-ES", "configs/real3-ps.yaml", {}, "all"),
}
SEARCHES = {  # key: (label, config file, top-level overrides, seeds: "all" or 1)
    "ps": ("PS: task arithmetic per layer, CMA-ES", "configs/deep-ps.yaml", {}, "all"),
    "ps-method": ("PS: method searched (TA / TIES / DARE-TIES), CMA-ES", "configs/deep-ps.yaml",
                  {"space": {"method": ["task_arithmetic", "ties", "dare_ties"], "search": ["weight", "density"],
                             "fixed": {"normalize": False}}}, 1),
    "dfs": ("DFS: layer path through the experts", "configs/deep-dfs.yaml", {}, 1),
    "hybrid": ("PS+DFS: a path through the PS merge and the experts", "configs/deep-hybrid.yaml", {}, 1),
    "m2n2": ("M2N2 over the experts", "configs/deep-m2n2.yaml", {}, 1),
    # ablations of the PS search's space (what the defaults should be)
    "ps-model": ("ablation: PS with one weight per expert (granularity model), CMA-ES", "configs/deep-ps.yaml",
                 {"space": {"granularity": "model"}}, "all"),
    "ps-start-uniform": ("ablation: PS per layer starting at the uniform average (x0 = 1/4, bounds 0..1)",
                         "configs/deep-ps.yaml", {"space": {"x0": 0.25, "bounds": {"weight": (0.0, 1.0)}}}, "all"),
    "ps-no-embed-head": ("ablation: PS per layer, embeddings/head follow layer 0 (embed_head false)",
                         "configs/deep-ps.yaml", {"space": {"embed_head": False}}, "all"),
}


# ---- statistics ------------------------------------------------------------------------------------------

def mcnemar(a: list[int], b: list[int]) -> dict:
    """Exact two-sided McNemar test of paired 0/1 outcomes: a right & b wrong vs the reverse."""
    from scipy.stats import binomtest

    wins = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    losses = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "p": float(p), "diff": (wins - losses) / len(a)}


# ---- the deep zoo bed --------------------------------------------------------------------------------------

class ZooBed:
    """A tiny-zoo test bed: resident merges and the zoo's exact-match scorer, per item."""

    def __init__(self, zoo: Path):
        import torch

        from evomerge.zoo.build import load_zoo, zoo_items
        from evomerge.zoo.merges import ResidentMerger

        torch.set_num_threads(1)
        self.zoo = zoo
        self.manifest = load_zoo(zoo)
        self.experts = [n for n, m in self.manifest["models"].items() if m.get("skill")]
        self.merger = ResidentMerger(zoo)
        self.items = {(t, s): zoo_items(zoo, t, s) for t in TASKS for s in ("validation", "test")}

    def _score(self, model, split: str) -> dict[str, list[int]]:
        from evomerge.zoo.score import score_items

        return {t: score_items(model, self.merger.tokenizer, self.items[(t, split)]) for t in TASKS}

    def recipe(self, split: str, recipe: dict) -> dict[str, list[int]]:
        return self._score(self.merger.load(recipe), split)

    def model(self, split: str, name: str) -> dict[str, list[int]]:
        return self._score(self.merger.load_model(name), split)

    def directory(self, split: str, path: Path) -> dict[str, list[int]]:
        from transformers import AutoModelForCausalLM

        return self._score(AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval(), split)

    def ta(self, weights: list[float], method: str = "task_arithmetic", **params) -> dict:
        from evomerge.zoo.merges import merge_recipe

        return merge_recipe(self.zoo, method, dict(zip(self.experts, weights, strict=True)), **params)


class RealBed(ZooBed):
    """The real3 zoo (SmolLM2-135M experts): the same interface, the real zoo's scorers, items cut to a limit."""

    def __init__(self, zoo: Path, threads: int, limits: dict[str, int | None], test_scorer: str = "teacher"):
        import torch

        from evomerge.zoo.build import load_zoo, zoo_items
        from evomerge.zoo.merges import ResidentMerger

        torch.set_num_threads(threads)
        self.zoo = zoo
        self.manifest = load_zoo(zoo)
        self.experts = list(self.manifest["experts"])
        self.merger = ResidentMerger(zoo)
        self.items = {(t, s): zoo_items(zoo, t, s)[: limits.get(s)] for t in TASKS for s in ("validation", "test")}
        self.test_scorer = test_scorer
        self.cache: dict[tuple[str, str], dict] = {}

    def _score(self, model, split: str) -> dict[str, list[int]]:
        from evomerge.zoo.real_train import score_items, score_items_gen

        score = score_items_gen if split == "test" and self.test_scorer == "gen" else score_items
        return {t: score(model, self.merger.tokenizer, self.items[(t, split)]) for t in TASKS}

    def recipe(self, split: str, recipe: dict) -> dict[str, list[int]]:
        key = (split, json.dumps(recipe, sort_keys=True))  # untuned TIES = TIES d 0.5, a grid point twice: once
        if key not in self.cache:
            self.cache[key] = super().recipe(split, recipe)
        return self.cache[key]

    def load_source(self, name: str):
        from safetensors.torch import load_file

        sd = load_file(str(Path(self.manifest["models"][name]["path"]) / "model.safetensors"))
        missing, unexpected = self.merger.model.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied embeddings
        return self.merger.model

    def model(self, split: str, name: str) -> dict[str, list[int]]:
        return self._score(self.load_source(name), split)

    def describe(self) -> str:
        c = self.manifest["config"]
        n = {(t, s): len(self.items[(t, s)]) for t in TASKS for s in ("validation", "test")}
        scorer = ("greedy generation to the newline, exact match (`score_items_gen`, = lm-eval's `exact_match` on "
                  "the `_gen` tasks)" if self.test_scorer == "gen" else
                  "teacher-forced greedy exact match (`evomerge.zoo.real.score_items`, = lm-eval's `acc` on the "
                  "loglikelihood tasks)")
        return (f"Test bed: `{self.zoo.name}` — {len(self.experts)} fully fine-tuned experts "
                f"({', '.join(self.experts)}) of {c['base_model']}; `mixed` cycles through the skills, "
                f"`compositional` needs two at once ({', '.join(c['compositional'])}). Items scored: validation "
                f"{n[('mixed', 'validation')]} mixed + {n[('compositional', 'validation')]} compositional, test "
                f"{n[('mixed', 'test')]} + {n[('compositional', 'test')]} (the first items of each split's file; "
                "the splits are disjoint). Test scorer: " + scorer + ". Validation scorer (baselines' choice and "
                "the search's validation): teacher-forced. Objective (search and validation): the mean of the two "
                "tasks. Baselines are chosen on the validation split; search picks are what `evomerge export` "
                "exports (best by validation). Intervals: 95% Wilson.\n\n")


def objective(scores: dict[str, list[int]]) -> float:
    return statistics.mean(statistics.mean(v) for v in scores.values())


def baselines(bed: ZooBed, budget: int, bounds: tuple[float, float], shared_grid: list[float] | None = None,
              pe_grid: list[float] | None = None, sink=None) -> list[dict]:
    """Every baseline row: its candidates scored on validation, the one picked there scored on test.

    `shared_grid`: the TA shared weights (default 0..1.5 step 0.125); `pe_grid`: per-expert TA weights as a grid
    (every combination) instead of a random search with the search's budget. `sink(rows)` after every row."""
    import itertools

    import numpy as np

    k = len(bed.experts)
    rows = []
    for e in ("base", *bed.experts):
        rows.append({"name": f"expert {e}" if e != "base" else "base", "kind": "source", "pick": e,
                     "validation": objective(bed.model("validation", e)), "test": bed.model("test", e)})
        print(f"{rows[-1]['name']}: validation {rows[-1]['validation']:.3f} test {objective(rows[-1]['test']):.3f}",
              flush=True)
        if sink:
            sink(rows)
    shared = shared_grid if shared_grid is not None else [float(w) for w in np.round(np.arange(0.0, 1.5001, 0.125), 3)]
    families: dict[str, list[tuple[str, dict]]] = {
        "uniform average": [("equal weights", bed.ta([1.0] * k, "linear"))],
        "untuned TIES (weight 1, density 0.5)": [("d 0.5", bed.ta([1.0] * k, "ties", density=0.5))],
        f"TA shared weight (grid, {len(shared)} values)": [(f"w {w:g}", bed.ta([float(w)] * k)) for w in shared],
        "TIES (d 0.3 / 0.5 / 0.7, weight 1)": [
            (f"d {d}", bed.ta([1.0] * k, "ties", density=d)) for d in (0.3, 0.5, 0.7)],
        "DARE-TIES (d 0.3 / 0.5 / 0.7, weight 1)": [
            (f"d {d}", bed.ta([1.0] * k, "dare_ties", density=d)) for d in (0.3, 0.5, 0.7)],
    }
    if pe_grid:
        draws = list(itertools.product(pe_grid, repeat=k))
        family = f"TA per-expert weights (grid {'/'.join(f'{w:g}' for w in pe_grid)} per expert, {len(draws)} points)"
    else:
        rng = np.random.default_rng(12345)
        lo, hi = bounds
        draws = rng.uniform(lo, hi, size=(budget, k))
        family = f"TA per-expert weights (random search, {budget} candidates)"
    families[family] = [("w " + "/".join(f"{w:.2f}" for w in ws), bed.ta([float(w) for w in ws])) for ws in draws]
    for name, cands in families.items():
        t0 = time.perf_counter()
        best = max(((objective(bed.recipe("validation", r)), label, r) for label, r in cands),
                   key=lambda c: c[0])
        rows.append({"name": name, "kind": "baseline", "pick": best[1], "validation": best[0],
                     "candidates": len(cands), "recipe": best[2], "test": bed.recipe("test", best[2]),
                     "seconds": time.perf_counter() - t0})
        print(f"{name}: pick {best[1]} validation {best[0]:.3f} test {objective(rows[-1]['test']):.3f}", flush=True)
        if sink:
            sink(rows)
    return rows


def run_one(bed: ZooBed, key: str, seed: int, budget: int, work: Path) -> dict:
    """One search with evomerge itself; its pick (by validation) exported and scored on test."""
    from evomerge.run.rundir import RunDir
    from evomerge.run.stages import run_search
    from evomerge.run.status import export_best, status

    label, cfg_file, over, _ = SEARCHES[key]
    base = zoo_config(cfg_file, bed.zoo)
    upd: dict = {"seed": seed, "optimizer": base.optimizer.model_copy(update={"seed": seed, "budget": budget})}
    if "space" in over:
        upd["space"] = base.space.model_copy(update=over["space"])
    if "optimizer" in over:
        upd["optimizer"] = upd["optimizer"].model_copy(update=over["optimizer"])
    if base.dataflow is not None:
        upd["dataflow"] = base.dataflow.model_copy(update={"budget": budget})
    cfg = base.model_copy(update=upd)
    cfg = type(cfg).model_validate(cfg.model_dump())
    run = work / f"{key}-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    run_search(cfg, run, progress=False)
    wall = time.perf_counter() - t0
    st = status(run)
    out = export_best(run, work / f"{key}-{seed}-best")
    stage_dirs = [run / s for s in ("ps", "dfs") if (run / s).is_dir()] or [run]
    evals = sum(sum(1 for r in RunDir(d).records() if r["type"] == "eval") for d in stage_dirs)
    row = {"name": label, "key": key, "kind": "search", "seed": seed, "search": st["best"]["fitness"],
           "validation": st["best"]["validation"], "evaluations": evals, "wall": wall,
           "method": st["best"]["recipe"].get("method") if isinstance(st["best"].get("recipe"), dict) else None,
           "test": bed.directory("test", out)}
    print(f"{label} seed {seed}: search {row['search']:.3f} validation {row['validation']} "
          f"test {objective(row['test']):.3f} ({evals} evaluations, {wall:.0f} s)", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def references(rows: list[dict]) -> tuple[dict, dict, dict]:
    """What a user would ship without a search (best validation objective among sources and hand-set merges),
    the hindsight-best baseline on compositional test and the hindsight-best baseline on the mean of the tasks."""
    base_rows = [r for r in rows if r["kind"] == "baseline"]
    sources = [r for r in rows if r["kind"] == "source"]
    return (max(base_rows + sources, key=lambda r: r["validation"]),
            max(base_rows, key=lambda r: statistics.mean(r["test"]["compositional"])),
            max(base_rows, key=lambda r: objective(r["test"])))


def _ident(r: dict) -> tuple:
    return r["kind"], r["name"], r.get("seed")


def gen_check(bed: RealBed, rows: list[dict], work: Path, tasks: tuple[str, ...], out_json: Path) -> None:
    """The headline metric (greedy generation, exact match) on the test items of the rows that the paired tests
    use: the deployed merge, the two hindsight-best baselines, the best source by validation, every PS pick
    (rebuilt from its run's best-by-validation recipe, the one `evomerge export` builds). Stored per row as
    `test_gen`; rows already scored are skipped. Written into the JSON on disk after every row (merged by row
    identity: another process may be adding rows)."""
    from evomerge.run.status import status
    from evomerge.zoo.real_train import score_items_gen

    want: list[dict] = []
    if any(r["kind"] == "baseline" for r in rows):
        want += list(references(rows))
        want.append(max((r for r in rows if r["kind"] == "source"), key=lambda r: r["validation"]))
    want += [r for r in rows if r.get("key") == "ps"]
    seen = set()
    for r in want:
        if _ident(r) in seen or all(t in r.get("test_gen", {}) for t in tasks):
            continue
        seen.add(_ident(r))
        t0 = time.perf_counter()
        if r["kind"] == "source":
            model = bed.load_source(r["pick"])
        elif r["kind"] == "baseline":
            model = bed.merger.load(r["recipe"])
        else:
            model = bed.merger.load(status(work / f"{r['key']}-{r['seed']}")["best"]["recipe"])
        for t in tasks:
            r.setdefault("test_gen", {})[t] = score_items_gen(model, bed.merger.tokenizer, bed.items[(t, "test")])
        same = {t: sum(a == b for a, b in zip(r["test_gen"][t], r["test"][t], strict=True)) for t in tasks}
        print(f"gen {r['name']} {r.get('seed', '')}: " + ", ".join(
            f"{t} {statistics.mean(r['test_gen'][t]):.3f} (teacher {statistics.mean(r['test'][t]):.3f}, "
            f"{same[t]}/{len(r['test'][t])} items agree)" for t in tasks) + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True)
        disk = json.loads(out_json.read_text())
        for d in disk["rows"]:
            if _ident(d) == _ident(r):
                d["test_gen"] = r["test_gen"]
        tmp = out_json.with_suffix(f".json.{os.getpid()}")
        tmp.write_text(json.dumps(disk) + "\n")
        tmp.replace(out_json)


def gen_section(rows: list[dict]) -> str:
    """The rows scored by generation: their scores, agreement with the teacher-forced check, paired tests."""
    have = [r for r in rows if r.get("test_gen")]
    if not have:
        return ""
    tasks = [t for t in TASKS if all(t in r["test_gen"] for r in have)]
    deployed, strongest, strongest_mean = references(rows)
    lines = ["\n### Headline metric: greedy generation, exact match (test items)\n",
             "Scored for the rows the paired tests use (`score_items_gen`, = lm-eval's `exact_match` on the "
             "`zoo_*_gen_test` tasks). *agree*: items where generation and the teacher-forced check give the same "
             "verdict.\n"]
    tab = []
    for r in have:
        label = r["name"] + (f" (seed {r['seed']})" if r["kind"] == "search" else "")
        for t in tasks:
            g, te = r["test_gen"][t], r["test"][t]
            tab.append([label, t, fmt_ci(g), f"{statistics.mean(te):.3f}",
                        f"{sum(a == b for a, b in zip(g, te, strict=True))}/{len(g)}"])
    lines.append(md_table(["model / merge", "task", "generation exact match", "teacher-forced", "agree"], tab))
    ps = [r for r in have if r.get("key") == "ps"]
    tests = []
    for ref, what in ((deployed, "deployed"), (strongest, "oracle (compositional)"),
                      (strongest_mean, "oracle (mean)")):
        if not ref.get("test_gen"):
            continue
        for label, group in [*((str(r["seed"]), [r]) for r in ps), *([("pooled", ps)] if len(ps) > 1 else [])]:
            for tk in [(t,) for t in tasks] + ([tuple(tasks)] if len(tasks) > 1 else []):
                m = mcnemar([x for r in group for t in tk for x in r["test_gen"][t]],
                            [x for _ in group for t in tk for x in ref["test_gen"][t]])
                tests.append([f"{what}: {ref['name']} ({ref['pick']})", label, "+".join(tk),
                              f"{m['diff']:+.3f} ({m['wins']}/{m['losses']})", f"{m['p']:.2g}"])
    if tests:
        lines.append("\nPaired tests of the PS picks on generation exact match:\n")
        lines.append(md_table(["against", "seed", "items", "Δ (wins/losses)", "p"], tests))
    if ps and "compositional" in tasks:
        for ref, what in ((deployed, "what a user would ship"), (strongest, "the hindsight-best baseline")):
            if ref.get("test_gen"):
                m = mcnemar([x for r in ps for x in r["test_gen"]["compositional"]],
                            [x for _ in ps for x in ref["test_gen"]["compositional"]])
                ok = m["p"] < 0.05 and m["diff"] > 0
                lines.append(f"\n- (generation exact match) PS beats {what} ({ref['name']}) on compositional, "
                             f"McNemar p < 0.05 over {len(ps)} seeds: **{'reached' if ok else 'missed'}** "
                             f"(Δ {m['diff']:+.3f}, {m['wins']}/{m['losses']}, p = {m['p']:.2g})")
    return "\n".join(lines) + "\n"


# ---- the report ------------------------------------------------------------------------------------------

NOTES = "<!-- notes: kept when the table is rewritten -->"


def _half(rows: list[dict]) -> float:
    """95% normal half-width of the mean accuracy over every test item of `rows` (both tasks, all seeds)."""
    v = [x for r in rows for t in TASKS for x in r["test"][t]]
    m = statistics.mean(v)
    return 1.96 * math.sqrt(m * (1 - m) / len(v))


def goals(rows: list[dict], hand: list[dict], deployed: dict, strongest: dict) -> str:
    """Issue 27's goals, each marked reached or missed with its evidence (computed, not written by hand)."""
    by = {k: [r for r in rows if r.get("key") == k] for k in ("ps", "ps-method", "dfs", "hybrid", "m2n2", *SEARCHES)}
    lines = ["\n### Goals\n"]

    def pooled(group: list[dict], ref: dict, tasks: tuple[str, ...]) -> dict:
        return mcnemar([x for r in group for t in tasks for x in r["test"][t]],
                       [x for _ in group for t in tasks for x in ref["test"][t]])

    mean = lambda group: statistics.mean(objective(r["test"]) for r in group)  # noqa: E731
    if by["ps"]:
        for ref, what in ((deployed, "what a user would ship without a search"),
                          (strongest, "the strongest hand-set merge on compositional test (hindsight)")):
            m = pooled(by["ps"], ref, ("compositional",))
            ok = m["p"] < 0.05 and m["diff"] > 0
            lines.append(f"- PS beats {what} ({ref['name']}) on compositional, McNemar p < 0.05 over "
                         f"{len(by['ps'])} seeds: **{'reached' if ok else 'missed'}** (Δ {m['diff']:+.3f}, "
                         f"{m['wins']}/{m['losses']}, p = {m['p']:.2g})")
    if by["hybrid"] and by["ps"]:
        same = [r for r in by["ps"] if r["seed"] == by["hybrid"][0]["seed"]]
        if same:
            a, b = objective(by["hybrid"][0]["test"]), objective(same[0]["test"])
            lines.append(f"- PS+DFS ≥ PS (same seed): **{'reached' if a >= b else 'missed'}** ({a:.3f} vs {b:.3f})")
    sources = [r for r in hand if r["kind"] == "source"]
    best_src = max(sources, key=lambda r: r["validation"])
    if by["dfs"]:
        m = pooled(by["dfs"], best_src, TASKS)
        ok = m["diff"] > 0 and m["p"] < 0.05
        lines.append(f"- DFS above the best source ({best_src['name']}, by validation), both tasks: "
                     f"**{'reached' if ok else 'missed'}** (Δ {m['diff']:+.3f}, p = {m['p']:.2g})")
    if by["m2n2"] and by["ps"]:
        a, b, h = mean(by["m2n2"]), mean(by["ps"]), _half(by["ps"])
        ok = a >= b - h
        lines.append(f"- M2N2 within the interval of CMA-ES: **{'reached' if ok else 'missed'}** (M2N2 {a:.3f}, "
                     f"PS {b:.3f} ± {h:.3f})")
    lines.append("\n### Generalisation: search / validation / test of every pick\n")
    gen = []
    for k, group in by.items():
        if group:
            s = statistics.mean(r["search"] for r in group)
            v = statistics.mean(r["validation"] for r in group)
            te = mean(group)
            gen.append([SEARCHES[k][0], str(len(group)), f"{s:.3f}", f"{v:.3f}", f"{te:.3f}", f"{s - te:+.3f}"])
    lines.append(md_table(["search", "seeds", "search", "validation", "test", "search − test"], gen))
    return "\n".join(lines) + "\n"

def fmt_ci(v: list[int]) -> str:
    lo, hi = wilson(sum(v), len(v))
    return f"{statistics.mean(v):.3f} [{lo:.3f}, {hi:.3f}]"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.34 * len(rows) + 1.4), sharey=True)
    names = [r["label"] for r in rows]
    colors = {"source": "0.65", "baseline": "tab:blue", "search": "tab:red"}
    for ax, task in zip(axes, TASKS, strict=True):
        means, errs = [], [[], []]
        for r in rows:
            v = r["test"][task]
            m = statistics.mean(v)
            lo, hi = wilson(sum(v), len(v))
            means.append(m)
            errs[0].append(m - lo)
            errs[1].append(hi - m)
        ys = range(len(rows))
        ax.barh(ys, means, xerr=errs, color=[colors[r["kind"]] for r in rows], capsize=2)
        ax.set_title(f"{task} (test, 95% Wilson)")
        ax.set_xlim(0, min(1.0, 1.15 * max(m + e for m, e in zip(means, errs[1], strict=True))))
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
    axes[0].invert_yaxis()  # shared y: once for both panels; sources on top, searches below
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def report(args, bed: ZooBed, rows: list[dict], commands: list[str], load: list[str]) -> None:
    n = {t: len(bed.items[(t, "test")]) for t in TASKS}
    base_rows = [r for r in rows if r["kind"] == "baseline"]
    sources = [r for r in rows if r["kind"] == "source"]
    for r in sources:
        if r.get("validation") is None:  # rows recorded before sources were validated
            r["validation"] = objective(bed.model("validation", r["pick"]))
    best_source = max(sources, key=lambda r: objective(r["test"]))
    table, fig_rows = [], []
    for r in rows:
        label = r["name"] + (f" (seed {r['seed']})" if r["kind"] == "search" else "")
        fig_rows.append({**r, "label": label})
        table.append([label, r.get("pick", r.get("method") or ""),
                      f"{r['search']:.3f}" if r.get("search") is not None else "",
                      f"{r['validation']:.3f}" if r.get("validation") is not None else "",
                      fmt_ci(r["test"]["mixed"]), fmt_ci(r["test"]["compositional"]), f"{objective(r['test']):.3f}",
                      str(r.get("evaluations", r.get("candidates", ""))),
                      f"{r['wall']:.0f}" if r.get("wall") else ""])
    # paired tests: against what a user would deploy without a search (the best validation objective among the
    # sources and the hand-set merges) and against the strongest baseline on each task's TEST split (an oracle
    # choice no user has: the conservative bar)
    deployed, strongest, strongest_mean = references(rows)
    tests = []
    for key in SEARCHES:
        runs = [r for r in rows if r.get("key") == key]
        for label, group in [*((str(r["seed"]), [r]) for r in runs),
                             *([(f"pooled {len(runs)} seeds", runs)] if len(runs) > 1 else [])]:
            def pair(ref: dict, tasks: tuple[str, ...], group=group) -> dict:
                a = [x for r in group for t in tasks for x in r["test"][t]]
                b = [x for _ in group for t in tasks for x in ref["test"][t]]
                return mcnemar(a, b)

            cells = []
            for ref, tasks in ((deployed, ("compositional",)), (deployed, ("mixed",)), (deployed, TASKS),
                               (strongest, ("compositional",)), (strongest_mean, ("mixed",)),
                               (strongest_mean, TASKS)):
                m = pair(ref, tasks)
                cells += [f"{m['diff']:+.3f} ({m['wins']}/{m['losses']})", f"{m['p']:.2g}"]
            tests.append([SEARCHES[key][0], label, *cells])
    text = header_md(f"Table 1 in miniature: searched merges against hand-set ones ({args.bed} test bed)",
                     commands[-1].split(), machine_facts(None))
    text += bed.describe() if hasattr(bed, "describe") else (
             f"Test bed: `{bed.zoo.name}` — {len(bed.experts)} experts ({', '.join(bed.experts)}) of a "
             f"{bed.manifest['config']['layers']}-layer tiny Llama (hidden {bed.manifest['config']['hidden']}); "
             f"`mixed` cycles through the experts' skills, `compositional` chains two skills "
             f"({len(bed.manifest['config']['curriculum']['pairs'])} pairs). Test items: {n['mixed']} mixed, "
             f"{n['compositional']} compositional, disjoint from the search and validation items. Objective "
             "(search and validation): the mean of the two tasks. Baselines are chosen on the validation split; "
             "search picks are what `evomerge export` exports (best by validation). Intervals: 95% Wilson.\n\n")
    text += "Machine load (1-minute load average, 2 cores) during the run: " + ", ".join(load) + ".\n\n"
    text += md_table(["model / merge", "pick", "search", "validation", "mixed test", "compositional test", "mean",
                      "evaluations / candidates", "wall s"], table)
    text += f"\n\n![test scores]({args.out.with_suffix('.png').name})\n\n"
    text += ("### Paired tests (exact McNemar) on the test items\n\n"
             f"*Deployed*: what a user would ship without a search, the source model or hand-set merge with the "
             "best validation objective "
             f"(**{deployed['name']}**, pick {deployed['pick']}). *Oracle*: the strongest baseline on each task's "
             f"test split, a choice no user can make (compositional: **{strongest['name']}**, pick "
             f"{strongest['pick']}; mixed and both tasks: the best on the mean, **{strongest_mean['name']}**, "
             f"pick {strongest_mean['pick']}). Cells: "
             "Δ accuracy (items the search pick gets right and the baseline wrong / the reverse) and p. Both "
             f"tasks: the {n['mixed'] + n['compositional']:,} items of mixed and compositional together. "
             "Pooled: every seed's items as pairs.\n\n")
    text += md_table(["search", "seed", "vs deployed: compositional", "p", "mixed", "p", "both tasks", "p",
                      "vs oracle: compositional", "p", "mixed", "p", "both tasks", "p"], tests)
    text += (f"\n\nBest source on the mean: {best_source['name']} ({objective(best_source['test']):.3f}).\n")
    if len(commands) > 1:
        text += "\nRows come from these runs, in order:\n\n" + "".join(f"    {c}\n" for c in commands)
    text += goals(rows, base_rows + sources, deployed, strongest)
    text += gen_section(rows)
    text += f"\nPer-item scores of every row: `{args.out.with_suffix('.json').name}`.\n"
    notes = args.out.read_text().split(NOTES, 1)[1] if args.out.exists() and NOTES in args.out.read_text() else \
        "\n(Hand-written findings go below this marker; the script keeps them when it rewrites the file.)\n"
    text += f"\n{NOTES}{notes}"
    plot(fig_rows, args.out.with_suffix(".png"))
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "commands": commands, "load": load}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bed", default="deep", choices=["deep", "real3"])
    ap.add_argument("--threads", type=int, default=1, help="real3: torch threads of the scoring process")
    ap.add_argument("--val-limit", type=int, default=None, help="real3: first N validation items per task")
    ap.add_argument("--test-limit", type=int, default=None, help="real3: first N test items per task")
    ap.add_argument("--gen-tasks", default="compositional", help="--only gen: tasks scored by generation")
    ap.add_argument("--test-scorer", default="teacher", choices=["teacher", "gen"], help="real3: test scorer")
    ap.add_argument("--shared-grid", default="", help="TA shared weights, comma-separated (default 0..1.5/0.125)")
    ap.add_argument("--pe-grid", default="", help="per-expert TA weights as a grid, comma-separated (default: "
                                                  "random search with --budget candidates)")
    ap.add_argument("--zoo", type=Path, default=None,
                    help="a built zoo (default: .bench/zoo_<bed>_0, built if missing)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the PS search (the others run seed 0)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="with --merge: run the PS seeds from this one on and keep the recorded lower seeds")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--only", default="", help="comma-separated: baselines and/or search keys " + ",".join(SEARCHES))
    ap.add_argument("--merge", action="store_true", help="keep the rows of the existing results not run now")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "table1.md")
    args = ap.parse_args()
    zoo = (args.zoo or BENCH / f"zoo_{args.bed}_0").resolve()
    if not (zoo / "zoo.json").exists():
        from evomerge.zoo.build import build_zoo

        print(f"building the {args.bed} zoo in {zoo} ...", flush=True)
        build_zoo(zoo, args.bed, seed=0)
    if args.bed == "real3":
        SEARCHES.clear()
        SEARCHES.update(SEARCHES_REAL3)
        bed = RealBed(zoo, args.threads, {"validation": args.val_limit, "test": args.test_limit}, args.test_scorer)
    else:
        bed = ZooBed(zoo)
    grid = lambda s: [float(x) for x in s.split(",")] if s else None  # noqa: E731
    only = set(filter(None, args.only.split(",")))
    command = " ".join(["HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", ".venv/bin/python", "benchmarks/table1.py",
                        *sys.argv[1:]])
    rows: list[dict] = []
    commands, load = [command], []
    def seeds_of(key: str) -> range:
        """The seeds this run does for a search (the others are kept from the results on disk)."""
        return range(args.first_seed, args.seeds) if SEARCHES[key][3] == "all" else range(int(args.first_seed == 0))

    mine = lambda r: (r["kind"] in ("baseline", "source") and (not only or "baselines" in only)  # noqa: E731
                      or r.get("key") is not None and (not only or r["key"] in only)
                      and r.get("seed", 0) in seeds_of(r["key"]))

    def on_disk() -> tuple[list[dict], list[str], list[str]]:
        """Rows, commands and load notes on disk that this run does not redo (read at every write: another
        process may be filling the other rows concurrently)."""
        if not (args.merge and args.out.with_suffix(".json").exists()):
            return [], [], []
        old = json.loads(args.out.with_suffix(".json").read_text())
        return ([r for r in old["rows"] if not mine(r)], [c for c in old["commands"] if c != command],
                [x for x in old["load"] if x not in load])

    def sink(new_rows: list[dict]) -> None:
        """Partial results: every row so far (this run's and the others' on disk) into the JSON."""
        done = [r for r in rows if not any(r is x for x in new_rows)] + new_rows
        other, cmds, ld = on_disk()
        tmp = args.out.with_suffix(f".json.{os.getpid()}")  # atomic: the other process may read it meanwhile
        tmp.write_text(json.dumps({"rows": other + done, "commands": cmds + [command], "load": ld + load,
                                   "partial": True}) + "\n")
        tmp.replace(args.out.with_suffix(".json"))
    work = BENCH / f"table1-{args.bed}"
    work.mkdir(parents=True, exist_ok=True)
    load.append(f"{os.getloadavg()[0]:.1f} at start")
    if not only or "baselines" in only:
        rows = [r for r in rows if r["kind"] not in ("source", "baseline")]
        rows[:0] = baselines(bed, args.budget, (0.0, 1.5), grid(args.shared_grid), grid(args.pe_grid), sink)
    for key in SEARCHES:
        if only and key not in only:
            continue
        rows = [r for r in rows if r.get("key") != key]
        for seed in seeds_of(key):
            rows.append(run_one(bed, key, seed, args.budget, work))
            load.append(f"{os.getloadavg()[0]:.1f} after {key} seed {seed}")
            sink([])
    other, cmds, ld = on_disk()
    rows, commands, load = other + rows, cmds + [command], ld + load
    if "gen" in only:
        gen_check(bed, rows, work, tuple(args.gen_tasks.split(",")), args.out.with_suffix(".json"))
        rows = json.loads(args.out.with_suffix(".json").read_text())["rows"]  # with the rows added meanwhile
    if not any(r["kind"] == "baseline" for r in rows) or not any(r["kind"] == "source" for r in rows):
        print("no baselines yet: rows kept in the JSON, the report waits for them", flush=True)
        return
    order = {"source": 0, "baseline": 1, "search": 2}
    rows.sort(key=lambda r: (order[r["kind"]], list(SEARCHES).index(r["key"]) if r.get("key") else 0,
                             r.get("seed", 0)))
    report(args, bed, rows, commands, load)


if __name__ == "__main__":
    main()
