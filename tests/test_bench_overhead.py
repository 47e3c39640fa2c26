"""benchmarks/bench_overhead.py: its cells compute what torch computes, its timing covers every cell, and a fresh
process reports first-call and import times (a few seconds: tiny size, one fresh process)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_overhead as bo  # noqa: E402


def test_tiny_cells_match_torch_and_are_all_timed():
    cells = bo.build_cells("tiny", backend=None)
    assert {(c.mode, c.impl) for c in cells} == {("fwd", "torch"), ("fwd", "vitkern"), ("fwdbwd", "torch"),
                                                 ("fwdbwd", "vitkern"), ("varlen", "torch"),
                                                 ("varlen", "torch-loop"), ("varlen", "vitkern")}
    errors = bo.check(cells)
    assert set(errors) == {("fwd", "vitkern"), ("fwdbwd", "vitkern"), ("varlen", "torch-loop"), ("varlen", "vitkern")}
    assert all(e < 1e-5 for e in errors.values()), errors
    rows = bo.time_cells(cells, budget_s=0.01, min_reps=5, max_reps=5)
    assert len(rows) == len(cells) and all(r["calls"] == 5 and r["median_us"] > 0 for r in rows)
    assert all(r["p25_us"] <= r["median_us"] <= r["p75_us"] for r in rows)
    assert [r["ratio_vs_torch"] for r in rows if r["impl"] == "torch"] == [1.0, 1.0, 1.0]


def test_varlen_cells_cover_the_same_tokens():
    s, h, n, d = bo.VARLEN_TINY
    assert s * n == 20 and s == 2  # issue 12: 20 tokens in 2 sequences
    cells = {(c.mode, c.impl): c for c in bo.build_cells("tiny", backend=None)}
    out = cells[("varlen", "vitkern")].fn()
    assert out.shape == (s * n, h, d)


def test_check_catches_a_wrong_cell():
    cells = bo.build_cells("tiny", backend=None)
    wrong = next(c for c in cells if c.mode == "fwd" and c.impl == "vitkern")
    right = wrong.fn
    wrong.fn = lambda: right() * 1.1
    with pytest.raises(AssertionError, match="tiny fwd vitkern: differs from torch SDPA"):
        bo.check(cells)


def test_fresh_process_reports_first_call_and_import_times():
    run = bo.fresh_process("vitkern", backend=None)
    assert run["import_torch_s"] > 0 and run["import_vitkern_s"] > 0
    assert run["fwd_first_s"] > 0 and run["fwd_second_s"] > 0 and run["fwdbwd_second_s"] > 0
    summary = bo.fresh_process_summary({"vitkern": [run], "torch": [run]})
    assert summary["first_call_extra_s"] == pytest.approx(run["fwd_first_s"] - run["fwd_second_s"])
    doc = {"machine": {"device_name": "cpu", "date_utc": "d", "torch": torch.__version__, "vitkern": "v",
                       "git_commit": "c", "torch_threads": 1},
           "config": {"backend": None, "quick": True, "label": "test", "command": "x"},
           "cells": bo.time_cells(bo.build_cells("tiny", None), 0.01, 2, 2),
           "fresh_process": summary}
    md = bo.markdown(doc)
    assert "| tiny | fwd | [1, 1, 8, 16] | vitkern |" in md and "≤ 1.5×" in md and "`import vitkern` after" in md
