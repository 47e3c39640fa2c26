"""vitkern: fused masked scaled-dot-product attention for vision transformers.

Public API (see README.md and ARCHITECTURE.md):
    scaled_dot_product_attention  SDPA-compatible, [..., H, N, D]
    varlen_attention              packed [T, H, D] sequences delimited by cu_seqlens
    lengths_to_cu_seqlens, segment_ids_to_cu_seqlens, available_backends
Modules and integrations: vitkern.nn (Attention), vitkern.navit (packing), vitkern.integrations.timm /
.transformers, vitkern.distributed (sequence parallelism).
"""
from . import _ext  # noqa: F401  (loads the C++ ops if built)
from .api import scaled_dot_product_attention, varlen_attention
from .backends import available_backends
from .cu_seqlens import lengths_to_cu_seqlens, segment_ids_to_cu_seqlens

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "varlen_attention", "available_backends", "lengths_to_cu_seqlens",
           "segment_ids_to_cu_seqlens", "__version__"]
