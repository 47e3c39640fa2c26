"""Block sizes and launch parameters of the attention kernels.

Block sizes are a function of (head dim, dtype, interpreter) only, never of sequence lengths, so a packed batch
with new cu_seqlens or a new total length T reuses the compiled kernels (lengths are also excluded from
Triton's integer specialization, see ``do_not_specialize`` in the kernels). The GPU table is a first guess for
Hopper (H100/H200) to be tuned on the device; the interpreter uses 32x16 tiles forward and 16x32 backward, so
that tiny test shapes still cross tile boundaries and code that mixes up BLOCK_M and BLOCK_N fails there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MAX_HEAD_DIM = 256
# tl.dot needs every dimension of its operands to be a power of two and at least 16.
MIN_BLOCK = 16


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int      # query rows per tile
    block_n: int      # key rows per tile
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def padded_head_dim(d: int) -> int:
    """Head dims are padded (with masked loads) to the next power of two, at least 16."""
    return max(MIN_BLOCK, 1 << (max(d, 1) - 1).bit_length())


FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")


def input_precision(dtype: torch.dtype):
    """tl.dot's input_precision: fp32 inputs get exact fp32 products ("ieee", no tensor cores) unless
    VITKERN_TRITON_FP32_PRECISION opts into "tf32x3" (three tf32 products, close to fp32, on tensor cores) or
    "tf32" (fastest, ~1e-3 relative error). fp16/bf16 get Triton's default (their products are exact)."""
    if dtype != torch.float32:
        return None
    choice = os.environ.get("VITKERN_TRITON_FP32_PRECISION", "ieee")
    if choice not in FP32_PRECISIONS:
        raise ValueError(f"VITKERN_TRITON_FP32_PRECISION: expected one of {FP32_PRECISIONS}, got {choice!r}")
    return choice


def batch_strides(x: torch.Tensor) -> tuple:
    """x's strides with the batch stride zeroed when there is one batch (the packed layout): the batch stride
    of [1, H, T, D] changes with T, and Triton would specialize on it (divisibility by 16)."""
    st = x.stride()
    return (0,) + tuple(st[1:]) if x.shape[0] == 1 else tuple(st)


def forward_config(d: int, dv: int, dtype: torch.dtype, heavy: bool = False) -> LaunchConfig:
    """Tiles of the forward kernel. ``heavy``: a mask or dropout is on (more live registers per score).

    Chosen so that no variant spills registers on sm_90 (checked by ``python -m
    vitkern.triton_kernels.aot_check``); speed is to be tuned on the device."""
    if interpreting():
        return LaunchConfig(32, 16, 1, 1)
    width = max(padded_head_dim(d), padded_head_dim(dv))
    if dtype == torch.float32:          # "ieee" products run on FMA units: small tiles
        return LaunchConfig(32, 32, 8, 2) if width <= 64 else LaunchConfig(32, 16, 4, 2) if width <= 128 \
            else LaunchConfig(16, 16, 8, 2)
    if width <= 64:
        return LaunchConfig(128, 64, 8, 3)
    if width <= 128:
        return LaunchConfig(64, 64, 8, 2) if heavy else LaunchConfig(128, 64, 8, 3)
    return LaunchConfig(32, 64, 8, 2) if heavy else LaunchConfig(64, 32, 8, 2)


def backward_configs(d: int, dv: int, dtype: torch.dtype, heavy: bool = False) -> tuple:
    """(dK/dV kernel tiles, dQ kernel tiles). Each kernel keeps a wide tile resident (keys for dK/dV, queries
    for dQ) and loops over narrow tiles of the other side; see forward_config. ``heavy`` here also covers
    varlen (its bounds checks cost registers in the dK/dV kernel)."""
    if interpreting():
        return LaunchConfig(16, 32, 1, 1), LaunchConfig(32, 16, 1, 1)
    width = max(padded_head_dim(d), padded_head_dim(dv))
    if dtype == torch.float32:
        cfg = LaunchConfig(16, 32, 8, 1) if 64 < width <= 128 else LaunchConfig(16, 16, 8, 1)
        return cfg, cfg
    if width <= 128:
        kv = LaunchConfig(32, 64, 8, 1) if heavy else LaunchConfig(32, 128, 8, 2 if width <= 64 else 1)
        return kv, LaunchConfig(128, 32, 8, 2)
    if heavy:
        return LaunchConfig(32, 32, 8, 1), LaunchConfig(32, 32, 8, 1)
    return LaunchConfig(16, 64, 8, 1), LaunchConfig(64, 16, 8, 2)
