"""Does merging help on the real zoo (SmolLM2-135M experts)? Task-arithmetic grid, uniform average, TIES.

    evomerge zoo build .bench/zoo_real_0 --size real --seed 0 --threads 2
    python benchmarks/zoo_real.py --zoo .bench/zoo_real_0 --grid 0.25,0.5,0.75,1.0

Every merge is built IN PLACE into one resident float32 SmolLM2 (`make_plan` + `build_into` on
`dict(model.state_dict())`) and scored with the real zoo's teacher-forced greedy-exact-match scorer
(`evomerge.zoo.real.score_items`, = lm-eval's `acc` on the zoo tasks; checked with lm-eval on one model)
on mixed/test and compositional/test. Per-skill accuracy is read off mixed/test (its items alternate
upper/reverse: n/2 each). Results are written after every model (partial runs keep what ran):
results/zoo_real_grid.json and the heatmap results/zoo_real_grid.png.
"""

from __future__ import annotations

import argparse
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
from evomerge.zoo.real import REAL_SKILLS, score_items  # noqa: E402

A, B = REAL_SKILLS


def recipe(zoo: dict, method: str, weights: dict[str, float], **params) -> dict:
    models = zoo["models"]
    rm = {} if method == "linear" else {"base": {"path": models["base"]["path"]}}
    for s in REAL_SKILLS:
        rm[s] = {"path": models[s]["path"], "parameters": {"weight": weights[s], **params}}
    r = {"method": method, "models": rm}
    if method != "linear":
        r["base"] = "base"
    return r


def summarise(per: dict[str, list[int]], mixed_items: list[dict]) -> dict:
    row = {}
    for task, s in per.items():
        k, n = sum(s), len(s)
        lo, hi = wilson(k, n)
        row[task] = {"acc": round(k / n, 4), "k": k, "n": n, "wilson95": [round(lo, 4), round(hi, 4)]}
    for skill in REAL_SKILLS:
        s = [x for x, it in zip(per["mixed"], mixed_items, strict=True) if it["skill"] == skill]
        lo, hi = wilson(sum(s), len(s))
        row[skill] = {"acc": round(sum(s) / len(s), 4), "k": sum(s), "n": len(s),
                      "wilson95": [round(lo, 4), round(hi, 4)]}
    return row


def heatmap(grid: list[float], rows: dict, path: Path) -> None:
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
        ax.set_title(f"{task}/test (task arithmetic)")
        for i in range(len(grid)):
            for j in range(len(grid)):
                if z[i][j] == z[i][j]:
                    ax.text(j, i, f"{z[i][j]:.2f}", ha="center", va="center", color="w" if z[i][j] < 0.6 else "k")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle("real zoo (SmolLM2-135M): greedy exact match, test split")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / ".bench" / "zoo_real_0")
    ap.add_argument("--grid", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="real")
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the JSON; skip them")
    ap.add_argument("--lmeval", default="upper", help="model (base/expert) to re-score with lm-eval ('' = skip)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.build import build_into
    from evomerge.plan import make_plan
    from evomerge.recipe import parse_recipe

    torch.set_num_threads(args.threads)
    if (args.zoo / "zoo.json").exists():
        zoo = load_zoo(args.zoo)
    else:  # the build is still running (its zoo.json comes last): the fixed layout is enough
        zoo = {"models": {n: {"path": str((args.zoo / "models" / n).resolve())} for n in ("base", *REAL_SKILLS)}}
    grid = [float(g) for g in args.grid.split(",")]
    items = {t: zoo_items(args.zoo, t, "test") for t in ("mixed", "compositional")}
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

    todo: list[tuple[str, object]] = [("base", lambda: load_own("base")), (A, lambda: load_own(A)),
                                      (B, lambda: load_own(B))]
    todo.append(("uniform average (linear 0.5/0.5)", lambda: load_merge(recipe(zoo, "linear", {A: 0.5, B: 0.5}))))
    todo.append(("TIES density 0.5, weights 1/1",
                 lambda: load_merge(recipe(zoo, "ties", {A: 1.0, B: 1.0}, density=0.5))))
    # grid: the corners and the diagonal first, so a cut-short run still has the most telling points
    order = sorted(((wa, wb) for wa in grid for wb in grid), key=lambda p: (p[0] != p[1], -min(p), -max(p)))
    for wa, wb in order:
        todo.append((f"ta {wa} {wb}", lambda wa=wa, wb=wb: load_merge(recipe(zoo, "task_arithmetic", {A: wa, B: wb}))))

    out_json = REPO / "results" / f"zoo_{args.tag}_grid.json"
    out_png = REPO / "results" / f"zoo_{args.tag}_grid.png"
    result = {"zoo": str(args.zoo), "zoo_json": zoo, "grid": grid, "scorer": "evomerge.zoo.real.score_items",
              "split": "test", "threads": args.threads, "rows": {}, "seconds": {}}
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
        per = {t: score_items(model, tokenizer, its) for t, its in items.items()}
        t2 = time.perf_counter()
        result["rows"][name] = summarise(per, items["mixed"])
        result["seconds"][name] = {"load_or_merge": round(t1 - t0, 2), "score": round(t2 - t1, 2)}
        row = result["rows"][name]
        print(f"{name:36s} " + " ".join(f"{t} {row[t]['acc']:.3f}" for t in (A, B, "mixed", "compositional"))
              + f"  ({t1 - t0:.1f} s + {t2 - t1:.1f} s)", flush=True)
        if out_json.exists():  # another run may be filling other rows of the same file concurrently
            disk = json.loads(out_json.read_text())
            result["rows"] = {**disk["rows"], **result["rows"]}
            result["seconds"] = {**disk["seconds"], **result["seconds"]}
            if "lmeval_check" in disk and "lmeval_check" not in result:
                result["lmeval_check"] = disk["lmeval_check"]
        out_json.write_text(json.dumps(result, indent=1) + "\n")
        heatmap(grid, result["rows"], out_png)

    if args.lmeval:  # does lm-eval's acc agree with the zoo scorer on one model?
        from workers.score import Scorer

        load_own(args.lmeval)
        t0 = time.perf_counter()
        scorer = Scorer(tasks=[{"name": "zoo_mixed_test", "metric": "acc"}], include_path=[str(args.zoo / "tasks")])
        got = scorer.score(model, tokenizer)
        result["lmeval_check"] = {"model": args.lmeval, "task": "zoo_mixed_test", "lmeval": repr(got),
                                  "zoo_scorer": result["rows"][args.lmeval]["mixed"]["acc"],
                                  "seconds": round(time.perf_counter() - t0, 1)}
        print("lm-eval check:", result["lmeval_check"], flush=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
