"""Timing, peak memory and the memory budget, on CPU and (when there is one) CUDA.

CPU: wall time with ``time.perf_counter``; peak memory is the resident set size above the cell's baseline,
sampled by a thread reading /proc/self/statm (glibc's free lists are trimmed first, so memory a previous cell
left in the heap does not hide this cell's allocations). CUDA: CUDA events around each call with the L2 cache
flushed before it, and ``torch.cuda.max_memory_allocated`` above the baseline.
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from vitkern import info as vitkern_info

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def malloc_trim() -> None:
    """Give glibc's free heap memory back to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def steady_allocator() -> Optional[str]:
    """Tell glibc to keep freed memory (no trimming of the heap top, large blocks from the heap up to 32 MB)
    for the rest of the process; returns what was set, or None where that is not glibc.

    By default glibc hands a freed multi-MB block back to the OS or maps it afresh, depending on the history of
    earlier allocations: the same call then takes minor page faults for its whole output (here 0 to 16,000 a
    call for a ViT-B backward, up to 27 ms of kernel time) or none, and which of the two a peer gets varies
    from process to process. With this setting every peer reuses its memory; it applies to all peers alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
    if not (libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 32 * 2**20)):
        return None
    return "glibc mallopt: M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD 32 MiB"


class PeakMemory:
    """Context manager: ``.peak`` = peak bytes allocated inside the block above what was allocated before it."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._max = 0

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            malloc_trim()
            self._base = self._max = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._base = None
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self._max = max(self._max, _rss_bytes())
            self._stop.set()
            self._thread.join()
            self.peak = max(0, self._max - self._base)
        return False


def memory_budget_bytes(device: torch.device, fraction: float = 0.8) -> int:
    """What a cell may allocate: a fraction of what is free now (MemAvailable on CPU, free device memory on
    CUDA), so a predicted-too-big cell is skipped instead of waking the OOM killer."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return int(8 * 2**30 * fraction)


class _L2Flush:
    """Writes a buffer larger than any L2 (256 MB) before each timed GPU call, as triton.testing.do_bench does."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


@dataclass
class Timing:
    median_s: float
    samples: list
    first_call_s: float


@dataclass
class TimedJob:
    """One cell's call to time: ``fn`` has already run once, taking ``first_call_s``. ``error`` is set when a
    timed call raised (its timing is then None)."""
    fn: Callable[[], object]
    first_call_s: float
    error: Optional[BaseException] = None


def time_interleaved(jobs: list[TimedJob], device: torch.device, budget_s: float, min_reps: int, max_reps: int,
                     long_call_s: float) -> list[Optional[Timing]]:
    """Median wall time of each job, sampled round-robin (one call of each job per round), so that the
    machine's drifts (other tenants, clock changes) hit every peer of a table alike instead of whichever ran
    while they lasted.

    Per job the sample count follows the budget: repeats fill ``budget_s`` within [min_reps, max_reps]. A call
    longer than ``long_call_s`` is its own warm-up: its one-off costs are a negligible part of it, so the first
    call counts as a sample and only as many more run as the budget allows (possibly none); a shorter one gets
    one more untimed warm-up (caches, allocator, lazy init after the first call).
    """
    plans: list[tuple[list, int]] = []
    for job in jobs:
        if job.first_call_s >= long_call_s:
            reps = max(0, min(int(budget_s // job.first_call_s) - 1, max_reps - 1))
            plans.append(([job.first_call_s], reps))
            continue
        _guarded(job, lambda j=job: (j.fn(), synchronize(device)))
        plans.append(([], int(min(max_reps, max(min_reps, budget_s // max(job.first_call_s, 1e-6))))))
    flush = _L2Flush(device) if device.type == "cuda" and jobs else None
    for r in range(max((reps for _, reps in plans), default=0)):
        for job, (samples, reps) in zip(jobs, plans):
            if r < reps and job.error is None:
                _guarded(job, lambda j=job, s=samples: s.append(_one_sample(j.fn, device, flush)))
    del flush
    return [Timing(statistics.median(samples), samples, job.first_call_s) if job.error is None and samples
            else None for job, (samples, _) in zip(jobs, plans)]


def _guarded(job: TimedJob, call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as e:  # noqa: BLE001  (the caller reports it as the cell's status)
        job.error = e


def _one_sample(fn: Callable[[], object], device: torch.device, flush: Optional[_L2Flush]) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    flush()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def time_calls(fn: Callable[[], object], device: torch.device, first_call_s: float, budget_s: float,
               min_reps: int, max_reps: int, long_call_s: float) -> Timing:
    """``time_interleaved`` for one call (already called once, taking ``first_call_s``); its errors propagate."""
    job = TimedJob(fn, first_call_s)
    timing = time_interleaved([job], device, budget_s, min_reps, max_reps, long_call_s)[0]
    if job.error is not None:
        raise job.error
    return timing


def timed_first_call(fn: Callable[[], object], device: torch.device,
                     probe_memory: bool = True) -> tuple[object, float, Optional[int]]:
    """Run ``fn`` once, under the peak-memory probe unless told not to: (result, seconds, peak bytes above
    baseline or None)."""
    synchronize(device)
    if not probe_memory:
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        return result, time.perf_counter() - t0, None
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
    return result, dt, mem.peak


def median_time(fn: Callable[[], object], device: torch.device, budget_s: float, max_reps: int = 10) -> float:
    """Median seconds of a preparation step (mask building): one warm-up call, then up to ``max_reps``."""
    fn()
    synchronize(device)
    samples = []
    t_start = time.perf_counter()
    while len(samples) < max_reps and (not samples or time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on this device: the yardstick results are read against, and the basis for
    predicting how long a cell will take."""
    n_max = 4096 if device.type == "cuda" else 2048
    # The size doubles from 256 while one product takes under 0.05 s: a dtype the CPU has no units for (bf16
    # on a Zen 3, say: ~0.3 GFLOP/s) would otherwise spend a minute per 2048³ product, four minutes per run.
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        a @ a
        synchronize(device)
        t0 = time.perf_counter()
        a @ a
        synchronize(device)
        if n >= n_max or time.perf_counter() - t0 > 0.05:
            break
        n *= 2
    best = float("inf")
    for _ in range(3):  # the best of three: other processes only ever slow it down
        synchronize(device)
        t0 = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # an absent or broken optional package is reported as absent
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark, without the host name."""
    info = {
        "device_kind": device.type,
        "cpu_model": vitkern_info.cpu_model(),
        "cpu_flags": vitkern_info.cpu_flags(),
        "cpu_kernel": vitkern_info.cpu_features() or vitkern_info.NOT_REPORTED,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "vitkern": _version("vitkern"),
        "flash_attn": _version("flash_attn"),
        "xformers": _version("xformers"),
        "git_commit": _git_commit(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = f"{info['cpu_model']} ({os.cpu_count()} cores)"
    return info


def device_slug(info: dict) -> str:
    """A file-name-safe short name of the device, e.g. ``cpu-intel-xeon-processor-2c``."""
    if info["device_kind"] == "cuda":
        name = info["device_name"]
    else:
        name = f"{info['cpu_model']}-{info['cpu_count']}c"
    for junk in ("(R)", "(TM)", "(tm)", "CPU", "@"):
        name = name.replace(junk, " ")
    slug = "".join(ch.lower() if ch.isalnum() else "-" for ch in name)
    slug = "-".join(part for part in slug.split("-") if part)
    return f"{info['device_kind']}-{slug}"[:60]
