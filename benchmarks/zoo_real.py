"""Does merging help on the real zoo (SmolLM2-135M experts)? Task-arithmetic grid, uniform average, TIES.

    evomerge zoo build .bench/zoo_real_0 --size real --seed 0 --threads 2
    python benchmarks/zoo_real.py --zoo .bench/zoo_real_0 --grid 0.25,0.5,0.75,1.0
    evomerge zoo build .bench/zoo_real3_0 --size real3 --seed 0 --threads 2
    python benchmarks/zoo_real.py --zoo .bench/zoo_real3_0 --grid 0.5,1.0     # 3 experts: 2^3 grid points

Every merge is built IN PLACE into one resident float32 SmolLM2 (`make_plan` + `build_into` on
`dict(model.state_dict())`) and scored on mixed and compositional (split --split, default test) with one of
the real zoo's scorers: `teacher` = the teacher-forced greedy-exact-match check (`evomerge.zoo.real.score_items`,
= lm-eval's `acc` on the loglikelihood tasks) or `gen` = greedy generation to the newline, exact match of the
stripped strings (`score_items_gen`, = lm-eval's `exact_match` on the real3 zoo's generation tasks); `auto`
picks `gen` for a zoo with generation tasks. Either is checked with lm-eval on one model (--lmeval).
Per-skill accuracy is read off mixed (its items cycle through the skills), per-pair accuracy off a real3
zoo's compositional (its items cycle through the pairs). Results are written after every model (partial runs
keep what ran): results/zoo_<tag>_grid.json (tag: the zoo's size unless --tag) and, for two experts, the
heatmap results/zoo_<tag>_grid.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.zoo.build import load_zoo, zoo_items  # noqa: E402
from evomerge.zoo.merges import wilson  # noqa: E402
from evomerge.zoo.real import REAL_VARIANTS  # noqa: E402
from evomerge.zoo.real_train import score_items, score_items_gen  # noqa: E402

SCORERS = {"teacher": score_items, "gen": score_items_gen}


def recipe(zoo: dict, method: str, weights: dict[str, float], **params) -> dict:
    models = zoo["models"]
    rm = {} if method == "linear" else {"base": {"path": models["base"]["path"]}}
    for s, w in weights.items():
        rm[s] = {"path": models[s]["path"], "parameters": {"weight": w, **params}}
    r = {"method": method, "models": rm}
    if method != "linear":
        r["base"] = "base"
    return r


def _acc(s: list[int]) -> dict:
    k, n = sum(s), len(s)
    lo, hi = wilson(k, n)
    return {"acc": round(k / n, 4), "k": k, "n": n, "wilson95": [round(lo, 4), round(hi, 4)]}


def summarise(per: dict[str, list[int]], items: dict[str, list[dict]]) -> dict:
    """Accuracy per task, and per item kind where a task mixes kinds (skills on mixed, pairs on compositional)."""
    row = {task: _acc(s) for task, s in per.items()}
    for task, s in per.items():
        kinds = list(dict.fromkeys(it["skill"] for it in items[task]))
        if len(kinds) > 1:
            for kind in kinds:
                row[kind] = _acc([x for x, it in zip(s, items[task], strict=True) if it["skill"] == kind])
    return row


def heatmap(grid: list[float], rows: dict, path: Path, skills: list[str], split: str) -> None:
    A, B = skills
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, task in zip(axes, ("mixed", "compositional"), strict=True):
        z = [[rows.get(f"ta {wa} {wb}", {}).get(task, {}).get("acc", float("nan")) for wa in grid] for wb in grid]
        im = ax.imshow(z, origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(grid)), [str(g) for g in grid])
        ax.set_yticks(range(len(grid)), [str(g) for g in grid])
        ax.set_xlabel(f"weight {A}")
        ax.set_ylabel(f"weight {B}")
        ax.set_title(f"{task}/{split} (task arithmetic)")
        for i in range(len(grid)):
            for j in range(len(grid)):
                if z[i][j] == z[i][j]:
                    ax.text(j, i, f"{z[i][j]:.2f}", ha="center", va="center", color="w" if z[i][j] < 0.6 else "k")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"real zoo (SmolLM2-135M): greedy exact match, {split} split")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / ".bench" / "zoo_real_0")
    ap.add_argument("--grid", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="results/zoo_<tag>_grid.json (default: the zoo's size, e.g. real)")
    ap.add_argument("--split", default="test", choices=["search", "validation", "test"])
    ap.add_argument("--scorer", default="auto", choices=["auto", *SCORERS],
                    help="teacher (loglikelihood acc) or gen (generation exact match); auto: gen if the zoo has "
                         "generation tasks")
    ap.add_argument("--batch", type=int, default=0, help="scorer batch size (0: the scorer's default)")
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the JSON; skip them")
    ap.add_argument("--lmeval", default="upper", help="model (base/expert) to re-score with lm-eval ('' = skip)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.build import build_into
    from evomerge.merge.load import parse_recipe
    from evomerge.merge.plan import make_plan

    torch.set_num_threads(args.threads)
    if (args.zoo / "zoo.json").exists():
        zoo = load_zoo(args.zoo)
    else:  # the build is still running (its zoo.json comes last): the fixed layout is enough
        names = [s for s in REAL_VARIANTS["real3"].skills if (args.zoo / "models" / s).exists()]
        zoo = {"models": {n: {"path": str((args.zoo / "models" / n).resolve())} for n in ("base", *names)},
               "size": "real3" if len(names) == 3 else "real",
               "generation_tasks": [t for t in ("mixed_gen",) if (args.zoo / "tasks" / f"zoo_{t}_test.yaml").exists()]}
    skills = zoo.get("experts") or [m for m in zoo["models"] if m != "base"]
    scorer_name = args.scorer if args.scorer != "auto" else ("gen" if zoo.get("generation_tasks") else "teacher")
    score = SCORERS[scorer_name]
    batch = {"batch_size": args.batch} if args.batch else {}
    tag = args.tag or zoo.get("size", "real")
    grid = [float(g) for g in args.grid.split(",")]
    items = {t: zoo_items(args.zoo, t, args.split) for t in ("mixed", "compositional")}
    base_path = zoo["models"]["base"]["path"]
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    params = dict(model.state_dict())

    def load_own(name: str) -> None:
        sd = load_file(str(Path(zoo["models"][name]["path"]) / "model.safetensors"))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied embeddings

    def load_merge(r: dict) -> None:
        build_into(make_plan(parse_recipe(r)), params)

    def even(w: float) -> dict[str, float]:
        return dict.fromkeys(skills, w)

    n = len(skills)
    todo: list[tuple[str, object]] = [(m, lambda m=m: load_own(m)) for m in ("base", *skills)]
    todo.append((f"uniform average (linear {'/'.join([f'{1 / n:.3g}'] * n)})",
                 lambda: load_merge(recipe(zoo, "linear", even(1 / n)))))
    todo.append((f"TIES density 0.5, weights {'/'.join(['1'] * n)}",
                 lambda: load_merge(recipe(zoo, "ties", even(1.0), density=0.5))))
    # grid: the corners and the diagonal first, so a cut-short run still has the most telling points
    points = sorted(itertools.product(grid, repeat=n), key=lambda p: (len(set(p)) > 1, -min(p), -max(p)))
    for p in points:
        todo.append((" ".join(["ta", *map(str, p)]),
                     lambda p=p: load_merge(recipe(zoo, "task_arithmetic", dict(zip(skills, p, strict=True))))))

    out_json = REPO / "results" / f"zoo_{tag}_grid.json"
    out_png = REPO / "results" / f"zoo_{tag}_grid.png"
    result = {"zoo": str(args.zoo), "zoo_json": zoo, "grid": grid, "scorer": f"evomerge.zoo.real.{score.__name__}",
              "split": args.split, "threads": args.threads, "rows": {}, "seconds": {}}
    if args.resume and out_json.exists():
        old = json.loads(out_json.read_text())
        result["rows"], result["seconds"] = old["rows"], old["seconds"]
    only = [x for x in args.only.split(",") if x]
    for name, load in todo:
        if (only and name not in only) or name in result["rows"]:
            continue
        t0 = time.perf_counter()
        load()
        t1 = time.perf_counter()
        per = {t: score(model, tokenizer, its, **batch) for t, its in items.items()}
        t2 = time.perf_counter()
        result["rows"][name] = summarise(per, items)
        result["seconds"][name] = {"load_or_merge": round(t1 - t0, 2), "score": round(t2 - t1, 2)}
        row = result["rows"][name]
        print(f"{name:36s} " + " ".join(f"{t} {row[t]['acc']:.3f}" for t in (*skills, "mixed", "compositional"))
              + f"  ({t1 - t0:.1f} s + {t2 - t1:.1f} s)", flush=True)
        if out_json.exists():  # another run may be filling other rows of the same file concurrently
            disk = json.loads(out_json.read_text())
            result["rows"] = {**disk["rows"], **result["rows"]}
            result["seconds"] = {**disk["seconds"], **result["seconds"]}
            if "lmeval_check" in disk and "lmeval_check" not in result:
                result["lmeval_check"] = disk["lmeval_check"]
        out_json.write_text(json.dumps(result, indent=1) + "\n")
        if n == 2:
            heatmap(grid, result["rows"], out_png, skills, args.split)

    if args.lmeval:  # does lm-eval agree with the zoo scorer on one model?
        from workers.score import Scorer

        load_own(args.lmeval)
        t0 = time.perf_counter()
        task = f"zoo_mixed_gen_{args.split}" if scorer_name == "gen" else f"zoo_mixed_{args.split}"
        metric = "exact_match" if scorer_name == "gen" else "acc"
        scorer = Scorer(tasks=[{"name": task, "metric": metric}], include_path=[str(args.zoo / "tasks")],
                        batch_size=args.batch or 64)
        got = scorer.score(model, tokenizer)
        ours = score(model, tokenizer, items["mixed"], **batch)
        result["lmeval_check"] = {"model": args.lmeval, "task": task, "metric": metric,
                                  "lmeval": got["metrics"][task], "zoo_scorer": sum(ours) / len(ours),
                                  "items_differing": sum(int(a != b) for a, b in zip(got["items"][task], ours,
                                                                                   strict=True)),
                                  "seconds": round(time.perf_counter() - t0, 1)}
        print("lm-eval check:", result["lmeval_check"], flush=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
