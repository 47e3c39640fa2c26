"""What a backend implements: one strided forward and one backward over the canonical layout.

Canonical layout (the op layer converts both public layouts to it with views, never copies):
    q    [B, Hq, Nq, D]      any strides (the packed [T, H, D] layout arrives as [1, H, T, D])
    k    [B, Hk, Nk, D]      Hq % Hk == 0 (grouped-query attention when Hk < Hq)
    v    [B, Hk, Nk, Dv]
    mask None, or [B, Hq, Nq, Nk] bool (True = takes part) or float (added to the scores); usually an
         expanded view with zero strides
    cu_q, cu_k   None, or int32/int64 [S + 1] (then B == 1 and mask is None): query tokens of sequence s
         attend only to key tokens of sequence s
    max_q, max_k hints (-1 = unknown) for the longest sequence
    seed None, or an int64 [1] CPU tensor: dropout seed (see vitkern/dropout.py)

forward  -> out [B, Hq, Nq, Dv] laid out as ``empty_bhnd`` makes it, lse [B, Hq, Nq] float32, float64 for float64 inputs (-inf: no key, NaN: a NaN score)
backward -> dq, dk, dv laid out by ``empty_bhnd`` like q, k, v; dmask [B, Hq, Nq, Nk] when mask_grad (laid
            out by ``dmask_buffer`` with the backend's ``pads_dmask_rows``), else an empty tensor. It must use
            the ``out`` and ``lse`` it is given (P = exp(s - lse), delta = rowsum(dout * out)), never recompute
            them: a caller may pass values merged over calls.
A query row with no key left gives out = 0, lse = -inf and zero gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def empty_bhnd(b: int, h: int, n: int, d: int, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialized [b, h, n, d] tensor stored as [b, n, h, d] (what a ViT's output projection reads, and
    what makes the packed layout's outputs plain contiguous [T, H, D])."""
    return torch.empty(b, n, h, d, dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


def dmask_buffer(b: int, h: int, nq: int, nk: int, like: Tensor, padded: bool) -> Tensor:
    """A zeroed [b, h, nq, nk] tensor of like's dtype for the mask's gradient; ``padded``: its rows padded to a
    multiple of 16 bytes (a view of the first nk columns), so that a GPU kernel can store it in TMA tiles."""
    if not padded:
        return like.new_zeros((b, h, nq, nk))
    per_16_bytes = max(1, 16 // like.element_size())
    return like.new_zeros((b, h, nq, -(-nk // per_16_bytes) * per_16_bytes))[..., :nk]


class Backend:
    """Base class of a backend; subclasses set ``name`` and override the methods."""

    name: str = ""
    # Whether backward's dmask comes with rows padded to 16 bytes (dmask_buffer); the op layer's fake tensors and
    # empty-input path lay it out the same way.
    pads_dmask_rows: bool = False

    def available(self) -> bool:
        """Whether this install can run the backend at all."""
        raise NotImplementedError

    def unavailable_reason(self) -> str:
        return f"backend {self.name!r} is not available in this install"

    def unsupported_reason(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                           cu_seqlens_q: Optional[Tensor], dropout_p: float) -> Optional[str]:
        """None when the backend can take these (canonical-layout) inputs, else a sentence saying why not."""
        raise NotImplementedError

    def forward(self, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                 dropout_p, mask_grad):
        raise NotImplementedError

    # Optional: forward with the autograd node built by the backend itself (same arguments as forward, plus
    # mask_grad; returns (out, lse), out differentiable). The eager path uses it instead of ops._Attention,
    # the Python boundary, when a backend has one.
    forward_with_grad = None
    # Optional: the varlen forward on packed [T, H, D] tensors without autograd:
    # (q, k, v, cu_q, cu_k, seed, scale, is_causal, dropout_p) -> (out [T, H, Dv], lse [H, T]).
    varlen_forward = None
