"""Argument checks that every rank agrees on, so that a bad argument on one rank raises on all ranks.

Each rank checks its own arguments, then all ranks exchange one small int64 row of metadata (an error flag,
the shapes, the dtype, a fingerprint of cu_seqlens). The cross-rank checks run on that table, which is the
same on every rank, so every rank raises the same error instead of one rank raising while the others wait
in a collective forever. The exchange also gives every rank the shard sizes, which the attention needs anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import all_gather_flat, comm_device
from ..errors import VitkernTypeError, VitkernValueError

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODES = ("allgather_kv", "ring")
# Row layout of the exchanged metadata.
_FIELDS = ("error", "mode", "tq", "hq", "d", "tk", "hk", "dk", "tv", "hv", "dv", "dtype", "cu_len", "cu_last",
           "cu_fp1", "cu_fp2")
_FLD = {name: i for i, name in enumerate(_FIELDS)}


@dataclass
class Layout:
    """What every rank knows after the exchange."""
    rank: int
    world: int
    sizes: list[int]           # tokens per rank
    cu_host: Optional[list[int]]  # global cu_seqlens as ints (None: one dense sequence)


def _shape(x, n=3) -> list[int]:
    if isinstance(x, Tensor) and x.dim() == n:
        return [int(s) for s in x.shape]
    return [-1] * n


def _local_problem(q, k, v, cu_seqlens, mode, check_values: bool = True) -> Optional[tuple]:
    """This rank's own argument error as (exception class, message), or None. ``check_values=False`` skips the
    checks of cu_seqlens' values (they need a device-to-host copy)."""
    if mode not in _MODES:
        return VitkernValueError, f"mode: expected one of {_MODES}, got {mode!r}"
    for name, x in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(x, Tensor):
            return VitkernTypeError, f"{name}: expected a torch.Tensor, got {type(x).__name__}"
        if x.dim() != 3:
            return VitkernValueError, (f"{name}: expected a 3-D tensor [T_local, H, D], got {x.dim()}-D with shape "
                                       f"{tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        return VitkernTypeError, f"q_local: expected a floating dtype {_DTYPES}, got {q.dtype}"
    for name, x in (("k_local", k), ("v_local", v)):
        if x.dtype != q.dtype:
            return VitkernTypeError, f"{name}: expected dtype {q.dtype} (q_local's), got {x.dtype}"
        if x.device != q.device:
            return VitkernValueError, f"{name}: expected device {q.device} (q_local's), got {x.device}"
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        return VitkernValueError, (f"k_local/v_local: expected the same {q.shape[0]} tokens as q_local (the rank's "
                                   f"shard of one token sequence), got k_local {tuple(k.shape)}, v_local "
                                   f"{tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        return VitkernValueError, f"k_local: expected head dim {q.shape[2]} (q_local's), got {k.shape[2]}"
    if v.shape[1] != k.shape[1]:
        return VitkernValueError, f"v_local: expected {k.shape[1]} heads (k_local's), got {v.shape[1]}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return VitkernValueError, f"k_local: expected a head count dividing q_local's {q.shape[1]}, got {k.shape[1]}"
    if q.shape[2] == 0 or v.shape[2] == 0:
        return VitkernValueError, f"q_local/v_local: expected head dims >= 1, got D={q.shape[2]}, Dv={v.shape[2]}"
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, Tensor):
            return VitkernTypeError, (f"cu_seqlens: expected None or a 1-D int32/int64 tensor, got "
                                      f"{type(cu_seqlens).__name__}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            return VitkernValueError, (f"cu_seqlens: expected a 1-D int32/int64 tensor with at least 2 entries, got "
                                       f"{cu_seqlens.dim()}-D {cu_seqlens.dtype} with {cu_seqlens.numel()} entries")
        if cu_seqlens.device != q.device:
            return VitkernValueError, f"cu_seqlens: expected device {q.device} (q_local's), got {cu_seqlens.device}"
        if not check_values:
            return None
        c = cu_seqlens.to(torch.int64)
        if int(c[0]) != 0:
            return VitkernValueError, f"cu_seqlens: expected the first entry to be 0, got {int(c[0])}"
        if c.numel() > 1 and bool((c[1:] < c[:-1]).any()):
            return VitkernValueError, f"cu_seqlens: expected non-decreasing boundaries, got {c.tolist()[:16]}"
    return None


def _fingerprint(cu: Tensor) -> tuple[Tensor, Tensor]:
    # Two weighted sums (int64 arithmetic wraps the same way on every device): equal boundaries give equal
    # fingerprints; different ones collide only by accident.
    c = cu.to(torch.int64)
    i = torch.arange(1, c.numel() + 1, dtype=torch.int64, device=c.device)
    return (c * i).sum(), (c * (i * 1_000_003 + 7919) * (c + 1)).sum()


def agree(q, k, v, cu_seqlens, mode: str, group, extra_problem: Optional[tuple] = None) -> Layout:
    """Check the arguments on this rank, exchange metadata with the group and check that the ranks agree.
    Raises the same kind of error on every rank; returns the layout every rank agrees on.
    ``extra_problem``: (exception class, message) the caller found in its other arguments, raised likewise."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    problem = extra_problem or _local_problem(q, k, v, cu_seqlens, mode)
    row = torch.full((len(_FIELDS),), -1, dtype=torch.int64)
    row[_FLD["error"]] = 1 if problem else 0
    if problem is None:
        row[_FLD["mode"]] = _MODES.index(mode)
        row[_FLD["tq"]:_FLD["dv"] + 1] = torch.tensor(_shape(q) + _shape(k) + _shape(v))
        row[_FLD["dtype"]] = _DTYPES.index(q.dtype)
    device = comm_device(group, q if isinstance(q, Tensor) else None)
    row = row.to(device)
    if problem is None and cu_seqlens is not None:
        row[_FLD["cu_len"]] = cu_seqlens.numel()
        row[_FLD["cu_last"]] = cu_seqlens[-1].to(torch.int64)
        fp1, fp2 = _fingerprint(cu_seqlens.to(device))
        row[_FLD["cu_fp1"]], row[_FLD["cu_fp2"]] = fp1, fp2
    table = torch.empty(world * len(_FIELDS), dtype=torch.int64, device=device)
    all_gather_flat(table, row, group=group)
    rows = table.view(world, len(_FIELDS)).tolist()
    if problem is not None:
        raise problem[0](problem[1] + f" (on rank {rank})")
    bad = [r for r in range(world) if rows[r][0]]
    if bad:
        raise VitkernValueError(f"sequence_parallel_attention: rank(s) {bad} rejected their arguments (see the error "
                                f"raised there); rank {rank} stops too so that no rank waits in a collective")
    _check_table(rows)
    sizes = [rows[r][_FLD["tq"]] for r in range(world)]
    cu_host = None
    if cu_seqlens is not None:
        cu_host = [int(x) for x in cu_seqlens.tolist()]
        if cu_host[-1] != sum(sizes):
            raise VitkernValueError(f"cu_seqlens: expected the last entry to be the total token count over all ranks "
                                    f"({' + '.join(map(str, sizes))} = {sum(sizes)}), got {cu_host[-1]}")
    return Layout(rank, world, sizes, cu_host)


def _check_table(rows) -> None:
    first = rows[0]
    f = _FLD
    for r, row in enumerate(rows):
        for names, what in ((("hq", "d"), "q_local [T, H, D]"), (("hk", "dk"), "k_local [T, Hk, D]"),
                            (("hv", "dv"), "v_local [T, Hk, Dv]")):
            got = [row[f[n]] for n in names]
            want = [first[f[n]] for n in names]
            if got != want:
                arg = what.split()[0]
                raise VitkernValueError(f"{arg}: expected the same head count and head dim on every rank, but "
                                        f"{what} has (H, D) = {tuple(want)} on rank 0 and {tuple(got)} on rank {r}")
        if row[f["mode"]] != first[f["mode"]]:
            raise VitkernValueError(f"mode: expected the same mode on every rank, got {_MODES[first[f['mode']]]!r} on "
                                    f"rank 0 and {_MODES[row[f['mode']]]!r} on rank {r}")
        if row[f["dtype"]] != first[f["dtype"]]:
            raise VitkernValueError(f"q_local: expected the same dtype on every rank, got {_DTYPES[first[f['dtype']]]} on "
                                    f"rank 0 and {_DTYPES[row[f['dtype']]]} on rank {r}")
        if (row[f["cu_len"]] < 0) != (first[f["cu_len"]] < 0):
            raise VitkernValueError(f"cu_seqlens: expected either every rank or no rank to pass it, got "
                                    f"{'None' if first[f['cu_len']] < 0 else 'a tensor'} on rank 0 and "
                                    f"{'None' if row[f['cu_len']] < 0 else 'a tensor'} on rank {r}")
        if row[f["cu_len"]] != first[f["cu_len"]]:
            raise VitkernValueError(f"cu_seqlens: expected the same global boundaries on every rank, got "
                                    f"{first[f['cu_len']]} entries on rank 0 and {row[f['cu_len']]} on rank {r}")
        if row[f["cu_fp1"]:] != first[f["cu_fp1"]:] or row[f["cu_last"]] != first[f["cu_last"]]:
            raise VitkernValueError(f"cu_seqlens: expected the same global boundaries on every rank, but rank {r}'s "
                                    f"differ from rank 0's")


def trust(q, k, v, cu_seqlens, mode: str, group, shard_sizes, extra_problem: Optional[tuple] = None,
          need_cu_host: bool = False) -> Layout:
    """The layout from caller-given shard sizes, without exchanging anything: local checks only.

    A rank whose own arguments are wrong raises here while the others go on into the attention's collectives,
    where they wait until the process group's timeout: the price of skipping the exchange. The caller promises
    that every rank passes the same sizes and the same cu_seqlens. cu_seqlens' values are checked only where
    that needs no device sync (on CPU) or where the host copy is needed anyway (``need_cu_host``, ring mode);
    on GPUs varlen_attention's device-side checks catch the rest.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    on_cpu = isinstance(q, Tensor) and q.device.type == "cpu"
    problem = extra_problem or _local_problem(q, k, v, cu_seqlens, mode, check_values=on_cpu or need_cu_host)
    if problem is None:
        if (isinstance(shard_sizes, (str, bytes)) or not hasattr(shard_sizes, "__len__")
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shard_sizes)):
            problem = VitkernTypeError, f"shard_sizes: expected a sequence of {world} ints >= 0, got {shard_sizes!r}"
        elif len(shard_sizes) != world:
            problem = VitkernValueError, f"shard_sizes: expected {world} entries (one per rank), got {len(shard_sizes)}"
        elif shard_sizes[rank] != q.shape[0]:
            problem = VitkernValueError, (f"shard_sizes: entry {rank} (this rank's) is {shard_sizes[rank]}, but q_local "
                                          f"has {q.shape[0]} tokens")
    if problem is not None:
        raise problem[0](problem[1] + f" (on rank {rank})")
    sizes = [int(s) for s in shard_sizes]
    cu_host = None
    if cu_seqlens is not None and (on_cpu or need_cu_host):
        cu_host = [int(x) for x in cu_seqlens.tolist()]
        if cu_host[-1] != sum(sizes):
            raise VitkernValueError(f"cu_seqlens: expected the last entry to be the total token count over all ranks "
                                    f"(sum of shard_sizes = {sum(sizes)}), got {cu_host[-1]} (on rank {rank})")
    return Layout(rank, world, sizes, cu_host)
