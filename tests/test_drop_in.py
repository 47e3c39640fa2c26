"""Inputs at the edges of what torch's SDPA accepts, answered as torch answers them, and float64 done in float64.

Head dims of 0 (q/k: every score is 0, so the weights are uniform over the allowed keys; v: an empty output), every
empty size, and float64 inputs, whose outputs, gradients and lse must be float64-accurate (<= 1e-12 relative to
float64 math, large logits included) on the CPU backends.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import truth
import vitkern
from backends_under_test import INTERPRETING

pytestmark = pytest.mark.skipif(INTERPRETING, reason="CPU backends only (the interpreter run covers triton)")

CPU_BACKENDS = [None] + [b for b in ("cpu", "reference") if b in vitkern.available_backends()]


def _leaves(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def _run(fn, leaves, **kw):
    out = fn(*leaves, **kw)
    grads = [None] * len(leaves)
    if out.numel():
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return out, grads


def _same(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, torch gives {tuple(want.shape)}"
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True), \
        f"{what}: max difference {(got - want).abs().max().item():.3e} from torch's SDPA"


EDGE_SHAPES = list(itertools.product([0, 2], [0, 3], [0, 1, 5], [0, 1, 4], [0, 8], [0, 6]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("extra", ["plain", "causal", "bool mask", "float mask"])
def test_empty_sizes_and_zero_head_dims_match_torch(backend, extra):
    fails = []
    for b, h, nq, nk, d, dv in EDGE_SHAPES:
        leaves = _leaves([(b, h, nq, d), (b, h, nk, d), (b, h, nk, dv)], seed=nq * 7 + nk)
        kw = {"is_causal": extra == "causal"}
        gen = torch.Generator().manual_seed(1)
        if extra == "bool mask":
            kw["attn_mask"] = torch.rand(nq, nk, generator=gen) > 0.4
        elif extra == "float mask":
            kw["attn_mask"] = torch.randn(nq, nk, generator=gen, dtype=torch.float64)
        want, want_g = _run(F.scaled_dot_product_attention, leaves, **kw)
        got, got_g = _run(vitkern.scaled_dot_product_attention, leaves, backend=backend, **kw)
        try:
            _same(got, want, "output")
            for g, w, name in zip(got_g, want_g, "qkv"):
                # torch leaves the grad of an input the output does not depend on as None; vitkern may give zeros.
                g = torch.zeros_like(leaves["qkv".index(name)]) if g is None else g
                w = torch.zeros_like(leaves["qkv".index(name)]) if w is None else w
                _same(g, w, f"d{name}")
        except AssertionError as e:
            fails.append(f"B={b} H={h} Nq={nq} Nk={nk} D={d} Dv={dv}: {e}")
    assert not fails, f"{len(fails)} of {len(EDGE_SHAPES)} shapes differ from torch:\n" + "\n".join(fails[:8])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_zero_head_dims(backend):
    lens = [3, 0, 5]
    cu = vitkern.lengths_to_cu_seqlens(lens)
    for d, dv in [(0, 6), (8, 0), (0, 0)]:
        q, k, v = _leaves([(8, 2, d), (8, 2, d), (8, 2, dv)], seed=d + dv)
        out, lse = vitkern.varlen_attention(q, k, v, cu, return_lse=True, backend=backend)
        assert out.shape == (8, 2, dv)
        want = truth.varlen(q.detach(), k.detach(), v.detach(), cu, cu, scale=None if d else 1.0)
        assert torch.allclose(out, want, rtol=1e-12, atol=1e-12), f"D={d} Dv={dv}"
        # Every score is 0 when D = 0: lse = log(keys in the sequence).
        if d == 0:
            want_lse = torch.tensor([math.log(3)] * 3 + [math.log(5)] * 5, dtype=torch.float64)
            assert torch.allclose(lse, want_lse.expand(2, 8), rtol=1e-12), lse


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


FLOAT64_CASES = {
    "dense": dict(),
    "causal": dict(is_causal=True),
    "bool mask": dict(mask="bool"),
    "float mask": dict(mask="float"),
}


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b is not None])
@pytest.mark.parametrize("case", list(FLOAT64_CASES))
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_float64_is_float64_accurate(backend, case, logit_scale):
    """Outputs and gradients within 1e-12 of float64 math (relative to the largest value), at logits up to ~1e3."""
    n, d = 197, 64
    q, k, v = _leaves([(2, 3, n, d), (2, 3, n, d), (2, 3, n, d)], seed=5)
    with torch.no_grad():
        q.mul_(logit_scale)
    kw = dict(FLOAT64_CASES[case])
    gen = torch.Generator().manual_seed(2)
    if kw.pop("mask", None) == "bool":
        kw["attn_mask"] = torch.rand(n, n, generator=gen) > 0.3
    elif case == "float mask":
        kw["attn_mask"] = torch.randn(n, n, generator=gen, dtype=torch.float64)
    out = vitkern.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    exact = truth.attention(q, k, v, mask=kw.get("attn_mask"), is_causal=kw.get("is_causal", False))
    assert out.dtype == torch.float64
    assert _rel(out, exact) <= 1e-12, f"output: {_rel(out, exact):.2e}"
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(exact, (q, k, v), dout)
    for g, w, name in zip(got, want, "qkv"):
        assert _rel(g, w) <= 1e-12, f"d{name}: {_rel(g, w):.2e} relative to float64 math"


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b is not None])
def test_float64_lse_is_float64(backend):
    lens = [7, 197, 1]
    cu = vitkern.lengths_to_cu_seqlens(lens)
    q, k, v = _leaves([(205, 2, 32)] * 3, seed=9)
    with torch.no_grad():
        q.mul_(100.0)  # |lse| ~ 1e3: a float32 lse would be off by ~1e-4
    _, lse = vitkern.varlen_attention(q, k, v, cu, return_lse=True, backend=backend)
    assert lse.dtype == torch.float64
    want = torch.cat([truth.logsumexp(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1))
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=-1)
    assert (lse - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    assert vitkern.varlen_attention(q32, k32, v32, cu, return_lse=True, backend=backend)[1].dtype == torch.float32


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b is not None])
def test_gradcheck_at_large_logits(backend):
    q, k, v = _leaves([(1, 2, 9, 8), (1, 2, 11, 8), (1, 2, 11, 5)], seed=4)
    with torch.no_grad():
        q.mul_(40.0)
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    fn = lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)
