"""Sparsification of task vectors: magnitude (TIES), random (DARE), outliers (breadcrumbs), DELLA.

The pieces here work on one block of rows at a time (see `chunks`), so the generalised task arithmetic
can stream a tensor; whole-tensor helpers at the end serve tests and one-off use. Random masks (DARE, DELLA)
come from a counter-based hash of (seed, element index) (`fused.keep_uniforms`; DELLA indexes the draws of a
row by magnitude rank), so the same recipe builds the same model on any device, thread count or block size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

_EXACT_BELOW = 1 << 18  # below this many elements, a plain kthvalue is cheap


@dataclass(frozen=True)
class TopK:
    """Exactly the k largest of a stream of values: every value > thr, plus the first `take_eq` values
    equal to thr in stream order (ties at the threshold are common in quantised weights)."""

    thr: float
    take_eq: int
    n_eq: int

    def select(self, a: torch.Tensor, out: torch.Tensor, seen_eq: int) -> int:
        """Write the selection of block `a` into bool `out`; return the count of threshold ties seen."""
        torch.gt(a, self.thr, out=out)
        if self.take_eq == self.n_eq:  # no tie to break: keep every value == thr
            out.logical_or_(a == self.thr)
            return seen_eq
        eq = a == self.thr
        n_eq = int(torch.count_nonzero(eq))
        if n_eq and seen_eq < self.take_eq:
            if seen_eq + n_eq <= self.take_eq:
                out.logical_or_(eq)
            else:
                idx = eq.reshape(-1).nonzero().squeeze(1)[: self.take_eq - seen_eq]
                out.view(-1)[idx] = True
        return seen_eq + n_eq


def _topk_from(values: torch.Tensor, v: torch.Tensor, k: int, n_gt_offset: int = 0) -> TopK:
    n_gt = n_gt_offset + int(torch.count_nonzero(values > v))
    return TopK(v.item(), k - n_gt, int(torch.count_nonzero(values == v)))


def top_k_streamed(n: int, k: int, sample: Callable[[torch.Tensor], torch.Tensor],
                   blocks: Callable[[], Iterable[torch.Tensor]]) -> TopK:
    """The k largest of n values that are only available block by block, in O(n).

    `sample(idx)` returns the values at flat indices `idx`; `blocks()` yields all values in blocks, in
    order. A seeded sample brackets the k-th largest; one streamed pass counts the values above the
    bracket and keeps the few inside it; an exact selection over those finishes. If the bracket misses (it
    almost never does) a second pass collects everything.
    """
    m = min(1 << 14, n)
    g = torch.Generator().manual_seed(n ^ k)
    vals = sample(torch.randint(0, n, (m,), generator=g)).float().cpu()
    q = 1.0 - k / n
    d = 5.0 * (q * (1 - q) / m) ** 0.5 + 4.0 / m
    # two order statistics of the sample bracket the k-th largest (kthvalue is O(m); a sort is not needed)
    lo = torch.kthvalue(vals, max(1, int((q - d) * (m - 1)) + 1)).values.item()
    hi = torch.kthvalue(vals, min(m, int(-(-(q + d) * (m - 1) // 1)) + 1)).values.item()
    above, cands = 0, []
    for a in blocks():
        above += int(torch.count_nonzero(a > hi))
        cands.append(a[(a >= lo) & (a <= hi)].float().cpu())
    cand = torch.cat(cands)
    r = k - above
    if 1 <= r <= cand.numel():
        return _topk_from(cand, torch.kthvalue(cand, cand.numel() - r + 1).values, k, above)
    allv = torch.cat([a.reshape(-1).float().cpu().clone() for a in blocks()])
    return _topk_from(allv, torch.kthvalue(allv, n - k + 1).values, k)


def top_k(a: torch.Tensor, k: int) -> TopK:
    """The k largest values of a tensor (1 <= k <= numel)."""
    flat = a.reshape(-1)
    n = flat.numel()
    if n < _EXACT_BELOW:
        f = flat.float().cpu()
        return _topk_from(f, torch.kthvalue(f, n - k + 1).values, k)
    step = 1 << 20
    return top_k_streamed(n, k, lambda idx: flat[idx.to(flat.device)],
                          lambda: (flat[i:i + step] for i in range(0, n, step)))


def kth_largest(a: torch.Tensor, k: int) -> float:
    return top_k(a, k).thr


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n_top): how many smallest and largest entries breadcrumbs drops."""
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    return n_bot, n_top


def della_probs(density: float, epsilon: float, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """DELLA's keep probability by magnitude rank in a row of `width`: (density - eps) .. (density + eps)."""
    return torch.linspace(density - epsilon, density + epsilon, width, dtype=torch.float32, device=device)


def della_keep(rows_block: torch.Tensor, density: float, epsilon: float, seed: int, row0: int = 0) -> torch.Tensor:
    """DELLA MagPrune keep-mask for a block of whole rows (rows row0 ... of the tensor): the entry of magnitude
    rank j in a row of width w (ascending |delta|; equal magnitudes in column order) is kept with probability
    (density - eps) + 2 eps j / (w - 1), decided by the counter-based uniform of element row * w + j."""
    from evomerge.merge.methods.fused import keep_uniforms

    width = rows_block.shape[1]
    order = torch.argsort(rows_block.abs(), dim=1, stable=True)
    u = keep_uniforms(row0 * width, rows_block.numel(), seed, rows_block.device).view(rows_block.shape)
    keep = torch.empty(rows_block.shape, dtype=torch.bool, device=rows_block.device)
    keep.scatter_(1, order, u < della_probs(density, epsilon, width, rows_block.device))
    return keep


def l1_factor(before: float, after: float, eps: float = 1e-7) -> float:
    """mergekit's rescale: multiply kept entries so their L1 norm matches the whole task vector's."""
    return 1.0 if before < eps or after < eps else before / after


# ---- whole-tensor forms -------------------------------------------------------------------------

def _rescaled(delta: torch.Tensor, kept: torch.Tensor, rescale: bool) -> torch.Tensor:
    if rescale:
        kept.mul_(l1_factor(delta.abs().sum().item(), kept.abs().sum().item()))
    return kept


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep exactly max(1, int(density * numel)) largest-magnitude entries (TIES trimming)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    absd = delta.abs()
    keep = torch.empty(delta.shape, dtype=torch.bool, device=delta.device)
    top_k(absd, k).select(absd, keep, 0)
    return _rescaled(delta, delta * keep, rescale)


def bernoulli(delta: torch.Tensor, density: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """DARE's random drop: element i is kept where the counter-based uniform u(seed, i) < density."""
    if density >= 1:
        return delta
    from evomerge.merge.methods.fused import keep_uniforms

    u = keep_uniforms(0, delta.numel(), seed, delta.device).view(delta.shape)
    return _rescaled(delta, delta * (u < density), rescale)


def della(delta: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool = True) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    from evomerge.merge.methods.chunks import rows

    r = rows(delta)
    keep = della_keep(r, density, epsilon, seed).view(delta.shape)
    return _rescaled(delta, delta * keep, rescale)
