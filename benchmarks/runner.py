"""Runs the cells of one case: every peer, in every mode, guarded by memory and time predictions and checked
against the truth (the case's first peer); then the checked cells of a mode are timed together, round-robin.

A cell ends in one status: "ok"; "WRONG" (its output or gradients differ from the truth beyond the dtype's loose
tolerance: its time is still shown but it never counts as best); "OOM" (predicted over the budget, never tried, or
the allocator refused); "unsupported" (the peer refused the input, with its reason); "skipped" (by an option);
"error" (an unexpected exception: a harness or peer bug, reported rather than crashing the run); "too slow"
(one call predicted or measured over the cell's share of the run's time budget, see budget.py).
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vitkern.info import kernel_path

from . import measure
from .budget import TimeBudget
from .peers import Inputs, Peer, make_inputs, peers_for, predicted_bytes, predicted_seconds
from .workloads import Case

_WARMED: set = set()

# Loose on purpose: it catches a wrong kernel (a missed tile, a bad mask, a broken gradient), not rounding.
# Errors are measured relative to max(1, max |truth|) of each compared tensor.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Repeats of a cell never get less than this, even when the run's budget is spent: a warm-up and a few calls of
# a short cell cost little, and one cold call is a poor sample.
MIN_REPEATS_S = 0.25


@dataclass
class Options:
    cell_budget_s: float = 3.0       # time spent on repeats of one cell
    min_reps: int = 3
    max_reps: int = 30
    long_call_s: float = 3.0         # a first call this long counts as a sample (see measure.time_calls)
    prep_budget_s: float = 1.0
    max_cell_s: Optional[float] = None   # skip cells predicted to take longer (quick runs)
    mem_budget_bytes: Optional[int] = None   # fixed budget; None = a fraction of what is free at each cell
    compile: bool = True             # False: skip peers that torch.compile
    peer_filter: Optional[list[str]] = None
    matmul_rate: float = 5e10


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    if len(msg) > 120 and ". " in msg:  # torch's dispatcher errors run on with advice; the first sentence says why
        msg = msg.split(". ")[0] + "."
    return f"{type(e).__name__}: {msg[:300]}"


def _is_oom(e: BaseException) -> bool:
    if hasattr(torch.cuda, "OutOfMemoryError") and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower())


def _relative_error(got, want) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf")
        if a.dtype not in (torch.float32, torch.float64):
            a, b = a.float(), b.float()
        diff = (a - b).abs().max().item()
        ref = max(1.0, b.abs().max().item())
        if diff != diff:  # NaN
            return float("nan")
        worst = max(worst, diff / ref)
    return worst


def _overrides(peer: Peer) -> bool:
    return type(peer).prepare is not Peer.prepare


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _always_timed(peer: Peer) -> bool:
    """vitkern's own fused backends are what the run measures: the budget never skips them (a call longer than
    its share is then its only sample); peers and the reference oracle read 'too slow' instead."""
    return peer.family == "vitkern" and peer.name != "vitkern-reference"


@contextlib.contextmanager
def autotune_off():
    """vitkern's Triton autotuner off inside (it reads its switch on every launch)."""
    old = os.environ.get("VITKERN_TRITON_AUTOTUNE")
    os.environ["VITKERN_TRITON_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["VITKERN_TRITON_AUTOTUNE"]
        else:
            os.environ["VITKERN_TRITON_AUTOTUNE"] = old


class CaseRunner:
    """The cells of one case and mode list; ``on_cell`` gets each finished cell dict (for progress output)."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype, modes: list[str], opts: Options,
                 on_cell: Callable[[dict], None] = lambda cell: None, budget: Optional[TimeBudget] = None):
        self.case, self.device, self.dtype, self.modes, self.opts = case, device, dtype, modes, opts
        self.on_cell = on_cell
        self.budget = budget or TimeBudget()
        self.peers = [p for p in peers_for(case, device)
                      if not opts.peer_filter or any(f in p.name for f in opts.peer_filter)]
        self.elem = torch.empty(0, dtype=dtype).element_size()

    def cell_count(self) -> int:
        return len(self.peers) * len(self.modes)

    def planned_cells(self) -> int:
        """Cells expected to run (not ended beforehand as unsupported, skipped or predicted OOM)."""
        return sum(self._precheck(p, m) is None for p in self.peers for m in self.modes)

    def run(self) -> list[dict]:
        self.budget.start_case(self.planned_cells())
        for peer in self.peers:
            self._warm_up(peer)
        inp = make_inputs(self.case, self.device, self.dtype)
        cells = []
        for mode in self.modes:
            mode_cells = self._run_mode(inp, mode)
            add_speedups(mode_cells)
            cells += mode_cells
        del inp
        self._cleanup()
        self.budget.end_case()
        return cells

    def _warm_up(self, peer: Peer) -> None:
        """Call a peer once per process on a tiny input of the same kind, so one-off costs (library loading,
        first dispatch, thread pools; 3.5 s for one backend here) never land in a cell's first call, which is
        counted as a sample when it is long. torch.compile'd peers are skipped: they compile per shape anyway."""
        key = (peer.name, self.dtype, self.case.packed, self.case.head_dim)
        if key in _WARMED or peer.torch_compile or peer.skip_reason(self.case, self.device, self.dtype, "fwd"):
            return
        _WARMED.add(key)
        d = self.case.head_dim
        tiny = Case("warm-up", "warm-up", 1, 2, 16, d, packs=((5, 7),)) if self.case.packed else \
            Case("warm-up", "warm-up", 1, 2, 16, d)
        inp = make_inputs(tiny, self.device, self.dtype)
        try:
            # vitkern's autotuner keeps one choice per key, never per length: a choice made on this tiny call
            # would stand for the real case. The case's own first call (never a sample) tunes instead.
            with autotune_off():
                with torch.no_grad():
                    peer.run(peer.prepare(inp), inp, inp.q, inp.k, inp.v)
                leaves = tuple(x.detach().requires_grad_() for x in (inp.q, inp.k, inp.v))
                out = peer.run(peer.prepare(inp), inp, *leaves)
                torch.autograd.grad(out, leaves, torch.ones_like(out))
                measure.synchronize(self.device)
        except Exception:  # noqa: BLE001  (the real cell reports whatever this peer refuses)
            pass

    def _run_mode(self, inp: Inputs, mode: str) -> list[dict]:
        g = torch.Generator(device="cpu").manual_seed(1)
        out_shape = inp.q.shape[:-1] + (inp.v.shape[-1],)
        dout = torch.randn(out_shape, generator=g).to(self.device, self.dtype) if mode == "fwdbwd" else None
        truth = None
        truth_peer = self.peers[0].name if self.peers else None
        cells, pending = [], []
        runnable = sum(self._precheck(p, mode) is None for p in self.peers)
        t_mode, share_s = time.perf_counter(), self.budget.share_s(runnable)
        for peer in self.peers:
            cell, result, job = self._run_cell(peer, inp, mode, dout, truth)
            if peer.name == truth_peer and result is not None and cell["status"] in ("ok", "too slow"):
                truth = result
                cell["check"] = "truth"
            del result
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            cells.append(cell)
            if job is not None:
                pending.append((cell, job))
        # Every checked cell of this table is timed together, round-robin (see measure.time_interleaved), in what
        # is left of the table's share of the run's budget.
        left_s = share_s - (time.perf_counter() - t_mode)
        reps_s = min(self.opts.cell_budget_s, max(MIN_REPEATS_S, left_s / max(1, len(pending))))
        long_call_s = self.opts.long_call_s
        if self.budget.limited and self.device.type == "cpu":  # a call long for its share is its own warm-up
            long_call_s = min(long_call_s, reps_s / (self.opts.min_reps + 1))
        timings = measure.time_interleaved([job for _, job in pending], self.device, reps_s, self.opts.min_reps,
                                           self.opts.max_reps, long_call_s)
        self.budget.done(runnable)
        for (cell, job), timing in zip(pending, timings):
            self._finish(cell, job, timing)
        for cell in cells:
            self.on_cell(cell)
        return cells

    def _cell(self, peer: Peer, mode: str) -> dict:
        c = self.case
        return {"workload": c.workload, "case": c.label, "mode": mode, "peer": peer.name, "family": peer.family,
                "status": None, "reason": None, "time_ms": None, "prep_ms": None, "total_ms": None,
                "first_call_ms": None, "compile_s": None, "repeats": 0, "useful_flops": c.useful_flops(mode),
                "useful_tflops": None, "peak_mem_bytes": None, "predicted_mem_bytes": None, "max_rel_err": None,
                "tolerance": TOLERANCE.get(self.dtype), "check": None, "speedup_vs_naive": None,
                "speedup_vs_best_peer": None, "best_peer": None, "predicted_call_s": None, "call_limit_s": None,
                "kernel_path": kernel_path(peer.backend, self.dtype) if peer.family == "vitkern" else None}

    def _precheck(self, peer: Peer, mode: str) -> Optional[tuple[str, str]]:
        """(status, reason) when a cell ends before it is tried, else None."""
        why = peer.skip_reason(self.case, self.device, self.dtype, mode)
        if why:
            return "unsupported", why
        if peer.torch_compile and not self.opts.compile:
            return "skipped", "torch.compile peers are off (--no-compile / --quick)"
        need = predicted_bytes(peer, self.case, mode, self.elem)
        budget = self.opts.mem_budget_bytes or measure.memory_budget_bytes(self.device)
        if need > budget:
            return "OOM", f"needs {_gib(need)}, budget {_gib(budget)} (predicted, not run)"
        if self.opts.max_cell_s is not None:
            secs = 2 * predicted_seconds(peer, self.case, mode, self.opts.matmul_rate)
            if secs > self.opts.max_cell_s:
                return "skipped", f"predicted {secs:.1f} s > --max-cell-s {self.opts.max_cell_s}"
        return None

    def _run_cell(self, peer: Peer, inp: Inputs, mode: str, dout, truth):
        """Checks one cell and calls it once: (cell, its result, the job that times it), or (ended cell, None,
        None) when it cannot run; a cell too slow for the budget returns its result but no job."""
        cell = self._cell(peer, mode)
        cell["predicted_mem_bytes"] = predicted_bytes(peer, self.case, mode, self.elem)
        ended = self._precheck(peer, mode)
        if ended:
            return self._end(cell, *ended), None, None
        model_s = predicted_seconds(peer, self.case, mode, self.opts.matmul_rate)
        limit_s = self.budget.call_limit_s()
        cell["predicted_call_s"] = self.budget.predict_s(peer.name, model_s)
        cell["call_limit_s"] = limit_s if self.budget.limited else None
        why = None if _always_timed(peer) else self.budget.too_slow(cell["predicted_call_s"], limit_s, predicted=True)
        if why:
            return self._end(cell, "too slow", why), None, None
        try:
            return self._measure(cell, peer, inp, mode, dout, truth, model_s, limit_s)
        except Exception as e:  # noqa: BLE001  (a cell must never end the run)
            return self._fail(cell, e), None, None

    def _fail(self, cell: dict, e: BaseException) -> dict:
        if _is_oom(e):
            return self._end(cell, "OOM", _first_line(e))
        # vitkern promises ValueError/TypeError for an input it can't take: anything else from it is a failure
        # to show. Peers refuse in many ways (dispatcher errors, NotImplementedError, asserts).
        refusals = (ValueError, TypeError) if cell["family"] == "vitkern" else \
            (RuntimeError, NotImplementedError, ValueError, TypeError, ImportError, AssertionError)
        for key in ("time_ms", "total_ms", "compile_s"):
            cell[key] = None
        return self._end(cell, "unsupported" if isinstance(e, refusals) else "error", _first_line(e))

    def _measure(self, cell: dict, peer: Peer, inp: Inputs, mode: str, dout, truth, model_s: float,
                 limit_s: float):
        state = peer.prepare(inp)
        prep_s = 0.0
        if _overrides(peer) and state is not None:
            prep_budget_s = min(self.opts.prep_budget_s, 0.1 * limit_s)
            prep_s = measure.median_time(lambda: peer.prepare(inp), self.device, prep_budget_s)
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return (peer.run(state, inp, inp.q, inp.k, inp.v),)
        else:
            leaves = tuple(x.detach().requires_grad_() for x in (inp.q, inp.k, inp.v))

            def fn():
                out = peer.run(state, inp, *leaves)
                return (out,) + tuple(torch.autograd.grad(out, leaves, dout))
        compile_call_s = None
        if peer.compiles:  # the compiling call is never a sample, whatever its length
            _, compile_call_s, _ = measure.timed_first_call(fn, self.device, probe_memory=False)
        result, first_s, peak = measure.timed_first_call(fn, self.device)
        compiled_s = max(0.0, compile_call_s - first_s) if peer.torch_compile and compile_call_s else None
        self.budget.learn(peer.name, model_s, first_s, compiled_s)
        result = tuple(r.detach() for r in result)
        cell["peak_mem_bytes"] = peak
        cell["first_call_ms"] = first_s * 1e3
        status = "ok"
        if truth is not None:
            err = _relative_error(result, truth)
            cell["max_rel_err"] = err
            cell["check"] = "passed" if err <= cell["tolerance"] else "failed"
            if cell["check"] == "failed":
                status = "WRONG"
        else:
            cell["check"] = "no truth"
        keep = result if truth is None else None
        del result
        cell["prep_ms"] = prep_s * 1e3
        cell["compile_s"] = compile_call_s  # the compiling call's length until _finish subtracts a plain call
        reason = None
        if status == "WRONG":
            reason = (f"differs from {self.peers[0].name}: max rel. error {cell['max_rel_err']:.3g} > "
                      f"{cell['tolerance']}")
        elif not _always_timed(peer):  # a compiling call counts too: it is what the run waited for
            reason = self.budget.too_slow(max(first_s, compile_call_s or 0.0), limit_s, predicted=False)
            if reason:
                return self._end(cell, "too slow", reason), keep, None
        return self._end(cell, status, reason), keep, measure.TimedJob(fn, first_s)

    def _finish(self, cell: dict, job: measure.TimedJob, timing: Optional[measure.Timing]) -> None:
        """Fills in a checked cell's times, or its failure if a timed call raised."""
        if timing is None:
            self._fail(cell, job.error)
            return
        cell["time_ms"] = timing.median_s * 1e3
        cell["total_ms"] = timing.median_s * 1e3 + cell["prep_ms"]
        cell["repeats"] = len(timing.samples)
        if cell["compile_s"] is not None:
            cell["compile_s"] = max(0.0, cell["compile_s"] - timing.median_s)
        cell["useful_tflops"] = cell["useful_flops"] / (cell["total_ms"] * 1e-3) / 1e12

    @staticmethod
    def _end(cell: dict, status: str, reason: Optional[str]) -> dict:
        cell["status"] = status
        cell["reason"] = reason
        return cell

    def _cleanup(self) -> None:
        # Once per case, not per cell: a full collection costs ~0.3 s once torch.compile is imported, and
        # reference counting already frees a cell's tensors when it ends.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def add_speedups(cells: list[dict]) -> None:
    """Speedups of each timed cell over naive and over the fastest other non-vitkern peer (both on total time,
    preparation included); a WRONG cell never counts as a reference."""
    good = [c for c in cells if c["status"] == "ok"]
    naive = next((c for c in good if c["peer"] in ("naive", "naive-mask")), None)
    for c in cells:
        if c["total_ms"] is None:
            continue
        if naive is not None and c is not naive:
            c["speedup_vs_naive"] = naive["total_ms"] / c["total_ms"]
        others = [p for p in good if p["family"] == "peer" and p is not c]
        if others:
            best = min(others, key=lambda p: p["total_ms"])
            c["best_peer"] = best["peer"]
            c["speedup_vs_best_peer"] = best["total_ms"] / c["total_ms"]
