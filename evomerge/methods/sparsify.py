"""Sparsification of task vectors: magnitude (TIES), random (DARE), outliers (breadcrumbs), DELLA.

Each function returns the kept fraction of a delta, optionally rescaled so its L1 norm matches the
original (mergekit's `rescale`). Random masks come from a counter-free seeded PCG64 stream drawn on the
CPU, so the same recipe builds the same model on any device and any thread count.
"""

from __future__ import annotations

import numpy as np
import torch

_EXACT_BELOW = 1 << 18  # below this many elements, a plain kthvalue is cheap


def uniform(numel: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`numel` float32 values uniform in [0, 1) from PCG64(seed): identical on every machine."""
    rng = np.random.Generator(np.random.PCG64(seed))
    u = torch.from_numpy(rng.random(numel, dtype=np.float32))
    return u if str(device) == "cpu" else u.to(device)


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (exact), in O(n).

    A seeded sample brackets the answer; one pass counts what lies above the bracket and collects the few
    values inside it, and an exact selection over that small set finishes. Falls back to a full
    `kthvalue` when the bracket misses (it almost never does).
    """
    n = a.numel()
    if n < _EXACT_BELOW:
        return torch.kthvalue(a.float().cpu() if a.device.type == "cpu" else a.float(), n - k + 1).values
    g = torch.Generator(device=a.device).manual_seed(n ^ k)
    m = 1 << 16
    sample = a[torch.randint(0, n, (m,), generator=g, device=a.device)].float()
    q = 1.0 - k / n
    d = 5.0 * (q * (1 - q) / m) ** 0.5 + 4.0 / m
    sample = torch.sort(sample).values
    lo = sample[max(0, int((q - d) * (m - 1)))]
    hi = sample[min(m - 1, int(-(-(q + d) * (m - 1) // 1)))]
    above = int(torch.count_nonzero(a > hi))
    cand = a[(a >= lo) & (a <= hi)]
    r = k - above
    if 1 <= r <= cand.numel():
        return torch.kthvalue(cand, cand.numel() - r + 1).values
    return torch.kthvalue(a, n - k + 1).values


def _rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `density` fraction of largest-magnitude entries (TIES trimming)."""
    if density >= 1:
        return delta
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        return torch.zeros_like(delta)
    absd = delta.abs().view(-1)
    thr = kth_largest(absd, k)
    kept = delta * (absd >= thr).view(delta.shape)
    return _rescale_l1(delta, kept) if rescale else kept


def outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model breadcrumbs: drop the `gamma` fraction of largest entries, then the smallest, keeping `density`."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    absd = delta.abs().view(-1)
    keep = torch.ones_like(absd, dtype=torch.bool)
    if n_bot > 0:
        keep &= absd >= kth_largest(absd, n - n_bot)
    if n_top > 0:
        keep &= absd < kth_largest(absd, n_top)
    kept = delta * keep.view(delta.shape)
    return _rescale_l1(delta, kept) if rescale else kept


def bernoulli(delta: torch.Tensor, density: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (seeded), rescale to the original L1 norm."""
    if density >= 1:
        return delta
    u = uniform(delta.numel(), seed, delta.device).view(delta.shape)
    kept = delta * (u < density)
    return _rescale_l1(delta, kept) if rescale else kept


def della(delta: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """DELLA MagPrune: within each row, keep probability rises linearly with magnitude rank,
    from density - epsilon (smallest) to density + epsilon (largest). The j-th uniform of a row decides
    the row's element of rank j."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
    width = rows.shape[1]
    absd = rows.abs()
    # Non-negative float32 bit patterns sort like the floats, and integer sorts are faster.
    order = torch.argsort(absd.contiguous().view(torch.int32) if absd.dtype == torch.float32 else absd, dim=1)
    # The element of rank j in its row is kept with probability (density - eps) + 2 eps j / (width - 1):
    # draw the uniforms in rank order and scatter the decisions back to the elements' positions.
    probs = torch.linspace(density - epsilon, density + epsilon, width, device=rows.device)
    u = uniform(rows.numel(), seed, rows.device).view(rows.shape)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
    keep.scatter_(1, order, u < probs)
    kept = (rows * keep).view(delta.shape)
    return _rescale_l1(delta, kept) if rescale else kept
