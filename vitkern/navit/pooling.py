"""Per-image pooling of packed tokens: masked mean, and attention pooling with one learned query per image.

Both work on the packed layout directly (no padding, no mask): the mean with one index_add, the attention
pool with varlen cross-attention where query segment i is one token and key segment i is image i's tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..api import varlen_attention
from ..errors import VitkernValueError


def _check_packed(x: Tensor, cu_seqlens: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise VitkernValueError(f"x: expected a packed [T, C] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise VitkernValueError("cu_seqlens: expected a 1-D integer tensor [I + 1]")
    if cu_seqlens.numel() < 1 or int(cu_seqlens[-1]) != x.shape[0]:
        raise VitkernValueError(f"cu_seqlens: expected the last entry to equal x's token count {x.shape[0]}, got "
                                f"{cu_seqlens.tolist()[-1:]}")


def masked_mean_pool(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Mean of each segment's tokens: x [T, C], cu_seqlens [I + 1] -> [I, C] (0 for an empty segment)."""
    _check_packed(x, cu_seqlens)
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths, output_size=x.shape[0])
    sums = x.new_zeros(lengths.numel(), x.shape[1]).index_add(0, seg, x)
    return sums / lengths.clamp(min=1).to(x.dtype)[:, None]


class AttentionPool(nn.Module):
    """Attention pooling (one learned query per image, MAP-style): x [T, C] packed with cu_seqlens [I + 1]
    -> [I, C]. The query attends only to its own image's tokens (varlen cross-attention, cu_seqlens_q =
    0, 1, ..., I). An empty image pools to proj's bias (its attention output is 0)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, *, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise VitkernValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.query = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int] = None) -> Tensor:
        _check_packed(x, cu_seqlens)
        images = cu_seqlens.numel() - 1
        h, d = self.num_heads, self.head_dim
        q = self.q(self.query).reshape(1, h, d).expand(images, h, d)
        k, v = self.kv(x).reshape(x.shape[0], 2, h, d).unbind(1)
        cu_q = torch.arange(images + 1, dtype=cu_seqlens.dtype, device=x.device)
        out = varlen_attention(q, k, v, cu_q, cu_seqlens, max_seqlen_q=1, max_seqlen_k=max_seqlen,
                               backend=self.backend)
        return self.proj(out.reshape(images, h * d))
