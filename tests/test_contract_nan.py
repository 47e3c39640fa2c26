"""NaN propagates exactly as far as it is read; a fully masked row still gives 0 (every backend profile).

The contract (api.md): a pair (i, j) takes part when the bool mask, causal and varlen blocks allow it and a float
mask entry is not -inf. A NaN score of a taking-part pair (NaN in q_i, k_j or the float mask entry) makes output
row i and lse_i NaN; a NaN in v_j reaches the rows with p_ij > 0. Rows that read nothing NaN -- other rows, other
heads, other packed sequences -- are unchanged, and so are their gradients. A row with no pair taking part is 0
with zero gradients even if its query is NaN. Each test compares the untouched part with float64 math on the same
inputs with the NaN replaced by 0 (what those rows read does not contain it).
"""
from __future__ import annotations

import math

import pytest
import torch

import truth
import vitkern
from contract import assert_close_to_truth, qkv

NAN = float("nan")


def _sizes(prof):
    # One ragged size and one that is a multiple of every backend's tiles, within what the profile runs.
    return [n for n in (7, 32, 64, 197) if n <= prof.big] or [prof.sizes[-1]]


def _head_dim(prof):
    return 64 if prof.big > 100 else 16


def _truth_pair(fn, args, dtype):
    """(float64 result, same math in ``dtype``) of fn on detached copies of args, with grads enabled."""
    ex = [a.detach().double().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    lo = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    return (ex, fn(*ex)), (lo, fn(*lo, upcast=False))


def _check_clean(got, exact, naive, sel, what):
    """got[sel] is finite and as close to float64 math as the contract allows."""
    g = got[sel]
    assert torch.isfinite(g).all(), f"{what}: a row that reads no NaN has non-finite values"
    assert_close_to_truth(g, exact[sel], None if naive is None else naive[sel], what)


def _check_nan(got, sel, what):
    assert torch.isnan(got[sel]).all(), f"{what}: expected NaN where the NaN is read, got {got[sel].flatten()[:4]}"


def _grads(out, leaves, seed=3):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return dout, torch.autograd.grad(out, leaves, dout.to(out.device))


def _truth_grads(res, dout, n_leaves=3):
    args, out = res
    return torch.autograd.grad(out, args[:n_leaves], dout.to(out.dtype))


@pytest.mark.parametrize("n_index", range(4))
def test_nan_in_a_query_row(prof, n_index):
    sizes = _sizes(prof)
    if n_index >= len(sizes):
        pytest.skip("profile has fewer sizes")
    n = sizes[n_index]
    i = n // 2
    q, k, v = qkv(2, 2, n, n, _head_dim(prof), device=prof.device, grad=True, seed=n)
    (ex_args, exact), (lo_args, naive) = _truth_pair(truth.attention, (q, k, v), q.dtype)
    q_nan = q.detach().clone()
    q_nan[1, 0, i, 0] = NAN
    q_nan.requires_grad_()
    out = vitkern.scaled_dot_product_attention(q_nan, k, v, backend=prof.backend)
    rows = torch.ones(n, dtype=torch.bool)
    rows[i] = False
    _check_nan(out, (1, 0, i), "output row of the NaN query")
    _check_clean(out, exact, naive, (1, 0, rows), "other rows of that head")
    _check_clean(out, exact, naive, (0,), "other batch")
    dout, (dq, dk, dv) = _grads(out, (q_nan, k, v))
    ex_g = _truth_grads((ex_args, exact), dout.double())
    lo_g = _truth_grads((lo_args, naive), dout)
    _check_nan(dq, (1, 0, i), "dq of the NaN query")
    _check_clean(dq, ex_g[0], lo_g[0], (1, 0, rows), "dq of the other rows")
    for g, e, lo, name in zip((dk, dv), ex_g[1:], lo_g[1:], ("dk", "dv")):
        _check_nan(g, (1, 0), f"{name} of the keys the NaN query read")
        _check_clean(g, e, lo, (0,), f"{name} of the other batch")
        _check_clean(g, e, lo, (1, 1), f"{name} of the other head")


@pytest.mark.parametrize("where", ["key", "value"])
def test_nan_in_a_key_row_causal(prof, where):
    n = _sizes(prof)[-1]
    j = n // 3
    q, k, v = qkv(1, 2, n, n, _head_dim(prof), device=prof.device, grad=True, seed=7)
    (ex_args, exact), (lo_args, naive) = _truth_pair(
        lambda q, k, v, upcast=True: truth.attention(q, k, v, is_causal=True, upcast=upcast), (q, k, v), q.dtype)
    x = (k if where == "key" else v).detach().clone()
    x[0, 0, j, -1] = NAN
    x.requires_grad_()
    kk, vv = (x, v) if where == "key" else (k, x)
    out = vitkern.scaled_dot_product_attention(q, kk, vv, is_causal=True, backend=prof.backend)
    # Query i reads keys j' <= i: the rows before the NaN key never read it.
    # A NaN key element spoils whole scores; a NaN value element only its own output column.
    _check_nan(out, (0, 0, slice(j, None)) + ((slice(None),) if where == "key" else (-1,)),
               f"rows that read the NaN {where}")
    if where == "key":  # a value's NaN may reach the p = 0 rows of a computed tile (0 * NaN), as in torch's math
        _check_clean(out, exact, naive, (0, 0, slice(0, j)), "rows before it (causal)")
    _check_clean(out, exact, naive, (0, 1), "the other head")
    dout, grads = _grads(out, (q, kk, vv))
    ex_g = _truth_grads((ex_args, exact), dout.double())
    lo_g = _truth_grads((lo_args, naive), dout)
    for g, e, lo, name in zip(grads, ex_g, lo_g, ("dq", "dk", "dv")):
        _check_clean(g, e, lo, (0, 1), f"{name} of the other head")
    # (dq of the rows before it is not checked: dQ = dS·K reads the NaN key with a zero weight inside its tile.)
    _check_nan(grads[0], (0, 0, slice(j, None)), "dq of the rows that read it")


def test_nan_in_a_float_mask_entry(prof):
    n = _sizes(prof)[-1]
    i, j = n - 1, n // 2
    q, k, v = qkv(2, 2, n, n, _head_dim(prof), device=prof.device, grad=True, seed=11)
    bias = torch.randn(n, n, generator=torch.Generator().manual_seed(5)).to(device=prof.device, dtype=q.dtype)
    (ex_args, exact), (lo_args, naive) = _truth_pair(
        lambda q, k, v, m, upcast=True: truth.attention(q, k, v, mask=m, upcast=upcast), (q, k, v, bias), q.dtype)
    bad = bias.clone()
    bad[i, j] = NAN
    out = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=bad, backend=prof.backend)
    rows = torch.arange(n) != i
    _check_nan(out, (slice(None), slice(None), i), "the row whose mask entry is NaN")
    _check_clean(out, exact, naive, (slice(None), slice(None), rows), "the other rows")
    dout, grads = _grads(out, (q, k, v))
    ex_g = _truth_grads((ex_args, exact), dout.double())
    lo_g = _truth_grads((lo_args, naive), dout)
    _check_nan(grads[0], (slice(None), slice(None), i), "dq of that row")
    _check_clean(grads[0], ex_g[0], lo_g[0], (slice(None), slice(None), rows), "dq of the other rows")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_nan_query_gives_zero(prof, kind):
    """A masked pair is never read: a NaN query whose row is fully masked still gives 0 and zero gradients."""
    n = _sizes(prof)[-1]
    i = n // 2
    q, k, v = qkv(1, 2, n, n, _head_dim(prof), device=prof.device, seed=13)
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[:, 0] = True
    keep[i] = False
    mask = keep if kind == "bool" else torch.zeros(n, n).masked_fill(~keep, -math.inf).to(q.dtype)
    mask = mask.to(prof.device)
    (ex_args, exact), (lo_args, naive) = _truth_pair(
        lambda q, k, v, m, upcast=True: truth.attention(q, k, v, mask=m, upcast=upcast), (q, k, v, mask), q.dtype)
    q_nan = q.clone()
    q_nan[0, :, i] = NAN
    leaves = [x.requires_grad_() for x in (q_nan, k.clone(), v.clone())]
    out = vitkern.scaled_dot_product_attention(*leaves, attn_mask=mask, backend=prof.backend)
    assert (out[0, :, i] == 0).all(), f"fully masked NaN row: expected 0, got {out[0, :, i].flatten()[:4]}"
    _check_clean(out, exact, naive, (0, slice(None), torch.arange(n) != i), "the other rows")
    dout, grads = _grads(out, leaves)
    ex_g = _truth_grads((ex_args, exact), dout.double())
    lo_g = _truth_grads((lo_args, naive), dout)
    assert (grads[0][0, :, i] == 0).all(), "fully masked NaN row: expected a zero dq"
    _check_clean(grads[0], ex_g[0], lo_g[0], (0, slice(None), torch.arange(n) != i), "dq of the other rows")
    # dk/dv are not checked: dK = dSᵀQ reads the NaN query row with a zero weight inside its tile (0 * NaN), as
    # torch's math path does; what the contract promises is that the row's own output and dq are 0.


def test_nan_stays_in_its_packed_sequence(prof):
    """Packed: a NaN query row in sequence 1 and a NaN value in sequence 2; sequence 0 never reads either."""
    lens = [5, 9, 6] if prof.big < 100 else [64, 70, 63]
    cu = vitkern.lengths_to_cu_seqlens(lens).to(prof.device)
    t, h, d = sum(lens), 2, _head_dim(prof)
    gen = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(device=prof.device, dtype=prof.dtypes[0]) for _ in range(3))
    (ex_args, exact), (lo_args, naive) = _truth_pair(
        lambda q, k, v, upcast=True: truth.varlen(q, k, v, cu, cu, upcast=upcast), (q, k, v), q.dtype)
    a, b = lens[0], lens[0] + lens[1]
    qn, vn = q.clone(), v.clone()
    qn[a + 2, 1, 0] = NAN
    vn[b + 1, 0, -1] = NAN
    leaves = [x.requires_grad_() for x in (qn, k.clone(), vn)]
    out = vitkern.varlen_attention(*leaves, cu, backend=prof.backend)
    _check_clean(out, exact, naive, slice(0, a), "sequence 0")
    rows1 = torch.arange(a, b) != a + 2
    _check_clean(out[a:b], exact[a:b], naive[a:b], (rows1,), "sequence 1, other rows")
    _check_nan(out, (a + 2, 1), "sequence 1, the NaN query's row")
    _check_clean(out[a:b], exact[a:b], naive[a:b], (slice(None), 0), "sequence 1, the other head")
    _check_nan(out, (slice(b, None), 0, -1), "sequence 2, rows that read the NaN value")
    dout, grads = _grads(out, leaves)
    ex_g = _truth_grads((ex_args, exact), dout.double())
    lo_g = _truth_grads((lo_args, naive), dout)
    for g, e, lo, name in zip(grads, ex_g, lo_g, ("dq", "dk", "dv")):
        _check_clean(g, e, lo, slice(0, a), f"{name} of sequence 0")
    _check_nan(grads[0], (a + 2, 1), "dq of the NaN query")
