"""``sequence_parallel_attention``: the entry point that validates across ranks and dispatches to a mode."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.distributed as dist
from torch import Tensor

from ..backends import available_backends
from .allgather_kv import allgather_kv_attention
from .ring import ring_attention
from .validation import agree, trust
from ..errors import VitkernTypeError, VitkernValueError


def _group_or_world(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel_attention: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group (NCCL on GPUs, gloo on CPU) first")
    return group if group is not None else dist.group.WORLD


def sequence_parallel_attention(q_local: Tensor, k_local: Tensor, v_local: Tensor, *, group=None,
                                cu_seqlens: Optional[Tensor] = None, scale: Optional[float] = None,
                                mode: str = "allgather_kv", return_lse: bool = False,
                                backend: Optional[str] = None, shard_sizes: Optional[Sequence[int]] = None):
    """Self-attention over a token sequence split across the ranks of ``group`` (LSS sequence parallelism).

    Rank r holds tokens [o_r, o_r + T_r) of the concatenation, in rank order, of every rank's shard (shards may
    differ in size, even be empty):
        q_local [T_r, H, D], k_local [T_r, Hk, D], v_local [T_r, Hk, Dv]   (H a multiple of Hk)
    ``cu_seqlens``: None (all T = sum T_r tokens form one sequence), or the *global* int32/int64 boundaries
        [S + 1] of packed sequences over the T tokens (0, ..., T), the same tensor on every rank; a query
        attends only to keys of its own sequence, wherever they live.
    ``mode``: "allgather_kv" (every rank gathers all of K and V: one fused call, backward reduce-scatters
        dK/dV) or "ring" (K/V shards pass around the ring and partial results merge by log-sum-exp; at most two
        shards in memory; slower). Both give the same values and gradients to rounding.
    ``scale``: None (1/sqrt(D)) or a float. ``backend``: as in ``vitkern.varlen_attention``.
    Returns out [T_r, H, Dv] (the rank's queries), and with ``return_lse`` also lse [H, T_r] (float64 for float64; not
    differentiable). Collective: every rank of ``group`` must call it with the same mode, heads, head dims,
    dtype and cu_seqlens; a bad or disagreeing argument on any rank raises VitkernValueError/TypeError on every rank.
    ``shard_sizes``: None (the ranks exchange their shapes first: one small all-gather and a device-to-host
        copy per call), or every rank's token count [P], the same list on every rank (e.g.
        ``shard_sizes(T)``): no exchange, and in allgather_kv mode no host sync. Then only this rank's own
        arguments are checked; a rank that raises leaves the others waiting in a collective until the process
        group's timeout.
    """
    group = _group_or_world(group)
    problem = _scalar_problem(scale, return_lse, backend)
    if shard_sizes is None:
        layout = agree(q_local, k_local, v_local, cu_seqlens, mode, group, extra_problem=problem)
    else:
        layout = trust(q_local, k_local, v_local, cu_seqlens, mode, group, shard_sizes, extra_problem=problem,
                       need_cu_host=mode == "ring")
    if mode == "allgather_kv":
        out, lse = allgather_kv_attention(q_local, k_local, v_local, cu_seqlens, layout, scale, group, backend)
    else:
        out, lse = ring_attention(q_local, k_local, v_local, cu_seqlens, layout, scale, group, backend)
    return (out, lse) if return_lse else out


def _scalar_problem(scale, return_lse, backend) -> Optional[tuple]:

    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        return VitkernValueError, f"scale: expected None or a finite float, got {scale!r}"
    if not isinstance(return_lse, bool):
        return VitkernTypeError, f"return_lse: expected a bool, got {type(return_lse).__name__}"
    if backend is not None and backend not in available_backends():
        return VitkernValueError, f"backend: expected None or one of {available_backends()}, got {backend!r}"
    return None
