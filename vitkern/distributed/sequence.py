"""Splitting a sequence across ranks and putting it back, and the gradient sync LSS needs for shared weights.

Convention (as in data parallelism): the training loss is the *sum* of the ranks' losses. Then
``gather_sequence``'s backward sums the gradient over the ranks (reduce-scatter), and parameters used by every
rank on its own tokens (all weights, and a learned position embedding of which each rank reads only its rows)
get their full gradient by summing the ranks' gradients: ``all_reduce_gradients``. LSS calls this the second
("double") gradient averaging; with a data-parallel group on top, average over that group as usual.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .allgather_kv import gather_tokens
from .collectives import all_gather_flat, comm_device
from .shards import even_shard_sizes, shard_offsets
from ..errors import VitkernTypeError, VitkernValueError


def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call torch.distributed.init_process_group first")
    return group if group is not None else dist.group.WORLD


def shard_sizes(total: int, group=None) -> list[int]:
    """Even split of ``total`` tokens over the group: the sizes ``shard_sequence`` uses by default."""
    return even_shard_sizes(total, dist.get_world_size(_group(group)))


def shard_sequence(x: Tensor, group=None, dim: int = 0, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """This rank's contiguous shard of a full sequence ``x`` (the same on every rank) along ``dim``.

    x [..., T, ...] -> [..., sizes[rank], ...] (a differentiable view; ``sizes`` defaults to the even split).
    A parameter sharded this way (a learned position embedding [T, C]) gets gradient only in this rank's rows;
    ``all_reduce_gradients`` completes it.
    """
    group = _group(group)
    if not isinstance(x, Tensor):
        raise VitkernTypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise VitkernValueError(f"dim: expected a dim of a {x.dim()}-D tensor, got {dim}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    total = x.shape[dim]
    sizes = even_shard_sizes(total, world) if sizes is None else [int(s) for s in sizes]
    if len(sizes) != world or any(s < 0 for s in sizes) or sum(sizes) != total:
        raise VitkernValueError(f"sizes: expected {world} non-negative shard sizes summing to x.shape[{dim}] = {total}, "
                                f"got {list(sizes)}")
    return x.narrow(dim, shard_offsets(sizes)[rank], sizes[rank])


def gather_sequence(x_local: Tensor, group=None, dim: int = 0) -> Tensor:
    """Concatenate every rank's shard along ``dim`` (shards may differ in size along ``dim`` only).

    x_local [..., T_r, ...] -> [..., sum T_r, ...] on every rank. Backward: the gradient summed over the ranks,
    this rank's rows (the sum-of-losses convention above). Collective.
    """
    group = _group(group)
    if not isinstance(x_local, Tensor):
        raise VitkernTypeError(f"x_local: expected a torch.Tensor, got {type(x_local).__name__}")
    if not -x_local.dim() <= dim < x_local.dim():
        raise VitkernValueError(f"dim: expected a dim of a {x_local.dim()}-D tensor, got {dim}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    moved = x_local.movedim(dim, 0)
    if moved.dim() > 7:
        raise VitkernValueError(f"x_local: expected at most 7 dims, got {x_local.dim()}")
    # Every rank learns every shard's shape: the sizes to gather, and a clear error instead of a hang.
    row = torch.tensor([moved.dim()] + list(moved.shape) + [-1] * (7 - moved.dim()), dtype=torch.int64,
                       device=comm_device(group, x_local))
    table = torch.empty(world * row.numel(), dtype=torch.int64, device=row.device)
    all_gather_flat(table, row, group=group)
    rows = table.view(world, row.numel()).tolist()
    for r, other in enumerate(rows):
        if other[0] != rows[0][0] or other[2:] != rows[0][2:]:
            raise VitkernValueError(f"x_local: expected shards that differ only along dim {dim}, got shape "
                                    f"{tuple(rows[0][1:1 + rows[0][0]])} on rank 0 and {tuple(other[1:1 + other[0]])} on "
                                    f"rank {r} (dim {dim} moved first)")
    sizes = [other[1] for other in rows]
    return gather_tokens(moved, sizes, rank, group).movedim(0, dim)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's loss depends on the sum: the gradient of the summed losses is the summed gradients.
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(x: Tensor, group=None) -> Tensor:
    """Differentiable all-reduce (sum) of a same-shape tensor ``x`` on every rank, e.g. a pooled feature:
    ``sum_over_ranks(x_local.sum(0)) / T`` is the mean over all ranks' tokens. Collective."""
    group = _group(group)
    if not isinstance(x, Tensor):
        raise VitkernTypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    return _SumOverRanks.apply(x, group)


@torch.no_grad()
def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], group=None, average: bool = False) -> None:
    """Sum (or with ``average`` average) the ``.grad`` of ``parameters`` over the sequence-parallel group, in
    place, one flat collective per dtype. Call after ``backward()`` and before the optimizer step. Collective;
    every rank must pass the same parameters in the same order (a missing ``.grad`` counts as zero)."""
    group = _group(group)
    params = [p for p in parameters if p.requires_grad]
    world = dist.get_world_size(group)
    by_dtype: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        if average:
            flat.div_(world)
        start = 0
        for g in grads:
            g.copy_(flat[start:start + g.numel()].view_as(g))
            start += g.numel()
