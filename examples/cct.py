"""CCT, the Compact Convolutional Transformer (Hassani et al.): a convolutional tokenizer (conv + ReLU +
overlapping max-pool) instead of patches, and SeqPool (a learned softmax-weighted average of the tokens)
instead of a cls token. Small enough to train on a CPU."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from blocks import Encoder, init_weights


class ConvTokenizer(nn.Module):
    """[B, C, H, W] -> [B, N, dim] with N = (H/2^layers)·(W/2^layers)."""

    def __init__(self, in_chans: int, dim: int, layers: int = 1, kernel: int = 3):
        super().__init__()
        chans = [in_chans] + [dim // 2] * (layers - 1) + [dim]
        self.layers = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], kernel, padding=kernel // 2, bias=False), nn.ReLU(),
                          nn.MaxPool2d(3, stride=2, padding=1))
            for i in range(layers)])

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images).flatten(2).transpose(1, 2)


class SeqPool(nn.Module):
    """[B, N, dim] -> [B, dim]: softmax over N of a Linear(dim, 1) score, then the weighted sum of the tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = self.score(x).softmax(dim=1)          # [B, N, 1]
        return (w * x).sum(dim=1)


class CCT(nn.Module):
    """images [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, img_size: int = 8, in_chans: int = 1, num_classes: int = 10, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 2.0, conv_layers: int = 1, kernel: int = 3,
                 drop: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        self.tokenizer = ConvTokenizer(in_chans, dim, conv_layers, kernel)
        with torch.no_grad():
            n = self.tokenizer(torch.zeros(1, in_chans, img_size, img_size)).shape[1]
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.encoder = Encoder(dim, depth, num_heads, mlp_ratio, drop=drop, backend=backend)
        self.pool = SeqPool(dim)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self)
        for m in self.tokenizer.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.pool(self.encoder(self.tokenizer(images) + self.pos_embed)))
