"""The error model behind every tolerance of the contract suite, written down once.

A backend's result in dtype ``t`` is compared with float64 math. It may differ by

    tol = 2 * |naive_t - exact|  +  FLOOR[t] * max(1, max|exact|)  +  recompute term (gradients only)

1. ``naive_t`` is the same math done plainly in dtype t (scores, softmax, products: torch ops in t). Its error is
   what rounding in t costs this input; a fused kernel rounds in other places (tiles, online rescaling, fp32
   accumulators), so twice that error (flash-attn's rule) bounds it, plus
2. a floor for results whose naive error happens to be ~0 (entries of a few ulps), relative to the magnitude;
3. the *recompute term*, which naive math does not have. A flash backward does not keep P: it recomputes
   P~ = exp(s~ - lse) with s~ = scale * q.k rounded again in fp32 (in another summation order than the forward),
   and lse = m + log(l) rounded to fp32. Each P~_ij is P_ij * (1 + e_ij) with, per row,
       |e_ij| <= eta = u32 * (|lse_i| + 2 * sqrt(D) * A_i),     A_i = max_j scale * sum_d |q_id k_jd|
   (u32 = 2^-24: the rounding of lse, and of the score in the forward and again in the backward, whose errors grow
   like sqrt(D) in a dot product of length D when rounding errors are independent -- the usual probabilistic bound,
   Higham & Mary 2019; the worst case, D * u, is never approached by real summation). delta = rowsum(dO * O) uses
   the forward's O, so dS~ = P~ * (dP - delta) = dS * (1 + e) element-wise, and the gradients move by at most
       |d dq| <= eta * scale * |dS| @ |K|,  |d dk| <= eta * scale * |dS|^T @ |Q|,  |d dv| <= eta * P^T @ |dO|
   (summed over the query heads of a GQA group). These are bounds on sums of absolute values: a gradient that
   cancels to ~0 (dq along a direction every key shares, say) still carries the full error. The term is below the
   floor unless scores are large, so only the tests that make |s| large (1e3-1e4) compute it.

Checked by perturbation (2026-12-02, Intel Xeon with AVX-512, the Triton interpreter, whose products are numpy's
OpenBLAS): at the 1e4-logit test, OpenBLAS's Haswell/Zen kernels (another summation order, what an AMD machine
runs) give a worst gradient error of 1.55x the tolerance without item 3 -- the failure seen on AMD EPYC -- and
0.18x with it; its SkylakeX kernels 0.70x and 0.10x; the cpu and reference backends 0.70x / 0.10x at 1 and 2
threads.
"""
from __future__ import annotations

import math

import torch

# Floor of the allowed error, per dtype, relative to the largest value compared (item 2).
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
U32 = 2.0 ** -24


def tolerance(exact: torch.Tensor, naive_err: float, dtype: torch.dtype, recompute: float = 0.0) -> float:
    """Items 1-3 above: the largest |got - exact| the contract allows."""
    mag = exact.abs().max().item() if exact.numel() else 0.0
    return 2.0 * naive_err + FLOOR[dtype] * max(1.0, mag) + recompute


def _fold_groups(x: torch.Tensor, hk: int) -> torch.Tensor:
    """[..., Hq, N, X] -> [..., Hk, N, X], summed over the query heads of each key/value head."""
    hq = x.shape[-3]
    return x if hq == hk else x.unflatten(-3, (hk, hq // hk)).sum(-3)


def recompute_bounds(truth_fn, args, dout, scale: float, packed: bool = False) -> list[float]:
    """Item 3's bounds for (dq, dk, dv) of ``truth_fn(q, k, v, *rest)`` at these inputs, as max-norms.

    ``args`` = (q, k, v, *rest) in the layout truth_fn takes: [..., H, N, D], or packed [T, H, D] when ``packed``.
    P comes from the truth itself (its output for v = the identity on the keys), so masks, causal, varlen blocks
    and GQA are those of the test.
    """
    q, k, v, *rest = [a.detach().double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    do = dout.detach().double()
    nk = k.shape[0] if packed else k.shape[-2]
    eye = torch.eye(nk, dtype=torch.float64, device=q.device)
    if packed:  # the identity per key token and head: [Tk, Hk, Tk]; then everything as [H, T, X]
        p = truth_fn(q, k, eye[:, None, :].expand(nk, k.shape[1], nk).contiguous(), *rest).transpose(0, 1)
        q, k, v, do = (x.transpose(0, 1) for x in (q, k, v, do))
    else:
        p = truth_fn(q, k, eye.expand(*v.shape[:-1], nk).contiguous(), *rest)
    hq, hk = q.shape[-3], k.shape[-3]
    kk, vv = (x.repeat_interleave(hq // hk, dim=-3) if hq != hk else x for x in (k, v))
    o = p @ vv
    ds = p * (do @ vv.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    a = (scale * (q.abs() @ kk.abs().transpose(-1, -2))).amax(-1)  # [..., Hq, Nq]: A_i
    # |lse_i| <= A_i + log(Nk): no score exceeds A_i in size. Rows with no key have P = 0, hence no error.
    eta = U32 * ((a + math.log(max(nk, 1))) + 2.0 * math.sqrt(q.shape[-1]) * a)
    eta = torch.where(p.abs().sum(-1) > 0, eta, 0).unsqueeze(-1)
    bq = scale * (eta * ds.abs()) @ kk.abs()
    bk = _fold_groups(scale * (eta * ds.abs()).transpose(-1, -2) @ q.abs(), hk)
    bv = _fold_groups((eta * p).transpose(-1, -2) @ do.abs(), hk)
    return [b.max().item() if b.numel() else 0.0 for b in (bq, bk, bv)]
