"""NaViT machinery for vitkern: pack variable-size images, drop tokens, embed fractional positions, pool per
image, and map per-image results back to the input order.

    batch = pack_images(images, patch_size=16, max_tokens=1024, drop_rate=(0.0, 0.5))
    x = embed(batch.patches) + pos(batch.fractional_positions())       # [T, C]
    x = block(x, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    logits = head(to_input_order(masked_mean_pool(x, batch.cu_seqlens), batch))
"""
from .packing import (PackedBatch, greedy_pack, pack_images, pad_sequences, to_input_order, unpack, unpatchify,
                      with_patches)
from .pooling import AttentionPool, masked_mean_pool
from .pos_embed import FractionalPosEmbed, sincos_1d
from .token_drop import drop_tokens, keep_counts, select_kept

__all__ = ["PackedBatch", "pack_images", "greedy_pack", "unpack", "unpatchify", "to_input_order", "pad_sequences",
           "with_patches", "drop_tokens", "keep_counts", "select_kept", "FractionalPosEmbed", "sincos_1d",
           "masked_mean_pool", "AttentionPool"]
