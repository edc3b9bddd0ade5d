"""Task arithmetic and its sparsified / sign-consensus variants (TIES, DARE, breadcrumbs, DELLA).

One generalised function, configured per method as data (sparsification x consensus), as in mergekit:

    delta_k = theta_k - theta_0            (task vectors)
    delta_k = sparsify(delta_k, d_k)       (magnitude | random | outliers | della | none),
              optionally rescaled to its original L1 norm (`rescale`)
    wd_k    = w_k * delta_k
    consensus 'sum': keep wd_k only where its sign agrees with sign(sum_k wd_k) (>= 0 counts as +);
                     divisor = sum of the agreeing w_k (1 where none agree)
    none:            divisor = sum_k w_k
    theta   = theta_0 + lambda * (sum of kept wd_k) / (divisor if normalize else 1)

The computation streams over blocks of rows in reusable scratch buffers (`chunks`). Whatever the whole
tensor decides (magnitude thresholds, L1 norms for rescaling, random masks) is settled in a first pass;
the second pass combines and writes the output.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods import fused
from evomerge.merge.methods import sparsify as sp
from evomerge.merge.methods.basic import weighted_sum
from evomerge.merge.methods.chunks import as_float, elect_sign, row_blocks, rows, scratch, source_stat


def task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *,
                    normalize: bool = False, lambda_: float = 1.0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """theta_0 + lambda * sum_k w_k (theta_k - theta_0) [/ sum_k w_k], as one weighted sum of the inputs."""
    div = sum(weights) if normalize else 1.0
    if abs(div) < 1e-8:
        div = 1.0
    coef = [lambda_ * w / div for w in weights]
    return weighted_sum([base, *tensors], [1.0 - sum(coef), *coef], out=out)


def _delta(src: torch.Tensor, base_f: torch.Tensor, name: str) -> torch.Tensor:
    """src - base into a scratch buffer (float32)."""
    buf = scratch(name, tuple(src.shape), torch.float32, src.device)
    if src.dtype == torch.float32:
        return torch.sub(src, base_f, out=buf)
    return buf.copy_(src).sub_(base_f)


def generalized(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float],
                densities: list[float], *, sparsification: str | None, consensus: str | None,
                normalize: bool, rescale: bool, lambda_: float = 1.0,
                gammas: list[float] | None = None, epsilons: list[float] | None = None,
                seeds: list[int] | None = None, out: torch.Tensor | None = None,
                stats: dict | None = None) -> torch.Tensor:
    """The generalised task-arithmetic merge of one tensor (module docstring). `stats`: the tensor's source
    statistics kept between builds (`chunks.source_stat`): the magnitude thresholds (per task vector and count
    kept) and, for a magnitude-only selection, the L1 norms for `rescale` are computed once per open sources."""
    if sparsification not in (None, "magnitude", "random", "outliers", "della"):
        raise ValueError(f"unknown sparsification {sparsification}")
    if consensus not in (None, "sum"):
        raise ValueError(f"unknown consensus {consensus}")
    K = len(tensors)
    b2 = rows(base)
    s2 = [rows(t) for t in tensors]
    n_rows, width = b2.shape
    n = base.numel()
    blocks = list(row_blocks(n_rows, width))
    dev = base.device

    def deltas_of(k: int):
        for r0, r1 in blocks:
            yield _delta(s2[k][r0:r1], as_float(b2[r0:r1], "base"), "delta").abs_()

    # ---- pass 1: per task vector, what the whole tensor decides ------------------------------------
    keep_top: list[sp.TopK | None] = [None] * K  # keep these largest |delta| ...
    drop_top: list[sp.TopK | None] = [None] * K  # ... except these largest (breadcrumbs' outliers)
    masks: list[torch.Tensor | None] = [None] * K  # DELLA's masks, one bool per element
    rand: list[tuple[int, float] | None] = [None] * K  # DARE's (seed, density): a counter-based random mask
    l1_known: list[tuple[float, float] | None] = [None] * K  # L1 norms a mask's kernel summed on the way
    zero = [False] * K
    scale = list(weights)
    for k in range(K):
        d = densities[k]
        if sparsification is None or d >= 1:
            continue
        counts = None  # how many largest |delta| a magnitude selection keeps and drops (its cache key)
        if sparsification == "magnitude":
            keep_n = max(1, int(d * n))  # as mergekit: at least the largest entry survives
            counts = (keep_n, 0)
        elif sparsification == "outliers":
            n_bot, n_top = sp.outlier_counts(n, d, gammas[k])
            if n_bot >= n:
                zero[k] = True
                continue
            counts = (n - n_bot if n_bot > 0 else 0, n_top)
        if counts is not None:
            if counts[0]:
                keep_top[k] = source_stat(stats, ("top", k, counts[0]),
                                          lambda k=k, c=counts[0]: _top_delta(b2, s2[k], c, lambda: deltas_of(k)))
            if counts[1]:
                drop_top[k] = source_stat(stats, ("top", k, counts[1]),
                                          lambda k=k, c=counts[1]: _top_delta(b2, s2[k], c, lambda: deltas_of(k)))
        elif sparsification == "della" and d <= 0:
            zero[k] = True
            continue
        elif sparsification == "random":  # a counter-based mask: drawn where it is used, never stored
            rand[k] = (seeds[k], d)
            counts = ("random", seeds[k], d)
        else:  # DELLA: magnitude-ranked masks, drawn now block by block and remembered
            mask = torch.empty((n_rows, width), dtype=torch.bool, device=dev)
            if fused.usable(base, tensors[k], mask):  # the kernel ranks rows itself, and sums the L1 norms
                l1_known[k] = _fused_della(b2, s2[k], mask, blocks, sp.della_probs(d, epsilons[k], width), seeds[k])
            if l1_known[k] is None:
                for r0, r1 in blocks:
                    dl = _delta(s2[k][r0:r1], as_float(b2[r0:r1], "base"), "delta")
                    mask[r0:r1] = sp.della_keep(dl, d, epsilons[k], seeds[k], r0)
            masks[k] = mask
        if rescale:
            def l1(k=k) -> tuple[float, float]:
                if l1_known[k] is not None:
                    return l1_known[k]
                if rand[k] is not None and fused.usable(base, tensors[k]) and base.dtype == tensors[k].dtype \
                        == torch.float32:
                    try:
                        return fused.l1_random(base, tensors[k], 0, *rand[k])
                    except fused.Unavailable:
                        pass
                before = after = 0.0
                keeper = _Keeper(keep_top[k], drop_top[k], masks[k], rand[k])
                for r0, r1 in blocks:
                    a = _delta(s2[k][r0:r1], as_float(b2[r0:r1], "base"), "delta").abs_()
                    before += a.sum(dtype=torch.float64).item()  # float64, as the fused kernel sums
                    after += keeper.apply(a, r0, r1).sum(dtype=torch.float64).item()
                return before, after

            before, after = (source_stat(stats, ("l1", k, counts), l1) if counts is not None else l1())
            scale[k] *= sp.l1_factor(before, after)

    # ---- pass 2: combine ----------------------------------------------------------------------------
    res = out if out is not None else torch.empty(base.shape, dtype=torch.float32, device=dev)
    div_all = sum(weights)
    if abs(div_all) < 1e-8:
        div_all = 1.0
    active = [k for k in range(K) if not zero[k]]
    if not active:
        return res.copy_(base)
    if fused.usable(base, res, *tensors):
        comb = fused.Combiner(len(active), consensus == "sum", normalize, div_all, lambda_,
                              [weights[k] for k in active], [scale[k] for k in active])
        for j, k in enumerate(active):
            if rand[k] is not None:
                comb.random(j, *rand[k])
            elif masks[k] is not None:
                comb.mask(j, masks[k])
            elif keep_top[k] is not None or drop_top[k] is not None:
                comb.magnitude(j, keep_top[k], drop_top[k])
        try:
            _fused_combine(comb, base, [tensors[k] for k in active], res, b2, s2, active, blocks, width)
            return res
        except fused.Unavailable:
            pass  # the torch form below rewrites every entry
    r_out = rows(res)
    keepers = {k: _Keeper(keep_top[k], drop_top[k], masks[k], rand[k]) for k in active}
    for r0, r1 in blocks:
        bf = as_float(b2[r0:r1], "base")
        shape = (r1 - r0, width)
        mixed = scratch("mixed", shape, torch.float32, dev).zero_()
        wd = []
        for j, k in enumerate(active):
            dl = _delta(s2[k][r0:r1], bf, f"wd{j}")
            keepers[k].apply(dl, r0, r1)
            wd.append(dl.mul_(scale[k]))
        if consensus == "sum":
            sign = elect_sign(wd, shape, dev)
            flag = scratch("flag", shape, torch.bool, dev)
            divisor = scratch("divisor", shape, torch.float32, dev).zero_()
            prod = scratch("prod", shape, torch.float32, dev)
            for j, k in enumerate(active):
                torch.mul(wd[j], sign, out=prod)  # > 0 exactly where the signs agree
                torch.gt(prod, 0, out=flag)
                divisor.add_(flag, alpha=weights[k])
                mixed.add_(prod.clamp_(min=0))
            mixed.mul_(sign)
            torch.eq(divisor, 0, out=flag)
            divisor.masked_fill_(flag, 1.0)
            if normalize:
                mixed.div_(divisor)
        else:
            for dl in wd:
                mixed.add_(dl)
            if normalize:
                mixed.div_(div_all)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        torch.add(bf, mixed, out=r_out[r0:r1])
    return res


def _fused_della(b2: torch.Tensor, s2k: torch.Tensor, mask: torch.Tensor, blocks, probs: torch.Tensor,
                 seed: int) -> tuple[float, float] | None:
    """DELLA's mask by the kernel, block by block; its (L1 before, L1 kept), or None where the kernel failed."""
    probs_np = fused.np_view(probs)
    before = after = 0.0
    try:
        for r0, r1 in blocks:
            bsum, asum = fused.della_mask(as_float(b2[r0:r1], "base"), as_float(s2k[r0:r1], "src"), mask[r0:r1],
                                          r0, probs_np, seed)
            before += bsum
            after += asum
    except fused.Unavailable:
        return None
    return before, after


def _fused_combine(comb: fused.Combiner, base: torch.Tensor, srcs: list[torch.Tensor], res: torch.Tensor,
                   b2: torch.Tensor, s2: list[torch.Tensor], active: list[int], blocks, width: int) -> None:
    """Pass 2 by the fused kernel: float32 tensors in one call, other dtypes block by block through float32
    scratch buffers (the conversions are torch's, as in the torch form)."""
    if all(t.dtype == torch.float32 for t in (base, res, *srcs)):
        comb.run(fused.np_view(base), tuple(fused.np_view(t) for t in srcs), fused.np_view(res), 0)
        return
    r_out = rows(res)
    for r0, r1 in blocks:
        bf = as_float(b2[r0:r1], "base")
        fs = tuple(fused.np_view(as_float(s2[k][r0:r1], f"src{j}")) for j, k in enumerate(active))
        o = r_out[r0:r1]
        of = o if o.dtype == torch.float32 else scratch("mixed", tuple(o.shape), torch.float32, o.device)
        comb.run(fused.np_view(bf), fs, fused.np_view(of), r0 * width)
        if of is not o:
            o.copy_(of)


class _Keeper:
    """Zeroes, block by block and in order, the entries a task vector drops."""

    def __init__(self, keep_top: sp.TopK | None, drop_top: sp.TopK | None, mask: torch.Tensor | None,
                 rand: tuple[int, float] | None = None):
        self.keep_top, self.drop_top, self.mask, self.rand = keep_top, drop_top, mask, rand
        self.seen_keep = self.seen_drop = 0

    def apply(self, a: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Zero the dropped entries of block `a` (a delta or |delta|, rows r0..r1) in place."""
        if self.mask is not None:
            return a.mul_(self.mask[r0:r1])
        if self.rand is not None:
            seed, density = self.rand
            u = fused.keep_uniforms(r0 * a.shape[1], a.numel(), seed, a.device).view(a.shape)
            return a.mul_(u < density)
        if self.keep_top is None and self.drop_top is None:
            return a
        shape = tuple(a.shape)
        absd = torch.abs(a, out=scratch("absd", shape, torch.float32, a.device))
        keep = scratch("keep", shape, torch.bool, a.device)
        if self.keep_top is not None:
            self.seen_keep = self.keep_top.select(absd, keep, self.seen_keep)
        else:
            keep.fill_(True)
        if self.drop_top is not None:
            drop = scratch("drop", shape, torch.bool, a.device)
            self.seen_drop = self.drop_top.select(absd, drop, self.seen_drop)
            keep.logical_and_(drop.logical_not_())
        return a.mul_(keep)


def _top_delta(b2: torch.Tensor, s2k: torch.Tensor, k: int, blocks) -> sp.TopK:
    """The k largest |theta_k - theta_0| over the tensor, streamed."""
    bflat, sflat = b2.reshape(-1), s2k.reshape(-1)
    n = bflat.numel()
    if n < sp._EXACT_BELOW:
        return sp.top_k((sflat.float() - bflat.float()).abs(), k)

    def sample(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(bflat.device)
        return (sflat[idx].float() - bflat[idx].float()).abs()

    return sp.top_k_streamed(n, k, sample, blocks)
