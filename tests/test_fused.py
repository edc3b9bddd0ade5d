"""The fused CPU kernels of the task-arithmetic family agree bit for bit with the torch form, and DARE's
counter-based draws are the same numbers on every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.merge.methods import fused
from evomerge.merge.methods import task_arithmetic as ta

pytestmark = pytest.mark.skipif(not fused.enabled(), reason="numba is not importable here")

CASES = [  # sparsification, consensus, normalize, rescale
    ("magnitude", "sum", True, False), ("magnitude", None, True, True), ("random", "sum", False, True),
    ("random", None, True, False), ("outliers", None, False, False), ("outliers", "sum", False, True),
    ("della", "sum", True, True), ("della", None, False, True), (None, "sum", True, False), (None, None, False, False),
]


def _both(monkeypatch, base, srcs, spars, cons, norm, resc, densities, *, weights=(0.5, 0.7, -0.3), lam=0.9,
          out_dtype=None, gamma=0.05):
    got = []
    for flag in ("1", "0"):
        monkeypatch.setenv("EVOMERGE_FUSED", flag)
        out = None if out_dtype is None else torch.empty(base.shape, dtype=out_dtype)
        got.append(ta.generalized(base, srcs, list(weights), list(densities), sparsification=spars, consensus=cons,
                                  normalize=norm, rescale=resc, lambda_=lam, gammas=[gamma] * 3,
                                  epsilons=[0.1] * 3, seeds=[5, 6, 2**40 + 7], out=out))
    return got


@pytest.mark.parametrize("spars,cons,norm,resc", CASES)
def test_fused_equals_torch_form_bit_for_bit(monkeypatch, spars, cons, norm, resc):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(301, 257, generator=g)
    srcs = [base + 0.1 * torch.randn(301, 257, generator=g) for _ in range(3)]
    a, b = _both(monkeypatch, base, srcs, spars, cons, norm, resc, (0.4, 0.6, 0.5))
    assert torch.equal(a, b)
    assert not torch.equal(a, base)


@pytest.mark.parametrize("spars", ["magnitude", "outliers"])
@pytest.mark.parametrize("cons", ["sum", None])
def test_fused_takes_threshold_ties_in_stream_order(monkeypatch, spars, cons):
    """Quantised weights tie at the magnitude threshold: exactly the first ties in element order are kept, as the
    torch form keeps them (each tile of the kernel continues the count)."""
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(600, 513, generator=g) * 4).round() / 4
    srcs = [base + (torch.randn(600, 513, generator=g) * 2).round() / 8 for _ in range(3)]
    a, b = _both(monkeypatch, base, srcs, spars, cons, True, False, (0.3, 0.5, 0.77), weights=(0.5, 0.7, 0.3))
    assert torch.equal(a, b)
    kept = ((srcs[0] - base) != 0).sum().item()
    assert kept > 0.3 * base.numel()  # the threshold (one of few distinct magnitudes) cuts through many ties


@pytest.mark.parametrize("spars", ["magnitude", "random", "outliers", "della"])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_fused_bfloat16_sources_block_by_block(monkeypatch, spars, out_dtype):
    """Other dtypes go block by block through float32 buffers; DARE's draws follow each block's offset."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(700, 513, generator=g).bfloat16()  # several row blocks
    srcs = [(base.float() + 0.05 * torch.randn(700, 513, generator=g)).bfloat16() for _ in range(3)]
    a, b = _both(monkeypatch, base, srcs, spars, "sum", True, True, (0.3, 0.5, 0.77), out_dtype=out_dtype,
                 lam=1.3)
    assert a.dtype == (out_dtype or torch.float32)
    assert torch.equal(a, b)


def test_non_contiguous_tensors_take_the_torch_form(monkeypatch):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 96, generator=g).t()
    srcs = [base + 0.1 * torch.randn(96, 64, generator=g) for _ in range(3)]
    assert not fused.usable(base)
    a, b = _both(monkeypatch, base, srcs, "magnitude", "sum", True, False, (0.4, 0.6, 0.5))
    assert torch.equal(a, b)


def test_switch_off(monkeypatch):
    monkeypatch.setenv("EVOMERGE_FUSED", "0")
    assert not fused.enabled() and not fused.usable(torch.zeros(3))
    monkeypatch.setenv("EVOMERGE_FUSED", "1")
    assert fused.enabled() and fused.usable(torch.zeros(3))


@pytest.mark.parametrize("offset", [0, 12345, 2**32 - 100, 3 * 2**32 + 5])
def test_dare_draws_are_the_same_numbers_on_every_path(offset):
    seed = 987654321987
    t = fused.keep_uniforms(offset, 1000, seed)
    assert torch.equal(t, fused.uniforms_np(offset, 1000, seed))
    # any block of a tensor can be drawn on its own
    assert torch.equal(t[300:700], fused.keep_uniforms(offset + 300, 400, seed))
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1


def test_dare_draws_look_uniform_and_independent():
    n = 1 << 20
    u = fused.keep_uniforms(0, n, 1).double()
    assert abs(u.mean().item() - 0.5) < 0.002
    assert abs(u.var().item() - 1 / 12) < 0.001
    hist = torch.histc(u, bins=32, min=0, max=1)
    assert (hist - n / 32).abs().max().item() < 5 * (n / 32) ** 0.5
    for other in (2, 3, 1 + 2**32):  # seeds differing in one bit, or only in the high word
        v = fused.keep_uniforms(0, n, other).double()
        assert abs(np.corrcoef(u.numpy(), v.numpy())[0, 1]) < 0.01
        assert abs(((u < 0.3) & (v < 0.3)).double().mean().item() - 0.09) < 0.003
    lag = np.corrcoef(u[:-1].numpy(), u[1:].numpy())[0, 1]  # neighbouring elements
    assert abs(lag) < 0.01


def test_fused_l1_of_the_random_mask_matches_the_torch_sum():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1000, 300, generator=g)
    src = base + torch.randn(1000, 300, generator=g)
    before, after = fused.l1_random(base, src, 0, 77, 0.3)
    d = (src - base).abs().double()
    keep = fused.keep_uniforms(0, d.numel(), 77).view(d.shape) < 0.3
    assert before == pytest.approx(d.sum().item(), rel=1e-9)
    assert after == pytest.approx((d * keep).sum().item(), rel=1e-9)


def test_a_kernel_that_fails_here_falls_back_to_the_torch_form(monkeypatch):
    """A numba failure on some machine (a typing or compilation error) must not fail the merge: the kernels are
    switched off with one warning and the torch form gives the same result."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 96, generator=g)
    srcs = [base + 0.1 * torch.randn(64, 96, generator=g) for _ in range(3)]
    want = _both(monkeypatch, base, srcs, "della", "sum", True, True, (0.4, 0.6, 0.5))[1]

    def broken(*args):
        raise TypeError("no matching definition")

    monkeypatch.setattr(fused, "_kernels", {"combine": broken, "l1_random": broken, "uniforms": broken,
                                            "della_mask": broken})
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setenv("EVOMERGE_FUSED", "1")
    with pytest.warns(RuntimeWarning, match="fused merge kernel 'della_mask' failed"):
        got = ta.generalized(base, srcs, [0.5, 0.7, -0.3], [0.4, 0.6, 0.5], sparsification="della",
                             consensus="sum", normalize=True, rescale=True, lambda_=0.9, gammas=[0.05] * 3,
                             epsilons=[0.1] * 3, seeds=[5, 6, 2**40 + 7])
    assert torch.equal(got, want)
    assert not fused.enabled()  # switched off for the rest of the process
