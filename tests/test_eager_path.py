"""The eager path (vitkern/ops.py, api.py): what it skips per call must not change what a call does.

- the per-signature plan cache gives the same result as a fresh plan and still rejects every bad input;
- cu_seqlens values are checked again when the tensor changes in place;
- a fresh process imports neither torch._dynamo nor Triton (import or first call);
- autocast: torch SDPA's lower-precision policy, forward and backward, eager and compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern import api
from contract import qkv, rand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cached_plan_gives_the_fresh_result(prof):
    q, k, v = qkv(2, 3, 7, 9, 16, device=prof.device)
    mask = (torch.rand(2, 1, 7, 9) > 0.3).to(prof.device)
    api._PLANS.clear()
    first = vitkern.scaled_dot_product_attention(q, k, v, mask, backend=prof.backend)
    assert len(api._PLANS) == 1
    again = vitkern.scaled_dot_product_attention(q, k, v, mask, backend=prof.backend)
    assert torch.equal(first, again)
    # 3-D inputs (no batch dim) reshape back through the cached plan
    out3 = vitkern.scaled_dot_product_attention(q[0], k[0], v[0], backend=prof.backend)
    out3b = vitkern.scaled_dot_product_attention(q[0], k[0], v[0], backend=prof.backend)
    assert out3.shape == (3, 7, 16) and torch.equal(out3, out3b)


def test_cached_signature_still_rejects_bad_inputs():
    q, k, v = qkv(1, 2, 5, 5, 16)
    vitkern.scaled_dot_product_attention(q, k, v, is_causal=True)    # cached with is_causal=True
    with pytest.raises(TypeError, match="is_causal"):
        vitkern.scaled_dot_product_attention(q, k, v, is_causal=1)   # 1 == True and hashes alike
    with pytest.raises(TypeError, match="key: expected dtype"):
        vitkern.scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="dropout_p"):
        vitkern.scaled_dot_product_attention(q, k, v, dropout_p=1.5)


def test_cu_seqlens_checked_again_after_an_in_place_change():
    x = rand(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    vitkern.varlen_attention(x, x, x, cu)
    vitkern.varlen_attention(x, x, x, cu)            # cached plan, cached value check
    cu[1] = 10                                        # bumps the version counter
    with pytest.raises(ValueError, match="non-decreasing"):
        vitkern.varlen_attention(x, x, x, cu)
    cu[1] = 4
    out = vitkern.varlen_attention(x, x, x, cu, max_seqlen_q=5)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        vitkern.varlen_attention(x, x, x, cu, max_seqlen_q=4)   # cached signature, hint checked per call
    ref = vitkern.varlen_attention(x, x, x, cu, backend="reference")
    assert torch.allclose(out, ref, atol=1e-5)


def test_fresh_process_imports_neither_dynamo_nor_triton():
    code = ("import sys, torch, vitkern\n"
            "q = torch.randn(1, 2, 8, 16, requires_grad=True)\n"
            "vitkern.scaled_dot_product_attention(q, q, q).sum().backward()\n"
            "x = torch.randn(9, 2, 16)\n"
            "vitkern.varlen_attention(x, x, x, torch.tensor([0, 4, 9]))\n"
            "print(sorted(m for m in ('torch._dynamo', 'triton', 'torch._inductor') if m in sys.modules))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_autocast_dtype(prof, low):
    if prof.device != "cpu":
        pytest.skip("autocast is tested on CPU")
    q, k, v = qkv(2, 2, 7, 9, 16, grad=True)
    mask = rand(1, 2, 7, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=low):
        out = vitkern.scaled_dot_product_attention(q, k, v, mask, backend=prof.backend)
        want = F.scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == want.dtype == low
    # Same as casting by hand (bitwise: the same backend on the same low-precision inputs) ...
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mask)]
    ref = vitkern.scaled_dot_product_attention(*(t.to(low) for t in leaves), backend=prof.backend)
    assert torch.equal(out, ref)
    # ... backward too: fp32 leaves get fp32 gradients, through the cast
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, mask), dout)
    want_grads = torch.autograd.grad(ref, leaves, dout)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32 and torch.equal(g, w)


def test_autocast_policy_matches_torch_sdpa():
    q32 = rand(1, 2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in ((q32, q32), (q32.double(), q32.double()), (q32, q32.bfloat16()), (q32.half(), q32.half())):
            got = vitkern.scaled_dot_product_attention(a, b, b)
            assert got.dtype == F.scaled_dot_product_attention(a, b, b).dtype, (a.dtype, b.dtype)
        x = rand(9, 2, 16)
        assert vitkern.varlen_attention(x, x, x, torch.tensor([0, 4, 9])).dtype == torch.bfloat16
        # the op itself has an autocast rule (for direct callers); its lse stays float32
        q4 = q32.expand(1, 2, 5, 16)
        out, lse = torch.ops.vitkern.attention_fwd(q4, q4, q4, None, None, None, None, -1, -1, 0.25, False, 0.0,
                                                   "reference")
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_autocast_under_torch_compile():
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 7, 7, 16, grad=True)

    def f(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return vitkern.scaled_dot_product_attention(q, k, v)
    eager = f(q, k, v)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert got.dtype == torch.bfloat16 and torch.equal(got, eager)
    g_eager = torch.autograd.grad(eager.float().sum(), (q, k, v))
    g_got = torch.autograd.grad(got.float().sum(), (q, k, v))
    for a, b in zip(g_got, g_eager):
        assert a.dtype == torch.float32 and torch.equal(a, b)
