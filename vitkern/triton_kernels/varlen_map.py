"""Program -> (sequence, block) map for packed (varlen) batches, built on the device with no host sync.

A packed batch of S sequences with T tokens in all has sum_s ceil(len_s / BLOCK) <= ceil(T / BLOCK) + S
blocks, a bound known on the host from shapes alone; with a max_seqlen hint, S * ceil(max / BLOCK) is a second
bound and the smaller one sizes the grid. The map is a device-side prefix sum of the per-sequence block counts
and a searchsorted; programs past the last block get an empty block (start past any length) and do nothing.
The grid depends only on (T, S, hint), so a new packing of the same size launches the same kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tensor_memo import TensorMemo, memo_allowed

EMPTY_BLOCK_START = 2**30   # a block start past any sequence's length


def grid_blocks(total: int, num_seqs: int, block: int, max_len: int) -> int:
    """How many programs cover every block of every sequence (an upper bound)."""
    bound = -(-total // block) + num_seqs
    if max_len >= 0:
        bound = min(bound, num_seqs * -(-max_len // block))
    return max(bound, 1)


_MAPS = TensorMemo()   # the forward, both backward kernels and every layer of a model share one cu_seqlens


def block_map(cu_seqlens: Tensor, total: int, block: int, max_len: int) -> tuple[Tensor, Tensor, int]:
    """cu_seqlens int32/int64 [S + 1] -> (seq int32 [G], block_start int32 [G], G).

    Program g handles rows [block_start[g], block_start[g] + block) of sequence seq[g] (positions inside the
    sequence); block_start == EMPTY_BLOCK_START marks a program with nothing to do. Remembered per cu_seqlens
    tensor while it is unchanged (vitkern/tensor_memo.py): ~10 small device ops saved per launch.
    """
    key = (total, block, max_len)
    hit = _MAPS.get(cu_seqlens, key)
    if hit is None:
        hit = _block_map(cu_seqlens, total, block, max_len)
        if memo_allowed(cu_seqlens):
            _MAPS.put(cu_seqlens, key, hit)
    return hit


def _block_map(cu_seqlens: Tensor, total: int, block: int, max_len: int) -> tuple[Tensor, Tensor, int]:
    num_seqs = cu_seqlens.numel() - 1
    g = grid_blocks(total, num_seqs, block, max_len)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = (lens + block - 1) // block
    ends = torch.cumsum(counts, 0)
    pid = torch.arange(g, device=cu_seqlens.device, dtype=torch.int64)
    seq = torch.searchsorted(ends, pid, right=True)
    valid = seq < num_seqs
    seq = seq.clamp_max(num_seqs - 1)
    first = ends[seq] - counts[seq]
    start = torch.where(valid, (pid - first) * block, EMPTY_BLOCK_START)
    return seq.to(torch.int32), start.to(torch.int32), g
