"""Counter-based dropout shared by every backend.

Whether score (row, col) of query head ``bh`` is kept depends only on (seed, bh, row, col), so a backward pass
regenerates the forward's mask without storing it, and two backends given the same seed drop the same entries.
The C++ and Triton kernels implement exactly these integer steps; ``keep_mask`` is their specification.

    a    = mix(seed + bh * 0x9E3779B9)
    b    = mix(a ^ row)
    u    = mix(b + col * 0x85EBCA6B)          (all uint32, wrapping)
    keep = u >= threshold(p)                  threshold(p) = floor(p * 2**32), clamped to 2**32 - 1

``mix`` is the 32-bit "lowbias32" integer hash. ``bh`` is batch * num_q_heads + head; in the packed (varlen)
layout batch is 0 and row/col are token indices in the packed sequence.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
COL_MUL = 0x85EBCA6B


def _mix(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic masked to 32 bits reproduces uint32 wrap-around exactly.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def threshold(p: float) -> int:
    """uint32 threshold below which a hashed value means 'dropped'."""
    return min(int(p * 2**32), _M32)


def keep_mask(seed: int, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask, broadcasting ``bh [..., 1, 1]``, ``rows [..., Nq, 1]``, ``cols [..., 1, Nk]`` (int64)."""
    a = _mix(torch.as_tensor(seed & _M32, dtype=torch.int64) + bh.to(torch.int64) * GOLDEN)
    b = _mix(a ^ rows.to(torch.int64))
    u = _mix(b + cols.to(torch.int64) * COL_MUL)
    return u >= threshold(p)


def new_seed() -> torch.Tensor:
    """A fresh dropout seed from torch's default CPU generator (so ``torch.manual_seed`` makes runs repeat)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
