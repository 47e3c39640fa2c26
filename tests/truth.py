"""Float64 ground truth, written independently of every backend (reference.py included).

Plain softmax attention with autograd; rows with no key give 0. Tests compare each backend's output and
gradients with these, and with the same math done in the input dtype (to size the tolerance).
"""
from __future__ import annotations

import math

import torch


def attention(q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False, keep=None, dropout_p=0.0,
              upcast=True):
    """q [..., Hq, Nq, D], k/v [..., Hk, Nk, *]; mask broadcastable to [..., Nq, Nk] (bool keep or float bias);
    keep: optional bool dropout keep-mask broadcastable to the scores. Returns [..., Hq, Nq, Dv]."""
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
        if mask is not None and mask.is_floating_point():
            mask = mask.double()
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    nq, nk = s.shape[-2], s.shape[-1]
    if nk == 0:  # no key at all: every row is empty
        return (s.sum(-1, keepdim=True) * 0).expand(*s.shape[:-1], v.shape[-1]) + v.sum() * 0
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(s.dtype)
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    if keep is not None:
        p = p * keep / (1.0 - dropout_p) if dropout_p < 1 else p * 0
    return torch.matmul(p, v.to(p.dtype))


def logsumexp(q, k, mask=None, is_causal=False, scale=None):
    """float64 lse [..., Nq] of the masked scores (-inf for a row with no key)."""
    q, k = q.double(), k.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return torch.logsumexp(s, -1)


def varlen(q, k, v, cu_q, cu_k, is_causal=False, scale=None, upcast=True):
    """Packed truth: a loop over sequences. q [Tq, H, D], k/v [Tk, Hk, *] -> [Tq, H, Dv]."""
    outs = []
    hq, hk = q.shape[1], k.shape[1]
    for s in range(cu_q.numel() - 1):
        a, b = int(cu_q[s]), int(cu_q[s + 1])
        c, d = int(cu_k[s]), int(cu_k[s + 1])
        qs, ks, vs = (x.transpose(0, 1) for x in (q[a:b], k[c:d], v[c:d]))
        o = attention(qs, ks, vs, is_causal=is_causal, scale=scale, enable_gqa=hq != hk, upcast=upcast)
        outs.append(o.transpose(0, 1))
    dt = torch.float64 if upcast else q.dtype
    if not outs:
        return q.new_zeros(0, hq, v.shape[-1], dtype=dt)
    return torch.cat(outs, 0)
