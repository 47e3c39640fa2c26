"""The Triton backend's host path without a GPU: the launches are built as on a device and handed to a stub
instead of Triton's launcher. Launch counts per forward / backward, and what is remembered between calls (the
autotuner's decision per signature, the varlen program map and the mask tile summary per unchanged tensor)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@pytest.fixture
def stub(monkeypatch):
    """Records the kernels launched (by name) instead of launching them."""
    from vitkern.triton_kernels import autotune, mask_summary
    launched = []

    def launch(launches):
        launched.extend(kernel.__name__ for kernel, grid, args, kwargs in launches)

    def launch_one(kernel, grid, args, kwargs):
        launched.append(kernel.__name__)
    monkeypatch.setattr(autotune, "launch", launch)
    # both names, so the summary memo sees the regular launcher (it does not remember aot_check's stand-in)
    monkeypatch.setattr(mask_summary, "launch", launch_one)
    monkeypatch.setattr(mask_summary, "_launch", launch_one)
    monkeypatch.setenv(autotune.ENV, "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the GPU's tile table, also in the interpreter run
    autotune.clear()
    yield launched
    autotune.clear()


def _call(mask=None, cu=None, n=37):
    from vitkern.backends.base import empty_bhnd
    from vitkern.triton_kernels.attention_bwd import attention_backward
    from vitkern.triton_kernels.attention_fwd import attention_forward
    b, h, d = (1, 2, 32) if cu is not None else (2, 2, 32)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float16) for _ in range(3))
    out, lse = empty_bhnd(b, h, n, d, q), torch.empty(b, h, n)
    grads = [empty_bhnd(b, h, n, d, q) for _ in range(3)]

    def fwd():
        attention_forward(q, k, v, mask, cu, cu, -1, -1, None, 0.2, False, 0.0, out, lse)

    def bwd():
        attention_backward(out, q, k, v, out, lse, mask, cu, cu, -1, -1, None, 0.2, False, 0.0, False, *grads,
                           q.new_empty(0))
    return fwd, bwd


def test_launch_counts(stub):
    fwd, bwd = _call()
    fwd()
    assert stub == ["_attention_fwd_kernel"]
    stub.clear()
    bwd()
    assert stub == ["_bwd_dq_kernel", "_bwd_dkdv_kernel"], stub


@pytest.mark.parametrize("dtype", [torch.bool, torch.float16], ids=str)
def test_mask_summary_is_remembered_until_the_mask_changes(stub, dtype):
    from vitkern.triton_kernels import config
    base = torch.rand(2, 1, 37, 37) > 0.3
    if dtype != torch.bool:
        base = torch.where(base, 0.0, -math.inf).to(dtype)
    mask = base.expand(2, 2, 37, 37)
    # A bool mask is also packed into words (mask_bits.py): along keys for the forward and dQ, along queries
    # (mask^T) for dK/dV.
    pack = ["_pack_bits_kernel"] if dtype == torch.bool else []
    fwd, bwd = _call(mask=mask)
    fwd()
    assert stub == pack + ["_tile_state_kernel", "_attention_fwd_kernel"]
    stub.clear()
    fwd_again, _ = _call(mask=base.expand(2, 2, 37, 37))   # a new view of the same mask
    fwd_again()
    bwd()
    # One summary per distinct tile shape: dQ reuses the forward's where its tiles are the same.
    heavy = config.is_heavy("bwd_dq", 1 if dtype == torch.bool else 2, False, False, False, 32, 32, torch.float16)
    kv, dq = config.backward_configs(32, 32, torch.float16, heavy=heavy)
    fw = config.forward_config(32, 32, torch.float16, heavy=heavy)
    assert (kv.block_m, kv.block_n) != (dq.block_m, dq.block_n)
    dq_summary = [] if (dq.block_m, dq.block_n) == (fw.block_m, fw.block_n) else ["_tile_state_kernel"]
    assert stub == (["_attention_fwd_kernel"] + dq_summary + ["_bwd_dq_kernel"] + pack
                    + ["_tile_state_kernel", "_bwd_dkdv_kernel"]), stub
    stub.clear()
    bwd()
    assert stub == ["_bwd_dq_kernel", "_bwd_dkdv_kernel"], stub
    stub.clear()
    base[0, 0, 0, 0] = 0 if base[0, 0, 0, 0] else 1    # an in-place write: summarized (and packed) again
    fwd()
    assert stub == pack + ["_tile_state_kernel", "_attention_fwd_kernel"]


def test_varlen_map_is_remembered_until_cu_seqlens_changes():
    from vitkern.triton_kernels import varlen_map
    cu = torch.tensor([0, 5, 5, 37], dtype=torch.int32)
    first = varlen_map.block_map(cu, 37, 16, -1)
    assert varlen_map.block_map(cu, 37, 16, -1) is first
    assert varlen_map.block_map(cu, 37, 32, -1) is not first        # another block size
    fresh = varlen_map._block_map(cu, 37, 16, -1)
    assert all(torch.equal(a, b) for a, b in zip(first[:2], fresh[:2])) and first[2] == fresh[2]
    cu[1] = 20
    again = varlen_map.block_map(cu, 37, 16, -1)
    assert again is not first
    want = varlen_map._block_map(cu, 37, 16, -1)
    assert all(torch.equal(a, b) for a, b in zip(again[:2], want[:2]))


def test_autotune_decision_is_looked_up_once_per_signature(stub, monkeypatch):
    from vitkern.triton_kernels import autotune
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, "")
    keys = []
    real_key = autotune.key
    monkeypatch.setattr(autotune, "key", lambda *a, **kw: keys.append(1) or real_key(*a, **kw))
    monkeypatch.setattr(autotune, "measure", lambda run, device: (run(), 1.0)[1])
    fwd, bwd = _call()
    for _ in range(3):
        fwd()
        bwd()
    assert len(keys) == 3            # fwd, bwd_dkdv, bwd_dq: each decided once
    monkeypatch.setenv(autotune.ENV, "0")   # a setting is part of the signature
    stub.clear()
    fwd()
    assert stub == ["_attention_fwd_kernel"] and len(keys) == 3
