"""Which backends the shared contract suite runs against here, and at what sizes.

A new backend only adds a profile: every test in test_contract_*.py then runs against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import vitkern

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# VITKERN_TEST_QUICK=1 (scripts/gpu_check.sh): CUDA profiles run fewer sizes and head dims, so that a lent GPU
# spends its minutes on kernels rather than on Triton compiles. Every dtype stays; the kept head dims still
# cover padding (8 -> 16), a non-power of two (96) and the widest tile (256), and the sizes one row, one
# partial tile and several tiles (785 stays in the cross-attention tests through ``big``).
QUICK = os.environ.get("VITKERN_TEST_QUICK", "0") == "1"


@dataclass(frozen=True)
class Profile:
    backend: str
    device: str
    dtypes: tuple            # dtypes whose outputs are checked
    sizes: tuple             # sequence lengths (not tile multiples)
    head_dims: tuple
    big: int                 # the largest N the profile runs in the heavier tests
    fp64: bool               # gradcheck in float64

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}"


ALL_SIZES = (1, 7, 197, 785)
ALL_HEAD_DIMS = (8, 32, 64, 80, 96, 128, 256)
CUDA_SIZES = (1, 7, 197) if QUICK else ALL_SIZES
CUDA_HEAD_DIMS = (8, 96, 256) if QUICK else ALL_HEAD_DIMS
LOW = (torch.float16, torch.bfloat16)


def _profiles() -> list[Profile]:
    names = vitkern.available_backends()
    out = []
    if INTERPRETING:
        # Triton's interpreter is a numpy simulation (~1000x slower, no bf16): tiny sizes only, and in a run of
        # its own so the rest of the suite does not pay for it.
        if "triton" in names:
            out.append(Profile("triton", "cpu", (torch.float32, torch.float16), (1, 7, 33), (16, 80), 33, False))
        return out
    out.append(Profile("reference", "cpu", (torch.float32,) + LOW, ALL_SIZES, ALL_HEAD_DIMS, 785, True))
    if "cpu" in names:
        out.append(Profile("cpu", "cpu", (torch.float32,) + LOW, ALL_SIZES, ALL_HEAD_DIMS, 785, True))
    if torch.cuda.is_available():
        out.append(Profile("reference", "cuda", (torch.float32,) + LOW, CUDA_SIZES, CUDA_HEAD_DIMS, 785, True))
        if "triton" in names:
            out.append(Profile("triton", "cuda", (torch.float32,) + LOW, CUDA_SIZES, CUDA_HEAD_DIMS, 785, False))
    return out


PROFILES = _profiles()
