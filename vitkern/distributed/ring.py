"""Mode ``ring``: K/V shards travel around the ring; partial results are merged by their log-sum-exp.

No rank ever holds more than two K/V shards (its own and the one in flight), for when even one full copy of K
and V does not fit.

Forward, step s = 0..P-1: rank r holds the K/V shard of rank (r - s) mod P, starts passing it on to r + 1 while
it attends its queries to it (one fused ``varlen_attention`` call with ``return_lse``), and merges the partial
output into its running (out, lse) by log-sum-exp weights. Shards whose sequences never meet the rank's queries
(packed batches) are passed on without being attended to.

Backward, exact and using only the public API: with w_b = exp(lse_b - lse) the weight of shard b and
c_b = w_b * <dout, out_b - out>, the loss gradient reaches shard b's attention as dout_b = w_b * dout on its
output and c_b on its log-sum-exp. Autograd through ``varlen_attention`` carries the first; the second, the
lse gradient (which the op does not propagate), is scale * c_b * (P_b K_b) for dq and
scale * P_b^T (c_b q) for dk. Both come out of the same block call by widening its values to
[V_b, 0, K_b]: the K_b columns give P_b K_b, and the all-zero columns, given c_b * q as their output gradient,
return P_b^T (c_b q) as their "dv" without touching the score gradient (their values are zero). The dK/dV of a
shard are accumulated as they travel with it and arrive at their owner after one full turn.

Cost: the forward does the same work as allgather_kv; the backward does, per block, one forward and one backward
with values Dv + 2D wide instead of one backward with Dv: about 2-3x the backward's work (measured 2.7x the
allgather_kv step at P = 1 on CPU). A backend entry point that takes the global (out, lse) -- the fused kernels
already compute delta = rowsum(dO * O) from the out they are given -- would bring it to one plain backward per
block. Precision: the merge uses the op's log-sum-exp, float64 for float64 inputs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..api import varlen_attention
from .collectives import exchange_with_neighbours
from .shards import clip_cu_seqlens, dense_cu_seqlens, overlapping_shards, shard_offsets
from .validation import Layout

# The fused backends take value head dims up to this; wider value stacks are split over several calls.
MAX_FUSED_VALUE_DIM = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_cu(cu_seqlens: Optional[Tensor], lo: int, hi: int, device) -> Tensor:
    return dense_cu_seqlens(hi - lo, device) if cu_seqlens is None else clip_cu_seqlens(cu_seqlens, lo, hi)


def _merge(out_acc: Tensor, lse_acc: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """out_acc [T, H, Dv], lse_acc [H, T] <- merged with one shard's (out_b, lse_b), in place."""
    cd = out_acc.dtype
    a, b = lse_acc.to(cd), lse_b.to(cd)
    new = torch.logaddexp(a, b)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))  # rows with no key yet: both -inf
    wa, wb = torch.exp(a - safe).t().unsqueeze(-1), torch.exp(b - safe).t().unsqueeze(-1)
    out_acc.mul_(wa).add_(out_b.to(cd) * wb)
    lse_acc.copy_(new)


def _pack_value_pieces(widths: dict) -> list[list[str]]:
    """Group the value pieces 'v', 'z', 'k' (in that order) into calls of total width <= MAX_FUSED_VALUE_DIM."""
    calls, width = [[]], 0
    for name in ("v", "z", "k"):
        if calls[-1] and width + widths[name] > MAX_FUSED_VALUE_DIM:
            calls.append([])
            width = 0
        calls[-1].append(name)
        width += widths[name]
    return calls


def _slices(buf: Tensor, names: list, widths: dict):
    """(name, view) of each value piece laid side by side along the last dim of ``buf``."""
    start = 0
    for n in names:
        yield n, buf[..., start:start + widths[n]]
        start += widths[n]


def _block_grads(q, k_b, v_b, cu_q, cu_k, scale, backend, dout, out, lse):
    """Gradient contributions of one K/V shard: (dq [T_r, H, D], dk_b, dv_b) in the accumulation dtype."""
    cd = out.dtype
    d, dv_dim = q.shape[2], v_b.shape[2]
    widths = {"v": dv_dim, "z": d, "k": d}
    with torch.enable_grad():
        qg, kg = q.detach().requires_grad_(), k_b.detach().requires_grad_()
        calls, parts = [], {}
        for names in _pack_value_pieces(widths):
            # The widened values are written into one buffer (no per-piece copies, no separate zeros).
            vals = k_b.new_empty(k_b.shape[:2] + (sum(widths[n] for n in names),))
            for n, dst in _slices(vals, names, widths):
                dst.copy_(v_b) if n == "v" else dst.copy_(k_b) if n == "k" else dst.zero_()
            if names != ["k"]:
                vals.requires_grad_()
                o, lse_b = varlen_attention(qg, kg, vals, cu_q, cu_k, scale=scale, return_lse=True,
                                            backend=backend)
            else:
                with torch.no_grad():
                    o, lse_b = varlen_attention(q, k_b, vals, cu_q, cu_k, scale=scale, return_lse=True,
                                                backend=backend)
            calls.append((names, vals, o))
            parts.update(_slices(o.detach(), names, widths))
        lse_c = lse.to(cd)
        finite = torch.isfinite(lse_c)
        w = torch.where(finite, torch.exp(lse_b.to(cd) - torch.where(finite, lse_c, 0)), 0)
        w = w.t().unsqueeze(-1)                                      # [T_r, H, 1]
        dout_c = dout.to(cd)
        c = w * (dout_c * (parts["v"].to(cd) - out)).sum(-1, keepdim=True)
        outs, grads = [], []
        for names, vals, o in calls:
            if not vals.requires_grad:
                continue
            g = torch.empty_like(o)
            for n, dst in _slices(g, names, widths):
                if n == "v":
                    dst.copy_(w * dout_c)
                elif n == "z":
                    dst.copy_(q).mul_(scale * c)
                else:
                    dst.zero_()
            outs.append(o)
            grads.append(g)
        torch.autograd.backward(outs, grads)
        del outs, grads
    dq = qg.grad.to(cd).add_(scale * c * parts["k"].to(cd))
    dk, dv = kg.grad.to(cd), None
    for names, vals, _ in calls:
        if vals.grad is None:
            continue
        for n, g in _slices(vals.grad, names, widths):
            if n == "v":
                dv = g.to(cd)
            elif n == "z":
                dk = dk + g.to(cd)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, layout: Layout, scale: float, group, backend):
        rank, world, sizes = layout.rank, layout.world, layout.sizes
        offsets = shard_offsets(sizes)
        cd = _acc_dtype(q.dtype)
        cu_q = _block_cu(cu_seqlens, offsets[rank], offsets[rank + 1], q.device)
        meets = (overlapping_shards(layout.cu_host, offsets, rank) if layout.cu_host is not None
                 else [s > 0 and sizes[rank] > 0 for s in sizes])
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=cd, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=cd, device=q.device)
        k_cur, v_cur = k.detach().contiguous(), v.detach().contiguous()
        for step in range(world):
            src = (rank - step) % world
            reqs = []
            if step < world - 1:
                nxt = (src - 1) % world
                k_next = k_cur.new_empty((sizes[nxt],) + tuple(k.shape[1:]))
                v_next = v_cur.new_empty((sizes[nxt],) + tuple(v.shape[1:]))
                reqs = exchange_with_neighbours([k_cur, v_cur], [k_next, v_next], rank, world, group)
            if meets[src]:
                cu_k = _block_cu(cu_seqlens, offsets[src], offsets[src + 1], q.device)
                o_b, lse_b = varlen_attention(q.detach(), k_cur, v_cur, cu_q, cu_k, scale=scale, return_lse=True,
                                              backend=backend)
                _merge(out, lse, o_b, lse_b)
            for req in reqs:
                req.wait()
            if step < world - 1:
                k_cur, v_cur = k_next, v_next
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.layout, ctx.scale, ctx.group, ctx.backend, ctx.meets = layout, scale, group, backend, meets
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        layout, scale, group, backend, meets = ctx.layout, ctx.scale, ctx.group, ctx.backend, ctx.meets
        rank, world, sizes = layout.rank, layout.world, layout.sizes
        offsets = shard_offsets(sizes)
        cd = out.dtype
        cu_q = _block_cu(cu_seqlens, offsets[rank], offsets[rank + 1], q.device)
        if dout is None:
            dout = torch.zeros_like(out)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        k_cur, v_cur = k.detach().contiguous(), v.detach().contiguous()
        # The dK/dV accumulator of the shard held at this step; it travels with the shard.
        dk_acc = torch.zeros(k.shape, dtype=cd, device=q.device)
        dv_acc = torch.zeros(v.shape, dtype=cd, device=q.device)
        acc_reqs, sent = [], None
        for step in range(world):
            src = (rank - step) % world
            nxt = (src - 1) % world
            kv_reqs = []
            if step < world - 1:
                k_next = k_cur.new_empty((sizes[nxt],) + tuple(k.shape[1:]))
                v_next = v_cur.new_empty((sizes[nxt],) + tuple(v.shape[1:]))
                kv_reqs = exchange_with_neighbours([k_cur, v_cur], [k_next, v_next], rank, world, group)
            contrib = None
            if meets[src]:
                cu_k = _block_cu(cu_seqlens, offsets[src], offsets[src + 1], q.device)
                contrib = _block_grads(q, k_cur, v_cur, cu_q, cu_k, scale, backend, dout, out, lse)
            for req in acc_reqs:   # this shard's accumulator, sent by rank - 1 at the end of its last step
                req.wait()
            if contrib is not None:
                dq.add_(contrib[0])
                dk_acc.add_(contrib[1])
                dv_acc.add_(contrib[2])
            if world > 1:
                # Pass the accumulator on with the shard; after the last step it reaches the shard's owner.
                dk_in = dk_acc.new_empty((sizes[nxt],) + tuple(k.shape[1:]))
                dv_in = dv_acc.new_empty((sizes[nxt],) + tuple(v.shape[1:]))
                acc_reqs = exchange_with_neighbours([dk_acc, dv_acc], [dk_in, dv_in], rank, world, group)
                # dk_acc/dv_acc stay referenced by the requests until they are waited on, next step.
                sent = (dk_acc, dv_acc)
                dk_acc, dv_acc = dk_in, dv_in
            for req in kv_reqs:
                req.wait()
            if step < world - 1:
                k_cur, v_cur = k_next, v_next
        for req in acc_reqs:
            req.wait()
        del sent
        return (dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), None, None, None, None, None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], layout: Layout,
                   scale: Optional[float], group, backend: Optional[str]):
    """q [T_r, H, D], k [T_r, Hk, D], v [T_r, Hk, Dv] -> (out [T_r, H, Dv], lse [H, T_r]: float32, float64 for float64 inputs)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, cu_seqlens, layout, scale, group, backend)
