"""The spherical and selective merge methods (nuslerp, multislerp, karcher, sce, della_linear, nearswap,
arcee_fusion, ram, ramplus_tl) against direct references written from the formulas (float64, whole tensors,
no blocks), their parameters' validation, and a search space for every registered method."""

import math

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import get_method, merge_tensor, selective, spherical


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
    """A base and three correlated fine-tunes (a shared and an own perturbation), 24 x 16."""
    base = rand(24, 16, seed=1)
    shared = rand(24, 16, seed=9)
    return base, [base + 0.1 * (shared + rand(24, 16, seed=s)) for s in (2, 3, 4)]


def run(name, base, tensors, tp=None, gp=None, seeds=()):
    m = get_method(name)
    gp = {p.name: p.default for p in m.global_params} | (gp or {})
    tp = tp or [{} for _ in tensors]
    return merge_tensor(m, base, tensors, tp, gp, list(seeds))


def close(got, ref, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64), atol=atol, rtol=0)


# ---- references (float64 numpy) ---------------------------------------------------------------------

def ref_slerp(t, x, y):
    """Unnormalised slerp of two vectors; lerp when colinear."""
    cos = np.clip(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1)
    if 1 - cos * cos <= 1e-12:
        return (1 - t) * x + t * y
    th = np.arccos(cos)
    return (np.sin((1 - t) * th) * x + np.sin(t * th) * y) / np.sin(th)


def np64(t):
    return t.double().numpy()


# ---- nuslerp ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
def test_nuslerp(trio, with_base, mode):
    base, srcs = trio
    w = [0.3, 0.5]
    t = w[1] / sum(w)
    b = np64(base) if with_base else np.zeros(base.shape)
    x, y = np64(srcs[0]) - b, np64(srcs[1]) - b
    if mode == "flatten":
        ref = ref_slerp(t, x.ravel(), y.ravel()).reshape(x.shape)
    elif mode == "rows":
        ref = np.stack([ref_slerp(t, x[i], y[i]) for i in range(x.shape[0])])
    else:
        ref = np.stack([ref_slerp(t, x[:, j], y[:, j]) for j in range(x.shape[1])], axis=1)
    gp = {"nuslerp_flatten": mode == "flatten", "nuslerp_row_wise": mode == "columns"}
    got = run("nuslerp", base if with_base else None, srcs[:2], [{"weight": v} for v in w], gp)
    close(got, ref + b)


def test_nuslerp_t_and_colinear_fallback():
    assert spherical.nuslerp_t([1.0, 3.0]) == 0.75
    assert spherical.nuslerp_t([1.0, -1.0]) == 0.5  # weights that cancel: the midpoint
    a = rand(50, seed=3)
    close(spherical.nuslerp(0.25, a, 3 * a), np64(a) * 1.5)  # colinear: (1 - t) a + t 3a
    x = np.array([1.0, 0.0])
    close(spherical.nuslerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])),
          ref_slerp(0.5, x, np.array([0.0, 2.0])))


# ---- multislerp ---------------------------------------------------------------------------------------

def ref_multislerp(ds, w, normalize, eps=1e-8):
    """mergekit's formulation, step by step: tangent space at the weighted mean, exponential map back."""
    w = np.array(w, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    flat = np.stack([d.ravel() for d in ds])
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangents = units - (units @ mean)[:, None] * mean
    tr = (tangents * w[:, None]).sum(0)
    tn = np.linalg.norm(tr) + eps
    res = mean * np.cos(tn) + tr * np.sin(tn) / tn
    return (res * (norms[:, 0] * w).sum()).reshape(ds[0].shape)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp(trio, with_base, normalize):
    base, srcs = trio
    w = [0.2, 0.5, 0.6]
    b = np64(base) if with_base else np.zeros(base.shape)
    ref = ref_multislerp([np64(s) - b for s in srcs], w, normalize) + b
    got = run("multislerp", base if with_base else None, srcs, [{"weight": v} for v in w],
              {"normalize_weights": normalize})
    close(got, ref)


def test_multislerp_of_two_is_slerp_of_the_directions(trio):
    _, srcs = trio
    x, y = np64(srcs[0]).ravel(), np64(srcs[1]).ravel()
    got = run("multislerp", None, srcs[:2], [{"weight": 0.5}, {"weight": 0.5}])
    mid = ref_slerp(0.5, x / np.linalg.norm(x), y / np.linalg.norm(y))
    close(got, (mid / np.linalg.norm(mid) * (np.linalg.norm(x) + np.linalg.norm(y)) / 2).reshape(srcs[0].shape))


def test_multislerp_degenerate_cases():
    a = rand(6, 5, seed=1)
    one = run("multislerp", None, [a], [{"weight": 0.7}])
    assert torch.equal(one, a)
    # opposite directions, equal weights: two models fall back to the weighted sum, three are an error
    close(run("multislerp", None, [a, -a], [{"weight": 1.0}, {"weight": 1.0}]), np.zeros((6, 5)))
    with pytest.raises(EvomergeError, match="cancel"):
        run("multislerp", None, [a, -a, a, -a], [{"weight": 1.0}] * 4)
    base = rand(6, 5, seed=2)
    close(run("multislerp", base, [base, base.clone(), base.clone()], [{"weight": 1.0}] * 3), np64(base))


# ---- karcher ------------------------------------------------------------------------------------------

def ref_karcher(xs, max_iter=10, tol=1e-5):
    flat = [x.ravel() for x in xs]
    norms = [np.linalg.norm(f) for f in flat]
    units = [f / n for f, n in zip(flat, norms, strict=True) if n > tol]
    a = 1.0 / len(units)
    m = sum(a * u for u in units)
    m = m / np.linalg.norm(m)
    for _ in range(max_iter):
        g = np.zeros_like(m)
        for u in units:
            c = np.clip(m @ u, -1, 1)
            phi = np.arccos(c)
            if phi >= tol:
                g += a * phi / np.sin(phi) * (u - c * m)
        gn = np.linalg.norm(g)
        if gn < tol:
            break
        m = np.cos(gn) * m + np.sin(gn) * g / gn
        m = m / np.linalg.norm(m)
    return (sum(norms) / len(xs) * m).reshape(xs[0].shape)


def test_karcher(trio):
    base, srcs = trio
    xs = [base, *srcs]
    close(run("karcher", None, xs), ref_karcher([np64(x) for x in xs]))
    close(run("karcher", None, xs, gp={"max_iter": 1}), ref_karcher([np64(x) for x in xs], max_iter=1))


def test_karcher_of_two_is_the_slerp_midpoint():
    a, b = rand(30, 7, seed=4), rand(30, 7, seed=5)
    x, y = np64(a).ravel(), np64(b).ravel()
    mid = ref_slerp(0.5, x / np.linalg.norm(x), y / np.linalg.norm(y))
    ref = mid / np.linalg.norm(mid) * (np.linalg.norm(x) + np.linalg.norm(y)) / 2
    close(run("karcher", None, [a, b], gp={"max_iter": 50}), ref.reshape(30, 7))


def test_karcher_zero_inputs():
    z = torch.zeros(4, 4)
    close(run("karcher", None, [z, z]), np.zeros((4, 4)))
    a = rand(4, 4, seed=1)
    close(run("karcher", None, [a, z]), np64(a) / 2)  # the zero model has no direction but counts in the norm
    assert torch.equal(run("karcher", None, [a]), a)


# ---- sce ----------------------------------------------------------------------------------------------

def ref_sce(base, srcs, topk):
    d = np.stack([np64(s) - np64(base) for s in srcs])
    if topk < 1:
        var = d.var(axis=0).ravel()
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size)
        keep[np.argsort(-var, kind="stable")[:k]] = 1
        d = d * keep.reshape(base.shape)
    w = (d ** 2).reshape(len(srcs), -1).mean(1)
    w = np.full(len(srcs), 1 / len(srcs)) if abs(w.sum()) < 1e-6 else w / w.sum()
    maj = np.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(d) == maj).astype(float)
    ew = w[:, None, None] * agree
    return np64(base) + (d * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce(trio, topk):
    base, srcs = trio
    srcs = [base + 10 * (s - base) for s in srcs]  # task vectors large enough that the weights matter
    close(run("sce", base, srcs, gp={"select_topk": topk}), ref_sce(base, srcs, topk))


def test_sce_small_task_vectors_weigh_equally(trio):
    base, srcs = trio
    srcs = [base + 0.01 * (s - base) for s in srcs]  # sum of mean squares < 1e-6: uniform weights
    close(run("sce", base, srcs, gp={"select_topk": 0.5}), ref_sce(base, srcs, 0.5))


def test_sce_by_hand():
    base = torch.zeros(3)
    a = torch.tensor([2.0, -1.0, 1.0])
    b = torch.tensor([-4.0, -1.0, 1.0])
    # weights by mean square: a 2, b 6 -> 0.25, 0.75. Entry 0: sum -2 < 0, only b (-4) agrees
    got = selective.sce(base, [a, b])
    close(got, [-4.0, -1.0, 1.0])


# ---- della_linear ---------------------------------------------------------------------------------------

def test_della_linear_is_della_without_sign_election(trio):
    base, srcs = trio
    tp = [{"weight": w, "density": 0.5, "epsilon": 0.1} for w in (0.5, 0.6, 0.7)]
    seeds = [21, 22, 23]
    from evomerge.merge.methods import sparsify as sp

    ref = np64(base)
    for s, p, seed in zip(srcs, tp, seeds, strict=True):
        ref = ref + p["weight"] * np64(sp.della(s - base, 0.5, 0.1, seed, rescale=True))
    got = run("della_linear", base, srcs, tp, seeds=seeds)
    close(got, ref)
    m = get_method("della_linear")
    assert m.random and not m.global_params[0].default  # normalize off by default, as mergekit
    with pytest.raises(EvomergeError, match="density - epsilon"):
        m.extra_check({"density": 0.1, "epsilon": 0.2}, "here")


# ---- nearswap -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.05, 0.2, 10.0])
def test_nearswap(trio, t):
    base, srcs = trio
    a, b = np64(base), np64(srcs[0])
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    close(run("nearswap", base, srcs[:1], gp={"t": t}), w * b + (1 - w) * a)


# ---- arcee_fusion -------------------------------------------------------------------------------------

def ref_arcee_fusion(base, other):
    a, b = np64(base), np64(other)
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(b2) + 1e-8, softmax(a2) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=1, keepdims=True)
    imp = (np.abs(b2 - a2) * kl).ravel()
    s = np.sort(imp)
    q1, q2, q3 = (s[int(math.floor(f * (s.size - 1)))] for f in (0.25, 0.5, 0.75))
    mask = (imp >= q2 + 1.5 * (q3 - q1)).reshape(a.shape)
    return a + (b - a) * mask, mask


@pytest.mark.parametrize("shape", [(40, 12), (300,), (5, 6, 7)])
def test_arcee_fusion(shape):
    base = rand(*shape, seed=1)
    other = base + 0.3 * rand(*shape, seed=2) * (torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.5)
    ref, mask = ref_arcee_fusion(base, other)
    assert 0 < mask.mean() < 0.5
    close(run("arcee_fusion", base, [other]), ref)


# ---- ram, ramplus_tl --------------------------------------------------------------------------------

def ref_ram(base, srcs, eps, r=None, alpha=0.2):
    d = np.stack([np64(s) - np64(base) for s in srcs]).reshape(len(srcs), -1)
    nz = np.abs(d) > eps
    c = nz.sum(0)
    lam = np.ones(len(srcs))
    if r is not None:
        for k in range(len(srcs)):
            shared = np.sum(nz[k] & (c > 1))
            unique = np.sum(nz[k] & (c == 1))
            lam[k] = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
    out = np.zeros(d.shape[1])
    for j in range(d.shape[1]):
        contrib = [k for k in range(len(srcs)) if nz[k, j]]
        if len(contrib) == 1:
            out[j] = lam[contrib[0]] * d[contrib[0], j]
        elif contrib:
            out[j] = np.mean([d[k, j] for k in contrib])
    return np64(base) + out.reshape(base.shape)


@pytest.fixture
def sparse_trio():
    """Fine-tunes that each change a random ~40% of the entries (as RAM expects)."""
    base = rand(20, 15, seed=1)
    srcs = []
    for s in (2, 3, 4):
        g = torch.Generator().manual_seed(100 + s)
        srcs.append(base + 0.1 * rand(20, 15, seed=s) * (torch.rand(20, 15, generator=g) < 0.4))
    return base, srcs


@pytest.mark.parametrize("eps", [1e-5, 0.05])
def test_ram(sparse_trio, eps):
    base, srcs = sparse_trio
    close(run("ram", base, srcs, gp={"epsilon": eps}), ref_ram(base, srcs, eps))


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.8, 5.0), (0.0, 1.0)])
def test_ramplus_tl(sparse_trio, r, alpha):
    base, srcs = sparse_trio
    got = run("ramplus_tl", base, srcs, gp={"r": r, "alpha": alpha, "epsilon": 1e-5})
    close(got, ref_ram(base, srcs, 1e-5, r, alpha))


def test_ramplus_model_with_no_unique_entries():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 2.0, 0.0])
    # a shares 2 entries and owns none: rho = 2 / epsilon, clamped to alpha; b owns entry 2: rho 2/1 -> alpha
    got = run("ramplus_tl", base, [a, b], gp={"r": 0.5, "alpha": 0.4})
    close(got, [1.0, 1.0, 2.0 * 1.2, 0.0])


# ---- parameters' validation -------------------------------------------------------------------------

def _recipe(method, models, base="base", parameters=None, model_params=None):
    from evomerge.merge.load import parse_recipe

    mp = model_params or {}
    return parse_recipe({"method": method, "base": base,
                         "models": {m: {"path": f"/{m}", **({"parameters": mp[m]} if m in mp else {})}
                                    for m in models},
                         "parameters": parameters or {}})


@pytest.mark.parametrize("method,models,base,params,mparams,match", [
    ("nuslerp", ["a", "b", "c"], None, {}, {m: {"weight": 1} for m in "abc"}, "exactly 2"),
    ("nuslerp", ["base", "a"], "base", {}, {"a": {"weight": 1}}, "exactly 2"),
    ("nuslerp", ["a", "b"], None, {"nuslerp_flatten": 1}, {m: {"weight": 1} for m in "ab"}, "true or false"),
    ("nuslerp", ["a", "b"], None, {}, {"a": {"weight": 1}}, "has no 'weight'"),
    ("multislerp", ["a", "b"], None, {"eps": -1}, {m: {"weight": 1} for m in "ab"}, "out of range"),
    ("karcher", ["a", "b"], None, {"max_iter": 2.5}, {}, "whole number"),
    ("karcher", ["a", "b"], None, {"max_iter": -1}, {}, "out of range"),
    ("karcher", ["a", "b"], None, {"weight": 0.5}, {}, "unknown parameter"),
    ("sce", ["a", "b"], None, {}, {}, "needs a base"),
    ("sce", ["base", "a", "b"], "base", {"select_topk": 1.5}, {}, "out of range"),
    ("sce", ["base", "a", "b"], "base", {}, {"a": {"weight": 1}}, "unknown parameter"),
    ("nearswap", ["base", "a"], "base", {}, {}, "'t' is required"),
    ("nearswap", ["base", "a"], "base", {"t": -0.1}, {}, "out of range"),
    ("nearswap", ["base", "a", "b"], "base", {"t": 0.1}, {}, "exactly 1"),
    ("arcee_fusion", ["base", "a", "b"], "base", {}, {}, "exactly 1"),
    ("arcee_fusion", ["base", "a"], "base", {"t": 1}, {}, "unknown parameter"),
    ("ram", ["base", "a"], "base", {"epsilon": -1e-3}, {}, "out of range"),
    ("ramplus_tl", ["base", "a"], "base", {"r": -1}, {}, "out of range"),
    ("ramplus_tl", ["base", "a"], "base", {"alpha": "x"}, {}, "must be a number"),
    ("della_linear", ["base", "a"], "base", {"epsilon": 0.7}, {"a": {"weight": 1}}, "out of range"),
])
def test_parameter_validation(method, models, base, params, mparams, match):
    with pytest.raises(EvomergeError, match=match):
        _recipe(method, models, base, params, mparams)


def test_optional_base():
    m = get_method("nuslerp")
    assert m.uses_base("base") and not m.uses_base(None)
    assert not get_method("karcher").uses_base("base")  # karcher ignores a base: it is one more input
    _recipe("nuslerp", ["base", "a", "b"], "base", {}, {"a": {"weight": 1}, "b": {"weight": 2}})
    _recipe("nuslerp", ["a", "b"], None, {}, {"a": {"weight": 1}, "b": {"weight": 2}})
    _recipe("multislerp", ["a"], None, {}, {"a": {"weight": 1}})
