"""Loads the compiled extension ``vitkern._C`` (the fused CPU kernels), if it was built.

Without a compiler the package still imports; the ``reference`` backend serves and one warning says so.
VITKERN_DISABLE_EXT=1 forces that state (tests use it).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

if os.environ.get("VITKERN_DISABLE_EXT") == "1":  # what an install without a compiler looks like
    HAS_C, LOAD_ERROR = False, "disabled by VITKERN_DISABLE_EXT=1"
elif importlib.util.find_spec(f"{__package__}._C") is None:
    HAS_C, LOAD_ERROR = False, "vitkern._C was not built"
else:
    try:
        from . import _C  # importing it registers the torch.ops.vitkern_cpu ops
        HAS_C, LOAD_ERROR = True, ""
        # The same kernels without the dispatcher, for callers already below it (backends/cpu.py).
        flash_fwd, flash_bwd, flash_attention_autograd = _C.flash_fwd, _C.flash_bwd, _C.flash_attention_autograd
        flash_varlen_fwd = _C.flash_varlen_fwd
    except ImportError as e:  # built against another torch, say
        HAS_C, LOAD_ERROR = False, str(e)
if not HAS_C:
    warnings.warn(f"vitkern: the C++ extension is not available ({LOAD_ERROR}); the 'cpu' backend is off and "
                  "'reference' serves CPU tensors. Rebuild with `pip install -e . --no-build-isolation`.",
                  RuntimeWarning, stacklevel=2)
