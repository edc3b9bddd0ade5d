"""Merges that choose, entry by entry, which model's change to take: SCE, NearSwap, Arcee Fusion, RAM, RAM+.

Each is a pure function of float tensors that streams over blocks of rows (see `chunks`): whatever the
whole tensor decides (a top-k threshold, per-model weights or counts, quantiles) is settled in a first
pass, the output is written in the last. Task vectors are d_k = theta_k - theta_0.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods import sparsify as sp
from evomerge.merge.methods.chunks import as_float, elect_sign, row_blocks, rows, scratch


def _delta(src: torch.Tensor, base_f: torch.Tensor, name: str) -> torch.Tensor:
    """src - base into a float32 scratch buffer."""
    buf = scratch(name, tuple(src.shape), torch.float32, src.device)
    if src.dtype == torch.float32:
        return torch.sub(src, base_f, out=buf)
    return buf.copy_(src).sub_(base_f)


def _output(base: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return out if out is not None else torch.empty(base.shape, dtype=torch.float32, device=base.device)


# ---- SCE ----------------------------------------------------------------------------------------------

def sce(base: torch.Tensor, tensors: list[torch.Tensor], *, select_topk: float = 1.0,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """SCE: select, calculate, erase (mergekit merge_methods/sce.py, arXiv:2408.07990).

    select:    when select_topk < 1, keep the entries where the task vectors vary most across models: the
               k = int(select_topk * #{var > 0}) largest of var_j = population variance over k of d_k[j]
               (ties at the cut go to the earlier entries); the other entries of every d_k are zeroed.
    calculate: w_k = mean_j d_k[j]^2 / sum_k mean_j d_k[j]^2 (1/K when that sum is below 1e-6).
    erase:     keep d_k[j] only where its sign equals sign(sum_k d_k[j]) (a zero sum counts as +).
    theta_0 + sum_k w_k a_k d_k / max(sum_k w_k a_k, 1e-6), a_k[j] = 1 where d_k[j] is kept.
    """
    K = len(tensors)
    b2, s2 = rows(base), [rows(t) for t in tensors]
    n_rows, width = b2.shape
    blocks = list(row_blocks(n_rows, width))
    dev = base.device
    res = _output(base, out)
    r_out = rows(res)

    keep: torch.Tensor | None = None  # None: every entry selected
    if select_topk < 1:
        keep = torch.zeros((n_rows, width), dtype=torch.bool, device=dev)
        if select_topk > 0:
            var = torch.empty((n_rows, width), dtype=torch.float32, device=dev)
            for r0, r1 in blocks:
                bf = as_float(b2[r0:r1], "base")
                stack = scratch("sce_stack", (K, r1 - r0, width), torch.float32, dev)
                for k in range(K):
                    stack[k].copy_(_delta(s2[k][r0:r1], bf, "delta"))
                torch.var(stack, dim=0, correction=0, out=var[r0:r1])
            k_keep = int(int(torch.count_nonzero(var)) * select_topk)
            if k_keep > 0:
                sp.top_k(var, k_keep).select(var, keep, 0)

    def deltas(r0: int, r1: int, bf: torch.Tensor) -> list[torch.Tensor]:
        ds = [_delta(s2[k][r0:r1], bf, f"d{k}") for k in range(K)]
        if keep is not None:
            for d in ds:
                d.mul_(keep[r0:r1])
        return ds

    sq = [0.0] * K
    for r0, r1 in blocks:
        for k, d in enumerate(deltas(r0, r1, as_float(b2[r0:r1], "base"))):
            flat = d.reshape(-1)
            sq[k] += torch.dot(flat, flat).item()
    means = [x / base.numel() for x in sq]
    total = sum(means)
    w = [1.0 / K] * K if abs(total) < 1e-6 else [m / total for m in means]

    for r0, r1 in blocks:
        bf = as_float(b2[r0:r1], "base")
        ds = deltas(r0, r1, bf)
        shape = (r1 - r0, width)
        sign = elect_sign(ds, shape, dev)
        flag = scratch("flag", shape, torch.bool, dev)
        num = scratch("num", shape, torch.float32, dev).zero_()
        den = scratch("den", shape, torch.float32, dev).zero_()
        prod = scratch("prod", shape, torch.float32, dev)
        for wk, d in zip(w, ds, strict=True):
            torch.mul(d, sign, out=prod)
            torch.gt(prod, 0, out=flag)  # this model's sign agrees with the election
            den.add_(flag, alpha=wk)
            num.add_(d.mul_(flag).mul_(wk))
        torch.add(bf, num.div_(den.clamp_(min=1e-6)), out=r_out[r0:r1])
    return res


# ---- NearSwap -----------------------------------------------------------------------------------------

def nearswap(t: float, base: torch.Tensor, other: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """NearSwap (mergekit merge_methods/nearswap.py): take `other` where it is close to the base.

        w = clamp(t / max(|theta_1 - theta_0|, 1e-6), 0, 1),   theta = w theta_1 + (1 - w) theta_0

    Entries that differ by at most t are swapped entirely; farther ones move by t toward `other`.
    """
    b2, o2 = rows(base), rows(other)
    res = _output(base, out)
    r_out = rows(res)
    for r0, r1 in row_blocks(*b2.shape):
        a = as_float(b2[r0:r1], "base")
        b = as_float(o2[r0:r1], "other")
        w = scratch("w", tuple(a.shape), torch.float32, a.device)
        torch.sub(a, b, out=w).abs_().clamp_(min=1e-6)
        torch.div(t, w, out=w).clamp_(0.0, 1.0)
        o = r_out[r0:r1]
        torch.mul(w, b, out=o)
        o.add_(w.neg_().add_(1.0).mul_(a))
    return res


# ---- Arcee Fusion -------------------------------------------------------------------------------------

def arcee_fusion(base: torch.Tensor, other: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Arcee Fusion (mergekit merge_methods/arcee_fusion.py): take `other`'s changes where they matter most.

        importance[i, j] = |theta_1 - theta_0|[i, j] * KL_i,  KL_i = sum_j p_ij log(p_ij / q_ij),
        p_i = softmax(theta_1[i, :]) + 1e-8,  q_i = softmax(theta_0[i, :]) + 1e-8  (rows = last dimension)
        tau = Q2 + 1.5 (Q3 - Q1) over all importances, Q_m = sorted[floor(m/4 (n - 1))]
        theta = theta_0 + (theta_1 - theta_0) * [importance >= tau]

    The quantiles are exact; mergekit estimates them from 1,000,000 random draws (with replacement) for
    tensors with more entries, so on those the threshold differs slightly.
    """
    last = base.shape[-1] if base.dim() else 1
    b2, o2 = base.reshape(-1, last), other.reshape(-1, last)
    n_rows, width = b2.shape
    blocks = list(row_blocks(n_rows, width))
    dev = base.device
    kls = torch.empty((n_rows, 1), dtype=torch.float32, device=dev)  # one KL per row, kept for pass 2
    imp = torch.empty((n_rows, width), dtype=torch.float32, device=dev)  # only for the quantiles

    def importance(r0: int, r1: int, a: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        """|theta_1 - theta_0| * KL_row for rows r0..r1 into dest (the same ops in both passes: equal bits)."""
        return torch.sub(as_float(o2[r0:r1], "other"), a, out=dest).abs_().mul_(kls[r0:r1])

    for r0, r1 in blocks:
        a = as_float(b2[r0:r1], "base")
        b = as_float(o2[r0:r1], "other")
        p = torch.softmax(b, dim=-1).add_(1e-8)
        q = torch.softmax(a, dim=-1).add_(1e-8)
        kls[r0:r1] = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
        importance(r0, r1, a, imp[r0:r1])
    flat = imp.reshape(-1)
    n = flat.numel()
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    if n < sp._EXACT_BELOW:
        srt = torch.sort(flat).values
        q1, q2, q3 = (srt[i].item() for i in idx)
    elif flat.device.type == "cpu":  # the three order statistics by one partition in place: no copy, no indices
        arr = flat.numpy()
        arr.partition(idx)
        q1, q2, q3 = (float(arr[i]) for i in idx)
    else:
        q1, q2, q3 = (torch.kthvalue(flat, i + 1).values.item() for i in idx)
    del imp, flat
    tau = torch.tensor(q2, dtype=torch.float32) + 1.5 * (torch.tensor(q3, dtype=torch.float32) - q1)
    res = _output(base, out)
    r_out = res.view(-1, last)
    for r0, r1 in blocks:
        a = as_float(b2[r0:r1], "base")
        d = _delta(o2[r0:r1], a, "delta")
        imp_blk = importance(r0, r1, a, scratch("imp", tuple(d.shape), torch.float32, dev))
        d.mul_(imp_blk >= tau)
        torch.add(a, d, out=r_out[r0:r1])
    return res


# ---- RAM, RAM+ ----------------------------------------------------------------------------------------

def ram(base: torch.Tensor, tensors: list[torch.Tensor], *, epsilon: float = 1e-5, r: float | None = None,
        alpha: float = 0.2, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reinforced Agent Merging (mergekit merge_methods/ram.py, arXiv:2601.13572); RAM+ when `r` is given.

    An entry of d_k contributes where |d_k[j]| > epsilon; c[j] = how many models contribute there.
    Entries one model alone changed keep that change, shared ones are averaged over their contributors:

        theta = theta_0 + sum_k [|d_k| > eps] d_k * (lambda_k [c = 1] + [c > 1] / c)

    RAM: lambda_k = 1. RAM+ (tensor-local, `ramplus_tl`): lambda_k = 1 + r * clamp(rho_k, 0, alpha),
    rho_k = (#entries model k shares with others) / max(#entries only model k changed, epsilon), counted
    over this tensor.
    """
    K = len(tensors)
    b2, s2 = rows(base), [rows(t) for t in tensors]
    n_rows, width = b2.shape
    blocks = list(row_blocks(n_rows, width))
    dev = base.device

    def contributions(r0: int, r1: int, bf: torch.Tensor):
        ds = [_delta(s2[k][r0:r1], bf, f"d{k}") for k in range(K)]
        nz = [scratch(f"nz{k}", tuple(bf.shape), torch.bool, dev) for k in range(K)]
        count = scratch("count", tuple(bf.shape), torch.float32, dev).zero_()
        for d, z in zip(ds, nz, strict=True):
            torch.gt(d.abs(), epsilon, out=z)
            count.add_(z)
        return ds, nz, count

    lam = [1.0] * K
    if r is not None:
        shared, unique = [0] * K, [0] * K
        for r0, r1 in blocks:
            _, nz, count = contributions(r0, r1, as_float(b2[r0:r1], "base"))
            one, many = count == 1, count > 1
            for k in range(K):
                shared[k] += int(torch.count_nonzero(nz[k] & many))
                unique[k] += int(torch.count_nonzero(nz[k] & one))
        lam = [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared, unique, strict=True)]

    res = _output(base, out)
    r_out = rows(res)
    for r0, r1 in blocks:
        bf = as_float(b2[r0:r1], "base")
        ds, nz, count = contributions(r0, r1, bf)
        one, many = count == 1, count > 1
        count.clamp_(min=1)
        o = r_out[r0:r1]
        o.zero_()
        for d, z, lk in zip(ds, nz, lam, strict=True):
            d.mul_(z)  # entries at or below epsilon do not count
            term = d * one
            if lk != 1:
                term.mul_(lk)
            o.add_(term).add_(d.mul_(many).div_(count))
        o.add_(bf)
    return res
