"""NaViT's token dropping: keep a random subset of each image's patches, at a fixed or sampled rate per image.

Vectorized over all tokens: one random key per token, a sort by (image, key), and a rank threshold per image.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from ..errors import VitkernValueError


def keep_counts(lengths: Tensor, drop_rate, generator: Optional[torch.Generator] = None) -> Tensor:
    """int64 [I] tokens kept per image: round(n_i · (1 − r_i)), at least 1 (at most n_i).

    lengths: int64 [I]. drop_rate: float in [0, 1), a sequence/tensor [I] of such floats, or (low, high) with
    0 <= low <= high < 1 to sample r_i ~ U(low, high) per image (from ``generator``).
    """
    n = lengths.numel()
    if isinstance(drop_rate, tuple):
        if len(drop_rate) != 2 or not 0.0 <= drop_rate[0] <= drop_rate[1] < 1.0:
            raise VitkernValueError(f"drop_rate: expected (low, high) with 0 <= low <= high < 1, got {drop_rate!r}")
        low, high = drop_rate
        rates = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
    elif isinstance(drop_rate, (float, int)) and not isinstance(drop_rate, bool):
        rates = torch.full((n,), float(drop_rate), dtype=torch.float64)
    else:
        rates = torch.as_tensor(drop_rate, dtype=torch.float64).cpu()
        if rates.shape != (n,):
            raise VitkernValueError(f"drop_rate: expected a float, a (low, high) tuple or {n} per-image rates, got shape "
                                    f"{tuple(rates.shape)}")
    bad = ~((rates >= 0) & (rates < 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise VitkernValueError(f"drop_rate: expected rates in [0, 1), got {float(rates[i])} for images[{i}]")
    kept = torch.round(lengths.cpu().to(torch.float64) * (1.0 - rates)).to(torch.int64)
    return torch.minimum(kept.clamp(min=1), lengths.cpu())


def select_kept(lengths: Tensor, kept: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """int64 indices (ascending) of the tokens to keep: a uniformly random ``kept[i]`` of image i's ``lengths[i]``
    tokens, images laid out back to back. lengths, kept: int64 [I]."""
    total = int(lengths.sum())
    seg = torch.arange(lengths.numel()).repeat_interleave(lengths.cpu())
    key = seg.to(torch.float64) + torch.rand(total, generator=generator, dtype=torch.float64)
    sorted_idx = key.argsort()
    starts = torch.cumsum(lengths.cpu(), 0) - lengths.cpu()
    rank_sorted = torch.arange(total) - starts[seg]      # seg is ascending, so seg == seg[sorted_idx]
    keep_sorted = rank_sorted < kept.cpu()[seg]
    return sorted_idx[keep_sorted].sort().values


def drop_tokens(batch, drop_rate, generator: Optional[torch.Generator] = None):
    """Drop tokens from an already packed ``PackedBatch`` (per-image rates as in ``keep_counts``); returns a new
    PackedBatch with the same images and sequences and fewer tokens per image. Rates index input images."""
    from dataclasses import replace

    from ..cu_seqlens import lengths_to_cu_seqlens

    lengths = batch.lengths.cpu()
    if isinstance(drop_rate, (float, int, tuple)) and not isinstance(drop_rate, bool):
        kept = keep_counts(lengths, drop_rate, generator)
    else:
        rates = torch.as_tensor(drop_rate, dtype=torch.float64).cpu()
        if rates.shape != (batch.num_images,):
            raise VitkernValueError(f"drop_rate: expected a float, a (low, high) tuple or {batch.num_images} per-image "
                                    f"rates, got shape {tuple(rates.shape)}")
        kept = keep_counts(lengths, rates[batch.order.cpu()], generator)
    keep = select_kept(lengths, kept, generator).to(batch.patches.device)
    return replace(batch, patches=batch.patches[keep], image_ids=batch.image_ids[keep],
                   positions=batch.positions[keep],
                   cu_seqlens=lengths_to_cu_seqlens(kept, device=batch.cu_seqlens.device),
                   max_seqlen=int(kept.max()))
