"""Per-tile summary of a dense attention mask, computed on the device with torch ops (no host sync).

A mask reaches the backend as a [B, Hq, Nq, Nk] view whose broadcast dims have stride 0 (a key-padding mask
[B, 1, 1, Nk], one [Nq, Nk] mask shared by all heads, ...). The summary is computed once on the distinct slice
(broadcast dims narrowed to 1), then expanded back with stride-0 views, so its cost is that of reading the
distinct mask once, never B * Hq times.

For tiles of block_m x block_n it gives:
    state   int8 [B, Hq, MT, NT]: TILE_EMPTY (skip the tile), TILE_FULL (everything takes part with a zero bias:
            no mask load), TILE_PARTIAL (load the mask)
    row_lo, row_hi  int32 [B, Hq, MT]: the key tiles a query tile has to visit, [lo, hi)
    col_lo, col_hi  int32 [B, Hq, NT]: the query tiles a key tile has to visit (backward dK/dV)
The ranges make a block-diagonal mask (NaViT's packed images, built from segment ids) visit only the tiles
near the diagonal, as the varlen path does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TILE_EMPTY, TILE_FULL, TILE_PARTIAL = 0, 1, 2


@dataclass
class TileSummary:
    state: Tensor
    row_lo: Tensor
    row_hi: Tensor
    col_lo: Tensor
    col_hi: Tensor


def _distinct_slice(mask: Tensor) -> Tensor:
    idx = tuple(slice(0, 1) if mask.stride(i) == 0 and mask.shape[i] > 1 else slice(None) for i in range(4))
    return mask[idx]


def _tiles(x: Tensor, block_m: int, block_n: int, pad_value: bool) -> Tensor:
    """x bool [b, h, nq, nk] -> bool [b, h, MT, block_m, NT, block_n], padded with pad_value."""
    b, h, nq, nk = x.shape
    mt, nt = math.ceil(nq / block_m), math.ceil(nk / block_n)
    if mt * block_m != nq or nt * block_n != nk:
        padded = torch.full((b, h, mt * block_m, nt * block_n), pad_value, dtype=torch.bool, device=x.device)
        padded[:, :, :nq, :nk] = x
        x = padded
    return x.reshape(b, h, mt, block_m, nt, block_n)


def _first_last(any_ok: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """First and one-past-last index along ``dim`` where any_ok is True; (n, 0) when none."""
    n = any_ok.shape[dim]
    shape = [1] * any_ok.dim()
    shape[dim] = n
    idx = torch.arange(n, device=any_ok.device, dtype=torch.int32).view(shape)
    lo = torch.where(any_ok, idx, n).amin(dim)
    hi = torch.where(any_ok, idx + 1, 0).amax(dim)
    return lo.to(torch.int32), hi.to(torch.int32)


def tile_summary(mask: Tensor, block_m: int, block_n: int) -> TileSummary:
    """mask bool/float [B, Hq, Nq, Nk] (any strides) -> TileSummary of block_m x block_n tiles (see module doc)."""
    B, H, Nq, Nk = mask.shape
    base = _distinct_slice(mask)
    if mask.dtype == torch.bool:
        takes_part, neutral = base, base
    else:
        takes_part = base > float("-inf")
        neutral = base == 0
    any_ok = _tiles(takes_part, block_m, block_n, False).any(5).any(3)
    all_neutral = _tiles(neutral, block_m, block_n, True).all(5).all(3)
    state = torch.where(any_ok, torch.where(all_neutral, TILE_FULL, TILE_PARTIAL), TILE_EMPTY).to(torch.int8)
    # Tile dims broadcast (a key-padding mask has one row of tiles) are expanded before taking the ranges:
    # every query tile of a key-padding mask must be visited.
    MT, NT = math.ceil(Nq / block_m), math.ceil(Nk / block_n)
    bs, hs = any_ok.shape[:2]
    any_ok = any_ok.expand(bs, hs, MT, NT)
    row_lo, row_hi = _first_last(any_ok, 3)
    col_lo, col_hi = _first_last(any_ok, 2)
    return TileSummary(state.expand(B, H, MT, NT), row_lo.expand(B, H, MT), row_hi.expand(B, H, MT),
                       col_lo.expand(B, H, NT), col_hi.expand(B, H, NT))
