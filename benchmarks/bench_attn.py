"""vitkern's attention benchmark: every workload x mode x peer, side by side, into JSON, markdown and PNG.

    python benchmarks/bench_attn.py                  # every workload and peer on the best device; on CPU within
                                                     # a time budget (4.5 minutes; slower cells read "too slow")
    python benchmarks/bench_attn.py --full           # the same, every cell timed however long it takes
    python benchmarks/bench_attn.py --quick          # smoke run: tiny sizes, seconds
    python benchmarks/bench_attn.py --device cuda --workloads fa3-grid --dtype bf16 --modes fwd

Writes benchmarks/results/<device-slug>-<YYYYMMDD>.{json,md,png} and latest-<cpu|cuda>.md (see --out).
Never tries a cell predicted not to fit in memory (it is reported as OOM), and never lets one failing cell end
the run (it is reported as unsupported or error with the reason).
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import measure, report, workloads  # noqa: E402
from benchmarks.budget import TimeBudget  # noqa: E402
from benchmarks.runner import CaseRunner, Options  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
# The CPU run's default time budget: with set-up and start-up it keeps `bash scripts/bench.sh` within 6 minutes.
CPU_TIME_BUDGET_S = 270.0
MODES = ("fwd", "fwdbwd")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="workloads:\n" + "\n".join(f"  {k:13s} {v}" for k, v in
                                                                    workloads.WORKLOADS.items()))
    ap.add_argument("--quick", action="store_true", help="smoke run for CI: tiny sizes, few repeats, no torch.compile")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    ap.add_argument("--workloads", type=_csv, default=None,
                    help="comma-separated (default: all of the device's; fa3-grid on CUDA only)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES) + list(DTYPE_ALIASES),
                    help="default: fp32 on CPU, bf16 on CUDA (bfloat16 etc. are accepted too)")
    ap.add_argument("--modes", type=_csv, default=list(MODES), help="comma-separated from fwd,fwdbwd")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="output folder (default: benchmarks/results)")
    ap.add_argument("--peers", type=_csv, default=None,
                    help="only peers whose name contains one of these (comma-separated), e.g. sdpa,vitkern")
    ap.add_argument("--max-cell-s", type=float, default=None,
                    help="skip cells predicted to take longer than this (default: none; 0.5 s with --quick)")
    ap.add_argument("--mem-budget-gb", type=float, default=None,
                    help="memory a cell may use (default: 80%% of what is free when the cell starts)")
    ap.add_argument("--cell-budget-s", type=float, default=None, help="time for repeats of one cell")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help=f"the whole run's time, shared out among the cells (default: {CPU_TIME_BUDGET_S:.0f} s on "
                         f"CPU, none on CUDA or with --quick); a cell whose one call needs more than its share "
                         f"reads 'too slow'")
    ap.add_argument("--full", action="store_true", help="no time budget: time every cell however long it takes")
    ap.add_argument("--no-compile", action="store_true", help="skip peers that need torch.compile (FlexAttention)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype) or ("bf16" if args.device == "cuda" else "fp32")
    if args.full and args.time_budget_s is not None:
        ap.error("--full and --time-budget-s: pick one")
    if args.full or args.quick or args.device == "cuda":
        args.time_budget_s = args.time_budget_s if args.time_budget_s is not None else math.inf
    elif args.time_budget_s is None:
        args.time_budget_s = CPU_TIME_BUDGET_S
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        ap.error(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {','.join(args.modes)}")
    args.workloads = args.workloads or workloads.DEFAULT_WORKLOADS[args.device]
    bad = [w for w in args.workloads if w not in workloads.WORKLOADS]
    if bad:
        ap.error(f"--workloads: unknown {bad}; expected names from {list(workloads.WORKLOADS)}")
    return args


def make_options(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Options:
    gpu = device.type == "cuda"
    if args.quick:
        opts = Options(cell_budget_s=0.05, min_reps=1, max_reps=3, long_call_s=0.05, prep_budget_s=0.02,
                       max_cell_s=0.5, compile=False)
    elif gpu:
        # GPU calls are short: the first call (Triton JIT, autotuning, cuDNN plans) is never counted.
        opts = Options(cell_budget_s=1.0, min_reps=10, max_reps=100, long_call_s=float("inf"), prep_budget_s=0.5)
    else:
        opts = Options(cell_budget_s=3.0, min_reps=3, max_reps=30, long_call_s=3.0, prep_budget_s=1.0)
    if args.max_cell_s is not None:
        opts.max_cell_s = args.max_cell_s
    if args.cell_budget_s is not None:
        opts.cell_budget_s = args.cell_budget_s
    if args.mem_budget_gb is not None:
        opts.mem_budget_bytes = int(args.mem_budget_gb * 2**30)
    if args.no_compile:
        opts.compile = False
    opts.peer_filter = args.peers
    return opts


def matmul_yardsticks(device: torch.device, dtype: torch.dtype) -> dict:
    """Square-matmul FLOP/s in fp32 and bf16 (and the run's dtype), measured in this run: every result names both."""
    names = dict.fromkeys(["fp32", "bf16"] + [k for k, v in DTYPES.items() if v == dtype])
    return {name: measure.matmul_rate(device, DTYPES[name]) for name in names}


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    # The jagged-nested-tensor peer triggers torch's prototype-API notice on every call; it says nothing here.
    warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    allocator = measure.steady_allocator() if device.type == "cpu" else None
    opts = make_options(args, device, dtype)
    rates = matmul_yardsticks(device, dtype)
    opts.matmul_rate = rates[args.dtype]
    machine = measure.machine_info(device)
    now = datetime.now(timezone.utc)
    default_dtype = "bf16" if device.type == "cuda" else "fp32"
    paths = report.output_paths(args.out, measure.device_slug(machine), now.strftime("%Y%m%d"), device.type,
                                args.quick, "" if args.dtype == default_dtype else args.dtype)
    cases = [(name, workloads.build(name, device.type, args.quick)) for name in args.workloads]
    runners = [CaseRunner(c, device, dtype, args.modes, opts) for _, cs in cases for c in cs]
    budget = TimeBudget(args.time_budget_s - (time.perf_counter() - t_start), cases=len(runners))
    for r in runners:
        r.budget = budget
    doc = {
        "schema": 1,
        "machine": machine,
        "config": {"command": "python benchmarks/bench_attn.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                   "quick": args.quick, "allocator": allocator, "device": device.type, "dtype": args.dtype,
                   "time_budget_s": args.time_budget_s, "matmul_rates": rates, "modes": args.modes,
                   "workloads": args.workloads, "peer_filter": args.peers, "options": {
                       k: v for k, v in vars(opts).items() if k != "peer_filter"}},
        "workloads": {name: {"description": workloads.WORKLOADS[name], "cases": [c.describe() for c in cs]}
                      for name, cs in cases},
        "peers": {p.name: p.description for r in runners for p in r.peers},
        "cells": [],
    }
    bar = _progress(sum(r.cell_count() for r in runners), args.no_progress)

    def on_cell(cell: dict) -> None:
        bar.update(1)
        bar.write(_cell_line(cell))

    for r in runners:
        r.on_cell = on_cell
        bar.set_description(f"{r.case.workload} {r.case.label}")
        doc["cells"] += r.run()
        report.write_json(report.clean_floats(doc), paths["json"])  # partial results survive a killed run
    bar.close()
    # The yardstick again at the end, and the higher of the two kept: on a shared or frequency-ramping machine
    # one sample can read low (84 against 126 GFLOP/s once on a Zen 3), and a low yardstick flatters every cell.
    end_rates = matmul_yardsticks(device, dtype)
    doc["config"]["matmul_rates_start_end"] = {k: [rates[k], end_rates[k]] for k in rates}
    doc["config"]["matmul_rates"] = {k: max(rates[k], end_rates[k]) for k in rates}
    doc["config"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.write_all(doc, paths)
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {doc['config']['wall_s']} s", file=sys.stderr)
    return 0


def _cell_line(c: dict) -> str:
    head = f"{c['workload']:12s} {c['mode']:6s} {c['peer']:20s}"
    if c["time_ms"] is None:
        return f"{head} {c['status']}: {c['reason']}"
    tail = f" [{c['status']}: {c['reason']}]" if c["status"] != "ok" else ""
    return f"{head} {c['total_ms']:10.3f} ms  {c['useful_tflops'] * 1e3:9.2f} GFLOP/s{tail}"


class _NoBar:
    def update(self, n): pass
    def write(self, s): print(s, file=sys.stderr, flush=True)
    def set_description(self, s): pass
    def close(self): pass


def _progress(total: int, off: bool):
    if off:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
