"""Fused CPU kernels for the task-arithmetic family's combining pass (TIES, DARE, breadcrumbs, DELLA, ...).

The torch form of `task_arithmetic.generalized` spends ~40 elementwise operations per row block (deltas, masks,
sign election, agreeing sums, divisor); each reads and writes a cache-sized buffer, so a build costs tens of
times the memory-copy bound on a CPU. Here one compiled loop (numba, `nogil`, so the build's tensor threads
run it in parallel) reads each input once and writes the output once, in small tiles that the compiler
vectorises. It performs the float32 operations of the torch form in the same order, so the two agree bit
for bit (tests/test_fused.py); the torch form stays the path for other devices, for tensors that are not
contiguous, and where numba is missing or `EVOMERGE_FUSED=0`.

Random keep-masks (DARE) come from a counter-based hash of (seed, element index): any block can be drawn
on its own, on any device, without storing a mask (`keep_uniforms` is the torch form, used on other devices).
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch

MODE_ALL, MODE_MAGNITUDE, MODE_RANDOM, MODE_MASK = 0, 1, 2, 3  # as in _fused_kernels
_M32 = 0xFFFFFFFF
_C3 = 0x9E3779B9
# Chris Wellons' triple32 integer hash, a bijection of 32-bit words with near-ideal avalanche (bias 0.021): three
# rounds of (x ^= x >> s; x *= m)
_ROUNDS = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))
_LAST = 14

_lock = threading.Lock()
_kernels: dict | None = None
_failed = False


# ---- the counter-based uniforms ------------------------------------------------------------------------

def _mix32(x: int) -> int:
    for s, m in _ROUNDS:
        x ^= x >> s
        x = (x * m) & _M32
    return x ^ (x >> _LAST)


def hash_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys a seed's uniforms are drawn with."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _mix32(seed & _M32), _mix32(((seed >> 32) ^ _C3) & _M32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = torch.bitwise_and(x * (c >> 16), 0xFFFF).bitwise_left_shift_(16)
    return lo.add_(hi).bitwise_and_(_M32)


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    for s, m in _ROUNDS:
        x = _mul32(x ^ (x >> s), m)
    return x ^ (x >> _LAST)


def keep_uniforms(offset: int, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1) for flat elements offset .. offset+n-1 of a tensor, from `seed`: the value
    of element i depends on (seed, i) alone (the fused kernel computes the same numbers)."""
    k1, k2 = hash_keys(seed)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    hi = _mul32(i >> 32, _C3)
    x = _mix32_t(torch.bitwise_and(i, _M32) ^ k1)
    x = _mix32_t(x ^ hi ^ k2)
    return (x >> 8).to(torch.float32).mul_(2.0 ** -24)


# ---- availability --------------------------------------------------------------------------------------

def enabled() -> bool:
    """Whether the fused kernels can be used (numba importable, not switched off by EVOMERGE_FUSED=0, and no
    kernel has failed in this process)."""
    if os.environ.get("EVOMERGE_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _get() is not None and not _failed


def _get() -> dict | None:
    global _kernels, _failed
    if _kernels is not None or _failed:
        return _kernels
    with _lock:
        if _kernels is None:
            try:
                from evomerge.merge.methods import _fused_kernels as kn

                _kernels = {"combine": kn.combine, "l1_random": kn.l1_random, "uniforms": kn.uniforms,
                            "della_mask": kn.della_mask}
            except Exception:  # numba missing or unusable here: the torch form serves
                _failed = True
    return _kernels


class Unavailable(RuntimeError):
    """A kernel could not run here (numba failed to compile or run it): the caller takes the torch form. The
    kernels are then switched off for this process, with one warning."""


def _call(name: str, *args):
    global _failed
    try:
        return _get()[name](*args)
    except Exception as e:  # a numba typing/compilation failure on this machine: the torch form is the reference
        if not _failed:
            _failed = True
            warnings.warn(f"evomerge: fused merge kernel {name!r} failed ({type(e).__name__}: {e}); merging with "
                          "torch operations instead (set EVOMERGE_FUSED=0 to skip the kernels)", RuntimeWarning,
                          stacklevel=3)
        raise Unavailable(name) from e


def usable(*tensors: torch.Tensor) -> bool:
    """The fused path applies: CPU tensors, each contiguous, and the kernels available."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and enabled()


def np_view(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor (no copy)."""
    return t.detach().reshape(-1).numpy()


# ---- entry points ----------------------------------------------------------------------------------------

def uniforms_np(offset: int, n: int, seed: int) -> torch.Tensor:
    """`keep_uniforms` computed by the compiled kernel (CPU)."""
    out = np.empty(n, np.float32)
    k1, k2 = hash_keys(seed)
    _call("uniforms", out, offset, np.uint64(k1), np.uint64(k2))
    return torch.from_numpy(out)


def l1_random(base: torch.Tensor, src: torch.Tensor, offset: int, seed: int, density: float) -> tuple[float, float]:
    k1, k2 = hash_keys(seed)
    return _call("l1_random", np_view(base), np_view(src), offset, np.uint64(k1), np.uint64(k2),
                 np.float32(density))


def della_mask(base: torch.Tensor, src: torch.Tensor, mask: torch.Tensor, row0: int, probs: np.ndarray,
               seed: int) -> tuple[float, float]:
    """DELLA's keep-mask of a block of whole rows (float32 base/src, bool mask, rows row0 ...) into `mask`, as
    `sparsify.della_keep` draws it; returns (sum |delta|, sum of kept |delta|)."""
    k1, k2 = hash_keys(seed)
    return _call("della_mask", np_view(base), np_view(src), np_view(mask), row0, base.shape[-1], probs,
                 np.uint64(k1), np.uint64(k2))


class Combiner:
    """The per-tensor constants of one fused combining pass; `run` does one contiguous run of rows."""

    def __init__(self, K: int, consensus: bool, normalize: bool, div_all: float, lam: float,
                 weights: list[float], scales: list[float]):
        self.K = K
        self.mode = np.zeros(K, np.int64)
        self.thr_keep = np.full(K, -np.inf, np.float32)
        self.thr_drop = np.full(K, np.inf, np.float32)
        self.eq_left = np.full((K, 2), -1, np.int64)  # threshold ties still to take (-1: take them all)
        self.dens = np.zeros(K, np.float32)
        self.k1 = np.zeros(K, np.uint64)
        self.k2 = np.zeros(K, np.uint64)
        self.scale = np.asarray(scales, np.float32)
        self.weight = np.asarray(weights, np.float32)
        self.consensus, self.normalize = bool(consensus), bool(normalize)
        self.div_all, self.lam = np.float32(div_all), np.float32(lam)
        self.masks: list[np.ndarray | None] = [None] * K
        self._dummy = np.zeros(1, np.bool_)

    def magnitude(self, k: int, keep_top, drop_top) -> None:
        """Keep |delta| among the top (keep_top) and not among the top (drop_top): `sparsify.TopK`s or None."""
        self.mode[k] = MODE_MAGNITUDE
        if keep_top is not None:
            self.thr_keep[k] = keep_top.thr
            if keep_top.take_eq != keep_top.n_eq:
                self.eq_left[k, 0] = keep_top.take_eq
        else:
            self.thr_keep[k] = -np.inf
        if drop_top is not None:
            self.thr_drop[k] = drop_top.thr
            if drop_top.take_eq != drop_top.n_eq:
                self.eq_left[k, 1] = drop_top.take_eq

    def random(self, k: int, seed: int, density: float) -> None:
        self.mode[k] = MODE_RANDOM
        self.dens[k] = density
        self.k1[k], self.k2[k] = hash_keys(seed)

    def mask(self, k: int, mask: torch.Tensor) -> None:
        self.mode[k] = MODE_MASK
        self.masks[k] = np_view(mask)

    def run(self, base: np.ndarray, srcs: tuple, out: np.ndarray, offset: int) -> None:
        """Combine flat elements offset .. offset+len(base)-1 of the tensor (flat float32 numpy views)."""
        n = base.shape[0]
        masks = tuple(m[offset:offset + n] if m is not None else self._dummy for m in self.masks)
        _call("combine", base, srcs, masks, out, offset, self.mode, self.thr_keep, self.thr_drop, self.eq_left,
              self.dens, self.k1, self.k2, self.scale, self.weight, self.consensus, self.normalize, self.div_all,
              self.lam)
