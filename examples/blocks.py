"""The pre-norm transformer block every example model shares, with vitkern's attention inside.

Block.forward takes padded tokens [B, N, C] or packed tokens [T, C] + cu_seqlens (NaViT), like
vitkern.nn.Attention. ``backend`` picks vitkern's backend (None = fastest), or "torch" for torch's SDPA.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vitkern.nn import Attention


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)). [B, N, C] or packed [T, C] -> same shape."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0, drop: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """``depth`` Blocks and a final LayerNorm."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0,
                 drop: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, attn_drop, drop, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        for blk in self.blocks:
            x = blk(x, cu_seqlens, max_seqlen)
        return self.norm(x)


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Point every vitkern module of ``model`` at ``backend`` (e.g. "reference" to check a model, "torch" for
    the baseline). Returns the model."""
    for m in model.modules():
        if hasattr(m, "backend") and isinstance(m, nn.Module) and m is not model:
            m.backend = backend
    return model


def init_weights(model: nn.Module) -> None:
    """ViT-style init: truncated-normal Linear weights (std 0.02), zero biases, unit LayerNorms."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def sincos_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding [h·w, dim] (dim a multiple of 4): half the channels encode the row,
    half the column."""
    if dim % 4:
        raise ValueError(f"dim: expected a multiple of 4 for 2-D sin-cos embeddings, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)
