"""``patch_timm(model)``: run every softmax attention of a timm model on vitkern, in place, weights kept.

Two routes:
- ``timm.layers.Attention`` (ViT, DeiT, NaFlexViT's standard blocks, ...) is replaced by ``vitkern.nn.Attention``
  built from the same submodules (``Attention.from_timm``): no copy, the same Parameter objects.
- Every other timm attention class that computes ``F.scaled_dot_product_attention`` on its fused path (RoPE/EVA
  attention, BEiT with its relative-position bias, attention pooling, ...) keeps its own forward; its instances
  are switched to a subclass whose forward redirects that one call to ``vitkern.scaled_dot_product_attention``
  (a TorchFunctionMode active only inside that module's forward). Its ``fused_attn`` flag is set to True.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..api import scaled_dot_product_attention
from ..nn.attention import Attention
from ..errors import VitkernTypeError, VitkernValueError

_SDPA_FUNCS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


class _SdpaToVitkern(TorchFunctionMode):
    """Sends torch SDPA calls to vitkern (the mode is off inside its own handler, so vitkern's ops run plain)."""

    def __init__(self, backend: Optional[str]):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA_FUNCS:
            return scaled_dot_product_attention(*args, **kwargs, backend=self.backend)
        return func(*args, **kwargs)


_REDIRECTED: dict[type, type] = {}


def _redirected_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward runs under _SdpaToVitkern (one per timm class, cached)."""
    if cls not in _REDIRECTED:
        def forward(self, *args, **kwargs):
            with _SdpaToVitkern(self.vitkern_backend):
                return cls.forward(self, *args, **kwargs)

        _REDIRECTED[cls] = type(f"VitkernSdpa{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__,
                                                                    "__qualname__": f"VitkernSdpa{cls.__name__}"})
    return _REDIRECTED[cls]


def _calls_sdpa(cls: type) -> bool:
    try:
        return "scaled_dot_product_attention" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _timm_attention_class() -> type:
    try:
        from timm.layers import Attention as TimmAttention
    except ImportError as e:
        raise ImportError("patch_timm needs timm installed") from e
    return TimmAttention


def _is_redirectable(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__.startswith("timm.") and hasattr(module, "fused_attn") and _calls_sdpa(cls))


def patch_timm(model: nn.Module, backend: Optional[str] = None) -> int:
    """Swap every softmax attention of a timm ``model`` for vitkern, in place; returns how many were swapped.

    Weights, parameter names and state-dict keys are unchanged, so pretrained checkpoints still load. Input and
    output shapes are timm's (e.g. [B, N, C] -> [B, N, C]). ``backend`` is passed to every vitkern call (None
    picks the fastest). Raises ValueError if the model holds no attention that vitkern can take over.
    """
    if not isinstance(model, nn.Module):
        raise VitkernTypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    timm_attention = _timm_attention_class()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is timm_attention:
                setattr(parent, name, Attention.from_timm(child, backend=backend))
                count += 1
            elif isinstance(child, Attention) or type(child) in _REDIRECTED.values():
                continue  # already patched
            elif _is_redirectable(child):
                child.__class__ = _redirected_class(type(child))
                child.vitkern_backend = backend
                child.fused_attn = True
                count += 1
    if count == 0:
        already = any(isinstance(m, Attention) or type(m) in _REDIRECTED.values() for m in model.modules())
        why = "it is already patched" if already else "it holds no timm attention module that calls SDPA"
        raise VitkernValueError(f"model: expected a timm model with attention layers to patch, but {why} "
                                f"({type(model).__name__})")
    return count
