"""`python -m vitkern.info` reports what this install runs, with the extension, without it and without Triton."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

import vitkern
from vitkern import _ext, info

ROOT = Path(vitkern.__file__).resolve().parent.parent


def _run(*args, env_extra=None, no_triton=False, as_json=True) -> tuple:
    """Runs vitkern.info in a fresh process on this tree; (report, stdout)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    # sys.modules[name] = None makes `import name` raise ImportError: what an install without Triton sees.
    hide = "import sys; sys.modules['triton'] = None; " if no_triton else ""
    code = hide + "import runpy; runpy.run_module('vitkern.info', run_name='__main__')"
    res = subprocess.run([sys.executable, "-c", code, *(["--json"] if as_json else []), *args], env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return (json.loads(res.stdout) if as_json else None), res.stdout


def test_reports_versions_backends_cpu_and_cuda():
    rep, _ = _run()
    v = rep["versions"]
    assert v["vitkern"] == vitkern.__version__ and v["torch"] == torch.__version__ and v["numpy"] == numpy.__version__
    assert Path(rep["vitkern_path"]) == ROOT / "vitkern"
    assert set(rep["backends"]) >= {"reference", "cpu", "triton"}
    assert rep["backends"]["reference"] == "available"
    for state in rep["backends"].values():
        assert state == "available" or state.startswith("not "), state
    assert rep["cuda"]["available"] == torch.cuda.is_available()
    assert rep["cuda"]["torch_cuda"] == torch.version.cuda
    if os.path.exists("/proc/cpuinfo"):
        assert set(rep["cpu"]["flags"]) == set(info.ISA_FLAGS)
    assert rep["extension"]["loaded"] == _ext.HAS_C


@pytest.mark.skipif(not _ext.HAS_C, reason="the C++ extension is not built in this tree")
def test_with_extension_reports_build_flags_and_kernel_paths():
    rep, text = _run()
    assert rep["backends"]["cpu"] == "available"
    build = rep["extension"]["build"]
    assert "-O3" in build["cxx_flags"] and build["torch"] == torch.__version__, build
    kern = rep["cpu_kernel"]
    if kern["compiled"] == info.NOT_REPORTED:  # a build without the cpu_features op
        assert kern["chosen"] == info.NOT_REPORTED
    else:
        assert isinstance(kern["compiled"], list) and kern["compiled"]
        assert set(kern["chosen"]) == {"float32", "bfloat16", "float16"}
        assert all(path in kern["compiled"] for path in kern["chosen"].values()), kern
    assert "C++ extension: loaded" in _run(as_json=False)[1]


def test_without_extension():
    rep, _ = _run(env_extra={"VITKERN_DISABLE_EXT": "1"})
    assert rep["extension"]["loaded"] is False
    assert rep["extension"]["error"] == "disabled by VITKERN_DISABLE_EXT=1"
    assert rep["backends"]["cpu"].startswith("not available") and "VITKERN_DISABLE_EXT" in rep["backends"]["cpu"]
    assert rep["cpu_kernel"] == {"compiled": info.NOT_REPORTED, "chosen": info.NOT_REPORTED}
    _, text = _run(env_extra={"VITKERN_DISABLE_EXT": "1"}, as_json=False)
    assert "C++ extension: not loaded (disabled by VITKERN_DISABLE_EXT=1)" in text
    assert f"CPU kernel paths chosen: {info.NOT_REPORTED}" in text


def test_without_triton():
    rep, _ = _run(no_triton=True)
    assert rep["versions"]["triton"].startswith("not importable")
    assert rep["backends"]["triton"].startswith("not "), rep["backends"]
    assert rep["triton_autotune_cache"]["path"] is None and "not importable" in rep["triton_autotune_cache"]["note"]
    assert rep["triton_tma"]["scope"].startswith("off: no Triton")


def test_lists_autotune_cache_entries(tmp_path):
    pytest.importorskip("triton")
    from vitkern.triton_kernels import autotune
    cache = tmp_path / "tune.json"
    entry = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2, "ms": 0.5}
    cache.write_text(json.dumps({"version": autotune.CACHE_VERSION, "configs": {"fwd|sm90|D64": entry}}))
    rep, _ = _run(env_extra={autotune.CACHE_ENV: str(cache)})
    assert rep["triton_autotune_cache"] == {"path": str(cache), "entries": {"fwd|sm90|D64": entry}}
    _, text = _run(env_extra={autotune.CACHE_ENV: str(cache)}, as_json=False)
    assert f"triton autotune cache: {cache}, 1 entries" in text and "fwd|sm90|D64" in text


def test_kernel_path_labels(monkeypatch):
    monkeypatch.setattr(info, "cpu_features", lambda: None)
    assert info.kernel_path("cpu", torch.bfloat16) == "fp32 (BLAS)"
    assert info.kernel_path("reference", torch.float32) == "torch ops (reference)"
    report = {"compiled": ["avx512", "avx512-bf16"], "chosen": {"float32": "avx512", "bfloat16": "avx512-bf16",
                                                                 "float16": "avx512"}}
    monkeypatch.setattr(info, "cpu_features", lambda: report)
    assert info.kernel_path("cpu", torch.bfloat16) == "avx512-bf16"
    assert info.kernel_path("cpu", torch.float32) == "avx512"


def test_text_report_shows_the_kernels_own_report(monkeypatch):
    # The shape torch.ops.vitkern_cpu.cpu_features() returns (csrc/cpu_features.cpp), on an AVX512-BF16 CPU.
    report = {"compiled": ["fp32_blas", "avx512_bf16"], "cpu": {"avx2": True, "avx512_bf16": True, "amx_bf16": False},
              "chosen": {"float32": "fp32_blas", "bfloat16": "avx512_bf16", "float16": "fp32_blas"}}
    monkeypatch.setattr(info, "cpu_features", lambda: report)
    text = info.format_text(info.collect())
    assert "CPU kernel paths compiled in: fp32_blas, avx512_bf16" in text
    assert "CPU kernel paths chosen: float32 -> fp32_blas, bfloat16 -> avx512_bf16, float16 -> fp32_blas" in text
    assert "as the kernel sees the CPU: avx2+ avx512_bf16+ amx_bf16-" in text


def test_reports_the_tma_setting():
    pytest.importorskip("triton")
    rep, _ = _run(env_extra={"VITKERN_TRITON_TMA": "0"})
    assert rep["triton_tma"]["setting"] == "0" and rep["triton_tma"]["scope"].startswith("off")
    _, text = _run(env_extra={"VITKERN_TRITON_TMA": "bad"}, as_json=False)
    assert "triton TMA (VITKERN_TRITON_TMA=None): ValueError: VITKERN_TRITON_TMA" in text
