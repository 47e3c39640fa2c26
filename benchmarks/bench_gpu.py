"""The GPU benchmark of scripts/gpu_check.sh: vitkern's Triton kernels against every torch peer on one GPU, in
bf16, within a time limit, with the same run's bf16 matmul rate as the ceiling.

    python benchmarks/bench_gpu.py --out DIR [--deadline-s 240]   # on a CUDA machine
    python benchmarks/bench_gpu.py --dry-run                      # the plan: cases, peers, predictions (no GPU)
    python benchmarks/bench_gpu.py --cpu-smoke --out DIR          # the same code on CPU at smoke sizes

Cases, in the order they run (what does not fit in --deadline-s is listed as not run): vit-b16 (B=256),
navit-packed (32 packs of 4,096 tokens), pit-224 (50,176 tokens, 6 heads), then the FlashAttention-3 grid (16k
tokens, heads·dim 2048, seq 512-16k, head dims 64 and 128; the targets' points first, FA3_ORDER); forward and
forward+backward each. Peers: torch SDPA
by default dispatch and pinned to each backend (flash, efficient, cudnn, math; dense-mask variants for packed
batches), FlexAttention with its mask build (compiled: only for the --flex cases, compiling takes seconds per
shape and mode), torch.nn.attention.varlen.varlen_attn where this torch has it, the per-image SDPA loop and
jagged nested tensors for packed batches, naive, and vitkern-triton (on the FA3 grid also with
VITKERN_TRITON_TMA=0 and =1: the TMA paths' A/B). The cells are those of bench_attn.py
(benchmarks/runner.py): a correctness check against the table's first peer before timing, CUDA events, the
cells of a table timed round-robin. Backward-only times are derived: forward+backward minus forward.

Writes DIR/bench_gpu.json (bench_attn.py's schema plus ``gpu``: ceiling, derived backward, targets, cases not
run) and DIR/bench_gpu.md (summary, issue 13's targets, then bench_attn.py's full tables), after every case, so
a killed run leaves what it finished. Prints the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import measure, peers, report, workloads  # noqa: E402
from benchmarks.runner import CaseRunner, Options  # noqa: E402

GPU_WORKLOADS = ("vit-b16", "navit-packed", "pit-224", "fa3-grid")
MODES = ("fwd", "fwdbwd")
# FlexAttention compiles once per shape and mode (10-30 s each): by default only the cases issue 13's targets
# compare it on. "fa3-grid@4096" would mean that workload's cases with N = 4096 only.
DEFAULT_FLEX = "vit-b16,navit-packed"
NO_FLEX_REASON = "FlexAttention is not compiled for this case (bench_gpu.py --flex)"
# The FA3 grid's cases in the order they run, (head dim, seq): the targets' points first (N >= 1k, D = 128 at
# N >= 4k), so that a run cut short by its deadline still has them.
FA3_ORDER = [(128, 4096), (64, 4096), (64, 1024), (128, 1024), (128, 16384), (64, 16384), (128, 8192), (64, 8192),
             (128, 2048), (64, 2048), (128, 512), (64, 512)]
# A case whose duration is not known yet (no earlier case of its workload) is assumed to take this long.
FIRST_CASE_S = 20.0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="output folder (default: benchmarks/results)")
    ap.add_argument("--stem", default="bench_gpu", help="output file names: STEM.json, STEM.md")
    ap.add_argument("--workloads", type=_csv, default=list(GPU_WORKLOADS),
                    help=f"comma-separated, run in this order (default: {','.join(GPU_WORKLOADS)})")
    ap.add_argument("--modes", type=_csv, default=list(MODES), help="comma-separated from fwd,fwdbwd")
    ap.add_argument("--fa3-seqs", type=lambda s: [int(x) for x in _csv(s)], default=None,
                    help="only these FA3-grid sequence lengths (default: all, 512-16384)")
    ap.add_argument("--fa3-dims", type=lambda s: [int(x) for x in _csv(s)], default=None,
                    help="only these FA3-grid head dims (default: 64,128)")
    ap.add_argument("--flex", default=DEFAULT_FLEX,
                    help=f"where FlexAttention runs: workloads, WORKLOAD@SEQLEN, 'all' or 'none' "
                         f"(default: {DEFAULT_FLEX})")
    ap.add_argument("--peers", type=_csv, default=None, help="only peers whose name contains one of these")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no case that would end after this many seconds from the start (default: none)")
    ap.add_argument("--cell-budget-s", type=float, default=0.25, help="time for the repeats of one cell")
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the square bf16 matmul ceiling")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (cases, peers, predictions); no device")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the same code on CPU at smoke sizes (checks this script without a GPU)")
    args = ap.parse_args(argv)
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        ap.error(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {','.join(args.modes)}")
    bad = [w for w in args.workloads if w not in workloads.WORKLOADS]
    if bad:
        ap.error(f"--workloads: unknown {bad}; expected names from {list(workloads.WORKLOADS)}")
    try:
        args.flex_rule = flex_rule(args.flex)
    except ValueError as e:
        ap.error(str(e))
    if args.dry_run and args.cpu_smoke:
        ap.error("--dry-run and --cpu-smoke exclude each other")
    if not args.dry_run and not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA device is available (use --dry-run or --cpu-smoke without one)")
    return args


def flex_rule(text: str):
    """A predicate case -> bool from --flex's value."""
    text = text.strip()
    if text in ("all", "none"):
        return lambda case: text == "all"
    wanted = []
    for item in _csv(text):
        name, _, seq = item.partition("@")
        if name not in workloads.WORKLOADS or (seq and not seq.isdigit()):
            raise ValueError(f"--flex: expected 'all', 'none' or WORKLOAD[@SEQLEN],..., got {item!r}")
        wanted.append((name, int(seq) if seq else None))
    return lambda case: any(case.workload == n and (s is None or case.seqlen == s) for n, s in wanted)


def build_cases(args: argparse.Namespace, device_kind: str) -> list[workloads.Case]:
    """The cases in run order (smoke sizes with --cpu-smoke)."""
    out = []
    for name in args.workloads:
        cases = workloads.build(name, device_kind, quick=args.cpu_smoke)
        if name == "fa3-grid":
            cases = [c for c in cases if (args.fa3_seqs is None or c.seqlen in args.fa3_seqs)
                     and (args.fa3_dims is None or c.head_dim in args.fa3_dims)]
            rank = {dn: i for i, dn in enumerate(FA3_ORDER)}
            cases.sort(key=lambda c: rank.get((c.head_dim, c.seqlen), len(rank)))
        out += cases
    return out


def options(args: argparse.Namespace, rate: float) -> Options:
    if args.cpu_smoke:
        return Options(cell_budget_s=0.05, min_reps=1, max_reps=3, long_call_s=0.05, prep_budget_s=0.02,
                       max_cell_s=0.5, compile=False, peer_filter=args.peers, matmul_rate=rate)
    # GPU calls take microseconds to tens of milliseconds: the first call (Triton JIT and autotuning, cuDNN
    # plans, torch.compile) is never a sample.
    return Options(cell_budget_s=args.cell_budget_s, min_reps=5, max_reps=50, long_call_s=float("inf"),
                   prep_budget_s=0.2, peer_filter=args.peers, matmul_rate=rate)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> dict:
    """Median FLOP/s of an n x n x n matmul on random data (three warm-ups, then ``reps`` timed with CUDA
    events, or the host clock on CPU): the rate a tensor-core-bound kernel can at best reach here."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    measure.synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": sec * 1e3, "flops_per_s": 2 * n**3 / sec,
            "samples": len(times)}


# ------------------------------------------------------------------------------------------ derived numbers
def _key(c: dict) -> tuple:
    return c["workload"], c["case"], c["peer"]


def derived_backward(cells: list[dict]) -> list[dict]:
    """Backward-only time and rate of each (case, peer) with both modes timed: forward+backward minus forward
    (kernel time, prep excluded), at 2.5x the forward's useful FLOPs (the FlashAttention papers' count)."""
    fwd = {_key(c): c for c in cells if c["mode"] == "fwd" and c["status"] == "ok"}
    out = []
    for c in cells:
        f = fwd.get(_key(c))
        if c["mode"] != "fwdbwd" or c["status"] != "ok" or f is None:
            continue
        ms = c["time_ms"] - f["time_ms"]
        out.append({"workload": c["workload"], "case": c["case"], "peer": c["peer"], "family": c["family"],
                    "bwd_ms": ms, "bwd_tflops": 2.5 * f["useful_flops"] / (ms * 1e-3) / 1e12 if ms > 0 else None})
    return out


def _best(cells: list[dict], pick) -> Optional[dict]:
    ok = [c for c in cells if c["status"] == "ok" and pick(c["peer"])]
    return min(ok, key=lambda c: c["total_ms"], default=None)


def _is_sdpa_dense(name: str) -> bool:
    return name == "sdpa" or (name.startswith("sdpa-") and not name.startswith(("sdpa-mask", "sdpa-loop",
                                                                                 "sdpa-njt")))


def _is_sdpa_mask(name: str) -> bool:
    return name.startswith("sdpa-mask")


def _target(name: str, want: float, got: Optional[float], detail: str, unit: str = "x") -> dict:
    status = "n/a" if got is None else ("met" if got >= want else "missed")
    return {"target": name, "want": want, "got": got, "unit": unit, "status": status, "detail": detail}


def targets(cells: list[dict], bwd: list[dict]) -> list[dict]:
    """Issue 13's GPU targets, each met / missed / n/a (a cell it needs did not run)."""
    out = []
    groups: dict = {}
    for c in cells:
        groups.setdefault((c["workload"], c["case"], c["mode"]), []).append(c)
    for (wl, case, mode), cs in groups.items():
        vk = _best(cs, lambda p: p == "vitkern-triton")
        if wl == "fa3-grid" and mode == "fwd":
            seq, d = _seq_dim(case)
            sd = _best(cs, _is_sdpa_dense)
            if seq >= 1024:
                ratio = sd["total_ms"] / vk["total_ms"] if vk and sd else None
                out.append(_target(f"fa3 fwd D={d} N={seq} vs best SDPA", 1.0, ratio,
                                   f"best SDPA: {sd['peer'] if sd else '-'}"))
            if d == 128 and seq >= 4096:
                out.append(_target(f"fa3 fwd D=128 N={seq} TFLOP/s", 550.0,
                                   vk["useful_tflops"] if vk else None, "vitkern-triton", "TFLOP/s"))
        elif wl == "fa3-grid" and mode == "fwdbwd":
            seq, d = _seq_dim(case)
            mine = [b for b in bwd if b["case"] == case and b["workload"] == wl and b["bwd_tflops"]]
            vkb = next((b for b in mine if b["peer"] == "vitkern-triton"), None)
            sdb = max((b for b in mine if _is_sdpa_dense(b["peer"])), key=lambda b: b["bwd_tflops"], default=None)
            if seq >= 1024:
                ratio = vkb["bwd_tflops"] / sdb["bwd_tflops"] if vkb and sdb else None
                out.append(_target(f"fa3 bwd D={d} N={seq} vs best SDPA (derived)", 0.9, ratio,
                                   f"best SDPA: {sdb['peer'] if sdb else '-'}"))
        elif wl == "vit-b16" and mode == "fwdbwd":
            sd = _best(cs, _is_sdpa_dense)
            out.append(_target("vit-b16 fwd+bwd vs best SDPA", 1.1,
                               sd["total_ms"] / vk["total_ms"] if vk and sd else None,
                               f"best SDPA: {sd['peer'] if sd else '-'}"))
        elif wl == "navit-packed" and mode == "fwdbwd":
            fx = _best(cs, lambda p: p == "flex-doc")
            sm = _best(cs, _is_sdpa_mask)
            out.append(_target("navit-packed fwd+bwd vs FlexAttention (mask build included)", 2.0,
                               fx["total_ms"] / vk["total_ms"] if vk and fx else None, "flex-doc"))
            out.append(_target("navit-packed fwd+bwd vs SDPA with a dense mask", 10.0,
                               sm["total_ms"] / vk["total_ms"] if vk and sm else None,
                               f"best: {sm['peer'] if sm else '-'}"))
        elif wl == "pit-224" and mode == "fwdbwd":
            cell = next((c for c in cs if c["peer"] == "vitkern-triton"), None)
            ran = None if cell is None else (1.0 if cell["status"] == "ok" else 0.0)
            out.append(_target("pit-224 fwd+bwd fits in one GPU", 1.0, ran,
                               cell["status"] + (f": {cell['reason']}" if cell and cell["reason"] else "")
                               if cell else "not run", "ok"))
    return out


def _seq_dim(label: str) -> tuple[int, int]:
    """(N, D) from a dense case label 'B=.. H=.. N=.. D=..'."""
    parts = dict(p.split("=") for p in label.split())
    return int(parts["N"]), int(parts["D"])


# ------------------------------------------------------------------------------------------ report
def _n(x: Optional[float], digits: int = 3) -> str:
    return report._num(x, digits)


def summary_markdown(doc: dict) -> str:
    m, g = doc["machine"], doc["gpu"]
    ceil = g["ceiling"]["flops_per_s"] / 1e12
    lines = [f"# vitkern GPU check benchmark: {m['device_name']}", "",
             f"{m['date_utc']} · torch {m['torch']} · triton {m['triton']} · CUDA {m.get('cuda')} · commit "
             f"{m['git_commit']} · {doc['config']['dtype']}" + (" · **CPU smoke run (not a GPU measurement)**"
                                                                   if g["cpu_smoke"] else ""), "",
             f"Ceiling: a {g['ceiling']['n']}³ {g['ceiling']['dtype']} matmul ran at **{_n(ceil)} TFLOP/s** in this "
             f"run (median of {g['ceiling']['samples']}). TFLOP/s below count useful work (4·D per unmasked pair per "
             f"head forward, 3.5x that forward+backward, 2.5x for the derived backward); times include the mask "
             f"build (*prep*) where a peer needs one.", "", "## Targets (issue 13)", "",
             "| target | want | got | status | detail |", "|---|---:|---:|---|---|"]
    for t in g["targets"]:
        lines.append(f"| {t['target']} | {t['want']} {t['unit']} | {_n(t['got'])} | {t['status']} | {t['detail']} |")
    if not g["targets"]:
        lines.append("| (no target's cells ran) | | | | |")
    lines += ["", "## Per case", "",
              "| workload | case | mode | vitkern ms | TFLOP/s | % ceiling | best SDPA | ms | flex | ms | "
              "varlen_attn ms | naive ms | x best peer |",
              "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for (wl, case, mode), cs in report._groups(doc).items():
        vk = _best(cs, lambda p: p == "vitkern-triton") or _best(cs, lambda p: p.startswith("vitkern"))
        sd = _best(cs, _is_sdpa_mask if any(c["peer"] == "sdpa-loop" for c in cs) else _is_sdpa_dense)
        fx = _best(cs, lambda p: p.startswith("flex"))
        vl = _best(cs, lambda p: p == "torch-varlen")
        nv = _best(cs, lambda p: p.startswith("naive"))
        vk_cell = next((c for c in cs if c["peer"] == "vitkern-triton"), None)
        note = "" if vk or vk_cell is None else f" ({vk_cell['status']})"
        lines.append(
            f"| {wl} | {case} | {report.MODE_NAMES[mode]} | {_n(vk['total_ms']) if vk else '–'}{note} | "
            f"{_n(vk['useful_tflops']) if vk else '–'} | "
            f"{_n(100 * vk['useful_tflops'] / ceil) if vk else '–'} | {sd['peer'] if sd else '–'} | "
            f"{_n(sd['total_ms']) if sd else '–'} | {fx['peer'] if fx else '–'} | {_n(fx['total_ms']) if fx else '–'} | "
            f"{_n(vl['total_ms']) if vl else '–'} | {_n(nv['total_ms']) if nv else '–'} | "
            f"{_n(vk['speedup_vs_best_peer']) if vk else '–'} |")
    fa3 = [b for b in g["derived_backward"] if b["workload"] == "fa3-grid"]
    if fa3:
        names = list(dict.fromkeys(b["peer"] for b in fa3))
        lines += ["", "## FA3 grid, backward only (derived: forward+backward − forward), TFLOP/s", "",
                  "| case | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for case in dict.fromkeys(b["case"] for b in fa3):
            row = {b["peer"]: b["bwd_tflops"] for b in fa3 if b["case"] == case}
            lines.append(f"| {case} | " + " | ".join(_n(row.get(p)) for p in names) + " |")
    if g["not_run"]:
        lines += ["", f"Not run (out of time, --deadline-s {g['deadline_s']}): " + "; ".join(
            f"{c['workload']} {c['case']}" for c in g["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out: Path, stem: str) -> tuple[Path, Path]:
    doc["gpu"]["derived_backward"] = derived_backward(doc["cells"])
    doc["gpu"]["targets"] = targets(doc["cells"], doc["gpu"]["derived_backward"])
    clean = report.clean_floats(doc)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    report.write_json(clean, jpath)
    mpath.write_text(summary_markdown(clean) + "\n" + report.markdown(clean).split("\n", 1)[1])
    return jpath, mpath


# ------------------------------------------------------------------------------------------ run
def dry_run(args: argparse.Namespace) -> int:
    """Prints each case's cells as they would start on an 80 GB-class GPU: peer, status if known up front."""
    device = torch.device("cuda")
    dtype = torch.bfloat16
    elem = 2
    budget = 0.8 * 139 * 2**30     # what an H200 has free, roughly; the real run asks the device
    cases = build_cases(args, "cuda")
    total = 0
    for case in cases:
        ps = _gpu_peers(case, device)
        if args.peers:
            ps = [p for p in ps if any(f in p.name for f in args.peers)]
        print(f"{case.workload:13s} {case.label}  ({len(ps)} peers x {len(args.modes)} modes)")
        for mode in args.modes:
            for p in ps:
                why = p.skip_reason(case, device, dtype, mode)
                need = peers.predicted_bytes(p, case, mode, elem)
                if why is None and p.torch_compile and not args.flex_rule(case):
                    why = NO_FLEX_REASON
                if why is None and need > budget:
                    why = f"OOM predicted ({need / 2**30:.1f} GB)"
                print(f"    {mode:6s} {p.name:20s} {'runs' if why is None else why}")
                total += 1
    print(f"{len(cases)} cases, {total} cells")
    return 0


def _gpu_peers(case, device):
    """peers.peers_for on a CUDA device; on a machine without one (dry run) vitkern-triton is added by hand,
    since vitkern lists the triton backend only where CUDA (or the interpreter) is there to run it."""
    ps = peers.peers_for(case, device)
    if not any(p.name == "vitkern-triton" for p in ps):
        ps.append(peers.Vitkern("triton", case.packed))
    if case.workload == "fa3-grid":   # the TMA paths' A/B (NOTES.md, Triton version 4): pointer tiles, TMA backward
        ps += [peers.VitkernTmaSetting("0"), peers.VitkernTmaSetting("1")]
    return ps


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
    t0 = time.perf_counter()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    ceiling = matmul_ceiling(device, dtype, 512 if args.cpu_smoke else args.matmul_n)
    print(f"matmul ceiling: {ceiling['flops_per_s'] / 1e12:.1f} TFLOP/s ({ceiling['n']}^3 {ceiling['dtype']})",
          file=sys.stderr, flush=True)
    opts = options(args, ceiling["flops_per_s"])
    cases = build_cases(args, device.type)
    doc = {
        "schema": 1,
        "machine": measure.machine_info(device),
        "config": {"command": "python benchmarks/bench_gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                   "quick": bool(args.cpu_smoke), "allocator": None, "device": device.type,
                   "dtype": str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32"),
                   "modes": args.modes, "workloads": args.workloads, "peer_filter": args.peers,
                   "options": {k: v for k, v in vars(opts).items() if k != "peer_filter"},
                   "env": {k: v for k, v in os.environ.items() if k.startswith(("VITKERN_", "TRITON_"))}},
        "workloads": {name: {"description": workloads.WORKLOADS[name],
                             "cases": [c.describe() for c in cases if c.workload == name]}
                      for name in args.workloads},
        "peers": {},
        "cells": [],
        "gpu": {"ceiling": ceiling, "cpu_smoke": bool(args.cpu_smoke), "deadline_s": args.deadline_s,
                "flex": args.flex, "case_seconds": [], "not_run": []},
    }
    seconds: dict = {}     # workload -> durations of its finished cases
    for case in cases:
        elapsed = time.perf_counter() - t0
        guess = max(seconds.get(case.workload, [FIRST_CASE_S])) * (1.5 if case.workload == "fa3-grid" else 1.0)
        if args.deadline_s is not None and elapsed + guess > args.deadline_s:
            doc["gpu"]["not_run"].append({"workload": case.workload, "case": case.label, "expected_s": guess,
                                          "elapsed_s": round(elapsed, 1)})
            print(f"not run (deadline): {case.workload} {case.label}", file=sys.stderr, flush=True)
            continue
        runner_opts = opts if args.flex_rule(case) or args.cpu_smoke else dataclasses.replace(opts, compile=False)
        r = CaseRunner(case, device, dtype, args.modes, runner_opts, on_cell=_print_cell)
        if args.cpu_smoke is False and not any(p.name == "vitkern-triton" for p in r.peers):
            print("warning: vitkern's triton backend is not available here", file=sys.stderr, flush=True)
        doc["peers"].update({p.name: p.description for p in r.peers})
        c0 = time.perf_counter()
        cells = r.run()
        if runner_opts is not opts:
            for c in cells:
                if c["status"] == "skipped" and c["family"] == "peer" and c["peer"].startswith("flex"):
                    c["reason"] = NO_FLEX_REASON
        doc["cells"] += cells
        dt = time.perf_counter() - c0
        seconds.setdefault(case.workload, []).append(dt)
        doc["gpu"]["case_seconds"].append({"workload": case.workload, "case": case.label, "seconds": round(dt, 1)})
        doc["config"]["wall_s"] = round(time.perf_counter() - t0, 1)
        write_outputs(doc, args.out, args.stem)     # partial results survive a killed run
    doc["config"]["wall_s"] = round(time.perf_counter() - t0, 1)
    jpath, mpath = write_outputs(doc, args.out, args.stem)
    print(summary_markdown(report.clean_floats(doc)))
    print(f"wrote {jpath} and {mpath} in {doc['config']['wall_s']} s", file=sys.stderr)
    return 0


def _print_cell(c: dict) -> None:
    head = f"{c['workload']:12s} {c['mode']:6s} {c['peer']:20s}"
    if c["time_ms"] is None:
        print(f"{head} {c['status']}: {c['reason']}", file=sys.stderr, flush=True)
        return
    tail = f" [{c['status']}: {c['reason']}]" if c["status"] != "ok" else ""
    print(f"{head} {c['total_ms']:10.3f} ms {c['useful_tflops']:8.2f} TFLOP/s{tail}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
