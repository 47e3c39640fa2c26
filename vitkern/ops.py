"""The op layer: vitkern::attention_fwd / vitkern::attention_bwd, and the call the public API makes.

Two paths reach the same backend functions (``_fwd_impl`` / ``_bwd_impl`` call a backend):
- eager (plain tensors, not tracing): ``eager_attention`` calls the backend's forward directly (``_fwd_impl``
  when autocast or an empty size needs it) or, when a gradient is needed, the backend's own autograd node
  (``forward_with_grad``: the cpu backend's is C++) or ``_Attention``, a plain torch.autograd.Function. No
  dispatcher round trip, no custom-op wrapper, and nothing imports torch._dynamo (torch.library.custom_op's
  kernels are wrapped in a dynamo-disable).
- traced (torch.compile, torch.export, FakeTensor / dispatch modes): ``attention`` calls the op
  ``torch.ops.vitkern.attention_fwd``, defined with torch.library.define: its CPU/CUDA kernels are the impl
  functions, it has a fake impl, a registered autograd formula whose backward calls ``attention_bwd``, and an
  autocast rule. The op is opaque to torch.compile (no graph break) and ``torch.library.opcheck`` checks it.
The ``backend`` argument names who computes; it is resolved in Python before the op is called, so a compiled
graph holds a constant string and never re-dispatches.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from .backends.base import dmask_buffer, empty_bhnd

_LIB = torch.library.Library("vitkern", "DEF")
_LIB.define("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens_q, "
            "Tensor? cu_seqlens_k, Tensor? seed, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, "
            "bool is_causal, float dropout_p, str backend) -> (Tensor, Tensor)")
_LIB.define("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
            "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seed, SymInt max_seqlen_q, SymInt max_seqlen_k, "
            "float scale, bool is_causal, float dropout_p, bool mask_grad, str backend) "
            "-> (Tensor, Tensor, Tensor, Tensor)")
#: out [B, Hq, Nq, Dv] (stored as [B, Nq, Hq, Dv]), lse [B, Hq, Nq] (``lse_dtype``); see backends/base.py.
attention_fwd = torch.ops.vitkern.attention_fwd.default
#: dq, dk, dv like q, k, v (stored [B, N, H, D]); dmask [B, Hq, Nq, Nk] if mask_grad else empty.
attention_bwd = torch.ops.vitkern.attention_bwd.default


def lse_dtype(q: Tensor) -> torch.dtype:
    """float64 inputs keep a float64 log-sum-exp (their gradients are float64-accurate); all others float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _degenerate(q: Tensor, k: Tensor) -> bool:
    # No query, or no key to attend to: answered here so no backend needs an empty-size special case.
    return q.numel() == 0 or k.shape[2] == 0


def _autocast_on(device_type_of: Tensor) -> bool:
    return torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device_type_of.device.type)


def _fwd_impl(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale, is_causal,
              dropout_p, backend):
    if _degenerate(q, k):
        b, h, n, _ = q.shape
        out = empty_bhnd(b, h, n, v.shape[3], q)
        out.zero_()
        return out, torch.full((b, h, n), -math.inf, dtype=lse_dtype(q), device=q.device)
    args = (q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, is_causal,
            dropout_p)
    if _autocast_on(q):
        # Backends compute in the dtype they are given: an enclosing autocast must not recast their inner
        # matmuls (the reference backend's float32 products, say).
        with torch.autocast(q.device.type, enabled=False):
            return backends.get(backend).forward(*args)
    return backends.get(backend).forward(*args)


def _bwd_impl(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale,
              is_causal, dropout_p, mask_grad, backend):
    if _degenerate(q, k):
        return _zero_grads(q, k, v, mask, mask_grad, backend)
    args = (dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale,
            is_causal, dropout_p, mask_grad)
    if _autocast_on(q):
        with torch.autocast(q.device.type, enabled=False):
            return backends.get(backend).backward(*args)
    return backends.get(backend).backward(*args)


for _key in ("CPU", "CUDA"):
    _LIB.impl("attention_fwd", _fwd_impl, _key)
    _LIB.impl("attention_bwd", _bwd_impl, _key)


def _grad_buffers(q, k, v, mask, mask_grad, backend):
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    dmask = dmask_buffer(b, hq, nq, nk, mask, backends.get(backend).pads_dmask_rows) if mask_grad \
        else q.new_empty(0)
    return (empty_bhnd(b, hq, nq, d, q), empty_bhnd(b, hk, nk, d, k), empty_bhnd(b, hk, nk, v.shape[3], v),
            dmask)


def _zero_grads(q, k, v, mask, mask_grad, backend):
    grads = _grad_buffers(q, k, v, mask, mask_grad, backend)
    for g in grads:
        g.zero_()
    return grads


@torch.library.register_fake("vitkern::attention_fwd", lib=_LIB)
def _attention_fwd_fake(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale,
                        is_causal, dropout_p, backend):
    b, h, n, _ = q.shape
    return empty_bhnd(b, h, n, v.shape[3], q), q.new_empty((b, h, n), dtype=lse_dtype(q))


@torch.library.register_fake("vitkern::attention_bwd", lib=_LIB)
def _attention_bwd_fake(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q,
                        max_seqlen_k, scale, is_causal, dropout_p, mask_grad, backend):
    return _grad_buffers(q, k, v, mask, mask_grad, backend)


# ------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    (q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, scale, is_causal, dropout_p, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, scale, is_causal, dropout_p, backend)
    ctx.mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]


def _grads(ctx, dout, bwd):
    # lse is an auxiliary output: its gradient is not propagated (as in flash-attn).
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, scale, is_causal, dropout_p, backend = ctx.args
    dq, dk, dv, dmask = bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, scale, is_causal,
                            dropout_p, ctx.mask_grad, backend)
    if ctx.mask_grad and not dmask.is_contiguous() and not any(s == 0 and n > 1
                                                               for s, n in zip(mask.stride(), mask.shape)):
        # A padded-row buffer (base.dmask_buffer) would reach the caller as it is (a mask that broadcasts gets a
        # fresh sum instead): hand back a plain tensor, as torch's SDPA does.
        dmask = dmask.contiguous()
    return dq, dk, dv, (dmask if ctx.mask_grad else None), None, None, None, None, None, None, None, None, None


def _backward(ctx, dout, dlse):
    return _grads(ctx, dout, attention_bwd)


torch.library.register_autograd("vitkern::attention_fwd", _backward, setup_context=_setup_context, lib=_LIB)


def _fwd_eager(q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, scale, is_causal, dropout_p, backend):
    """_fwd_impl for an untraced call: the backend itself unless autocast or an empty size needs _fwd_impl's
    handling (a tiny call's microseconds are these layers)."""
    if torch._C._is_any_autocast_enabled() or _degenerate(q, k):
        return _fwd_impl(q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, scale, is_causal, dropout_p, backend)
    return backends.get(backend).forward(q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p)


def _bwd_eager(dout, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, scale, is_causal, dropout_p,
               mask_grad, backend):
    """_bwd_impl for an untraced call, as _fwd_eager."""
    if torch._C._is_any_autocast_enabled() or _degenerate(q, k):
        return _bwd_impl(dout, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, scale, is_causal,
                         dropout_p, mask_grad, backend)
    return backends.get(backend).backward(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale,
                                          is_causal, dropout_p, mask_grad)


class _Attention(torch.autograd.Function):
    """The eager path's autograd boundary: the same formula as the op's registered autograd, without the
    custom-op machinery around it."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _fwd_eager(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, _bwd_eager)


# ------------------------------------------------------------------------------------------ autocast
def _autocast_kernel(device_type: str):
    """torch SDPA's autocast policy (lower-precision list): floating inputs other than float64 are cast to the
    autocast dtype, then the op runs with autocast off. (torch.library.register_autocast fixes one dtype.)"""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    excluded = torch._C.DispatchKeySet(key)

    def kernel(keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return attention_fwd(*autocast_args(device_type, args))

    def py_kernel(*args):
        return kernel(None, *args)

    attention_fwd.py_impl(key)(py_kernel)   # the Python dispatcher (tracing) consults py_impl first
    _LIB.impl("attention_fwd", kernel, "Autocast" + torch._C._dispatch_key_for_device(device_type),
              with_keyset=True)


def autocast_args(device_type: str, args) -> tuple:
    """args with their floating tensors (not float64) on ``device_type`` cast to the autocast dtype. The public
    functions call it first (so that selection sees the dtype that runs); the op's autocast kernel for direct
    callers of the op."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
                 and a.device.type == device_type else a for a in args)


for _dev in ("cpu", "cuda"):
    _autocast_kernel(_dev)


# ------------------------------------------------------------------------------------------ the call
def _traced(q: Tensor) -> bool:
    """True when the call is being traced (torch.compile, torch.export, FakeTensor, a dispatch mode, meta
    tensors): then the op, with its fake impl and registered autograd, is what must be seen."""
    return (torch.compiler.is_compiling() or type(q) is not Tensor or q.is_meta
            or torch._C._len_torch_dispatch_stack() > 0)


def attention(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale, is_causal,
              dropout_p, backend):
    """(out, lse) of attention_fwd for the public functions (canonical layout, backend resolved)."""
    if _traced(q):
        return attention_fwd(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale,
                             is_causal, dropout_p, backend)
    return eager_attention(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale,
                           is_causal, dropout_p, backend)


def eager_attention(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale,
                    is_causal, dropout_p, backend):
    """``attention`` for a call known not to be traced (the public functions' cached plans)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (mask is not None and mask.requires_grad)):
        fused = backends.get(backend).forward_with_grad
        if fused is not None and not torch._C._is_any_autocast_enabled() and not _degenerate(q, k):
            mask_grad = mask is not None and mask.requires_grad and mask.is_floating_point()
            return fused(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale,
                         is_causal, dropout_p, mask_grad)
        return _Attention.apply(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale,
                                is_causal, dropout_p, backend)
    return _fwd_eager(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale, is_causal,
                      dropout_p, backend)
