"""Why does no merge solve the real3 bed's compositional task? Written-out chains, scored step by step.

On the real3 zoo (SmolLM2-135M + experts upper, reverse, double; `evomerge zoo build DIR --size real3`) every
merge — searched or hand-set — stays at 0-6% on `compositional` (results/table1_real3.md), where an item asks
for two skills at once (``Reverse the word order and uppercase the words.``). This script asks whether the
task is out of reach for a 135M model or only for one-step answers: it rewrites the first N compositional test
items as *chains* that write the first skill's output out before applying the second (as the tiny zoo's
compositional items do, and as chain-of-thought does)::

    Reverse the word order, then uppercase the words.
    map tree bird = bird tree map = BIRD TREE MAP
    train wood card =                       ->  " card wood train = CARD WOOD TRAIN\\n"

and scores each model teacher-forced (greedy exact match, the zoo's `score_items`) on
  * ``one-step``: the zoo's own compositional items;
  * ``chain``: the whole written-out chain;
  * ``step 1``: the first skill's output alone (`` card wood train =``);
  * ``step 2 given step 1``: the second skill's output given a correct first step in the prompt.
A merge that keeps both skills should do step 1 about as well as the first skill's expert does its skill, and
step 2 about as well as the second skill's expert; the table says which step fails.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real3_chain.py [--zoo .bench/zoo_real3_0] [--items 90]
It measures and writes results/real3_chain.md; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import BENCH, REPO, header_md, machine_facts, md_table, this_command  # noqa: E402

THEN = {"reverse+upper": "Reverse the word order, then uppercase the words.",
        "double+upper": "Write each word twice, then uppercase the words.",
        "reverse+double": "Reverse the word order, then write each word twice."}


def chain_items(rows: list[dict]) -> dict[str, list[dict]]:
    """The chained rewrites of the zoo's compositional rows: whole chain, step 1, step 2 given step 1."""
    from evomerge.zoo.real import DEMO, OPS

    def steps(kind: str, words: tuple[str, ...]) -> tuple[str, str]:
        a, b = kind.split("+")
        mid = OPS[a](list(words))
        return " ".join(mid), " ".join(OPS[b](mid))

    out: dict[str, list[dict]] = {"chain": [], "step 1": [], "step 2 given step 1": []}
    for r in rows:
        words = tuple(r["prompt"].rsplit("\n", 1)[1].removesuffix(" =").split())
        dm, df = steps(r["skill"], DEMO)
        m, f = steps(r["skill"], words)
        prompt = f"{THEN[r['skill']]}\n{' '.join(DEMO)} = {dm} = {df}\n{' '.join(words)} ="
        out["chain"].append({"prompt": prompt, "target": f" {m} = {f}\n"})
        out["step 1"].append({"prompt": prompt, "target": f" {m} ="})
        out["step 2 given step 1"].append({"prompt": f"{prompt} {m} =", "target": f" {f}\n"})
    return out


def rate(scores: list[int], rows: list[dict], kind: str) -> str:
    """The share of the rows of one kind (pair of skills) scored 1."""
    hits = [s for s, r in zip(scores, rows, strict=True) if r["skill"] == kind]
    return f"{sum(hits) / len(hits):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=BENCH / "zoo_real3_0")
    ap.add_argument("--items", type=int, default=90, help="first N compositional test items (default 90)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "real3_chain.md")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from evomerge.zoo.build import load_zoo, zoo_items
    from evomerge.zoo.merges import ResidentMerger, merge_recipe, wilson
    from evomerge.zoo.real_train import score_items

    torch.set_num_threads(args.threads)
    facts = machine_facts(None)
    manifest = load_zoo(args.zoo)
    experts = list(manifest["experts"])
    rows = zoo_items(args.zoo, "compositional", "test")[: args.items]
    sets = {"one-step": rows, **chain_items(rows)}
    merger = ResidentMerger(args.zoo)
    n = len(rows)

    def source(name: str):
        sd = load_file(str(Path(manifest["models"][name]["path"]) / "model.safetensors"))
        merger.model.load_state_dict(sd, strict=False)  # tied embeddings: no lm_head tensor in the file
        return merger.model

    def ta(w: tuple[float, ...]) -> dict:
        return merge_recipe(args.zoo, "task_arithmetic", dict(zip(experts, w, strict=True)))

    models = [(f"expert {e}" if e != "base" else "base", lambda e=e: source(e)) for e in ["base", *experts]]
    models += [(f"task arithmetic, weights {'/'.join(f'{x:g}' for x in w)}", lambda w=w: merger.load(ta(w)))
               for w in [(1 / 3,) * 3, (1.0,) * 3, (1.0, 1.0, 0.5), (0.5, 1.0, 1.0)]]
    models.append(("DARE-TIES, density 0.7, weight 1", lambda: merger.load(
        merge_recipe(args.zoo, "dare_ties", dict.fromkeys(experts, 1.0), density=0.7))))

    table, per_kind = [], []
    kinds = sorted({r["skill"] for r in rows})
    t0 = time.perf_counter()
    for name, build in models:
        model = build()
        scores = {k: score_items(model, merger.tokenizer, v) for k, v in sets.items()}
        cells = []
        for k in sets:
            hits = sum(scores[k])
            lo, hi = wilson(hits, n)
            cells.append(f"{hits / n:.3f} [{lo:.2f}, {hi:.2f}]")
        table.append([name, *cells])
        per_kind.append([name, *(rate(scores[k], rows, kind) for kind in kinds
                                 for k in ("step 1", "step 2 given step 1"))])
        print(name, table[-1][1:], flush=True)
    seconds = time.perf_counter() - t0

    text = header_md("Compositional items of the real3 bed as written-out chains, scored step by step",
                     this_command("real3_chain.py"), facts)
    text += (f"\nZoo `{args.zoo.name}` (experts {', '.join(experts)}); the first {n} compositional test items "
             f"({', '.join(kinds)}, cycling). Teacher-forced greedy exact match; 95% Wilson intervals. "
             f"{len(models)} models in {seconds:.0f} s.\n\n")
    text += md_table(["model", *sets], table) + "\n\n"
    text += "Per pair of skills (step 1 / step 2 given step 1):\n\n"
    text += md_table(["model", *(f"{kind}: {s}" for kind in kinds for s in ("step 1", "step 2"))], per_kind)
    text += "\n"
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": table, "per_kind": per_kind}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
