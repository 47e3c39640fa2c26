"""``SequenceParallelAttention``: a ViT self-attention layer whose tokens are split across ranks."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .attention import sequence_parallel_attention
from ..errors import VitkernValueError


class SequenceParallelAttention(nn.Module):
    """Multi-head self-attention (qkv projection, attention, output projection) on this rank's shard of a
    token sequence; the attention itself sees every token of every rank (``sequence_parallel_attention``).

    forward(x_local [T_r, C], cu_seqlens=None, shard_sizes=None) -> [T_r, C]. ``cu_seqlens``: global
    boundaries [S + 1] of packed sequences over all ranks' tokens (the same on every rank), or None for one
    sequence. ``shard_sizes``: see ``sequence_parallel_attention`` (pass it to skip the per-call exchange).
    The weights are replicated: sum their gradients over the group with ``all_reduce_gradients`` after backward.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, group=None, mode: str = "allgather_kv",
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise VitkernValueError(f"dim/num_heads: expected positive ints with dim divisible by num_heads, got "
                                    f"dim={dim!r}, num_heads={num_heads!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.group, self.mode, self.backend = group, mode, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_local: Tensor, cu_seqlens: Optional[Tensor] = None, shard_sizes=None) -> Tensor:
        if not isinstance(x_local, Tensor) or x_local.dim() != 2:
            raise VitkernValueError(f"x_local: expected a 2-D tensor [T_local, C], got "
                                    f"{tuple(x_local.shape) if isinstance(x_local, Tensor) else type(x_local).__name__}")
        t = x_local.shape[0]
        q, k, v = self.qkv(x_local).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        out = sequence_parallel_attention(q, k, v, group=self.group, cu_seqlens=cu_seqlens, mode=self.mode,
                                          backend=self.backend, shard_sizes=shard_sizes)
        return self.proj(out.reshape(t, -1))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, mode={self.mode!r}"
