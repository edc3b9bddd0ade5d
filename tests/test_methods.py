"""Every merge method against a direct reference implementation on small random tensors."""

import math

import numpy as np
import pytest
import torch

from evomerge.merge.methods import basic, get_method
from evomerge.merge.methods import sparsify as sp
from evomerge.merge.methods import task_arithmetic as ta


@pytest.fixture(autouse=True, params=["one-block", "many-blocks"])
def block_size(request, monkeypatch):
    """Run every test with the default block size and with tiny blocks (many blocks per tensor)."""
    from evomerge.merge.methods import chunks

    if request.param == "many-blocks":
        monkeypatch.setattr(chunks, "CHUNK", 64)
    return request.param


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.fixture
def trio():
    base = rand(48, 32, seed=1)
    srcs = [base + 0.1 * rand(48, 32, seed=s) for s in (2, 3, 4)]
    return base, srcs


def ref_topk_mask(delta, density):
    n = delta.numel()
    k = int(density * n)
    mask = torch.zeros(n)
    # ties at the threshold go to the earlier elements
    mask[torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
    return mask.view(delta.shape)


def ref_combine(base, deltas, weights, consensus, normalize, lam):
    wd = torch.stack([d * w for d, w in zip(deltas, weights, strict=False)])
    w = torch.tensor(weights).view(-1, *([1] * base.dim())).expand_as(wd)
    if consensus:
        maj = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        agree = (wd.sign() == maj).float()
        mixed = (wd * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def l1_rescale(delta, kept):
    b, a = delta.abs().sum(), kept.abs().sum()
    return kept if (b < 1e-7 or a < 1e-7) else kept * (b / a)


def test_linear(trio):
    _, srcs = trio
    w = [0.2, 0.5, 0.9]
    ref = sum(wi * s for wi, s in zip(w, srcs, strict=False)) / sum(w)
    torch.testing.assert_close(basic.linear(srcs, w, normalize=True), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(basic.linear(srcs, w, normalize=False), ref * sum(w), atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.7)])
def test_task_arithmetic(trio, normalize, lam):
    base, srcs = trio
    w = [0.4, -0.3, 0.8]
    ref = ref_combine(base, [s - base for s in srcs], w, False, normalize, lam)
    out = torch.empty_like(base)
    res = ta.task_arithmetic(base, srcs, w, normalize=normalize, lambda_=lam, out=out)
    assert res is out
    torch.testing.assert_close(res, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.13])
def test_ties(trio, density):
    base, srcs = trio
    w, d = [0.5, 0.8, 0.3], [density, 0.7, density]
    deltas = [(s - base) * ref_topk_mask(s - base, di) for s, di in zip(srcs, d, strict=False)]
    ref = ref_combine(base, deltas, w, True, True, 1.0)
    got = get_method("ties").run(base, srcs, [{"weight": a, "density": b} for a, b in zip(w, d, strict=False)],
                                 {"normalize": True, "rescale": False, "lambda": 1.0}, [])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_ties_sign_election_by_hand():
    base = torch.zeros(3)
    a = torch.tensor([1.0, -2.0, 0.5])
    b = torch.tensor([-3.0, 1.0, 0.5])
    got = ta.generalized(base, [a, b], [1.0, 1.0], [1.0, 1.0], sparsification=None, consensus="sum",
                         normalize=True, rescale=False)
    # element 0: sum -2 -> negative wins -> only b (-3); element 1: sum -1 -> only a (-2); element 2: both agree
    torch.testing.assert_close(got, torch.tensor([-3.0, -2.0, 0.5]))


def ref_uniform(seed: int, i: int) -> float:
    """DARE's documented draw for element i (Python integers): two keyed rounds of the triple32 hash."""
    def h(x):
        for s, m in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
            x ^= x >> s
            x = (x * m) % 2**32
        return x ^ (x >> 14)

    k1, k2 = h(seed % 2**32), h(((seed >> 32) ^ 0x9E3779B9) % 2**32)
    x = h((i % 2**32) ^ k1)
    x = h(x ^ (((i >> 32) * 0x9E3779B9) % 2**32) ^ k2)
    return (x >> 8) / 2**24


@pytest.mark.parametrize("method,consensus", [("dare_ties", "sum"), ("dare_linear", None)])
def test_dare_matches_reference_given_the_same_draws(trio, method, consensus):
    base, srcs = trio
    w, d, seeds = [0.5, 0.8, 0.3], [0.3, 0.6, 0.9], [11, 12, 13]
    deltas = []
    for s, di, seed in zip(srcs, d, seeds, strict=False):
        delta = s - base
        u = torch.tensor([ref_uniform(seed, i) for i in range(delta.numel())], dtype=torch.float32)
        deltas.append(l1_rescale(delta, delta * (u.view(delta.shape) < di)))
    ref = ref_combine(base, deltas, w, consensus is not None, False, 1.0)
    got = get_method(method).run(base, srcs, [{"weight": a, "density": b} for a, b in zip(w, d, strict=False)],
                                 {"normalize": False, "rescale": True, "lambda": 1.0}, seeds)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_dare_statistics_and_determinism():
    delta = rand(400, 500, seed=5)
    kept = sp.bernoulli(delta, 0.3, seed=99, rescale=False)
    frac = (kept != 0).float().mean().item()
    assert abs(frac - 0.3) < 0.01
    torch.testing.assert_close(kept, sp.bernoulli(delta, 0.3, seed=99, rescale=False))
    assert not torch.equal(kept, sp.bernoulli(delta, 0.3, seed=100, rescale=False))
    resc = sp.bernoulli(delta, 0.3, seed=99, rescale=True)
    assert math.isclose(resc.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-4)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.9, 0.2), (0.3, 0.0)])
def test_breadcrumbs(trio, density, gamma):
    base, srcs = trio
    n = base.numel()
    deltas = []
    for s in srcs:
        delta = s - base
        target, n_top = int(density * n), int(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
        mask = torch.zeros(n)
        mask[order[n_top: n - n_bot]] = 1
        deltas.append(delta * mask.view(delta.shape))
    for name, cons in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
        ref = ref_combine(base, deltas, [0.5, 0.6, 0.7], cons, False, 1.0)
        got = get_method(name).run(base, srcs, [{"weight": w, "density": density, "gamma": gamma}
                                                for w in (0.5, 0.6, 0.7)],
                                   {"normalize": False, "rescale": False, "lambda": 1.0}, [])
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_della_matches_reference_given_the_same_draws(trio):
    base, srcs = trio
    d, eps, seeds = 0.4, 0.1, [21, 22, 23]
    deltas = []
    for s, seed in zip(srcs, seeds, strict=False):
        delta = s - base
        # ranks by magnitude, equal magnitudes in column order (mergekit's ranking, made deterministic)
        ranks = torch.argsort(torch.argsort(delta.abs(), dim=1, stable=True), dim=1).float() + 1
        rmin, rmax = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
        probs = (d - eps) + (ranks - rmin) / (rmax - rmin) * 2 * eps
        u_by_rank = torch.tensor([ref_uniform(seed, i) for i in range(delta.numel())]).view(delta.shape)
        u = torch.gather(u_by_rank, 1, (ranks - 1).long())  # draw row * width + j decides the row's rank-j entry
        deltas.append(l1_rescale(delta, delta * (u < probs)))
    ref = ref_combine(base, deltas, [0.5, 0.6, 0.7], True, True, 1.0)
    got = get_method("della").run(base, srcs, [{"weight": w, "density": d, "epsilon": eps} for w in (0.5, 0.6, 0.7)],
                                  {"normalize": True, "rescale": True, "lambda": 1.0}, seeds)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_della_keeps_large_entries_more_often():
    delta = rand(2000, 64, seed=8)
    kept = sp.della(delta, 0.5, 0.3, seed=1, rescale=False)
    big = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
    assert (kept[big] != 0).float().mean() > (kept[~big] != 0).float().mean() + 0.2


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp(t):
    a, b = rand(40, 30, seed=1), rand(40, 30, seed=2)
    va, vb = a.double().numpy().ravel(), b.double().numpy().ravel()
    cos = np.dot(va / np.linalg.norm(va), vb / np.linalg.norm(vb))
    th = np.arccos(cos)
    ref = (np.sin((1 - t) * th) * va + np.sin(t * th) * vb) / np.sin(th)
    got = basic.slerp(t, a, b)
    np.testing.assert_allclose(got.numpy().ravel(), ref, atol=1e-5)


def test_slerp_colinear_falls_back_to_lerp():
    a = rand(10, 10)
    b = 2 * a
    torch.testing.assert_close(basic.slerp(0.25, a, b), torch.lerp(a, b, 0.25))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(trio, filter_wise):
    base, srcs = trio
    w0 = base.double().numpy()
    ws = [s.double().numpy() for s in srcs]
    if not filter_wise:
        w0f, wsf = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        w0f, wsf = w0, ws
    offs = [w - w0f for w in wsf]
    cos = []
    for i in range(3):
        for j in range(i + 1, 3):
            norms = np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1)
            cos.append((offs[i] * offs[j]).sum(-1) / norms)
    c = np.mean(cos, axis=0)[:, None]
    t = 3 * c / (1 + 2 * c)
    ref = (t * np.mean(wsf, axis=0) + (1 - t) * w0f).reshape(w0.shape)
    got = basic.model_stock(base, srcs, filter_wise=filter_wise)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("n", [10, 1000, 300_000, 1_000_003])
@pytest.mark.parametrize("frac", [0.01, 0.5, 0.97])
def test_kth_largest_is_exact(n, frac):
    a = rand(n, seed=n).abs()
    k = max(1, int(frac * n))
    expected = torch.sort(a, descending=True).values[k - 1]
    assert sp.kth_largest(a, k) == expected.item()


def test_kth_largest_with_many_ties():
    a = (rand(600_000, seed=3).abs() * 4).round()  # only a handful of distinct values
    for k in (1, 1000, 300_000, 599_999):
        assert sp.kth_largest(a, k) == torch.sort(a, descending=True).values[k - 1].item()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_large_tensors_streamed_thresholds_and_masks(method):
    """Tensors above the exact-selection size take the streamed threshold path; results stay exact."""
    base = rand(700, 640, seed=1)
    srcs = [base + 0.1 * rand(700, 640, seed=s) for s in (2, 3)]
    w, d, seeds = [0.6, 0.7], [0.35, 0.5], [5, 6]
    tp = [{"weight": a, "density": b, "gamma": 0.02, "epsilon": 0.2} for a, b in zip(w, d, strict=True)]
    gp = {"normalize": True, "rescale": True, "lambda": 1.0}
    got = get_method(method).run(base, srcs, tp, gp, seeds)
    deltas = []
    for s_, di, seed in zip(srcs, d, seeds, strict=True):
        delta = s_ - base
        if method == "ties":
            kept = delta * ref_topk_mask(delta, di)
        elif method == "dare_ties":
            kept = sp.bernoulli(delta, di, seed, rescale=False)
        elif method == "della":
            kept = sp.della(delta, di, 0.2, seed, rescale=False)
        else:
            n = delta.numel()
            n_bot, n_top = sp.outlier_counts(n, di, 0.02)
            order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
            mask = torch.zeros(n)
            mask[order[n_top: n - n_bot]] = 1
            kept = delta * mask.view(delta.shape)
        deltas.append(l1_rescale(delta, kept))
    ref = ref_combine(base, deltas, w, True, True, 1.0)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.77])
def test_trimming_keeps_exactly_k_when_magnitudes_tie(density):
    """Quantised weights give many equal magnitudes: still exactly int(density * n) entries are kept,
    ties going to the earlier entries (as a stable sort would)."""
    delta = (rand(300, 1000, seed=4) * 3).round() / 64  # a handful of distinct magnitudes
    kept = sp.magnitude(delta, density)
    k = int(density * delta.numel())
    assert int(torch.count_nonzero(kept)) == int(torch.count_nonzero(delta * ref_topk_mask(delta, density)))
    torch.testing.assert_close(kept, delta * ref_topk_mask(delta, density), atol=0, rtol=0)
    assert int(torch.count_nonzero(ref_topk_mask(delta, density))) == k
    base = torch.zeros(300, 1000)
    got = get_method("ties").run(base, [delta], [{"weight": 1.0, "density": density}],
                                 {"normalize": True, "rescale": False, "lambda": 1.0}, [])
    torch.testing.assert_close(got, delta * ref_topk_mask(delta, density), atol=0, rtol=0)


def test_tiny_density_still_keeps_the_largest_entry():
    """density * numel < 1 keeps one entry, as mergekit does, instead of dropping the task vector."""
    base = torch.zeros(64)
    delta = rand(64, seed=9)
    got = get_method("ties").run(base, [delta], [{"weight": 1.0, "density": 0.01}],
                                 {"normalize": True, "rescale": False, "lambda": 1.0}, [])
    assert int(torch.count_nonzero(got)) == 1
    assert got.abs().max() == delta.abs().max()
