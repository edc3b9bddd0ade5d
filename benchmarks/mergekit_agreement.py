"""Does evomerge build the same weights as mergekit from the same mergekit config?

For every merge method this writes a representative mergekit config (per-layer value lists, filter rules,
normalize/lambda, densities < 1, slerp `t` gradients, model_stock with base + 3 models, a `slices:` config,
bf16 `dtype`), builds it with evomerge (parse the same YAML, `make_plan`, `write_model_dir`) and with
mergekit (`mergekit-yaml` from the isolated mergekit venv, see benchmarks/mergekit_env.sh), and compares
every tensor in float32:

- deterministic methods: max |evomerge - mergekit| over all tensors (goal <= 1e-5);
- random methods (dare_ties, dare_linear, della, della_linear; evomerge's seeded masks differ from mergekit's RNG):
  fraction of entries that differ from the base, mean |merged - base| and std(merged - base), with the
  relative difference evomerge vs mergekit;
- bf16 `dtype`: differences counted in bf16 units in the last place.

It also round-trips evomerge-format recipes: recipe -> `to_mergekit` YAML -> mergekit builds it -> equal to
evomerge's build of the recipe.

The models are a tiny random Llama (hidden 128, 4 layers; every tensor has >= 128 elements) from
`evomerge.zoo.tiny.make_family` and three correlated "fine-tunes" of it (base + a shared and an own seeded
perturbation, so task vectors correlate as real fine-tunes do and model_stock's interpolation is not ~0);
the RAM rows use "sparse" copies of those fine-tunes that keep their change on a seeded 40% of each tensor.

Run (about 2-3 minutes; creates the mergekit venv on first use):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/mergekit_agreement.py \
        [--out results/mergekit_agreement.md] [--workdir .bench/agreement] [--tol 1e-5]

Writes the markdown table to --out and the raw numbers next to it (.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


# ---- configs ----------------------------------------------------------------------------------------

def mergekit_cases(B: str, E1: str, E2: str, E3: str, bf16: tuple[str, str, str, str],
                   q: tuple[str, str, str, str], big: tuple[str, str, str, str],
                   sparse: tuple[str, str, str]) -> list[dict]:
    """(name, features, kind, mergekit config) for every method, plus slices and bf16 variants."""
    ms = lambda *pairs: [{"model": m, "parameters": p} if p else {"model": m} for m, p in pairs]  # noqa: E731
    attn_rule = lambda a, b: [{"filter": "self_attn", "value": a}, {"value": b}]  # noqa: E731
    cases = [
        dict(name="linear", kind="exact",
             features="3 models, weight gradient [0.2,0.5,0.8], filter rule self_attn, normalize",
             config={"merge_method": "linear",
                     "models": ms((E1, {"weight": [0.2, 0.5, 0.8]}), (E2, {"weight": attn_rule(0.7, 0.4)}),
                                  (E3, {"weight": 0.3})),
                     "parameters": {"normalize": True}, "dtype": "float32"}),
        dict(name="linear (normalize: false)", kind="exact",
             features="weights summing to 0.9, top-level weight rule list, normalize false",
             config={"merge_method": "linear",
                     "models": ms((E1, {"weight": 0.5}), (E2, {"weight": [0.1, 0.3]}), (E3, None)),
                     "parameters": {"normalize": False,
                                    "weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.1}]},
                     "dtype": "float32"}),
        dict(name="task_arithmetic", kind="exact",
             features="base+3, weight gradient, filter rule mlp, negative weight, lambda 0.8, normalize",
             config={"merge_method": "task_arithmetic", "base_model": B,
                     "models": ms((E1, {"weight": [0.1, 0.9]}),
                                  (E2, {"weight": [{"filter": "mlp", "value": 0.6}, {"value": 0.3}]}),
                                  (E3, {"weight": -0.2})),
                     "parameters": {"lambda": 0.8, "normalize": True}, "dtype": "float32"}),
        dict(name="ties", kind="exact",
             features="base+3, density gradient [0.3,0.7], density filter rule, weight gradient, normalize, "
                      "int8_mask",
             config={"merge_method": "ties", "base_model": B,
                     "models": ms((E1, {"weight": [0.2, 0.8], "density": [0.3, 0.7]}),
                                  (E2, {"weight": 0.5, "density": attn_rule(0.4, 0.6)}),
                                  (E3, {"weight": 0.3, "density": 0.5})),
                     "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"}),
        dict(name="ties (lambda, no normalize)", kind="exact",
             features="base+3, shared density 0.4 at top level, lambda 1.3, normalize false",
             config={"merge_method": "ties", "base_model": B,
                     "models": ms((E1, {"weight": 0.6}), (E2, {"weight": [0.2, 0.4, 0.9]}),
                                  (E3, {"weight": 0.4, "density": 0.8})),
                     "parameters": {"density": 0.4, "lambda": 1.3, "normalize": False}, "dtype": "float32"}),
        dict(name="ties (slices)", kind="exact",
             features="`slices:` [0,2) + [2,4), same ranges for all sources, per-slice density/weight, "
                      "per-source override in slice 1",
             config={"merge_method": "ties", "base_model": B,
                     "slices": [
                         {"sources": [{"model": B, "layer_range": [0, 2]},
                                      {"model": E1, "layer_range": [0, 2], "parameters": {"weight": 0.9}},
                                      {"model": E2, "layer_range": [0, 2]},
                                      {"model": E3, "layer_range": [0, 2]}],
                          "parameters": {"density": 0.4, "weight": 0.5}},
                         {"sources": [{"model": B, "layer_range": [2, 4]},
                                      {"model": E1, "layer_range": [2, 4]},
                                      {"model": E2, "layer_range": [2, 4]},
                                      {"model": E3, "layer_range": [2, 4]}],
                          "parameters": {"density": [0.7, 0.3], "weight": [0.2, 0.6]}}],
                     "parameters": {"normalize": True}, "dtype": "float32"}),
        dict(name="dare_ties", kind="stats",
             features="base+3, density gradient [0.3,0.7] and 0.5/0.6, rescale (default), weight rule",
             config={"merge_method": "dare_ties", "base_model": B,
                     "models": ms((E1, {"weight": 0.5, "density": [0.3, 0.7]}),
                                  (E2, {"weight": attn_rule(0.6, 0.4), "density": 0.5}),
                                  (E3, {"weight": 0.3, "density": 0.6})),
                     "dtype": "float32"}),
        dict(name="dare_linear", kind="stats",
             features="base+3, densities 0.4/0.5/gradient, normalize, lambda 0.9",
             config={"merge_method": "dare_linear", "base_model": B,
                     "models": ms((E1, {"weight": 0.5, "density": 0.4}),
                                  (E2, {"weight": [0.2, 0.6], "density": 0.5}),
                                  (E3, {"weight": 0.3, "density": [0.6, 0.3]})),
                     "parameters": {"normalize": True, "lambda": 0.9}, "dtype": "float32"}),
        dict(name="breadcrumbs", kind="exact",
             features="base+3, density 0.8/0.9/gradient, gamma 0.02/0.05/filter rule",
             config={"merge_method": "breadcrumbs", "base_model": B,
                     "models": ms((E1, {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
                                  (E2, {"weight": 0.3, "density": 0.9, "gamma": 0.05}),
                                  (E3, {"weight": [0.2, 0.4], "density": [0.7, 0.9],
                                        "gamma": attn_rule(0.03, 0.01)})),
                     "dtype": "float32"}),
        dict(name="breadcrumbs_ties", kind="exact",
             features="base+3, density 0.7/gradient, gamma 0.01/0.04, normalize, lambda 1.1",
             config={"merge_method": "breadcrumbs_ties", "base_model": B,
                     "models": ms((E1, {"weight": 0.5, "density": 0.7, "gamma": 0.01}),
                                  (E2, {"weight": 0.5, "density": [0.5, 0.8], "gamma": 0.04}),
                                  (E3, {"weight": 0.4, "density": 0.7})),
                     "parameters": {"normalize": True, "lambda": 1.1}, "dtype": "float32"}),
        dict(name="della", kind="stats",
             features="base+3, density 0.5/0.6/gradient, epsilon 0.1/0.2, lambda 1.1",
             config={"merge_method": "della", "base_model": B,
                     "models": ms((E1, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
                                  (E2, {"weight": 0.4, "density": 0.6, "epsilon": 0.2}),
                                  (E3, {"weight": 0.3, "density": [0.4, 0.6], "epsilon": 0.15})),
                     "parameters": {"lambda": 1.1}, "dtype": "float32"}),
        dict(name="slerp", kind="exact",
             features="base + 1, t filter rules self_attn/mlp with 5-point gradients, default 0.5",
             config={"merge_method": "slerp", "base_model": B,
                     "models": ms((B, None), (E1, None)),
                     "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                          {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                          {"value": 0.5}]},
                     "dtype": "float32"}),
        dict(name="model_stock", kind="exact", features="base + 3",
             config={"merge_method": "model_stock", "base_model": B, "models": ms((E1, None), (E2, None),
                                                                                   (E3, None)),
                     "dtype": "float32"}),
        dict(name="model_stock (filter_wise)", kind="exact", features="base + 3, filter_wise: true",
             config={"merge_method": "model_stock", "base_model": B,
                     "models": ms((E1, None), (E2, None), (E3, None)),
                     "parameters": {"filter_wise": True}, "dtype": "float32"}),
        dict(name="della_linear", kind="stats",
             features="base+3, density 0.5/0.6/gradient, epsilon 0.1/0.2/0.15, lambda 0.9, rescale (default)",
             config={"merge_method": "della_linear", "base_model": B,
                     "models": ms((E1, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
                                  (E2, {"weight": 0.4, "density": 0.6, "epsilon": 0.2}),
                                  (E3, {"weight": 0.3, "density": [0.4, 0.6], "epsilon": 0.15})),
                     "parameters": {"lambda": 0.9}, "dtype": "float32"}),
        dict(name="nuslerp", kind="exact",
             features="base + 2 (task vectors), weight gradient and filter rule, flattened (default)",
             config={"merge_method": "nuslerp", "base_model": B,
                     "models": ms((E1, {"weight": [0.2, 0.8]}), (E2, {"weight": attn_rule(0.7, 0.4)})),
                     "dtype": "float32"}),
        dict(name="nuslerp (no base, rows)", kind="exact",
             features="2 models, no base, nuslerp_flatten false (each row its own slerp)",
             config={"merge_method": "nuslerp",
                     "models": ms((E1, {"weight": 0.3}), (E2, {"weight": [0.9, 0.2]})),
                     "parameters": {"nuslerp_flatten": False}, "dtype": "float32"}),
        dict(name="nuslerp (row_wise)", kind="exact",
             features="base + 2, nuslerp_flatten false, nuslerp_row_wise true (columns)",
             config={"merge_method": "nuslerp", "base_model": B,
                     "models": ms((E1, {"weight": 0.6}), (E3, {"weight": 0.4})),
                     "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "dtype": "float32"}),
        dict(name="multislerp", kind="exact",
             features="base + 3 (task vectors), weight gradient and filter rule, normalize_weights (default)",
             config={"merge_method": "multislerp", "base_model": B,
                     "models": ms((E1, {"weight": [0.2, 0.8]}), (E2, {"weight": attn_rule(0.7, 0.4)}),
                                  (E3, {"weight": 0.5})),
                     "dtype": "float32"}),
        dict(name="multislerp (no base)", kind="exact",
             features="3 models, no base, normalize_weights false, weights summing to 1.2",
             config={"merge_method": "multislerp",
                     "models": ms((E1, {"weight": 0.3}), (E2, {"weight": 0.5}), (E3, {"weight": 0.4})),
                     "parameters": {"normalize_weights": False}, "dtype": "float32"}),
        dict(name="karcher", kind="exact",
             features="base_model + 3 (the base is one more input: karcher ignores bases), defaults",
             config={"merge_method": "karcher", "base_model": B, "models": ms((E1, None), (E2, None), (E3, None)),
                     "dtype": "float32"}),
        dict(name="karcher (max_iter, tol)", kind="exact",
             features="3 models, max_iter 3, tol 1e-6",
             config={"merge_method": "karcher", "models": ms((E1, None), (E2, None), (E3, None)),
                     "parameters": {"max_iter": 3, "tol": 1e-6}, "dtype": "float32"}),
        dict(name="sce", kind="exact",
             features="base + 3, select_topk 0.3 (variance selection), int8_mask",
             config={"merge_method": "sce", "base_model": B, "models": ms((E1, None), (E2, None), (E3, None)),
                     "parameters": {"select_topk": 0.3, "int8_mask": True}, "dtype": "float32"}),
        dict(name="sce (select_topk gradient)", kind="exact",
             features="base + 3, select_topk filter rule mlp 0.5 / gradient [1.0, 0.2]",
             config={"merge_method": "sce", "base_model": B, "models": ms((E1, None), (E2, None), (E3, None)),
                     "parameters": {"select_topk": [{"filter": "mlp", "value": 0.5}, {"value": [1.0, 0.2]}]},
                     "dtype": "float32"}),
        dict(name="nearswap", kind="exact",
             features="base + 1, t filter rule self_attn 0.002 / gradient [0.0005, 0.01]",
             config={"merge_method": "nearswap", "base_model": B, "models": ms((E1, None)),
                     "parameters": {"t": [{"filter": "self_attn", "value": 0.002}, {"value": [0.0005, 0.01]}]},
                     "dtype": "float32"}),
        dict(name="arcee_fusion", kind="exact", features="base + 1",
             config={"merge_method": "arcee_fusion", "base_model": B, "models": ms((E1, None)),
                     "dtype": "float32"}),
        dict(name="ram", kind="exact",
             features="base + 3 sparse fine-tunes (each changes a seeded 40% of every tensor), epsilon default",
             config={"merge_method": "ram", "base_model": B,
                     "models": ms((sparse[0], None), (sparse[1], None), (sparse[2], None)), "dtype": "float32"}),
        dict(name="ram (epsilon)", kind="exact",
             features="base + 3 dense fine-tunes, epsilon filter rule mlp 0.002 / 0.001 (small changes ignored)",
             config={"merge_method": "ram", "base_model": B, "models": ms((E1, None), (E2, None), (E3, None)),
                     "parameters": {"epsilon": [{"filter": "mlp", "value": 0.002}, {"value": 0.001}]},
                     "dtype": "float32"}),
        dict(name="ramplus_tl", kind="exact",
             features="base + 3 sparse fine-tunes, r 0.5, alpha gradient [0.1, 0.9]",
             config={"merge_method": "ramplus_tl", "base_model": B,
                     "models": ms((sparse[0], None), (sparse[1], None), (sparse[2], None)),
                     "parameters": {"r": 0.5, "alpha": [0.1, 0.9]}, "dtype": "float32"}),
        dict(name="ramplus_tl (defaults)", kind="exact", features="base + 3 sparse fine-tunes, r 0.1, alpha 0.2",
             config={"merge_method": "ramplus_tl", "base_model": B,
                     "models": ms((sparse[0], None), (sparse[1], None), (sparse[2], None)), "dtype": "float32"}),
        dict(name="ties (large tensors)", kind="exact",
             features="hidden 512 family (MLP tensors 524k elements: the streamed, sampled top-k threshold path), "
                      "base+3, density 0.3/0.5/gradient",
             config={"merge_method": "ties", "base_model": big[0],
                     "models": ms((big[1], {"weight": 0.5, "density": 0.3}),
                                  (big[2], {"weight": 0.4, "density": 0.5}),
                                  (big[3], {"weight": 0.3, "density": [0.2, 0.8]})),
                     "dtype": "float32"}),
        dict(name="breadcrumbs (large tensors)", kind="exact",
             features="hidden 512 family, base+3, density 0.9/0.7, gamma 0.01/0.05",
             config={"merge_method": "breadcrumbs", "base_model": big[0],
                     "models": ms((big[1], {"weight": 0.5, "density": 0.9, "gamma": 0.01}),
                                  (big[2], {"weight": 0.4, "density": 0.7, "gamma": 0.05}),
                                  (big[3], {"weight": 0.3, "density": 0.8})),
                     "dtype": "float32"}),
        dict(name="breadcrumbs_ties (large tensors)", kind="exact",
             features="hidden 512 family, base+3, density 0.8, gamma 0.02, normalize",
             config={"merge_method": "breadcrumbs_ties", "base_model": big[0],
                     "models": ms((big[1], {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
                                  (big[2], {"weight": 0.4, "density": 0.8, "gamma": 0.02}),
                                  (big[3], {"weight": 0.3, "density": 0.8, "gamma": 0.02})),
                     "parameters": {"normalize": True}, "dtype": "float32"}),
        dict(name="sce (large tensors)", kind="exact",
             features="hidden 512 family (the streamed top-k of the variances), base+3, select_topk 0.4",
             config={"merge_method": "sce", "base_model": big[0],
                     "models": ms((big[1], None), (big[2], None), (big[3], None)),
                     "parameters": {"select_topk": 0.4}, "dtype": "float32"}),
        dict(name="arcee_fusion (large tensors)", kind="exact",
             features="hidden 512 family (quantiles by selection, not a sort), base + 1",
             config={"merge_method": "arcee_fusion", "base_model": big[0], "models": ms((big[1], None)),
                     "dtype": "float32"}),
        dict(name="multislerp (large tensors)", kind="exact",
             features="hidden 512 family (many blocks per tensor), base + 3",
             config={"merge_method": "multislerp", "base_model": big[0],
                     "models": ms((big[1], {"weight": 0.5}), (big[2], {"weight": 0.3}), (big[3], {"weight": 0.2})),
                     "dtype": "float32"}),
        dict(name="linear (bf16 sources)", kind="bf16",
             features="bf16 copies of the models, `dtype: bfloat16`, weight gradient, normalize",
             config={"merge_method": "linear",
                     "models": ms((bf16[1], {"weight": [0.2, 0.8]}), (bf16[2], {"weight": 0.5}),
                                  (bf16[3], {"weight": 0.3})),
                     "dtype": "bfloat16"}),
        dict(name="ties (bf16 sources)", kind="bf16",
             features="bf16 copies of the models, `dtype: bfloat16`, base+3, density 0.5, normalize",
             config={"merge_method": "ties", "base_model": bf16[0],
                     "models": ms((bf16[1], {"weight": 0.5, "density": 0.5}),
                                  (bf16[2], {"weight": 0.4, "density": 0.5}),
                                  (bf16[3], {"weight": 0.3, "density": 0.5})),
                     "dtype": "bfloat16"}),
        dict(name="ties (bf16 sources, small deltas, f32 dtype)", kind="count",
             features="bf16 models whose task vectors are ~1% of the weights (quantised: many equal "
                      "magnitudes), `dtype: float32`, base+3, density 0.5",
             config={"merge_method": "ties", "base_model": q[0],
                     "models": ms((q[1], {"weight": 0.5, "density": 0.5}), (q[2], {"weight": 0.4, "density": 0.5}),
                                  (q[3], {"weight": 0.3, "density": 0.5})),
                     "dtype": "float32"}),
        dict(name="breadcrumbs (bf16 sources, small deltas, f32 dtype)", kind="count",
             features="as above, density 0.6, gamma 0.05",
             config={"merge_method": "breadcrumbs", "base_model": q[0],
                     "models": ms((q[1], {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
                                  (q[2], {"weight": 0.4, "density": 0.6, "gamma": 0.05})),
                     "dtype": "float32"}),
        dict(name="linear (f32 sources, bf16 dtype)", kind="bf16",
             features="float32 models, `dtype: bfloat16`, weight gradient, normalize",
             config={"merge_method": "linear",
                     "models": ms((E1, {"weight": [0.2, 0.8]}), (E2, {"weight": 0.5}), (E3, {"weight": 0.3})),
                     "dtype": "bfloat16"}),
        dict(name="ties (f32 sources, bf16 dtype)", kind="bf16",
             features="float32 models, `dtype: bfloat16`, base+3, density 0.5, normalize",
             config={"merge_method": "ties", "base_model": B,
                     "models": ms((E1, {"weight": 0.5, "density": 0.5}), (E2, {"weight": 0.4, "density": 0.5}),
                                  (E3, {"weight": 0.3, "density": 0.5})),
                     "dtype": "bfloat16"}),
    ]
    return cases


def roundtrip_recipes(B: str, E1: str, E2: str, E3: str) -> list[dict]:
    """evomerge-format recipes, built by evomerge and (after `to_mergekit`) by mergekit."""
    m = lambda path, **p: {"path": path, **({"parameters": p} if p else {})}  # noqa: E731
    return [
        dict(name="ties", recipe={
            "method": "ties", "base": "base",
            "models": {"base": m(B), "math": m(E1, weight=[0.3, 0.7], density=0.5),
                       "code": m(E2, weight=0.5, density=[{"filter": "mlp", "value": 0.3}, {"value": 0.6}]),
                       "chat": m(E3, weight=0.4, density=[0.2, 0.8])},
            "parameters": {"normalize": True}, "dtype": "float32"}),
        dict(name="ties (slices)", recipe={
            "method": "ties", "base": "base",
            "models": {"base": m(B), "math": m(E1, weight=0.5), "code": m(E2, weight=0.4)},
            "slices": [{"layer_range": [0, 1], "parameters": {"density": 0.3}},
                       {"layer_range": [1, 4], "parameters": {"density": [0.5, 0.9]},
                        "models": {"math": {"weight": 0.8}}}],
            "dtype": "float32"}),
        dict(name="slerp", recipe={
            "method": "slerp", "base": "base", "models": {"base": m(B), "math": m(E1)},
            "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": [0.8, 0.3]}]},
            "dtype": "float32"}),
        dict(name="linear", recipe={
            "method": "linear", "models": {"math": m(E1, weight=[0.2, 0.6]), "code": m(E2, weight=0.5)},
            "dtype": "float32"}),
        dict(name="task_arithmetic", recipe={
            "method": "task_arithmetic", "base": "base",
            "models": {"base": m(B), "math": m(E1, weight=0.7), "code": m(E2, weight=[0.1, 0.5])},
            "parameters": {"lambda": 0.9}, "dtype": "float32"}),
        dict(name="breadcrumbs_ties", recipe={
            "method": "breadcrumbs_ties", "base": "base",
            "models": {"base": m(B), "math": m(E1, weight=0.6, density=0.8, gamma=0.02),
                       "code": m(E2, weight=0.4, density=0.9)},
            "dtype": "float32"}),
        dict(name="model_stock", recipe={
            "method": "model_stock", "base": "base",
            "models": {"base": m(B), "a": m(E1), "b": m(E2), "c": m(E3)}, "dtype": "float32"}),
        dict(name="nuslerp (base)", recipe={
            "method": "nuslerp", "base": "base",
            "models": {"base": m(B), "math": m(E1, weight=[0.3, 0.7]), "code": m(E2, weight=0.5)},
            "dtype": "float32"}),
        dict(name="multislerp (no base)", recipe={
            "method": "multislerp", "models": {"math": m(E1, weight=0.4), "code": m(E2, weight=[0.2, 0.6])},
            "dtype": "float32"}),
        dict(name="sce", recipe={
            "method": "sce", "base": "base", "models": {"base": m(B), "math": m(E1), "code": m(E2), "chat": m(E3)},
            "parameters": {"select_topk": 0.5}, "dtype": "float32"}),
        dict(name="ramplus_tl", recipe={
            "method": "ramplus_tl", "base": "base", "models": {"base": m(B), "math": m(E1), "code": m(E2)},
            "parameters": {"epsilon": 0.001, "r": 0.3}, "dtype": "float32"}),
    ]


# ---- builds -----------------------------------------------------------------------------------------

def build_mergekit(mk_yaml: Path, config_path: Path, out: Path, seed: int | None = None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    extra = [] if seed is None else ["--random-seed", str(seed)]
    r = subprocess.run([str(mk_yaml), str(config_path), str(out), *extra], env=C.env(), capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mergekit-yaml {config_path} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def build_evomerge(config_path: Path, out: Path, seed: int | None = None, dtype: str | None = None) -> float:
    """Build like `evomerge merge`; `seed` replaces the recipe's seed, `dtype` its dtype."""
    from evomerge.merge.export.model_dir import write_model_dir
    from evomerge.merge.load import load_recipe
    from evomerge.merge.plan import make_plan

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    recipe = load_recipe(config_path)
    if seed is not None:
        recipe = recipe.model_copy(update={"seed": seed})
    if dtype is not None:
        recipe = recipe.model_copy(update={"dtype": dtype})
    plan = make_plan(recipe)
    try:
        write_model_dir(plan, out)
    finally:
        plan.close()
    return time.perf_counter() - t0


def _bf16_family(fam: Path, dest: Path, names: list[str]) -> tuple[str, ...]:
    """bf16 copies of the family's models (cached) under dest/."""
    from safetensors.torch import save_file

    out = []
    for n in names:
        d = dest / n
        if not (d / "model.safetensors").exists():
            d.mkdir(parents=True, exist_ok=True)
            for f in C.NON_WEIGHT_FILES:
                if (fam / n / f).is_file():
                    shutil.copyfile(fam / n / f, d / f)
            state = {k: v.to(torch.bfloat16).contiguous() for k, v in C.load_tensors(fam / n).items()}
            save_file(state, str(d / "model.safetensors.tmp"), metadata={"format": "pt"})
            (d / "model.safetensors.tmp").rename(d / "model.safetensors")
        out.append(str(d))
    return tuple(out)


def _sparse_family(base_dir: Path, experts: list[Path], dest: Path, keep: float = 0.4,
                   seed: int = 5) -> tuple[str, ...]:
    """Copies of the experts that keep their change from the base on a seeded `keep` fraction of every tensor's
    entries (so task vectors overlap only in part, as RAM expects of fine-tunes), cached under dest/."""
    from safetensors.torch import save_file

    base = C.load_tensors(base_dir)
    out = []
    for i, e in enumerate(experts):
        d = dest / f"sparse{i + 1}"
        if not (d / "model.safetensors").exists():
            d.mkdir(parents=True, exist_ok=True)
            for f in C.NON_WEIGHT_FILES:
                if (e / f).is_file():
                    shutil.copyfile(e / f, d / f)
            g = torch.Generator().manual_seed(seed + i)
            state = {}
            for k, v in sorted(C.load_tensors(e).items()):
                mask = torch.rand(v.shape, generator=g) < keep
                state[k] = torch.where(mask, v, base[k]).contiguous()
            save_file(state, str(d / "model.safetensors.tmp"), metadata={"format": "pt"})
            (d / "model.safetensors.tmp").rename(d / "model.safetensors")
        out.append(str(d))
    return tuple(out)


# ---- comparisons ------------------------------------------------------------------------------------

def _pair(a_dir: Path, b_dir: Path) -> tuple[dict, dict]:
    a, b = C.load_tensors(a_dir), C.load_tensors(b_dir)
    if set(a) != set(b):
        raise RuntimeError(f"tensor names differ: only evomerge {sorted(set(a) - set(b))[:3]}, "
                           f"only mergekit {sorted(set(b) - set(a))[:3]}")
    return a, b


def compare_exact(evo: Path, mk: Path, tol: float = 1e-5) -> dict:
    a, b = _pair(evo, mk)
    worst, worst_name, n, over = 0.0, "", 0, 0
    dtypes = set()
    for k in a:
        dtypes.add((str(a[k].dtype), str(b[k].dtype)))
        dd = (a[k].float() - b[k].float()).abs()
        d = dd.max().item() if a[k].numel() else 0.0
        over += int((dd > tol).sum())
        n += a[k].numel()
        if d > worst or not worst_name:
            worst, worst_name = d, k
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "tensors": len(a), "elements": n, "n_over_tol": over,
            "dtypes": sorted(dtypes)}


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16's unit in the last place at each value of `x` (8 significant bits)."""
    _, e = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), (e - 8).to(torch.int32)).clamp(min=2.0 ** -133)


def compare_bf16(evo: Path, mk: Path, ref_dir: Path, input_dirs: list[Path]) -> dict:
    """Two bf16 builds against each other and against the float32 merge of the same config (`ref_dir`).

    Differences are counted in bf16 ulps of the inputs: the ulp of max_k |input_k| at each entry (the
    rounding step of the merged values' ingredients; an output-relative ulp explodes where inputs cancel)."""
    a, b = _pair(evo, mk)
    ref = C.load_tensors(ref_dir)
    inputs = [C.load_tensors(d) for d in input_dirs]
    n = differ = 0
    max_abs = max_ulp_between = 0.0
    err = {"evomerge": [0.0, 0, 0.0], "mergekit": [0.0, 0, 0.0]}  # max ulp, count > 1 ulp, max abs
    dtypes = set()
    for k in a:
        x, y, r = a[k].float(), b[k].float(), ref[k].float()
        dtypes.add((str(a[k].dtype), str(b[k].dtype)))
        scale = torch.stack([t[k].float().abs() for t in inputs]).amax(dim=0)
        ulp = _bf16_ulp(scale)
        n += x.numel()
        differ += int((x != y).sum())
        max_abs = max(max_abs, (x - y).abs().max().item())
        max_ulp_between = max(max_ulp_between, ((x - y).abs() / ulp).max().item())
        for tool, t in (("evomerge", x), ("mergekit", y)):
            d = (t - r).abs()
            u = d / ulp
            err[tool][0] = max(err[tool][0], u.max().item())
            err[tool][1] += int((u > 1).sum())
            err[tool][2] = max(err[tool][2], d.max().item())
    return {"max_abs_diff": max_abs, "max_ulp_between": max_ulp_between, "frac_differ": differ / n,
            "elements": n, "dtypes": sorted(dtypes),
            "vs_float32": {t: {"max_ulp": v[0], "frac_over_1ulp": v[1] / n, "max_abs": v[2]} for t, v in err.items()}}


def delta_stats(model: dict, base: dict) -> dict:
    """Over all tensors: fraction of entries != base, mean |model - base|, std(model - base)."""
    n = changed = 0
    s1 = s2 = sabs = 0.0
    for k, t in model.items():
        d = t.double() - base[k].double()
        n += d.numel()
        changed += int((d != 0).sum())
        s1 += d.sum().item()
        s2 += (d * d).sum().item()
        sabs += d.abs().sum().item()
    mean = s1 / n
    return {"frac_changed": changed / n, "mean_abs": sabs / n, "std": (s2 / n - mean * mean) ** 0.5}


STAT_KEYS = ("frac_changed", "mean_abs", "std")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def compare_stats(evo_dirs: list[Path], mk_dirs: list[Path], base_dir: Path) -> dict:
    """Statistics of merged - base over several seeds of each tool: means, seed-to-seed spreads, the relative
    difference of the means and that difference in standard errors (z)."""
    base = C.load_tensors(base_dir)
    per = {"evomerge": [delta_stats(C.load_tensors(d), base) for d in evo_dirs],
           "mergekit": [delta_stats(C.load_tensors(d), base) for d in mk_dirs]}
    out: dict = {"seeds": {t: len(v) for t, v in per.items()}, "raw": per}
    for k in STAT_KEYS:
        (me, se), (mm, sm) = (_mean_sd([s[k] for s in per[t]]) for t in ("evomerge", "mergekit"))
        stderr = (se ** 2 / len(evo_dirs) + sm ** 2 / len(mk_dirs)) ** 0.5
        out[k] = {"evomerge": me, "evomerge_sd": se, "mergekit": mm, "mergekit_sd": sm,
                  "rel_diff": abs(me - mm) / abs(mm) if mm else float("nan"),
                  "z": abs(me - mm) / stderr if stderr > 0 else (0.0 if me == mm else float("inf"))}
    out["max_rel_diff"] = max(out[k]["rel_diff"] for k in STAT_KEYS)
    out["max_z"] = max(out[k]["z"] for k in STAT_KEYS)
    return out


MAGNITUDE_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")


def selection_check(config: dict, work: Path, mk_yaml: Path) -> dict:
    """Which task-vector entries each tool keeps, per model, measured through the public interfaces: a merge
    of the base and that one model with weight 1 (sign election and normalisation are then no-ops) changes
    exactly the kept entries whose task-vector entry is nonzero.

    Returns the kept fraction per model and tool, how many entries one tool keeps and the other drops, and
    whether every such difference is a swap between entries of equal magnitude (tie-breaking at a
    threshold: the two selections hold the same multiset of |delta|)."""
    base = C.load_tensors(Path(config["base_model"]))
    out: dict = {"evomerge": [], "mergekit": [], "mismatched": [], "swaps_only": True}
    for i, m in enumerate(config["models"]):
        single = {**config, "models": [{"model": m["model"], "parameters": {**m["parameters"], "weight": 1.0}}]}
        cfg = work / f"single_{i}.yml"
        cfg.write_text(yaml.safe_dump(single, sort_keys=False))
        oe, om = work / f"single_{i}.evomerge", work / f"single_{i}.mergekit"
        build_evomerge(cfg, oe)
        build_mergekit(mk_yaml, cfg, om)
        te, tm, src = C.load_tensors(oe), C.load_tensors(om), C.load_tensors(Path(m["model"]))
        n = ke_n = km_n = mism = 0
        for k, b in base.items():
            ke, km = te[k] != b, tm[k] != b
            absd = (src[k].float() - b.float()).abs()
            only_e, only_m = absd[ke & ~km], absd[km & ~ke]
            n += b.numel()
            ke_n += int(ke.sum())
            km_n += int(km.sum())
            mism += only_e.numel() + only_m.numel()
            if only_e.numel() != only_m.numel() or not torch.equal(torch.sort(only_e).values,
                                                                   torch.sort(only_m).values):
                out["swaps_only"] = False
        out["evomerge"].append(ke_n / n)
        out["mergekit"].append(km_n / n)
        out["mismatched"].append(mism)
        shutil.rmtree(oe, ignore_errors=True)
        shutil.rmtree(om, ignore_errors=True)
    return out


# ---- the breadcrumbs small-tensor claim ---------------------------------------------------------------

BREADCRUMBS_PROBE = r"""
import json, torch
from mergekit.sparsify import magnitude_outliers
torch.manual_seed(0)
out = {}
for n in (50, 64, 99, 100, 128):
    t = torch.randn(n)
    r = magnitude_outliers(t, density=0.9, gamma=0.01)
    out[n] = {"n_top": int(0.01 * n), "target_kept": int(0.9 * n), "kept": int((r != 0).sum())}
print(json.dumps(out))
"""


def breadcrumbs_probe(mk_python: Path) -> dict:
    r = subprocess.run([str(mk_python), "-c", BREADCRUMBS_PROBE], env=C.env(), capture_output=True, text=True,
                       check=True)
    return C.last_json(r.stdout)


# ---- main -------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=C.REPO / "results" / "mergekit_agreement.md")
    ap.add_argument("--workdir", type=Path, default=C.BENCH / "agreement")
    ap.add_argument("--tol", type=float, default=1e-5, help="max abs diff that counts as agreement")
    ap.add_argument("--z-tol", type=float, default=4.0,
                    help="random methods: largest difference of a statistic's means (evomerge vs mergekit), in "
                         "standard errors of the seed-to-seed spread, that counts as consistent")
    ap.add_argument("--evo-seeds", type=int, default=5, help="recipe seeds per random method (evomerge)")
    ap.add_argument("--mk-seeds", type=int, default=3, help="--random-seed values per random method (mergekit)")
    ap.add_argument("--keep", action="store_true", help="keep the built models under --workdir/builds")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (debugging)")
    args = ap.parse_args()

    from evomerge.merge.load import parse_recipe
    from evomerge.merge.mergekit_out import mergekit_yaml
    from evomerge.zoo.tiny import make_family

    t_start = time.perf_counter()
    mk_python = C.mergekit_python()
    mk_yaml = mk_python.parent / "mergekit-yaml"
    facts = C.machine_facts(mk_python)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fam = work / "family"
    if not (fam / "base" / "config.json").exists():
        shutil.rmtree(fam, ignore_errors=True)
        make_family(fam, "llama", n_experts=1, hidden=128, layers=4, seed=0)
    experts = C.derive_finetunes(fam / "base", fam, ["ft1", "ft2", "ft3"], scale=0.1, seed=7)
    B, E1, E2, E3 = (str(p) for p in (fam / "base", experts["ft1"], experts["ft2"], experts["ft3"]))
    smallest = min(t.numel() for t in C.load_tensors(Path(B)).values())
    bf16 = _bf16_family(fam, fam / "bf16", ["base", "ft1", "ft2", "ft3"])
    C.derive_finetunes(fam / "base", fam / "small", ["q1", "q2", "q3"], scale=0.01, seed=11)
    shutil.copytree(fam / "base", fam / "small" / "base", dirs_exist_ok=True)
    quant = _bf16_family(fam / "small", fam / "small-bf16", ["base", "q1", "q2", "q3"])
    big_fam = work / "family-h512"
    if not (big_fam / "base" / "config.json").exists():
        shutil.rmtree(big_fam, ignore_errors=True)
        make_family(big_fam, "llama", n_experts=1, hidden=512, layers=2, seed=3)
    big_ft = C.derive_finetunes(big_fam / "base", big_fam, ["ft1", "ft2", "ft3"], scale=0.1, seed=13)
    big = (str(big_fam / "base"), *(str(big_ft[k]) for k in ("ft1", "ft2", "ft3")))
    sparse = _sparse_family(fam / "base", [experts[k] for k in ("ft1", "ft2", "ft3")], fam / "sparse")
    cfg_dir, builds = work / "configs", work / "builds"
    shutil.rmtree(builds, ignore_errors=True)
    cfg_dir.mkdir(exist_ok=True)
    builds.mkdir()

    rows, raw = [], {"cases": [], "roundtrip": []}
    for i, case in enumerate(mergekit_cases(B, E1, E2, E3, bf16, quant, big, sparse)):
        if args.only and args.only not in case["name"]:
            continue
        slug = f"{i:02d}_" + "".join(c if c.isalnum() else "_" for c in case["name"]).strip("_")
        cfg = cfg_dir / f"{slug}.yml"
        cfg.write_text(yaml.safe_dump(case["config"], sort_keys=False))
        evo_out, mk_out = builds / f"{slug}.evomerge", builds / f"{slug}.mergekit"
        entry = {"name": case["name"], "method": case["config"]["merge_method"], "kind": case["kind"],
                 "features": case["features"], "config": str(cfg.relative_to(C.REPO)) if cfg.is_relative_to(
                     C.REPO) else str(cfg)}
        try:
            entry["evomerge_s"] = build_evomerge(cfg, evo_out)
            entry["mergekit_s"] = build_mergekit(mk_yaml, cfg, mk_out)
            if case["kind"] == "exact":
                entry.update(compare_exact(evo_out, mk_out, args.tol))
                ok = entry["max_abs_diff"] <= args.tol
                verdict = "agree" if ok else "**DISAGREE**"
                result = f"{entry['max_abs_diff']:.2e}" + ("" if ok else f" (`{entry['worst_tensor']}`)")
                if not ok and entry["method"] in MAGNITUDE_METHODS:
                    sel = selection_check(case["config"], builds, mk_yaml)
                    entry["selection"] = sel
                    if sel["swaps_only"]:
                        verdict = "agree up to tie-breaking"
                    result += (f"; {entry['n_over_tol']} of {entry['elements']} entries differ. Per model, entries "
                               f"kept by one tool only: {', '.join(map(str, sel['mismatched']))}, "
                               + ("all swaps between equal magnitudes at a threshold" if sel["swaps_only"] else
                                  "**not** explained by equal magnitudes"))
            elif case["kind"] == "stats":
                evo_dirs, mk_dirs = [evo_out], [mk_out]
                for sd in range(1, args.evo_seeds):
                    evo_dirs.append(builds / f"{slug}.evomerge.seed{sd}")
                    build_evomerge(cfg, evo_dirs[-1], seed=sd)
                shutil.rmtree(mk_out, ignore_errors=True)
                mk_dirs = []
                for sd in range(1, args.mk_seeds + 1):
                    mk_dirs.append(builds / f"{slug}.mergekit.seed{sd}")
                    build_mergekit(mk_yaml, cfg, mk_dirs[-1], seed=sd)
                entry.update(compare_stats(evo_dirs, mk_dirs, Path(B)))
                for d in evo_dirs[1:] + mk_dirs:
                    if not args.keep:
                        shutil.rmtree(d, ignore_errors=True)
                ok = entry["max_z"] <= args.z_tol
                verdict = "statistically consistent" if ok else "**stats differ**"
                parts = []
                for k, label in (("frac_changed", "changed"), ("mean_abs", "mean\\|Δ\\|"), ("std", "std")):
                    v = entry[k]
                    spec = ".4f" if k == "frac_changed" else ".3e"

                    def f(x: float, spec: str = spec) -> str:
                        return format(x, spec)
                    parts.append(f"{label} {f(v['evomerge'])}±{f(v['evomerge_sd'])} vs {f(v['mergekit'])}"
                                 f"±{f(v['mergekit_sd'])} ({v['rel_diff']:.2%}, z {v['z']:.1f})")
                result = "; ".join(parts)
            elif case["kind"] == "count":
                entry.update(compare_exact(evo_out, mk_out))
                base = C.load_tensors(Path(case["config"]["base_model"]))
                se = delta_stats(C.load_tensors(evo_out), base)
                sm = delta_stats(C.load_tensors(mk_out), base)
                density = case["config"]["models"][0]["parameters"]["density"]
                nz = [delta_stats(C.load_tensors(Path(m["model"])), base)["frac_changed"]
                      for m in case["config"]["models"]]
                kf = selection_check(case["config"], builds, mk_yaml)
                kept = kf["evomerge"]
                entry.update(changed_evomerge=se["frac_changed"], changed_mergekit=sm["frac_changed"],
                             density=density, source_delta_nonzero=nz, kept_per_model=kf)
                if entry["max_abs_diff"] <= args.tol:
                    verdict = "agree"
                elif kf["swaps_only"]:
                    verdict = "agree up to tie-breaking"
                else:
                    verdict = "**DISAGREE**: the tools keep different amounts (ties at the threshold)"
                result = (f"{entry['max_abs_diff']:.2e}. Fraction of each task vector kept (single-model merges): "
                          f"evomerge {', '.join(f'{x:.3f}' for x in kept)}, mergekit "
                          f"{', '.join(f'{x:.3f}' for x in kf['mergekit'])} (density {density}; nonzero "
                          f"task-vector entries {', '.join(f'{x:.3f}' for x in nz)}); the selections differ only "
                          f"by swaps of equal magnitudes: {'yes' if kf['swaps_only'] else '**no**'}. "
                          f"Entries changed from base: evomerge {se['frac_changed']:.4f}, mergekit "
                          f"{sm['frac_changed']:.4f}")
            else:
                ref = builds / f"{slug}.float32-reference"
                build_evomerge(cfg, ref, dtype="float32")
                cfgd = case["config"]
                input_dirs = [Path(m["model"]) for m in cfgd["models"]] + (
                    [Path(cfgd["base_model"])] if cfgd.get("base_model") else [])
                entry.update(compare_bf16(evo_out, mk_out, ref, input_dirs))
                shutil.rmtree(ref, ignore_errors=True)
                ve, vm = entry["vs_float32"]["evomerge"], entry["vs_float32"]["mergekit"]
                if entry["max_ulp_between"] <= 1.0:
                    verdict = "agree within 1 bf16 ulp"
                elif ve["max_ulp"] <= 1.0:
                    verdict = "differ: mergekit computes in bf16 (evomerge: float32, one rounding)"
                else:
                    verdict = "**differ**"
                result = (f"max {entry['max_abs_diff']:.2e} ({entry['max_ulp_between']:.3g} ulp), "
                          f"{entry['frac_differ']:.2%} of entries differ. Error vs "
                          f"the float32 merge: evomerge ≤ {ve['max_ulp']:.2g} ulp, {ve['frac_over_1ulp']:.3%} > 1 ulp; "
                          f"mergekit ≤ {vm['max_ulp']:.3g} ulp"
                          f" (max {vm['max_abs']:.2e}), {vm['frac_over_1ulp']:.3%} of entries > 1 ulp")
        except Exception as ex:  # noqa: BLE001 - a failing build is a result too
            entry["error"] = f"{type(ex).__name__}: {ex}"
            verdict, result = "**ERROR**", f"`{type(ex).__name__}`: {str(ex).splitlines()[0][:200]}"
        entry["verdict"] = verdict
        raw["cases"].append(entry)
        rows.append([case["name"], case["features"], result, verdict])
        print(f"{case['name']:<30} {verdict:<28} {result}", flush=True)
        if not args.keep:
            shutil.rmtree(evo_out, ignore_errors=True)
            shutil.rmtree(mk_out, ignore_errors=True)

    rt_rows = []
    for case in roundtrip_recipes(B, E1, E2, E3):
        if args.only and args.only not in case["name"]:
            continue
        slug = "rt_" + "".join(c if c.isalnum() else "_" for c in case["name"]).strip("_")
        recipe_path = cfg_dir / f"{slug}.recipe.yml"
        recipe_path.write_text(yaml.safe_dump(case["recipe"], sort_keys=False))
        entry = {"name": case["name"]}
        try:
            recipe = parse_recipe(case["recipe"], source=str(recipe_path))
            mk_cfg = cfg_dir / f"{slug}.mergekit.yml"
            mk_cfg.write_text(mergekit_yaml(recipe))
            evo_out, mk_out = builds / f"{slug}.evomerge", builds / f"{slug}.mergekit"
            build_evomerge(recipe_path, evo_out)
            build_mergekit(mk_yaml, mk_cfg, mk_out)
            entry.update(compare_exact(evo_out, mk_out, args.tol))
            ok = entry["max_abs_diff"] <= args.tol
            verdict = "agree" if ok else "**DISAGREE**"
            result = f"{entry['max_abs_diff']:.2e}" + ("" if ok else f" (`{entry['worst_tensor']}`)")
            if not args.keep:
                shutil.rmtree(evo_out, ignore_errors=True)
                shutil.rmtree(mk_out, ignore_errors=True)
        except Exception as ex:  # noqa: BLE001
            entry["error"] = f"{type(ex).__name__}: {ex}"
            verdict, result = "**ERROR**", f"`{type(ex).__name__}`: {str(ex).splitlines()[0][:200]}"
        entry["verdict"] = verdict
        raw["roundtrip"].append(entry)
        rt_rows.append([case["name"], result, verdict])
        print(f"round trip {case['name']:<19} {verdict:<28} {result}", flush=True)

    probe = breadcrumbs_probe(mk_python)
    raw["breadcrumbs_probe"] = probe
    raw["facts"] = facts
    elapsed = time.perf_counter() - t_start

    n_exact = [e for e in raw["cases"] if e["kind"] == "exact"]
    n_ok = sum(1 for e in n_exact if e["verdict"] == "agree")
    n_tie = sum(1 for e in n_exact if e["verdict"] == "agree up to tie-breaking")
    md = [C.header_md("evomerge vs mergekit: do the same configs build the same weights?",
                      C.this_command("mergekit_agreement.py"), facts)]
    md += [f"Models: tiny random Llama from `evomerge.zoo.tiny.make_family` (hidden 128, 4 layers, vocab 96, float32, "
           f"39 tensors, smallest {smallest} elements) and 3 correlated fine-tunes (base + 0.1·rms·(shared + own "
           "seeded noise)); rows marked *large tensors* use the same construction with hidden 512, 2 layers (MLP "
           "tensors of 524,288 elements, above evomerge's exact-selection cutoff). Configs are written to `"
           f"{cfg_dir.relative_to(C.REPO) if cfg_dir.is_relative_to(C.REPO) else cfg_dir}/`. evomerge builds "
           "with `load_recipe(yaml)` → `make_plan` → `write_model_dir`; mergekit with `mergekit-yaml CONFIG OUT` "
           "(default flags). All tensors are compared in float32.", "",
           f"Deterministic methods: max \\|evomerge − mergekit\\| over all tensors, goal ≤ {args.tol:g}: "
           f"**{n_ok}/{len(n_exact)} agree**" + (f", {n_tie} more agree up to tie-breaking (entries of equal "
           "magnitude at a trimming threshold, see notes)" if n_tie else "")
           + ". Random methods (their masks come from different RNGs): fraction of entries changed from the base, "
           "mean \\|merged − base\\|, std(merged − base), as mean ± "
           f"seed-to-seed sd over {args.evo_seeds} evomerge recipe seeds and {args.mk_seeds} mergekit "
           "`--random-seed`s; the relative difference of the means, and that difference in standard errors (z); "
           f"consistent if every z ≤ {args.z_tol:g}. bf16 rows: both builds are also compared with the "
           "float32 merge of the same config; bf16 differences are counted in ulps of the inputs (the bf16 ulp of "
           "max_k \\|input_k\\| at each entry).",
           "",
           "## Per method (mergekit config → both tools)", "",
           C.md_table(["case", "config features", "max abs diff / statistics (evomerge vs mergekit)", "verdict"],
                      rows), "",
           "## Round trip (evomerge recipe → `to_mergekit` YAML → mergekit) vs evomerge's build of the recipe", "",
           C.md_table(["recipe", "max abs diff", "verdict"], rt_rows), ""]
    md += ["## Notes", ""]
    probe_txt = ", ".join(f"n={n}: kept {v['kept']} of target {v['target_kept']} (n_top {v['n_top']})"
                          for n, v in probe.items())
    zeroed = [n for n, v in probe.items() if v["kept"] == 0 and v["target_kept"] > 0]
    if zeroed:
        md.append(f"- **mergekit breadcrumbs zeroes small tensors**: `magnitude_outliers(density=0.9, gamma=0.01)` "
                  f"keeps nothing for n in {zeroed} ({probe_txt}). That is why every tensor of the test family has "
                  "≥ 100 elements.")
    else:
        md.append("- The suspected mergekit breadcrumbs bug (`indices[n_bot:-n_top]` keeps nothing when "
                  "`int(gamma*numel) == 0`) is **not present in mergekit "
                  f"{facts.get('mergekit')}**: its `sparsify.magnitude_outliers` slices "
                  f"`indices[n_bot : n_bot + target_n]`, and the probe keeps the target count at every size "
                  f"({probe_txt}). The family still keeps every tensor ≥ 100 elements, so the comparison does "
                  "not depend on it either way.")
    md += [
        "- `dtype: bfloat16`: mergekit casts the float32 inputs to bf16 before merging; evomerge reads the "
        "float32 inputs, merges in float32 and rounds once on output. The bf16 rows count the resulting "
        "differences in bf16 ulps.",
        "- Tie-breaking: both tools keep exactly int(density·n) entries per task vector, but when several "
        "entries share the magnitude at the cut, mergekit keeps an arbitrary subset (`torch.argsort`) and "
        "evomerge the earliest ones. Float32 task vectors of a few hundred thousand entries already hold a few "
        "exact duplicates (*large tensors* rows); bf16 models whose task vectors are ~1% of the weights "
        "(*small deltas* rows, as real bf16 fine-tunes) hold many. \"Agree up to tie-breaking\" is checked, per "
        "model, on single-model merges in both tools: the entries one tool keeps and the other drops must have "
        "the same multiset of magnitudes.",
        "- Random methods can only agree statistically: evomerge draws masks from a counter-based hash of "
        "(seed, element index), the seed fixed per (recipe seed, model, tensor) (DELLA: the draws of a row go "
        "by magnitude rank, equal magnitudes in column order); mergekit uses `torch.bernoulli` on the global "
        "torch RNG.",
        "- `sce` keeps the entries of largest variance across the task vectors (a top-k like TIES's, ties at the "
        "cut to the earlier entries in evomerge); `arcee_fusion` thresholds at quantiles of its importance "
        "scores, which mergekit estimates from 1,000,000 random draws for tensors with more entries and takes "
        "exactly otherwise. No tensor here has more (the largest has 524,288), so both take them exactly; the "
        "*large tensors* rows exercise evomerge's streamed top-k and selection-based quantiles.",
        "- `karcher` ignores bases, so with `base_model:` the base is one more model averaged (in both tools); "
        "`nuslerp` and `multislerp` use a base when one is given.",
        f"- Total wall time of this benchmark: {elapsed:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else ""
    corpus = "## Real configs from model cards"  # written by benchmarks/mergekit_corpus.py: kept
    if corpus in old:
        md += [old[old.index(corpus):].rstrip("\n"), ""]
    args.out.write_text("\n".join(md))
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
