"""Task arithmetic and its sparsified / sign-consensus variants (TIES, DARE, breadcrumbs, DELLA).

One generalised function, configured per method as data (sparsification x consensus), as in mergekit:

    delta_k = theta_k - theta_0            (task vectors)
    delta_k = sparsify(delta_k, d_k)       (magnitude | random | outliers | della | none)
    wd_k    = w_k * delta_k
    consensus 'sum': keep wd_k only where its sign agrees with sign(sum_k wd_k); divisor = sum of agreeing w_k
    none:            divisor = sum_k w_k
    theta   = theta_0 + lambda * (sum_k wd_k) / (divisor if normalize else 1)
"""

from __future__ import annotations

import torch

from evomerge.methods import sparsify as sp


def task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *,
                    normalize: bool = False, lambda_: float = 1.0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """theta_0 + lambda * sum_k w_k (theta_k - theta_0) [/ sum_k w_k], computed as one weighted sum
    of the inputs (no task-vector temporaries)."""
    div = sum(weights) if normalize else 1.0
    if abs(div) < 1e-8:
        div = 1.0
    coef = [lambda_ * w / div for w in weights]
    res = out if out is not None else torch.empty_like(base, dtype=torch.float32)
    res.copy_(base)
    res.mul_(1.0 - sum(coef))
    for c, t in zip(coef, tensors, strict=False):
        res.add_(t, alpha=c)
    return res


def generalized(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float],
                densities: list[float], *, sparsification: str | None, consensus: str | None,
                normalize: bool, rescale: bool, lambda_: float = 1.0,
                gammas: list[float] | None = None, epsilons: list[float] | None = None,
                seeds: list[int] | None = None) -> torch.Tensor:
    base32 = base.float()
    deltas: list[torch.Tensor] = []
    for k, t in enumerate(tensors):
        d = t.float() - base32
        if sparsification == "magnitude":
            d = sp.magnitude(d, densities[k], rescale=rescale)
        elif sparsification == "random":
            d = sp.bernoulli(d, densities[k], seeds[k], rescale=rescale)
        elif sparsification == "outliers":
            d = sp.outliers(d, densities[k], gammas[k], rescale=rescale)
        elif sparsification == "della":
            d = sp.della(d, densities[k], epsilons[k], seeds[k], rescale=rescale)
        elif sparsification is not None:
            raise ValueError(f"unknown sparsification {sparsification}")
        deltas.append(d.mul_(weights[k]))

    if consensus == "sum":
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        positive = total >= 0
        mixed = total.zero_()
        divisor = torch.zeros_like(mixed)
        for w, d in zip(weights, deltas, strict=False):
            agree = torch.where(positive, d > 0, d < 0)
            mixed.add_(d * agree)
            divisor.add_(agree, alpha=w)
        divisor[divisor == 0] = 1
    elif consensus is None:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    else:
        raise ValueError(f"unknown consensus {consensus}")
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base32)
