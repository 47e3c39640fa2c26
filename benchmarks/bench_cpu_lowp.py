"""bf16 CPU attention against its yardsticks, measured round-robin (one sample of every cell per round).

    python -m benchmarks.bench_cpu_lowp [--rounds 5] [--workloads vit-b16,pit-64,navit-packed]

Prints useful GFLOP/s (benchmarks/workloads.py counts) of: square matmuls in float32 and bfloat16 (the two
yardsticks), torch SDPA in bf16, vitkern `cpu` in bf16 on each tile path that runs here (VITKERN_CPU_PATH), forward
and forward+backward; for packed NaViT workloads also the per-image SDPA loop in bf16. Medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import vitkern
from benchmarks import workloads

PATHS = ("amx", "avx512_bf16", "fp32")


def _runs(path):
    os.environ["VITKERN_CPU_PATH"] = path
    try:
        return json.loads(torch.ops.vitkern_cpu.cpu_features())["chosen"]["bfloat16"].split(":")[0] != "error"
    finally:
        del os.environ["VITKERN_CPU_PATH"]


def _timed(fn, env=None):
    if env:
        os.environ["VITKERN_CPU_PATH"] = env
    try:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    finally:
        if env:
            del os.environ["VITKERN_CPU_PATH"]


def _step(fwd, inputs, mode):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                fwd(*inputs)
        else:
            fwd(*inputs).sum().backward()
    return run


def cells(case, mode):
    """name -> (callable, VITKERN_CPU_PATH or None, useful flops)."""
    flops = case.useful_flops(mode)
    grad = mode == "fwdbwd"
    out = {}
    if case.packed:
        segs = case.segments()
        cu = vitkern.lengths_to_cu_seqlens(segs)
        q, k, v = (torch.randn(case.tokens, case.heads, case.head_dim, dtype=torch.bfloat16, requires_grad=grad)
                   for _ in range(3))
        images = [n for p in case.packs for n in p]

        def loop(q, k, v):
            outs, o = [], 0
            for n in images:  # padding segments are not attended in the loop
                x = [t[o:o + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
                outs.append(F.scaled_dot_product_attention(*x))
                o += n
            return torch.cat([t.squeeze(0).transpose(0, 1) for t in outs])
        out["sdpa-loop"] = (_step(loop, (q, k, v), mode), None, flops)
        packed = lambda q, k, v: vitkern.varlen_attention(q, k, v, cu, backend="cpu")
        for p in PATHS:
            if _runs(p):
                out[f"vitkern-{p}"] = (_step(packed, (q, k, v), mode), p, flops)
        return out
    q, k, v = (torch.randn(case.batch, case.heads, case.seqlen, case.head_dim, dtype=torch.bfloat16,
                           requires_grad=grad) for _ in range(3))
    out["sdpa"] = (_step(F.scaled_dot_product_attention, (q, k, v), mode), None, flops)
    vk = lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, backend="cpu")
    for p in PATHS:
        if _runs(p):
            out[f"vitkern-{p}"] = (_step(vk, (q, k, v), mode), p, flops)
    return out


def matmul_cells(n=2048):
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        out[f"matmul-{str(dt)[6:]}"] = (lambda a=a, b=b: a @ b, None, 2.0 * n ** 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", default="vit-b16,pit-64,navit-packed")
    args = ap.parse_args(argv)
    table = {("yardstick", "-"): matmul_cells()}
    for w in args.workloads.split(","):
        for case in workloads.build(w, "cpu"):
            for mode in ("fwd", "fwdbwd"):
                table[(w, mode)] = cells(case, mode)
    samples = {key: {name: [] for name in c} for key, c in table.items()}
    for key, c in table.items():  # warm-up: kernels built, pages touched
        for name, (fn, env, _) in c.items():
            _timed(fn, env)
    for _ in range(args.rounds):
        for key, c in table.items():
            for name, (fn, env, _) in c.items():
                samples[key][name].append(_timed(fn, env))
    print(f"threads={torch.get_num_threads()} features={torch.ops.vitkern_cpu.cpu_features()}")
    for key, c in table.items():
        rates = {name: c[name][2] / statistics.median(samples[key][name]) / 1e9 for name in c}
        base = rates.get("sdpa", rates.get("sdpa-loop"))
        print(f"{key[0]:>13} {key[1]:>6}: " + "  ".join(
            f"{n} {r:.0f}" + (f" ({r / base:.2f}x)" if base and n.startswith("vitkern") else "")
            for n, r in rates.items()))


if __name__ == "__main__":
    main()
