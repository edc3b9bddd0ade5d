"""Merge methods: small pure tensor functions and the one registry that describes them.

Each registry entry adapts resolved per-tensor parameters to its function's explicit arguments.
Variants of task arithmetic (TIES, DARE, breadcrumbs, DELLA) are one function configured as data.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import basic, selective, spherical
from evomerge.merge.methods import task_arithmetic as ta
from evomerge.merge.methods.chunks import source_stat
from evomerge.merge.methods.registry import REQUIRED, MergeMethod, Param, get_method, method_names, register

__all__ = ["REQUIRED", "MergeMethod", "Param", "get_method", "method_names", "register"]

WEIGHT = Param("weight", REQUIRED, low=-1e6, high=1e6, search=(0.0, 1.0), searched_by_default=True,
               doc="how much of this model (its task vector, for task-arithmetic methods)")
DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True, search=(0.05, 1.0), searched_by_default=True,
                doc="fraction of the task vector kept")
GAMMA = Param("gamma", 0.01, low=0.0, high=0.5, search=(0.0, 0.1),
              doc="fraction of largest-magnitude outliers removed (breadcrumbs)")
EPSILON = Param("epsilon", 0.15, low=0.0, high=0.5, search=(0.0, 0.2),
                doc="spread of DELLA's keep probability around the density")
LAMBDA = Param("lambda", 1.0, low=-1e3, high=1e3, search=(0.5, 1.5), doc="scale of the merged task vector")
INT8_MASK = Param("int8_mask", False, kind="bool", doc="accepted for mergekit compatibility; no numeric effect")


def _bool(name: str, default: bool, doc: str) -> Param:
    return Param(name, default, kind="bool", doc=doc)


def _run_linear(base, tensors, tp, gp, seeds, out=None):
    return basic.linear(tensors, [p["weight"] for p in tp], normalize=gp["normalize"], out=out)


def _run_task_arithmetic(base, tensors, tp, gp, seeds, out=None):
    return ta.task_arithmetic(base, tensors, [p["weight"] for p in tp], normalize=gp["normalize"],
                              lambda_=gp["lambda"], out=out)


def _run_generalized(base, tensors, tp, gp, seeds, out=None, stats=None, *, sparsification, consensus):
    return ta.generalized(
        base, tensors, [p["weight"] for p in tp], [p["density"] for p in tp],
        sparsification=sparsification, consensus=consensus, normalize=gp["normalize"],
        rescale=gp["rescale"], lambda_=gp["lambda"],
        gammas=[p.get("gamma", 0.0) for p in tp], epsilons=[p.get("epsilon", 0.0) for p in tp], seeds=seeds,
        out=out, stats=stats,
    )


def _run_slerp(base, tensors, tp, gp, seeds, out=None, stats=None):
    st = source_stat(stats, "slerp", lambda: basic.slerp_stats(base, tensors[0]))
    return basic.slerp(gp["t"], base, tensors[0], out=out, stats=st)


def _run_model_stock(base, tensors, tp, gp, seeds, out=None, stats=None):
    fw = gp["filter_wise"]
    if fw and base.dim() > 2:
        return basic.model_stock(base, tensors, filter_wise=True, out=out)
    ratio = source_stat(stats, f"model_stock:{fw}", lambda: basic.model_stock_ratio(base, tensors, filter_wise=fw))
    return basic.model_stock(base, tensors, filter_wise=fw, out=out, ratio=ratio)


def _della_check(tparams: dict[str, Any], where: str) -> None:
    d, e = tparams.get("density", 1.0), tparams.get("epsilon", 0.15)
    if d < 1 and (d + e >= 1 or d - e <= 0):
        raise EvomergeError(f"{where}: della needs density - epsilon > 0 and density + epsilon < 1 "
                            f"(density {d}, epsilon {e})", "lower epsilon or move density away from 0 and 1")


register(MergeMethod(
    "linear", _run_linear, (WEIGHT,), (_bool("normalize", True, "divide by the sum of weights"),),
    needs_base=False, doc="weighted average of the models", reference="https://arxiv.org/abs/2203.05482"))

_GTA_COMMON = (INT8_MASK, LAMBDA)
register(MergeMethod(
    "task_arithmetic", _run_task_arithmetic, (WEIGHT,),
    (_bool("normalize", False, "divide by the sum of weights"), _bool("rescale", False, "unused"), *_GTA_COMMON),
    doc="base + weighted sum of task vectors", reference="https://arxiv.org/abs/2212.04089"))

for name, sparsification, consensus, normalize, rescale, extra, doc, ref in [
    ("ties", "magnitude", "sum", True, False, (), "trim by magnitude, elect sign, disjoint mean",
     "https://arxiv.org/abs/2306.01708"),
    ("dare_ties", "random", "sum", False, True, (), "random drop and rescale, then TIES sign election",
     "https://arxiv.org/abs/2311.03099"),
    ("dare_linear", "random", None, False, True, (), "random drop and rescale, then a weighted sum",
     "https://arxiv.org/abs/2311.03099"),
    ("breadcrumbs", "outliers", None, False, False, (GAMMA,), "drop smallest and largest outliers",
     "https://arxiv.org/abs/2312.06795"),
    ("breadcrumbs_ties", "outliers", "sum", False, False, (GAMMA,), "breadcrumbs with TIES sign election",
     "https://arxiv.org/abs/2312.06795"),
    ("della", "della", "sum", True, True, (EPSILON,), "magnitude-ranked random drop, TIES sign election",
     "https://arxiv.org/abs/2406.11617"),
    ("della_linear", "della", None, False, True, (EPSILON,), "magnitude-ranked random drop, then a weighted sum",
     "https://arxiv.org/abs/2406.11617"),
]:
    register(MergeMethod(
        name, partial(_run_generalized, sparsification=sparsification, consensus=consensus),
        (WEIGHT, DENSITY, *extra),
        (_bool("normalize", normalize, "divide by the sum of (agreeing) weights"),
         _bool("rescale", rescale, "rescale kept entries to the task vector's L1 norm"), *_GTA_COMMON),
        random=sparsification in ("random", "della"), doc=doc, reference=ref,
        extra_check=_della_check if sparsification == "della" else None,
        # kept per open sources: magnitude thresholds per tensor and count; DARE's L1 norms per seed and density
        source_stats=sparsification in ("magnitude", "outliers", "random")))

register(MergeMethod(
    "slerp", _run_slerp, (), (Param("t", REQUIRED, low=0.0, high=1.0, search=(0.0, 1.0), searched_by_default=True,
                                     doc="0 = base, 1 = the other model"),),
    min_inputs=1, max_inputs=1, doc="spherical interpolation between the base and one model",
    reference="https://en.wikipedia.org/wiki/Slerp", source_stats=True))

register(MergeMethod(
    "model_stock", _run_model_stock, (), (_bool("filter_wise", False, "one ratio per row instead of per tensor"),),
    min_inputs=2, doc="geometric interpolation toward the fine-tunes' centre",
    reference="https://arxiv.org/abs/2403.19522", source_stats=True))


# ---- spherical merges ------------------------------------------------------------------------------------

def _run_nuslerp(base, tensors, tp, gp, seeds, out=None, stats=None):
    t = spherical.nuslerp_t([p["weight"] for p in tp])
    a, b, row_wise, flatten = tensors[0], tensors[1], gp["nuslerp_row_wise"], gp["nuslerp_flatten"]
    st = None
    if spherical.nuslerp_streams(a, row_wise=row_wise, flatten=flatten):
        st = source_stat(stats, f"nuslerp:{flatten}", lambda: spherical.nuslerp_stats(a, b, base, per_row=not flatten))
    return spherical.nuslerp(t, a, b, base, row_wise=row_wise, flatten=flatten, out=out, stats=st)


def _run_multislerp(base, tensors, tp, gp, seeds, out=None):
    return spherical.multislerp(tensors, [p["weight"] for p in tp], base, normalize_weights=gp["normalize_weights"],
                                eps=gp["eps"], out=out)


def _run_karcher(base, tensors, tp, gp, seeds, out=None):
    return spherical.karcher(tensors, max_iter=int(gp["max_iter"]), tol=gp["tol"])


register(MergeMethod(
    "nuslerp", _run_nuslerp, (WEIGHT,),
    (_bool("nuslerp_flatten", True, "interpolate the whole tensor as one vector (else row by row)"),
     _bool("nuslerp_row_wise", False, "without flatten: interpolate columns instead of rows")),
    needs_base=False, optional_base=True, min_inputs=2, max_inputs=2,
    doc="slerp between two models (their task vectors, with a base) at t = w2 / (w1 + w2)",
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md", source_stats=True))

register(MergeMethod(
    "multislerp", _run_multislerp, (WEIGHT,),
    (_bool("normalize_weights", True, "divide the weights by their sum"),
     Param("eps", 1e-8, low=0.0, high=1e-2, doc="added to norms before dividing by them")),
    needs_base=False, optional_base=True, min_inputs=1,
    doc="weighted spherical mean of several models (their task vectors, with a base)",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"))

register(MergeMethod(
    "karcher", _run_karcher, (),
    (Param("max_iter", 10, kind="int", low=0, high=10_000, doc="iterations of the Karcher mean"),
     Param("tol", 1e-5, low=0.0, high=1.0, search=(1e-7, 1e-3), doc="convergence and degeneracy tolerance")),
    needs_base=False, min_inputs=1,
    doc="Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
    reference="https://arxiv.org/abs/2603.04972"))


# ---- selective merges -----------------------------------------------------------------------------------

def _run_sce(base, tensors, tp, gp, seeds, out=None):
    return selective.sce(base, tensors, select_topk=gp["select_topk"], out=out)


def _run_nearswap(base, tensors, tp, gp, seeds, out=None):
    return selective.nearswap(gp["t"], base, tensors[0], out=out)


def _run_arcee_fusion(base, tensors, tp, gp, seeds, out=None):
    return selective.arcee_fusion(base, tensors[0], out=out)


def _run_ram(base, tensors, tp, gp, seeds, out=None):
    return selective.ram(base, tensors, epsilon=gp["epsilon"], out=out)


def _run_ramplus_tl(base, tensors, tp, gp, seeds, out=None):
    return selective.ram(base, tensors, epsilon=gp["epsilon"], r=gp["r"], alpha=gp["alpha"], out=out)


register(MergeMethod(
    "sce", _run_sce, (),
    (Param("select_topk", 1.0, low=0.0, high=1.0, search=(0.05, 1.0), searched_by_default=True,
           doc="fraction of entries kept: those whose task vectors vary most across models"), INT8_MASK),
    min_inputs=1, doc="select high-variance entries, weight models by task-vector energy, erase sign conflicts",
    reference="https://arxiv.org/abs/2408.07990"))

register(MergeMethod(
    "nearswap", _run_nearswap, (),
    (Param("t", REQUIRED, low=0.0, high=1e6, search=(0.0, 0.01), searched_by_default=True,
           doc="entries within t of the base are taken from the other model (weight units)"),),
    min_inputs=1, max_inputs=1, doc="take the other model's values where they are close to the base",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"))

register(MergeMethod(
    "arcee_fusion", _run_arcee_fusion, (), (), min_inputs=1, max_inputs=1,
    doc="take the other model's changes where their size times the row's KL divergence is an outlier",
    reference="https://arcee.ai"))

RAM_EPSILON = Param("epsilon", 1e-5, low=0.0, high=1.0, search=(0.0, 1e-3),
                    doc="task-vector entries of at most this magnitude count as unchanged")
register(MergeMethod(
    "ram", _run_ram, (), (replace(RAM_EPSILON, searched_by_default=True),), min_inputs=1,
    doc="changes made by one model kept, changes made by several averaged",
    reference="https://arxiv.org/abs/2601.13572"))

register(MergeMethod(
    "ramplus_tl", _run_ramplus_tl, (),
    (Param("r", 0.1, low=0.0, high=100.0, search=(0.0, 1.0), searched_by_default=True,
           doc="how much models that share many changes get their own changes amplified"),
     Param("alpha", 0.2, low=0.0, high=100.0, search=(0.0, 1.0), searched_by_default=True,
           doc="cap on the shared/unique ratio"),
     RAM_EPSILON),
    min_inputs=1, doc="RAM, each model's unique changes scaled by 1 + r min(shared/unique, alpha) (per tensor)",
    reference="https://arxiv.org/abs/2601.13572"))


def merge_tensor(method: MergeMethod, base: torch.Tensor | None, tensors: list[torch.Tensor],
                 tensor_params: list[dict[str, Any]], global_params: dict[str, Any],
                 seeds: list[int], out: torch.Tensor | None = None, stats: dict | None = None) -> torch.Tensor:
    """Merge one tensor with `method`. The result is float32; methods that can write straight into a
    float32 `out` do (and return it), the others return a new tensor. `stats`: this tensor's source
    statistics kept between builds (only for methods with `source_stats`; ignored by the others)."""
    if method.source_stats:
        return method.run(base, tensors, tensor_params, global_params, seeds, out=out, stats=stats)
    return method.run(base, tensors, tensor_params, global_params, seeds, out=out)
