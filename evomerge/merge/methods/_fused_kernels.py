"""The numba kernels behind `fused` (imported only when they are first used; see fused.py). Module-level
functions, so numba's on-disk cache serves later processes without compiling again."""

from __future__ import annotations

import numpy as np
from numba import njit

MODE_ALL, MODE_MAGNITUDE, MODE_RANDOM, MODE_MASK = 0, 1, 2, 3

u64 = np.uint64  # hash arithmetic on 64-bit words, masked to 32 bits (fused._mix32 is the reference)
M32, C3 = u64(0xFFFFFFFF), u64(0x9E3779B9)
R1, R2, R3 = u64(0xED5AD4BB), u64(0xAC4C1B51), u64(0x31848BAB)
S8, S11, S14, S15, S17, S32 = u64(8), u64(11), u64(14), u64(15), u64(17), u64(32)
TILE = 512
INV24 = np.float32(2.0 ** -24)
_OPTS = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@njit(inline="always", **_OPTS)
def mix32(x):
    x ^= x >> S17
    x = (x * R1) & M32
    x ^= x >> S11
    x = (x * R2) & M32
    x ^= x >> S15
    x = (x * R3) & M32
    return x ^ (x >> S14)


@njit(inline="always", **_OPTS)
def uniform(i, k1, k2):
    iu = u64(i)
    x = mix32((iu & M32) ^ k1)
    x = mix32(x ^ (((iu >> S32) * C3) & M32) ^ k2)
    return np.float32(x >> S8) * INV24


@njit(**_OPTS)
def uniforms(out, offset, k1, k2):
    for j in range(out.shape[0]):
        out[j] = uniform(offset + j, k1, k2)


@njit(inline="always", **_OPTS)
def task_vector(k, bt, st, mt, m, first, mode, thr_keep, thr_drop, eq_left, dens, k1, k2, scale, d):
    """One tile of task vector k (st - bt, elements first .. first+m-1 of the tensor), sparsified and
    scaled, into d. Every array is a tile-sized view, so the loops vectorise."""
    sk = scale[k]
    md = mode[k]
    if md == MODE_MAGNITUDE:
        tk, td = thr_keep[k], thr_drop[k]
        all_k, all_d = eq_left[k, 0] < 0, eq_left[k, 1] < 0
        n_tk = 0
        n_td = 0
        for j in range(m):
            x = st[j] - bt[j]
            a = abs(x)
            kp = (a > tk) | ((a == tk) & all_k)
            dp = (a > td) | ((a == td) & all_d)
            n_tk += a == tk
            n_td += a == td
            d[j] = x * np.float32(kp & (not dp)) * sk
        if (n_tk > 0 and eq_left[k, 0] > 0) or (n_td > 0 and eq_left[k, 1] > 0):
            # ties at a threshold that takes only some of them: the first ones in stream order are taken
            for j in range(m):
                x = st[j] - bt[j]
                a = abs(x)
                kp = (a > tk) | ((a == tk) & all_k)
                if a == tk and eq_left[k, 0] > 0:
                    kp = True
                    eq_left[k, 0] -= 1
                dp = (a > td) | ((a == td) & all_d)
                if a == td and eq_left[k, 1] > 0:
                    dp = True
                    eq_left[k, 1] -= 1
                d[j] = x * np.float32(kp & (not dp)) * sk
    elif md == MODE_RANDOM:
        dk, a1, a2 = dens[k], k1[k], k2[k]
        for j in range(m):
            keep = uniform(first + j, a1, a2) < dk
            d[j] = (st[j] - bt[j]) * np.float32(keep) * sk
    elif md == MODE_MASK:
        for j in range(m):
            d[j] = (st[j] - bt[j]) * np.float32(mt[j]) * sk
    else:
        for j in range(m):
            d[j] = (st[j] - bt[j]) * sk


@njit(**_OPTS)
def combine(base, srcs, masks, out, offset, mode, thr_keep, thr_drop, eq_left, dens, k1, k2, scale, weight,
            consensus, normalize, div_all, lam):
    """out = base + lam * merged task vectors, for one contiguous run of a tensor starting at flat index
    `offset` (the torch form's pass 2, in its operation order)."""
    n = base.shape[0]
    K = len(srcs)
    wd = np.empty((K, TILE), np.float32)
    sign = np.empty(TILE, np.float32)
    mixed = np.empty(TILE, np.float32)
    divisor = np.empty(TILE, np.float32)
    for start in range(0, n, TILE):
        m = min(TILE, n - start)
        bt = base[start:start + m]
        for k in range(K):
            mk = masks[k]
            mt = mk[start:start + m] if mk.shape[0] > 1 else mk
            task_vector(k, bt, srcs[k][start:start + m], mt, m, offset + start, mode, thr_keep, thr_drop,
                        eq_left, dens, k1, k2, scale, wd[k])
        for j in range(m):
            mixed[j] = np.float32(0.0)
        if consensus:
            w0 = wd[0]
            for j in range(m):
                sign[j] = w0[j]
            for k in range(1, K):
                wk_ = wd[k]
                for j in range(m):
                    sign[j] += wk_[j]
            for j in range(m):
                sign[j] = np.float32(1.0) if sign[j] >= 0 else np.float32(-1.0)
                divisor[j] = np.float32(0.0)
            for k in range(K):
                wk = weight[k]
                wk_ = wd[k]
                for j in range(m):
                    prod = wk_[j] * sign[j]
                    pos = prod > 0  # agrees with the elected sign; clamp(prod, min=0) keeps NaN
                    divisor[j] += wk if pos else np.float32(0.0)
                    mixed[j] += prod if (pos or prod != prod) else np.float32(0.0)
            for j in range(m):
                mixed[j] *= sign[j]
            if normalize:
                for j in range(m):
                    mixed[j] /= divisor[j] if divisor[j] != 0 else np.float32(1.0)
        else:
            for k in range(K):
                wk_ = wd[k]
                for j in range(m):
                    mixed[j] += wk_[j]
            if normalize:
                for j in range(m):
                    mixed[j] /= div_all
        if lam != 1:
            for j in range(m):
                mixed[j] *= lam
        ot = out[start:start + m]
        for j in range(m):
            ot[j] = bt[j] + mixed[j]


@njit(**_OPTS)
def l1_random(base, src, offset, k1, k2, dens):
    """(sum |delta|, sum of |delta| kept by the random mask) over one contiguous run, in float64."""
    before = 0.0
    after = 0.0
    n = base.shape[0]
    for start in range(0, n, TILE):
        m = min(TILE, n - start)
        bt, st = base[start:start + m], src[start:start + m]
        for j in range(m):
            a = np.float64(abs(st[j] - bt[j]))
            before += a
            after += a if uniform(offset + start + j, k1, k2) < dens else 0.0
    return before, after


@njit(**_OPTS)
def della_mask(base, src, mask, row0, width, probs, k1, k2):
    """DELLA's keep-mask for a run of whole rows (flat float32 base and src, flat bool mask; rows row0 ...): in
    each row the entry of magnitude rank j (ascending |src - base|, equal magnitudes in column order) is kept
    where uniform(row * width + j) < probs[j]. Returns (sum |delta|, sum of kept |delta|) in float64.

    The ranks come from a counting sort of the magnitudes' bit patterns (non-negative floats order as their
    bits) into about `width` buckets between the row's smallest and largest pattern, then an insertion sort
    inside each bucket: a few passes over the row instead of a comparison sort."""
    n_rows = base.shape[0] // width
    nb = 1
    while nb < width:
        nb *= 2
    keys = np.empty(width, np.uint32)
    sk = np.empty(width, np.uint32)
    order = np.empty(width, np.int64)
    bucket = np.empty(width, np.int64)
    start = np.empty(nb + 1, np.int64)
    absd = np.empty(width, np.float32)
    bits = absd.view(np.uint32)
    keep_r = np.empty(width, np.bool_)
    before = 0.0
    after = 0.0
    for r in range(n_rows):
        o = r * width
        bt = base[o:o + width]
        st = src[o:o + width]
        mt = mask[o:o + width]
        for j in range(width):
            absd[j] = abs(st[j] - bt[j])
        lo = bits[0]
        hi = bits[0]
        for j in range(width):
            keys[j] = bits[j]
            lo = min(lo, bits[j])
            hi = max(hi, bits[j])
        span = np.int64(hi) - np.int64(lo)
        shift = 0
        while (span >> shift) >= nb:
            shift += 1
        for b in range(nb + 1):
            start[b] = 0
        for j in range(width):
            b = (np.int64(keys[j]) - np.int64(lo)) >> shift
            bucket[j] = b
            start[b + 1] += 1
        for b in range(nb):
            start[b + 1] += start[b]
        for j in range(width):  # stable: equal buckets keep column order
            b = bucket[j]
            p = start[b]
            start[b] = p + 1
            sk[p] = keys[j]
            order[p] = j
        # bucket b now holds positions [start[b-1], start[b]) in column order: insertion-sort each by key (stable)
        p0 = 0
        for b in range(nb):
            p1 = start[b]
            for i in range(p0 + 1, p1):
                kv = sk[i]
                ov = order[i]
                q = i - 1
                while q >= p0 and sk[q] > kv:
                    sk[q + 1] = sk[q]
                    order[q + 1] = order[q]
                    q -= 1
                sk[q + 1] = kv
                order[q + 1] = ov
            p0 = p1
        first = (row0 + r) * width
        for j in range(width):  # the draws by rank, vectorised
            keep_r[j] = uniform(first + j, k1, k2) < probs[j]
        for j in range(width):
            col = order[j]
            a = np.float64(absd[col])
            before += a
            after += a if keep_r[j] else 0.0
            mt[col] = keep_r[j]
    return before, after
