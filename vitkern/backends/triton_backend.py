"""The ``triton`` backend: fused forward/backward Triton kernels (vitkern/triton_kernels/) for CUDA tensors.

On CPU tensors it runs only under ``TRITON_INTERPRET=1`` (Triton's numpy interpreter, for tests at tiny sizes).
Triton and the kernel modules are imported on first use, not by ``import vitkern`` (importing Triton costs
~0.2 s): the interpreter setting is read when the kernels are defined, and an install without Triton just
does not list the backend.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from . import register
from .base import Backend, dmask_buffer, empty_bhnd

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    # (backends/__init__.py's reading of TRITON_INTERPRET: importing triton_kernels.config would import Triton)
    from . import triton_interpreting
    return triton_interpreting()


def _interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run here, or None. Triton 3.6's interpreter turns one-element arrays
    into loop bounds with int(), which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"); Triton 3.8's squeezes them first."""
    global _INTERP_PROBLEM
    if _INTERP_PROBLEM is None:
        _INTERP_PROBLEM = ""
        try:
            import inspect

            import numpy
            import triton
            from triton.runtime import interpreter
            src = inspect.getsource(interpreter)
            numpy_major_minor = tuple(int(x) for x in numpy.__version__.split(".")[:2])
            if "int(self.handle.data))" in src and numpy_major_minor >= (2, 4):
                _INTERP_PROBLEM = (f"Triton {triton.__version__}'s interpreter needs numpy below 2.4 (it converts "
                                   f"one-element arrays with int(), which numpy 2.4 refuses), got numpy "
                                   f"{numpy.__version__}; use Triton 3.8 or numpy 2.3")
        except Exception:  # noqa: BLE001  (no source to read: nothing known to be wrong)
            pass
    return _INTERP_PROBLEM or None


_INTERP_PROBLEM: Optional[str] = None


class TritonBackend(Backend):
    name = "triton"
    pads_dmask_rows = True      # the dQ kernel stores dMask tiles through TMA on sm_90

    def available(self) -> bool:
        return importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or _interpreting())

    def unavailable_reason(self) -> str:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        return ("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to run CPU tensors in Triton's "
                "interpreter)")

    def unsupported_reason(self, q, k, v, mask, cu_seqlens_q, dropout_p) -> Optional[str]:
        interp = _interpreting()
        if q.device.type == "cpu" and not interp:
            return "it runs on CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter)"
        if q.device.type not in ("cpu", "cuda"):
            return f"it runs on CUDA tensors, got tensors on {q.device}"
        if q.dtype not in _DTYPES:
            return f"dtype must be one of float16, bfloat16, float32, got {q.dtype}"
        if q.device.type == "cpu" and _interpreter_problem():
            return _interpreter_problem()
        if interp and (q.dtype == torch.bfloat16 or (mask is not None and mask.dtype == torch.bfloat16)):
            return "Triton's interpreter (TRITON_INTERPRET=1) has no bfloat16 arithmetic"
        # (Skipped while torch.compile traces: a device query there would break the graph.)
        if (q.device.type == "cuda" and q.dtype == torch.bfloat16 and not interp
                and not torch.compiler.is_compiling() and torch.cuda.get_device_capability(q.device) < (8, 0)):
            return "bfloat16 needs a GPU of compute capability 8.0 or newer (Ampere, Hopper)"
        if mask is not None and cu_seqlens_q is not None:
            return "a dense mask together with cu_seqlens is not served (the packed layout's mask is implicit)"
        d, dv = q.shape[-1], v.shape[-1]
        if max(d, dv) > MAX_HEAD_DIM:
            return (f"head dims up to {MAX_HEAD_DIM} (a larger tile does not fit a GPU's registers/shared memory), "
                    f"got D={d}, Dv={dv}")
        if mask is not None and mask.dtype != torch.bool and mask.dtype not in _DTYPES + (torch.float64,):
            return f"a float mask must be float16, bfloat16, float32 or float64, got {mask.dtype}"
        return None

    def forward(self, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p):
        from ..triton_kernels.attention_fwd import attention_forward
        b, hq, nq, _ = q.shape
        out = empty_bhnd(b, hq, nq, v.shape[3], q)
        lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
        with _on_device(q):
            return attention_forward(q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p,
                                     out, lse)

    def backward(self, dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                 dropout_p, mask_grad):
        from ..triton_kernels.attention_bwd import attention_backward
        b, hq, nq, d = q.shape
        hk, nk = k.shape[1], k.shape[2]
        dq = empty_bhnd(b, hq, nq, d, q)
        dk = empty_bhnd(b, hk, nk, d, k)
        dv = empty_bhnd(b, hk, nk, v.shape[3], v)
        # Tiles the kernels skip (masked out, causal, empty rows) are never written: dmask starts at zero.
        dmask = dmask_buffer(b, hq, nq, nk, mask, self.pads_dmask_rows) if mask_grad else q.new_empty(0)
        with _on_device(q):
            return attention_backward(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale,
                                      is_causal, dropout_p, mask_grad, dq, dk, dv, dmask)


class _on_device:
    """Launch on the tensors' GPU (not the current one) when they live on a CUDA device."""

    def __init__(self, x):
        self._ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


register(TritonBackend())
