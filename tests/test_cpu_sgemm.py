"""The CPU kernel's float32 GEMMs under the fp32 path (csrc/cpu_features.h: VITKERN_CPU_SGEMM=blas|avx2|avx512):
each one that runs here against float64 math, forward and backward, at sizes and head dims that are not multiples
of its register blocks (6×16 AVX2, 6×64 AVX-512) or the AVX2 kernel's 256-deep k slices, with masks, causal and
varlen; one that cannot run is skipped with the kernel's reason, and a bad setting is an error naming the variable."""
from __future__ import annotations

import json

import pytest
import torch

import vitkern
from cpu_path_cases import check_masked_and_causal, check_varlen, ref, sdpa
from contract import check_against_truth, qkv, rand

pytestmark = pytest.mark.skipif(not vitkern.backends.get("cpu").available(), reason="the C++ extension is not built")

NAMES = {"blas": "fp32_blas", "avx2": "fp32_avx2", "avx512": "fp32_avx512"}


def chosen_float32():
    return json.loads(torch.ops.vitkern_cpu.cpu_features())["chosen"]["float32"]


@pytest.fixture(params=list(NAMES))
def gemm(request, monkeypatch):
    monkeypatch.setenv("VITKERN_CPU_SGEMM", request.param)
    chosen = chosen_float32()
    if chosen != NAMES[request.param]:
        assert chosen.startswith("error: ") and "cannot run here" in chosen, chosen
        pytest.skip(f"VITKERN_CPU_SGEMM={request.param} cannot run on this machine: {chosen}")
    return request.param



def test_default_gemm(monkeypatch):
    """The own AVX-512 kernel where the CPU has AVX-512F (faster than MKL in-kernel, benchmarks/NOTES.md), else the
    own AVX2 kernel on an AMD CPU (MKL's generic kernels there) or without a BLAS, else the BLAS."""
    monkeypatch.delenv("VITKERN_CPU_SGEMM", raising=False)
    info = json.loads(torch.ops.vitkern_cpu.cpu_features())
    config = torch.__config__.show()
    has_blas = "BLAS_INFO=mkl" in config or "BLAS_INFO=open" in config
    if info["cpu"]["avx512f"] and "fp32_avx512" in info["compiled"]:
        want = "fp32_avx512"
    elif info["cpu"]["avx2"] and info["cpu"]["fma"] and (info["cpu"]["amd"] or not has_blas):
        want = "fp32_avx2"
    else:
        want = "fp32_blas"
    assert chosen_float32() == want


def test_vendor_matches_the_os():
    """The AMD flag (it picks the fp32 GEMM) is cpuid's vendor string, as the OS reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            vendors = {line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")}
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    if len(vendors) != 1:
        pytest.skip(f"/proc/cpuinfo names {len(vendors)} vendors")
    info = json.loads(torch.ops.vitkern_cpu.cpu_features())
    assert info["cpu"]["amd"] == (vendors.pop() == "AuthenticAMD")


def test_bad_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("VITKERN_CPU_SGEMM", "mkl")
    q, k, v = qkv(1, 1, 4, 4, 8)
    with pytest.raises(RuntimeError, match="VITKERN_CPU_SGEMM: expected blas, avx2 or avx512, got 'mkl'"):
        sdpa(q, k, v)


# (n, d, dv): rows 1 and 7 (under one 6-row block), 197 and 785 (ragged blocks, and 785-key P·V products deeper
# than one 256-deep k slice, 785-wide score tiles wider than one 256-column block); head dims 8 (a half vector),
# 80 and 96 (ragged 16-column panels), 256, and 13/7 (a k depth under one 8×8 transpose block).
@pytest.mark.parametrize("n,d,dv", [(1, 64, 64), (7, 8, 8), (197, 64, 64), (197, 80, 96), (785, 96, 80),
                                    (65, 256, 256), (50, 13, 7)])
def test_dense_against_float64(gemm, n, d, dv):
    q, k, v = qkv(2, 3, n, n, d, dv=dv, grad=True, seed=n + d)
    check_against_truth(sdpa, (q, k, v), ref, f"{gemm} n={n} d={d} dv={dv}")


def test_cross_attention_shapes(gemm):
    q, k, v = qkv(1, 2, 300, 61, 64, dv=40, grad=True, seed=4)
    check_against_truth(sdpa, (q, k, v), ref, f"{gemm} 300x61")


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_masked_and_causal(gemm, kind):
    check_masked_and_causal(kind, torch.float32, gemm)


@pytest.mark.parametrize("lengths", [[1, 7, 197], [785, 64, 5]])
def test_varlen(gemm, lengths):
    check_varlen(lengths, torch.float32, gemm)


def test_non_contiguous_inputs(gemm):
    """Row strides that are not the head dim (a [B, N, H, D] view), which the GEMM reads in place."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand(2, 197, 3, 64, gen=gen).transpose(1, 2).requires_grad_() for _ in range(3))
    check_against_truth(sdpa, (q, k, v), ref, f"{gemm} strided")


@pytest.mark.parametrize("stream", ["1", "0"])
@pytest.mark.parametrize("n,d,dv", [(197, 64, 64), (300, 80, 40), (50, 13, 7)])
def test_streamed_output_rows(gemm, stream, n, d, dv, monkeypatch):
    """Output rows written around the caches (VITKERN_CPU_STREAM_OUT=1; by default only when a call's tensors
    overflow the last-level cache, too big for a test) and forced off; dv 7 cannot stream (rows of whole 8-float
    vectors only) and takes the plain stores either way."""
    monkeypatch.setenv("VITKERN_CPU_STREAM_OUT", stream)
    q, k, v = qkv(2, 3, n, n, d, dv=dv, grad=True, seed=n + dv)
    check_against_truth(sdpa, (q, k, v), ref, f"{gemm} stream={stream} n={n} d={d} dv={dv}")
