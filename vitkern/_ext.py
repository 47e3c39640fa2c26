"""Loads the compiled extension ``vitkern._C`` (the fused CPU kernels), if it was built.

Without a compiler the package still imports; the ``reference`` backend serves and one warning says so.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (importing it registers the torch.ops.vitkern_cpu ops)
    HAS_C = True
    LOAD_ERROR = ""
except ImportError as e:  # not built, or built against another torch
    HAS_C = False
    LOAD_ERROR = str(e)
    warnings.warn(f"vitkern: the C++ extension is not available ({e}); the 'cpu' backend is off and "
                  "'reference' serves CPU tensors. Rebuild with `pip install -e . --no-build-isolation`.",
                  RuntimeWarning, stacklevel=2)
