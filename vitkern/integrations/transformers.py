"""``attn_implementation="vitkern"`` for Hugging Face transformers (its AttentionInterface).

Importing this module registers the name; ``register()`` does it again explicitly (idempotent). Then::

    import vitkern.integrations.transformers  # noqa: F401
    model = ViTModel.from_pretrained(name, attn_implementation="vitkern")   # or ViTModel(config, attn_...)
    model.set_attn_implementation("vitkern")                                  # on a model already built

Mask conventions handled: a bool mask (True = attend) as transformers' sdpa mask builder makes, or a float
mask added to the scores (eager style); a mask longer than the keys is cut to the key length (as transformers'
sdpa path does). Older ViTs (transformers 4.x) passed ``head_mask`` in the mask slot, a per-head factor applied
to the attention probabilities: with ``head_mask_in_mask_slot`` detected it scales each head's output, which
is the same product. Dropout is whatever the model passes (it passes 0.0 outside training).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..api import scaled_dot_product_attention
from ..errors import VitkernValueError

NAME = "vitkern"


def _transformers_major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


def _passes_head_mask(module: nn.Module) -> bool:
    # transformers 4.x ViT-family self-attention handed head_mask to the interface as attention_mask.
    return _TRANSFORMERS_MAJOR < 5 and type(module).__name__.endswith("SelfAttention")


def vitkern_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], dropout: float = 0.0,
                              scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                              **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: query [B, Hq, Nq, D], key [B, Hk, Nk, D], value [B, Hk, Nk, Dv];
    attention_mask bool/float broadcasting to [B, Hq, Nq, Nk] (or None). Returns ([B, Nq, Hq, Dv], None): no
    attention probabilities are ever materialized."""
    if kwargs.get("output_attentions", False):
        raise VitkernValueError("output_attentions: vitkern never materializes attention probabilities; use "
                                "attn_implementation='eager' to get them")
    head_mask = None
    if attention_mask is not None and _passes_head_mask(module):
        head_mask, attention_mask = attention_mask, None
    nq, nk = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] != nk:
        attention_mask = attention_mask[..., :nk]
    # Same rule as transformers' sdpa path: causal only for self-attention of a decoder without an explicit mask.
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(nq > 1 and attention_mask is None and causal)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                       is_causal=causal, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if head_mask is not None:
        out = out * head_mask
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"vitkern"`` with transformers' AttentionInterface (and, for models that build masks, with its
    mask interface, using the sdpa mask builder: bool masks, True = attend)."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("vitkern.integrations.transformers needs transformers installed") from e
    AttentionInterface.register(NAME, vitkern_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers: no mask interface, models build masks themselves
        return
    AttentionMaskInterface.register(NAME, sdpa_mask)


_TRANSFORMERS_MAJOR = _transformers_major()
register()
