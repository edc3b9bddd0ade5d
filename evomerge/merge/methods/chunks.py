"""Cache-sized chunking and reusable scratch buffers for the elementwise merge methods.

Big tensors are processed in blocks of whole rows of about CHUNK elements, so every temporary of a
method lives in a small buffer that stays in cache and is reused across blocks, tensors and candidates:
memory traffic stays close to reading the inputs and writing the output once, and no full-size
temporaries are allocated (fresh memory is expensive to touch on a busy machine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

CHUNK = 1 << 17  # elements per block: the block's working set (~10 buffers) fits in L2/L3
_local = threading.local()


def rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, width) view: 1-D tensors are one row, >2-D ones keep their first dimension."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def row_blocks(n_rows: int, width: int) -> Iterator[tuple[int, int]]:
    """[r0, r1) blocks of whole rows with about CHUNK elements each (at least one row)."""
    step = max(1, CHUNK // max(width, 1))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable per-thread buffer of at least prod(shape) elements, viewed as `shape`."""
    cache = getattr(_local, "bufs", None)
    if cache is None:
        cache = _local.bufs = {}
    numel = 1
    for s in shape:
        numel *= s
    key = (name, dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, CHUNK), dtype=dtype, device=device)
        cache[key] = buf
    return buf[:numel].view(shape)


def as_float(block: torch.Tensor, name: str) -> torch.Tensor:
    """The block itself if float32, else a float32 copy in a scratch buffer."""
    if block.dtype == torch.float32:
        return block
    buf = scratch(name, tuple(block.shape), torch.float32, block.device)
    return buf.copy_(block)


def elect_sign(deltas: list[torch.Tensor], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """TIES sign election on one row block: +1 where the sum of the (weighted) deltas is >= 0, else -1, in a
    reusable float32 scratch buffer."""
    sign = scratch("sign", shape, torch.float32, device).copy_(deltas[0])
    for d in deltas[1:]:
        sign.add_(d)
    flag = scratch("flag", shape, torch.bool, device)
    torch.ge(sign, 0, out=flag)
    return sign.copy_(flag).mul_(2.0).sub_(1.0)


STATS_PER_TENSOR = 32  # entries kept per tensor: a search over densities asks for new thresholds every candidate


def source_stat(stats: dict | None, key: Hashable, compute: Callable[[], Any]) -> Any:
    """`compute()`, kept under `key` in `stats` when given: a tensor's statistics that depend on its source
    tensors alone, kept between builds from the same open sources (see MergeMethod.source_stats). At most
    STATS_PER_TENSOR entries are kept (the oldest go first), so memory stays bounded when keys keep changing."""
    if stats is None:
        return compute()
    if key not in stats:
        value = compute()
        while len(stats) >= STATS_PER_TENSOR:
            stats.pop(next(iter(stats)))
        stats[key] = value
    return stats[key]
