"""PiT, the Pixel Transformer (Nguyen et al., "An Image is Worth More Than 16x16 Patches"): every pixel is a
token (patch size 1), with a 2-D sin-cos, a learned, or no position embedding. The sequence is H·W + 1 tokens,
which is what makes a fused O(N)-memory attention matter (50,176 tokens at 224²)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from blocks import Encoder, init_weights, sincos_2d


class PiT(nn.Module):
    """images [B, C, H, W] (H = W = img_size) -> logits [B, num_classes]; pos_embed in {"sincos", "learned",
    "none"} ("none" makes the model a set model: permuting the pixels does not change the output)."""

    def __init__(self, img_size: int = 8, in_chans: int = 1, num_classes: int = 10, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 2.0, pos_embed: str = "sincos", drop: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        if pos_embed not in ("sincos", "learned", "none"):
            raise ValueError(f"pos_embed: expected 'sincos', 'learned' or 'none', got {pos_embed!r}")
        self.pixel_embed = nn.Linear(in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        n = img_size * img_size
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        else:
            self.register_buffer("pos_embed", sincos_2d(img_size, img_size, dim)[None] if pos_embed == "sincos"
                                 else torch.zeros(1, n, dim), persistent=False)
        self.encoder = Encoder(dim, depth, num_heads, mlp_ratio, drop=drop, backend=backend)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self)
        # A token is one pixel (a scalar per channel): at the ViT init (std 0.02) its embedding would be drowned
        # by the unit-scale sin-cos positions and training stalls at chance, so start it at unit scale too.
        nn.init.normal_(self.pixel_embed.weight, std=1.0)

    def forward(self, images: Tensor) -> Tensor:
        x = self.pixel_embed(images.flatten(2).transpose(1, 2)) + self.pos_embed     # [B, H·W, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.head(self.encoder(x)[:, 0])
