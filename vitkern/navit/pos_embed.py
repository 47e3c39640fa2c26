"""NaViT's factorized fractional position embeddings: a patch at (y, x) of an H×W grid sits at (y/H, x/W) in
[0, 1)², embedded as φy(y/H) + φx(x/W). Fractional coordinates let one table serve every resolution and aspect
ratio (at the price of not knowing the absolute size, which NaViT's ablations find acceptable)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from ..errors import VitkernValueError


def sincos_1d(coords: Tensor, dim: int, scale: float) -> Tensor:
    """coords [T] (fractions in [0, 1)) -> [T, dim]: sin and cos of coords·scale at dim/2 geometric frequencies
    (periods from 2π up to 2π·10000, as in the Transformer's sinusoidal embedding)."""
    if dim % 2:
        raise VitkernValueError(f"dim: expected an even size for sin-cos embeddings, got {dim}")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=coords.device, dtype=torch.float32)
                      / (dim // 2))
    angles = (coords.to(torch.float32) * scale)[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


class FractionalPosEmbed(nn.Module):
    """φy(y/H) + φx(x/W) for packed tokens.

    kind="learned": two tables of ``num_buckets`` rows; a fraction f picks row floor(f·num_buckets).
    kind="sincos": fixed sin-cos embedding of f·num_buckets (no parameters); ``dim`` must be even.
    forward(frac [T, 2] float (y/H, x/W), e.g. ``PackedBatch.fractional_positions()``) -> [T, dim].
    """

    def __init__(self, dim: int, kind: str = "learned", num_buckets: int = 32) -> None:
        super().__init__()
        if kind not in ("learned", "sincos"):
            raise VitkernValueError(f"kind: expected 'learned' or 'sincos', got {kind!r}")
        if num_buckets < 1:
            raise VitkernValueError(f"num_buckets: expected a positive int, got {num_buckets!r}")
        self.dim, self.kind, self.num_buckets = dim, kind, num_buckets
        if kind == "learned":
            self.y_table = nn.Parameter(torch.randn(num_buckets, dim) * 0.02)
            self.x_table = nn.Parameter(torch.randn(num_buckets, dim) * 0.02)
        elif dim % 2:
            raise VitkernValueError(f"dim: expected an even size for kind='sincos', got {dim}")

    def forward(self, frac: Tensor) -> Tensor:
        if frac.dim() != 2 or frac.shape[1] != 2 or not frac.is_floating_point():
            raise VitkernValueError(f"frac: expected a float [T, 2] tensor of (y/H, x/W), got {frac.dtype} "
                                    f"{tuple(frac.shape)}")
        if self.kind == "learned":
            idx = (frac * self.num_buckets).floor().long().clamp(0, self.num_buckets - 1)
            return self.y_table[idx[:, 0]] + self.x_table[idx[:, 1]]
        return (sincos_1d(frac[:, 0], self.dim, self.num_buckets)
                + sincos_1d(frac[:, 1], self.dim, self.num_buckets))
