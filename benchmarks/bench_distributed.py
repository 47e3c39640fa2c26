"""Per-rank peak memory and time of sequence-parallel attention (forward + backward) against the rank count.

    python benchmarks/bench_distributed.py                          # CPU: 1, 2, 4 gloo ranks
    python benchmarks/bench_distributed.py --tokens 50176 --heads 12 --head-dim 64 --dtype bfloat16   # GPUs

One process per rank (gloo on CPU; NCCL with one GPU per rank, up to the GPU count). Writes JSON and markdown
to benchmarks/results/. Time: median over the repeats of one forward + backward, the slowest rank's. Memory:
the rank's peak during one forward + backward above what it held before (its q, k, v, dout shards): CUDA
allocator peak on GPUs; on CPU the resident-set peak (VmHWM, reset before the step) with glibc told to return
every large freed block to the OS, so it tracks live tensors.

Memory model (bytes per rank; T tokens, P ranks, n = T/P, H query heads, Hk key/value heads, D head dim,
e bytes per element, a bytes per accumulator element: 4, or 8 for float64):

  allgather_kv  K, V gathered and kept for the backward             2 T Hk D e        scales with T
                their gradients before the reduce-scatter            2 T Hk D e        scales with T
                out, dq, the rank's dk, dv                           (2H + 2Hk) n D e  scales with T/P
                backend workspace, one call of n queries x T keys    fused: O(n H); reference: O(n T H)
  ring          out and its log-sum-exp kept for the backward        n H D a + 4 n H   scales with T/P
                K/V shard being used + the one in flight             4 n Hk D e        scales with T/P
                dq accumulator, dK/dV accumulator + the one in flight  n H D a + 4 n Hk D a
                one block's backward: values widened to [V, 0, K]    ~ 3 n (H + Hk) 3D e + workspace of
                                                                       one call of n queries x n keys

The check: each rank first runs, alone and without communication, the local attention work its mode does
(allgather_kv: one varlen_attention forward + backward of its n queries against T keys; ring: one block's
backward) and measures that call's peak (output, gradients and the backend's workspace). The prediction adds
the buffers the distributed layer holds at that moment (``predicted_extra``); the table shows measured /
predicted.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vitkern  # noqa: E402
from vitkern import backends  # noqa: E402
from vitkern.distributed import sequence_parallel_attention  # noqa: E402
from vitkern.distributed.ring import _acc_dtype, _block_grads  # noqa: E402

MIB = 2 ** 20


# ---------------------------------------------------------------- memory measurement

def _fixed_mmap_threshold():
    # glibc raises its mmap threshold as large blocks are freed and then keeps freed tensors in its heap,
    # invisible to the resident set; a fixed threshold returns every large tensor to the OS when freed.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


class PeakMemory:
    """Peak bytes above the level at ``start()``: CUDA allocator, or the process's resident set on CPU."""

    def __init__(self, device):
        self.device = device

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _status_kib("VmRSS:") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # reset VmHWM to the current resident set

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM:") * 1024 - self.base


# ---------------------------------------------------------------- the model

def model_bytes(mode, t, p, h, hk, d, e, a):
    """(bytes that scale with T/P, bytes that scale with T) of the mode's own buffers, per the docstring."""
    n = t // p
    if mode == "allgather_kv":
        return {"per_rank_tokens": (2 * h + 2 * hk) * n * d * e, "all_tokens": 4 * t * hk * d * e}
    return {"per_rank_tokens": n * h * d * a + 4 * n * h + 4 * n * hk * d * e + n * h * d * a + 4 * n * hk * d * a
            + 3 * n * (h + hk) * 3 * d * e, "all_tokens": 0}


def predicted_extra(mode, calib, t, p, h, hk, d, e, a):
    """Calibrated local call + the buffers the distributed layer holds around it at that moment."""
    n = t // p
    if mode == "allgather_kv":
        # The calibration call already holds out, lse, dq and the T-key dK/dV (and the backend's workspace);
        # add the gathered K/V, inputs there. The reduce-scatter comes later, after the workspace is freed.
        return calib + 2 * t * hk * d * e
    # The calibration is one block's backward (_block_grads, inputs held). Around it the ring holds: the saved
    # out and lse, the dq accumulator, the received K/V shard and the next one (none at P = 1, only the
    # received one at P = 2: the last step receives nothing), and the shard's dK/dV accumulator plus the one
    # sent at the previous step (only the own one at P = 1).
    kv = 0 if p == 1 else (2 if p == 2 else 4) * n * hk * d * e
    acc = (2 if p == 1 else 4) * n * hk * d * a
    return calib + n * h * d * a + 4 * n * h + n * h * d * a + kv + acc


# ---------------------------------------------------------------- one rank

def _inputs(n, h, hk, d, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return mk(n, h, d), mk(n, hk, d), mk(n, hk, d), mk(n, h, d)


def _calibrate(mode, n, t, h, hk, d, dtype, device, backend):
    """Peak of the local attention work alone (no communication), inputs held beforehand."""
    meter = PeakMemory(device)
    q, _, _, dout = _inputs(n, h, hk, d, dtype, device, 1)
    if mode == "allgather_kv":
        _, k, v, _ = _inputs(t, h, hk, d, dtype, device, 2)
        cu_q = torch.tensor([0, n], device=device)
        cu_k = torch.tensor([0, t], device=device)
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        meter.start()
        out = vitkern.varlen_attention(q, k, v, cu_q, cu_k, backend=backend)
        out.backward(dout)
        peak = meter.stop()
    else:
        _, k, v, _ = _inputs(n, h, hk, d, dtype, device, 2)
        cu = torch.tensor([0, n], device=device)
        cd = _acc_dtype(dtype)
        with torch.no_grad():
            out, lse = vitkern.varlen_attention(q, k, v, cu, cu, return_lse=True, backend=backend)
        out = out.to(cd)
        scale = d ** -0.5
        meter.start()
        res = _block_grads(q, k, v, cu, cu, scale, backend, dout, out, lse)
        peak = meter.stop()
        del res
    return peak


def _rank_main(rank, world, port, cfg, out_dir):
    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        _fixed_mmap_threshold()
        torch.set_num_threads(max(1, cfg["threads"] // world))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    t, h, hk, d, mode = cfg["tokens"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["mode"]
    dtype = getattr(torch, cfg["dtype"])
    n = t // world
    backend = cfg["backend"]
    _calibrate(mode, n, t, h, hk, d, dtype, device, backend)   # the first call pays one-time set-up costs
    calib = _calibrate(mode, n, t, h, hk, d, dtype, device, backend)

    q, k, v, dout = _inputs(n, h, hk, d, dtype, device, 10 + rank)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def step():
        for x in leaves:
            x.grad = None
        out = sequence_parallel_attention(*leaves, mode=mode, backend=backend)
        out.backward(dout)
        del out

    step()  # warm-up (and the first-call costs of the backend)
    meter = PeakMemory(device)
    dist.barrier()
    for x in leaves:
        x.grad = None
    meter.start()
    step()
    peak = meter.stop()
    times = []
    for _ in range(cfg["repeats"]):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    e = torch.empty(0, dtype=dtype).element_size()
    a = torch.empty(0, dtype=_acc_dtype(dtype)).element_size()
    q4 = q.detach().unsqueeze(0).transpose(1, 2)
    used = backends.select(backend, q4, q4, q4, None, torch.tensor([0, n], device=device), 0.0)
    res = {"rank": rank, "time_s": statistics.median(times), "peak_bytes": peak, "calib_bytes": calib,
           "predicted_bytes": predicted_extra(mode, calib, t, world, h, hk, d, e, a),
           "model": model_bytes(mode, t, world, h, hk, d, e, a), "backend": used}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world, cfg, tmp):
    os.makedirs(tmp, exist_ok=True)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    mp.start_processes(_rank_main, args=(world, _free_port(), cfg, tmp), nprocs=world, join=True,
                       start_method="spawn")
    ranks = []
    for r in range(world):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    return ranks


# ---------------------------------------------------------------- report

def to_markdown(meta, rows):
    lines = [f"# Sequence-parallel attention: per-rank memory and time vs ranks ({meta['device_name']})", "",
             f"T = {meta['tokens']} tokens, H = {meta['heads']} (Hk = {meta['kv_heads']}), D = {meta['head_dim']}, "
             f"{meta['dtype']}, backend `{rows[0]['backend']}`, forward + backward, {meta['repeats']} timed repeats "
             f"(median; slowest rank). {meta['note']}", "",
             "| mode | ranks | tokens/rank | time (ms) | peak extra / rank (MiB) | predicted (MiB) | measured / "
             "predicted | model: T/P part (MiB) | model: T part (MiB) | calibrated local call (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ranks']} | {r['tokens_per_rank']} | {r['time_ms']:.1f} | "
                     f"{r['peak_mib']:.1f} | {r['predicted_mib']:.1f} | {r['ratio']:.2f} | "
                     f"{r['model_per_rank_tokens_mib']:.1f} | {r['model_all_tokens_mib']:.1f} | {r['calib_mib']:.1f} |")
    lines += ["", "Memory model: see the docstring of benchmarks/bench_distributed.py. allgather_kv holds the "
              "whole K and V (and their gradients) on every rank: that part does not shrink with more ranks. "
              "ring holds two shards at a time: everything scales with T/P, at the price of more time "
              "(P sequential steps and a backward that recomputes each block with widened values).", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ranks", default=None, help="comma-separated rank counts (default 1,2,4 on CPU; "
                                                   "1,2,4,.. up to the GPU count on CUDA)")
    ap.add_argument("--modes", default="allgather_kv,ring")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if args.ranks:
        ranks = [int(x) for x in args.ranks.split(",")]
    elif cuda:
        ranks = [r for r in (1, 2, 4, 8, 16) if r <= torch.cuda.device_count()]
    else:
        ranks = [1, 2, 4]
    if cuda and max(ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks: at most {torch.cuda.device_count()} (one GPU per rank), got {max(ranks)}")
    for r in ranks:
        if args.tokens % r:
            raise SystemExit(f"--tokens: expected a multiple of every rank count {ranks}, got {args.tokens}")
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU {platform.processor() or platform.machine()}, " \
                                                              f"{os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = ("One process per GPU, NCCL." if cuda else
            f"gloo, all ranks on this machine's {os.cpu_count()} cores ({threads} threads shared: with more ranks "
            f"than cores the ranks time-share, so time does not drop with ranks here; memory is per process). "
            f"Load average when it started: {load:.1f} (other work on the machine makes times noisy; the memory "
            f"figures do not depend on it).")
    meta = {"device_name": device_name, "tokens": args.tokens, "heads": args.heads,
            "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "repeats": args.repeats, "note": note, "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rows = []
    tmp = os.path.join(args.out_dir, ".bench_distributed_tmp")
    for mode in args.modes.split(","):
        for world in ranks:
            cfg = {"device": "cuda" if cuda else "cpu", "threads": threads, "tokens": args.tokens,
                   "heads": args.heads, "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim,
                   "dtype": args.dtype, "mode": mode, "backend": args.backend, "repeats": args.repeats}
            res = run_config(world, cfg, tmp)
            peak = max(r["peak_bytes"] for r in res)
            pred = max(r["predicted_bytes"] for r in res)
            row = {"mode": mode, "ranks": world, "tokens_per_rank": args.tokens // world,
                   "time_ms": 1e3 * max(r["time_s"] for r in res), "peak_mib": peak / MIB,
                   "predicted_mib": pred / MIB, "ratio": peak / pred,
                   "calib_mib": max(r["calib_bytes"] for r in res) / MIB,
                   "model_per_rank_tokens_mib": res[0]["model"]["per_rank_tokens"] / MIB,
                   "model_all_tokens_mib": res[0]["model"]["all_tokens"] / MIB, "backend": res[0]["backend"],
                   "per_rank": res}
            rows.append(row)
            print(f"{mode:>12} P={world}: {row['time_ms']:8.1f} ms  peak {row['peak_mib']:7.1f} MiB  predicted "
                  f"{row['predicted_mib']:7.1f} MiB  ({row['ratio']:.2f})", flush=True)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"distributed_{'cuda' if cuda else 'cpu'}_T{args.tokens}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
