"""Linear averaging, SLERP and Model Stock: merges of whole weights (no sparsification)."""

from __future__ import annotations

import math

import torch

from evomerge.merge.methods.chunks import as_float, row_blocks, rows


def weighted_sum(tensors: list[torch.Tensor], coefs: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k c_k t_k in float32, block by block (each output block is finished while it is in cache)."""
    res = out if out is not None else torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    r_out, r_in = rows(res), [rows(t) for t in tensors]
    for r0, r1 in row_blocks(*r_out.shape):
        o = r_out[r0:r1]
        torch.mul(as_float(r_in[0][r0:r1], "ws_in"), coefs[0], out=o)
        for c, t in zip(coefs[1:], r_in[1:], strict=True):
            o.add_(as_float(t[r0:r1], "ws_in"), alpha=c)
    return res


def linear(tensors: list[torch.Tensor], weights: list[float], *, normalize: bool = True,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w_k theta_k, divided by sum_k w_k when `normalize`."""
    div = sum(weights) if normalize else 1.0
    return weighted_sum(tensors, [w / div for w in weights], out=out)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, *, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `a` (t = 0) to `b` (t = 1) over the flattened tensors; linear when
    they are nearly colinear (|cos| > dot_threshold)."""
    a32, b32 = a.float(), b.float()
    na = torch.linalg.vector_norm(a32).item()
    nb = torch.linalg.vector_norm(b32).item()
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = torch.dot(a32.reshape(-1), b32.reshape(-1)).item() / (na * nb)
    if abs(dot) > dot_threshold:
        return torch.lerp(a32, b32, float(t))
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    c0 = math.sin(theta - theta * t) / s
    c1 = math.sin(theta * t) / s
    res = a32 * c0
    return res.add_(b32, alpha=c1)


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: interpolate between the base and the average of the fine-tunes with
    t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of their offsets from the base."""
    shape = base.shape
    w0 = base.float()
    ws = [t.float() for t in tensors]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            c = (offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    cos_t = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * cos_t) / (1 + (n - 1) * cos_t)
    avg = ws[0].clone()
    for w in ws[1:]:
        avg.add_(w)
    avg.div_(n)
    return (t * avg + (1 - t) * w0).reshape(shape)
