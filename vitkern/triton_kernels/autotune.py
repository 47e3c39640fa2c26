"""Autotuning of the attention kernels' block sizes, keyed so that a new packing neither re-tunes nor recompiles.

Why not ``@triton.autotune``: the grid and the device-side maps (varlen block map, mask tile summary) depend
on the block sizes and are built on the host before each launch, so a candidate here is a whole launch built
from a LaunchConfig (``build(cfg)``), not a set of kernel meta-parameters.

Key: device name and compute capability, Triton version, kernel (fwd / bwd_dkdv / bwd_dq), D, Dv, dtype, the
fp32 input precision, the TMA setting (VITKERN_TRITON_TMA), mask kind (none / bool / float), causal, varlen,
dropout on/off, and for the dQ kernel whether it writes dMask. Never sequence lengths, T, batch, heads or
cu_seqlens values: a new NaViT packing reuses the choice, hence the compiled kernels.

The first call with a key times each of ``config.candidates`` (the static table's entry first, then a few
neighbours, all checked spill-free by aot_check): one warm-up launch (it compiles the candidate), then a few
launches timed with CUDA events, the median kept. A candidate that fails to compile or launch (out of shared
memory, say) is dropped. The fastest is kept in an in-process dict and merged into a JSON file
(``VITKERN_TRITON_AUTOTUNE_CACHE``, default ``~/.cache/vitkern/triton_autotune.json``; empty: no file), which
later processes read instead of tuning; an entry that is no longer among the candidates is ignored. Tuning
synchronizes with the device (timings), once per key.

Outputs: every candidate fully rewrites what it writes (out / lse, dq / dk / dv) except dMask, whose skipped
tiles are left as they are, so ``launch_tuned`` calls ``reset`` (dmask.zero_()) after tuning and then runs the
chosen config once more: the result is that of a single launch of the chosen config.

Switch ``VITKERN_TRITON_AUTOTUNE``: "1" tunes, "0" keeps the static table; default on for CUDA tensors, off
for CPU tensors (Triton's interpreter, whose tests rely on the table's 32x16 / 16x32 tiles). No tuning while
torch.compile traces or a CUDA graph is being captured: the cached choice if there is one, else the table's
entry (not remembered, so a later eager call still tunes).

Determinism: given the choice, outputs are bitwise reproducible (the kernels have no atomics). The choice
comes from timings and can differ between processes, machines or DDP ranks (timing noise); that changes only
rounding. To pin it, share the cache file or set VITKERN_TRITON_AUTOTUNE=0.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch
import triton

from . import config
from .config import LaunchConfig

ENV = "VITKERN_TRITON_AUTOTUNE"
CACHE_ENV = "VITKERN_TRITON_AUTOTUNE_CACHE"
CACHE_VERSION = 1
TIMED_RUNS = 5            # timed launches per candidate (after one warm-up launch) ...
TIMED_BUDGET_MS = 200.0   # ... fewer when they add up to more than this

log = logging.getLogger(__name__)
_lock = threading.RLock()
_chosen: dict = {}        # key -> LaunchConfig, this process
_files: dict = {}         # cache path -> {key: entry} as read from it


def enabled(device: torch.device) -> bool:
    value = os.environ.get(ENV, "")
    if value == "":
        return device.type == "cuda"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}: expected '0' or '1', got {value!r}")
    return value == "1"


@functools.lru_cache(maxsize=None)
def _device_name(kind: str, index: Optional[int]) -> str:
    if kind != "cuda":
        return f"{kind}-interpreter"
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"


def key(kernel: str, q: torch.Tensor, dv: int, mask, causal: bool, varlen: bool, dropout: bool,
        mask_grad: bool = False, heavy: bool = False) -> str:
    """The cache key of one kernel for one call (a string: it is also the JSON file's key). ``heavy`` (its tile
    class, config.is_heavy) is part of it: the same mask kind can be read two ways (a float mask by TMA tiles or by
    pointers: its rows, dtype and the GPU decide), with candidate lists of their own."""
    dev = q.device
    index = dev.index if dev.index is not None or dev.type != "cuda" else torch.cuda.current_device()
    mask_kind = "none" if mask is None else "bool" if mask.dtype == torch.bool else "float"
    parts = [_device_name(dev.type, index), f"triton {triton.__version__}", kernel, f"d={q.shape[-1]}",
             f"dv={dv}", str(q.dtype).replace("torch.", ""), f"precision={config.input_precision(q.dtype)}",
             f"mask={mask_kind}", f"causal={int(bool(causal))}", f"varlen={int(bool(varlen))}",
             f"dropout={int(bool(dropout))}", f"tma={config.tma_mode()}", f"heavy={int(bool(heavy))}"]
    if kernel == "bwd_dq":
        parts.append(f"mask_grad={int(bool(mask_grad))}")
    return "|".join(parts)


def launch(launches) -> None:
    """Run a list of (kernel, grid, args, kwargs)."""
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)


def measure(run: Callable[[], None], device: torch.device) -> float:
    """Milliseconds one run() takes: a warm-up run (compiles), then up to TIMED_RUNS timed ones, the median.
    CUDA events on a GPU; wall-clock time elsewhere (the interpreter, where speed means nothing)."""
    run()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    while len(times) < TIMED_RUNS and sum(times) < TIMED_BUDGET_MS:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ JSON cache
def cache_path() -> Optional[str]:
    path = os.environ.get(CACHE_ENV)
    if path is None:
        return os.path.join(os.path.expanduser("~"), ".cache", "vitkern", "triton_autotune.json")
    return path or None


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("configs")
    return entries if isinstance(entries, dict) else {}


def _from_file(k: str) -> Optional[LaunchConfig]:
    path = cache_path()
    if path is None:
        return None
    if path not in _files:
        _files[path] = _read(path)
    entry = _files[path].get(k)
    try:
        return LaunchConfig(*(int(entry[f]) for f in ("block_m", "block_n", "num_warps", "num_stages")))
    except (TypeError, KeyError, ValueError):
        return None


def _save(k: str, cfg: LaunchConfig, ms: float) -> None:
    """Merge one entry into the JSON file (re-read first: other processes may have added theirs)."""
    path = cache_path()
    if path is None:
        return
    entries = _read(path)
    entries[k] = dict(asdict(cfg), ms=round(ms, 4))
    _files[path] = entries
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "configs": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:      # a read-only home directory only costs tuning again in the next process
        log.warning("vitkern: could not write the autotune cache %s: %s", path, e)


def clear() -> None:
    """Forget this process's choices and what was read from cache files (tests)."""
    with _lock:
        _chosen.clear()
        _files.clear()
        _decided.clear()


# ------------------------------------------------------------------------------------------ tuning
def _no_tuning_now(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(k: str, cands: Callable[[], list], build: Callable[[LaunchConfig], list],
           device: torch.device) -> tuple:
    """(config, tuned): the choice for key k among cands() (the static table's entry first), tuning if needed.
    ``tuned`` says whether candidates ran (what they wrote is left in the output tensors)."""
    with _lock:
        hit = _chosen.get(k)
        if hit is not None:
            return hit, False
        listed = cands()
        hit = _from_file(k)
        if hit is not None and hit in listed:
            _chosen[k] = hit
            return hit, False
        if len(listed) == 1 or _no_tuning_now(device):
            return listed[0], False
        timings = {}
        for cfg in listed:
            try:
                launches = build(cfg)
                timings[cfg] = measure(lambda: launch(launches), device)
            except Exception as e:  # noqa: BLE001  (out of resources, compile error: drop the candidate)
                log.debug("vitkern autotune %s: %s dropped: %s: %s", k, cfg, type(e).__name__, e)
        if not timings:         # nothing ran: the table's entry, whose launch will raise the real error
            return listed[0], True
        best = min(timings, key=timings.get)
        log.debug("vitkern autotune %s: %s", k, {str(c): round(t, 4) for c, t in timings.items()})
        _chosen[k] = best
        _save(k, best, timings[best])
        return best, True


def launch_tuned(kernel: str, q: torch.Tensor, dv: int, mask, causal: bool, varlen: bool, dropout: bool,
                 heavy: bool, build: Callable[[LaunchConfig], list], reset: Optional[Callable[[], None]] = None,
                 mask_grad: bool = False) -> LaunchConfig:
    """Launch build(cfg) of one kernel (config.KERNELS) with the chosen cfg: tuned on the first call of its key
    when autotuning is on, the static table's entry when it is off. ``reset`` runs before that launch when
    candidates ran (to clear what they left behind). ``heavy`` as in config.static_config. Returns cfg."""
    sig = _signature(kernel, q, dv, mask, causal, varlen, dropout, heavy, mask_grad)
    cfg = _decided.get(sig)
    if cfg is None:
        cfg = _decide(sig, kernel, q, dv, mask, causal, varlen, dropout, heavy, build, reset, mask_grad)
    launch(build(cfg))
    return cfg


# What launch_tuned decided, by call signature (a tuple: no string key, no lock, no file lookup per call). The
# settings it depends on are part of the signature, so changing one mid-process decides again.
_decided: dict = {}
_SETTINGS = (ENV, CACHE_ENV, "VITKERN_TRITON_FP32_PRECISION", "VITKERN_TRITON_TMA", "TRITON_INTERPRET")


def _signature(kernel, q, dv, mask, causal, varlen, dropout, heavy, mask_grad) -> tuple:
    env = os.environ
    return (kernel, q.device, q.shape[-1], dv, q.dtype, None if mask is None else mask.dtype == torch.bool,
            bool(causal), bool(varlen), bool(dropout), bool(heavy), bool(mask_grad),
            *(env.get(name) for name in _SETTINGS))


def _decide(sig, kernel, q, dv, mask, causal, varlen, dropout, heavy, build, reset, mask_grad) -> LaunchConfig:
    d, dtype = q.shape[-1], q.dtype
    if not enabled(q.device):
        cfg = _decided[sig] = config.static_config(kernel, d, dv, dtype, heavy)
        return cfg
    k = key(kernel, q, dv, mask, causal, varlen, dropout, mask_grad, heavy)
    cfg, tuned = choose(k, lambda: config.candidates(kernel, d, dv, dtype, heavy), build, q.device)
    if tuned and reset is not None:
        reset()
    if _chosen.get(k) == cfg:   # final (not the table's stand-in while tracing or capturing)
        _decided[sig] = cfg
    return cfg
