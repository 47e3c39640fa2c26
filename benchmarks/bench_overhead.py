"""Per-call overhead of vitkern against torch SDPA, on CPU: what a call costs beyond its arithmetic.

    python benchmarks/bench_overhead.py           # about 2 minutes on 2 cores
    python benchmarks/bench_overhead.py --quick   # a smoke run: fewer calls and fresh processes

Cells, per size (tiny [1, 1, 8, 16]; ViT-Ti and ViT-S attention, B=64 H=3/6 N=197 D=64):
  fwd      vitkern.scaled_dot_product_attention against F.scaled_dot_product_attention on the same q, k, v
  fwdbwd   the same, forward and torch.autograd.grad of q, k, v
  varlen   vitkern.varlen_attention on S sequences of n tokens packed as [S·n, H, D], against torch SDPA on the
           same tokens viewed as [S, H, n, D] (one call) and against a loop of one SDPA call per sequence
The cells of a size are timed round-robin in one run (measure.time_interleaved): medians of many calls.
Then, in fresh processes: the first call's latency against the second's after ``import vitkern``, and the time
``import vitkern`` adds to ``import torch`` (medians over several processes).

Writes benchmarks/results/overhead-<device-slug>-<YYYYMMDD>[-quick].{json,md} (see --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitkern  # noqa: E402
from benchmarks import measure, report  # noqa: E402

# name -> (batch or sequences, heads, tokens per sequence, head dim)
SIZES = {"tiny": (1, 1, 8, 16), "vit-ti": (64, 3, 197, 64), "vit-s": (64, 6, 197, 64)}
# The tiny varlen call: 20 tokens in 2 sequences (equal lengths, so torch can take them as one batched call).
VARLEN_TINY = (2, 1, 10, 16)

# Issue 12's targets: vitkern / torch per-call ratio at the tiny size, and the fresh-process costs in seconds.
TARGETS = {("tiny", "fwd"): 1.5, ("tiny", "fwdbwd"): 1.3, ("tiny", "varlen"): 2.0}
FIRST_CALL_TARGET_S = 0.1
IMPORT_TARGET_S = 0.15


class Cell:
    """One timed call: ``fn`` runs it once; ``impl`` is "vitkern", "torch" or "torch-loop"."""

    def __init__(self, size: str, mode: str, impl: str, shape: str, fn: Callable[[], object]):
        self.size, self.mode, self.impl, self.shape, self.fn = size, mode, impl, shape, fn


def _grad_call(attn: Callable, leaves: tuple, dout: torch.Tensor) -> Callable[[], object]:
    def call():
        return torch.autograd.grad(attn(*leaves), leaves, dout)
    return call


def build_cells(size: str, backend: Optional[str], seed: int = 0) -> list[Cell]:
    """The cells of one size, vitkern and torch on the same tensors (checked against each other)."""
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = SIZES[size]
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    leaves = tuple(x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn(b, h, n, d, generator=g)

    def vk(*x):
        return vitkern.scaled_dot_product_attention(*x, backend=backend)

    dense = f"[{b}, {h}, {n}, {d}]"
    cells = [Cell(size, "fwd", "torch", dense, lambda: F.scaled_dot_product_attention(q, k, v)),
             Cell(size, "fwd", "vitkern", dense, lambda: vk(q, k, v)),
             Cell(size, "fwdbwd", "torch", dense, _grad_call(F.scaled_dot_product_attention, leaves, dout)),
             Cell(size, "fwdbwd", "vitkern", dense, _grad_call(vk, leaves, dout))]

    s, h, n, d = VARLEN_TINY if size == "tiny" else SIZES[size]
    packed = [torch.randn(s * n, h, d, generator=g) for _ in range(3)]
    batched = [x.view(s, n, h, d).transpose(1, 2) for x in packed]  # the same memory as [S, H, n, D]
    cu = vitkern.lengths_to_cu_seqlens([n] * s)

    def loop():
        return [F.scaled_dot_product_attention(*(x[i:i + 1] for x in batched)) for i in range(s)]

    tokens = f"{s}x{n} tokens, H={h} D={d}"
    cells += [Cell(size, "varlen", "torch", tokens, lambda: F.scaled_dot_product_attention(*batched)),
              Cell(size, "varlen", "torch-loop", tokens, loop),
              Cell(size, "varlen", "vitkern", tokens,
                   lambda: vitkern.varlen_attention(*packed, cu, max_seqlen_q=n, max_seqlen_k=n, backend=backend))]
    return cells


def _as_batched(cell: Cell, result) -> list[torch.Tensor]:
    """A cell's result as a list of tensors comparable across impls (varlen: [S, H, n, Dv])."""
    if isinstance(result, torch.Tensor):
        if cell.mode == "varlen" and cell.impl == "vitkern":
            s, h, n, d = VARLEN_TINY if cell.size == "tiny" else SIZES[cell.size]
            return [result.view(s, n, h, -1).transpose(1, 2)]
        return [result]
    if cell.impl == "torch-loop":
        return [torch.cat(result, 0)]
    return list(result)


def check(cells: list[Cell], tol: float = 1e-3) -> dict:
    """Max relative error of each cell against the torch cell of its mode (a wrong kernel, not rounding)."""
    errors, truth = {}, {}
    for c in cells:
        got = _as_batched(c, c.fn())
        if c.impl == "torch":
            truth[c.mode] = got
            continue
        err = max(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() for a, b in zip(got, truth[c.mode]))
        errors[(c.mode, c.impl)] = err
        if not err <= tol:
            raise AssertionError(f"{c.size} {c.mode} {c.impl}: differs from torch SDPA by {err:.3g} > {tol}")
    return errors


def time_cells(cells: list[Cell], budget_s: float, min_reps: int, max_reps: int) -> list[dict]:
    """Round-robin medians of every cell (each called twice before: the second call's time sets the repeats)."""
    jobs = []
    for c in cells:
        c.fn()
        _, first_s, _ = measure.timed_first_call(c.fn, torch.device("cpu"), probe_memory=False)
        jobs.append(measure.TimedJob(c.fn, first_s))
    timings = measure.time_interleaved(jobs, torch.device("cpu"), budget_s, min_reps, max_reps,
                                       long_call_s=float("inf"))
    rows = []
    for c, job, t in zip(cells, jobs, timings):
        if t is None:
            raise RuntimeError(f"{c.size} {c.mode} {c.impl}: a timed call raised {job.error!r}")
        q1, _, q3 = statistics.quantiles(t.samples, n=4) if len(t.samples) > 1 else (t.median_s,) * 3
        rows.append({"size": c.size, "mode": c.mode, "impl": c.impl, "shape": c.shape, "calls": len(t.samples),
                     "median_us": t.median_s * 1e6, "p25_us": q1 * 1e6, "p75_us": q3 * 1e6})
    base = {(r["mode"]): r["median_us"] for r in rows if r["impl"] == "torch"}
    for r in rows:
        r["ratio_vs_torch"] = r["median_us"] / base[r["mode"]]
    return rows


# ---------------------------------------------------------------------------------------------- fresh processes

_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    t1 = time.perf_counter()
    import vitkern
    t2 = time.perf_counter()
    import torch.nn.functional as F
    which, backend = sys.argv[1], (sys.argv[2] if sys.argv[2] != "auto" else None)
    if int(sys.argv[3]):
        torch.set_num_threads(int(sys.argv[3]))
    attn = F.scaled_dot_product_attention if which == "torch" else (
        lambda *x: vitkern.scaled_dot_product_attention(*x, backend=backend))
    q, k, v = (torch.randn(1, 1, 8, 16, requires_grad=True) for _ in range(3))
    dynamo_before = "torch._dynamo" in sys.modules
    times = []
    for _ in range(2):  # first and second forward
        a = time.perf_counter(); attn(q.detach(), k.detach(), v.detach()); times.append(time.perf_counter() - a)
    for _ in range(2):  # first and second forward+backward
        a = time.perf_counter(); attn(q, k, v).sum().backward(); times.append(time.perf_counter() - a)
    print(json.dumps({"import_torch_s": t1 - t0, "import_vitkern_s": t2 - t1, "fwd_first_s": times[0],
                      "fwd_second_s": times[1], "fwdbwd_first_s": times[2], "fwdbwd_second_s": times[3],
                      "dynamo_imported_by_import": dynamo_before,
                      "dynamo_imported_by_calls": "torch._dynamo" in sys.modules and not dynamo_before}))
""")


def fresh_process(which: str, backend: Optional[str], threads: int = 0) -> dict:
    """One fresh interpreter: import times, and first/second call times of ``which`` ("vitkern" or "torch"), on
    ``threads`` threads (0: torch's default)."""
    root = str(Path(vitkern.__file__).resolve().parent.parent)  # the vitkern this process imported
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-c", _CHILD, which, backend or "auto", str(threads)], capture_output=True, text=True,
                         env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"fresh process ({which}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_process_summary(runs: dict) -> dict:
    """Medians over the processes of each kind, and the extra costs the targets name."""
    med = {which: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key.endswith("_s")}
           for which, rs in runs.items()}
    vk = med["vitkern"]
    return {"processes_each": len(runs["vitkern"]), "median": med,
            "first_call_extra_s": vk["fwd_first_s"] - vk["fwd_second_s"],
            "first_fwdbwd_extra_s": vk["fwdbwd_first_s"] - vk["fwdbwd_second_s"],
            "import_vitkern_over_torch_s": vk["import_vitkern_s"],
            "dynamo_imported_by_import": any(r["dynamo_imported_by_import"] for r in runs["vitkern"]),
            "dynamo_imported_by_calls": any(r["dynamo_imported_by_calls"] for r in runs["vitkern"])}


# ---------------------------------------------------------------------------------------------- report


def markdown(doc: dict) -> str:
    m, cfg, fresh = doc["machine"], doc["config"], doc["fresh_process"]
    lines = [f"# vitkern per-call overhead: {m['device_name']}", "",
             f"{m['date_utc']} · torch {m['torch']} · vitkern {m['vitkern']} (commit {m['git_commit']}) · fp32 · "
             f"{m['torch_threads']} threads · vitkern backend {cfg['backend'] or 'auto'}"
             + (" · **quick smoke run**" if cfg["quick"] else "") + (f" · {cfg['label']}" if cfg["label"] else ""),
             "", f"Command: `{cfg['command']}`. Medians (and quartiles) of per-call wall time, the cells of a size "
                 "timed round-robin in one run; *ratio* is vitkern (or the loop) over torch SDPA's one call.", "",
             "| size | call | shape | impl | calls | median µs | p25–p75 µs | ratio | target |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in doc["cells"]:
        target = TARGETS.get((r["size"], r["mode"])) if r["impl"] == "vitkern" else None
        verdict = "" if target is None else f"≤ {target}× " + ("met" if r["ratio_vs_torch"] <= target else "**missed**")
        lines.append(f"| {r['size']} | {r['mode']} | {r['shape']} | {r['impl']} | {r['calls']} | "
                     f"{r['median_us']:.1f} | {r['p25_us']:.1f}–{r['p75_us']:.1f} | {r['ratio_vs_torch']:.2f} | "
                     f"{verdict} |")
    med = fresh["median"]
    first, imp = fresh["first_call_extra_s"], fresh["import_vitkern_over_torch_s"]
    lines += ["", f"## Fresh processes (medians of {fresh['processes_each']} each, q/k/v [1, 1, 8, 16])", "",
              "| | vitkern | torch SDPA |", "|---|---:|---:|"]
    for key, label in (("fwd_first_s", "first forward"), ("fwd_second_s", "second forward"),
                       ("fwdbwd_first_s", "first forward+backward"), ("fwdbwd_second_s", "second forward+backward")):
        lines.append(f"| {label} | {med['vitkern'][key] * 1e3:.2f} ms | {med['torch'][key] * 1e3:.2f} ms |")
    lines += [f"| `import torch` | {med['vitkern']['import_torch_s']:.3f} s | {med['torch']['import_torch_s']:.3f} s |",
              "", f"- first vitkern call over the second: {first:.3f} s (target ≤ {FIRST_CALL_TARGET_S} s: "
                  f"{'met' if first <= FIRST_CALL_TARGET_S else '**missed**'})",
              f"- `import vitkern` after `import torch`: {imp:.3f} s (target ≤ {IMPORT_TARGET_S} s: "
              f"{'met' if imp <= IMPORT_TARGET_S else '**missed**'})",
              f"- torch._dynamo imported by `import vitkern`: {fresh['dynamo_imported_by_import']}; "
              f"by the first calls: {fresh['dynamo_imported_by_calls']}", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer calls and fresh processes")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated from {','.join(SIZES)}")
    ap.add_argument("--backend", default=None, help="vitkern backend (default: automatic choice)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the timed cells (default: torch's). On a shared machine a tiny "
                         "call that opens a parallel region can wait milliseconds for a descheduled thread")
    ap.add_argument("--processes", type=int, default=None, help="fresh processes of each kind (default 5; quick 1)")
    ap.add_argument("--label", default="", help="a note for the report's header, e.g. 'shared 2-core machine'")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in args.sizes if s not in SIZES]
    if bad or not args.sizes:
        ap.error(f"--sizes: expected names from {list(SIZES)}, got {args.sizes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    allocator = measure.steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny_budget, big_budget = (0.2, 0.5) if args.quick else (1.5, 3.0)
    big_min = 3 if args.quick else 5
    rows = []
    for size in args.sizes:
        cells = build_cells(size, args.backend)
        errors = check(cells)
        tiny = size == "tiny"
        size_rows = time_cells(cells, tiny_budget if tiny else big_budget, min_reps=50 if tiny else big_min,
                               max_reps=5000 if tiny else 300)
        for r in size_rows:
            r["max_rel_err_vs_torch"] = errors.get((r["mode"], r["impl"]))
            print(f"{r['size']:7s} {r['mode']:7s} {r['impl']:11s} {r['median_us']:10.1f} us  "
                  f"x{r['ratio_vs_torch']:.2f}  ({r['calls']} calls)", file=sys.stderr, flush=True)
        rows += size_rows
    n_proc = args.processes or (1 if args.quick else 5)
    runs = {which: [fresh_process(which, args.backend, args.threads or 0) for _ in range(n_proc)]
            for which in ("vitkern", "torch")}
    machine = measure.machine_info(torch.device("cpu"))
    now = datetime.now(timezone.utc)
    doc = {"schema": 1, "machine": machine,
           "config": {"command": "python benchmarks/bench_overhead.py " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
                      "quick": args.quick, "backend": args.backend, "threads": torch.get_num_threads(), "label": args.label, "allocator": allocator,
                      "available_backends": vitkern.available_backends()},
           "cells": rows, "fresh_process": {**fresh_process_summary(runs), "runs": runs}}
    stem = f"overhead-{measure.device_slug(machine)}-{now:%Y%m%d}" + ("-quick" if args.quick else "")
    report.write_json(report.clean_floats(doc), args.out / f"{stem}.json")
    (args.out / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {args.out / stem}.{{json,md}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
