"""Shared helpers of the contract suite: random inputs and the float64-anchored comparison."""
from __future__ import annotations

import torch

import truth
from error_model import FLOOR, recompute_bounds, tolerance

ATOL = FLOOR  # the floor of error_model.py, per dtype


def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False, gen=None):
    x = torch.randn(*shape, dtype=torch.float32, device="cpu", generator=gen).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def qkv(b, h, nq, nk, d, dv=None, hk=None, dtype=torch.float32, device="cpu", grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    hk = h if hk is None else hk
    return (rand(b, h, nq, d, dtype=dtype, device=device, requires_grad=grad, gen=gen),
            rand(b, hk, nk, d, dtype=dtype, device=device, requires_grad=grad, gen=gen),
            rand(b, hk, nk, dv, dtype=dtype, device=device, requires_grad=grad, gen=gen))


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_truth(got, exact, naive_lowp, what: str, recompute: float = 0.0):
    """|got - exact| <= error_model.tolerance; exact in float64, naive_lowp the same math in got's dtype (None for
    float64, where the floor alone rules); ``recompute``: the flash backward's recompute term, if the test has one."""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != expected {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    base = max_err(naive_lowp, exact) if naive_lowp is not None else 0.0
    tol = tolerance(exact, base, got.dtype, recompute)
    err = max_err(got, exact)
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (naive {got.dtype} error {base:.3e})"


def check_against_truth(fn, args_lowp, truth_fn, what, dout_seed=1, grads=True, recompute_scale=None,
                        packed=False):
    """Run ``fn(*args)`` (the backend) and ``truth_fn(*args)`` in float64 and in the low dtype; compare the
    outputs and, if ``grads``, the gradients of every floating input that requires grad. Tests with large scores
    give ``recompute_scale`` (the softmax scale) to add error_model's recompute term (args = q, k, v, ...)."""
    dtype = args_lowp[0].dtype
    leaves = [a for a in args_lowp if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args_lowp)
    exact_args = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for a in args_lowp]
    exact = truth_fn(*exact_args)
    lowp = None
    if dtype != torch.float64:
        low_args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                    and a.is_floating_point() else a for a in args_lowp]
        lowp = truth_fn(*low_args, upcast=False)
    assert_close_to_truth(out, exact, lowp, f"{what} output")
    if not grads or not leaves:
        return out
    gen = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device)
    got = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    ex_leaves = [a for a in exact_args if isinstance(a, torch.Tensor) and a.requires_grad]
    ex = torch.autograd.grad(exact, ex_leaves, dout.double())
    lg = None
    if lowp is not None:
        low_leaves = [a for a in low_args if isinstance(a, torch.Tensor) and a.requires_grad]
        lg = torch.autograd.grad(lowp, low_leaves, dout.to(dtype))
    names = "qkvm"
    bounds = [0.0] * len(got)
    if recompute_scale is not None:
        bounds[:3] = recompute_bounds(truth_fn, args_lowp, dout, recompute_scale, packed=packed)
    for i, (g, e) in enumerate(zip(got, ex)):
        assert_close_to_truth(g, e, lg[i] if lg is not None else None, f"{what} grad d{names[min(i, 3)]}",
                              recompute=bounds[i])
    return out
