"""Cases shared by the CPU kernel's path suites (test_cpu_lowp.py: the bf16 tile products; test_cpu_sgemm.py: the
float32 GEMMs): whatever path the environment selects, the masked, causal and varlen calls against float64 math."""
from __future__ import annotations

import torch

import truth
import vitkern
from contract import check_against_truth, qkv, rand


def sdpa(q, k, v, mask=None, is_causal=False, upcast=True):
    return vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend="cpu")


def ref(q, k, v, mask=None, is_causal=False, upcast=True):
    return truth.attention(q, k, v, mask=mask, is_causal=is_causal, upcast=upcast)


def check_masked_and_causal(kind: str, dtype: torch.dtype, what: str) -> None:
    """kind: "bool" (a random [197, 197] keep mask), "float" (additive, -inf where dropped) or "causal"."""
    q, k, v = qkv(2, 2, 197, 197, 64, dtype=dtype, grad=True, seed=3)
    gen = torch.Generator().manual_seed(5)
    if kind == "causal":
        fn = lambda q, k, v, upcast=True: sdpa(q, k, v, is_causal=True)
        tr = lambda q, k, v, upcast=True: ref(q, k, v, is_causal=True, upcast=upcast)
    else:
        mask = torch.rand(197, 197, generator=gen) > 0.4
        if kind == "float":
            mask = torch.where(mask, rand(197, 197, gen=gen), torch.tensor(-float("inf"))).to(dtype)
        fn = lambda q, k, v, upcast=True: sdpa(q, k, v, mask=mask)
        tr = lambda q, k, v, upcast=True: ref(q, k, v, mask=mask, upcast=upcast)
    check_against_truth(fn, (q, k, v), tr, f"{what} {kind}")


def check_varlen(lengths: list, dtype: torch.dtype, what: str) -> None:
    """Packed sequences of these lengths, 2 heads of 64."""
    cu = vitkern.lengths_to_cu_seqlens(lengths)
    gen = torch.Generator().manual_seed(len(lengths))
    q, k, v = (rand(sum(lengths), 2, 64, gen=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v, upcast=True: vitkern.varlen_attention(q, k, v, cu, backend="cpu")
    tr = lambda q, k, v, upcast=True: truth.varlen(q, k, v, cu, cu, upcast=upcast)
    check_against_truth(fn, (q, k, v), tr, f"{what} varlen {lengths}")
