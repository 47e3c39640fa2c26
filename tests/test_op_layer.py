"""The op layer: torch.library.opcheck on the custom ops, torch.compile(fullgraph=True) through them, and
backend selection."""
from __future__ import annotations

import pytest
import torch

import vitkern
from backends_under_test import INTERPRETING, PROFILES
from contract import assert_close_to_truth, qkv, rand
from vitkern.ops import attention_bwd, attention_fwd

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _sample_args(prof, kind):
    q, k, v = qkv(2, 4, 9, 13, 16, dv=8, hk=2 if kind == "gqa" else 4, device=prof.device, grad=True)
    mask = cu_q = cu_k = seed = None
    p = 0.0
    if kind == "bool":
        mask = (torch.rand(2, 1, 9, 13) > 0.3).to(prof.device).expand(2, 4, 9, 13)
    elif kind == "float":
        mask = rand(1, 4, 9, 13, device=prof.device, requires_grad=True).expand(2, 4, 9, 13)
    elif kind == "varlen":
        q, k, v = (rand(1, 4, 11, 16, device=prof.device, requires_grad=True) for _ in range(3))
        cu_q = cu_k = torch.tensor([0, 3, 3, 11], dtype=torch.int32, device=prof.device)
    elif kind == "dropout":
        seed, p = torch.tensor([42]), 0.2
    return (q, k, v, mask, cu_q, cu_k, seed, -1, -1, 0.3, kind == "causal", p, prof.backend)


@pytest.mark.parametrize("kind", ["dense", "bool", "float", "gqa", "varlen", "causal", "dropout"])
def test_opcheck_forward_and_backward_ops(prof, kind):
    args = _sample_args(prof, kind)
    torch.library.opcheck(attention_fwd, args, test_utils=OPCHECK_TESTS)
    out, lse = attention_fwd(*args)
    q, k, v, mask = args[:4]
    dout = torch.randn_like(out)
    mask_grad = mask is not None and mask.is_floating_point()
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, None if mask is None else mask.detach(),
                *args[4:7], -1, -1, 0.3, kind == "causal", args[11], mask_grad, prof.backend)
    torch.library.opcheck(attention_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


class _Block(torch.nn.Module):
    """A small pre-norm attention block calling both public functions."""

    def __init__(self, backend):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.proj = torch.nn.Linear(32, 32)
        self.backend = backend

    def forward(self, x, mask, packed, cu):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = vitkern.scaled_dot_product_attention(q, k, v, mask, backend=self.backend)
        y = self.proj(a.transpose(1, 2).reshape(b, n, 32))
        pq, pk, pv = self.qkv(packed).view(-1, 3, 2, 16).unbind(1)
        z = vitkern.varlen_attention(pq, pk, pv, cu, backend=self.backend)
        return y.sum() + z.sum() * 0.5


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(prof, compiler):
    if prof.backend == "triton" and prof.device == "cpu":
        pytest.skip("interpreted Triton is not compiled")
    if compiler == "inductor" and prof.backend != PROFILES[-1].backend:
        pytest.skip("inductor is slow to compile on this machine: run it for one backend")
    torch._dynamo.reset()
    model = _Block(prof.backend).to(prof.device)
    x = rand(2, 11, 32, device=prof.device, requires_grad=True)
    mask = (torch.rand(2, 1, 11, 11) > 0.3).to(prof.device)
    packed = rand(9, 32, device=prof.device, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=prof.device)
    eager = model(x, mask, packed, cu)
    ge = torch.autograd.grad(eager, [x, packed] + list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    got = compiled(x, mask, packed, cu)
    gg = torch.autograd.grad(got, [x, packed] + list(model.parameters()))
    assert_close_to_truth(got.detach(), eager.detach().double(), None, "compiled output")
    for a, b in zip(gg, ge):
        assert_close_to_truth(a, b.double(), None, "compiled gradient")


def test_auto_selection_prefers_fused_backend():
    q, k, v = qkv(1, 2, 5, 5, 16)
    from vitkern import backends
    chosen = backends.select(None, q, k, v, None, None, 0.0)
    expected = "cpu" if "cpu" in vitkern.available_backends() else "reference"
    assert chosen == expected


def test_auto_selection_falls_back_when_fused_cannot_serve():
    if "cpu" not in vitkern.available_backends():
        pytest.skip("cpu backend not built")
    q, k, v = qkv(1, 1, 3, 3, 300)   # head dim beyond the fused kernel
    out = vitkern.scaled_dot_product_attention(q, k, v)
    ref = vitkern.scaled_dot_product_attention(q, k, v, backend="reference")
    assert torch.equal(out, ref)


def test_available_backends_match_this_install():
    import importlib.util
    names = vitkern.available_backends()
    assert "reference" in names
    assert ("cpu" in names) == vitkern._ext.HAS_C
    if importlib.util.find_spec("triton") is not None:
        assert ("triton" in names) == (INTERPRETING or torch.cuda.is_available())
    else:
        assert "triton" not in names
