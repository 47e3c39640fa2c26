"""ViT (Dosovitskiy et al.): patches -> linear embedding + cls token + learned 1-D positions -> encoder -> cls."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from blocks import Encoder, init_weights


class ViT(nn.Module):
    """images [B, C, H, W] (H = W = img_size) -> logits [B, num_classes]. Tokens: (img_size/patch_size)² + 1."""

    def __init__(self, img_size: int = 8, patch_size: int = 2, in_chans: int = 1, num_classes: int = 10,
                 dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, drop: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch_size: expected a divisor of img_size={img_size}, got {patch_size}")
        n = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.encoder = Encoder(dim, depth, num_heads, mlp_ratio, drop=drop, backend=backend)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)             # [B, N, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.head(self.encoder(x)[:, 0])
