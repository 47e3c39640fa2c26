"""The attention mask as a kernel reads it: kind, tensor, strides and, for float masks on sm_90, a TMA descriptor.

- bool (MASK_KIND 1): packed words, a bit per pair (mask_bits.py), along keys for the query-major forward and dQ
  tiles, along queries (mask^T) for the key-major dK/dV tiles;
- float (MASK_KIND 2): the entries through the mask's own strides (stride-0 broadcast dims never materialized),
  or, on sm_90+ (MASK_TMA), tiles through a TMA descriptor. Why: a [BLOCK_M, BLOCK_N] pointer load of the bias
  takes a coalesced layout that pulls the softmax's row state out of the MMA layout (the partial-tile loop then
  runs its max and exponentials twice, or spills: benchmarks/NOTES.md, version 6), while a TMA tile lands in
  shared memory and is read from there straight into the MMA layout. TMA needs 16-bit entries, rows that are
  not broadcast, and 16-byte-aligned rows: a mask whose rows are not (N = 197 keys: 394 B) is copied once into
  rows padded to 8 entries, remembered while the mask is unchanged. Under MASK_TMA the kernels take the batch /
  head strides as 1 or 0: the descriptor's coordinate of a (batch, head), 0 where the mask broadcasts.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import config, mask_summary
from .mask_bits import packed_bits
from ..tensor_memo import TensorMemo


class MaskOperand(NamedTuple):
    tensor: Tensor          # what the kernel's Mask pointer points at
    strides: tuple          # (b, h, query, key) as the kernel takes them
    desc: object            # TMA descriptor of [B', H', Nq, Nk'] float tiles, or the dummy
    tma: bool               # MASK_TMA


def mask_kind(mask) -> int:
    if mask is None:
        return 0
    return 1 if mask.dtype == torch.bool else 2


def mask_operand(mask: Optional[Tensor], dummy: Tensor, transposed: bool = False, block_m: int = 0,
                 block_n: int = 0, arch: int = None) -> MaskOperand:
    """mask None or bool/float [B, Hq, Nq, Nk] -> MaskOperand for a kernel whose tiles are query-major (forward, dQ)
    or key-major (``transposed``: dK/dV). Float tiles through TMA have the box [block_m queries, block_n keys] (the
    key-major kernel transposes them); ``arch`` as config.use_tma (default: the mask's device)."""
    if mask is None:
        return MaskOperand(dummy, (0, 0, 0, 0), dummy, False)
    if mask.dtype == torch.bool:
        bits = packed_bits(mask, transposed)
        sb, sh, sr, _ = bits.stride()
        return MaskOperand(bits, (sb, sh, 0, sr) if transposed else (sb, sh, sr, 0), dummy, False)
    view = _tma_view(mask) if mask.dtype in config.TMA_DTYPES and block_m and block_n else None
    if view is None or not config.use_tma((view,), arch):
        return MaskOperand(mask, mask.stride(), dummy, False)
    coords = (int(view.shape[0] > 1), int(view.shape[1] > 1), 0, 0)
    return MaskOperand(view, coords, config.tma_descriptor(view, block_m, block_n), True)


def float_tiles_by_tma(mask: Optional[Tensor], arch: int = None) -> bool:
    """Whether mask_operand reads this mask's tiles through TMA (MASK_TMA) on compute capability ``arch``."""
    if mask is None or mask.dtype not in config.TMA_DTYPES:
        return False
    view = _tma_view(mask)
    return view is not None and config.use_tma((view,), arch)


_ALIGNED = TensorMemo()


def _tma_view(mask: Tensor) -> Optional[Tensor]:
    """The float mask's distinct slice [B', H', Nq, Nk'] (broadcast batch / head narrowed to 1) in a layout TMA reads
    (config.tma_layout_ok), copied with rows padded to 8 entries where its own is not; None when its rows are
    broadcast (a key-padding mask: TMA would read one row)."""
    if mask.stride(2) == 0 and mask.shape[2] > 1:
        return None
    base = mask_summary.distinct_slice(mask, 2)
    if config.tma_layout_ok(base):
        return base
    key = (tuple(mask.shape), mask.stride(), mask.storage_offset())
    return mask_summary.remembered(_ALIGNED, mask, key, lambda: _aligned_copy(base))


def _aligned_copy(base: Tensor) -> Tensor:
    """base [B', H', Nq, Nk] copied into rows padded to 8 entries (16 bytes), viewed back to Nk columns."""
    bs, hs, nq, nk = base.shape
    copy = base.new_zeros(bs, hs, nq, -(-nk // 8) * 8)[..., :nk]
    copy.copy_(base)
    return copy
