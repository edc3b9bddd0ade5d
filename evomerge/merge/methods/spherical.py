"""Spherical merges of whole tensors: NuSLERP, Multi-SLERP and the Karcher mean.

All three treat a tensor (or its task vector, with a base) as one point and interpolate directions on the
sphere while interpolating norms linearly. They compute in float32 and return float32.
"""

from __future__ import annotations

import math

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods.chunks import as_float, row_blocks, rows, scratch


def _slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float) -> torch.Tensor:
    """Slerp along the last dimension of float32 `v0`, `v1` (any leading shape), magnitudes kept:

        u_i = v_i / max(|v_i|, 1e-7),  cos = <u_0, u_1> clamped to [-1, 1],  theta = acos(cos)
        out = (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)
        out = (1 - t) v_0 + t v_1  where 1 - cos^2 <= eps^2 (colinear)
    """
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp_(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_(min=1e-7)
    cos = (torch.div(v0, n0) * torch.div(v1, n1)).sum(dim=-1, keepdim=True).clamp_(-1.0, 1.0)
    colinear = (1 - cos.square()) <= eps * eps
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(s, 1 - t), torch.sin((1 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(s, t), torch.sin(t * theta) / s)
    return v0 * c0 + v1 * c1


def nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None, *,
            row_wise: bool = False, flatten: bool = True, eps: float = 1e-8,
            out: torch.Tensor | None = None, stats: torch.Tensor | None = None) -> torch.Tensor:
    """NuSLERP (mergekit merge_methods/nuslerp.py): spherical interpolation from `a` (t = 0) to `b` (t = 1).

    With a base, the task vectors a - base and b - base are interpolated and added to the base. The
    vectors interpolated are the whole flattened tensor (`flatten`, the default), else each row along the
    last dimension, or with `row_wise` each column (dimension 0 swapped with the last one). Directions
    follow the great circle, norms are interpolated linearly (the unnormalised slerp formula); colinear
    vectors are interpolated linearly. `stats`: `nuslerp_stats` of the same tensors, computed before (the
    streamed cases only: `nuslerp_streams`).
    """
    if nuslerp_streams(a, row_wise=row_wise, flatten=flatten):
        if stats is None:
            stats = nuslerp_stats(a, b, base, per_row=not flatten)
        return _nuslerp_streamed(float(t), a, b, base, stats, per_row=not flatten, eps=eps, out=out)
    v0, v1 = a.float(), b.float()
    if base is not None:
        bf = base.float()
        v0, v1 = v0 - bf, v1 - bf
    shape = v0.shape
    if row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    res = _slerp_rows(float(t), v0, v1, eps)
    if row_wise:
        res = res.transpose(0, -1)
    res = res.reshape(shape).contiguous()
    return res.add_(bf) if base is not None else res


def _slerp_coefs(t: float, sq0: torch.Tensor, sq1: torch.Tensor, dot: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """_slerp_rows' coefficients (c0, c1) from the squared norms and dot products of the vector pairs."""
    n0, n1 = sq0.sqrt().clamp_(min=1e-7), sq1.sqrt().clamp_(min=1e-7)
    cos = (dot / (n0 * n1)).clamp_(-1.0, 1.0)
    colinear = (1 - cos.square()) <= eps * eps
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(s, 1 - t), torch.sin((1 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(s, t), torch.sin(t * theta) / s)
    return c0.float(), c1.float()


def nuslerp_streams(a: torch.Tensor, *, row_wise: bool, flatten: bool) -> bool:
    """Whether `nuslerp` streams this tensor over blocks of rows (the whole tensor, or rows of a <= 2-D one)."""
    return flatten or (not row_wise and a.dim() <= 2)


def _deltas(a2: torch.Tensor, b2: torch.Tensor, g2: torch.Tensor | None, r0: int, r1: int):
    bf = as_float(g2[r0:r1], "base") if g2 is not None else None
    return bf, _delta_block(a2[r0:r1], bf, "nus0"), _delta_block(b2[r0:r1], bf, "nus1")


def nuslerp_stats(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None, *, per_row: bool) -> torch.Tensor:
    """(|a'|^2, |b'|^2, a'.b') of the task vectors a' = a - base, b' = b - base (or of a, b without a base), for
    the whole flattened tensor (float64, shape (3, 1)) or per row (float32, (3, rows)): one streamed pass. They
    depend on the sources alone, so a worker computes them once per tensor."""
    a2, b2 = rows(a), rows(b)
    g2 = rows(base) if base is not None else None
    n_rows, width = a2.shape
    dev = a.device
    stats = torch.zeros(3, n_rows if per_row else 1, dtype=torch.float32 if per_row else torch.float64,
                        device=dev)
    for r0, r1 in row_blocks(n_rows, width):
        _, d0, d1 = _deltas(a2, b2, g2, r0, r1)
        prod = scratch("nus_prod", tuple(d0.shape), torch.float32, dev)
        for i, (x, y) in enumerate(((d0, d0), (d1, d1), (d0, d1))):
            torch.mul(x, y, out=prod)
            if per_row:
                stats[i, r0:r1] = prod.sum(dim=-1)
            else:
                stats[i] += prod.sum()
    return stats


def _nuslerp_streamed(t: float, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None, stats: torch.Tensor,
                      *, per_row: bool, eps: float, out: torch.Tensor | None) -> torch.Tensor:
    """NuSLERP of the whole flattened tensor (or of each row of a <= 2-D one) over blocks of rows, from the
    norms and dot products in `stats` (`nuslerp_stats`): one pass writes base + c0 (a - base) + c1 (b - base)
    (into `out` when given)."""
    a2, b2 = rows(a), rows(b)
    g2 = rows(base) if base is not None else None
    n_rows, width = a2.shape
    dev = a.device
    c0, c1 = _slerp_coefs(t, stats[0], stats[1], stats[2], eps)
    c0, c1 = c0.unsqueeze(-1), c1.unsqueeze(-1)
    res = out if out is not None else torch.empty(a.shape, dtype=torch.float32, device=dev)
    r_out = rows(res)
    for r0, r1 in row_blocks(n_rows, width):
        bf, d0, d1 = _deltas(a2, b2, g2, r0, r1)
        k0, k1 = (c0[r0:r1], c1[r0:r1]) if per_row else (c0, c1)
        o = r_out[r0:r1]
        torch.mul(d0, k0, out=o).addcmul_(d1, k1)
        if bf is not None:
            o.add_(bf)
    return res


def nuslerp_t(weights: list[float]) -> float:
    """mergekit's interpolation factor from the two models' weights: w_1 / (w_0 + w_1), 0.5 if they cancel."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _delta_block(src: torch.Tensor, base: torch.Tensor | None, name: str) -> torch.Tensor:
    """A float32 block of src - base (or src) in a scratch buffer."""
    buf = scratch(name, tuple(src.shape), torch.float32, src.device)
    buf.copy_(src)
    return buf.sub_(base) if base is not None else buf


def multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-SLERP (mergekit merge_methods/multislerp.py): barycentric interpolation on the hypersphere.

    With d_k = theta_k - base (or theta_k), w the weights (divided by their sum when `normalize_weights`):

        u_k = d_k / (|d_k| + eps),  m = sum_k w_k u_k,  mhat = m / |m|
        theta = base + mhat * sum_k w_k |d_k|

    mergekit also projects the u_k onto the tangent space at mhat, averages them there and maps the average
    back with the exponential map; that average, sum_k w_k (u_k - <u_k, mhat> mhat) = m - |m| mhat, is zero,
    so the step leaves mhat as it is (up to rounding) and is not computed here. When |m| < eps (directions
    that cancel), two models are averaged linearly, more are an error, except that models which all equal
    the base give the base (mergekit raises there too). One model is returned as it is.
    """
    if len(tensors) == 1:
        return tensors[0].float().clone() if out is None else out.copy_(tensors[0])
    w = [float(x) for x in weights]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    b2 = rows(base) if base is not None else None
    s2 = [rows(t) for t in tensors]
    n_rows, width = s2[0].shape
    blocks = list(row_blocks(n_rows, width))
    # pass 1: the norms of the (task) vectors
    sq = [0.0] * len(tensors)
    for r0, r1 in blocks:
        bf = as_float(b2[r0:r1], "base") if b2 is not None else None
        for k, s in enumerate(s2):
            d = _delta_block(s[r0:r1], bf, "delta")
            sq[k] += torch.dot(d.reshape(-1), d.reshape(-1)).item()
    norms = [math.sqrt(x) for x in sq]
    # pass 2: m = sum_k w_k d_k / (|d_k| + eps), into the output
    res = out if out is not None else torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    r_out = rows(res)
    m_sq = 0.0
    for r0, r1 in blocks:
        bf = as_float(b2[r0:r1], "base") if b2 is not None else None
        o = r_out[r0:r1]
        o.zero_()
        for wk, nk, s in zip(w, norms, s2, strict=True):  # (d / (|d| + eps)) * w, as mergekit rounds it
            o.add_(_delta_block(s[r0:r1], bf, "delta").div_(nk + eps).mul_(wk))
        m_sq += torch.dot(o.reshape(-1), o.reshape(-1)).item()
    m_norm = math.sqrt(m_sq)
    if m_norm < eps and not any(n > 0 for n in norms):  # every model equals the base: so does the merge
        for r0, r1 in blocks:
            r_out[r0:r1].copy_(b2[r0:r1] if b2 is not None else s2[0][r0:r1])
        return res
    if m_norm < eps:
        if len(tensors) != 2:
            raise EvomergeError("multislerp: the weighted directions of the models cancel out (e.g. opposite "
                                "task vectors with equal weights)", "use different weights")
        for r0, r1 in blocks:  # mergekit's fallback: the weighted sum
            bf = as_float(b2[r0:r1], "base") if b2 is not None else None
            o = r_out[r0:r1]
            torch.mul(_delta_block(s2[0][r0:r1], bf, "delta"), w[0], out=o)
            o.add_(_delta_block(s2[1][r0:r1], bf, "delta"), alpha=w[1])
            if bf is not None:
                o.add_(bf)
        return res
    scale = sum(wk * nk for wk, nk in zip(w, norms, strict=True)) / m_norm
    for r0, r1 in blocks:
        o = r_out[r0:r1].mul_(scale)
        if b2 is not None:
            o.add_(as_float(b2[r0:r1], "base"))
    return res


def karcher(tensors: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the models' directions, scaled by their mean norm (mergekit
    merge_methods/karcher.py), with equal weights 1/N:

        u_k = theta_k / |theta_k|  (models with |theta_k| <= tol take no part in the direction)
        m   = normalised mean of the u_k (the first u_k if that mean is ~0)
        repeat at most max_iter times: g = sum_k a_k (phi_k / sin phi_k) (u_k - cos(phi_k) m),
              phi_k = acos <m, u_k> (terms with phi_k < tol left out), a_k = 1/#participants;
              stop when |g| < tol, else m = cos|g| m + sin|g| g/|g|, renormalised
        theta = (sum_k |theta_k| / N) m
    """
    if len(tensors) == 1:
        return tensors[0].float().clone()
    dtype = torch.float32
    xs = [t.to(dtype) for t in tensors]
    norms = [torch.linalg.vector_norm(x).item() for x in xs]
    valid = [k for k, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    a = 1.0 / len(valid)
    flat = {k: xs[k].reshape(-1) for k in valid}
    mean = torch.zeros_like(flat[valid[0]])
    for k in valid:
        mean.add_(flat[k], alpha=a / norms[k])
    m_norm = torch.linalg.vector_norm(mean).item()
    if m_norm < tol:
        mean = flat[valid[0]] / norms[valid[0]]
    else:
        mean.div_(m_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        along = 0.0  # the tangent's component along `mean`, subtracted once at the end
        for k in valid:
            dot = max(-1.0, min(1.0, torch.dot(mean, flat[k]).item() / norms[k]))
            phi = math.acos(dot)
            if phi < tol:
                continue
            f = a * phi / math.sin(phi)
            tangent.add_(flat[k], alpha=f / norms[k])
            along += f * dot
        tangent.add_(mean, alpha=-along)
        g = torch.linalg.vector_norm(tangent).item()
        if g < tol:
            break
        mean.mul_(math.cos(g)).add_(tangent, alpha=math.sin(g) / g)
        u = torch.linalg.vector_norm(mean).item()
        if u > tol:
            mean.div_(u)
    scale = sum(norms) / len(tensors)
    return mean.mul_(scale).view(tensors[0].shape)
