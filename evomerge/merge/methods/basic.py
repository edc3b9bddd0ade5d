"""Linear averaging, SLERP and Model Stock: merges of whole weights (no sparsification)."""

from __future__ import annotations

import math

import torch

from evomerge.merge.methods.chunks import as_float, row_blocks, rows, scratch


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


def _block_pairs(tensors: list[torch.Tensor], prefix: str):
    """(r0, r1, float32 blocks of every tensor) over blocks of whole rows (one read of each input)."""
    rs = [rows(t) for t in tensors]
    for r0, r1 in row_blocks(*rs[0].shape):
        yield r0, r1, [as_float(r[r0:r1], f"{prefix}{i}") for i, r in enumerate(rs)]


def slerp_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(a.a, b.b, a.b) over the flattened tensors, summed in float64: one streamed pass. They depend on the
    sources alone, so a worker building many SLERP candidates from the same sources computes them once."""
    acc = torch.zeros(3, dtype=torch.float64, device=a.device)
    for _, _, (x, y) in _block_pairs([a, b], "slerp"):
        xf, yf = x.reshape(-1), y.reshape(-1)
        acc[0] += torch.dot(xf, xf)
        acc[1] += torch.dot(yf, yf)
        acc[2] += torch.dot(xf, yf)
    saa, sbb, sab = acc.tolist()
    return saa, sbb, sab


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, *, dot_threshold: float = 0.9995,
          eps: float = 1e-8, out: torch.Tensor | None = None,
          stats: tuple[float, float, float] | None = None) -> torch.Tensor:
    """Spherical interpolation from `a` (t = 0) to `b` (t = 1) over the flattened tensors; linear when
    they are nearly colinear (|cos| > dot_threshold). Streams: one pass for the norms and the dot product
    (`slerp_stats`; skipped when `stats` gives them), one pass that writes the result (into `out` when
    given)."""
    saa, sbb, sab = stats if stats is not None else slerp_stats(a, b)
    na, nb = math.sqrt(saa), math.sqrt(sbb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = sab / (na * nb)
    res = out if out is not None else torch.empty(a.shape, dtype=torch.float32, device=a.device)
    r_out = rows(res)
    if abs(dot) > dot_threshold:
        for r0, r1, (x, y) in _block_pairs([a, b], "slerp"):
            torch.lerp(x, y, float(t), out=r_out[r0:r1])
        return res
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    c0 = math.sin(theta - theta * t) / s
    c1 = math.sin(theta * t) / s
    for r0, r1, (x, y) in _block_pairs([a, b], "slerp"):
        torch.mul(x, c0, out=r_out[r0:r1]).add_(y, alpha=c1)
    return res


def model_stock_ratio(base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock's interpolation ratio t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the
    fine-tunes' offsets from the base: shape (1, 1), or (rows, 1) per row of the 2-D view with `filter_wise`.
    One streamed pass over blocks of rows (one small Gram matmul per block; no offset tensor is ever whole in
    memory). It depends on the sources alone, so a worker computes it once per tensor."""
    n = len(tensors)
    n_rows = rows(base).shape[0]
    dev = base.device
    gram = torch.zeros((n_rows, n, n) if filter_wise else (n, n), dtype=torch.float32 if filter_wise
                       else torch.float64, device=dev)
    for r0, r1, blocks in _block_pairs([base, *tensors], "ms"):
        w0 = blocks[0]
        offs = scratch("ms_offs", (n, *w0.shape), torch.float32, dev)
        for k, w in enumerate(blocks[1:]):
            torch.sub(w, w0, out=offs[k])
        if filter_wise:  # per row: (rows, n, width) @ (rows, width, n)
            per_row = offs.transpose(0, 1)
            torch.bmm(per_row, per_row.transpose(1, 2), out=gram[r0:r1])
        else:
            flat = offs.view(n, -1)
            gram += (flat @ flat.T).double()
    iu, ju = torch.triu_indices(n, n, offset=1, device=dev)
    sq = torch.diagonal(gram, dim1=-2, dim2=-1)
    norms = sq.sqrt().float()
    cos = (gram[..., iu, ju].float() / (norms[..., iu] * norms[..., ju]).clamp(min=1e-6)).clamp(-1, 1)
    c = cos.mean(dim=-1).reshape(-1, 1)  # (rows, 1) or (1, 1)
    return (n * c) / (1 + (n - 1) * c)


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False,
                out: torch.Tensor | None = None, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Model Stock: t * (average of the fine-tunes) + (1 - t) * base, with t from `model_stock_ratio` (one
    per tensor, or per row with `filter_wise`; pass `ratio` to skip that pass). The result is written in one
    streamed pass over blocks of rows (into `out` if given)."""
    if filter_wise and base.dim() > 2:
        return _model_stock_dense(base, tensors, filter_wise=True)
    t = ratio if ratio is not None else model_stock_ratio(base, tensors, filter_wise=filter_wise)
    n = len(tensors)
    res = out if out is not None else torch.empty(base.shape, dtype=torch.float32, device=base.device)
    r_out = rows(res)
    if not filter_wise:
        tn, keep = float(t) / n, 1.0 - float(t)
        for r0, r1, blocks in _block_pairs([base, *tensors], "ms"):
            o = r_out[r0:r1]
            torch.mul(blocks[1], tn, out=o)
            for w in blocks[2:]:
                o.add_(w, alpha=tn)
            o.add_(blocks[0], alpha=keep)
        return res
    for r0, r1, blocks in _block_pairs([base, *tensors], "ms"):
        o = r_out[r0:r1]
        tn = t[r0:r1] / n
        torch.mul(blocks[1], tn, out=o)
        for w in blocks[2:]:
            o.addcmul_(w, tn)
        o.addcmul_(blocks[0], 1 - t[r0:r1])
    return res


def _model_stock_dense(base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool) -> torch.Tensor:
    """The whole-tensor formula (kept for filter-wise ratios of tensors with more than two dimensions, whose
    rows are their last dimension)."""
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
