"""Every bad input of api.md raises ValueError/TypeError (also RuntimeError, as torch's SDPA) naming the argument,
what was expected and what came."""
from __future__ import annotations

import pytest
import torch

import vitkern

sdpa = vitkern.scaled_dot_product_attention


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


SDPA_CASES = [
    # (description, call, exception, words that must appear in the message)
    ("query not a tensor", lambda: sdpa([1.0], t(1, 4), t(1, 4)), TypeError, ["query", "Tensor", "list"]),
    ("1-D query", lambda: sdpa(t(4), t(3, 4), t(3, 4)), ValueError, ["query", "at least 2", "1-D"]),
    ("integer dtype", lambda: sdpa(t(2, 4).long(), t(3, 4).long(), t(3, 4).long()), TypeError,
     ["query", "floating", "int64"]),
    ("key dtype mismatch", lambda: sdpa(t(2, 4), t(3, 4, dtype=torch.float64), t(3, 4)), TypeError,
     ["key", "float32", "float64"]),
    ("value dtype mismatch", lambda: sdpa(t(2, 4), t(3, 4), t(3, 4, dtype=torch.float16)), TypeError,
     ["value", "float16"]),
    ("head dim mismatch", lambda: sdpa(t(1, 2, 5, 8), t(1, 2, 6, 16), t(1, 2, 6, 8)), ValueError,
     ["key", "head dim", "8", "16"]),
    ("value length mismatch", lambda: sdpa(t(1, 2, 5, 8), t(1, 2, 6, 8), t(1, 2, 7, 8)), ValueError,
     ["value", "6", "7"]),
    ("batch mismatch", lambda: sdpa(t(2, 2, 5, 8), t(3, 2, 6, 8), t(3, 2, 6, 8)), ValueError,
     ["broadcast", "(2, 2)", "(3, 2)"]),
    ("heads mismatch without gqa", lambda: sdpa(t(1, 4, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 8)), ValueError,
     ["broadcast"]),
    ("gqa heads not a multiple", lambda: sdpa(t(1, 5, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 8), enable_gqa=True),
     ValueError, ["key", "multiple", "5", "2"]),
    ("mask not broadcastable", lambda: sdpa(t(1, 2, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 8), torch.ones(5, 7, dtype=bool)),
     ValueError, ["attn_mask", "(1, 2, 5, 6)", "(5, 7)"]),
    ("mask int dtype", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), torch.ones(5, 6, dtype=torch.int32)), TypeError,
     ["attn_mask", "bool or floating", "int32"]),
    ("mask not a tensor", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), [[True]]), TypeError, ["attn_mask", "list"]),
    ("dropout out of range", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), dropout_p=1.5), ValueError,
     ["dropout_p", "[0, 1]", "1.5"]),
    ("negative dropout", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), dropout_p=-0.1), ValueError, ["dropout_p"]),
    ("scale nan", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), scale=float("nan")), ValueError, ["scale", "nan"]),
    ("scale string", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), scale="1"), ValueError, ["scale", "'1'"]),
    ("is_causal not bool", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), is_causal=1), TypeError, ["is_causal", "int"]),
    ("unknown backend", lambda: sdpa(t(5, 8), t(6, 8), t(6, 8), backend="cuda-magic"), ValueError,
     ["backend", "reference", "cuda-magic"]),
]


def assert_raises_naming(desc, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    # torch's SDPA raises RuntimeError for bad input: code written around it must catch vitkern's errors too.
    assert isinstance(info.value, RuntimeError), f"{desc}: {type(info.value).__name__} is not a RuntimeError"
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{desc}: {w!r} missing from {msg!r}"


@pytest.mark.parametrize("desc,call,exc,words", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_bad_input(desc, call, exc, words):
    assert_raises_naming(desc, call, exc, words)


def vl(q=None, k=None, v=None, cu=None, **kw):
    q = t(10, 2, 8) if q is None else q
    k = t(10, 2, 8) if k is None else k
    v = t(10, 2, 8) if v is None else v
    cu = torch.tensor([0, 4, 10], dtype=torch.int32) if cu is None else cu
    return vitkern.varlen_attention(q, k, v, cu, **kw)


VARLEN_CASES = [
    ("q 4-D", lambda: vl(q=t(1, 10, 2, 8)), ValueError, ["q", "3-D", "4-D"]),
    ("k 2-D", lambda: vl(k=t(10, 8)), ValueError, ["k", "3-D", "2-D"]),
    ("head dim mismatch", lambda: vl(k=t(10, 2, 4)), ValueError, ["key", "8", "4"]),
    ("heads not dividing", lambda: vl(q=t(10, 3, 8)), ValueError, ["k", "3", "2"]),
    ("v heads differ from k", lambda: vl(v=t(10, 1, 8)), ValueError, ["v", "heads", "1"]),
    ("cu_seqlens float", lambda: vl(cu=torch.tensor([0.0, 10.0])), ValueError, ["cu_seqlens_q", "int32/int64",
                                                                               "float32"]),
    ("cu_seqlens 2-D", lambda: vl(cu=torch.tensor([[0, 10]])), ValueError, ["cu_seqlens_q", "1-D", "2-D"]),
    ("cu_seqlens list", lambda: vl(cu=[0, 10]), TypeError, ["cu_seqlens_q", "list"]),
    ("cu_seqlens empty", lambda: vl(cu=torch.tensor([], dtype=torch.int32)), ValueError, ["cu_seqlens_q", "empty"]),
    ("cu_seqlens not starting at 0", lambda: vl(cu=torch.tensor([1, 10])), ValueError,
     ["cu_seqlens_q", "start at 0", "1"]),
    ("cu_seqlens decreasing", lambda: vl(cu=torch.tensor([0, 6, 4, 10])), ValueError,
     ["cu_seqlens_q", "non-decreasing", "4", "6"]),
    ("cu_seqlens wrong end", lambda: vl(cu=torch.tensor([0, 4, 9])), ValueError, ["cu_seqlens_q", "10", "9"]),
    ("cu_seqlens_k needed", lambda: vl(k=t(12, 2, 8), v=t(12, 2, 8)), ValueError, ["cu_seqlens_k", "12", "10"]),
    ("cu_seqlens_k count differs", lambda: vl(cu_seqlens_k=torch.tensor([0, 10])), ValueError,
     ["cu_seqlens_k", "3", "2"]),
    ("cu_seqlens_k wrong end", lambda: vl(cu_seqlens_k=torch.tensor([0, 3, 11])), ValueError,
     ["cu_seqlens_k", "10", "11"]),
    ("max_seqlen too small", lambda: vl(max_seqlen_q=5), ValueError, ["max_seqlen_q", "6", "5"]),
    ("max_seqlen negative", lambda: vl(max_seqlen_k=-1), ValueError, ["max_seqlen_k", "-1"]),
    ("dtype mismatch", lambda: vl(v=t(10, 2, 8, dtype=torch.float64)), TypeError, ["v", "float64"]),
    ("return_lse not bool", lambda: vl(return_lse="yes"), TypeError, ["return_lse", "str"]),
    ("unknown backend", lambda: vl(backend="nope"), ValueError, ["backend", "nope"]),
]


@pytest.mark.parametrize("desc,call,exc,words", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_bad_input(desc, call, exc, words):
    assert_raises_naming(desc, call, exc, words)


def test_backend_that_cannot_take_input_says_why():
    # The cpu backend takes CPU tensors up to head dim 256; ask it for 300.
    if "cpu" not in vitkern.available_backends():
        pytest.skip("cpu backend not built")
    with pytest.raises(ValueError, match="backend='cpu'.*head dim"):
        sdpa(t(1, 4, 300), t(1, 4, 300), t(1, 4, 300), backend="cpu")


def test_unavailable_backend_says_why():
    if "triton" in vitkern.available_backends():
        pytest.skip("triton is available here")
    with pytest.raises(ValueError, match="triton"):
        sdpa(t(5, 16), t(5, 16), t(5, 16), backend="triton")


def test_device_mismatch_names_argument():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="key.*device"):
        sdpa(t(5, 8), t(6, 8).cuda(), t(6, 8).cuda())
