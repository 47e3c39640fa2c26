"""The public functions: an SDPA-compatible one and a flash-attn-style packed (varlen) one.

Both validate, reshape to the canonical layout with views (backends/base.py), pick a backend, and call the
custom op in ops.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends, checks
from . import dropout as _dropout
from .errors import VitkernTypeError, VitkernValueError
from .ops import attention, autocast_args, eager_attention


def _seed(dropout_p: float) -> Optional[Tensor]:
    return _dropout.new_seed() if dropout_p > 0 else None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    query [..., Hq, Nq, D], key [..., Hk, Nk, D], value [..., Hk, Nk, Dv] -> [..., Hq, Nq, Dv].
    Leading dims broadcast; with ``enable_gqa`` Hq must be a multiple of Hk. ``attn_mask`` broadcasts to
    [..., Hq, Nq, Nk]: bool (True = takes part) or float (added to the scores). ``is_causal`` keeps key j <= query
    i (top-left aligned, as torch); it may be combined with a mask. A query with no key left gives 0, not NaN.
    ``backend``: None (fastest that can serve), or a name from ``available_backends()``.
    Under ``torch.autocast`` floating inputs (not float64) run in the autocast dtype, as torch's SDPA does.
    """
    sig = _sdpa_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    plan = _PLANS.get(sig) if sig is not None else None
    call = eager_attention      # a cached plan means an eager call (see _PLANS)
    if plan is None:
        if isinstance(query, Tensor) and torch.is_autocast_enabled(query.device.type):
            query, key, value, attn_mask = autocast_args(query.device.type, (query, key, value, attn_mask))
        plan = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
        if sig is not None and not query.is_meta:
            _remember(sig, plan)
        else:
            call = attention
    q_view, k_view, v_view, mask_view, out_shape, scale, name, zero_dims = plan
    # (the views inline: at a tiny size each Python call is a few percent of the call)
    q4 = query if q_view is None else _view(query, q_view)
    k4 = key if k_view is None else _view(key, k_view)
    v4 = value if v_view is None else _view(value, v_view)
    if zero_dims:
        q4, k4, v4 = _nonzero_head_dims(q4, k4, v4)
    out, _ = call(q4, k4, v4, attn_mask if mask_view is None else _view(attn_mask, mask_view), None, None,
                       _dropout.new_seed() if dropout_p > 0 else None, -1, -1, scale, is_causal, float(dropout_p),
                       name)
    if zero_dims and value.shape[-1] == 0:
        out = out[..., :0]  # [B, Hq, Nq, 0] keeps its layout
    return out if out_shape is None else out.reshape(out_shape)


# The eager path's cache: what validation, layout and backend selection decide depends only on a call's
# signature (shapes, dtypes, devices, flags), so a repeated signature skips them. Only plain, untraced calls
# with plain-typed flags are cached (a traced call must see the checks; True and 1 hash alike): no tracing,
# no dispatch mode, no autocast, no meta tensors. A plan's presence therefore means "eager".
_PLANS: dict = {}
_MAX_PLANS = 1024


def _remember(sig: tuple, plan: tuple) -> None:
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[sig] = plan


def _sdpa_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
    """The plan cache's key of an SDPA call, or None when the call is not cached (traced, autocast, odd types)."""
    if not (type(query) is Tensor and type(key) is Tensor and type(value) is Tensor
            and (is_causal is False or is_causal is True) and (enable_gqa is False or enable_gqa is True)
            and type(dropout_p) is float and (scale is None or type(scale) is float)
            and (backend is None or type(backend) is str) and not torch.compiler.is_compiling()
            and not torch._C._is_any_autocast_enabled() and not torch._C._len_torch_dispatch_stack()):
        return None
    if attn_mask is None:
        mask_sig = None
    elif type(attn_mask) is Tensor:
        mask_sig = (attn_mask.shape, attn_mask.dtype, attn_mask.device)
    else:
        return None
    return (query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device, key.device,
            value.device, mask_sig, dropout_p, is_causal, scale, enable_gqa, backend)


def _view(x, view):
    """x broadcast to ``full`` and viewed as the 4-D ``shape`` of view = (full, shape); None: x as it is."""
    return x if view is None else x.expand(*view[0]).reshape(view[1])


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend) -> tuple:
    """Validate an SDPA call and decide it: (q/k/v/mask views to the canonical layout, output shape, scale,
    backend name, head dims of 0). Depends only on what _sdpa_signature keys on."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        checks.tensor(name, x, min_ndim=2)
    checks.qkv_dtypes_devices(query, key, value)
    checks.head_dims(query, key, value, n_axis=-2)
    checks.scalar_args(dropout_p, scale, is_causal)
    nq, d, nk, dv = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    if key.shape[:-2] != value.shape[:-2]:
        raise VitkernValueError(f"value: expected batch/head dims {tuple(key.shape[:-2])} (the key's), got "
                                f"{tuple(value.shape[:-2])}")
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        hq, hk = query.shape[-3], key.shape[-3]
        if hq % hk:
            raise VitkernValueError(f"key: with enable_gqa the query heads ({hq}) must be a multiple of the key heads, "
                                    f"got {hk}")
        lead = _broadcast("query/key", query.shape[:-3], key.shape[:-3])
        q_lead, kv_lead = lead + (hq,), lead + (hk,)
    else:
        q_lead = kv_lead = _broadcast("query/key/value", query.shape[:-2], key.shape[:-2])
    b = math.prod(q_lead[:-1])  # (no int(): sizes may be symbolic under torch.export)
    hq = q_lead[-1] if q_lead else 1
    hk = kv_lead[-1] if kv_lead else 1
    views = [_canonical(query, (*q_lead, nq, d), (b, hq, nq, d)), _canonical(key, (*kv_lead, nk, d), (b, hk, nk, d)),
             _canonical(value, (*kv_lead, nk, dv), (b, hk, nk, dv)), None]
    if attn_mask is not None:
        checks.attn_mask(attn_mask, query, tuple(q_lead) + (nq, nk))
        views[3] = _canonical(attn_mask, (*q_lead, nq, nk), (b, hq, nq, nk))
    scale = (1.0 / math.sqrt(d) if d else 1.0) if scale is None else float(scale)
    q4, k4, v4, mask4 = (_view(x, vw) for x, vw in zip((query, key, value, attn_mask), views))
    zero_dims = d == 0 or dv == 0
    if zero_dims:
        q4, k4, v4 = _nonzero_head_dims(q4, k4, v4)
    name = backends.select(backend, q4, k4, v4, mask4, None, dropout_p)
    out_shape = None if len(q_lead) == 2 else (*q_lead, nq, dv)
    return (*views, out_shape, scale, name, zero_dims)


def _nonzero_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Head dims of 0 as torch's SDPA reads them: D = 0 makes every score 0 (uniform weights over the allowed
    keys), Dv = 0 an empty output. Both become a head dim of 1 filled with zeros -- a sum over the empty dim, so
    autograd still reaches the inputs -- and the caller slices the output back to Dv."""
    if q.shape[-1] == 0:
        q, k = q.sum(-1, keepdim=True), k.sum(-1, keepdim=True)
    if v.shape[-1] == 0:
        v = v.sum(-1, keepdim=True)
    return q, k, v




def _canonical(x: Tensor, full: tuple, shape: tuple) -> Optional[tuple]:
    """How x becomes the 4-D ``shape``: None when it already has it (expand and reshape cost ~3 us each, per
    call), else (full, shape): broadcast to ``full``, then viewed as ``shape``."""
    if x.shape == shape:
        return None
    return full, shape


def _broadcast(what: str, *shapes) -> tuple:
    if all(s == shapes[0] for s in shapes[1:]):  # the common case, without torch.broadcast_shapes' ~25 us
        return tuple(shapes[0])
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise VitkernValueError(f"{what}: expected batch/head dims that broadcast together, got "
                                f"{', '.join(str(tuple(s)) for s in shapes)}") from None


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor] = None,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *,
                     scale: Optional[float] = None, dropout_p: float = 0.0, is_causal: bool = False,
                     return_lse: bool = False, backend: Optional[str] = None):
    """Attention over packed sequences (flash-attn's varlen layout); the block-diagonal mask is never built.

    q [Tq, H, D], k [Tk, Hk, D], v [Tk, Hk, Dv] (H a multiple of Hk); cu_seqlens_q / cu_seqlens_k int32/int64
    [S + 1] (0, ..., T; zero-length sequences allowed; cu_seqlens_k=None means cu_seqlens_q). Query tokens of
    sequence s attend only to key tokens of sequence s; ``is_causal`` is top-left aligned within each sequence.
    ``max_seqlen_*`` are optional hints (no device sync is needed without them).
    Returns out [Tq, H, Dv], and with ``return_lse`` also lse [H, Tq], float32 (float64 for float64 inputs; -inf
    for a query with no key, NaN for one that reads a NaN score).
    Under ``torch.autocast`` floating inputs (not float64) run in the autocast dtype, as torch's SDPA does.
    """
    sig = _varlen_signature(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p,
                            is_causal, return_lse, backend)
    plan = _PLANS.get(sig) if sig is not None else None
    call = eager_attention
    if plan is None:
        if isinstance(q, Tensor) and torch.is_autocast_enabled(q.device.type):
            q, k, v = autocast_args(q.device.type, (q, k, v))
        plan = _varlen_plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p,
                            is_causal, return_lse, backend)
        if sig is not None and not q.is_meta:
            _remember(sig, plan)
        else:
            call = attention
    else:  # the values of cu_seqlens are checked per call (cheap when the tensor was checked before)
        checks.cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        if cu_seqlens_k is not None:
            checks.cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0])
        if max_seqlen_q is not None or max_seqlen_k is not None:
            checks.max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
            checks.max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k)
    scale, name, zero_dims = plan
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    if call is eager_attention and not zero_dims and not (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)) and q.shape[0] and k.shape[0]:
        packed = backends.get(name).varlen_forward  # views made by the backend (a tiny call's microseconds)
        if packed is not None:
            out, lse = packed(q, k, v, cu_seqlens_q, cu_seqlens_k, _seed(dropout_p), scale, is_causal,
                              float(dropout_p))
            return (out, lse) if return_lse else out
    # [T, H, D] viewed as [1, H, T, D]: the kernels see one batch whose blocks cu_seqlens delimits.
    q4, k4, v4 = q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2)
    if zero_dims:
        q4, k4, v4 = _nonzero_head_dims(q4, k4, v4)
    out, lse = call(q4, k4, v4, None, cu_seqlens_q, cu_seqlens_k, _seed(dropout_p),
                         -1 if max_seqlen_q is None else max_seqlen_q, -1 if max_seqlen_k is None else max_seqlen_k,
                         scale, is_causal, float(dropout_p), name)
    out = out[0].transpose(0, 1) if not zero_dims else out[0, ..., :v.shape[-1]].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def _varlen_signature(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout_p, is_causal, return_lse, backend):
    """The plan cache's key of a varlen call (shapes, not the values of cu_seqlens), or None (see
    _sdpa_signature)."""
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and type(cu_q) is Tensor
            and (cu_k is None or type(cu_k) is Tensor) and (max_q is None or type(max_q) is int)
            and (max_k is None or type(max_k) is int) and (is_causal is False or is_causal is True)
            and (return_lse is False or return_lse is True) and type(dropout_p) is float
            and (scale is None or type(scale) is float) and (backend is None or type(backend) is str)
            and not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled()
            and not torch._C._len_torch_dispatch_stack()):
        return None
    cu_k_sig = None if cu_k is None else (cu_k.shape, cu_k.dtype, cu_k.device)
    return ("varlen", q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            cu_q.shape, cu_q.dtype, cu_q.device, cu_k_sig, max_q is None, max_k is None, scale, dropout_p,
            is_causal, return_lse, backend)


def _varlen_plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, is_causal,
                 return_lse, backend) -> tuple:
    """Validate a varlen call and decide it: (scale, backend name, head dims of 0). Depends only on what
    _varlen_signature keys on, and on the values of cu_seqlens, which it checks too."""
    checks.tensor("q", q, ndim=3)
    checks.tensor("k", k, ndim=3)
    checks.tensor("v", v, ndim=3)
    if torch.is_autocast_enabled(q.device.type):
        q, k, v = autocast_args(q.device.type, (q, k, v))
    checks.qkv_dtypes_devices(q, k, v)
    checks.head_dims(q, k, v, n_axis=0)
    if k.shape[1] != v.shape[1]:
        raise VitkernValueError(f"v: expected {k.shape[1]} heads (the key's), got {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise VitkernValueError(f"k: expected a head count dividing the query's {q.shape[1]}, got {k.shape[1]}")
    checks.scalar_args(dropout_p, scale, is_causal)
    checks.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise VitkernValueError(f"cu_seqlens_k: needed when k has a different token count ({k.shape[0]}) than q "
                                    f"({q.shape[0]})")
        cu_seqlens_k = cu_seqlens_q
    else:
        checks.cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise VitkernValueError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} entries (as cu_seqlens_q), got "
                                    f"{cu_seqlens_k.numel()}")
    checks.max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
    checks.max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
    if not isinstance(return_lse, bool):
        raise VitkernTypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    d, dv = q.shape[-1], v.shape[-1]
    scale = (1.0 / math.sqrt(d) if d else 1.0) if scale is None else float(scale)
    q4, k4, v4 = [x.unsqueeze(0).transpose(1, 2) for x in (q, k, v)]
    zero_dims = d == 0 or dv == 0
    if zero_dims:
        q4, k4, v4 = _nonzero_head_dims(q4, k4, v4)
    return scale, backends.select(backend, q4, k4, v4, None, cu_seqlens_q, dropout_p), zero_dims
