"""The ``reference`` backend: attention in plain PyTorch with the N×N score matrix materialized.

It serves every input of the contract (any float dtype, masks, causal, GQA, dropout, varlen with empty
sequences) and has an explicit backward written with the same formulas the fused kernels use, so it doubles as
the op layer's slowest backend and as a readable statement of what the kernels compute. Scores are computed in
float32 (float64 for float64 inputs). Memory is O(B·H·Nq·Nk): for tests and small inputs only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import dropout as _dropout
from .base import Backend, empty_bhnd


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _segments(cu: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Segment id and position-in-segment of each of ``total`` packed tokens."""
    pos = torch.arange(total, device=cu.device, dtype=torch.int64)
    cu = cu.to(torch.int64)
    seg = torch.searchsorted(cu[1:], pos, right=True)
    return seg, pos - cu[seg]


def allowed_pairs(q: Tensor, k: Tensor, mask: Optional[Tensor], cu_q: Optional[Tensor], cu_k: Optional[Tensor],
                  is_causal: bool) -> Tensor:
    """Bool [B|1, H|1, Nq, Nk]: which (query, key) pairs take part (bool masks, causal, varlen blocks)."""
    nq, nk = q.shape[2], k.shape[2]
    ok = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
    if mask is not None:
        # A -inf float entry removes the pair even when its score is NaN (a masked pair is never read).
        ok = ok & (mask if mask.dtype == torch.bool else mask != -math.inf)
    if cu_q is not None:
        seg_q, pos_q = _segments(cu_q, nq)
        seg_k, pos_k = _segments(cu_k, nk)
        ok = ok & (seg_q[:, None] == seg_k[None, :])
        if is_causal:
            ok = ok & (pos_k[None, :] <= pos_q[:, None])
    elif is_causal:
        ok = ok & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
    return ok


def _dropout_keep(q: Tensor, nk: int, seed: int, p: float) -> Tensor:
    b, h, nq = q.shape[:3]
    dev = q.device
    bh = torch.arange(b * h, device=dev).view(b, h, 1, 1)
    rows = torch.arange(nq, device=dev).view(1, 1, nq, 1)
    cols = torch.arange(nk, device=dev).view(1, 1, 1, nk)
    return _dropout.keep_mask(seed, bh, rows, cols, p)


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _scores(q, k, mask, cu_q, cu_k, scale, is_causal):
    """Scaled, masked scores in the compute dtype, -inf where a pair does not take part."""
    cd = _compute_dtype(q)
    groups = q.shape[1] // k.shape[1]
    kk = k.to(cd).repeat_interleave(groups, dim=1) if groups > 1 else k.to(cd)
    s = torch.matmul(q.to(cd), kk.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(cd)
    ok = allowed_pairs(q, k, mask, cu_q, cu_k, is_causal)
    return s.masked_fill(~ok, -math.inf), kk


def _expand_kv(v: Tensor, groups: int, cd: torch.dtype) -> Tensor:
    v = v.to(cd)
    return v.repeat_interleave(groups, dim=1) if groups > 1 else v


def _fold_groups(g: Tensor, hk: int) -> Tensor:
    """Sum a gradient over the query heads that share one key/value head (GQA)."""
    b, hq, n, d = g.shape
    return g.view(b, hk, hq // hk, n, d).sum(2) if hq != hk else g


def _weighted(w: Tensor, x: Tensor) -> Tensor:
    """w @ x, where a NaN in a row of x reaches only the outputs that weigh it (w != 0): the fused kernels never
    read another packed sequence's rows or a skipped tile, and this one-tile spec must not either (0 * NaN = NaN)."""
    nan_x = torch.isnan(x)
    if not bool(nan_x.any()):  # the common case: one product (this backend runs inside the op, never traced)
        return torch.matmul(w, x)
    out = torch.matmul(w, x.masked_fill(nan_x, 0))
    return out.masked_fill(torch.matmul((w != 0).to(w.dtype), nan_x.to(w.dtype)) > 0, math.nan)


class ReferenceBackend(Backend):
    name = "reference"

    def available(self) -> bool:
        return True

    def unsupported_reason(self, q, k, v, mask, cu_seqlens_q, dropout_p) -> Optional[str]:
        return None

    def forward(self, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p):
        cd = _compute_dtype(q)
        s, _ = _scores(q, k, mask, cu_q, cu_k, scale, is_causal)
        m = s.amax(-1, keepdim=True)  # NaN if a score is NaN: then so are the row and its lse
        m = torch.where(m == -math.inf, torch.zeros_like(m), m)
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        lse = (m + torch.log(denom)).squeeze(-1)
        p = torch.where(denom == 0, torch.zeros_like(p), p / denom)
        if dropout_p > 0:
            p = p * _dropout_keep(q, k.shape[2], seed, dropout_p) * _dropout_scale(dropout_p)
        o = _weighted(p, _expand_kv(v, q.shape[1] // k.shape[1], cd))
        out = empty_bhnd(q.shape[0], q.shape[1], q.shape[2], v.shape[3], q)
        out.copy_(o)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                 dropout_p, mask_grad):
        cd = _compute_dtype(q)
        groups = q.shape[1] // k.shape[1]
        s, kk = _scores(q, k, mask, cu_q, cu_k, scale, is_causal)
        lse_c = lse.to(cd).unsqueeze(-1)
        # Rows with no key (lse = -inf) get P = 0, hence zero gradients; a NaN lse gives NaN gradients.
        empty = lse_c == -math.inf
        p = torch.where(empty | (s == -math.inf), 0, torch.exp(s - torch.where(empty, 0, lse_c)))
        vv = _expand_kv(v, groups, cd)
        do = dout.to(cd)
        dp = torch.matmul(do, vv.transpose(-1, -2))
        if dropout_p > 0:
            keep = _dropout_keep(q, k.shape[2], seed, dropout_p) * _dropout_scale(dropout_p)
            pd, dp = p * keep, dp * keep
        else:
            pd = p
        dv = _weighted(pd.transpose(-1, -2), do)
        # delta from the given out (as the fused kernels do), not from P: callers such as the ring mode of
        # vitkern.distributed pass an out and lse merged over several calls.
        delta = (do * out.to(cd)).sum(-1, keepdim=True)
        ds = torch.where(p == 0, 0, p * (dp - delta))  # a pair that takes no part gives no gradient, NaN or not
        dq = _weighted(ds, kk) * scale
        dk = _weighted(ds.transpose(-1, -2), q.to(cd)) * scale
        b, hq, nq, d = q.shape
        nk, hk = k.shape[2], k.shape[1]
        dq_out = empty_bhnd(b, hq, nq, d, q)
        dq_out.copy_(dq)
        dk_out = empty_bhnd(b, hk, nk, d, k)
        dk_out.copy_(_fold_groups(dk, hk))
        dv_out = empty_bhnd(b, hk, nk, v.shape[3], v)
        dv_out.copy_(_fold_groups(dv, hk))
        dmask = ds.to(mask.dtype) if mask_grad else q.new_empty(0)
        return dq_out, dk_out, dv_out, dmask
