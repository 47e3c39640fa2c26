"""Helpers that build cu_seqlens, the packed layout's sequence boundaries."""
from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_cu_seqlens(lengths, dtype: torch.dtype = torch.int32, device=None) -> Tensor:
    """Sequence lengths ``[S]`` (list or 1-D int tensor, zeros allowed) -> cu_seqlens ``[S + 1]``, 0 first."""
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths: expected a 1-D integer sequence, got {lengths.dim()}-D {lengths.dtype}")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError(f"lengths: expected values >= 0, got {lengths.tolist()}")
    cu = torch.zeros(lengths.numel() + 1, dtype=dtype, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def segment_ids_to_cu_seqlens(segment_ids, dtype: torch.dtype = torch.int32) -> Tensor:
    """Per-token segment ids ``[T]`` (each sequence one contiguous run, e.g. ``[0,0,0,1,1,2]``) ->
    cu_seqlens ``[S + 1]`` with one sequence per run."""
    ids = torch.as_tensor(segment_ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"segment_ids: expected a 1-D integer tensor, got {ids.dim()}-D {ids.dtype}")
    if ids.numel() == 0:
        return torch.zeros(1, dtype=dtype, device=ids.device)
    runs, counts = torch.unique_consecutive(ids, return_counts=True)
    if runs.numel() != torch.unique(runs).numel():
        raise ValueError("segment_ids: expected each segment to be one contiguous run of tokens, but an id "
                         "appears in more than one run")
    return lengths_to_cu_seqlens(counts, dtype=dtype, device=ids.device)
