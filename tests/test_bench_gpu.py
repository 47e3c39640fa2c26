"""benchmarks/bench_gpu.py without a GPU: its plan (cases, order, FlexAttention selection), the derived backward
numbers, the issue-13 targets it reports and its markdown, from made-up cells."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_gpu  # noqa: E402


def _args(*argv):
    return bench_gpu.parse_args(["--dry-run", *argv])


def test_plan_runs_every_gpu_case_in_order():
    cases = bench_gpu.build_cases(_args(), "cuda")
    assert [c.workload for c in cases[:3]] == ["vit-b16", "navit-packed", "pit-224"]
    fa3 = [(c.seqlen, c.head_dim, c.batch * c.seqlen, c.heads * c.head_dim) for c in cases[3:]]
    assert {(n, d) for n, d, _, _ in fa3} == {(n, d) for n in (512, 1024, 2048, 4096, 8192, 16384) for d in (64, 128)}
    assert all(tokens == 16384 and width == 2048 for _, _, tokens, width in fa3)
    assert cases[0].batch == 256 and cases[2].seqlen == 50176 and cases[1].batch == 32
    some = bench_gpu.build_cases(_args("--fa3-seqs", "1024,4096", "--fa3-dims", "128", "--workloads", "fa3-grid"),
                                 "cuda")
    assert [(c.seqlen, c.head_dim) for c in some] == [(4096, 128), (1024, 128)]     # the targets' first


def test_flex_selection():
    cases = bench_gpu.build_cases(_args(), "cuda")
    rule = bench_gpu.flex_rule(bench_gpu.DEFAULT_FLEX)
    assert [c.workload for c in cases if rule(c)] == ["vit-b16", "navit-packed"]
    rule = bench_gpu.flex_rule("pit-224,fa3-grid@4096")
    assert [(c.workload, c.seqlen, c.head_dim) for c in cases if rule(c)] == [
        ("pit-224", 50176, 64), ("fa3-grid", 4096, 128), ("fa3-grid", 4096, 64)]
    assert all(bench_gpu.flex_rule("all")(c) for c in cases) and not any(bench_gpu.flex_rule("none")(c) for c in cases)
    with pytest.raises(ValueError, match="--flex"):
        bench_gpu.flex_rule("fa3-grid@many")
    with pytest.raises(SystemExit):
        _args("--modes", "bwd")


def test_dry_run_lists_every_cell(capsys):
    assert bench_gpu.main(["--dry-run", "--workloads", "vit-b16,navit-packed"]) == 0
    out = capsys.readouterr().out
    assert "vitkern-triton" in out and "flex-doc" in out and "torch-varlen" in out and "sdpa-cudnn" in out
    assert "2 cases" in out


def _cell(wl, case, mode, peer, ms, status="ok", flops=1e12, family=None):
    return {"workload": wl, "case": case, "mode": mode, "peer": peer, "status": status, "reason": None,
            "family": family or ("vitkern" if peer.startswith("vitkern") else "peer"), "time_ms": ms,
            "total_ms": ms, "useful_flops": flops * (3.5 if mode == "fwdbwd" else 1.0),
            "useful_tflops": None if ms is None else flops * (3.5 if mode == "fwdbwd" else 1.0) / (ms * 1e-3) / 1e12,
            "speedup_vs_best_peer": None}


def test_targets_and_derived_backward():
    big = "B=2 H=16 N=8192 D=128"
    small = "B=32 H=32 N=512 D=64"
    f = 4 * 2 * 16 * 8192 ** 2 * 128
    cells = [_cell("fa3-grid", big, "fwd", "sdpa", 10.0, flops=f), _cell("fa3-grid", big, "fwd", "sdpa-cudnn", 8.0,
                                                                         flops=f),
             _cell("fa3-grid", big, "fwd", "vitkern-triton", 7.0, flops=f),
             _cell("fa3-grid", big, "fwdbwd", "sdpa-cudnn", 28.0, flops=f),
             _cell("fa3-grid", big, "fwdbwd", "vitkern-triton", 37.0, flops=f),
             _cell("fa3-grid", small, "fwd", "sdpa", 1.0), _cell("fa3-grid", small, "fwd", "vitkern-triton", 2.0),
             _cell("vit-b16", "v", "fwdbwd", "sdpa", 12.0), _cell("vit-b16", "v", "fwdbwd", "vitkern-triton", 10.0),
             _cell("navit-packed", "p", "fwdbwd", "sdpa-loop", 50.0), _cell("navit-packed", "p", "fwdbwd", "flex-doc", 9.0),
             _cell("navit-packed", "p", "fwdbwd", "sdpa-mask-efficient", 60.0),
             _cell("navit-packed", "p", "fwdbwd", "vitkern-triton", 4.0),
             _cell("pit-224", "q", "fwdbwd", "vitkern-triton", None, status="OOM")]
    bwd = bench_gpu.derived_backward(cells)
    vk = next(b for b in bwd if b["peer"] == "vitkern-triton")
    assert vk["bwd_ms"] == pytest.approx(30.0) and vk["bwd_tflops"] == pytest.approx(2.5 * f / 30e-3 / 1e12)
    got = {t["target"]: t for t in bench_gpu.targets(cells, bwd)}
    assert got["fa3 fwd D=128 N=8192 vs best SDPA"]["got"] == pytest.approx(8 / 7)
    assert got["fa3 fwd D=128 N=8192 vs best SDPA"]["status"] == "met"
    assert got["fa3 fwd D=128 N=8192 TFLOP/s"]["got"] == pytest.approx(f / 7e-3 / 1e12)
    assert got["fa3 bwd D=128 N=8192 vs best SDPA (derived)"]["got"] == pytest.approx(20 / 30)
    assert got["fa3 bwd D=128 N=8192 vs best SDPA (derived)"]["status"] == "missed"
    assert not [t for t in got if "N=512" in t]        # targets start at N = 1k
    assert got["vit-b16 fwd+bwd vs best SDPA"]["got"] == pytest.approx(1.2)
    assert got["navit-packed fwd+bwd vs FlexAttention (mask build included)"]["got"] == pytest.approx(2.25)
    assert got["navit-packed fwd+bwd vs SDPA with a dense mask"]["got"] == pytest.approx(15.0)
    assert got["pit-224 fwd+bwd fits in one GPU"]["status"] == "missed"


def test_summary_markdown_renders():
    cells = [_cell("vit-b16", "B=256 H=12 N=197 D=64", m, p, ms) for m in ("fwd", "fwdbwd")
             for p, ms in (("sdpa", 2.0), ("vitkern-triton", 1.5))]
    doc = {"machine": {"device_name": "GPU", "date_utc": "today", "torch": "t", "triton": "3.6.0", "cuda": "13",
                       "git_commit": "abc"}, "config": {"dtype": "bf16"}, "cells": cells,
           "gpu": {"ceiling": {"n": 8192, "dtype": "bfloat16", "flops_per_s": 8e14, "samples": 10},
                   "cpu_smoke": False, "deadline_s": 100, "not_run": [{"workload": "fa3-grid", "case": "x"}]}}
    doc["gpu"]["derived_backward"] = bench_gpu.derived_backward(cells)
    doc["gpu"]["targets"] = bench_gpu.targets(cells, doc["gpu"]["derived_backward"])
    text = bench_gpu.summary_markdown(doc)
    assert "800 TFLOP/s" in text and "vit-b16 fwd+bwd vs best SDPA | 1.1 x | 1.33 | met" in text
    assert "Not run (out of time, --deadline-s 100): fa3-grid x." in text


def test_warm_up_never_autotunes(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_gpu.CaseRunner, "_warm_up",
                        lambda self, peer: seen.append(bench_gpu.os.environ.get("VITKERN_TRITON_AUTOTUNE")))
    monkeypatch.setenv("VITKERN_TRITON_AUTOTUNE", "1")
    bench_gpu.GpuCaseRunner.__new__(bench_gpu.GpuCaseRunner)._warm_up(None)
    assert seen == ["0"] and bench_gpu.os.environ["VITKERN_TRITON_AUTOTUNE"] == "1"
    monkeypatch.delenv("VITKERN_TRITON_AUTOTUNE")
    bench_gpu.GpuCaseRunner.__new__(bench_gpu.GpuCaseRunner)._warm_up(None)
    assert seen == ["0", "0"] and "VITKERN_TRITON_AUTOTUNE" not in bench_gpu.os.environ
