"""The op layer: vitkern::attention_fwd / vitkern::attention_bwd as torch.library custom ops.

Both public functions reach a backend only through these two ops, so every backend gets, for free: a fake
(meta) implementation for torch.compile and FakeTensor tracing, autograd (the backward op), and opcheck.
The ``backend`` argument names who computes; it is resolved in Python before the op is called, so a compiled
graph holds a constant string and never re-dispatches.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends.base import empty_bhnd


def lse_dtype(q: Tensor) -> torch.dtype:
    """float64 inputs keep a float64 log-sum-exp (their gradients are float64-accurate); all others float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _degenerate(q: Tensor, k: Tensor) -> bool:
    # No query, or no key to attend to: answered here so no backend needs an empty-size special case.
    return q.numel() == 0 or k.shape[2] == 0


@torch.library.custom_op("vitkern::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], seed: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                  scale: float, is_causal: bool, dropout_p: float, backend: str) -> tuple[Tensor, Tensor]:
    """out [B, Hq, Nq, Dv] (stored as [B, Nq, Hq, Dv]), lse [B, Hq, Nq] (``lse_dtype``); see backends/base.py."""
    if _degenerate(q, k):
        b, h, n, _ = q.shape
        out = empty_bhnd(b, h, n, v.shape[3], q)
        out.zero_()
        return out, torch.full((b, h, n), -math.inf, dtype=lse_dtype(q), device=q.device)
    return backends.get(backend).forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         seed, scale, is_causal, dropout_p)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale,
                        is_causal, dropout_p, backend):
    b, h, n, _ = q.shape
    return empty_bhnd(b, h, n, v.shape[3], q), q.new_empty((b, h, n), dtype=lse_dtype(q))


@torch.library.custom_op("vitkern::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], seed: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, scale: float, is_causal: bool, dropout_p: float,
                  mask_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv like q, k, v (stored [B, N, H, D]); dmask [B, Hq, Nq, Nk] if mask_grad else empty."""
    if _degenerate(q, k):
        return _zero_grads(q, k, v, mask, mask_grad)
    return backends.get(backend).backward(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, seed, scale, is_causal, dropout_p,
                                          mask_grad)


def _grad_buffers(q, k, v, mask, mask_grad):
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    dmask = (q.new_empty((b, hq, nq, nk), dtype=mask.dtype) if mask_grad else q.new_empty(0))
    return (empty_bhnd(b, hq, nq, d, q), empty_bhnd(b, hk, nk, d, k), empty_bhnd(b, hk, nk, v.shape[3], v),
            dmask)


def _zero_grads(q, k, v, mask, mask_grad):
    grads = _grad_buffers(q, k, v, mask, mask_grad)
    for g in grads:
        g.zero_()
    return grads


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q,
                        max_seqlen_k, scale, is_causal, dropout_p, mask_grad, backend):
    return _grad_buffers(q, k, v, mask, mask_grad)


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, scale, is_causal, dropout_p, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, scale, is_causal, dropout_p, backend)
    ctx.mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]


def _backward(ctx, dout, dlse):
    # lse is an auxiliary output: its gradient is not propagated (as in flash-attn).
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, scale, is_causal, dropout_p, backend = ctx.args
    dq, dk, dv, dmask = attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, scale,
                                      is_causal, dropout_p, ctx.mask_grad, backend)
    return dq, dk, dv, (dmask if ctx.mask_grad else None), None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
