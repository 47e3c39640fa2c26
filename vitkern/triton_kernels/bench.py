"""Benchmark of the triton backend against torch SDPA, for the GPU sessions (prints a table, writes nothing).

Cases (all with FLOPs counted as in the FlashAttention papers: 4·B·H·N²·D forward, 2.5x that backward,
halved for causal; packed cases count only the pairs inside a sequence):
    dense   batch·seq = 16k tokens, heads·dim = 2048, head dim 64/128/256, seq 512/2k/16k (anchors.md's table)
    vit     ViT-B (197 tokens, 12 heads of 64, batch 256) and 577 tokens (384² fine-tuning)
    navit   a packed batch of images of 16..1024 tokens: varlen vs the same block-diagonal as a dense bool
            mask (the tile summary should make the two cost about the same) vs SDPA with the dense mask
    pit     one 50,176-token sequence (PiT at 224²), 4 heads of 64, forward only

    python -m vitkern.triton_kernels.bench [--dtype bf16] [--cases dense,vit,navit,pit] [--backward]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import vitkern


def _time_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _fwd_bwd(f, inputs, backward):
    if not backward:
        return lambda: f(*inputs)
    dout = None

    def run():
        nonlocal dout
        out = f(*inputs)
        dout = torch.ones_like(out) if dout is None else dout
        torch.autograd.grad(out, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad], dout)
    return run


def _row(name, flops, fns, backward):
    cells = []
    for label, fn in fns:
        try:
            ms = _time_ms(fn)
            cells.append(f"{label} {ms:8.3f} ms {flops * (3.5 if backward else 1.0) / ms / 1e9:7.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001  (one failing peer must not hide the other numbers)
            cells.append(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
    print(f"{name:34s} | " + " | ".join(cells), flush=True)


def dense(dtype, backward, causal=False):
    for d in (64, 128, 256):
        for n in (512, 2048, 16384):
            b, h = 16384 // n, 2048 // d
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=backward) for _ in range(3))
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            _row(f"dense d={d} n={n} b={b} h={h}", flops, [
                ("vitkern", _fwd_bwd(lambda q, k, v: vitkern.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, backend="triton"), (q, k, v), backward)),
                ("sdpa", _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                  (q, k, v), backward))], backward)


def vit(dtype, backward):
    for n, b in ((197, 256), (577, 64)):
        q, k, v = (torch.randn(b, 12, n, 64, device="cuda", dtype=dtype, requires_grad=backward) for _ in range(3))
        _row(f"vit n={n} b={b}", 4 * b * 12 * n * n * 64, [
            ("vitkern", _fwd_bwd(lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, backend="triton"),
                                 (q, k, v), backward)),
            ("sdpa", _fwd_bwd(F.scaled_dot_product_attention, (q, k, v), backward))], backward)


def navit(dtype, backward, total=8192, heads=12, d=64):
    g = torch.Generator().manual_seed(0)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(16, 1025, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    lens = [x for x in lens if x > 0]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    seg = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
    mask = seg[:, None] == seg[None, :]
    q, k, v = (torch.randn(total, heads, d, device="cuda", dtype=dtype, requires_grad=backward) for _ in range(3))
    useful = 4 * heads * d * sum(x * x for x in lens)
    qt, kt, vt = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_(backward) for x in (q, k, v))
    _row(f"navit T={total} images={len(lens)}", useful, [
        ("varlen", _fwd_bwd(lambda q, k, v: vitkern.varlen_attention(q, k, v, cu, backend="triton"), (q, k, v),
                            backward)),
        ("mask", _fwd_bwd(lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                              backend="triton"), (qt, kt, vt),
                          backward)),
        ("sdpa+mask", _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               (qt, kt, vt), backward))], backward)


def pit(dtype, backward):
    n = 50176
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", dtype=dtype) for _ in range(3))
    _row(f"pit n={n}", 4 * 4 * n * n * 64, [
        ("vitkern", lambda: vitkern.scaled_dot_product_attention(q, k, v, backend="triton")),
        ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v))], False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--cases", default="dense,vit,navit,pit")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--causal", action="store_true", help="dense case causal")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA device")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {'fwd+bwd' if args.backward else 'fwd'}")
    for case in args.cases.split(","):
        if case == "dense":
            dense(dtype, args.backward, args.causal)
        elif case == "pit":
            pit(dtype, args.backward)
        else:
            {"vit": vit, "navit": navit}[case](dtype, args.backward)


if __name__ == "__main__":
    main()
