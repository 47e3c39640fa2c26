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
backward -> dq, dk, dv laid out by ``empty_bhnd`` like q, k, v; dmask [B, Hq, Nq, Nk] when mask_grad,
            else an empty tensor. It must use the ``out`` and ``lse`` it is given (P = exp(s - lse),
            delta = rowsum(dout * out)), never recompute them: a caller may pass values merged over calls.
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


class Backend:
    """Base class of a backend; subclasses set ``name`` and override the methods."""

    name: str = ""

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
