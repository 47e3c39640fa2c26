"""segment_ids_to_cu_seqlens(..., max_segments=M): cu_seqlens padded with zero-length sequences to a fixed length,
built with no host sync; the varlen paths must give the same results and do the same work as with the exact ones.

Under TRITON_INTERPRET=1 the backend tests run the triton profile (tests/backends_under_test.py) and the
tile-count test counts the key/query tiles the real kernels loop over.
"""
from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch

import truth
import vitkern
from backends_under_test import INTERPRETING
from contract import check_against_truth, rand
from vitkern.triton_kernels import varlen_map


def random_ids(t: int, kind: str, seed: int = 0) -> torch.Tensor:
    """Segment ids [t]: one segment, t single-token segments, or random runs; the ids themselves are shuffled
    (not sorted, some negative) so nothing may assume ids count up from 0."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "one":
        return torch.full((t,), 5, dtype=torch.int64)
    if kind == "singles":
        return torch.randperm(t, generator=gen) * 3 - t
    cuts = torch.randperm(max(t - 1, 0), generator=gen)[:int(torch.randint(0, t, (1,), generator=gen))] + 1
    new_run = torch.zeros(t, dtype=torch.int64)
    new_run[cuts] = 1
    run = new_run.cumsum(0)
    labels = torch.randperm(int(run[-1]) + 1, generator=gen) * 7 - 3
    return labels[run]


def run_lengths(ids: torch.Tensor) -> list[int]:
    return [len(list(g)) for _, g in itertools.groupby(ids.tolist())]


# ------------------------------------------------------------------------------------------- the helper
@pytest.mark.parametrize("t", [1, 7, 197])
@pytest.mark.parametrize("kind", ["one", "singles", "random"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_padded_equals_exact(t, kind, dtype):
    for seed in range(3):
        ids = random_ids(t, kind, seed)
        lengths = run_lengths(ids)
        exact = vitkern.segment_ids_to_cu_seqlens(ids, dtype=dtype)
        assert exact.tolist() == vitkern.lengths_to_cu_seqlens(lengths).tolist()
        for extra in (0, 1, 5):
            m = len(lengths) + extra
            padded = vitkern.segment_ids_to_cu_seqlens(ids, dtype=dtype, max_segments=m)
            assert padded.dtype == dtype and padded.shape == (m + 1,)
            assert padded.tolist() == exact.tolist() + [t] * extra, (kind, seed, extra)


def test_padded_small_cases():
    f = vitkern.segment_ids_to_cu_seqlens
    assert f(torch.tensor([0, 0, 0, 1, 1, 2, 5, 5]), max_segments=6).tolist() == [0, 3, 5, 6, 8, 8, 8]
    assert f(torch.tensor([], dtype=torch.int64), max_segments=2).tolist() == [0, 0, 0]
    assert f(torch.tensor([9], dtype=torch.int32), max_segments=1).tolist() == [0, 1]
    assert f([4, 4, 2], max_segments=2).tolist() == [0, 2, 3]          # a list works too


@pytest.mark.parametrize("ids,m,exc,words", [
    ([0, 1, 2], 2, ValueError, ["segment_ids", "max_segments=2", "3"]),           # more runs than allowed
    ([0, 0, 1, 0], 5, ValueError, ["segment_ids", "contiguous run", "2 distinct ids", "3 runs"]),
    ([0, 0, 1, 0], 1, ValueError, ["segment_ids"]),                                # both wrong
    ([0], 0, ValueError, ["max_segments", ">= 1", "0"]),
    ([0], -1, ValueError, ["max_segments", ">= 1", "-1"]),
    ([0], True, TypeError, ["max_segments", "int", "True"]),
    ([0], 2.5, TypeError, ["max_segments", "int", "2.5"]),
    ([[0, 1], [2, 3]], 4, ValueError, ["segment_ids", "1-D", "2-D"]),
    ([0.0, 1.0], 4, ValueError, ["segment_ids", "integer", "float"]),
])
def test_padded_bad_input(ids, m, exc, words):
    with pytest.raises(exc) as info:
        vitkern.segment_ids_to_cu_seqlens(torch.tensor(ids), max_segments=m)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ------------------------------------------------------------------------------- results, every backend
@pytest.mark.parametrize("size_index", [0, 1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_padded_cu_seqlens(prof, size_index, causal):
    # The backend gets the padded cu_seqlens; the float64 truth loops over the exact runs.
    t = prof.sizes[size_index]
    ids = random_ids(t, "random", seed=size_index)
    lengths = run_lengths(ids)
    cu_dtype = (torch.int32, torch.int64)[size_index % 2]
    cu = vitkern.segment_ids_to_cu_seqlens(ids.to(prof.device), dtype=cu_dtype, max_segments=len(lengths) + 4)
    exact = vitkern.lengths_to_cu_seqlens(lengths)
    gen = torch.Generator().manual_seed(size_index)
    q, k, v = (rand(t, 2, d, gen=gen, device=prof.device, requires_grad=True) for d in (80, 80, 32))
    fn = lambda q, k, v, upcast=True: vitkern.varlen_attention(q, k, v, cu, is_causal=causal,  # noqa: E731
                                                               backend=prof.backend)
    tr = lambda q, k, v, upcast=True: truth.varlen(q, k, v, exact, exact, is_causal=causal,  # noqa: E731
                                                   upcast=upcast)
    check_against_truth(fn, (q, k, v), tr, f"padded varlen lengths={lengths} causal={causal}")


# ------------------------------------------------------------------------------ the work: Triton tiles
LENGTHS = [5, 33, 1, 16, 17, 48]       # tile edges +-1 for the interpreter's 16/32 tiles
PAD = 6


def test_padding_adds_only_empty_programs():
    # The varlen map: the (sequence, block) pairs with work are the exact ones; the grid grows by one program
    # per zero-length sequence, and those get the empty marker (they exit at once).
    ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    exact = vitkern.segment_ids_to_cu_seqlens(ids)
    padded = vitkern.segment_ids_to_cu_seqlens(ids, max_segments=len(LENGTHS) + PAD)
    for block in (16, 32, 64, 128):
        maps = [varlen_map.block_map(cu, ids.numel(), block, -1) for cu in (exact, padded)]
        work = [sorted((int(s), int(b)) for s, b in zip(seq, start) if b != varlen_map.EMPTY_BLOCK_START)
                for seq, start, _ in maps]
        assert work[0] == work[1] and len(work[0]) == sum(math.ceil(n / block) for n in LENGTHS)
        assert maps[1][2] - maps[0][2] == PAD


def _tile_loop_counter(monkeypatch, module, name, counts):
    """Replace the kernel helper ``module.name`` (which loops over tiles [t_lo, t_hi)) by one that also adds
    the number of tiles to counts[name]. Works under the interpreter, where kernels look helpers up by name
    in their module when they run."""
    orig = getattr(module, name)
    sig = inspect.signature(orig.fn)

    def as_int(x):
        return int(x.handle.data.item()) if hasattr(x, "handle") else int(x)

    def counting(*args, **kwargs):
        a = sig.bind(*args, **kwargs).arguments
        counts[name] += max(0, as_int(a["t_hi"]) - as_int(a["t_lo"]))
        return orig(*args, **kwargs)
    monkeypatch.setattr(module, name, counting)


@pytest.mark.skipif(not INTERPRETING, reason="counts tiles by running the kernels in Triton's interpreter "
                                             "(TRITON_INTERPRET=1)")
@pytest.mark.parametrize("causal", [False, True])
def test_triton_tiles_with_work_are_the_exact_ones(monkeypatch, causal):
    from vitkern.triton_kernels import attention_bwd, attention_fwd, config
    h, d = 2, 16
    ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    t = ids.numel()
    q, k, v = (rand(t, h, d, gen=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3))
    dout = rand(t, h, d, gen=torch.Generator().manual_seed(9))
    helpers = [(attention_fwd, "_fwd_tiles"), (attention_bwd, "_dkdv_tiles"), (attention_bwd, "_dq_tiles")]
    visited, results = [], []
    for max_segments in (None, len(LENGTHS) + PAD):
        counts = dict.fromkeys([name for _, name in helpers], 0)
        with monkeypatch.context() as mp:
            for module, name in helpers:
                _tile_loop_counter(mp, module, name, counts)
            cu = vitkern.segment_ids_to_cu_seqlens(ids, max_segments=max_segments)
            out = vitkern.varlen_attention(q, k, v, cu, is_causal=causal, backend="triton")
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
        visited.append(counts)
    assert visited[0] == visited[1], visited
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # Without causal every query block of an image visits every key block of it (per query head).
    fwd = config.forward_config(d, d, q.dtype)
    kv, dq = config.backward_configs(d, d, q.dtype, heavy=True)
    tiles = {name: h * sum(math.ceil(n / c.block_m) * math.ceil(n / c.block_n) for n in LENGTHS)
             for name, c in (("_fwd_tiles", fwd), ("_dkdv_tiles", kv), ("_dq_tiles", dq))}
    if causal:
        assert all(0 < visited[0][n] < tiles[n] for n in tiles), (visited[0], tiles)
    else:
        assert visited[0] == tiles


# ---------------------------------------------------------------------------------------- no host sync
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    if "triton" not in vitkern.available_backends():
        pytest.skip("needs the triton backend")
    t, h, d = 197, 4, 64
    ids = random_ids(t, "random", seed=1)
    lengths = run_lengths(ids)
    ids = ids.cuda()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (rand(t, h, d, gen=gen, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    dout = rand(t, h, d, gen=gen, device="cuda", dtype=torch.float16)

    def step():
        cu = vitkern.segment_ids_to_cu_seqlens(ids, max_segments=len(lengths) + 8)
        out = vitkern.varlen_attention(q, k, v, cu)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))
    step()                        # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    exact = vitkern.lengths_to_cu_seqlens(lengths).cuda()
    want = (lambda out: (out, *torch.autograd.grad(out, (q, k, v), dout)))(vitkern.varlen_attention(q, k, v, exact))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
