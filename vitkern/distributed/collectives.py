"""The few torch.distributed collectives the sequence-parallel attention needs, for shards of uneven size.

Gloo's all_gather wants equal sizes and NCCL's tensor collectives want one flat buffer, so uneven shards are
padded to the largest shard, exchanged as one ``[P, max_tokens, ...]`` buffer, and the padding is dropped. With
even shards no padding copy is made. Every function here is collective: all ranks of ``group`` must call it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Recent torch renamed the flat-buffer collectives; the old names still work (with a FutureWarning) and are
# the only ones in older releases.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def comm_device(group, like: Optional[Tensor]) -> torch.device:
    """Device for the group's small bookkeeping tensors: the data's device, but CUDA whenever the group only
    speaks NCCL (which cannot move CPU tensors)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(like, Tensor):
        return like.device
    return torch.device("cpu")


def all_gather_tokens(x: Tensor, sizes: Sequence[int], group) -> Tensor:
    """Concatenate every rank's ``x [sizes[r], ...]`` along dim 0 -> ``[sum(sizes), ...]`` (same on all ranks)."""
    world = len(sizes)
    x = x.contiguous()
    tail = tuple(x.shape[1:])
    longest = max(sizes)
    # Flat 1-D buffers: what every backend's flat collective accepts (gloo checks the exact output shape).
    if all(s == longest for s in sizes):
        out = x.new_empty(world * x.numel())
        all_gather_flat(out, x.reshape(-1), group=group)
        return out.view((longest * world,) + tail)
    padded = x.new_empty((longest,) + tail)
    padded[: x.shape[0]].copy_(x)
    buf = x.new_empty(world * padded.numel())
    all_gather_flat(buf, padded.reshape(-1), group=group)
    buf = buf.view((world, longest) + tail)
    return torch.cat([buf[r, : sizes[r]] for r in range(world)], dim=0)


def reduce_scatter_tokens(full: Tensor, sizes: Sequence[int], rank: int, group) -> Tensor:
    """Sum ``full [sum(sizes), ...]`` over the ranks and return this rank's rows ``[sizes[rank], ...]``: the
    transpose of ``all_gather_tokens``."""
    world = len(sizes)
    full = full.contiguous()
    tail = tuple(full.shape[1:])
    longest = max(sizes)
    out = full.new_empty((longest,) + tail)
    if all(s == longest for s in sizes):
        reduce_scatter_flat(out.view(-1), full.view(-1), group=group)
        return out
    buf = full.new_zeros((world, longest) + tail)
    start = 0
    for r, s in enumerate(sizes):
        buf[r, :s].copy_(full[start:start + s])
        start += s
    reduce_scatter_flat(out.view(-1), buf.view(-1), group=group)
    return out[: sizes[rank]]


def exchange_with_neighbours(send: Sequence[Tensor], recv: Sequence[Tensor], rank: int, world: int, group):
    """Start sending ``send`` to rank+1 and receiving ``recv`` from rank-1 (ring order, in group ranks).
    Every tensor must be contiguous (no temporary copy could be kept alive for the transfer). Returns the list
    of requests; call ``.wait()`` on each before touching ``recv`` or writing to ``send``."""
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    # Empty shards are not sent: both sides know every shard's size, so they skip the same messages.
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, prv, group) for t in recv if t.numel()]
    return dist.batch_isend_irecv(ops) if ops else []
