"""Tests of the ``triton`` backend's kernels (vitkern/triton_kernels/), against float64 math.

Without a GPU they run in Triton's interpreter at tiny sizes (32x16 tiles forward, 16x32 backward there, so
lengths 15/16/17/31/33 cross tile edges):      TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py
With a GPU the same tests run compiled, and the ``gpu`` section adds real sizes and bfloat16:
                  pytest tests/test_triton_kernels.py
The module is skipped unless TRITON_INTERPRET=1 or CUDA is available (the interpreter must be chosen before
the kernels are defined, hence before vitkern is imported).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import truth
from error_model import FLOOR, recompute_bounds, tolerance

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRETING and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import vitkern  # noqa: E402
from vitkern import dropout as vk_dropout  # noqa: E402
from vitkern.backends import get as get_backend  # noqa: E402
from vitkern.ops import attention_fwd  # noqa: E402
from vitkern.triton_kernels import config, varlen_map  # noqa: E402
from vitkern.triton_kernels.attention_bwd import backward_launches  # noqa: E402
from vitkern.triton_kernels.attention_fwd import dropout_args, forward_launches  # noqa: E402
from vitkern.triton_kernels.mask_summary import (TILE_EMPTY, TILE_FULL, TILE_PARTIAL, col_lists, row_lists,  # noqa: E402
                                                 tile_summary)
from vitkern.triton_kernels.tile_ops import dropout_keep  # noqa: E402

DEV = "cpu" if INTERPRETING else "cuda"
DTYPES = (torch.float32, torch.float16) if INTERPRETING else (torch.float32, torch.float16, torch.bfloat16)
# Floor of the allowed error relative to the largest compared value; the main term is the error of the same
# math done naively in the input dtype (flash-attn's rule).


# ----------------------------------------------------------------------------------------------- helpers
def rand(*shape, dtype=torch.float32, gen=None, grad=True):
    x = torch.randn(*shape, generator=gen).to(DEV, dtype)
    return x.requires_grad_(grad)


def qkv(b, hq, nq, nk, d, dv=None, hk=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (rand(b, hq, nq, d, dtype=dtype, gen=g), rand(b, hk or hq, nk, d, dtype=dtype, gen=g),
            rand(b, hk or hq, nk, dv or d, dtype=dtype, gen=g))


def math_attention(q, k, v, mask=None, causal=False, scale=None, keep=None, p=0.0, allowed=None):
    """tests/truth.py's attention in q's dtype, with ``allowed`` (an extra bool mask) folded into ``mask``:
    q [B, Hq, Nq, D], k/v [B, Hk, Nk, *]; ``keep`` a dropout keep-mask. Rows with no key give 0."""
    if allowed is not None:
        if mask is None or mask.dtype == torch.bool:
            mask = allowed if mask is None else mask & allowed
        else:
            mask = mask.masked_fill(~allowed, -math.inf)
    return truth.attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=True, keep=keep,
                           dropout_p=p, upcast=False)


def grads_of(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout, allow_unused=False)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(got, exact, naive, what, recompute=0.0):
    """The contract's tolerance (tests/error_model.py)."""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    base = max_err(naive, exact)
    tol = tolerance(exact, base, got.dtype, recompute)
    err = max_err(got, exact)
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (naive {got.dtype}: {base:.3e})"


def check(fn, truth, tensors, what, grads=True, seed=1, recompute_scale=None):
    """fn(*tensors) is the kernel, truth(*tensors) the math; tensors with requires_grad are differentiated.
    Compared: the kernel vs float64 truth, the tolerance sized by the same math in the input dtype (and, given
    the softmax scale of a test with large scores, error_model's recompute term)."""
    leaves = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*tensors)
    exact_in = [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                and t.is_floating_point() else t for t in tensors]
    naive_in = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                and t.is_floating_point() else t for t in tensors]
    exact, naive = truth(*exact_in), truth(*naive_in)
    assert_close(out, exact, naive, f"{what} out")
    if not grads:
        return out
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEV, out.dtype)
    got = grads_of(out, leaves, dout)
    ex = grads_of(exact, [t for t in exact_in if isinstance(t, torch.Tensor) and t.requires_grad], dout.double())
    nv = grads_of(naive, [t for t in naive_in if isinstance(t, torch.Tensor) and t.requires_grad], dout)
    bounds = [0.0] * len(got)
    if recompute_scale is not None:
        bounds[:3] = recompute_bounds(truth, tensors, dout, recompute_scale)
    for i, (a, b, c) in enumerate(zip(got, ex, nv)):
        assert_close(a, b, c, f"{what} grad[{i}]", recompute=bounds[i])
    return out


def sdpa(**kw):
    return lambda q, k, v, *rest: vitkern.scaled_dot_product_attention(q, k, v, *rest, backend="triton", **kw)


# ------------------------------------------------------------------------------------------ dense shapes
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("b,h,nq,nk,d,dv,causal", [
    (1, 1, 1, 1, 16, 16, False),
    (2, 2, 7, 7, 32, 32, True),
    (1, 2, 33, 17, 80, 80, False),
    (1, 1, 17, 33, 96, 48, True),
    (1, 1, 19, 21, 72, 40, False),   # head dims split into two chunks that are not full (64 + 16, 32 + 16)
    (2, 1, 16, 32, 8, 8, False),     # tile multiples (EVEN_M / EVEN_N), head dim 8 padded to 16
    (1, 1, 15, 15, 3, 5, True),      # head dims below 16, D != Dv
])
def test_dense(dtype, b, h, nq, nk, d, dv, causal):
    q, k, v = qkv(b, h, nq, nk, d, dv, dtype=dtype)
    check(sdpa(is_causal=causal), lambda q, k, v: math_attention(q, k, v, causal=causal), (q, k, v),
          f"dense {dtype} {b}x{h}x{nq}x{nk} d{d}/{dv} causal={causal}")


@pytest.mark.parametrize("d", [128, 160, 256])
def test_large_head_dims(d):
    q, k, v = qkv(1, 1, 17, 20, d)
    check(sdpa(), math_attention, (q, k, v), f"d={d}")


def test_gqa():
    q, k, v = qkv(2, 4, 19, 23, 32, hk=2, dtype=torch.float16)
    check(lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True,
                                                                backend="triton"),
          lambda q, k, v: math_attention(q, k, v, causal=True), (q, k, v), "gqa")


def test_strided_packed_qkv():
    # q/k/v as views into one [B, N, 3, H, D] projection (what a ViT block makes): never copied by the kernel.
    x = rand(2, 19, 3, 2, 32, grad=False)
    q, k, v = (x[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    assert not q.is_contiguous()
    check(sdpa(), math_attention, (q, k, v), "strided")


def test_large_logits_and_scale():
    # Scores of 1e4 + O(1): a naive exp overflows; the softmax is far from one-hot, so gradients do not cancel
    # to exact zeros and the fp32 rounding of scores this large (ulp ~1e-3) sizes the tolerance.
    q, k, v = qkv(1, 2, 21, 18, 16)
    with torch.no_grad():
        q[..., 0] = 100.0
        k[..., 0] = 100.0
    out = check(sdpa(scale=1.0), lambda q, k, v: math_attention(q, k, v, scale=1.0), (q, k, v), "large logits",
                recompute_scale=1.0)
    _, lse = attention_fwd(q, k, v, None, None, None, None, -1, -1, 1.0, False, 0.0, "triton")
    exact = torch.logsumexp(q.double() @ k.double().transpose(-1, -2), -1)
    assert exact.min() > 9000 and max_err(lse, exact) <= 4 * 2**-24 * exact.abs().max().item()


def test_lse_and_output_layout():
    q, k, v = qkv(2, 3, 20, 9, 16, 24)
    out, lse = attention_fwd(q, k, v, None, None, None, None, -1, -1, 0.25, False, 0.0, "triton")
    assert out.stride() == (20 * 3 * 24, 24, 3 * 24, 1)     # empty_bhnd: [B, N, H, Dv] storage
    exact = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 0.25, -1)
    assert lse.dtype == torch.float32 and max_err(lse, exact) < 1e-5


# ------------------------------------------------------------------------------------------------ masks
def _segment_mask(seg):
    return seg[:, None] == seg[None, :]


MASKS = {
    "bool_full": lambda b, h, nq, nk, g: torch.rand(b, h, nq, nk, generator=g) > 0.3,
    "float_shared": lambda b, h, nq, nk, g: torch.randn(nq, nk, generator=g),            # broadcast over B, H
    "key_padding": lambda b, h, nq, nk, g: (torch.arange(nk) < torch.tensor([nk - 5, 3])[:b, None])[:, None, None],
    "block_diag": lambda b, h, nq, nk, g: _segment_mask(torch.tensor([0] * 5 + [1] * 17 + [2] * 11 + [3] * 4))
    [:nq, :nk],
    "float_per_head": lambda b, h, nq, nk, g: torch.randn(1, h, 1, nk, generator=g) * 3,
}


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("kind", list(MASKS))
def test_masks(kind, dtype):
    b, h, nq, nk = 2, 2, 37, 37
    g = torch.Generator().manual_seed(3)
    mask = MASKS[kind](b, h, nq, nk, g).to(DEV)
    if mask.is_floating_point():
        mask = mask.to(dtype)
    q, k, v = qkv(b, h, nq, nk, 16, dtype=dtype)
    check(sdpa(), lambda q, k, v, m: math_attention(q, k, v, mask=m), (q, k, v, mask), f"mask {kind}")


def test_mask_with_causal_and_empty_rows():
    b, h, n = 1, 2, 35
    mask = torch.rand(b, h, n, n, generator=torch.Generator().manual_seed(4)) > 0.5
    mask[:, :, 3] = False           # a fully masked row
    mask[:, 1, 20:, :] = False      # fully masked tiles
    mask = mask.to(DEV)
    q, k, v = qkv(b, h, n, n, 16)
    out = check(sdpa(is_causal=True), lambda q, k, v, m: math_attention(q, k, v, mask=m, causal=True),
                (q, k, v, mask), "mask+causal")
    assert (out[:, :, 3] == 0).all() and (out[:, 1, 20:] == 0).all()


def test_float_mask_gradient():
    b, h, nq, nk = 1, 2, 19, 21
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(b, h, nq, nk, generator=g).to(DEV)
    bias[0, 0, :, 7:] = -math.inf   # -inf entries: a zero gradient there
    bias.requires_grad_()
    q, k, v = qkv(b, h, nq, nk, 16)
    check(sdpa(), lambda q, k, v, m: math_attention(q, k, v, mask=m), (q, k, v, bias), "dmask")


def test_fully_masked_everything():
    q, k, v = qkv(1, 1, 18, 18, 16)
    mask = torch.zeros(18, 18, dtype=torch.bool, device=DEV)
    mask[5, 2] = True
    out, lse = attention_fwd(q, k, v, mask.expand(1, 1, 18, 18), None, None, None, -1, -1, 0.25, False, 0.0,
                             "triton")
    assert (out[0, 0, :5] == 0).all() and (out[0, 0, 6:] == 0).all()
    assert torch.isinf(lse[0, 0, :5]).all() and (lse[0, 0, :5] < 0).all() and torch.isfinite(lse[0, 0, 5])
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq[0, 0, :5] == 0).all() and (dq[0, 0, 6:] == 0).all()
    assert torch.isfinite(dk).all() and (dk[0, 0, 3:] == 0).all() and torch.equal(dv[0, 0, 2], v.new_ones(16))


# ---------------------------------------------------------------------------------------- packed bool masks
def _bits_of(words: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The bool matrix packed_bits' words hold (bit c % 32 of word c // 32), first n_cols columns."""
    shifts = torch.arange(32, dtype=torch.int64)
    bits = ((words.to(torch.int64)[..., None] >> shifts) & 1).flatten(-2)
    return bits[..., :n_cols] != 0, bits[..., n_cols:]


@pytest.mark.parametrize("shape,expand", [((2, 3, 37, 41), None), ((1, 1, 5, 300), (2, 3, 5, 300)),
                                          ((2, 1, 1, 129), (2, 4, 70, 129)), ((1, 1, 33, 1), (1, 2, 33, 31))])
def test_packed_bits_match_the_mask(shape, expand):
    from vitkern.triton_kernels.mask_bits import packed_bits
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(shape, generator=g) > 0.4
    mask.view(-1)[::7] = True
    mask = mask.to(DEV)
    if expand:
        mask = mask.expand(expand)
    for transposed in (False, True):
        want = mask.transpose(-1, -2) if transposed else mask
        words = packed_bits(mask, transposed)
        assert words.dtype == torch.int32 and words.shape[:3] == want.shape[:3] and words.shape[3] % 4 == 0
        bits, pad = _bits_of(words.cpu(), want.shape[3])
        assert torch.equal(bits, want.cpu()), transposed
        assert not pad.any(), "columns past the end must read as masked out"
        # Broadcast dims stay views (the packing reads the distinct slice once).
        for i in range(3):
            if want.stride(i) == 0 and want.shape[i] > 1:
                assert words.stride(i) == 0, (transposed, i)


# Tiles wider than the interpreter's own 32x16 / 16x32, so that a packed mask's row spans several words
# (fwd, dK/dV, dQ as LaunchConfig(block_m, block_n, ...); dK/dV's query step block_m is its word span).
WIDE_TILES = [((32, 128), (64, 32), (32, 64)), ((16, 64), (32, 16), (16, 32))]


@pytest.mark.parametrize("tiles", WIDE_TILES, ids=str)
@pytest.mark.parametrize("kind", ["random", "key_padding", "query_rows", "causal"])
def test_bool_mask_on_wide_tiles(monkeypatch, tiles, kind):
    from vitkern.triton_kernels import autotune
    fwd, kv, dq = (config.LaunchConfig(*t, 1, 1) for t in tiles)
    monkeypatch.setattr(autotune, "_decided", {})
    monkeypatch.setattr(config, "static_config",
                        lambda kernel, *a, **k: {"fwd": fwd, "bwd_dkdv": kv, "bwd_dq": dq}[kernel])
    b, h, nq, nk = 2, 2, 70, 150
    g = torch.Generator().manual_seed(13)
    causal = kind == "causal"
    if kind == "key_padding":      # [B, 1, 1, Nk]: packed once per batch, rows broadcast
        mask = (torch.arange(nk) < torch.tensor([[101], [150]])).view(b, 1, 1, nk).expand(b, h, nq, nk)
    elif kind == "query_rows":     # [1, 1, Nq, 1]: broadcast along keys, the dK/dV packing reads it in full
        mask = (torch.rand(nq, generator=g) > 0.3).view(1, 1, nq, 1).expand(b, h, nq, nk)
    else:
        mask = torch.rand(b, h, nq, nk, generator=g) > 0.5
        mask[0, 1, 5] = False      # a fully masked row
        mask[1, 0, :, 40:] = False  # fully masked tiles
    mask = mask.to(DEV)
    q, k, v = qkv(b, h, nq, nk, 16, dtype=torch.float16)
    out = check(sdpa(is_causal=causal), lambda q, k, v, m: math_attention(q, k, v, mask=m, causal=causal),
                (q, k, v, mask), f"bool mask {kind} on {tiles}")
    rows = mask[..., :].any(-1) if not causal else (mask & torch.ones(nq, nk, dtype=torch.bool, device=DEV)
                                                   .tril()).any(-1)
    assert (out[~rows] == 0).all()


# ---------------------------------------------------------------------------------------- mask summary
def test_mask_summary_matches_brute_force():
    g = torch.Generator().manual_seed(6)
    mask = torch.randn(3, 37, 41, generator=g)
    mask[0] = 0.0                                 # all full tiles
    mask[1, :, :20] = -math.inf                   # empty tiles, and partial ones at the edge
    mask[2] = torch.where(mask[2] > 1.0, 0.0, -math.inf)
    m4 = mask.view(1, 3, 37, 41).expand(2, 3, 37, 41)    # broadcast batch
    s = tile_summary(m4, 16, 16)
    assert s.state.shape == (2, 3, 3, 3) and s.state.stride(0) == 0
    for h in range(3):
        for i in range(3):
            for j in range(3):
                t = mask[h, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
                want = (TILE_EMPTY if torch.isinf(t).all() else TILE_FULL if (t == 0).all() else TILE_PARTIAL)
                assert s.state[1, h, i, j] == want, (h, i, j)


def _listed(order, ends, *idx):
    o, e = order[idx].tolist(), ends[idx].tolist()
    return o[:e[0]], o[e[0]:e[1]], o[e[1]:e[2]]


@pytest.mark.parametrize("causal", [False, True])
def test_tile_lists_match_brute_force(causal):
    # Per resident tile: full tiles without checks, full with checks, partial; empty and (causal) wholly
    # masked tiles not listed. Checks are needed on the ragged last tile and, causal, across the diagonal.
    g = torch.Generator().manual_seed(7)
    bm, bn, nq, nk = 16, 8, 37, 43
    mask = torch.where(torch.rand(2, nq, nk, generator=g) > 0.3, 0.0, -math.inf)
    mask[0, :, :] = 0.0
    mask[1, :, 10:30] = -math.inf
    mask[1, 20:, :] = 0.0
    s = tile_summary(mask.view(1, 2, nq, nk), bm, bn)
    mt, nt = -(-nq // bm), -(-nk // bn)
    order, ends = row_lists(s, bm, bn, nk, causal)
    for h in range(2):
        for i in range(mt):
            n_end = min(nk, i * bm + bm) if causal else nk
            t_mid = min(nt if nk % bn == 0 else nk // bn, (i * bm + 1) // bn if causal else nt)
            want = ([], [], [])
            for j in range(nt):
                st = s.state[0, h, i, j].item()
                if st == TILE_EMPTY or j * bn >= n_end:
                    continue
                want[0 if st == TILE_FULL and j < t_mid else 1 if st == TILE_FULL else 2].append(j)
            assert _listed(order, ends, 0, h, i) == want, (h, i)
    order, ends = col_lists(s, bm, bn, nq, causal)
    for h in range(2):
        for j in range(nt):
            first = j * bn // bm if causal else 0
            t_full = -(-(j * bn + bn - 1) // bm) if causal else 0
            want = ([], [], [])
            for i in range(mt):
                st = s.state[0, h, i, j].item()
                if st == TILE_EMPTY or i < first:
                    continue
                edge = i < t_full or (nq % bm != 0 and i >= nq // bm)
                want[0 if st == TILE_FULL and not edge else 1 if st == TILE_FULL else 2].append(i)
            assert _listed(order, ends, 0, h, j) == want, (h, j)


def test_block_diagonal_summary_visits_only_the_diagonal():
    # NaViT: 8 images of 64 tokens packed into 512; with 16x16 tiles, exactly the 8 * 4 * 4 diagonal tiles
    # take part, so the masked kernel does the work of the varlen one.
    seg = torch.arange(512) // 64
    s = tile_summary(_segment_mask(seg).view(1, 1, 512, 512), 16, 16)
    assert (s.state != TILE_EMPTY).sum().item() == 8 * 16
    for lists in (row_lists(s, 16, 16, 512, False), col_lists(s, 16, 16, 512, False)):
        ends = lists[1]
        assert (ends[..., 0] == 4).all() and (ends[..., 2] == 4).all()   # 4 full tiles each, nothing else


def test_varlen_block_map_covers_each_block_once():
    lens = torch.tensor([0, 1, 15, 16, 17, 0, 40, 3])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    for hint in (-1, 40):
        seq, start, g = varlen_map.block_map(cu, int(cu[-1]), 16, hint)
        got = sorted((int(s), int(b)) for s, b in zip(seq, start) if b != varlen_map.EMPTY_BLOCK_START)
        want = sorted((s, b) for s in range(len(lens)) for b in range(0, int(lens[s]), 16))
        assert got == want and g >= len(want)
    assert varlen_map.grid_blocks(92, 8, 16, 40) == min(6 + 8, 8 * 3)


# ----------------------------------------------------------------------------------------------- varlen
def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEV)


def _varlen_truth(cu_q, cu_k, causal):
    seg_q, pos_q = _seg_pos(cu_q)
    seg_k, pos_k = _seg_pos(cu_k)
    allowed = seg_q[:, None] == seg_k[None, :]
    if causal:
        allowed = allowed & (pos_k[None, :] <= pos_q[:, None])

    def f(q, k, v):   # [T, H, D] -> [T, H, Dv]
        o = math_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           allowed=allowed)
        return o[0].transpose(0, 1)
    return f


def _seg_pos(cu):
    t = int(cu[-1])
    pos = torch.arange(t, device=cu.device)
    seg = torch.searchsorted(cu[1:].long(), pos, right=True)
    return seg, pos - cu.long()[seg]


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(dtype, causal):
    lq, lk = [0, 1, 15, 17, 16, 0, 5, 31], [3, 1, 17, 15, 16, 2, 0, 33]    # zero lengths, block +-1, Nq != Nk
    cu_q, cu_k = _cu(lq), _cu(lk)
    g = torch.Generator().manual_seed(7)
    q = rand(sum(lq), 4, 32, dtype=dtype, gen=g)
    k = rand(sum(lk), 2, 32, dtype=dtype, gen=g)      # GQA
    v = rand(sum(lk), 2, 24, dtype=dtype, gen=g)
    check(lambda q, k, v: vitkern.varlen_attention(q, k, v, cu_q, cu_k, is_causal=causal, backend="triton"),
          _varlen_truth(cu_q, cu_k, causal), (q, k, v), f"varlen causal={causal}")


def test_varlen_hints_and_lse():
    lens = [16, 33, 1]
    cu = _cu(lens).long()
    q, k, v = (rand(50, 2, 16, gen=torch.Generator().manual_seed(i), grad=False) for i in range(3))
    o1, lse1 = vitkern.varlen_attention(q, k, v, cu, return_lse=True, backend="triton")
    o2, lse2 = vitkern.varlen_attention(q, k, v, cu, max_seqlen_q=33, max_seqlen_k=33, return_lse=True,
                                        backend="triton")
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)
    exact = torch.cat([torch.logsumexp(q[a:b].double().transpose(0, 1) @ k[a:b].double().permute(1, 2, 0) / 4, -1)
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert lse1.shape == (2, 50) and max_err(lse1, exact) < 1e-5


# ---------------------------------------------------------------------------------------------- dropout
@triton.jit
def _keep_kernel(Out, seed, bh, row0, col0, thr, BM: tl.constexpr, BN: tl.constexpr):
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    keep = dropout_keep(seed, bh, rows, cols, thr)
    tl.store(Out + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], keep.to(tl.int8))


def test_dropout_hash_is_bit_exact():
    for seed, p, bh, row0, col0 in [(0, 0.1, 0, 0, 0), (2**31 - 2, 0.5, 7, 1000, 50000), (2**32 - 1, 0.9, 3, 5, 9)]:
        s, thr, _ = dropout_args(torch.tensor([seed]), p)
        out = torch.empty(16, 32, dtype=torch.int8, device=DEV)
        _keep_kernel[(1,)](out, s, bh, row0, col0, thr, BM=16, BN=32)
        want = vk_dropout.keep_mask(seed, torch.tensor(bh), torch.arange(row0, row0 + 16)[:, None],
                                    torch.arange(col0, col0 + 32)[None, :], p)
        assert torch.equal(out.cpu().bool(), want), (seed, p)


def _run_op(q, k, v, mask, cu, seed, p, causal, backend):
    return attention_fwd(q, k, v, mask, cu, cu, seed, -1, -1, 1 / math.sqrt(q.shape[-1]), causal, p, backend)[0]


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_backward(causal):
    b, h, nq, nk, p = 2, 2, 19, 35, 0.3
    seed = torch.tensor([12345])
    q, k, v = qkv(b, h, nq, nk, 16)
    keep = vk_dropout.keep_mask(12345, torch.arange(b * h).view(b, h, 1, 1), torch.arange(nq).view(-1, 1),
                                torch.arange(nk).view(1, -1), p).to(DEV)
    check(lambda q, k, v: _run_op(q, k, v, None, None, seed, p, causal, "triton"),
          lambda q, k, v: math_attention(q, k, v, causal=causal, keep=keep, p=p), (q, k, v), "dropout")
    # Same seed, same mask as the reference backend (which implements the spec in torch ops).
    with torch.no_grad():
        a = _run_op(q, k, v, None, None, seed, p, causal, "triton")
        r = _run_op(q, k, v, None, None, seed, p, causal, "reference")
    assert max_err(a, r) < 1e-5


def test_dropout_varlen_uses_packed_token_indices():
    cu = _cu([5, 17, 0, 10]).long()
    seed, p = torch.tensor([99]), 0.25
    q, k, v = (rand(1, 2, 32, 16, gen=torch.Generator().manual_seed(i)) for i in range(3))
    keep = vk_dropout.keep_mask(99, torch.arange(2).view(1, 2, 1, 1), torch.arange(32).view(-1, 1),
                                torch.arange(32).view(1, -1), p).to(DEV)
    seg, _ = _seg_pos(cu)
    allowed = seg[:, None] == seg[None, :]
    check(lambda q, k, v: _run_op(q, k, v, None, cu, seed, p, False, "triton"),
          lambda q, k, v: math_attention(q, k, v, allowed=allowed, keep=keep, p=p), (q, k, v), "varlen dropout")


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("d,dv", [(32, 24), (48, 40)])
def test_everything_at_once(dtype, d, dv):
    # GQA + a broadcast float mask that needs a gradient (-inf holes, fully masked rows) + causal + dropout,
    # Nq != Nk, D != Dv, sizes off the tile grid; 48 / 40 run in two column chunks (config.head_split).
    b, hq, hk, nq, nk, p = 2, 4, 2, 23, 37, 0.2
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(1, hq, nq, nk, generator=g)
    bias[0, 1, :, 3:30] = -math.inf
    bias[0, 2, 5] = -math.inf
    bias = bias.to(DEV, dtype).requires_grad_()
    q, k, v = qkv(b, hq, nq, nk, d, dv, hk=hk, dtype=dtype, seed=4)
    seed = torch.tensor([777])
    keep = vk_dropout.keep_mask(777, torch.arange(b * hq).view(b, hq, 1, 1), torch.arange(nq).view(-1, 1),
                                torch.arange(nk).view(1, -1), p).to(DEV)

    def run(q, k, v, m):
        return attention_fwd(q, k, v, m.expand(b, hq, nq, nk), None, None, seed, -1, -1, 0.3, True, p,
                             "triton")[0]
    out = check(run, lambda q, k, v, m: math_attention(q, k, v, mask=m, causal=True, scale=0.3, keep=keep, p=p),
                (q, k, v, bias), "everything")
    assert (out[:, 2, 5] == 0).all()


def test_split_dkdv_matches(monkeypatch):
    # config.split_dkdv: dV and dK from two launches of the dK/dV kernel (16-bit head dim 256 on a GPU).
    # Forced here on the hardest case (GQA, float-mask gradient, causal, dropout, two column chunks), then at
    # 16-bit head dim 256, where the table itself splits.
    assert config.split_dkdv(256, 256, torch.float16) and not config.split_dkdv(256, 256, torch.float32)
    assert not config.split_dkdv(128, 128, torch.float16)
    monkeypatch.setattr(config, "split_dkdv", lambda d, dv, dtype: True)
    test_everything_at_once(torch.float16, 48, 40)
    monkeypatch.undo()
    q, k, v = qkv(1, 2, 17, 20, 256, dtype=torch.float16)
    check(sdpa(is_causal=True), lambda q, k, v: math_attention(q, k, v, causal=True), (q, k, v), "fp16 d=256")


def test_fp32_precision_setting(monkeypatch):
    assert config.input_precision(torch.float32) == "ieee" and config.input_precision(torch.float16) is None
    monkeypatch.setenv("VITKERN_TRITON_FP32_PRECISION", "tf32x3")
    assert config.input_precision(torch.float32) == "tf32x3"
    monkeypatch.setenv("VITKERN_TRITON_FP32_PRECISION", "fast")
    with pytest.raises(ValueError, match="VITKERN_TRITON_FP32_PRECISION"):
        config.input_precision(torch.float32)


# ------------------------------------------------------------------------------------- TMA descriptors
def _forward_uses_tma(q, k, v, mask=None, p=0.0, arch=90):
    """USE_TMA of the forward launch these inputs would get on a GPU of compute capability ``arch``."""
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=q.device)
    seed = torch.tensor([1]) if p else None
    (_, _, _, kwargs), = forward_launches(q, k, v, mask, None, None, -1, -1, seed, 0.25, False, p, out, lse,
                                          arch=arch)
    return kwargs["USE_TMA"]


def _backward_uses_tma(q, k, v, arch=90):
    """USE_TMA of the dQ and dK/dV launches (set) these inputs would get on a GPU of compute capability ``arch``."""
    out, lse = torch.empty_like(q), torch.zeros(q.shape[:3], device=q.device)
    launches = backward_launches(out, q, k, v, out, lse, None, None, None, -1, -1, None, 0.25, False, 0.0, False,
                                 torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(0),
                                 arch=arch)
    return {kw["USE_TMA"] for _, _, _, kw in launches if "USE_TMA" in kw}


def test_tma_is_chosen_for_the_light_forward_on_hopper_only(monkeypatch):
    # Host-side decision only (no kernel runs): sm_90, 16-bit, aligned strides, no mask or dropout.
    q, k, v = (t.detach() for t in qkv(2, 2, 33, 17, 64, dtype=torch.float16))
    assert _forward_uses_tma(q, k, v)
    assert not _forward_uses_tma(q, k, v, arch=80)                              # A100: pointer tiles
    assert not _forward_uses_tma(q.float(), k.float(), v.float())              # fp32 runs on FMA units
    assert not _forward_uses_tma(q, k, v, mask=torch.ones(1, 1, 33, 17, dtype=torch.bool, device=DEV))
    assert not _forward_uses_tma(q, k, v, p=0.1)
    odd = torch.randn(2, 2, 33, 9, dtype=torch.float16, device=DEV)[..., 1:]   # rows of 18 bytes, unaligned
    assert not _forward_uses_tma(q[..., :8], odd, odd)
    assert _backward_uses_tma(q, k, v) == {False}         # the backward only when asked for
    monkeypatch.setenv("VITKERN_TRITON_TMA", "1")
    assert _backward_uses_tma(q, k, v) == {True} and _backward_uses_tma(q, k, v, arch=80) == {False}
    monkeypatch.setenv("VITKERN_TRITON_TMA", "0")
    assert not _forward_uses_tma(q, k, v)
    monkeypatch.setenv("VITKERN_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="VITKERN_TRITON_TMA"):
        _forward_uses_tma(q, k, v)


def test_tma_descriptor_layout():
    # A size-1 dim's stride is never used, but the hardware checks it: replaced by an aligned one.
    x = torch.randn(1, 3, 5, 24, dtype=torch.float16, device=DEV)
    packed = torch.randn(1, 7, 3, 8, dtype=torch.float16, device=DEV).transpose(1, 2)   # [1, H, T, D] view
    assert config.tma_layout_ok(x) and config.tma_layout_ok(packed)
    d = config.tma_descriptor(torch.randn(1, 1, 5, 24, dtype=torch.float16, device=DEV)[:, :, :, :], 16, 32)
    assert d.block_shape == [1, 1, 16, 32] and all(s * 2 % 16 == 0 for s in d.strides[:-1])
    assert config.tma_layout_ok(x[..., :7])             # fewer columns: the box edge is zero-filled
    assert not config.tma_layout_ok(x.float()) and not config.tma_layout_ok(x[..., 1:])   # base 2 B off
    assert not config.tma_layout_ok(x.transpose(2, 3)) and not config.tma_layout_ok(x[:, :, :0])
    # Built from fields validated once per layout (Triton's checks cost ~3 us a descriptor): the same object
    # Triton's own constructor makes, for this tensor.
    from triton.tools.tensor_descriptor import TensorDescriptor
    y = torch.randn(2, 9, 3, 40, dtype=torch.bfloat16, device=DEV).transpose(1, 2)
    assert vars(config.tma_descriptor(y, 32, 64)) == vars(TensorDescriptor(y, list(y.shape), list(y.stride()),
                                                                           [1, 1, 32, 64]))


needs_tma = pytest.mark.skipif(
    not INTERPRETING and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
    reason="TMA needs sm_90 or the interpreter")
TMA_CASES = [  # (b, hq, hk, nq, nk, d, dv, causal): tile edges, head-dim chunks (80 = 64 + 16), GQA, D != Dv
    (1, 2, 2, 33, 17, 32, 32, False), (2, 1, 1, 17, 40, 80, 80, True), (1, 4, 2, 19, 23, 96, 48, True),
    (1, 1, 1, 1, 1, 16, 16, False), (2, 2, 2, 32, 48, 8, 8, False), (1, 2, 2, 20, 33, 128, 128, True),
    (1, 1, 1, 17, 20, 256, 256, False)]


@needs_tma
@pytest.mark.parametrize("b,hq,hk,nq,nk,d,dv,causal", TMA_CASES)
def test_tma_matches_float64_and_the_pointer_path(monkeypatch, b, hq, hk, nq, nk, d, dv, causal):
    # Forward (Q / K / V tiles by TMA), dQ (K / V) and dK/dV (Q / dO), against float64; in the interpreter also
    # bit for bit against the pointer path (the same values loaded, the same math in the same order).
    q, k, v = qkv(b, hq, nq, nk, d, dv, hk=hk, dtype=torch.float16)
    monkeypatch.setenv("VITKERN_TRITON_TMA", "1")
    assert _forward_uses_tma(q.detach(), k.detach(), v.detach(), arch=None)
    f = lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True,  # noqa: E731
                                                            backend="triton")
    out = check(f, lambda q, k, v: math_attention(q, k, v, causal=causal), (q, k, v), "tma")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEV, out.dtype)
    got = grads_of(f(q, k, v), (q, k, v), dout)
    monkeypatch.setenv("VITKERN_TRITON_TMA", "0")
    plain = f(q, k, v)
    if INTERPRETING:
        assert torch.equal(out, plain)
        assert all(torch.equal(a, b) for a, b in zip(got, grads_of(plain, (q, k, v), dout)))


@needs_tma
def test_tma_varlen_keeps_each_sequence_to_itself(monkeypatch):
    # A TMA tile past a packed sequence's end holds the next sequence's rows (only the tensor's own edge is
    # zero-filled). Keys there are masked in the scores; values are zeroed, or a NaN in the next sequence's V
    # would reach this one through a zero weight.
    monkeypatch.setenv("VITKERN_TRITON_TMA", "1")
    lens = [20, 13, 31, 1]
    cu = _cu(lens)
    g = torch.Generator().manual_seed(11)
    q, k, v = (rand(sum(lens), 2, 64, dtype=torch.float16, gen=g, grad=False) for _ in range(3))
    v[20:33] = float("nan")
    k[33:64, 1] = float("inf")
    q[20:33, 0] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = vitkern.varlen_attention(q, k, v, cu, backend="triton")
    assert torch.isnan(out[20:33]).all() and torch.isnan(out[33:64, 1]).all()
    # The backward reads Q / dO tiles (dK/dV) and K / V tiles (dQ) past each sequence's end as well.
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g_ in (dq, dk, dv):
        assert torch.isfinite(g_[:20]).all() and torch.isfinite(g_[64:]).all()
    out = out.detach()
    q, k, v = (t.detach() for t in (q, k, v))
    # float64 truth per sequence (a dense block-diagonal reference would itself spread the NaNs through 0 * NaN)
    seqs = [(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    exact = torch.cat([math_attention(*(t[a:b].double().transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
                       for a, b in seqs])
    for a, b in (seqs[0], seqs[3]):
        assert_close(out[a:b], exact[a:b], exact[a:b].to(out.dtype), f"tma varlen tokens {a}:{b}")
    assert_close(out[33:64, 0], exact[33:64, 0], exact[33:64, 0].to(out.dtype), "tma varlen head 0")


BIAS_CASES = [  # (bias shape before expanding, expanded, nq, nk): rows not 16-byte aligned (copied, padded to 8
    # entries) and aligned (read in place), broadcast batch / head, a key tile past the end
    ((2, 2, 37, 21), None, 37, 21), ((1, 2, 19, 40), (2, 2, 19, 40), 19, 40), ((1, 1, 33, 17), (2, 3, 33, 17), 33, 17)]


@needs_tma
@pytest.mark.parametrize("shape,expand,nq,nk", BIAS_CASES)
@pytest.mark.parametrize("tiles", [None, WIDE_TILES[0]], ids=str)
def test_float_mask_tiles_through_tma(monkeypatch, shape, expand, nq, nk, tiles):
    # A float mask (relative position bias) read as TMA tiles in the forward, dQ and the key-major dK/dV
    # (transposed in shared memory), against float64 and, in the interpreter, bit for bit against its pointer
    # path. -inf entries take pairs out (a NaN key there must not reach the output), a fully -inf row gives 0.
    from vitkern.triton_kernels.mask_operand import mask_operand
    if tiles is not None:
        from vitkern.triton_kernels import autotune
        fwd, kv, dq = (config.LaunchConfig(*t, 1, 1) for t in tiles)
        monkeypatch.setattr(autotune, "_decided", {})
        monkeypatch.setattr(config, "static_config",
                            lambda kernel, *a, **k: {"fwd": fwd, "bwd_dkdv": kv, "bwd_dq": dq}[kernel])
    g = torch.Generator().manual_seed(14)
    bias = torch.randn(shape, generator=g) * 2
    bias[..., 3, :] = -math.inf                       # a row with no key
    bias[..., :, 5] = -math.inf                       # a key no query sees
    bias = bias.to(DEV, torch.float16)
    if expand:
        bias = bias.expand(expand)
    b, h = bias.shape[:2]
    q, k, v = qkv(b, h, nq, nk, 32, dtype=torch.float16)
    bias.requires_grad_(expand is None)
    leaves = (q, k, v, bias) if expand is None else (q, k, v)
    monkeypatch.setenv("VITKERN_TRITON_TMA", "1")
    for transposed in (False, True):
        assert mask_operand(bias.detach(), bias, transposed, 32, 16, arch=None).tma
    f = sdpa()
    with torch.no_grad():
        k_nan = k.detach().clone()
        k_nan[:, :, 5] = float("nan")
        isolated = f(q.detach(), k_nan, v.detach(), bias.detach())
    out = check(f, lambda q, k, v, m: math_attention(q, k, v, mask=m), (q, k, v, bias), "tma bias")
    assert (out[:, :, 3] == 0).all() and torch.equal(isolated, out.detach())
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV, out.dtype)
    got = grads_of(f(q, k, v, bias), leaves, dout)
    monkeypatch.setenv("VITKERN_TRITON_TMA", "0")
    assert not mask_operand(bias.detach(), bias, False, 32, 16, arch=None).tma
    plain = f(q, k, v, bias)
    if INTERPRETING:
        assert torch.equal(out, plain)
        assert all(torch.equal(a, b) for a, b in zip(got, grads_of(plain, leaves, dout)))


def test_float_mask_full_tiles_on_raw_scores():
    # A float mask's all-zero tiles run on raw scores (one FFMA and one EX2 a score, no scale multiply) and its
    # partial tiles after them on scaled scores; the row max changes units in between (attention_fwd, BIAS_SCALED).
    # Rows here meet full tiles (keys 0-31, 64-69 past the last 16-key tile boundary), then partial ones (a bias
    # on keys 32-47, -inf on a few keys of 48-63), with scores such that either side holds a row's max. Raw dots
    # of ~500 under a scale of 0.01: a row max left in raw units would put every scaled score's weight at 0.
    # 16-bit (fp32 tiles keep one unit throughout).
    q, k, v = qkv(2, 2, 40, 70, 32, dtype=torch.float16)
    with torch.no_grad():
        q.mul_(30)
    g = torch.Generator().manual_seed(21)
    bias = torch.zeros(2, 2, 40, 70)
    bias[..., 32:48] = torch.randn(2, 2, 40, 16, generator=g) * 4
    bias[:, :, ::3, 50:53] = -math.inf
    bias = bias.to(DEV, torch.float16).requires_grad_()
    check(sdpa(scale=0.01), lambda q, k, v, m: math_attention(q, k, v, mask=m, scale=0.01), (q, k, v, bias),
          "raw then scaled", recompute_scale=0.01)


@pytest.mark.parametrize("shape", [(1, 2, 9, 13), (1, 1, 1, 13)], ids=["own-rows", "key-padding"])
def test_mask_gradient_comes_back_contiguous(monkeypatch, shape):
    # The Triton backend pads dMask's rows to 16 bytes for its TMA tile stores (base.dmask_buffer); the caller
    # still gets a plain tensor of the mask's shape, as from torch's SDPA (its values:
    # test_float_mask_tiles_through_tma; in the interpreter, bit for bit those of the pointer store into an
    # unpadded buffer). A key-padding row [B, 1, 1, N] is read by pointers (TMA would read one row) while its
    # gradient still goes out as TMA tiles.
    q, k, v = qkv(1, 2, 9, 13, 16, dtype=torch.float16)
    bias = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2).to(DEV, torch.float16)
    bias.requires_grad_()
    dout = torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(4)).to(DEV, torch.float16)
    grads = []
    for tma in ("1", "0"):
        monkeypatch.setenv("VITKERN_TRITON_TMA", tma)
        got, = torch.autograd.grad(sdpa()(q, k, v, bias), bias, dout)
        assert got.is_contiguous() and got.shape == bias.shape, tma
        grads.append(got)
    if INTERPRETING:
        assert torch.equal(*grads)


# ---------------------------------------------------------------------------------------- input checks
def test_unsupported_inputs_say_why(monkeypatch):
    be = get_backend("triton")
    q = torch.zeros(1, 1, 4, 16, device=DEV)
    assert be.unsupported_reason(q, q, q, None, None, 0.0) is None
    assert "head dims up to 256" in be.unsupported_reason(*(torch.zeros(1, 1, 4, 300, device=DEV),) * 3,
                                                          None, None, 0.0)
    assert "float64" in be.unsupported_reason(*(q.double(),) * 3, None, None, 0.0)
    with pytest.raises(ValueError, match="backend='triton'"):
        vitkern.scaled_dot_product_attention(*(q.double(),) * 3, backend="triton")
    if INTERPRETING:
        assert "interpreter" in be.unsupported_reason(*(q.bfloat16(),) * 3, None, None, 0.0)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "CUDA" in be.unsupported_reason(q, q, q, None, None, 0.0)


def test_torch_compile_fullgraph():
    q, k, v = qkv(1, 2, 17, 17, 16)

    def f(q, k, v):
        return vitkern.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_out = f(q, k, v)
    ref_grads = torch.autograd.grad(ref_out.sum(), (q, k, v))
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_kernels_compile_for_hopper_without_spills():
    # The interpreter forgives what a real compile rejects; compile for sm_90 ahead of time (no GPU needed).
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "vitkern.triton_kernels.aot_check", "--quick"], env=env,
                       capture_output=True, text=True, timeout=600)
    if "No module named" in r.stderr or "ptxas" in r.stderr and r.returncode:
        pytest.skip(f"Triton's CUDA toolchain is not usable here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,causal", [(197, 64, False), (785, 80, True), (577, 96, False), (1024, 128, True),
                                        (300, 256, False), (4096, 64, False)])
def test_gpu_dense(dtype, n, d, causal):
    q, k, v = qkv(2, 3, n, n, d, dtype=dtype)
    check(sdpa(is_causal=causal), lambda q, k, v: math_attention(q, k, v, causal=causal), (q, k, v),
          f"gpu {dtype} n={n} d={d}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_navit_block_diagonal_and_varlen(dtype):
    g = torch.Generator().manual_seed(8)
    lens = torch.randint(16, 600, (12,), generator=g).tolist()
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(DEV)
    t = sum(lens)
    q, k, v = (rand(t, 4, 64, dtype=dtype, gen=g) for _ in range(3))
    cu = _cu(lens)
    out_v = check(lambda q, k, v: vitkern.varlen_attention(q, k, v, cu, backend="triton"),
                  _varlen_truth(cu, cu, False), (q, k, v), "gpu varlen")
    mask = (seg[:, None] == seg[None, :])
    out_m = vitkern.scaled_dot_product_attention(*(x.detach().transpose(0, 1) for x in (q, k, v)), attn_mask=mask,
                                                 backend="triton").transpose(0, 1)
    assert max_err(out_m, out_v) <= FLOOR[dtype]


def _compiled_variants(kernel) -> int:
    dev = torch.cuda.current_device()
    caches = getattr(kernel, "device_caches", None)      # Triton >= 3.2: {device: (kernel_cache, ...)}
    return len(caches[dev][0]) if caches is not None else len(kernel.cache[dev])


@gpu
def test_gpu_new_packing_does_not_recompile():
    from vitkern.triton_kernels.attention_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel
    from vitkern.triton_kernels.attention_fwd import _attention_fwd_kernel
    kernels = (_attention_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel)
    q, k, v = (torch.randn(1000, 4, 64, device=DEV, dtype=torch.float16, requires_grad=True) for _ in range(3))
    counts = []
    # New cu_seqlens and a new total length T every step, as a NaViT packer produces.
    for lens in ([1000], [500, 500], [1, 998, 1], [333, 333, 300], [17] * 50 + [100], [999], [5, 0, 700]):
        t = sum(lens)
        out = vitkern.varlen_attention(q[:t], k[:t], v[:t], _cu(lens), backend="triton")
        out.sum().backward()
        counts.append(tuple(_compiled_variants(kern) for kern in kernels))
    assert len(set(counts)) == 1, counts


@gpu
def test_gpu_backward_is_deterministic():
    q, k, v = qkv(2, 4, 1000, 1000, 64, hk=2, dtype=torch.bfloat16)
    f = lambda: torch.autograd.grad(vitkern.scaled_dot_product_attention(  # noqa: E731
        q, k, v, enable_gqa=True, backend="triton").sum(), (q, k, v))
    a, b = f(), f()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@gpu
def test_gpu_long_sequence_int64_offsets():
    # PiT at 224x224: 50,176 tokens; a bool mask of 50k x 50k has > 2**31 elements (int64 offsets needed).
    n, d = 50176, 64
    q, k, v = (torch.randn(1, 1, n, d, device=DEV, dtype=torch.float16) for _ in range(3))
    mask = torch.ones(n, n, dtype=torch.bool, device=DEV)
    mask[-5:, :] = False
    mask[:, -3:] = False
    out = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
    rows = torch.tensor([0, 1, 12345, n - 6, n - 1], device=DEV)
    exact = math_attention(q[:, :, rows].double(), k.double(), v.double(), mask=mask[rows])
    naive = math_attention(q[:, :, rows], k, v, mask=mask[rows])
    assert_close(out[:, :, rows], exact, naive, "50k tokens")
    assert (out[0, 0, -5:] == 0).all()
