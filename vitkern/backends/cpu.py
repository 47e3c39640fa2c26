"""The ``cpu`` backend: the fused flash-style C++ kernel in csrc/ (torch.ops.vitkern_cpu.*)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from . import register
from .base import Backend

MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class CpuBackend(Backend):
    name = "cpu"

    def available(self) -> bool:
        # The schema lives in csrc/ops.cpp; a build without the kernel file has no CPU implementation.
        return _ext.HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key("vitkern_cpu::flash_fwd", "CPU")

    def unavailable_reason(self) -> str:
        return f"the C++ extension vitkern._C is not built ({_ext.LOAD_ERROR})"

    def unsupported_reason(self, q, k, v, mask, cu_seqlens_q, dropout_p) -> Optional[str]:
        if q.device.type != "cpu":
            return f"it runs on CPU tensors, got tensors on {q.device}"
        if q.dtype not in _DTYPES:
            return f"dtype must be one of {_DTYPES}, got {q.dtype}"
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            return f"head dims up to {MAX_HEAD_DIM}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
        return None

    # Called below the dispatcher (the vitkern::attention ops' CPU kernels and the eager autograd.Function), so
    # the kernels are called through their direct bindings: torch.ops would parse the schema and dispatch again,
    # about 4 µs of a tiny call (csrc/module.cpp).
    def forward(self, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p):
        return _ext.flash_fwd(q, k, v, mask, cu_q, cu_k, scale, is_causal, dropout_p,
                              int(seed.item()) if seed is not None else 0)

    def backward(self, dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                 dropout_p, mask_grad):
        dq, dk, dv, dmask = _ext.flash_bwd(
            dout, q, k, v, out, lse, mask, cu_q, cu_k, scale, is_causal, dropout_p,
            int(seed.item()) if seed is not None else 0, mask_grad)
        return dq, dk, dv, dmask

    def varlen_forward(self, q, k, v, cu_q, cu_k, seed, scale, is_causal, dropout_p):
        return _ext.flash_varlen_fwd(q, k, v, cu_q, cu_k, scale, is_causal, dropout_p,
                                     int(seed.item()) if seed is not None else 0)

    def forward_with_grad(self, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p,
                          mask_grad):
        # A C++ autograd node (csrc/cpu_attn_autograd.cpp): the backward never enters Python.
        return _ext.flash_attention_autograd(q, k, v, mask, cu_q, cu_k, scale, is_causal, dropout_p,
                                             int(seed.item()) if seed is not None else 0, mask_grad)


register(CpuBackend())
