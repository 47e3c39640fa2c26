"""What this install runs: ``python -m vitkern.info`` (paste its output into bug reports; ``--json`` for tools).

Versions, each backend available or why not, the C++ extension's build flags and the CPU ISA paths compiled in
and chosen at run time, the CUDA device, and the Triton autotune cache. Works without the extension
(VITKERN_DISABLE_EXT=1) and without Triton: what is missing is reported, never raised.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Optional

import torch

# CPU flags (as /proc/cpuinfo names them) that decide which kernel paths can run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_fp16", "amx_int8")
NOT_REPORTED = "not reported by this build"


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as e:  # noqa: BLE001  (absent or broken: say which)
        return f"not importable ({type(e).__name__}: {e})"


def cpu_flags() -> dict:
    """{flag: bool} for ISA_FLAGS, from /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return {}
    have = set(line.split(":", 1)[-1].split())
    return {flag: flag in have for flag in ISA_FLAGS} if have else {}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> Optional[dict]:
    """The C++ kernel's own report: {"compiled": [...], "cpu": {flag: bool}, "chosen": {dtype: path}}, or None
    when the extension is not loaded or this build has no ``cpu_features`` op."""
    from . import _ext
    if not _ext.HAS_C or not hasattr(torch.ops.vitkern_cpu, "cpu_features"):
        return None
    try:
        return json.loads(torch.ops.vitkern_cpu.cpu_features())
    except Exception:  # noqa: BLE001  (a broken report is reported as absent)
        return None


def kernel_path(backend: str, dtype: torch.dtype) -> str:
    """The inner-loop path a backend runs for ``dtype`` on this machine, as benchmarks label their cells."""
    if backend != "cpu":
        return {"reference": "torch ops (reference)", "triton": "triton"}.get(backend, backend)
    chosen = (cpu_features() or {}).get("chosen", {})
    return chosen.get(str(dtype).replace("torch.", ""), "fp32 (BLAS)")


def build_info() -> dict:
    """How vitkern._C was built (written by setup.py into vitkern/_build_info.py), or why it is not known."""
    try:
        from . import _build_info
    except ImportError:
        return {"note": "no vitkern/_build_info.py: the extension was not built by this tree's setup.py"}
    return dict(_build_info.BUILD)


def _backends() -> dict:
    from . import backends
    out = {}
    for name in backends.known_backends():
        be = backends.get(name)
        out[name] = "available" if name in backends.available_backends() else f"not available: " \
                                                                                 f"{be.unavailable_reason()}"
    if "triton" not in out:
        out["triton"] = f"not registered: triton is {_version('triton')}"
    return out


def _cuda() -> dict:
    info = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(), "devices": []}
    if info["available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


def _autotune() -> dict:
    try:
        from .triton_kernels import autotune
    except Exception as e:  # noqa: BLE001  (no triton: no autotuner)
        return {"path": None, "note": f"Triton autotuner not importable ({type(e).__name__}: {e})"}
    path = autotune.cache_path()
    if path is None:
        return {"path": None, "note": f"disabled ({autotune.CACHE_ENV} is empty)"}
    if not os.path.exists(path):
        return {"path": path, "entries": {}, "note": "no file yet"}
    return {"path": path, "entries": autotune._read(path)}


_TMA_SCOPE = {"auto": "forward tiles on sm_90+ (no mask, no dropout)", "1": "forward and backward tiles on sm_90+, "
              "and the interpreter", "0": "off: pointer tiles everywhere"}


def _tma() -> dict:
    """The Triton kernels' TMA setting (VITKERN_TRITON_TMA) and what it means on this install."""
    try:
        from .triton_kernels import config
        mode = config.tma_mode()
    except Exception as e:  # noqa: BLE001  (no triton, or a bad setting: say so)
        return {"setting": None, "note": f"{type(e).__name__}: {e}"}
    has = config._descriptor_class() is not None
    return {"setting": mode, "scope": _TMA_SCOPE[mode] if has else "off: no Triton with host-side TMA descriptors"}


def collect() -> dict:
    """Everything ``python -m vitkern.info`` prints, as a dict."""
    import vitkern
    from . import _ext
    features = cpu_features()
    return {
        "versions": {"vitkern": vitkern.__version__, "python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton"), "numpy": _version("numpy")},
        "vitkern_path": os.path.dirname(vitkern.__file__),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "flags": cpu_flags()},
        "backends": _backends(),
        "extension": {"loaded": _ext.HAS_C, "error": _ext.LOAD_ERROR or None, "build": build_info()},
        "cpu_kernel": features if features is not None else {"compiled": NOT_REPORTED, "chosen": NOT_REPORTED},
        "cuda": _cuda(),
        "triton_autotune_cache": _autotune(),
        "triton_tma": _tma(),
    }


def _yes(flags: dict) -> str:
    return " ".join(f"{k}{'+' if v else '-'}" for k, v in flags.items()) or "unknown"


def format_text(info: dict) -> str:
    v, cpu, ext, kern, cuda, tune = (info[k] for k in ("versions", "cpu", "extension", "cpu_kernel", "cuda",
                                                        "triton_autotune_cache"))
    lines = [f"vitkern {v['vitkern']} ({info['vitkern_path']})",
             f"python {v['python']} · torch {v['torch']} · triton {v['triton']} · numpy {v['numpy']}",
             f"platform {info['platform']}",
             f"cpu {cpu['model']} · {cpu['cores']} cores · torch threads {cpu['torch_threads']}",
             f"cpu flags {_yes(cpu['flags'])}",
             "backends:"] + [f"  {name:10s} {state}" for name, state in info["backends"].items()]
    lines.append("C++ extension: " + ("loaded" if ext["loaded"] else f"not loaded ({ext['error']})"))
    lines += [f"  {k}: {' '.join(val) if isinstance(val, list) else val}" for k, val in ext["build"].items()]
    compiled, chosen = kern.get("compiled"), kern.get("chosen")
    lines.append("CPU kernel paths compiled in: " + (", ".join(compiled) if isinstance(compiled, list) else
                                                     str(compiled)))
    lines.append("CPU kernel paths chosen: " + (", ".join(f"{k} -> {p}" for k, p in chosen.items())
                                                if isinstance(chosen, dict) else str(chosen)))
    if isinstance(chosen, dict) and "amx_bf16" in chosen.values():
        lines.append("  amx_bf16 tile products: " + {"own": "own AMX kernel (csrc/cpu_amx_gemm.cpp)",
                                                     "brgemm": "oneDNN brgemm"}.get(kern.get("amx_gemm"), "?"))
    if isinstance(kern.get("cpu"), dict):
        lines.append(f"  as the kernel sees the CPU: {_yes(kern['cpu'])}")
    if cuda["available"]:
        lines += [f"cuda {cuda['torch_cuda']}: device {d['index']} {d['name']}, compute capability "
                  f"{d['capability']}, {d['memory_gib']} GiB" for d in cuda["devices"]]
    else:
        lines.append(f"cuda: no device (torch built with CUDA {cuda['torch_cuda']})")
    tma = info["triton_tma"]
    lines.append(f"triton TMA (VITKERN_TRITON_TMA={tma['setting']}): {tma.get('scope') or tma.get('note')}")
    entries = tune.get("entries")
    head = f"triton autotune cache: {tune['path']}" + (f" ({tune['note']})" if tune.get("note") else "")
    lines.append(head + (f", {len(entries)} entries" if entries else ""))
    lines += [f"  {k}: {e}" for k, e in sorted((entries or {}).items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
