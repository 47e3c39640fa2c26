"""Mode ``allgather_kv`` (LSS): gather the full K and V on every rank, attend with the rank's own queries.

Forward: all-gather K and V (uneven shards padded, see collectives.py), then one fused ``varlen_attention``
call with the rank's queries against all keys. Because every query sees all of its keys in one call, no partial
softmax is merged. Backward: autograd runs the fused backward locally; the gradient of the gathered K/V is
reduce-scattered so each rank gets the sum, over all ranks' queries, of the gradient of its own K/V shard.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..api import varlen_attention
from .collectives import all_gather_tokens, reduce_scatter_tokens
from .shards import clip_cu_seqlens, dense_cu_seqlens, shard_offsets
from .validation import Layout


class _GatherTokens(torch.autograd.Function):
    """all_gather along the token axis; its transpose, reduce_scatter, in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list, rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return all_gather_tokens(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return reduce_scatter_tokens(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


def gather_tokens(x: Tensor, sizes: list, rank: int, group) -> Tensor:
    """Differentiable all-gather of ``x [sizes[rank], ...]`` -> ``[sum(sizes), ...]``; the backward sums the
    gradient over the ranks and returns this rank's rows."""
    return _GatherTokens.apply(x, sizes, rank, group)


def allgather_kv_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], layout: Layout,
                           scale: Optional[float], group, backend: Optional[str]):
    """q [T_r, H, D], k [T_r, Hk, D], v [T_r, Hk, Dv] -> (out [T_r, H, Dv], lse [H, T_r]: float32, float64 for float64 inputs)."""
    offsets = shard_offsets(layout.sizes)
    lo, hi = offsets[layout.rank], offsets[layout.rank + 1]
    k_all = gather_tokens(k, layout.sizes, layout.rank, group)
    v_all = gather_tokens(v, layout.sizes, layout.rank, group)
    if cu_seqlens is None:
        cu_q, cu_k = dense_cu_seqlens(hi - lo, q.device), dense_cu_seqlens(offsets[-1], q.device)
    else:
        cu_q, cu_k = clip_cu_seqlens(cu_seqlens, lo, hi), cu_seqlens
    return varlen_attention(q, k_all, v_all, cu_q, cu_k, scale=scale, return_lse=True, backend=backend)
