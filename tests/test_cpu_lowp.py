"""The CPU kernel's tile-product paths (csrc/cpu_features.h): each bf16 path against float64 math at the shared
suite's sizes, with masks, causal, varlen and gradients; a forced path that cannot run here is an error; every
compiled-in path either runs here or is skipped with the reason. VITKERN_CPU_PATH selects the path per call."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vitkern
from cpu_path_cases import check_masked_and_causal, check_varlen, ref, sdpa
from contract import check_against_truth, max_err, qkv

pytestmark = pytest.mark.skipif(not vitkern.backends.get("cpu").available(), reason="the C++ extension is not built")

PATHS = {"fp32": "fp32_blas", "avx512_bf16": "avx512_bf16", "amx": "amx_bf16"}
FP32_NAMES = ("fp32_blas", "fp32_avx2", "fp32_avx512")  # the fp32 path under either float32 GEMM (tests/test_cpu_sgemm.py)


def features():
    return json.loads(torch.ops.vitkern_cpu.cpu_features())


def runs_here(env_name):
    """(True, '') when VITKERN_CPU_PATH=env_name can run bf16 here, else (False, the kernel's reason)."""
    import os
    old = os.environ.get("VITKERN_CPU_PATH")
    os.environ["VITKERN_CPU_PATH"] = env_name
    try:
        chosen = features()["chosen"]["bfloat16"]
    finally:
        if old is None:
            del os.environ["VITKERN_CPU_PATH"]
        else:
            os.environ["VITKERN_CPU_PATH"] = old
    want = FP32_NAMES if env_name == "fp32" else (PATHS[env_name],)
    return (True, "") if chosen in want else (False, chosen)


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    ok, why = runs_here(request.param)
    if not ok:
        pytest.skip(f"{request.param} cannot run on this machine: {why}")
    monkeypatch.setenv("VITKERN_CPU_PATH", request.param)
    return request.param



def test_features_report_shape():
    f = features()
    assert set(f) == {"compiled", "cpu", "chosen", "amx_gemm"}
    assert set(FP32_NAMES) <= set(f["compiled"])
    assert set(f["chosen"]) == {"float32", "bfloat16", "float16"}
    assert f["chosen"]["float32"] in FP32_NAMES  # float32 never runs in reduced precision
    assert f["amx_gemm"] in ("own", "brgemm")  # which product the amx_bf16 path runs (VITKERN_CPU_AMX_GEMM)
    for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_os_enabled"):
        assert isinstance(f["cpu"][flag], bool)


@pytest.mark.parametrize("env_name", list(PATHS))
def test_every_compiled_path_runs_or_says_why(env_name):
    name = PATHS[env_name]
    if name not in features()["compiled"]:
        pytest.skip(f"{name} is not compiled into this build")
    ok, why = runs_here(env_name)
    if not ok:
        assert why.startswith("error: ") and "cannot run here" in why, why
        pytest.skip(f"{name} is compiled in but cannot run here: {why}")
    q, k, v = qkv(1, 2, 33, 33, 16, dtype=torch.bfloat16)
    import os
    os.environ["VITKERN_CPU_PATH"] = env_name
    try:
        out = sdpa(q, k, v)
    finally:
        del os.environ["VITKERN_CPU_PATH"]
    assert max_err(out, ref(q, k, v)) < 2e-2


def test_forced_path_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("VITKERN_CPU_PATH", "no_such_path")
    q, k, v = qkv(1, 1, 4, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="VITKERN_CPU_PATH: expected fp32, avx512_bf16 or amx, got 'no_such_path'"):
        sdpa(q, k, v)


@pytest.mark.parametrize("n", [1, 7, 197, 785])
@pytest.mark.parametrize("d", [8, 64, 80, 96])
def test_dense_against_float64(path, n, d):
    q, k, v = qkv(1, 2, n, n, d, dtype=torch.bfloat16, grad=True, seed=n + d)
    check_against_truth(sdpa, (q, k, v), ref, f"{path} n={n} d={d}")


@pytest.mark.parametrize("nq,nk,d", [(1100, 1100, 64), (300, 1500, 80)])
def test_long_sequence_tiles(path, nq, nk, d):
    """Past 256 queries and 1,024 keys: the AMX path's long-sequence tiles (64 or 128 queries by 512 keys, ragged
    last tiles, online rescaling across key tiles) in the forward and the backward."""
    q, k, v = qkv(1, 2, nq, nk, d, dtype=torch.bfloat16, grad=True, seed=nq + d)
    check_against_truth(sdpa, (q, k, v), ref, f"{path} nq={nq} nk={nk} d={d}")


@pytest.mark.parametrize("d,dv", [(7, 13), (256, 256), (33, 64)])
def test_odd_and_large_head_dims(path, d, dv):
    q, k, v = qkv(1, 2, 50, 61, d, dv=dv, dtype=torch.bfloat16, grad=True, seed=d)
    check_against_truth(sdpa, (q, k, v), ref, f"{path} d={d} dv={dv}")


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_masked_and_causal(path, kind):
    check_masked_and_causal(kind, torch.bfloat16, path)


@pytest.mark.parametrize("lengths", [[1, 7, 197], [785, 64, 5]])
def test_varlen(path, lengths):
    check_varlen(lengths, torch.bfloat16, path)


def test_error_no_worse_than_twice_torch_bf16(path):
    """Issue 14's bar: the bf16 path's error against float64 at most 2x that of torch's bf16 SDPA (same inputs)."""
    q, k, v = qkv(4, 4, 197, 197, 64, dtype=torch.bfloat16, seed=11)
    exact = ref(q, k, v)
    ours, torchs = max_err(sdpa(q, k, v), exact), max_err(F.scaled_dot_product_attention(q, k, v), exact)
    assert ours <= 2 * torchs, f"{path}: error {ours:.3e} > 2 x torch bf16 SDPA's {torchs:.3e}"


def test_float32_inputs_keep_the_fp32_path(monkeypatch):
    """A forced bf16 path concerns bf16 inputs only: float32 stays exact to float32 rounding."""
    ok, _ = runs_here("avx512_bf16")
    if ok:
        monkeypatch.setenv("VITKERN_CPU_PATH", "avx512_bf16")
    q, k, v = qkv(1, 2, 100, 100, 64, seed=2)
    assert max_err(sdpa(q, k, v), ref(q, k, v)) < 1e-5


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.3, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_scales_against_float64(path, scale, masked):
    """The bf16 forward folds a positive scale into the exp pass (raw dot products, row max scaled once); zero and
    negative scales, and additive masks, take the scaled-scores route: every one against float64 math."""
    gen = torch.Generator().manual_seed(5)
    mask = None
    if masked:  # additive, -inf where dropped, on some tiles only
        mask = torch.randn(70, 90, generator=gen).to(torch.bfloat16)
        mask[:, 40:] = torch.where(torch.rand(70, 50, generator=gen) > 0.3, mask[:, 40:], float("-inf"))
    q, k, v = qkv(1, 2, 70, 90, 48, dtype=torch.bfloat16, grad=True, seed=3)
    fn = lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, backend="cpu")
    tr = lambda q, k, v, upcast=True: ref_scaled(q, k, v, mask, scale, upcast)
    check_against_truth(fn, (q, k, v), tr, f"{path} scale={scale} masked={masked}",
                        recompute_scale=abs(scale) or None)


def ref_scaled(q, k, v, mask, scale, upcast):
    import truth
    m = None if mask is None else mask.to(q.dtype)
    return truth.attention(q, k, v, mask=m, scale=scale, upcast=upcast)


@pytest.mark.parametrize("nq,nk", [(71, 90), (130, 45)])
def test_mask_gradient_against_float64(path, nq, nk):
    """A float mask that requires grad takes the backward's float32-tile route (P and dS rounded and packed after
    the pass, not in it): odd query counts (a last row pair with one row), fully masked query rows (P = dS = 0)
    and -inf entries, against float64 math, gradients of q, k, v and the mask."""
    gen = torch.Generator().manual_seed(nq)
    mask = torch.randn(1, 1, nq, nk, generator=gen).to(torch.bfloat16)
    mask = mask.masked_fill(torch.rand(1, 1, nq, nk, generator=gen) < 0.3, float("-inf"))
    mask[..., 3, :] = float("-inf")  # a query row with no key
    mask[..., nq - 1, :] = float("-inf")
    mask.requires_grad_(True)
    q, k, v = qkv(1, 2, nq, nk, 40, dtype=torch.bfloat16, grad=True, seed=nk)
    fn = lambda q, k, v, m: vitkern.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="cpu")
    tr = lambda q, k, v, m, upcast=True: ref_masked(q, k, v, m, upcast)
    check_against_truth(fn, (q, k, v, mask), tr, f"{path} mask grad {nq}x{nk}")


def ref_masked(q, k, v, mask, upcast):
    import truth
    return truth.attention(q, k, v, mask=mask, upcast=upcast)
