"""Hypothesis property tests: random shapes, masks and cu_seqlens, every backend profile, vs float64 truth."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import truth
import vitkern
from backends_under_test import PROFILES
from contract import check_against_truth, rand

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _cap(prof, n):
    return min(n, prof.big)


@st.composite
def packed_case(draw):
    lengths_q = draw(st.lists(st.integers(0, 70), min_size=1, max_size=6))
    cross = draw(st.booleans())
    lengths_k = [draw(st.integers(0, 70)) for _ in lengths_q] if cross else None
    hk = draw(st.sampled_from([1, 2]))
    h = hk * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([16, 32, 80]))
    causal = draw(st.booleans())
    return lengths_q, lengths_k, h, hk, d, causal, draw(st.integers(0, 2**16))


@st.composite
def dense_case(draw):
    nq, nk = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([16, 24, 64, 96]))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    mask_shape = draw(st.sampled_from(["full", "2d", "keys"]))
    return nq, nk, b, h, d, mask_kind, mask_shape, draw(st.booleans()), draw(st.integers(0, 2**16))


def test_varlen_random(prof):
    @SETTINGS
    @given(packed_case())
    def check(case):
        lengths_q, lengths_k, h, hk, d, causal, seed = case
        lengths_q = [_cap(prof, n) // (3 if prof.big < 100 else 1) for n in lengths_q]
        if lengths_k is not None:
            lengths_k = [_cap(prof, n) // (3 if prof.big < 100 else 1) for n in lengths_k]
        gen = torch.Generator().manual_seed(seed)
        cu_q = vitkern.lengths_to_cu_seqlens(lengths_q).to(prof.device)
        cu_k = cu_q if lengths_k is None else vitkern.lengths_to_cu_seqlens(lengths_k).to(prof.device)
        tq, tk = sum(lengths_q), sum(lengths_k or lengths_q)
        q = rand(tq, h, d, gen=gen, device=prof.device, requires_grad=True)
        k = rand(tk, hk, d, gen=gen, device=prof.device, requires_grad=True)
        v = rand(tk, hk, d, gen=gen, device=prof.device, requires_grad=True)
        fn = lambda q, k, v, upcast=True: vitkern.varlen_attention(q, k, v, cu_q, cu_k, is_causal=causal,
                                                                   backend=prof.backend)
        tr = lambda q, k, v, upcast=True: truth.varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), is_causal=causal,
                                                       upcast=upcast)
        check_against_truth(fn, (q, k, v), tr, f"varlen {case}")
    check()


def test_dense_random(prof):
    @SETTINGS
    @given(dense_case())
    def check(case):
        nq, nk, b, h, d, mask_kind, mask_shape, causal, seed = case
        nq, nk = _cap(prof, nq), _cap(prof, nk)
        gen = torch.Generator().manual_seed(seed)
        q = rand(b, h, nq, d, gen=gen, device=prof.device, requires_grad=True)
        k = rand(b, h, nk, d, gen=gen, device=prof.device, requires_grad=True)
        v = rand(b, h, nk, d, gen=gen, device=prof.device, requires_grad=True)
        shape = {"full": (b, h, nq, nk), "2d": (nq, nk), "keys": (b, 1, 1, nk)}[mask_shape]
        mask = None
        if mask_kind == "bool":
            mask = (torch.rand(shape, generator=gen) > 0.4).to(prof.device)
        elif mask_kind == "float":
            mask = torch.randn(shape, generator=gen).to(prof.device)
        fn = lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(q, k, v, mask, is_causal=causal,
                                                                               backend=prof.backend)
        tr = lambda q, k, v, upcast=True: truth.attention(q, k, v, mask, is_causal=causal, upcast=upcast)
        check_against_truth(fn, (q, k, v), tr, f"dense {case}")
    check()
