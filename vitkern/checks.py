"""Argument validation for the public API. Every error names the argument, what was expected and what came."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from .errors import VitkernTypeError, VitkernValueError
from .tensor_memo import TensorMemo, memo_allowed

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, min_ndim: int = 0, ndim: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise VitkernTypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise VitkernValueError(f"{name}: expected a {ndim}-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dim() < min_ndim:
        raise VitkernValueError(f"{name}: expected at least {min_ndim} dims, got {x.dim()}-D with shape {tuple(x.shape)}")


def qkv_dtypes_devices(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in FLOAT_DTYPES:
        raise VitkernTypeError(f"query: expected a floating dtype {FLOAT_DTYPES}, got {q.dtype}")
    for name, x in (("key", k), ("value", v)):
        if x.dtype != q.dtype:
            raise VitkernTypeError(f"{name}: expected dtype {q.dtype} (the query's), got {x.dtype}")
        if x.device != q.device:
            raise VitkernValueError(f"{name}: expected device {q.device} (the query's), got {x.device}")


def head_dims(q: Tensor, k: Tensor, v: Tensor, n_axis: int) -> None:
    if q.shape[-1] != k.shape[-1]:
        raise VitkernValueError(f"key: expected head dim {q.shape[-1]} (the query's last dim), got {k.shape[-1]} "
                                f"(query {tuple(q.shape)}, key {tuple(k.shape)})")
    if v.shape[n_axis] != k.shape[n_axis]:
        raise VitkernValueError(f"value: expected {k.shape[n_axis]} keys (the key's dim {n_axis}), got "
                                f"{v.shape[n_axis]} (key {tuple(k.shape)}, value {tuple(v.shape)})")


def scalar_args(dropout_p, scale, is_causal) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise VitkernValueError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise VitkernValueError(f"scale: expected None or a finite float, got {scale!r}")
    if not isinstance(is_causal, bool):
        raise VitkernTypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")


def attn_mask(mask, q: Tensor, target: tuple) -> None:
    tensor("attn_mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise VitkernTypeError(f"attn_mask: expected a bool or floating tensor, got {mask.dtype}")
    if mask.device != q.device:
        raise VitkernValueError(f"attn_mask: expected device {q.device} (the query's), got {mask.device}")
    try:
        ok = tuple(torch.broadcast_shapes(tuple(mask.shape), target)) == tuple(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise VitkernValueError(f"attn_mask: expected a shape that broadcasts to {tuple(target)} "
                                f"(batch..., Nq, Nk), got {tuple(mask.shape)}")


def cu_seqlens(name: str, cu, total: int, device: torch.device) -> None:
    """Shape, dtype and device always; values (0 start, non-decreasing, ends at total) where that costs no
    device sync: on CPU eagerly, on GPU by an asynchronous device assert."""
    if not isinstance(cu, Tensor):
        raise VitkernTypeError(f"{name}: expected a 1-D int32/int64 tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise VitkernValueError(f"{name}: expected a 1-D int32/int64 tensor, got {cu.dim()}-D {cu.dtype}")
    if cu.numel() < 1:
        raise VitkernValueError(f"{name}: expected at least one entry (0), got an empty tensor")
    if cu.device != device:
        raise VitkernValueError(f"{name}: expected device {device} (the query's), got {cu.device}")
    cu_seqlens_values(name, cu, total)


_VALUES_OK = TensorMemo()     # per cu_seqlens tensor: {total: passed, "longest": longest sequence}


def cu_seqlens_values(name: str, cu: Tensor, total) -> None:
    """The values of cu_seqlens (0 start, non-decreasing, ends at total); see cu_seqlens. A tensor that passed
    before and has not changed since is not checked again (on CPU a few tensor ops per call, on a GPU the
    asynchronous assert's launches)."""
    if torch.compiler.is_compiling():
        return
    if _VALUES_OK.get(cu, total):
        return
    _check_cu_values(name, cu, total)
    if memo_allowed(cu):
        _VALUES_OK.put(cu, total, True)


def _check_cu_values(name: str, cu: Tensor, total) -> None:
    if cu.device.type == "cpu":
        first, last = int(cu[0]), int(cu[-1])
        if first != 0:
            raise VitkernValueError(f"{name}: expected to start at 0, got {first}")
        if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
            i = int((cu[1:] < cu[:-1]).nonzero()[0]) + 1
            raise VitkernValueError(f"{name}: expected non-decreasing values, got {name}[{i}] = {int(cu[i])} < "
                                    f"{name}[{i - 1}] = {int(cu[i - 1])}")
        if last != total:
            raise VitkernValueError(f"{name}: expected to end at the packed length {total}, got {last}")
    else:
        torch._assert_async((cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all(),
                            f"{name}: must start at 0, be non-decreasing and end at {total}")


def max_seqlen(name: str, value, cu: Tensor) -> int:
    """The hint as an int (-1 if absent); on CPU checked against the real maximum."""
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VitkernValueError(f"{name}: expected None or an int >= 0, got {value!r}")
    if cu.is_cpu and cu.numel() > 1 and not torch.compiler.is_compiling():
        real = _VALUES_OK.get(cu, "longest")     # (a host sync on a GPU: checked on CPU only)
        if real is None:
            real = int((cu[1:] - cu[:-1]).max())
            if memo_allowed(cu):
                _VALUES_OK.put(cu, "longest", real)
        if value < real:
            raise VitkernValueError(f"{name}: expected at least the longest sequence, {real}, got {value}")
    return value
