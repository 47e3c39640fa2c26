"""The benchmark harness: a --quick run writes sane JSON/markdown/PNG, and its guards (memory prediction, the
correctness check, packing) do what they claim. The run itself takes about 20 s on the 2-core CPU machine."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import peers, runner, workloads  # noqa: E402
from vitkern import info  # noqa: E402

STATUSES = {"ok", "WRONG", "OOM", "unsupported", "skipped", "error", "too slow"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attn.py"), "--quick", "--device", "cpu",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, got {found}"
    return found[0]


def test_quick_run_writes_json_with_every_cell(quick_run):
    doc = json.loads(_only(quick_run, "cpu-*-quick.json").read_text())
    m = doc["machine"]
    assert m["device_kind"] == "cpu" and m["cpu_count"] >= 1 and m["torch"] == torch.__version__
    assert doc["config"]["quick"] is True and doc["config"]["dtype"] == "fp32"
    assert set(doc["config"]["matmul_rates"]) == {"fp32", "bf16"}  # both yardsticks, every CPU result
    assert all(r > 1e8 for r in doc["config"]["matmul_rates"].values())
    assert doc["config"]["time_budget_s"] == "inf"  # quick runs have no budget; the default CPU run has one
    assert set(doc["workloads"]) == set(workloads.DEFAULT_WORKLOADS["cpu"])
    cells = doc["cells"]
    assert {c["status"] for c in cells} <= STATUSES
    assert not [c for c in cells if c["status"] in ("error", "WRONG")], \
        [(c["workload"], c["peer"], c["mode"], c["reason"]) for c in cells if c["status"] in ("error", "WRONG")]
    for c in cells:
        if c["status"] == "ok":
            assert c["time_ms"] > 0 and c["total_ms"] >= c["time_ms"] and c["repeats"] >= 1
            assert c["useful_tflops"] == pytest.approx(c["useful_flops"] / (c["total_ms"] * 1e-3) / 1e12)
            assert c["check"] in ("truth", "passed")
            assert c["peak_mem_bytes"] is not None and c["peak_mem_bytes"] >= 0
        else:
            assert c["reason"], c
        # The kernel path each vitkern cell ran (cpu: the kernel's own report, else "fp32 (BLAS)").
        want = {"vitkern-cpu": info.kernel_path("cpu", torch.float32), "vitkern-reference": "torch ops (reference)"}
        assert c["kernel_path"] == want.get(c["peer"]), c
    # Every workload/mode got the vitkern reference backend and at least one timed torch peer.
    for wl in ("vit-b16", "cct-7", "pit-28", "navit-packed"):
        for mode in ("fwd", "fwdbwd"):
            group = [c for c in cells if c["workload"] == wl and c["mode"] == mode]
            assert any(c["peer"] == "vitkern-reference" and c["status"] == "ok" for c in group), (wl, mode)
            assert any(c["family"] == "peer" and c["status"] == "ok" for c in group), (wl, mode)


def test_quick_run_reports_naive_pit224_as_oom_without_running_it(quick_run):
    doc = json.loads(_only(quick_run, "cpu-*-quick.json").read_text())
    naive = [c for c in doc["cells"] if c["workload"] == "pit-224" and c["peer"] == "naive"]
    assert len(naive) == 2
    for c in naive:
        assert c["status"] == "OOM" and "predicted, not run" in c["reason"]
        assert c["time_ms"] is None and c["predicted_mem_bytes"] > 20 * 2**30


def test_quick_run_writes_markdown_and_png(quick_run):
    md = _only(quick_run, "cpu-*-quick.md").read_text()
    assert md.startswith("# vitkern attention benchmark")
    for wl in workloads.DEFAULT_WORKLOADS["cpu"]:
        assert f"## {wl}" in md
    assert "**OOM**" in md and "vitkern-reference" in md
    assert "Square matmul in this run (the yardsticks): fp32 " in md and ", bf16 " in md
    assert "vitkern-reference** · torch ops (reference)" in md
    png = _only(quick_run, "cpu-*-quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(quick_run.glob("latest-*.md")), "a quick run must not replace the latest full result"


def test_navit_packs_are_full_and_reproducible():
    a = workloads.draw_navit_packs(4, 4096, 64, 512, seed=0)
    assert a == workloads.draw_navit_packs(4, 4096, 64, 512, seed=0)
    assert a != workloads.draw_navit_packs(4, 4096, 64, 512, seed=1)
    for pack in a:
        assert 0 <= 4096 - sum(pack) <= 0.02 * 4096  # NaViT's "under 2% padding"
        assert all(16 <= n <= 1024 for n in pack)  # 64..512 px sides in patches of 16
    case = workloads.build("navit-packed", "cpu")[0]
    assert sum(case.segments()) == case.tokens
    assert case.useful_pairs() == sum(n * n for p in case.packs for n in p)
    assert 0 < case.describe()["useful_fraction"] < 0.5
    small = workloads.build("navit-small", "cpu")[0]  # the anchors' setting: ~3% of the pairs inside an image
    assert 0.02 < small.describe()["useful_fraction"] < 0.05 and len(small.packs[0]) > 30


def test_useful_flops_count_unmasked_pairs_only():
    dense = workloads.build("vit-b16", "cpu")[0]
    assert dense.useful_flops("fwd") == 4 * 64 * 197 * 197 * 12 * 32
    assert dense.useful_flops("fwdbwd") == 3.5 * dense.useful_flops("fwd")
    packed = workloads.Case("navit-packed", "t", 1, 2, 10, 8, packs=((3, 5),))
    assert packed.segments() == [3, 5, 2]
    assert packed.useful_flops("fwd") == 4 * 8 * (9 + 25) * 2


def test_memory_prediction_scales_with_materialized_scores():
    pit224 = workloads.build("pit-224", "cpu")[0]
    fused = peers.predicted_bytes(peers.Sdpa(False), pit224, "fwdbwd", 4)
    naive = peers.predicted_bytes(peers.Naive(False), pit224, "fwd", 4)
    assert naive > 2 * 50176**2 * 4 and fused < 2**30


class _WrongPeer(peers.Peer):
    """A 'fast' peer that forgets the softmax normalization: the guard must mark it WRONG."""
    name = "wrong"

    def run(self, state, inp, q, k, v):
        return torch.matmul(torch.exp(torch.matmul(q, k.transpose(-1, -2)) * inp.scale), v)


def test_correctness_guard_marks_a_wrong_peer(monkeypatch):
    case = workloads.Case("t", "t", 1, 2, 33, 16)
    monkeypatch.setattr(runner, "peers_for", lambda c, d: [peers.Sdpa(False), peers.Naive(False), _WrongPeer()])
    opts = runner.Options(cell_budget_s=0.01, min_reps=1, max_reps=1, long_call_s=0.0)
    cells = runner.CaseRunner(case, torch.device("cpu"), torch.float32, ["fwd", "fwdbwd"], opts).run()
    status = {(c["peer"], c["mode"]): c["status"] for c in cells}
    assert status[("sdpa", "fwd")] == "ok" and status[("naive", "fwd")] == "ok" and status[("naive", "fwdbwd")] == "ok"
    assert status[("wrong", "fwd")] == "WRONG" and status[("wrong", "fwdbwd")] == "WRONG"
    wrong = next(c for c in cells if c["peer"] == "wrong" and c["mode"] == "fwd")
    assert wrong["best_peer"] != "wrong" and "differs from sdpa" in wrong["reason"]
    naive = next(c for c in cells if c["peer"] == "naive" and c["mode"] == "fwd")
    assert naive["best_peer"] == "sdpa" and naive["max_rel_err"] < 1e-5


class _RefusingPeer(peers.Peer):
    name = "refuses"

    def run(self, state, inp, q, k, v):
        raise NotImplementedError("no kernel for this input. Long advice follows.")


def test_a_refusing_peer_is_unsupported_not_a_crash(monkeypatch):
    case = workloads.Case("t", "t", 1, 1, 8, 8)
    monkeypatch.setattr(runner, "peers_for", lambda c, d: [peers.Sdpa(False), _RefusingPeer()])
    opts = runner.Options(cell_budget_s=0.01, min_reps=1, max_reps=1, long_call_s=0.0, mem_budget_bytes=2**30)
    cells = runner.CaseRunner(case, torch.device("cpu"), torch.float32, ["fwd"], opts).run()
    assert cells[1]["status"] == "unsupported" and "no kernel for this input" in cells[1]["reason"]


def test_cpu_peak_memory_probe_sees_a_short_lived_allocation():
    import time

    from benchmarks import measure
    with measure.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(50 * 2**20)  # 200 MB, every page touched
        time.sleep(0.05)
        del x
    assert 190 * 2**20 <= mem.peak < 400 * 2**20


def test_a_long_first_call_is_its_own_sample_and_a_short_one_is_not():
    from benchmarks import measure
    calls = []
    timing = measure.time_calls(lambda: calls.append(1), torch.device("cpu"), first_call_s=10.0, budget_s=5.0,
                                min_reps=3, max_reps=10, long_call_s=3.0)
    assert timing.samples == [10.0] and calls == []
    timing = measure.time_calls(lambda: calls.append(1), torch.device("cpu"), first_call_s=0.001, budget_s=0.0,
                                min_reps=3, max_reps=10, long_call_s=3.0)
    assert len(timing.samples) == 3 and len(calls) == 4  # one more warm-up, then three timed


def test_cells_of_a_table_are_timed_round_robin_and_a_failing_one_stops_alone():
    from benchmarks import measure
    order = []

    def job(name, fail_at=None):
        def fn():
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise RuntimeError("out of memory")
        return measure.TimedJob(fn, first_call_s=0.001)

    jobs = [job("a"), job("b", fail_at=3), job("c")]
    timings = measure.time_interleaved(jobs, torch.device("cpu"), budget_s=0.0, min_reps=4, max_reps=10,
                                       long_call_s=3.0)
    # One warm-up each, then rounds of one call per job; b raises on its second timed call and drops out.
    assert order == ["a", "b", "c"] + ["a", "b", "c"] * 2 + ["a", "c"] * 2
    assert len(timings[0].samples) == 4 and len(timings[2].samples) == 4
    assert timings[1] is None and "out of memory" in str(jobs[1].error)


def test_gpu_peer_lists_are_built_without_touching_a_gpu():
    cuda = torch.device("cuda")
    dense = [p.name for p in peers.peers_for(workloads.build("fa3-grid", "cuda")[0], cuda)]
    assert dense[0] == "sdpa" and "naive" in dense and "flex" in dense
    assert {"sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"} <= set(dense)
    assert "vitkern-cpu" not in dense and "vitkern-reference" not in dense
    packed = [p.name for p in peers.peers_for(workloads.build("navit-packed", "cuda")[0], cuda)]
    assert packed[0] == "sdpa-loop"
    assert {"naive-mask", "sdpa-mask", "sdpa-njt", "torch-varlen", "flex-doc"} <= set(packed)
    cpu = [p.name for p in peers.peers_for(workloads.build("vit-b16", "cpu")[0], torch.device("cpu"))]
    assert "vitkern-triton" not in cpu  # the Triton interpreter is never benchmarked
    assert "vitkern-reference" in cpu and "flex" not in cpu


def test_fa3_grid_keeps_16k_tokens_and_2048_wide_heads():
    cases = workloads.build("fa3-grid", "cuda")
    assert len(cases) == 12
    for c in cases:
        assert c.batch * c.seqlen == 16384 and c.heads * c.head_dim == 2048


# ---------------------------------------------------------------------------------------------- time budget


class _SlowPeer(peers.Peer):
    """Correct, but each call at the case's size takes ``delay`` s (the tiny warm-up calls do not)."""
    name = "slow"

    def __init__(self, delay: float, size: int):
        self.delay, self.size, self.calls = delay, size, 0

    def run(self, state, inp, q, k, v):
        if q.shape[-2] == self.size:
            self.calls += 1
            time.sleep(self.delay)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _budget_run(monkeypatch, slow, make_budget):
    case = workloads.Case("t", "t", 1, 2, 33, 16)
    monkeypatch.setattr(runner, "peers_for", lambda c, d: [peers.Sdpa(False), slow, peers.Naive(False)])
    opts = runner.Options(cell_budget_s=0.05, min_reps=1, max_reps=3, long_call_s=0.2, mem_budget_bytes=2**30)
    cr = runner.CaseRunner(case, torch.device("cpu"), torch.float32, ["fwd", "fwdbwd"], opts)
    for p in cr.peers:  # once per process: library loading must not eat the tiny budget
        cr._warm_up(p)
    cr.budget = make_budget()
    return {(c["peer"], c["mode"]): c for c in cr.run()}


def test_a_slow_peer_reads_too_slow_and_is_not_called_again(monkeypatch):
    from benchmarks.budget import TimeBudget
    slow = _SlowPeer(delay=1.5, size=33)
    # 6 cells in 3 s: a fair share of 0.5 s; stretch 1 makes that the longest one call may take.
    cells = _budget_run(monkeypatch, slow, lambda: TimeBudget(total_s=3.0, cases=1, stretch=1.0))
    fwd, bwd = cells[("slow", "fwd")], cells[("slow", "fwdbwd")]
    assert fwd["status"] == "too slow" and fwd["time_ms"] is None and fwd["first_call_ms"] >= 1500
    assert re.fullmatch(r"one call took 1\.[5-9] s \(budget 0\.[45] s\)", fwd["reason"]), fwd["reason"]
    assert fwd["check"] == "passed"  # checked all the same
    # The forward's first call predicts the backward's (3.5x the model's forward): never started.
    assert bwd["status"] == "too slow" and re.fullmatch(r"one call predicted \d+\.\d s \(budget 0\.\d s\), not run",
                                                        bwd["reason"]), bwd["reason"]
    assert slow.calls == 1
    for peer in ("sdpa", "naive"):  # every other peer still timed
        assert cells[(peer, "fwd")]["status"] == "ok" and cells[(peer, "fwdbwd")]["status"] == "ok"
    assert cells[("naive", "fwd")]["check"] == "passed"


def test_a_slow_vitkern_kernel_is_still_timed(monkeypatch):
    """The budget skips peers, never vitkern's own fused backend: its one long call is its sample."""
    from benchmarks.budget import TimeBudget
    slow = _SlowPeer(delay=1.0, size=33)
    slow.name, slow.family, slow.backend = "vitkern-slow", "vitkern", "reference"
    cells = _budget_run(monkeypatch, slow, lambda: TimeBudget(total_s=3.0, cases=1, stretch=1.0))
    for mode in ("fwd", "fwdbwd"):
        c = cells[("vitkern-slow", mode)]
        assert c["status"] == "ok" and c["time_ms"] >= 1000 and c["repeats"] >= 1, c


def test_without_a_budget_the_slow_peer_is_timed(monkeypatch):
    from benchmarks.budget import TimeBudget
    slow = _SlowPeer(delay=0.3, size=33)
    cells = _budget_run(monkeypatch, slow, TimeBudget)  # what --full runs with
    assert cells[("slow", "fwd")]["status"] == "ok" and cells[("slow", "fwd")]["time_ms"] >= 300
    assert cells[("slow", "fwdbwd")]["status"] == "ok" and cells[("slow", "fwd")]["call_limit_s"] is None


def test_time_budget_shares_what_is_left_and_predicts_from_first_calls():
    from benchmarks.budget import MIN_CALL_S, TimeBudget
    b = TimeBudget(total_s=100.0, cases=2, stretch=4.0)
    b.start_case(cells=10)  # half of the run for the first of two cases, a tenth of that per cell
    assert 4.9 < b.share_s() <= 5.0 and 19.8 < b.call_limit_s() <= 20.0 and 24.7 < b.share_s(5) <= 25.0
    b.done(8)
    assert 24.7 < b.share_s() <= 25.0 and 49.5 < b.call_limit_s() <= 50.0  # never past the case's time left
    b.end_case()
    b.start_case(cells=4)  # the first case's unused time goes to the second
    assert 24.7 < b.share_s() <= 25.0
    b.case_end = b.end = 0.0  # spent: a cheap call still runs
    assert b.call_limit_s() == MIN_CALL_S and b.share_s() == 0.0
    assert b.predict_s("a", 2.0) == 2.0  # nothing measured yet: the model
    b.learn("a", model_s=1.0, measured_s=3.0)
    b.learn("c", model_s=1e-6, measured_s=1e-3)  # a short call measures overhead, not speed: not learned
    b.learn("flex", model_s=1.0, measured_s=1.0, compile_s=7.0)
    assert b.predict_s("a", 2.0) == 6.0 and b.predict_s("new", 1.0) == 1.0 and b.predict_s("c", 1.0) == 1.0
    assert b.predict_s("flex", 2.0) == 9.0  # a peer that compiles per shape pays its compile again
    assert b.too_slow(3.0, 4.0, predicted=False) is None
    assert b.too_slow(12.34, 4.0, predicted=False) == "one call took 12.3 s (budget 4.0 s)"
    assert b.too_slow(12.34, 4.0, predicted=True) == "one call predicted 12.3 s (budget 4.0 s), not run"
    unlimited = TimeBudget()
    unlimited.start_case(cells=3)
    assert not unlimited.limited and unlimited.call_limit_s() == float("inf")


def test_cli_budget_and_dtype_options():
    from benchmarks import bench_attn
    default = bench_attn.parse_args(["--device", "cpu"])
    assert default.time_budget_s == bench_attn.CPU_TIME_BUDGET_S and default.dtype == "fp32"
    assert bench_attn.parse_args(["--device", "cpu", "--full"]).time_budget_s == float("inf")
    assert bench_attn.parse_args(["--device", "cpu", "--time-budget-s", "60"]).time_budget_s == 60
    assert bench_attn.parse_args(["--device", "cpu", "--dtype", "bfloat16"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        bench_attn.parse_args(["--device", "cpu", "--full", "--time-budget-s", "60"])
