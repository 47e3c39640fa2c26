"""Compile every attention kernel for a GPU target without a GPU (ahead of time, to a cubin).

Triton's interpreter forgives what a real compile rejects (non-constexpr globals, dtype mismatches in
tl.where, tl.dot shape limits, shared-memory overruns); this check runs the real compiler pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> ptxas) for sm_90 by default, on the block sizes config.py picks, and reports each
variant's shared memory, registers and spills (stack bytes, read from the cubin). Usage (TRITON_INTERPRET must be unset):

    python -m vitkern.triton_kernels.aot_check            # a representative set (a few minutes on 2 cores)
    python -m vitkern.triton_kernels.aot_check --quick    # one variant per kernel
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from . import config

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Largest dynamic shared memory per block on Hopper (227 KiB).
MAX_SHARED = {90: 232448, 80: 166912}


def _signature(kernel, dtype, mask_dtype, constexprs):
    """Argument types of ``kernel`` as the launchers pass them (pointers by name, ints as i32)."""
    t = _TL[dtype]
    ptrs = {"Q": t, "K": t, "V": t, "Out": t, "DOut": t, "DQ": t, "DK": t, "DV": t, "Lse": "fp32", "Lse2": "fp32",
            "Delta": "fp32", "Mask": mask_dtype, "DMask": "fp32" if mask_dtype == "u8" else mask_dtype,
            "TileState": "i8", "TileLo": "i32", "TileHi": "i32", "RowLo": "i32", "RowHi": "i32", "ColLo": "i32",
            "ColHi": "i32", "CuQ": "i32", "CuK": "i32", "BlockSeq": "i32", "BlockStart": "i32"}
    sig, const = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = constexprs[p.name]
        elif p.name in ptrs:
            sig[p.name] = "*" + ptrs[p.name]
        elif p.name in ("scale", "drop_scale"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig, const


def _resource_usage(cubin) -> tuple:
    """(registers, stack bytes) per thread from the cubin, read with the cuobjdump Triton ships (None if absent)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if cubin is None or not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _variants(quick: bool):
    """(dtype, head dim, mask kind, causal, varlen, dropout, even)"""
    if quick:
        return [(torch.float16, 64, 1, True, False, True, False)]
    out = [(torch.float16, 64, mk, c, False, dr, ev)
           for mk, c, dr, ev in [(0, False, False, True), (0, True, False, False), (1, False, False, False),
                                 (2, True, True, False)]]
    out += [(torch.float16, 64, 0, c, True, dr, False) for c, dr in [(False, False), (True, True)]]
    out += [(dt, d, 2, True, False, True, False)
            for dt, d in itertools.product((torch.bfloat16, torch.float32, torch.float16), (128, 256))]
    out += [(torch.float32, 64, 0, False, False, False, True), (torch.bfloat16, 80, 1, False, True, False, False)]
    return out


def check(quick: bool = False, arch: int = 90, verbose: bool = True) -> list[str]:
    """Compile the variants; returns a list of failures (empty when every variant compiled and fits)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .attention_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess
    from .attention_fwd import _attention_fwd_kernel

    if config.interpreting():
        raise RuntimeError("aot_check compiles real kernels: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    failures = []
    seen = set()
    for dtype, d, mk, causal, varlen, dropout, even in _variants(quick):
        bd = config.padded_head_dim(d)
        mask_dtype = {0: "fp32", 1: "u8", 2: _TL[dtype]}[mk]
        precision = config.input_precision(dtype)
        common = dict(BLOCK_D=bd, BLOCK_DV=bd, MASK_KIND=mk, HAS_SUMMARY=mk != 0, IS_CAUSAL=causal,
                      IS_VARLEN=varlen, HAS_DROPOUT=dropout, EVEN_M=even, EVEN_N=even, EVEN_D=bd == d,
                      PRECISION=precision)
        fcfg, bcfg = config.forward_config(d, d, dtype), config.backward_config(d, d, dtype)
        jobs = [(_attention_fwd_kernel, fcfg, dict(common, BLOCK_M=fcfg.block_m, BLOCK_N=fcfg.block_n)),
                (_bwd_preprocess, bcfg, dict(BLOCK_M=bcfg.block_m, BLOCK_DV=bd)),
                (_bwd_dkdv_kernel, bcfg, dict(common, BLOCK_M=bcfg.block_m, BLOCK_N=bcfg.block_n)),
                (_bwd_dq_kernel, bcfg, dict(common, BLOCK_M=bcfg.block_m, BLOCK_N=bcfg.block_n, MASK_GRAD=mk == 2))]
        for kernel, cfg, consts in jobs:
            sig, const = _signature(kernel, dtype, mask_dtype, consts)
            key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in const.items())),
                   cfg.num_warps, cfg.num_stages)
            if key in seen:
                continue
            seen.add(key)
            what = (f"{kernel.__name__} {dtype} d={d} mask={mk} causal={causal} varlen={varlen} dropout={dropout} "
                    f"even={even} blocks={const.get('BLOCK_M')}x{const.get('BLOCK_N')} warps={cfg.num_warps} "
                    f"stages={cfg.num_stages}")
            t0 = time.time()
            try:
                compiled = triton.compile(ASTSource(kernel, sig, const), target=target,
                                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            except Exception as e:  # noqa: BLE001  (report every failing variant, not just the first)
                failures.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
                if verbose:
                    print("FAIL", failures[-1], flush=True)
                continue
            shared = compiled.metadata.shared
            if shared > MAX_SHARED.get(arch, MAX_SHARED[80]):
                failures.append(f"{what}: needs {shared} bytes of shared memory")
            regs, stack = _resource_usage(compiled.asm.get("cubin"))
            if stack:
                failures.append(f"{what}: spills ({stack} bytes of stack, {regs} registers)")
            if verbose:
                print(f"{'ok  ' if not stack else 'SPILL'} {what}: shared {shared} B, {regs} regs, stack {stack} B, "
                      f"{time.time() - t0:.1f} s", flush=True)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    failures = check(args.quick, args.arch)
    print(f"{len(failures)} failure(s)")
    for f in failures:
        print("  ", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
