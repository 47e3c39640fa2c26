"""Block sizes and launch parameters of the attention kernels: the static table and the autotuner's candidates.

Block sizes are a function of (head dim, dtype, interpreter, "heavy") only, never of sequence lengths, so a
packed batch with new cu_seqlens or a new total length T reuses the compiled kernels (lengths are also excluded
from Triton's integer specialization, see ``do_not_specialize`` in the kernels). The static table
(``forward_config`` / ``backward_configs``) is a spill-free first guess for Hopper (H100/H200); on a GPU the
autotuner (autotune.py) times it against a few neighbours (``candidates``: the table entry first, then block
sizes halved/doubled, num_warps 4/8, num_stages +-1, the ones that spill on sm_90 left out) once per key and
keeps the fastest; ``VITKERN_TRITON_AUTOTUNE=0`` keeps the table. Register allocation differs between Triton
releases, so what spills is recorded per release (``TRITON_RECORDS``: the spilling launch configs, and the table
entries replaced under that release; the installed release's, or the nearest recorded one's, applies). The
interpreter uses the table's 32x16 tiles forward and 16x32 backward, so that tiny test shapes still cross tile
boundaries and code that mixes up BLOCK_M and BLOCK_N fails there.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. (triton.cdiv is a constexpr function: ~20 us per host call in Triton 3.8.)"""
    return -(-a // b)


def padded_head_dim(d: int) -> int:
    """Head dims are padded (with masked loads) to the next power of two, at least 16."""
    return max(MIN_BLOCK, 1 << (max(d, 1) - 1).bit_length())


def head_split(d: int) -> tuple:
    """(first, second) column chunks a head dim of d is computed in: (padded_head_dim(d), 0) unless d fills
    at most 3/4 of its padded width and is over 32, then half the padded width plus the rest padded (80 ->
    64 + 16, 96 -> 64 + 32, 160 -> 128 + 32): tl.dot's operands must have power-of-two shapes, and computing
    d = 80 or 96 as 128 costs 1.6x / 1.33x the tensor-core work, which bounds the kernel at these widths."""
    full = padded_head_dim(d)
    if d <= 32 or 4 * d > 3 * full:
        return full, 0
    return full // 2, padded_head_dim(d - full // 2)


def computed_width(d: int, dv: int) -> int:
    """The widest operand's columns as computed (head_split's chunks summed): what the registers hold."""
    return max(sum(head_split(d)), sum(head_split(dv)))


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


def _release_table(kernels: tuple):
    """Decorates a table function: an entry listed in the installed Triton release's record (``record``) as
    replaced stands in for the function's own (never in the interpreter)."""
    def wrap(fn):
        @functools.wraps(fn)
        def table(d: int, dv: int, dtype: torch.dtype, heavy: bool = False):
            cfgs = fn(d, dv, dtype, heavy)
            replaced = {} if interpreting() else record().table
            if not replaced:
                return cfgs
            keys = [(kernel, _bits(dtype), _width_class(d, dv), bool(heavy)) for kernel in kernels]
            if isinstance(cfgs, LaunchConfig):
                return replaced.get(keys[0], cfgs)
            return tuple(replaced.get(key, c) for key, c in zip(keys, cfgs))
        return table
    return wrap


def is_heavy(kernel: str, mask_kind: int, dropout: bool, varlen: bool, causal: bool, d: int, dv: int,
             dtype: torch.dtype, mask_tma: bool = False) -> bool:
    """The tables' ``heavy`` for one kernel (KERNELS) of a call: more live registers per score. Dropout (the
    hash) is heavy everywhere; causal loops and varlen bounds in the backward of fp32 and width 256 (16-bit tiles
    up to width 128 hold them on the light tiles, both releases, since the row statistics come as one 8-byte pair
    a query: benchmarks/NOTES.md version 8). A float mask (mask_kind 2) is
    heavy where its partial tiles hold a [BLOCK_M, BLOCK_N] tile of entry pointers; read as TMA tiles
    (``mask_tma``, mask_operand.py; in the backward with dMask stored as TMA tiles too) it runs the light tiles up
    to width 128. A bool mask (1) is read as packed words (mask_bits.py) and runs the light tiles for 16-bit
    dtypes up to width 128. Width 256 and fp32 tiles leave no registers for a mask (their light tiles spill 8-24 B
    with one)."""
    roomy = dtype != torch.float32 and computed_width(d, dv) <= 128
    light_mask = mask_kind == 0 or (roomy and (mask_kind == 1 or mask_tma))
    return not light_mask or bool(dropout) or (bool(varlen or causal) and not roomy and kernel != "fwd")


@_release_table(("fwd",))
def forward_config(d: int, dv: int, dtype: torch.dtype, heavy: bool = False) -> LaunchConfig:
    """Tiles of the forward kernel. ``heavy``: see is_heavy (a float mask or dropout, more live registers per
    score).

    Chosen so that no variant spills registers on sm_90 (checked by ``python -m
    vitkern.triton_kernels.aot_check``); speed is to be tuned on the device."""
    if interpreting():
        return LaunchConfig(32, 16, 1, 1)
    width = computed_width(d, dv)
    if dtype == torch.float32:          # "ieee" products run on FMA units: small tiles
        if width <= 128:
            return LaunchConfig(32, 16, 8, 2) if heavy else LaunchConfig(32, 32, 8, 2) if width <= 64 \
                else LaunchConfig(32, 16, 4, 2)
        return LaunchConfig(16, 16, 8, 2)
    # Dense: 128x128 with 8 warps (two warpgroups of 64 rows, each wgmma 64x128): the fewest issued
    # instructions per score (sass_report.py). Heavy tiles are smaller: the partial-tile loop's mask entries
    # and dropout's hash need registers, and the larger tiles spill.
    if width <= 64:
        return LaunchConfig(128, 64, 8, 3) if heavy else LaunchConfig(128, 128, 8, 3)
    # Two stages at least: with one, K/V are plain loads waited for on every tile (no cp.async pipelining).
    if width <= 96:     # 80 = 64 + 16, 96 = 64 + 32 (head_split)
        return LaunchConfig(128, 64, 8, 2) if heavy else LaunchConfig(128, 128, 8, 2)
    if width <= 128:    # heavy: one warpgroup (8 warps on 64 rows would compute every score twice)
        return LaunchConfig(64, 32, 4, 2) if heavy else LaunchConfig(128, 128, 8, 2)
    # Head dim 256, heavy: 16 keys a step keep 128 query rows (two warpgroups, wgmma) beside the 128 x 256
    # accumulator; 32 keys spill, and 32 query rows run mma.sync.
    return LaunchConfig(128, 16, 8, 3) if heavy else LaunchConfig(128, 64, 8, 2)


def split_dkdv(d: int, dv: int, dtype: torch.dtype) -> bool:
    """Whether the dK/dV kernel runs as two launches, dV then dK (each recomputes S^T; dK also dP^T: 5 products
    instead of 4, 1.25x the tensor work). At 16-bit head dim 256 a warpgroup's 64 keys hold dK and dV of 64 x 256
    fp32 (256 registers a thread): every key tile of >= 64 keys spills, so the fused kernel had to run 32-key
    tiles on mma.sync; one accumulator a launch fits with 64 keys a warpgroup, every product on wgmma."""
    return dtype != torch.float32 and computed_width(d, dv) > 128


@_release_table(("bwd_dkdv", "bwd_dq"))
def backward_configs(d: int, dv: int, dtype: torch.dtype, heavy: bool = False) -> tuple:
    """(dK/dV kernel tiles, dQ kernel tiles). Each kernel keeps a wide tile resident (keys for dK/dV, queries
    for dQ) and loops over narrow tiles of the other side; see forward_config. ``heavy`` here also covers
    causal and varlen where is_heavy says so (their bounds checks and extra loops cost registers in the dK/dV
    kernel)."""
    if interpreting():
        return LaunchConfig(16, 32, 1, 1), LaunchConfig(32, 16, 1, 1)
    width = computed_width(d, dv)
    if dtype == torch.float32:
        if 64 < width <= 128:
            return LaunchConfig(16, 32, 8, 1), LaunchConfig(16, 16, 8, 1)
        if width <= 64:
            return LaunchConfig(16, 16, 8, 1), LaunchConfig(16, 16, 8, 1)
        return LaunchConfig(16, 16, 4, 1), LaunchConfig(16, 16, 8, 1)
    # dK/dV computes key-major tiles (S^T = K Q^T), so its M dimension is the key tile: >= 64 keys per
    # warpgroup keeps every product on wgmma (sm_90). One stage: the second one spills at N = 197.
    if width <= 64:     # (heavy dK/dV: dropout's hash, or a float mask by pointers, beside 64 query rows spill)
        kv = LaunchConfig(32, 128, 8, 1) if heavy else LaunchConfig(64, 128, 8, 1)
        return kv, LaunchConfig(128, 64, 8, 2)
    if width <= 96:     # dense: 32 query rows a step fit beside 128 keys x 96 (16 at 128); heavy as at 128
        kv = LaunchConfig(16, 128, 8, 1) if heavy else LaunchConfig(32, 128, 8, 1)
        return kv, LaunchConfig(128, 32, 8, 2) if heavy else LaunchConfig(128, 64, 8, 1)
    if width <= 128:    # 128 keys: two full warpgroups (64 keys with 8 warps compute every score twice)
        kv = LaunchConfig(16, 128, 8, 1)
        return kv, LaunchConfig(128, 32, 8, 2) if heavy else LaunchConfig(128, 64, 8, 1)
    # Head dim 256: dV and dK in two launches (split_dkdv), 128 keys (two warpgroups) a launch; dQ keeps 128
    # query rows (wgmma), 16 keys a step when heavy (32 spill there).
    kv = LaunchConfig(16, 128, 8, 1)
    return kv, LaunchConfig(128, 16, 8, 2) if heavy else LaunchConfig(128, 32, 8, 2)


# ------------------------------------------------------------------------------------------ autotuning
# The kernels the autotuner tunes one by one (the backward's delta pre-pass is not tuned).
KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
# How many neighbours of the table entry are timed (at most).
MAX_NEIGHBOURS = 4
MAX_BLOCK = 128
# Launch configs that spill registers on sm_90 in some variant of aot_check, recorded per Triton release by
# ``python -m vitkern.triton_kernels.aot_check --record`` (which compiles every neighbour of _neighbours), by
# (kernel, "16" or "32" bit, computed width class 64/96/128/256, heavy) -> {(block_m, block_n, num_warps,
# num_stages)}: they are never proposed. Regenerated for both releases on 2026-12-03 after the head-dim chunks,
# the tile lists and the one-warpgroup heavy tiles (aot_check --record in a scratch venv for 3.6.0), in two
# passes: a replaced table entry (below) has neighbours of its own, which the second pass compiles; the spills
# are the union of both. (The d256 entries changed on 2026-12-05 after that: their new neighbours are not in it.)
# Width classes 64, 96, 128 and 256 were recorded again on 2026-12-07 (aot_check --record --head-dims ..., both
# releases), when bool masks and TMA float masks moved to the light tiles (is_heavy); under 3.6 width 128 in two
# passes (its replaced d128 forward entry went back to the table's own, whose neighbours the second compiled).
# Width classes 64 and 128 once more later that day, when the backward with a TMA float mask (dMask stored as TMA
# tiles) moved to the light tiles, and 96 after a float-mask-alone variant joined it (a full aot_check, every
# candidate, ran clean under both releases after bool masks' partial tiles lost a select); the 3.6 d128 light
# forward keeps its earlier (superset) entry. Every width class again in a second session that day (a full
# --record under each release), after the backward kernels read their row statistics as one 8-byte pair and
# causal / varlen moved to the light tiles: the backward keys are that record's; the forward keys (kernel unchanged)
# keep their supersets; under 3.8 the fp32 heavy d128 dK/dV entry moved to 3 stages, under 3.6 the fp32 heavy d64
# dQ entry to 2.
_SPILLS_3_8 = {
    ('bwd_dkdv', '16', 64, False): {(64, 128, 4, 1), (64, 128, 8, 2), (128, 128, 8, 1)},
    ('bwd_dkdv', '16', 64, True): {(32, 128, 4, 1), (64, 128, 8, 1)},
    ('bwd_dkdv', '16', 96, False): {(32, 128, 4, 1), (32, 128, 8, 2), (64, 128, 8, 1)},
    ('bwd_dkdv', '16', 96, True): {(16, 128, 4, 1)},
    ('bwd_dkdv', '16', 128, False): {(16, 128, 4, 1), (32, 128, 8, 1)},
    ('bwd_dkdv', '16', 128, True): {(16, 128, 4, 1), (16, 128, 8, 2)},
    ('bwd_dkdv', '16', 256, False): {(16, 64, 8, 1), (16, 128, 4, 1), (32, 128, 8, 1)},
    ('bwd_dkdv', '16', 256, True): {(16, 64, 8, 1), (16, 128, 4, 1), (16, 128, 8, 2), (32, 128, 8, 1)},
    ('bwd_dkdv', '32', 64, False): {(16, 32, 8, 1)},
    ('bwd_dkdv', '32', 64, True): {(16, 16, 8, 1), (16, 16, 8, 3)},
    ('bwd_dkdv', '32', 128, False): {(16, 32, 4, 1)},
    ('bwd_dkdv', '32', 128, True): {(16, 32, 4, 2), (16, 32, 8, 2)},
    ('bwd_dkdv', '32', 256, False): {(16, 32, 4, 1)},
    ('bwd_dkdv', '32', 256, True): {(16, 32, 4, 1)},
    ('bwd_dq', '16', 64, False): {(128, 64, 4, 2)},
    ('bwd_dq', '16', 64, True): {(128, 64, 4, 2)},
    ('bwd_dq', '16', 96, False): {(128, 64, 4, 1), (128, 128, 8, 1)},
    ('bwd_dq', '16', 96, True): {(128, 32, 4, 2)},
    ('bwd_dq', '16', 128, False): {(128, 64, 4, 1), (128, 128, 8, 1)},
    ('bwd_dq', '16', 128, True): {(128, 32, 4, 2)},
    ('bwd_dq', '16', 256, False): {(128, 32, 4, 2), (128, 64, 8, 2)},
    ('bwd_dq', '16', 256, True): {(128, 16, 4, 2), (128, 16, 8, 1)},
    ('bwd_dq', '32', 64, True): {(16, 16, 8, 1)},
    ('bwd_dq', '32', 128, False): {(16, 16, 4, 1), (16, 32, 8, 1), (32, 16, 8, 1)},
    ('bwd_dq', '32', 128, True): {(16, 16, 4, 1), (16, 32, 8, 1), (32, 16, 8, 1)},
    ('bwd_dq', '32', 256, False): {(32, 16, 8, 1)},
    ('bwd_dq', '32', 256, True): {(32, 16, 8, 1)},
    ('fwd', '16', 64, False): {(128, 128, 4, 3), (128, 128, 8, 4)},
    ('fwd', '16', 64, True): {(128, 64, 4, 3)},
    ('fwd', '16', 96, False): {(128, 128, 4, 2)},
    ('fwd', '16', 96, True): {(128, 64, 4, 2)},
    ('fwd', '16', 128, False): {(128, 128, 4, 2), (128, 128, 8, 1), (128, 128, 8, 3)},
    ('fwd', '16', 128, True): {(128, 32, 4, 2)},
    ('fwd', '16', 256, False): {(128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2)},
    ('fwd', '16', 256, True): {(128, 16, 4, 3)},
    ('fwd', '32', 64, False): {(64, 32, 8, 2)},
    ('fwd', '32', 64, True): {(32, 16, 8, 3)},
    ('fwd', '32', 128, False): {(32, 16, 4, 1), (32, 32, 4, 2), (64, 16, 4, 2)},
    ('fwd', '32', 128, True): {(32, 16, 4, 2)},
    ('fwd', '32', 256, True): {(16, 16, 4, 1), (16, 16, 8, 2), (16, 32, 8, 1)},
}
# Static table entries that spill under the release, replaced (aot_check.release_record's choice).
_TABLE_3_8 = {
    ('bwd_dkdv', '32', 64, True): LaunchConfig(16, 16, 8, 2),
    ('bwd_dkdv', '32', 128, True): LaunchConfig(16, 32, 8, 3),
    ('bwd_dq', '32', 64, True): LaunchConfig(16, 16, 8, 2),
    ('fwd', '32', 256, True): LaunchConfig(16, 16, 8, 1),
}

# Triton 3.6.0 (torch 2.11's: the lent GPU machines'). The d128 forward's 128x128 / 8 warps spilled 16 B with 2
# stages (fp16 varlen) while Q came by pointers, so 3 stages stood in; with Q through TMA it is clean, and 3
# stages need 288 KB of shared memory with a float mask's TMA tiles: the table's own 2 stages again.
_SPILLS_3_6 = {
    ('bwd_dkdv', '16', 64, False): {(64, 128, 4, 1), (64, 128, 8, 2), (128, 128, 8, 1)},
    ('bwd_dkdv', '16', 64, True): {(32, 128, 4, 1), (64, 128, 8, 1)},
    ('bwd_dkdv', '16', 96, False): {(32, 128, 4, 1), (32, 128, 8, 2), (64, 128, 8, 1)},
    ('bwd_dkdv', '16', 96, True): {(16, 128, 4, 1), (16, 128, 8, 2)},
    ('bwd_dkdv', '16', 128, False): {(16, 128, 4, 1), (32, 128, 8, 1)},
    ('bwd_dkdv', '16', 128, True): {(16, 128, 4, 1), (16, 128, 8, 2)},
    ('bwd_dkdv', '16', 256, False): {(16, 64, 8, 1), (16, 128, 4, 1), (32, 128, 8, 1)},
    ('bwd_dkdv', '16', 256, True): {(16, 64, 8, 1), (16, 128, 4, 1), (16, 128, 8, 2), (32, 128, 8, 1)},
    ('bwd_dkdv', '32', 64, False): {(16, 32, 8, 1)},
    ('bwd_dkdv', '32', 64, True): {(16, 16, 8, 1), (16, 16, 8, 3)},
    ('bwd_dkdv', '32', 128, False): {(32, 32, 8, 1)},
    ('bwd_dkdv', '32', 128, True): {(16, 32, 4, 1), (32, 32, 8, 1)},
    ('bwd_dkdv', '32', 256, False): {(16, 32, 4, 1)},
    ('bwd_dkdv', '32', 256, True): {(16, 32, 4, 1)},
    ('bwd_dq', '16', 64, False): {(128, 64, 4, 2)},
    ('bwd_dq', '16', 64, True): {(128, 64, 4, 2)},
    ('bwd_dq', '16', 96, False): {(128, 64, 4, 1), (128, 128, 8, 1)},
    ('bwd_dq', '16', 96, True): {(128, 32, 4, 2)},
    ('bwd_dq', '16', 128, False): {(64, 64, 8, 1), (128, 64, 4, 1), (128, 128, 8, 1)},
    ('bwd_dq', '16', 128, True): {(128, 32, 4, 2)},
    ('bwd_dq', '16', 256, False): {(128, 32, 4, 2), (128, 64, 8, 2)},
    ('bwd_dq', '16', 256, True): {(128, 16, 4, 2), (128, 16, 8, 1)},
    ('bwd_dq', '32', 64, True): {(16, 16, 8, 1)},
    ('bwd_dq', '32', 128, False): {(16, 16, 4, 1), (16, 32, 8, 1), (32, 16, 8, 1)},
    ('bwd_dq', '32', 128, True): {(16, 16, 4, 1), (16, 32, 8, 1), (32, 16, 8, 1)},
    ('bwd_dq', '32', 256, False): {(32, 16, 8, 1)},
    ('bwd_dq', '32', 256, True): {(32, 16, 8, 1)},
    ('fwd', '16', 64, False): {(128, 128, 4, 3), (128, 128, 8, 4)},
    ('fwd', '16', 64, True): {(128, 64, 4, 3)},
    ('fwd', '16', 96, False): {(128, 128, 4, 2), (128, 128, 8, 1)},
    ('fwd', '16', 96, True): {(128, 64, 4, 2)},
    ('fwd', '16', 128, False): {(64, 128, 8, 3), (128, 128, 4, 2), (128, 128, 4, 3), (128, 128, 8, 1), (128, 128, 8, 3), (128, 128, 8, 4)},
    ('fwd', '16', 128, True): {(128, 32, 4, 2)},
    ('fwd', '16', 256, False): {(128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2)},
    ('fwd', '16', 256, True): {(128, 16, 4, 3)},
    ('fwd', '32', 64, False): {(64, 32, 8, 2)},
    ('fwd', '32', 64, True): {(32, 16, 8, 3)},
    ('fwd', '32', 128, False): {(32, 16, 4, 1), (32, 32, 4, 2), (64, 16, 4, 2)},
    ('fwd', '32', 128, True): {(32, 16, 4, 2), (32, 16, 8, 3), (32, 32, 8, 2)},
}
_TABLE_3_6 = {
    ('bwd_dkdv', '32', 64, True): LaunchConfig(16, 16, 8, 2),
    ('bwd_dq', '32', 64, True): LaunchConfig(16, 16, 8, 2),
}


@dataclass(frozen=True)
class TritonRecord:
    """What one Triton release compiles differently: ``spills`` (keyed as _SPILLS_3_8) and ``table``: static
    table entries replaced under this release, (kernel, bits, width class, heavy) -> LaunchConfig, because the
    table's own spills there."""
    spills: dict
    table: dict = field(default_factory=dict)


# Per Triton (major, minor). The register allocation moves between releases (a tile that fits in one spills in
# another), so each release the package supports has its own record; aot_check --record prints one.
TRITON_RECORDS = {
    (3, 6): TritonRecord(_SPILLS_3_6, _TABLE_3_6),
    (3, 8): TritonRecord(_SPILLS_3_8, _TABLE_3_8),
}


@functools.lru_cache(maxsize=None)
def triton_version() -> tuple:
    """(major, minor) of the installed Triton, (0, 0) without one."""
    try:
        import triton
    except ImportError:
        return (0, 0)
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def record(version: tuple = None) -> TritonRecord:
    """The record of ``version`` (default: the installed Triton), or of the nearest recorded release (the
    newer of two as near): an unrecorded release is assumed to allocate registers like its neighbour."""
    v = version or triton_version()
    nearest = min(TRITON_RECORDS, key=lambda r: (abs((r[0] - v[0]) * 100 + r[1] - v[1]), (-r[0], -r[1])))
    return TRITON_RECORDS[nearest]


# The installed Triton's spill record (what candidates() leaves out).
SPILLS = record().spills


def _bits(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def static_config(kernel: str, d: int, dv: int, dtype: torch.dtype, heavy: bool = False) -> LaunchConfig:
    """The table's tiles of one kernel (see forward_config / backward_configs for ``heavy``)."""
    if kernel == "fwd":
        return forward_config(d, dv, dtype, heavy)
    kv, q = backward_configs(d, dv, dtype, heavy)
    return {"bwd_dkdv": kv, "bwd_dq": q}[kernel]


def _width_class(d: int, dv: int) -> int:
    width = computed_width(d, dv)
    return 64 if width <= 64 else 96 if width <= 96 else 128 if width <= 128 else 256


def _neighbours(kernel: str, c: LaunchConfig) -> list:
    """Launch configs next to c, the likeliest first: num_warps 4 <-> 8, the loop tile doubled, the resident
    tile halved (more programs for short sequences), one more pipeline stage, the resident tile doubled, the
    loop tile halved, one stage less. The dK/dV kernel keeps key tiles (block_n) resident, the others query
    tiles (block_m)."""
    def tiles(resident: int, loop: int) -> tuple:
        return (loop, resident) if kernel == "bwd_dkdv" else (resident, loop)
    res, loop = (c.block_n, c.block_m) if kernel == "bwd_dkdv" else (c.block_m, c.block_n)
    out = [LaunchConfig(c.block_m, c.block_n, 4 if c.num_warps == 8 else 8, c.num_stages),
           LaunchConfig(*tiles(res, loop * 2), c.num_warps, c.num_stages),
           LaunchConfig(*tiles(res // 2, loop), c.num_warps, c.num_stages),
           LaunchConfig(c.block_m, c.block_n, c.num_warps, c.num_stages + 1),
           LaunchConfig(*tiles(res * 2, loop), c.num_warps, c.num_stages),
           LaunchConfig(*tiles(res, loop // 2), c.num_warps, c.num_stages),
           LaunchConfig(c.block_m, c.block_n, c.num_warps, c.num_stages - 1)]
    return [n for n in out if MIN_BLOCK <= min(n.block_m, n.block_n) and max(n.block_m, n.block_n) <= MAX_BLOCK
            and 1 <= n.num_stages <= 4]


def candidates(kernel: str, d: int, dv: int, dtype: torch.dtype, heavy: bool = False,
               every: bool = False) -> list:
    """The launch configs the autotuner times for one kernel, the static table's entry first.

    At most MAX_NEIGHBOURS neighbours (see _neighbours), minus those the installed Triton's record lists as
    spilling (``record``); every one is compiled by aot_check. ``every``: all neighbours, none left out (what
    aot_check --record compiles). In the interpreter (speed means nothing there): the table's tiles, the
    swapped tiles and 16x16."""
    first = static_config(kernel, d, dv, dtype, heavy)
    if interpreting():
        pool = [LaunchConfig(first.block_n, first.block_m, 1, 1), LaunchConfig(MIN_BLOCK, MIN_BLOCK, 1, 1)]
    else:
        spills = () if every else record().spills.get((kernel, _bits(dtype), _width_class(d, dv), bool(heavy)), ())
        pool = [n for n in _neighbours(kernel, first)
                if (n.block_m, n.block_n, n.num_warps, n.num_stages) not in spills]
    out = [first]
    for n in pool:
        if n not in out and (every or len(out) <= MAX_NEIGHBOURS):
            out.append(n)
    return out


# ---- TMA (Hopper's tensor memory accelerator) for the tile loads inside the kernels' loops ----------------------
TMA_MODES = ("auto", "0", "1")
TMA_DTYPES = (torch.float16, torch.bfloat16)


def tma_mode() -> str:
    """VITKERN_TRITON_TMA: "auto" (default: the forward's tiles by TMA on sm_90 and newer), "1" (the backward's
    too, and under the interpreter, whose descriptors are numpy slices: what the tests use to run the TMA paths)
    or "0" (never: pointer tiles everywhere)."""
    mode = os.environ.get("VITKERN_TRITON_TMA") or "auto"   # set but empty: the default
    if mode not in TMA_MODES:
        raise ValueError(f"VITKERN_TRITON_TMA: expected one of {TMA_MODES}, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=None)
def _descriptor_class():
    """Triton's host-side TensorDescriptor class, or None where this Triton has none (imported once: an import
    statement costs ~1 us per call even when the module is loaded)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def tma_layout_ok(t: torch.Tensor) -> bool:
    """Whether a [B, H, N, D] tensor can be read through a TMA descriptor: 16-bit (the tensor-core path), last
    dim contiguous, base and the other strides multiples of 16 bytes (the hardware's rule; a dim of size 1 is
    exempt, see tma_descriptor), no empty dim. (Written out: this runs on every call, ~1 us.)"""
    if t.dtype not in TMA_DTYPES or t.dim() != 4:
        return False
    b, h, n, d = t.shape
    sb, sh, sn, sd = t.stride()
    # 8 two-byte elements are 16 bytes.
    return (sd == 1 and b > 0 and h > 0 and n > 0 and d > 0 and t.data_ptr() % 16 == 0
            and (b == 1 or sb % 8 == 0) and (h == 1 or sh % 8 == 0) and (n == 1 or sn % 8 == 0))


def use_tma(tensors, arch: int = None) -> bool:
    """Whether a launch reads ``tensors``' tiles through TMA descriptors (tma_descriptor) instead of pointer tiles:
    on a GPU of compute capability ``arch`` (default: the tensors' device; the interpreter counts as none unless
    VITKERN_TRITON_TMA=1) of at least 9.0, with a Triton that has host-side descriptors, and every tensor's layout
    allowed (tma_layout_ok). Otherwise the plain path (sm_80, odd strides, fp32, the interpreter) runs."""
    mode = tma_mode()
    if mode == "0" or _descriptor_class() is None:
        return False
    if arch is None:
        if interpreting():
            arch = 90 if mode == "1" else 0
        else:
            dev = tensors[0].device
            arch = _device_arch(dev.index if dev.index is not None else torch.cuda.current_device()) \
                if dev.type == "cuda" else 0
    if arch < 90:
        return False
    for t in tensors:
        if not tma_layout_ok(t):
            return False
    return True


@functools.lru_cache(maxsize=256)
def _descriptor_fields(dtype: torch.dtype, shape: tuple, strides: tuple, rows: int, cols: int) -> dict:
    """A TMA descriptor's fields but its base, validated once per layout by Triton's own constructor (whose
    checks cost ~3 us a descriptor, at every call otherwise); the base's alignment is tma_layout_ok's to check."""
    fields = dict(vars(_descriptor_class()(torch.empty(1, dtype=dtype), list(shape), list(strides),
                                           [1, 1, rows, cols])))
    del fields["base"]
    return fields


def tma_descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    """A TMA descriptor of t [B, H, N, D] whose box is one [block_rows, block_cols] tile of a (batch, head): the
    kernels load tile (b, h, row, col) and reshape it to 2-D. Rows past N and columns past D come back 0. The
    stride of a dim of size 1 is never multiplied by anything; it is replaced by 8 elements (16 bytes: TMA_DTYPES
    are 16-bit), since the hardware checks every stride."""
    shape, strides = t.shape, t.stride()
    if shape[0] == 1 or shape[1] == 1 or shape[2] == 1:
        strides = tuple(8 if n == 1 else s for n, s in zip(shape[:3], strides)) + (1,)
    desc = object.__new__(_descriptor_class())
    desc.__dict__.update(_descriptor_fields(t.dtype, shape, strides, block_rows, block_cols))
    desc.base = t
    return desc
