"""The packed (varlen) contract against every backend profile, vs a per-sequence float64 loop."""
from __future__ import annotations

import pytest
import torch

import truth
import vitkern
from contract import assert_close_to_truth, check_against_truth, rand


def packed(lengths, h, d, dv=None, hk=None, device="cpu", grad=True, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    hk = h if hk is None else hk
    return (rand(t, h, d, gen=gen, device=device, requires_grad=grad, dtype=dtype),
            rand(t, hk, d, gen=gen, device=device, requires_grad=grad, dtype=dtype),
            rand(t, hk, dv or d, gen=gen, device=device, requires_grad=grad, dtype=dtype))


def _lengths(prof, big):
    return big if prof.big > 100 else [min(n, prof.big) for n in big[:4]]


def run_varlen(prof, lengths_q, lengths_k=None, h=2, hk=None, d=16, dv=None, is_causal=False, dtype=torch.float32,
               seed=0):
    cu_q = vitkern.lengths_to_cu_seqlens(lengths_q).to(prof.device)
    cu_k = cu_q if lengths_k is None else vitkern.lengths_to_cu_seqlens(lengths_k).to(prof.device)
    gen = torch.Generator().manual_seed(seed)
    q = rand(sum(lengths_q), h, d, gen=gen, device=prof.device, requires_grad=True, dtype=dtype)
    tk = sum(lengths_q if lengths_k is None else lengths_k)
    k = rand(tk, hk or h, d, gen=gen, device=prof.device, requires_grad=True, dtype=dtype)
    v = rand(tk, hk or h, dv or d, gen=gen, device=prof.device, requires_grad=True, dtype=dtype)
    fn = lambda q, k, v, upcast=True: vitkern.varlen_attention(
        q, k, v, cu_q, None if lengths_k is None else cu_k, is_causal=is_causal, backend=prof.backend)
    tr = lambda q, k, v, upcast=True: truth.varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), is_causal=is_causal,
                                                   upcast=upcast)
    check_against_truth(fn, (q, k, v), tr, f"varlen {lengths_q}/{lengths_k}")


def test_lengths_with_zero_and_one(prof):
    run_varlen(prof, _lengths(prof, [0, 1, 7, 0, 197, 1, 64]))


def test_single_sequence_equals_dense(prof):
    n = min(197, prof.big)
    run_varlen(prof, [n], d=64 if prof.big > 100 else 16)


def test_tile_straddling_lengths(prof):
    run_varlen(prof, _lengths(prof, [63, 64, 65, 127, 129, 1]), seed=3)


def test_cross_lengths_differ(prof):
    lq = _lengths(prof, [5, 0, 40, 33, 1])
    lk = _lengths(prof, [9, 3, 0, 70, 1])
    run_varlen(prof, lq, lk, seed=4)


def test_causal_per_sequence(prof):
    run_varlen(prof, _lengths(prof, [17, 1, 0, 90, 33]), is_causal=True, seed=5)
    run_varlen(prof, _lengths(prof, [10, 4, 30]), _lengths(prof, [4, 10, 31]), is_causal=True, seed=6)


def test_gqa_and_value_dim(prof):
    run_varlen(prof, _lengths(prof, [30, 2, 45]), h=4, hk=2, d=16, dv=32, seed=7)


@pytest.mark.parametrize("dtype_index", [1, 2])
def test_low_precision(prof, dtype_index):
    if dtype_index >= len(prof.dtypes):
        pytest.skip("profile has fewer dtypes")
    run_varlen(prof, _lengths(prof, [50, 1, 120]), dtype=prof.dtypes[dtype_index], seed=8)


def test_head_dims_80_96(prof):
    for d in (80, 96):
        if d in prof.head_dims or prof.backend != "triton":
            run_varlen(prof, _lengths(prof, [20, 37]), d=d, seed=d)


def test_return_lse_and_empty_sequence_rows(prof):
    lengths_q, lengths_k = [3, 4, 5], [6, 0, 2]
    cu_q = vitkern.lengths_to_cu_seqlens(lengths_q).to(prof.device)
    cu_k = vitkern.lengths_to_cu_seqlens(lengths_k).to(prof.device)
    q, _, _ = packed(lengths_q, 2, 16, device=prof.device, grad=False, seed=9)
    _, k, v = packed(lengths_k, 2, 16, device=prof.device, grad=False, seed=10)
    out, lse = vitkern.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, backend=prof.backend)
    assert out.shape == (12, 2, 16) and lse.shape == (2, 12) and lse.dtype == torch.float32
    assert (out[3:7] == 0).all(), "queries of a sequence with no keys must give 0"
    assert torch.isinf(lse[:, 3:7]).all() and (lse[:, 3:7] < 0).all()
    for s, (a, b, c, d) in enumerate([(0, 3, 0, 6), (7, 12, 6, 8)]):
        ex = truth.logsumexp(q[a:b].transpose(0, 1).cpu(), k[c:d].transpose(0, 1).cpu())
        assert (lse[:, a:b].cpu().double() - ex).abs().max() < 1e-5


def test_output_is_contiguous_packed(prof):
    q, k, v = packed([5, 6], 2, 16, device=prof.device, grad=False)
    out = vitkern.varlen_attention(q, k, v, vitkern.lengths_to_cu_seqlens([5, 6]).to(prof.device),
                                   backend=prof.backend)
    assert out.is_contiguous() and out.shape == (11, 2, 16)


def test_dropout_matches_reference(prof):
    lengths = _lengths(prof, [20, 0, 33])
    cu = vitkern.lengths_to_cu_seqlens(lengths).to(prof.device)
    outs = []
    for be in ("reference", prof.backend):
        q, k, v = packed(lengths, 2, 16, device=prof.device, seed=11)
        torch.manual_seed(77)
        o = vitkern.varlen_attention(q, k, v, cu, dropout_p=0.25, backend=be)
        o.backward(torch.ones_like(o))
        outs.append((o.detach(), q.grad, k.grad, v.grad))
    for a, b, name in zip(outs[1], outs[0], ("out", "dq", "dk", "dv")):
        assert_close_to_truth(a, b.double(), None, f"varlen dropout {name} vs reference")


def test_int64_cu_seqlens_and_max_seqlen_hints(prof):
    lengths = _lengths(prof, [12, 30, 1])
    cu = vitkern.lengths_to_cu_seqlens(lengths, dtype=torch.int64).to(prof.device)
    q, k, v = packed(lengths, 2, 16, device=prof.device, grad=False, seed=12)
    a = vitkern.varlen_attention(q, k, v, cu, backend=prof.backend)
    b = vitkern.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), backend=prof.backend)
    assert torch.equal(a, b)
    ex = truth.varlen(q, k, v, cu.cpu(), cu.cpu())
    assert_close_to_truth(a, ex.to(a.device), truth.varlen(q, k, v, cu.cpu(), cu.cpu(), upcast=False).to(a.device),
                          "int64 cu_seqlens")
