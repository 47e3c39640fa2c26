"""A bool attention mask packed into 32-bit words: the form the Triton kernels read bool masks in.

    bits int32 [B, H, R, W]: bit c % 32 of word c // 32 of row r is mask[r, c] (1: the pair takes part)

Rows are queries (``transposed=False``: the forward and dQ, whose tiles are query-major) or keys
(``transposed=True``: mask^T for the dK/dV kernel, whose tiles are key-major). W covers the columns rounded up
to a multiple of GROUP_COLS with zero bits, so a kernel tile of up to GROUP_COLS columns reads whole words and
columns past the end read as masked out.

Why: read a byte per pair, the mask of a partial tile costs 64-bit address math per entry, and its 2-D load
pulls Triton's layout choice away from the MMA layout (the softmax then ran twice, through shared memory:
benchmarks/NOTES.md, Triton version 5). A row's words are 1-D loads beside the row statistics, and each score
costs a bit test and a select. Like the tile summary, the packing runs once on the mask's distinct slice
(stride-0 broadcast dims narrowed to 1, expanded back as stride-0 views) and is remembered while the mask is
unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import mask_summary
from ..tensor_memo import TensorMemo

GROUP_COLS = 128       # columns packed by one program (4 words); the widest kernel tile
_WORD = 32


@triton.jit
def _pack_bits_kernel(Mask, Bits, stride_mb, stride_mh, stride_mr, stride_mc, stride_bb, stride_bh, stride_br,
                      num_heads, num_r_blocks, num_groups, n_rows, n_cols,
                      BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    """One program per (slice, BLOCK_R rows, GROUP columns): reads the mask bytes, writes GROUP // 32 words a
    row (columns past n_cols give 0 bits)."""
    pid = tl.program_id(0)
    g = pid % num_groups
    rb = (pid // num_groups) % num_r_blocks
    bh = pid // (num_groups * num_r_blocks)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    lane = tl.arange(0, GROUP)
    offs_c = g * GROUP + lane
    inside = (offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    x = tl.load(Mask + b * stride_mb + h * stride_mh + offs_r.to(tl.int64)[:, None] * stride_mr
                + offs_c.to(tl.int64)[None, :] * stride_mc, mask=inside, other=0)
    bit = (x != 0).to(tl.int32) << (lane % 32)[None, :]
    # Distinct bits: their xor is their or, and no sum can overflow into a sign.
    words = tl.xor_sum(tl.reshape(bit, [BLOCK_R, GROUP // 32, 32]), 2)
    offs_w = g * (GROUP // 32) + tl.arange(0, GROUP // 32)
    tl.store(Bits + b * stride_bb + h * stride_bh + offs_r.to(tl.int64)[:, None] * stride_br + offs_w[None, :],
             words, mask=offs_r[:, None] < n_rows)


_BITS = TensorMemo()
_BLOCK_R = 32


def words_per_row(n_cols: int) -> int:
    return triton.cdiv(n_cols, GROUP_COLS) * (GROUP_COLS // _WORD)


def packed_bits(mask: Tensor, transposed: bool = False) -> Tensor:
    """mask bool [B, H, Nq, Nk] (any strides) -> int32 [B, H, Nq, W] (or [B, H, Nk, W] of mask^T when
    ``transposed``), see the module doc; stride 0 where the mask broadcasts B, H or the packed rows."""
    key = (bool(transposed), tuple(mask.shape), mask.stride(), mask.storage_offset())
    return mask_summary.remembered(_BITS, mask, key, lambda: _pack(mask, transposed))


def _pack(mask: Tensor, transposed: bool) -> Tensor:
    view = mask.transpose(-1, -2) if transposed else mask
    B, H, R, C = view.shape
    # Broadcast batch, head and row dims narrowed; the packed (column) dim is read in full.
    base = mask_summary.distinct_slice(view, 3).view(torch.uint8)
    bs, hs, rs = base.shape[:3]
    groups = triton.cdiv(C, GROUP_COLS)
    bits = torch.empty(bs, hs, rs, words_per_row(C), dtype=torch.int32, device=mask.device)
    r_blocks = triton.cdiv(rs, _BLOCK_R)
    if bits.numel():
        mask_summary.launch(_pack_bits_kernel, (bs * hs * r_blocks * groups,),
                            (base, bits, *base.stride(), *bits.stride()[:3], hs, r_blocks, groups, rs, C),
                            dict(BLOCK_R=_BLOCK_R, GROUP=GROUP_COLS, num_warps=4))
    return bits.expand(B, H, R, bits.shape[3])
