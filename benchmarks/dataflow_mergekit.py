"""Data-flow export vs mergekit: the passthrough config evomerge writes for a layer path, built by mergekit,
gives the same weights as evomerge's own export; and both give the in-memory path model's logits.

For tiny Llama / Mistral / Qwen2 / Qwen3 families and SmolLM2-135M fine-tunes (from .bench), a path with
layer repeats, both models and non-trivial input scales is exported by `evomerge merge` (model directory
+ mergekit_config.yml); `mergekit-yaml mergekit_config.yml OUT` (isolated mergekit venv,
benchmarks/mergekit_env.sh) builds it; every tensor is compared in float32. Logits of the exported model
are compared with the in-memory path model (workers/path_model.py), which applies the input scales
literally (the export folds them: equal up to the RMSNorm eps).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dataflow_mergekit.py [--out results/dataflow_mergekit.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=C.REPO / "results" / "dataflow_mergekit.md")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.merge.dataflow import parse_path_recipe
    from evomerge.merge.export.path_dir import write_path_model
    from evomerge.zoo.tiny import make_family
    from workers.path_model import PathBuilder

    mk_python = C.mergekit_python()
    mk_yaml = mk_python.parent / "mergekit-yaml"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {}
        for arch in ("llama", "mistral", "qwen2", "qwen3"):
            fam = make_family(work / arch, arch, n_experts=2, hidden=64, layers=4)
            sets[f"tiny {arch} (4 layers)"] = (fam["expert1"], fam["expert2"], 4)
        smol = C.BENCH / "smollm2-ft"
        if (smol / "ft1" / "config.json").exists() and (smol / "ft2" / "config.json").exists():
            sets["SmolLM2-135M fine-tunes (30 layers)"] = (smol / "ft1", smol / "ft2", 30)
        for label, (a, b, n) in sets.items():
            hops = [("a", 0, 1.0), ("a", 1, 1.0), ("b", 1, 0.8), ("b", 2, 1.15), ("a", 1, 0.9)] + [
                ("b" if k % 3 == 0 else "a", k, 1.0 + 0.05 * (k % 4)) for k in range(2, n)] + [("a", n - 1, 1.1)]
            r = parse_path_recipe({"method": "dataflow", "head": "a", "models": {
                "a": {"path": str(a)}, "b": {"path": str(b)}}, "dtype": "float32",
                "path": [{"model": m, "layer": k, "scale": s} for m, k, s in hops]})
            ours = write_path_model(r, work / f"ours-{len(rows)}")
            ids = torch.tensor([[1, 17, 33, 49, 65, 71, 77, 40, 8, 2]])
            with torch.no_grad():
                mem = PathBuilder().build(r)(ids).logits
                exp = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)(ids).logits
            rel = ((mem - exp).abs().max() / mem.abs().max()).item()
            theirs = work / f"mk-{len(rows)}"
            res = subprocess.run([str(mk_yaml), str(ours / "mergekit_config.yml"), str(theirs)], env=C.env(),
                                 capture_output=True, text=True)
            if res.returncode != 0:
                rows.append([label, str(len(hops)), "mergekit failed: " + res.stderr.strip().splitlines()[-1][:120],
                             f"{rel:.1e}", "–"])
                continue
            x, y = C.load_tensors(ours), C.load_tensors(theirs)
            missing = sorted(set(x) ^ set(y))
            diff = max(((x[k].float() - y[k].float()).abs().max().item() for k in x if k in y), default=float("nan"))
            rows.append([label, str(len(hops)), f"{diff:.1e}" + (f" ({len(missing)} names differ)" if missing else ""),
                         f"{rel:.1e}", "yes" if not missing and diff <= 1e-6 else "NO"])
            print(rows[-1], flush=True)
    facts = C.machine_facts(mk_python)
    argv = ["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/dataflow_mergekit.py", *sys.argv[1:]]
    text = C.header_md("Data-flow export vs mergekit passthrough", argv, facts)
    text += ("Each path repeats layers, uses both models and scales most hop inputs. `max \\|ours − mergekit\\|`: "
             "every tensor of evomerge's export vs mergekit's build of the exported `mergekit_config.yml`. "
             "`path model vs export`: max |logit difference| / max |logit| between the in-memory path model "
             "(input scales applied literally) and the exported model (scales folded into o_proj/down_proj).\n\n")
    text += C.md_table(["sources", "hops", "max \\|ours − mergekit\\|", "path model vs export (rel.)",
                        "same weights"], rows) + "\n"
    if any("layer_types" in r[2] for r in rows):
        text += ("\nWhere mergekit failed on `layer_types`: mergekit writes the output config with the new "
                 "`num_hidden_layers` but keeps the source's per-layer `layer_types` list, which transformers 5 "
                 "configs of these architectures carry and validate; evomerge's export writes one entry per hop "
                 "and loads (the path-model column). A mergekit limitation, not a difference in weights.\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
