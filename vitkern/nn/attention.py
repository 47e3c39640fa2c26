"""``vitkern.nn.Attention``: timm's self-attention module, computed by vitkern.

The constructor arguments, parameter names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``) and
attributes (``num_heads``, ``head_dim``, ``attn_dim``, ``scale``) are timm's, so a timm state dict loads
unchanged. On top of timm's padded ``[B, N, C]`` input it takes packed ``[T, C]`` tokens with ``cu_seqlens``
(NaViT's block-diagonal batches) without ever building the mask.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import scaled_dot_product_attention, varlen_attention
from ..errors import VitkernTypeError, VitkernValueError

# "torch" is not a vitkern backend: it routes to torch's own SDPA (a dense block-diagonal mask for packed input),
# the baseline the benchmarks compare against.
TORCH_BASELINE = "torch"


def _block_diagonal_mask(cu_seqlens: Tensor, total: int) -> Tensor:
    """Bool [T, T]: token i may attend to token j iff both lie in the same cu_seqlens segment."""
    pos = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)
    return seg[:, None] == seg[None, :]


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, *,
              cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None, scale: Optional[float] = None,
              dropout_p: float = 0.0, is_causal: bool = False, backend: Optional[str] = None) -> Tensor:
    """Self-attention in either layout, routed to vitkern (or to torch SDPA with ``backend="torch"``).

    Padded: q, k, v [B, H, N, D] (+ optional mask broadcasting to [B, H, N, N]) -> [B, H, N, D].
    Packed: q, k, v [T, H, D] with cu_seqlens [S + 1] -> [T, H, D].
    """
    if cu_seqlens is None:
        if backend == TORCH_BASELINE:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale)
        return scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                            scale=scale, backend=backend)
    if backend == TORCH_BASELINE:
        if is_causal:
            raise VitkernValueError("backend='torch': the packed baseline has no causal mode; use a vitkern backend")
        mask = _block_diagonal_mask(cu_seqlens, q.shape[0])
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out.transpose(0, 1)
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, scale=scale,
                            dropout_p=dropout_p, is_causal=is_causal, backend=backend)


class Attention(nn.Module):
    """Multi-head self-attention with timm's constructor, parameter names and forward, computed by vitkern.

    Args mirror ``timm.layers.Attention``: dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm, scale_norm,
    proj_bias, gated, attn_drop (its p is the attention dropout in training), proj_drop, norm_layer, device,
    dtype. ``backend``: a vitkern backend name, None (fastest available) or "torch" (torch SDPA, for baselines).
    """

    fused_attn = True  # timm code reads this flag; vitkern always runs fused

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: Optional[type] = None, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise VitkernValueError(f"num_heads: expected a positive int, got {num_heads!r}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise VitkernValueError(f"dim: expected a multiple of num_heads={num_heads} (or pass attn_head_dim), "
                                        f"got {dim}")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise VitkernValueError("norm_layer: required when qk_norm or scale_norm is True, got None")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module: nn.Module, backend: Optional[str] = None) -> "Attention":
        """A vitkern Attention that takes over ``module``'s submodules (a ``timm.layers.Attention``): the same
        Parameter objects, so optimizers, hooks on the children and tied weights keep working."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("num_heads", "head_dim", "attn_dim", "scale"):
            setattr(new, attr, getattr(module, attr))
        new.backend = backend
        if getattr(module, "gate", None) is None:
            new.gate = None
        missing = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"} - set(module._modules)
        if missing:
            raise VitkernTypeError(f"module: expected a timm Attention with submodules qkv, q_norm, k_norm, attn_drop, "
                                   f"norm, proj, proj_drop; {type(module).__name__} lacks {sorted(missing)}")
        for name, child in module._modules.items():  # timm's registration order, so state-dict order too
            setattr(new, name, child)
        new.train(module.training)
        return new

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, *, is_causal: bool = False) -> Tensor:
        """x [B, N, C] (attn_mask broadcasting to [B, H, N, N], bool True = attend or float added to the
        scores) or packed x [T, C] with cu_seqlens [S + 1] (tokens attend within their segment only).
        Returns [B, N, dim_out] or [T, dim_out]."""
        if not isinstance(x, Tensor):
            raise VitkernTypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        packed = cu_seqlens is not None
        if x.dim() != (2 if packed else 3):
            want = "[T, C] (packed, since cu_seqlens was given)" if packed else "[B, N, C]"
            raise VitkernValueError(f"x: expected {want}, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.qkv.in_features:
            raise VitkernValueError(f"x: expected {self.qkv.in_features} channels in the last dim, got {x.shape[-1]}")
        if packed and attn_mask is not None:
            raise VitkernValueError("attn_mask: must be None with cu_seqlens (the segments are the mask), got a tensor")
        lead = x.shape[:-1]
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(*lead, 3, self.num_heads, self.head_dim)
        if packed:
            q, k, v = qkv.unbind(-3)                      # [T, H, D] each
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] each
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, attn_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=self.scale,
                        dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal,
                        backend=self.backend)
        if not packed:
            out = out.transpose(1, 2)
        out = self.norm(out.reshape(*lead, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"
