"""Per-tile summary of a dense attention mask, computed on the device (one Triton pass over the mask, then torch
ops on the small tile grid; no host sync).

A mask reaches the backend as a [B, Hq, Nq, Nk] view whose broadcast dims have stride 0 (a key-padding mask
[B, 1, 1, Nk], one [Nq, Nk] mask shared by all heads, ...). The summary is computed once on the distinct slice
(broadcast dims narrowed to 1), then expanded back with stride-0 views, so its cost is that of reading the
distinct mask once, never B * Hq times.

For tiles of block_m x block_n it gives:
    state   int8 [B, Hq, MT, NT]: TILE_EMPTY (skip the tile), TILE_FULL (everything takes part with a zero bias:
            no mask load), TILE_PARTIAL (load the mask)
and, per kernel orientation, lists of the tiles to visit (``row_lists`` for the forward and dQ, ``col_lists``
for dK/dV): per resident tile, its full tiles that need no causal or bounds check, then the other full ones,
then the partial ones. A full tile runs the unmasked loop body (no mask code, no branch) and an empty one costs
nothing, so a block-diagonal mask (NaViT's packed images, built from segment ids) visits only the tiles near
the diagonal, as the varlen path does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tensor_memo import TensorMemo, memo_allowed

TILE_EMPTY, TILE_FULL, TILE_PARTIAL = 0, 1, 2


@dataclass
class TileSummary:
    state: Tensor
    lists: dict = field(default_factory=dict)   # row_lists' / col_lists' results


def distinct_slice(mask: Tensor, dims: int = 4) -> Tensor:
    """mask with its broadcast (stride-0) dims among the first ``dims`` narrowed to size 1."""
    idx = tuple(slice(0, 1) if mask.stride(i) == 0 and mask.shape[i] > 1 else slice(None) for i in range(dims))
    return mask[idx]


def remembered(memo: TensorMemo, mask: Tensor, key, make):
    """make()'s result for ``mask``, kept in ``memo`` under its root tensor (the user's mask: the backend gets a
    new expanded view per call) and ``key`` (which must hold the view's geometry) while the mask is unchanged;
    not kept while aot_check compiles instead of launching, nor while tracing or capturing (memo_allowed)."""
    root = mask if mask._base is None else mask._base
    hit = memo.get(root, key)
    if hit is None:
        hit = make()
        if launch is _launch and memo_allowed(root):
            memo.put(root, key, hit)
    return hit


@triton.jit
def _tile_state_kernel(Mask, State, stride_mb, stride_mh, stride_mm, stride_mn,
                       stride_sb, stride_sh, stride_sm, stride_sn,
                       num_heads, num_m_tiles, num_n_tiles, n_rows, n_cols,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_BOOL: tl.constexpr):
    """One program per (slice, tile): reads the tile once and writes its state (0 empty, 1 full, 2 partial)."""
    pid = tl.program_id(0)
    nt = pid % num_n_tiles
    mt = (pid // num_n_tiles) % num_m_tiles
    bh = pid // (num_n_tiles * num_m_tiles)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (offs_m[:, None] < n_rows) & (offs_n[None, :] < n_cols)
    ptrs = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
            + offs_m.to(tl.int64)[:, None] * stride_mm + offs_n.to(tl.int64)[None, :] * stride_mn)
    if IS_BOOL:
        x = tl.load(ptrs, mask=inside, other=0)
        takes_part = (x != 0) & inside
        neutral = (x != 0) | (inside == 0)
    else:
        x = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        takes_part = (x > float("-inf")) & inside
        neutral = (x == 0.0) | (inside == 0)
    any_part = tl.max(tl.max(takes_part.to(tl.int32), 1), 0)
    all_neutral = tl.min(tl.min(neutral.to(tl.int32), 1), 0)
    state = tl.where(any_part == 0, 0, tl.where(all_neutral == 1, 1, 2))
    tl.store(State + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + mt * stride_sm + nt * stride_sn,
             state.to(tl.int8))


def _launch(kernel, grid, args, kwargs):
    kernel[grid](*args, **kwargs)


# aot_check.py swaps this to compile the launch ahead of time instead of running it.
launch = _launch


# Summaries by the mask's root tensor (the user's mask: the backend gets a new expanded view per call) and the
# view's geometry: the forward, both backward kernels and every layer of a model usually share one mask.
_SUMMARIES = TensorMemo()


def tile_summary(mask: Tensor, block_m: int, block_n: int) -> TileSummary:
    """mask bool/float [B, Hq, Nq, Nk] (any strides) -> TileSummary of block_m x block_n tiles (see module doc).
    Remembered while the mask is unchanged (vitkern/tensor_memo.py)."""
    key = (mask.dtype, tuple(mask.shape), mask.stride(), mask.storage_offset(), block_m, block_n)
    return remembered(_SUMMARIES, mask, key, lambda: _tile_summary(mask, block_m, block_n))


# Order of the key tiles in a query tile's list (row_lists): full tiles without, then with, checks; then
# partial tiles; tiles not visited last.
_FULL_INTERIOR, _FULL_EDGE, _PARTIAL, _SKIPPED = 0, 1, 2, 3


def _lists(group: Tensor, visited: Tensor) -> tuple[Tensor, Tensor]:
    """Per resident tile (dim -2), its walked tiles (dim -1) sorted by group, each group ascending, unvisited
    last; and where each of the three groups ends."""
    n = group.shape[-1]
    group = torch.where(visited, group, _SKIPPED)
    t = torch.arange(n, device=group.device, dtype=torch.int32)
    order = torch.sort(group * n + t, dim=-1).values % n
    counts = torch.stack([(group == g).sum(-1) for g in (_FULL_INTERIOR, _FULL_EDGE, _PARTIAL)], -1)
    return order.to(torch.int32).contiguous(), counts.cumsum(-1).to(torch.int32).contiguous()


def row_lists(summary: TileSummary, block_m: int, block_n: int, n_k: int, causal: bool) -> tuple[Tensor, Tensor]:
    """(order int32 [B, Hq, MT, NT], ends int32 [B, Hq, MT, 3]) for kernels that keep a query tile and walk
    key tiles (forward, dQ): order[..., m, :] lists query tile m's key tiles, full ones that need no causal /
    key-bounds check first, then the other full ones, then the partial ones; ends holds where each group ends.
    A key tile needs the checks when it holds keys past n_k or, causal (top-left), keys right of the tile's
    first query row's diagonal (the kernels' t_mid); causal tiles right of its last row's diagonal, and empty
    ones, are not listed. Computed once per summary."""
    key = ("rows", n_k, bool(causal))
    if key not in summary.lists:
        state = summary.state
        MT, NT = state.shape[-2:]
        dev = state.device
        t = torch.arange(NT, device=dev, dtype=torch.int32).view(1, NT)
        m_start = torch.arange(MT, device=dev, dtype=torch.int32).view(MT, 1) * block_m
        t_mid = torch.full((MT, 1), NT if n_k % block_n == 0 else n_k // block_n, device=dev, dtype=torch.int32)
        n_end = torch.full((MT, 1), n_k, device=dev, dtype=torch.int32)
        if causal:
            t_mid = torch.minimum(t_mid, (m_start + 1) // block_n)
            n_end = torch.minimum(n_end, m_start + block_m)
        full = state == TILE_FULL
        group = torch.where(full & (t < t_mid), _FULL_INTERIOR, torch.where(full, _FULL_EDGE, _PARTIAL))
        summary.lists[key] = _lists(group, (t * block_n < n_end) & (state != TILE_EMPTY))
    return summary.lists[key]


def col_lists(summary: TileSummary, block_m: int, block_n: int, n_q: int, causal: bool) -> tuple[Tensor, Tensor]:
    """(order int32 [B, Hq, NT, MT], ends int32 [B, Hq, NT, 3]) for the dK/dV kernel, which keeps a key tile and
    walks query tiles: as row_lists with the roles swapped. A query tile needs the checks when it holds rows
    past n_q or, causal, rows above the diagonal of the key tile's last key; query tiles wholly above its first
    key's diagonal are not listed."""
    key = ("cols", n_q, bool(causal))
    if key not in summary.lists:
        state = summary.state.transpose(-1, -2)
        NT, MT = state.shape[-2:]
        dev = state.device
        m = torch.arange(MT, device=dev, dtype=torch.int32).view(1, MT)
        n_start = torch.arange(NT, device=dev, dtype=torch.int32).view(NT, 1) * block_n
        edge = (m >= n_q // block_m) if n_q % block_m else torch.zeros_like(m, dtype=torch.bool)
        visited = state != TILE_EMPTY
        if causal:
            first = n_start // block_m
            edge = edge | (m < (n_start + block_n - 1 + block_m - 1) // block_m)
            visited = visited & (m >= first)
        full = state == TILE_FULL
        group = torch.where(full & ~edge, _FULL_INTERIOR, torch.where(full, _FULL_EDGE, _PARTIAL))
        summary.lists[key] = _lists(group, visited)
    return summary.lists[key]


def _tile_summary(mask: Tensor, block_m: int, block_n: int) -> TileSummary:
    B, H, Nq, Nk = mask.shape
    base = distinct_slice(mask)
    if base.dtype == torch.bool:
        base = base.view(torch.uint8)
    bs, hs, nq, nk = base.shape
    mt, nt = math.ceil(nq / block_m), math.ceil(nk / block_n)
    state = torch.empty(bs, hs, mt, nt, dtype=torch.int8, device=mask.device)
    if state.numel():
        launch(_tile_state_kernel, (state.numel(),),
               (base, state, *base.stride(), *state.stride(), hs, mt, nt, nq, nk),
               # 8 warps for 128x128 tiles: with 4, a thread's 128 entries and their pointers spill (Triton 3.6).
               dict(BLOCK_M=block_m, BLOCK_N=block_n, IS_BOOL=mask.dtype == torch.bool,
                    num_warps=8 if block_m * block_n >= 128 * 128 else 4))
    # Tile dims broadcast (a key-padding mask has one row of tiles) are expanded: every query tile of a
    # key-padding mask is visited.
    MT, NT = math.ceil(Nq / block_m), math.ceil(Nk / block_n)
    return TileSummary(state.expand(B, H, MT, NT))
