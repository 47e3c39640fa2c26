"""Tests of the Triton kernels' autotuner (vitkern/triton_kernels/autotune.py) in Triton's interpreter:

    TRITON_INTERPRET=1 pytest tests/test_triton_autotune.py

Autotuning is forced on (it is off by default in the interpreter), every kernel's candidates are CANDS (tiny
tiles), and the timer is a deterministic fake (a CPU has no CUDA events) that returns the time given in
``Tuner.times`` for the tiles that ran. The module is skipped without TRITON_INTERPRET=1 (on a GPU the
autotuner runs under every test of test_triton_kernels.py).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("runs the kernels in Triton's interpreter: needs TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

import vitkern  # noqa: E402
from test_triton_kernels import _cu, _varlen_truth, check, math_attention, qkv, rand, sdpa  # noqa: E402
from vitkern.triton_kernels import autotune, config  # noqa: E402
from vitkern.triton_kernels.config import LaunchConfig  # noqa: E402

CANDS = [LaunchConfig(32, 16, 1, 1), LaunchConfig(16, 32, 1, 1), LaunchConfig(16, 16, 1, 1)]
TUNED = ("fwd", "bwd_dkdv", "bwd_dq")


class Tuner:
    """What the fake timer saw: ``timed`` the tiles of each timed candidate; ``fail`` tiles whose launch
    raises (as an out-of-resources launch would); ``times`` ms by tiles (default 5)."""

    def __init__(self):
        self.timed, self.fail, self.times, self.last = [], set(), {}, None

    def launch(self, launches):
        for kernel, grid, args, kwargs in launches:
            tiles = (kwargs["BLOCK_M"], kwargs.get("BLOCK_N"))
            if tiles in self.fail:
                raise RuntimeError(f"out of resources (test): {tiles}")
            self.last = tiles
        self._real(launches)

    def measure(self, run, device):
        run()
        self.timed.append(self.last)
        return self.times.get(self.last, 5.0)


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    monkeypatch.setattr(config, "candidates", lambda kernel, d, dv, dtype, heavy=False: list(CANDS))
    t = Tuner()
    t._real = autotune.launch
    monkeypatch.setattr(autotune, "launch", t.launch)
    monkeypatch.setattr(autotune, "measure", t.measure)
    autotune.clear()
    yield t
    autotune.clear()


def tiles(cfg):
    return (cfg.block_m, cfg.block_n)


def chosen():
    """{kernel: tiles} of this process's choices (one key per kernel in these tests)."""
    out = {}
    for k, cfg in autotune._chosen.items():
        kernel = k.split("|")[2]
        assert kernel not in out, f"two keys for {kernel}: {list(autotune._chosen)}"
        out[kernel] = tiles(cfg)
    return out


def varlen_step(lengths, causal=False, seed=0, truth=False):
    """A packed forward + backward (one head of 16), checked against the float64 truth when ``truth``."""
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (rand(sum(lengths), 1, 16, gen=g) for _ in range(3))
    f = lambda q, k, v: vitkern.varlen_attention(q, k, v, cu, is_causal=causal, backend="triton")  # noqa: E731
    if truth:
        check(f, _varlen_truth(cu, cu, causal), (q, k, v), f"varlen {lengths}")
    else:
        torch.autograd.grad(f(q, k, v).sum(), (q, k, v))


# ------------------------------------------------------------------------------------------------ keys
def test_key_has_no_lengths():
    a = torch.empty(1, 2, 33, 16)
    assert autotune.key("fwd", a, 16, None, False, True, False) == \
        autotune.key("fwd", torch.empty(3, 4, 71, 16), 16, None, False, True, False)
    base = autotune.key("fwd", a, 16, None, False, True, False)
    others = [autotune.key("bwd_dq", a, 16, None, False, True, False),
              autotune.key("fwd", torch.empty(1, 2, 33, 32), 16, None, False, True, False),
              autotune.key("fwd", a, 32, None, False, True, False),
              autotune.key("fwd", a.half(), 16, None, False, True, False),
              autotune.key("fwd", a, 16, torch.ones(1, dtype=torch.bool), False, True, False),
              autotune.key("fwd", a, 16, torch.ones(1), False, True, False),
              autotune.key("fwd", a, 16, None, True, True, False),
              autotune.key("fwd", a, 16, None, False, False, False),
              autotune.key("fwd", a, 16, None, False, True, True),
              # a float mask read by TMA tiles (light) or by pointers (heavy): candidate lists of their own
              autotune.key("fwd", a, 16, None, False, True, False, heavy=True)]
    assert len({base, *others}) == 1 + len(others)


def test_candidates(monkeypatch):
    assert config.candidates("fwd", 16, 16, torch.float32) == CANDS            # the interpreter's: tiny tiles
    monkeypatch.setattr(config, "interpreting", lambda: False)                # the GPU's
    for kernel in TUNED:
        for dtype, bits in ((torch.float16, "16"), (torch.bfloat16, "16"), (torch.float32, "32")):
            for d, width in ((8, 64), (64, 64), (80, 96), (96, 96), (112, 128), (128, 128), (256, 256)):
                for heavy in (False, True):
                    cands = config.candidates(kernel, d, d, dtype, heavy)
                    spills = config.SPILLS.get((kernel, bits, width, heavy), set())
                    assert cands[0] == config.static_config(kernel, d, d, dtype, heavy)
                    assert len(cands) == len(set(cands)) <= 1 + config.MAX_NEIGHBOURS
                    # A neighbour to time unless the record lists every one as spilling (16-bit d256 dK/dV with
                    # a float mask, causal and dropout: 16x128 is the only clean tile under 3.6 and 3.8).
                    clean = [n for n in config._neighbours(kernel, cands[0])
                             if (n.block_m, n.block_n, n.num_warps, n.num_stages) not in spills]
                    assert len(cands) >= 2 or not clean, (kernel, dtype, d, heavy, clean)
                    for c in cands[1:]:
                        assert (c.block_m, c.block_n, c.num_warps, c.num_stages) not in spills
                        assert 16 <= min(c.block_m, c.block_n) and max(c.block_m, c.block_n) <= 128


# ---------------------------------------------------------------------------------------------- tuning
def test_new_packing_does_not_tune_again(tuner):
    tuner.times = {(16, 16): 1.0}
    varlen_step([5, 16, 12], truth=True)
    assert sorted(tuner.timed) == sorted([tiles(c) for c in CANDS] * 3)      # each candidate once per kernel
    assert chosen() == {kernel: (16, 16) for kernel in TUNED}
    n = len(tuner.timed)
    varlen_step([1, 30, 0, 9], seed=1, truth=True)   # another packing: other cu_seqlens, another T
    varlen_step([40], seed=2)
    assert len(tuner.timed) == n and len(autotune._chosen) == 3
    varlen_step([7, 9], causal=True)                # a new key: causal
    assert len(tuner.timed) == 2 * n


def test_dense_batch_and_length_changes_do_not_tune_again(tuner):
    for b, n in ((2, 17), (1, 33), (3, 8)):
        q, k, v = qkv(b, 1, n, n, 16)
        check(sdpa(is_causal=True), lambda q, k, v: math_attention(q, k, v, causal=True), (q, k, v), f"{b}x{n}")
    assert len(tuner.timed) == 3 * len(CANDS) and len(autotune._chosen) == 3


@pytest.mark.parametrize("winner", range(len(CANDS)), ids=lambda i: "x".join(map(str, tiles(CANDS[i]))))
def test_every_candidate_matches_truth(tuner, winner):
    # A float mask with -inf tiles (skipped tiles differ between candidates: dMask must still come out right),
    # dropout off, then varlen with causal: every kernel runs the winner after tuning.
    tuner.times = {tiles(CANDS[winner]): 1.0}
    b, h, nq, nk = 1, 1, 19, 37
    bias = torch.randn(b, h, nq, nk, generator=torch.Generator().manual_seed(5))
    bias[..., :, 7:30] = -math.inf
    bias[..., 3:17, :] = -math.inf
    bias.requires_grad_()
    q, k, v = qkv(b, h, nq, nk, 16, dv=24)
    check(sdpa(), lambda q, k, v, m: math_attention(q, k, v, mask=m), (q, k, v, bias), "float mask")
    varlen_step([5, 20], causal=True, truth=True)
    assert {tiles(c) for c in autotune._chosen.values()} == {tiles(CANDS[winner])} and len(autotune._chosen) == 6


def test_failing_candidate_is_skipped(tuner):
    tuner.fail = {(16, 32)}
    tuner.times = {(16, 32): 0.5, (16, 16): 1.0}     # the failing one would win
    varlen_step([5, 16, 12], causal=True, truth=True)
    assert (16, 32) not in tuner.timed and len(tuner.timed) == 2 * 3
    assert chosen() == {kernel: (16, 16) for kernel in TUNED}


def test_every_candidate_failing_leaves_the_error(tuner):
    tuner.fail = {tiles(c) for c in CANDS}
    with pytest.raises(RuntimeError, match="out of resources"):
        vitkern.scaled_dot_product_attention(*qkv(1, 1, 8, 8, 16), backend="triton")
    assert autotune._chosen == {}


def test_launch_tuned_resets_before_the_chosen_run(tuner):
    # A launch that accumulates (as dMask's untouched tiles would keep what another candidate wrote): after
    # tuning, reset runs and the output is that of one launch of the chosen config.
    out = torch.zeros(4)

    class Adder:
        def __getitem__(self, grid):
            return lambda x, BLOCK_M, BLOCK_N: x.add_(BLOCK_M)

    build = lambda cfg: [(Adder(), (1,), (out,), dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n))]  # noqa: E731
    tuner.times = {(16, 32): 1.0}
    q = torch.empty(1, 1, 8, 16)
    cfg = autotune.launch_tuned("bwd_dq", q, 16, None, False, False, False, False, build, reset=out.zero_)
    assert tiles(cfg) == (16, 32) and torch.equal(out, torch.full((4,), 16.0))
    autotune.launch_tuned("bwd_dq", q, 16, None, False, False, False, False, build, reset=out.zero_)
    assert torch.equal(out, torch.full((4,), 32.0)) and len(tuner.timed) == 3   # cached: no reset, no tuning


# ------------------------------------------------------------------------------------- switch and cache
def test_switch(tuner, monkeypatch):
    monkeypatch.setenv(autotune.ENV, "0")
    vitkern.scaled_dot_product_attention(*qkv(1, 1, 8, 8, 16), backend="triton")
    monkeypatch.delenv(autotune.ENV)                 # default: off for CPU tensors (the interpreter)
    vitkern.scaled_dot_product_attention(*qkv(1, 1, 8, 8, 16), backend="triton")
    assert tuner.timed == [] and autotune._chosen == {}
    assert autotune.enabled(torch.device("cuda", 0)) and not autotune.enabled(torch.device("cpu"))
    monkeypatch.setenv(autotune.ENV, "yes")
    with pytest.raises(ValueError, match=autotune.ENV):
        autotune.enabled(torch.device("cpu"))


def test_no_tuning_while_compiling(tuner, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    tuner.times = {(16, 16): 1.0}
    cfg = autotune.launch_tuned("fwd", torch.empty(1, 1, 8, 16), 16, None, False, False, False, False,
                                lambda cfg: [])
    assert cfg == CANDS[0] and tuner.timed == [] and autotune._chosen == {}


def test_json_cache_round_trips(tuner, tmp_path):
    tuner.times = {(16, 32): 1.0}
    varlen_step([5, 12])
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert data["version"] == autotune.CACHE_VERSION and len(data["configs"]) == 3
    for k, entry in data["configs"].items():
        assert k in autotune._chosen and (entry["block_m"], entry["block_n"]) == (16, 32)
    n = len(tuner.timed)
    autotune.clear()                                  # a new process: the file, not the dict, answers
    varlen_step([9, 3])
    assert len(tuner.timed) == n and chosen() == {kernel: (16, 32) for kernel in TUNED}

    # An entry that is no longer a candidate is ignored (tuned again); so is a file that does not parse.
    for entry in data["configs"].values():
        entry["block_m"] = 64
    (tmp_path / "autotune.json").write_text(json.dumps(data))
    autotune.clear()
    varlen_step([9, 3])
    assert len(tuner.timed) == 2 * n
    (tmp_path / "autotune.json").write_text("{not json")
    autotune.clear()
    varlen_step([9, 3])
    assert len(tuner.timed) == 3 * n and len(json.loads((tmp_path / "autotune.json").read_text())["configs"]) == 3


def test_cache_file_can_be_turned_off(tuner, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_ENV, "")
    varlen_step([5, 16])
    assert len(autotune._chosen) == 3 and not (tmp_path / "autotune.json").exists()
