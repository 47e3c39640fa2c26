"""Helpers that build cu_seqlens, the packed layout's sequence boundaries."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from .errors import VitkernTypeError, VitkernValueError


def lengths_to_cu_seqlens(lengths, dtype: torch.dtype = torch.int32, device=None) -> Tensor:
    """Sequence lengths ``[S]`` (list or 1-D int tensor, zeros allowed) -> cu_seqlens ``[S + 1]``, 0 first."""
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise VitkernValueError(f"lengths: expected a 1-D integer sequence, got {lengths.dim()}-D {lengths.dtype}")
    if lengths.numel() and bool((lengths < 0).any()):
        raise VitkernValueError(f"lengths: expected values >= 0, got {lengths.tolist()}")
    cu = torch.zeros(lengths.numel() + 1, dtype=dtype, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def segment_ids_to_cu_seqlens(segment_ids, dtype: torch.dtype = torch.int32, *,
                              max_segments: Optional[int] = None) -> Tensor:
    """Per-token segment ids ``[T]`` (each sequence one contiguous run, e.g. ``[0,0,0,1,1,2]``) -> cu_seqlens.

    Without ``max_segments``: ``[S + 1]`` with one sequence per run (S = number of runs; finding S syncs with
    the host on a GPU). With ``max_segments`` (an int >= 1, at least S): ``[max_segments + 1]``, the runs first
    and then zero-length sequences (trailing entries = T), computed with no device-to-host sync, so the shape
    and the varlen kernels' grid do not depend on the data. The values are checked eagerly on CPU and by an
    asynchronous device assert on a GPU (more runs than ``max_segments``, an id in two runs).
    """
    ids = torch.as_tensor(segment_ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise VitkernValueError(f"segment_ids: expected a 1-D integer tensor, got {ids.dim()}-D {ids.dtype}")
    if max_segments is not None:
        return _padded_cu_seqlens(ids, max_segments, dtype)
    if ids.numel() == 0:
        return torch.zeros(1, dtype=dtype, device=ids.device)
    runs, counts = torch.unique_consecutive(ids, return_counts=True)
    if runs.numel() != torch.unique(runs).numel():
        raise VitkernValueError("segment_ids: expected each segment to be one contiguous run of tokens, but an id "
                                "appears in more than one run")
    return lengths_to_cu_seqlens(counts, dtype=dtype, device=ids.device)


def _num_runs(x: Tensor) -> Tensor:
    """How many runs of equal consecutive values x [T] has, as a 0-D device tensor (0 when T == 0)."""
    return (x[1:] != x[:-1]).sum() + min(x.numel(), 1)


def _padded_cu_seqlens(ids: Tensor, max_segments: int, dtype: torch.dtype) -> Tensor:
    if isinstance(max_segments, bool) or not isinstance(max_segments, int):
        raise VitkernTypeError(f"max_segments: expected None or an int >= 1, got {max_segments!r} "
                               f"({type(max_segments).__name__})")
    if max_segments < 1:
        raise VitkernValueError(f"max_segments: expected None or an int >= 1, got {max_segments}")
    # Token i's run index r_i (0-based, non-decreasing); cu[j] = #tokens with r_i < j, T once j passes the runs.
    new_run = torch.ones(ids.numel(), dtype=torch.int64, device=ids.device)
    new_run[1:] = ids[1:] != ids[:-1]
    run = new_run.cumsum(0) - 1
    cu = torch.searchsorted(run, torch.arange(max_segments + 1, dtype=torch.int64, device=ids.device))
    if not torch.compiler.is_compiling():
        _check_runs(ids, max_segments)
    return cu.to(dtype)


def _check_runs(ids: Tensor, max_segments: int) -> None:
    """At most max_segments runs, each id one contiguous run (as many runs as the sorted ids have): eagerly on
    CPU, by an asynchronous device assert elsewhere."""
    runs, distinct = _num_runs(ids), _num_runs(ids.sort().values)
    if ids.device.type != "cpu":
        torch._assert_async((runs <= max_segments) & (distinct == runs),
                            f"segment_ids: must hold at most max_segments={max_segments} runs, each id one "
                            f"contiguous run")
        return
    runs, distinct = int(runs), int(distinct)
    if runs > max_segments:
        raise VitkernValueError(f"segment_ids: expected at most max_segments={max_segments} runs (sequences), got {runs}")
    if distinct != runs:
        raise VitkernValueError(f"segment_ids: expected each segment to be one contiguous run of tokens, but {distinct} "
                                f"distinct ids make {runs} runs (an id appears in more than one run)")
