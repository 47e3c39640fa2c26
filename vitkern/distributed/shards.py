"""Token ranges of a sequence split across ranks, and the packed-sequence boundaries each rank sees.

A sequence (or a packed stream of sequences) of T tokens is split along the token axis into contiguous shards,
one per rank of the group, in rank order; shards may differ in size. Everything here is plain arithmetic on
Python ints or small index tensors: no communication.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from ..errors import VitkernValueError


def even_shard_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of ``world_size`` contiguous shards of ``total`` tokens, as even as possible (the first
    ``total % world_size`` shards get one token more, like ``torch.tensor_split``)."""
    if not isinstance(total, int) or total < 0:
        raise VitkernValueError(f"total: expected an int >= 0, got {total!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise VitkernValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each shard in the concatenated sequence, plus the total at the end: ``[0, s0, s0+s1, ..., T]``."""
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + int(s))
    return offsets


def clip_cu_seqlens(cu_seqlens: Tensor, start: int, end: int) -> Tensor:
    """Global packed boundaries ``cu_seqlens [S + 1]`` -> the boundaries of the same S sequences restricted to
    tokens ``[start, end)``, counted from ``start``: ``clamp(cu, start, end) - start``.

    Sequence s keeps only its tokens inside the range (possibly none), so the result is a valid cu_seqlens for
    the shard's ``end - start`` tokens and, paired with another shard's clipped boundaries, keeps every query
    inside its own sequence.
    """
    return cu_seqlens.clamp(start, end) - start


def overlapping_shards(cu_host: Sequence[int], offsets: Sequence[int], rank: int) -> list[bool]:
    """For each shard, whether some sequence has tokens both in ``rank``'s shard and in that shard (else the
    rank's queries see no key there and the block can be skipped). ``cu_host``: global boundaries as ints."""
    lo, hi = offsets[rank], offsets[rank + 1]
    # Sequences with at least one token in [lo, hi).
    mine = [(a, b) for a, b in zip(cu_host[:-1], cu_host[1:]) if b > a and a < hi and b > lo]
    flags = []
    for s in range(len(offsets) - 1):
        blo, bhi = offsets[s], offsets[s + 1]
        flags.append(bhi > blo and any(a < bhi and b > blo for a, b in mine))
    return flags


def dense_cu_seqlens(n: int, device) -> Tensor:
    """Boundaries of a single sequence of ``n`` tokens: ``[0, n]``."""
    # Two fills rather than torch.tensor([0, n]): a host-to-device copy would wait for the queued GPU work.
    cu = torch.full((2,), n, dtype=torch.int64, device=device)
    cu[0] = 0
    return cu
