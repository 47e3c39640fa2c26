"""torch.export through both public functions, as torch's SDPA exports: a data-dependent (unbacked) batch size,
dynamic dims declared with Dim, strict and non-strict tracing. The traced path calls int() on no size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export

import vitkern
from contract import rand


class _Unbacked(torch.nn.Module):
    """q, k, v are the first n rows of x, n read from a tensor: the batch size is an unbacked symbol."""

    def forward(self, x, n, mask):
        b = n.item()
        torch._check(b >= 0)
        torch._check(b <= x.shape[0])
        q = x[:b]
        dense = vitkern.scaled_dot_product_attention(q, q * 2, q + 1, attn_mask=mask[:b])
        gqa = vitkern.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True, is_causal=True)
        return dense, gqa


@pytest.mark.parametrize("strict", [False, True])
def test_export_with_unbacked_batch(strict):
    x, mask = rand(4, 2, 7, 16), torch.rand(4, 1, 7, 7) > 0.3
    ep = export(_Unbacked(), (x, torch.tensor(3), mask), strict=strict)
    for n in (3, 1, 4):
        dense, gqa = ep.module()(x, torch.tensor(n), mask)
        q = x[:n]
        want = F.scaled_dot_product_attention(q, q * 2, q + 1, attn_mask=mask[:n])
        want_gqa = F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True, is_causal=True)
        assert dense.shape == want.shape and torch.allclose(dense, want, atol=1e-5)
        assert gqa.shape == want_gqa.shape and torch.allclose(gqa, want_gqa, atol=1e-5)


class _Dense(torch.nn.Module):
    def forward(self, q, k, v):
        return vitkern.scaled_dot_product_attention(q, k, v)


class _Packed(torch.nn.Module):
    def forward(self, x, cu):
        return vitkern.varlen_attention(x, x, x, cu)


@pytest.mark.parametrize("strict", [False, True])
def test_export_with_dynamic_dims(strict):
    b, n = Dim("b"), Dim("n")
    dims = {"q": {0: b, 2: n}, "k": {0: b, 2: n}, "v": {0: b, 2: n}}
    x = rand(4, 2, 7, 16)
    ep = export(_Dense(), (x, x, x), dynamic_shapes=dims, strict=strict)
    y = rand(5, 2, 9, 16)
    assert torch.allclose(ep.module()(y, y, y), F.scaled_dot_product_attention(y, y, y), atol=1e-5)

    t, s = Dim("t"), Dim("s")
    x, cu = rand(20, 2, 16), torch.tensor([0, 9, 20], dtype=torch.int32)
    ep = export(_Packed(), (x, cu), dynamic_shapes={"x": {0: t}, "cu": {0: s}}, strict=strict)
    y, cu2 = rand(31, 2, 16), torch.tensor([0, 5, 9, 31], dtype=torch.int32)
    assert torch.allclose(ep.module()(y, cu2), vitkern.varlen_attention(y, y, y, cu2, backend="reference"),
                          atol=1e-5)
