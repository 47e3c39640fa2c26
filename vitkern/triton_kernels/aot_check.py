"""Compile the attention kernels for a GPU target without a GPU (ahead of time, down to a cubin).

Triton's interpreter forgives what a real compile rejects (non-constexpr globals, dtype mismatches in
tl.where, tl.dot shape limits, shared-memory overruns, register spills). This check builds the exact launches
of attention_fwd.forward_launches / attention_bwd.backward_launches on small CPU tensors, specializes their
arguments the way Triton's launcher does (ints equal to 1 become constants, ints and pointers divisible by 16
get a divisibility hint, ``do_not_specialize`` respected), and runs the real compiler pipeline (TTIR -> TTGIR
-> LLVM -> PTX -> ptxas) for sm_90 by default. It reports shared memory, registers and spilled bytes (read
from the cubin with the cuobjdump Triton ships). Every autotuning candidate (config.candidates) is compiled,
not only the static table's tiles. Usage (TRITON_INTERPRET must be unset):

    python -m vitkern.triton_kernels.aot_check            # a representative set x every candidate (minutes)
    python -m vitkern.triton_kernels.aot_check --static   # the representative set, static table only
    python -m vitkern.triton_kernels.aot_check --quick    # one variant, static table only
    python -m vitkern.triton_kernels.aot_check --record   # every neighbour; prints config.py's record of this
                                                          # Triton release (spills, replaced table entries)
    python -m vitkern.triton_kernels.aot_check --record --head-dims 256   # the same for one width class
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from . import config

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
       torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "u1"}
# Largest dynamic shared memory per block (227 KiB on Hopper, 163 KiB on A100).
MAX_SHARED = {90: 232448, 80: 166912}


def specialize(kernel, args, kwargs):
    """(signature, constexprs, attrs) for ASTSource, as Triton's launcher would derive them from the values."""
    sig, const, attrs = {}, {}, {}
    values = list(args) + [kwargs[p.name] for p in kernel.params[len(args):]]
    for i, (p, x) in enumerate(zip(kernel.params, values)):
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", x
        elif type(x).__name__ == "TensorDescriptor":     # TMA (config.tma_descriptor): Triton's own type string
            from triton.runtime.jit import mangle_type
            sig[p.name] = mangle_type(x)
        elif isinstance(x, torch.Tensor):
            sig[p.name] = "*" + _TL[x.dtype]
            if x.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{p.name}: unexpected argument {x!r}")
        elif isinstance(x, float):
            sig[p.name] = "fp32"
        elif not p.do_not_specialize and x == 1:
            sig[p.name], const[p.name] = "constexpr", 1
        else:
            sig[p.name] = "i32" if -2**31 <= x < 2**31 else "i64"
            if not p.do_not_specialize and x % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def cuobjdump_path():
    """The cuobjdump bundled in Triton's package, or None when this Triton ships none."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.path.exists(tool) else None


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """cuobjdump's output for a cubin (e.g. flags "-sass" or "--dump-resource-usage")."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump_path(), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def _resource_usage(cubin) -> tuple:
    """(registers, stack bytes) per thread, from the cubin; (None, None) when cuobjdump is not available."""
    if cubin is None or cuobjdump_path() is None:
        return None, None
    m = re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump(cubin, "--dump-resource-usage"))
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _variants(quick: bool):
    """(dtype, head dim, mask kind, causal, varlen, dropout, n): n a tile multiple makes EVEN_M / EVEN_N."""
    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32
    if quick:
        return [(f16, 64, 0, False, False, False, 256)]
    out = [(f16, 64, 0, False, False, False, 256), (f16, 64, 0, True, False, False, 197),
           (f16, 64, 1, False, False, False, 197), (f16, 64, 2, True, False, True, 197),
           (f16, 64, 0, False, True, False, 197), (f16, 64, 0, True, True, True, 197)]
    for dt in (f16, b16, f32):
        for d in (64, 128, 256):
            out.append((dt, d, 0, False, False, False, 256))
            out.append((dt, d, 2, True, False, True, 197))
    # Head dims 80 / 96 run in two column chunks (config.head_split): their own width class.
    out += [(f32, 64, 0, False, False, False, 256), (b16, 96, 1, False, False, False, 197),
            (b16, 96, 0, True, True, True, 197), (b16, 96, 0, False, False, False, 256),
            (f16, 80, 2, True, False, True, 197), (f16, 128, 0, False, True, False, 197),
            (b16, 96, 0, False, True, False, 197),     # varlen alone: the light tiles at width 96 too
            (f32, 256, 2, True, False, True, 197),
            # A float mask alone (relative position bias): the light tiles when it comes through TMA (and dMask
            # goes out through TMA), at each width class that has them.
            (f16, 64, 2, False, False, False, 197), (b16, 128, 2, False, False, False, 197),
            (b16, 80, 2, False, False, False, 197)]
    return out


def _heavy(kernel, mask_kind, varlen, dropout, causal, d, dtype, arch=90) -> bool:
    """The ``heavy`` flag the launch code passes for this kernel (config.is_heavy; _launches' float masks have rows
    of their own, so on sm_90 their tiles come through TMA: mask_operand.float_tiles_by_tma)."""
    mask_tma = (mask_kind == 2 and dtype in config.TMA_DTYPES and arch >= 90 and config.tma_mode() != "0"
                and config._descriptor_class() is not None)
    return config.is_heavy(kernel, mask_kind, dropout, varlen, causal, d, d, dtype, mask_tma)


def _candidate_sets(dtype, d, mask_kind, causal, varlen, dropout, n, every=False, arch=90) -> list:
    """(fwd, dK/dV, dQ) configs to compile for one variant: the i-th candidate of each kernel together (None:
    that kernel has fewer candidates, its table entry stands in and is compiled once). ``every``: every
    neighbour, also those the record lists as spilling."""
    lists = [config.candidates(kernel, d, d, dtype, _heavy(kernel, mask_kind, varlen, dropout, causal, d, dtype, arch),
                               every=every)
             for kernel in config.KERNELS]
    return list(itertools.zip_longest(*lists))


# Kernels whose launch config is autotuned (the mask summary's tiles are the forward's).
_TUNED = {"_attention_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "bwd_dkdv", "_bwd_dq_kernel": "bwd_dq",
          "_tile_state_kernel": "fwd"}


def _note(results, name, variant, cfg, stack) -> None:
    """Append one compiled kernel's outcome to ``results`` (for release_record), if collecting: ``stack`` is
    its spilled bytes per thread, -1 when it failed to compile or needs too much shared memory, None when
    unknown (no cuobjdump)."""
    if results is None or name not in _TUNED:
        return
    dtype, d, mk, causal, varlen, dropout, n = variant
    tuned = _TUNED[name]
    results.append({"kernel": name, "dtype": dtype, "d": d, "mask": mk, "varlen": varlen, "dropout": dropout,
                    "causal": causal,
                    "stack": stack, "cfg": cfg, "candidates": [tuple(vars(c).values()) for c in config.candidates(
                        tuned, d, d, dtype, _heavy(tuned, mk, varlen, dropout, causal, d, dtype), every=True)]})


def release_record(results) -> tuple:
    """(spills, table) for config.TRITON_RECORDS from check()'s results: a launch config spills for a key
    (kernel, bits, width class, heavy) when it spills in any variant of the key; a table entry that spills is
    replaced by a candidate that compiled clean in every variant: one with the entry's tiles and warps (only
    the pipeline depth differs) if there is one, else the first in config.candidates' order (other tiles change
    the work per instruction far more than stages do: under Triton 3.6 the d128 forward's 128x128 / 8 warps
    spills 16 B with 2 stages and none with 3, while the first other candidate, 64x128, computes every score
    twice). A config that failed to compile (stack -1) counts as spilling."""
    spills, clean, order = {}, {}, {}
    for r in results:
        kernel = _TUNED.get(r["kernel"])
        if kernel is None or r["stack"] is None:
            continue
        key = (kernel, config._bits(r["dtype"]), config._width_class(r["d"], r["d"]),
               _heavy(kernel, r["mask"], r["varlen"], r["dropout"], r["causal"], r["d"], r["dtype"]))
        cfg = tuple(r["cfg"])
        (spills if r["stack"] else clean).setdefault(key, set()).add(cfg)
        order.setdefault(key, r["candidates"])
    table = {}
    for key, bad in spills.items():
        first = tuple(order[key][0])
        if first in bad:
            ok = [c for c in order[key] if tuple(c) not in bad and tuple(c) in clean.get(key, ())]
            ok.sort(key=lambda c: tuple(c[:3]) != first[:3])    # stable: candidates' order otherwise
            if ok:
                table[key] = config.LaunchConfig(*ok[0])
    return spills, table


def _launches(dtype, d, mask_kind, causal, varlen, dropout, n, cfgs=(None, None, None), arch=90):
    from . import mask_summary
    from .attention_bwd import backward_launches
    from .attention_fwd import forward_launches
    from ..backends.base import dmask_buffer, empty_bhnd
    b, hq, hk = (1, 4, 2) if varlen else (2, 4, 2)
    q = torch.randn(b, n, hq, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, n, hk, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, n, hk, d, dtype=dtype).transpose(1, 2)
    mask = None
    if mask_kind == 1:
        mask = (torch.rand(n, n) > 0.5).expand(b, hq, n, n)
    elif mask_kind == 2:
        mask = torch.randn(n, n, dtype=dtype).expand(b, hq, n, n)
    cu = torch.tensor([0, n // 3, n], dtype=torch.int32) if varlen else None
    seed = torch.tensor([1234]) if dropout else None
    p = 0.1 if dropout else 0.0
    out = empty_bhnd(b, hq, n, d, q)
    lse = torch.empty(b, hq, n, dtype=torch.float32)
    scale = 1 / math.sqrt(d)
    summaries = []

    def record(kernel, grid, args, kwargs):   # compile the summary / packing kernels too; every tile partial
        args[1].fill_(mask_summary.TILE_PARTIAL)
        summaries.append((kernel, grid, args, kwargs))
    mask_summary.launch = record
    try:
        fwd = forward_launches(q, k, v, mask, cu, cu, -1, -1, seed, scale, causal, p, out, lse, cfgs[0], arch)
        grads = (empty_bhnd(b, hq, n, d, q), empty_bhnd(b, hk, n, d, k), empty_bhnd(b, hk, n, d, v),
                 dmask_buffer(b, hq, n, n, q, True) if mask_kind == 2 else q.new_empty(0))
        bwd = backward_launches(out, q, k, v, out, lse, mask, cu, cu, -1, -1, seed, scale, causal, p,
                                mask_kind == 2, *grads, kv_cfg=cfgs[1], q_cfg=cfgs[2], arch=arch)
    finally:
        mask_summary.launch = mask_summary._launch
    helpers = {}    # the summary and packing kernels, each compiled once
    for launch in summaries:
        helpers.setdefault(launch[0].__name__, launch)
    return list(helpers.values()) + fwd + bwd


def check(quick: bool = False, arch: int = 90, verbose: bool = True, candidates: bool = True, every: bool = False,
          results: list = None, head_dims=None) -> list[str]:
    """Compile the variants (with every autotuning candidate unless ``quick`` or not ``candidates``; with every
    neighbour when ``every``; only those of ``head_dims`` when given); returns the failures (compile errors,
    shared memory over the limit, spills). ``results``, when given, gets one dict per compiled kernel (for
    release_record)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if config.interpreting():
        raise RuntimeError("aot_check compiles real kernels: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    failures, seen = [], {}     # compile key -> stack bytes (None: failed or unknown)
    jobs = [(variant, cfgs) for variant in _variants(quick) if head_dims is None or variant[1] in head_dims
            for cfgs in (_candidate_sets(*variant, every=every, arch=arch) if candidates and not quick
                         else [(None, None, None)])]
    for variant, cfgs in jobs:
        dtype, d, mk, causal, varlen, dropout, n = variant
        fwd_cfg = cfgs[0] or config.static_config("fwd", d, d, dtype,
                                                  _heavy("fwd", mk, varlen, dropout, causal, d, dtype, arch))
        for kernel, _grid, args, kwargs in _launches(*variant, cfgs, arch=arch):
            kw = dict(kwargs)
            options = dict(num_warps=kw.pop("num_warps", 4), num_stages=kw.pop("num_stages", 3))
            sig, const, attrs = specialize(kernel, args, kw)
            key = (kernel.__name__, str(sig), str(sorted(const.items(), key=str)), str(sorted(attrs)), str(options))
            # The mask summary kernel runs with the forward's tiles: its spills count against the forward's config.
            cfg = tuple(vars(fwd_cfg).values()) if kernel.__name__ == "_tile_state_kernel" else \
                (kw.get("BLOCK_M"), kw.get("BLOCK_N"), options["num_warps"], options["num_stages"])
            if key in seen:
                _note(results, kernel.__name__, variant, cfg, seen[key])
                continue
            seen[key] = None
            what = (f"{kernel.__name__} {str(dtype)[6:]} d={d} mask={mk} causal={causal} varlen={varlen} "
                    f"dropout={dropout} n={n} blocks={kw.get('BLOCK_M')}x{kw.get('BLOCK_N')} "
                    f"warps={options['num_warps']} stages={options['num_stages']}")
            t0 = time.time()
            try:
                compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=target, options=options)
            except Exception as e:  # noqa: BLE001  (report every failing variant, not just the first)
                msg = str(e).strip().splitlines()
                failures.append(f"{what}: {type(e).__name__}: {msg[-1] if msg else ''}")
                if verbose:
                    print("FAIL ", failures[-1], flush=True)
                seen[key] = -1
                _note(results, kernel.__name__, variant, cfg, -1)
                continue
            shared = compiled.metadata.shared
            regs, stack = _resource_usage(compiled.asm.get("cubin"))
            bad = []
            if shared > MAX_SHARED.get(arch, MAX_SHARED[80]):
                bad.append(f"needs {shared} B of shared memory")
            if stack:
                bad.append(f"spills {stack} B per thread")
            failures += [f"{what}: {b}" for b in bad]
            seen[key] = -1 if shared > MAX_SHARED.get(arch, MAX_SHARED[80]) else stack
            _note(results, kernel.__name__, variant, cfg, seen[key])
            if verbose:
                print(f"{'ok   ' if not bad else 'BAD  '}{what}: shared {shared} B, {regs} regs, stack {stack} B, "
                      f"{time.time() - t0:.1f} s", flush=True)
    return failures


def compile_variants(variants, arch: int = 90, candidates: bool = True):
    """For sass_report.py: compile every launch of ``variants`` (see _variants) for sm_``arch``, each distinct
    specialization once; yields (description, variant, kernel, kwargs, options, compiled or the exception the
    compile raised). With ``candidates`` every autotuning candidate set, else the static table only."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if config.interpreting():
        raise RuntimeError("aot_check compiles real kernels: unset TRITON_INTERPRET")
    seen = set()
    for variant in variants:
        for cfgs in (_candidate_sets(*variant, arch=arch) if candidates else [(None, None, None)]):
            for kernel, _grid, args, kwargs in _launches(*variant, cfgs, arch=arch):
                kw = dict(kwargs)
                options = dict(num_warps=kw.pop("num_warps", 4), num_stages=kw.pop("num_stages", 3))
                sig, const, attrs = specialize(kernel, args, kw)
                key = (kernel.__name__, str(sig), str(sorted(const.items(), key=str)), str(sorted(attrs)),
                       str(options))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                              options=options)
                except Exception as e:  # noqa: BLE001  (report every failing variant)
                    compiled = e
                yield f"{kernel.__name__} {variant}", variant, kernel, kw, options, compiled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one variant, static table only")
    ap.add_argument("--static", action="store_true", help="the static table only, not every autotune candidate")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200) or 80 (A100)")
    ap.add_argument("--head-dims", type=lambda s: {int(x) for x in s.split(",")}, default=None,
                    help="only the variants of these head dims, e.g. 256 (a record's keys of their width class)")
    ap.add_argument("--record", action="store_true",
                    help="compile every neighbour and print this Triton release's entry of config.TRITON_RECORDS")
    args = ap.parse_args(argv)
    results = []
    failures = check(args.quick, args.arch, candidates=not args.static, every=args.record, results=results,
                     head_dims=args.head_dims)
    print(f"{len(failures)} problem(s)")
    for f in failures:
        print("  ", f)
    if args.record:
        spills, table = release_record(results)
        version = ".".join(map(str, config.triton_version()))
        print(f"\n# config.TRITON_RECORDS entry for Triton {version}, sm_{args.arch}:")
        print(f"{config.triton_version()}: TritonRecord(")
        print("    {" + ",\n     ".join(f"{k!r}: {sorted(v)!r}".replace("[", "{").replace("]", "}")
                                       for k, v in sorted(spills.items())) + "},")
        print("    {" + ",\n     ".join(f"{k!r}: {v!r}" for k, v in sorted(table.items())) + "}),")
        return 0 if not [f for f in failures if "spills" not in f] else 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
