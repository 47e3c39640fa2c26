"""The SDPA-style contract, run against every backend profile (backends_under_test.py), vs float64 math."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import truth
import vitkern
from contract import ATOL, assert_close_to_truth, check_against_truth, qkv, rand


def sdpa(prof, **kw):
    return functools.partial(vitkern.scaled_dot_product_attention, backend=prof.backend, **kw)


def _sizes(prof):
    return [n for n in prof.sizes]


@pytest.mark.parametrize("n_index", range(4))
def test_self_attention_sizes(prof, n_index):
    if n_index >= len(prof.sizes):
        pytest.skip("profile has fewer sizes")
    n = prof.sizes[n_index]
    q, k, v = qkv(2, 3, n, n, 64 if prof.big > 100 else 16, device=prof.device, grad=True)
    check_against_truth(sdpa(prof), (q, k, v), truth.attention, f"N={n}")


@pytest.mark.parametrize("nq,nk", [(7, 197), (197, 7), (1, 785), (785, 33), (5, 1)])
def test_cross_attention_lengths(prof, nq, nk):
    nq, nk = min(nq, prof.big), min(nk, prof.big)
    q, k, v = qkv(1, 2, nq, nk, 32 if prof.big > 100 else 16, device=prof.device, grad=True, seed=nq + nk)
    check_against_truth(sdpa(prof), (q, k, v), truth.attention, f"Nq={nq} Nk={nk}")


@pytest.mark.parametrize("d_index", range(7))
def test_head_dims(prof, d_index):
    if d_index >= len(prof.head_dims):
        pytest.skip("profile has fewer head dims")
    d = prof.head_dims[d_index]
    n = min(197, prof.big)
    q, k, v = qkv(1, 2, n, n, d, device=prof.device, grad=True, seed=d)
    check_against_truth(sdpa(prof), (q, k, v), truth.attention, f"D={d}")


@pytest.mark.parametrize("d,dv", [(64, 32), (16, 80), (96, 8), (8, 256)])
def test_value_dim_differs(prof, d, dv):
    if d not in prof.head_dims and prof.backend == "triton" and (d < 16 or dv < 16):
        pytest.skip("head dim below what the profile runs")
    n = min(61, prof.big)
    q, k, v = qkv(2, 2, n, n + 3 if n > 1 else 2, d, dv=dv, device=prof.device, grad=True, seed=dv)
    check_against_truth(sdpa(prof), (q, k, v), truth.attention, f"D={d} Dv={dv}")


@pytest.mark.parametrize("dtype_index", range(3))
def test_dtypes(prof, dtype_index):
    if dtype_index >= len(prof.dtypes):
        pytest.skip("profile has fewer dtypes")
    dtype = prof.dtypes[dtype_index]
    n = min(197, prof.big)
    q, k, v = qkv(2, 3, n, n, 64 if prof.big > 100 else 16, dtype=dtype, device=prof.device, grad=True)
    check_against_truth(sdpa(prof), (q, k, v), truth.attention, f"{dtype}")


# Every broadcast shape a mask may take for scores [B=2, H=3, Nq, Nk].
MASK_SHAPES = {
    "full": lambda b, h, nq, nk: (b, h, nq, nk),
    "per-batch": lambda b, h, nq, nk: (b, 1, nq, nk),
    "per-head": lambda b, h, nq, nk: (h, nq, nk),
    "2d": lambda b, h, nq, nk: (nq, nk),
    "key-padding": lambda b, h, nq, nk: (b, 1, 1, nk),
    "query-rows": lambda b, h, nq, nk: (nq, 1),
    "row-vector": lambda b, h, nq, nk: (nk,),
}


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_masks_every_broadcast_shape(prof, kind, shape):
    b, h = 2, 3
    nq, nk = min(197, prof.big), min(130, prof.big)
    gen = torch.Generator().manual_seed(7)
    mshape = MASK_SHAPES[shape](b, h, nq, nk)
    if kind == "bool":
        mask = (torch.rand(mshape, generator=gen) > 0.3).to(prof.device)
    else:
        mask = torch.randn(mshape, generator=gen).to(prof.device)
        mask = mask.masked_fill(torch.rand(mshape, generator=gen).to(prof.device) < 0.2, -math.inf)
    q, k, v = qkv(b, h, nq, nk, 32 if prof.big > 100 else 16, device=prof.device, grad=True, seed=3)
    check_against_truth(lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, mask, backend=prof.backend), (q, k, v),
        lambda q, k, v, upcast=True: truth.attention(q, k, v, mask, upcast=upcast), f"{kind} mask {shape}")


def _tile_mixed_mask(nq, nk, device, seed=0):
    """Bool mask mixing fully masked, fully open and partial tiles at sizes straddling tile edges."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(nq, nk, generator=gen) > 0.5
    m[: nq // 3, :] = True
    m[nq // 3: nq // 2, :] = False
    m[:, : nk // 4] = True
    m[nq // 2:, nk // 2:] = False
    return m.to(device)


def test_mask_mixed_tiles(prof):
    nq, nk = min(197, prof.big), min(197, prof.big)
    mask = _tile_mixed_mask(nq, nk, prof.device)
    q, k, v = qkv(1, 2, nq, nk, 32 if prof.big > 100 else 16, device=prof.device, grad=True, seed=11)
    check_against_truth(lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, mask, backend=prof.backend), (q, k, v),
        lambda q, k, v, upcast=True: truth.attention(q, k, v, mask, upcast=upcast), "mixed-tile mask")


def test_block_diagonal_mask_from_segment_ids(prof):
    lengths = [5, 1, 64, 0, 70, 30] if prof.big > 100 else [5, 1, 12, 0, 15]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (seg[:, None] == seg[None, :]).to(prof.device)
    n = seg.numel()
    q, k, v = qkv(1, 2, n, n, 32 if prof.big > 100 else 16, device=prof.device, grad=True, seed=5)
    check_against_truth(lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, mask, backend=prof.backend), (q, k, v),
        lambda q, k, v, upcast=True: truth.attention(q, k, v, mask, upcast=upcast), "block-diagonal mask")


@pytest.mark.parametrize("nq,nk", [(197, 197), (7, 33), (33, 7), (1, 1)])
def test_causal(prof, nq, nk):
    nq, nk = min(nq, prof.big), min(nk, prof.big)
    q, k, v = qkv(2, 2, nq, nk, 32 if prof.big > 100 else 16, device=prof.device, grad=True, seed=nq)
    check_against_truth(lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, is_causal=True, backend=prof.backend), (q, k, v),
        lambda q, k, v, upcast=True: truth.attention(q, k, v, is_causal=True, upcast=upcast), "causal")


def test_causal_combined_with_mask(prof):
    n = min(100, prof.big)
    mask = _tile_mixed_mask(n, n, prof.device, seed=4)
    q, k, v = qkv(1, 2, n, n, 16, device=prof.device, grad=True, seed=9)
    check_against_truth(lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, mask, is_causal=True, backend=prof.backend), (q, k, v),
        lambda q, k, v, upcast=True: truth.attention(q, k, v, mask, is_causal=True, upcast=upcast),
        "causal+mask")


@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 1), (8, 8)])
def test_gqa(prof, hq, hk):
    n = min(100, prof.big)
    q, k, v = qkv(2, hq, n, n + 1, 16, hk=hk, device=prof.device, grad=True, seed=hq * hk)
    check_against_truth(lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, enable_gqa=True, backend=prof.backend), (q, k, v),
        lambda q, k, v, upcast=True: truth.attention(q, k, v, enable_gqa=True, upcast=upcast), f"GQA {hq}/{hk}")


def test_custom_scale_and_leading_dims(prof):
    n = min(50, prof.big)
    gen = torch.Generator().manual_seed(2)
    q = rand(2, 2, 3, n, 16, gen=gen, device=prof.device, requires_grad=True)
    k = rand(2, 1, 3, n + 2, 16, gen=gen, device=prof.device, requires_grad=True)   # broadcast over dim 1
    v = rand(2, 1, 3, n + 2, 24, gen=gen, device=prof.device, requires_grad=True)
    check_against_truth(lambda q, k, v, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, scale=0.37, backend=prof.backend), (q, k, v),
        lambda q, k, v, upcast=True: truth.attention(q, k, v, scale=0.37, upcast=upcast), "scale+broadcast")


@pytest.mark.parametrize("scale", [-0.6, 0.0, 3.0])
def test_negative_zero_and_large_scales(prof, scale):
    """torch takes any finite scale: a negative one turns the row max into the row min of the raw dots."""
    n = min(70, prof.big)
    q, k, v = qkv(1, 2, n, n + 5, 16, device=prof.device, grad=True, seed=19)
    mask = (torch.rand(n, n + 5, generator=torch.Generator().manual_seed(4)) > 0.2).to(prof.device)
    for m in (None, mask):
        check_against_truth(
            lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale,
                                                                 backend=prof.backend), (q, k, v),
            lambda q, k, v, upcast=True: truth.attention(q, k, v, mask=m, scale=scale, upcast=upcast),
            f"scale={scale} mask={m is not None}")


def test_2d_and_3d_inputs(prof):
    n = min(40, prof.big)
    for shape in [(n, 16), (3, n, 16)]:
        q, k, v = (rand(*shape, device=prof.device, requires_grad=True) for _ in range(3))
        check_against_truth(sdpa(prof), (q, k, v), truth.attention, f"{len(shape)}-D")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero_and_zero_grad(prof, kind):
    n = min(64, prof.big)
    mask = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, :, ::3] = False  # every third query row sees no key
    if kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    mask = mask.to(prof.device)
    q, k, v = qkv(2, 2, n, n, 16, device=prof.device, grad=True, seed=8)
    out = vitkern.scaled_dot_product_attention(q, k, v, mask, backend=prof.backend)
    assert torch.isfinite(out).all()
    assert (out[:, :, ::3] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, ::3] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    ex = truth.attention(q.detach(), k.detach(), v.detach(), mask)
    assert_close_to_truth(out.detach(), ex, truth.attention(q.detach(), k.detach(), v.detach(), mask, upcast=False),
                          "fully masked rows")


def test_no_key_at_all(prof):
    q, k, v = qkv(1, 2, 5, 0, 16, device=prof.device, grad=True)
    out = vitkern.scaled_dot_product_attention(q, k, v, backend=prof.backend)
    assert out.shape == (1, 2, 5, 16) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_large_logits_do_not_overflow(prof):
    n = min(197, prof.big)
    q, k, v = qkv(1, 2, n, n, 32, device=prof.device, seed=12)
    # scores of order 1e4: exp would overflow without the running max.
    q = (q * 40).requires_grad_()
    k = (k * 40).requires_grad_()
    v = v.requires_grad_()
    assert truth.logsumexp(q.detach(), k.detach()).abs().max().item() > 3e3
    check_against_truth(sdpa(prof), (q, k, v), truth.attention, "large logits", recompute_scale=32 ** -0.5)


def test_float_mask_gradient(prof):
    n = min(60, prof.big)
    q, k, v = qkv(2, 2, n, n + 5, 16, device=prof.device, grad=True, seed=13)
    bias = rand(2, 1, n, n + 5, device=prof.device, requires_grad=True)   # broadcast over heads
    check_against_truth(lambda q, k, v, m, upcast=True: vitkern.scaled_dot_product_attention(
        q, k, v, m, backend=prof.backend), (q, k, v, bias),
        lambda q, k, v, m, upcast=True: truth.attention(q, k, v, m, upcast=upcast), "float mask grad")


def test_lse_matches_logsumexp(prof):
    n = min(97, prof.big)
    q, k, v = qkv(2, 2, n, n + 3, 16, device=prof.device, seed=14)
    mask = _tile_mixed_mask(n, n + 3, prof.device, seed=2)
    from vitkern.ops import attention_fwd
    _, lse = attention_fwd(q, k, v, mask.expand(2, 2, n, n + 3), None, None, None, -1, -1, 0.25, False, 0.0,
                           prof.backend)
    ex = truth.logsumexp(q.cpu(), k.cpu(), mask.cpu(), scale=0.25)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, n)
    finite = torch.isfinite(ex)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert max(0.0, (lse.cpu().double()[finite] - ex[finite]).abs().max().item()) < 1e-4


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_bit_for_bit(prof, p):
    """Backends share the counter-based dropout of vitkern/dropout.py: same seed, same kept entries."""
    n = min(70, prof.big)
    outs, grads = [], []
    for be in ("reference", prof.backend):
        q, k, v = qkv(2, 2, n, n + 1, 16, device=prof.device, grad=True, seed=21)
        torch.manual_seed(123)
        o = vitkern.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=be)
        o.backward(torch.ones_like(o))
        outs.append(o.detach())
        grads.append((q.grad, k.grad, v.grad))
    assert_close_to_truth(outs[1], outs[0].double(), None, "dropout output vs reference")
    for g1, g0, name in zip(grads[1], grads[0], "qkv"):
        assert_close_to_truth(g1, g0.double(), None, f"dropout d{name} vs reference")


def test_dropout_is_exact_inverted_dropout(prof):
    """Against truth with the keep-mask regenerated from the documented hash."""
    from vitkern import dropout as dr
    n, p = min(50, prof.big), 0.3
    q, k, v = qkv(1, 2, n, n, 16, device=prof.device, grad=True, seed=22)
    torch.manual_seed(5)
    seed = int(dr.new_seed())
    torch.manual_seed(5)
    out = vitkern.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=prof.backend)
    keep = dr.keep_mask(seed, torch.arange(2).view(1, 2, 1, 1), torch.arange(n).view(n, 1),
                        torch.arange(n).view(1, n), p).to(prof.device)
    frac = 1 - keep.double().mean().item()
    assert abs(frac - p) < 0.05, f"dropped fraction {frac:.3f} for p={p}"
    ex = truth.attention(q.detach(), k.detach(), v.detach(), keep=keep, dropout_p=p)
    assert_close_to_truth(out.detach(), ex, None, "dropout vs truth")


def test_gradcheck_float64(prof):
    if not prof.fp64:
        pytest.skip("backend does not take float64")
    q, k, v = qkv(1, 2, 6, 9, 8, dtype=torch.float64, device=prof.device, grad=True, seed=30)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[2] = False
    bias = rand(6, 9, dtype=torch.float64, device=prof.device, requires_grad=True)
    f = lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, mask.to(prof.device), backend=prof.backend)
    assert torch.autograd.gradcheck(f, (q, k, v))
    g = lambda q, k, v, b: vitkern.scaled_dot_product_attention(q, k, v, b, is_causal=True, backend=prof.backend)
    assert torch.autograd.gradcheck(g, (q, k, v, bias))
