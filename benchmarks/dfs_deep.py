"""Why does (or doesn't) data-flow search help on the deep test bed? Hand-made layer paths against the searched ones.

Scores, on the validation and test splits of the deep zoo (mixed and compositional, the zoo's exact-match
scorer), layer paths a frankenmerger would try by hand — each expert alone, one expert's lower half stitched
onto another's upper half, two experts stacked (12 layers), an expert with its middle blocks repeated — and
reads the searched DFS and PS+DFS paths that `benchmarks/table1.py` left in .bench/table1-deep (hops, which
model each hop comes from, the input scales). Writes results/dfs_deep.md.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dfs_deep.py [--zoo .bench/zoo_deep_0]
It measures and writes tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import BENCH, REPO, header_md, machine_facts, md_table  # noqa: E402
from table1 import ZooBed, objective  # noqa: E402


def path_recipe(bed: ZooBed, head: str, hops: list[tuple[str, int]], scales: list[float] | None = None) -> dict:
    models = {n: {"path": bed.manifest["models"][n]["path"]} for n in dict.fromkeys([head, *(m for m, _ in hops)])}
    return {"method": "dataflow", "head": head, "models": models,
            "path": [{"model": m, "layer": i, "scale": (scales[k] if scales else 1.0)}
                     for k, (m, i) in enumerate(hops)]}


def hand_paths(bed: ZooBed, layers: int) -> dict[str, tuple[str, list[tuple[str, int]]]]:
    half = layers // 2
    out = {}
    for e in bed.experts:
        out[f"{e} alone"] = (e, [(e, i) for i in range(layers)])
        out[f"{e} with blocks {half - 1}-{half} repeated"] = (
            e, [(e, i) for i in range(half + 1)] + [(e, i) for i in range(half - 1, layers)])
    for a, b in itertools.permutations(bed.experts, 2):
        out[f"{a} 0-{half - 1} then {b} {half}-{layers - 1}"] = (
            a, [(a, i) for i in range(half)] + [(b, i) for i in range(half, layers)])
    for a, b in itertools.permutations(bed.experts, 2):
        stack = [(a, i) for i in range(layers)] + [(b, i) for i in range(layers)]
        out[f"{a} all then {b} all ({2 * layers} layers)"] = (a, stack)
    return out


def searched(run: Path) -> dict | None:
    from evomerge.run.status import status

    if not (run / "config.yaml").exists():
        return None
    st = status(run)
    best = st.get("best")
    return best if best and best.get("recipe", {}).get("method") == "dataflow" else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=BENCH / "zoo_deep_0")
    ap.add_argument("--runs", type=Path, default=BENCH / "table1-deep")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "dfs_deep.md")
    args = ap.parse_args()
    from evomerge.merge.dataflow import parse_path_recipe
    from evomerge.merge.export.path_dir import write_path_model

    bed = ZooBed(args.zoo.resolve())
    layers = bed.manifest["config"]["layers"]
    work = Path(tempfile.mkdtemp(prefix="dfs-deep-"))
    rows = []
    try:
        for name, (head, hops) in hand_paths(bed, layers).items():
            out = work / "m"
            write_path_model(parse_path_recipe(path_recipe(bed, head, hops)), out)
            val, test = bed.directory("validation", out), bed.directory("test", out)
            shutil.rmtree(out)
            rows.append((name, len(hops), val, test))
            print(f"{name}: validation {objective(val):.3f} test {objective(test):.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: -objective(r[2]))
    text = header_md("Data-flow on the deep test bed: hand-made paths and the searched ones",
                     ["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/dfs_deep.py", *sys.argv[1:]],
                     machine_facts(None))
    text += ("Hand-made paths (all input scales 1), sorted by the validation objective (mean of mixed and "
             "compositional, 200 items each); test: 500 items each.\n\n")
    text += md_table(["path", "hops", "validation", "mixed test", "compositional test", "test mean"],
                     [[n, str(h), f"{objective(v):.3f}", f"{statistics.mean(t['mixed']):.3f}",
                       f"{statistics.mean(t['compositional']):.3f}", f"{objective(t):.3f}"] for n, h, v, t in rows])
    for label, run in (("DFS", args.runs / "dfs-0"), ("PS+DFS (DFS stage)", args.runs / "hybrid-0" / "dfs")):
        best = searched(run)
        if best is None:
            continue
        hops = best["recipe"]["path"]
        used = {m: sum(1 for h in hops if h["model"] == m) for m in dict.fromkeys(h["model"] for h in hops)}
        scales = [h.get("scale", 1.0) for h in hops]
        text += (f"\n\n### Searched: {label}\n\nBest by search fitness {best['fitness']:.3f}, validation "
                 f"{best.get('validation')}: {len(hops)} hops; layers per model {used}; input scales "
                 f"{min(scales):.2f}–{max(scales):.2f}.\n\n    " +
                 " → ".join(f"{h['model']}[{h['layer']}]×{h.get('scale', 1.0):.2f}" for h in hops) + "\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
