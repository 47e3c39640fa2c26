"""NaViT (Dehghani et al., "Patch n' Pack"): images at their native resolutions and aspect ratios, packed into
one token sequence; attention is block-diagonal per image (vitkern's varlen kernels, no mask built); factorized
fractional position embeddings; token dropping in training; per-image pooling."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from blocks import Encoder, init_weights
from vitkern.navit import AttentionPool, FractionalPosEmbed, PackedBatch, masked_mean_pool, pack_images, \
    to_input_order


class NaViT(nn.Module):
    """images: list of [C, H_i, W_i] (sides multiples of patch_size) -> logits [len(images), num_classes].

    token_drop: drop rate in training (float or (low, high) sampled per image); pos_embed "learned"/"sincos";
    pool "mean"/"attn". ``forward_packed`` takes an already packed batch (logits in packed order).
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 1, num_classes: int = 10, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 2.0, max_tokens: int = 256, token_drop=0.0,
                 pos_embed: str = "learned", pool: str = "mean", drop: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        if pool not in ("mean", "attn"):
            raise ValueError(f"pool: expected 'mean' or 'attn', got {pool!r}")
        self.patch_size, self.max_tokens, self.token_drop = patch_size, max_tokens, token_drop
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, dim)
        self.pos_embed = FractionalPosEmbed(dim, kind=pos_embed, num_buckets=16)
        self.encoder = Encoder(dim, depth, num_heads, mlp_ratio, drop=drop, backend=backend)
        self.attn_pool = AttentionPool(dim, num_heads, backend=backend) if pool == "attn" else None
        self.head = nn.Linear(dim, num_classes)
        init_weights(self)
        # Unit-scale patch embeddings (raw pixels in, unlike a conv stem): at std 0.02 they start far below the
        # position embeddings and training on small data is markedly slower.
        nn.init.normal_(self.patch_embed.weight, std=self.patch_embed.in_features ** -0.5)

    def pack(self, images: Sequence[Tensor]) -> PackedBatch:
        drop = self.token_drop if self.training and self.token_drop else None
        return pack_images(list(images), self.patch_size, self.max_tokens, drop_rate=drop)

    def forward_packed(self, batch: PackedBatch) -> Tensor:
        x = self.patch_embed(batch.patches) + self.pos_embed(batch.fractional_positions())      # [T, D]
        x = self.encoder(x, batch.cu_seqlens, batch.max_seqlen)
        if self.attn_pool is not None:
            pooled = self.attn_pool(x, batch.cu_seqlens, batch.max_seqlen)
        else:
            pooled = masked_mean_pool(x, batch.cu_seqlens)                                      # [I, D]
        return self.head(pooled)

    def forward(self, images: Sequence[Tensor]) -> Tensor:
        batch = self.pack(images)
        return to_input_order(self.forward_packed(batch), batch)
