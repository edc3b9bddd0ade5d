"""Fitness policies on synthetic searches with known truth (evomerge.search.fitness.sim): items scored, the true
score lost by each policy's pick, the bias of what it records, racing's false-stop rate.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fitness_policies.py [--worlds 40]

Each world: 60 candidates (abilities rising noisily, as a search's do) x 200 items of a 2PL task; every
policy sees the same candidates in the same order. Writes results/fitness_policies.md (+ .json). Measures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, header_md, machine_facts, md_table, this_command, write_results  # noqa: E402

from evomerge.search.fitness.sim import make_world, run_policy  # noqa: E402

ARMS = [  # (label, policy, settings)
    ("full set", "full", {}),
    ("racing, 4 chunks, δ 0.05", "racing", {"chunks": 4}),
    ("racing, 10 chunks, δ 0.05", "racing", {"chunks": 10}),
    ("IRT estimate, picks by estimates (before issue 28)", "estimate-unchecked", {}),
    ("IRT estimate, re-score margin 0", "estimate", {"margin": 0.0}),
    ("IRT estimate, re-score margin 0.05 (default)", "estimate", {"margin": 0.05}),
    ("IRT estimate, re-score margin 0.1", "estimate", {"margin": 0.1}),
    ("IRT estimate, 16 calibration, margin 0.05", "estimate", {"margin": 0.05, "calibration": 16}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "fitness_policies.md")
    args = ap.parse_args()
    worlds = [make_world(s) for s in range(args.worlds)]
    rows, raw = [], []
    full_items = None
    for label, policy, kw in ARMS:
        outs = [run_policy(w, policy, seed=s, **kw) for s, w in enumerate(worlds)]
        items = float(np.mean([o.items for o in outs])) / 60
        full_items = full_items or items
        loss = np.array([o.loss for o in outs])
        at_risk = sum(o.at_risk for o in outs)
        fs = f"{sum(o.false_stops for o in outs)}/{at_risk} = {sum(o.false_stops for o in outs) / at_risk:.3f}" \
            if at_risk else "–"
        rows.append([label, f"{items:.1f}", f"{full_items / items:.1f}×",
                     f"{loss.mean():.4f} ± {1.96 * loss.std(ddof=1) / np.sqrt(len(loss)):.4f}",
                     f"{np.mean(loss == 0):.2f}", f"{np.mean([o.pick_bias for o in outs]):+.4f}",
                     f"{np.mean([o.bias for o in outs]):+.4f}", fs])
        raw.append({"label": label, "policy": policy, "settings": kw, "items": [o.items for o in outs],
                    "loss": [round(o.loss, 4) for o in outs], "false_stops": sum(o.false_stops for o in outs),
                    "at_risk": at_risk})
        print(rows[-1], flush=True)
    text = header_md("Fitness policies on synthetic searches with known truth", this_command("fitness_policies.py"),
                     machine_facts(None))
    text += (f"\n{args.worlds} worlds (seeds 0..{args.worlds - 1}) of 60 candidates × 200 items (2PL; abilities "
             "rising noisily along the search). *loss*: the true best score minus the true score of the policy's "
             "pick (mean ± 95% half-width); *exact picks*: share of worlds where it picked the true best; *pick "
             "bias*: the pick's recorded fitness minus its true score; *recorded bias*: mean over every recorded "
             "fitness; *false stops*: candidates stopped although their true score reached the threshold they "
             "raced against, over all such candidates (the racing guarantee is ≤ δ).\n\n")
    text += md_table(["policy", "items per candidate", "fewer items", "loss of the pick", "exact picks",
                      "pick bias", "recorded bias", "false stops"], rows) + "\n"
    write_results(args.out, text, {"worlds": args.worlds, "arms": raw})


if __name__ == "__main__":
    main()
