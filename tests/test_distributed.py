"""vitkern.distributed on real gloo process groups of 2 and 4 ranks spawned on this machine.

Each spawned group runs a list of cases in one go (process start-up dominates on 2 cores); a case returns
"ok" or what went wrong, every rank writes its results to a JSON file, and the tests here assert on them.
Truth is float64 attention written independently of vitkern (tests/truth.py) on the full, unsplit tensors.
Every group has a process-group timeout and the parent a join deadline, so a hang fails instead of blocking.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import truth
import vitkern
from vitkern.distributed import (SequenceParallelAttention, all_reduce_gradients, clip_cu_seqlens,
                                 even_shard_sizes, gather_sequence, sequence_parallel_attention, shard_sequence,
                                 sum_over_ranks)
from vitkern.distributed.ring import MAX_FUSED_VALUE_DIM, _pack_value_pieces
from vitkern.distributed.shards import overlapping_shards, shard_offsets

PG_TIMEOUT_S = 30        # a collective that waits longer than this raises on the waiting rank
JOIN_DEADLINE_S = 240    # the parent gives a whole spawned group this long
MODES = ("allgather_kv", "ring")
BACKEND = "reference"    # every install has it; the fused backends are tested against it elsewhere


# ---------------------------------------------------------------- pure arithmetic, no process group needed

def test_even_shard_sizes():
    assert even_shard_sizes(197, 4) == [50, 49, 49, 49]
    assert even_shard_sizes(3, 4) == [1, 1, 1, 0]
    assert sum(even_shard_sizes(50176, 7)) == 50176
    with pytest.raises(ValueError, match="world_size"):
        even_shard_sizes(10, 0)
    with pytest.raises(ValueError, match="total"):
        even_shard_sizes(-1, 2)


def test_clip_cu_seqlens_matches_token_membership():
    cu = torch.tensor([0, 0, 5, 6, 6, 20, 31])
    total = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())
    for lo, hi in [(0, 31), (0, 3), (3, 17), (5, 6), (6, 6), (20, 31), (30, 31)]:
        local = clip_cu_seqlens(cu, lo, hi)
        assert local[0] == 0 and local[-1] == hi - lo and bool((local.diff() >= 0).all())
        # Sequence s of the shard holds exactly the shard's tokens whose global sequence is s.
        counts = torch.bincount(seg[lo:hi], minlength=cu.numel() - 1)
        assert local.diff().tolist() == counts.tolist(), (lo, hi)
    assert total == 31


def test_overlapping_shards():
    cu = [0, 10, 10, 25, 40]
    offsets = shard_offsets([5, 5, 12, 18])     # shards [0,5) [5,10) [10,22) [22,40)
    assert overlapping_shards(cu, offsets, 0) == [True, True, False, False]
    assert overlapping_shards(cu, offsets, 2) == [False, False, True, True]
    assert overlapping_shards(cu, shard_offsets([5, 0, 35]), 0) == [True, False, True]


def test_ring_value_pieces_respect_the_fused_width():
    for d, dv in [(8, 8), (64, 64), (80, 96), (128, 128), (256, 256), (64, 256)]:
        calls = _pack_value_pieces({"v": dv, "z": d, "k": d})
        assert [n for c in calls for n in c] == ["v", "z", "k"]
        widths = {"v": dv, "z": d, "k": d}
        assert all(sum(widths[n] for n in c) <= MAX_FUSED_VALUE_DIM or len(c) == 1 for c in calls)
    assert _pack_value_pieces({"v": 64, "z": 64, "k": 64}) == [["v", "z", "k"]]


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_attention(x, x, x)


# ---------------------------------------------------------------- what the spawned ranks run

def _tensors(total, h, hk, d, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(total, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(total, hk, dv, generator=g, dtype=torch.float64)
    dout = torch.randn(total, h, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def _truth(q, k, v, dout, cu):
    cu = torch.tensor([0, q.shape[0]]) if cu is None else cu
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = truth.varlen(*leaves, cu, cu)
    out.backward(dout.double())
    return [out.detach()] + [x.grad for x in leaves]


def _run_shard(q, k, v, dout, cu, sizes, rank, mode, group=None, backend=BACKEND, pass_sizes=False):
    offsets = shard_offsets(sizes)
    lo, hi = offsets[rank], offsets[rank + 1]
    leaves = [x[lo:hi].clone().requires_grad_() for x in (q, k, v)]
    out, lse = sequence_parallel_attention(*leaves, group=group, cu_seqlens=cu, mode=mode, backend=backend,
                                           return_lse=True, shard_sizes=list(sizes) if pass_sizes else None)
    out.backward(dout[lo:hi])
    return [out.detach()] + [x.grad for x in leaves] + [lse], (lo, hi)


def _truth_lse(q, k, cu):
    """float64 log-sum-exp [H, T] of each query over the keys of its own sequence."""
    cu = torch.tensor([0, q.shape[0]]) if cu is None else cu
    groups = q.shape[1] // k.shape[1]
    parts = [truth.logsumexp(q[a:b].transpose(0, 1), k[a:b].repeat_interleave(groups, 1).transpose(0, 1))
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(parts, dim=1) if parts else q.new_zeros(q.shape[1], 0, dtype=torch.float64)


def _compare(got, want, lo, hi, atol, rtol, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b[lo:hi].double(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what} {name}: {m}")


def _single_process(q, k, v, dout, cu, backend=BACKEND):
    """The same attention by vitkern in one process on the whole sequence (same backend and dtype)."""
    cu = torch.tensor([0, q.shape[0]]) if cu is None else cu
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = vitkern.varlen_attention(*leaves, cu, backend=backend)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


# (atol, rtol). vitkern's log-sum-exp is float32 for every dtype (the varlen_attention contract) and the op's
# backward recomputes P from it, so float64 *gradients* of the op itself are float32-accurate against float64
# truth: about 2**-24 * |lse| (|lse| < ~12 here) relative; ring mode's forward merge carries the same weight
# error. allgather_kv mode does exactly what one process does, so against single-process vitkern it must agree
# to float64 rounding.
TOL_VS_SINGLE = {("allgather_kv", torch.float64): (1e-11, 1e-9), ("ring", torch.float64): (5e-6, 1e-5),
                 ("allgather_kv", torch.float32): (1e-5, 1e-5), ("ring", torch.float32): (2e-5, 2e-5)}
TOL_VS_TRUTH = {torch.float64: (5e-6, 1e-5), torch.float32: (2e-5, 2e-5)}


def _attention_case(sizes, lengths, h, hk, d, dv, dtype=torch.float64, seed=0, backend=BACKEND, pass_sizes=False):
    def case(rank, world):
        sz = sizes[world]
        total = sum(sz)
        cu = None if lengths is None else torch.tensor([0] + torch.tensor(lengths[world]).cumsum(0).tolist())
        assert cu is None or int(cu[-1]) == total
        q, k, v, dout = _tensors(total, h, hk, d, dv, dtype, seed)
        # Every collective of the case first, so that a failed comparison on one rank cannot desynchronize
        # the ranks' sequences of collectives.
        results = {}
        for mode in MODES:
            results[mode], (lo, hi) = _run_shard(q, k, v, dout, cu, sz, rank, mode, backend=backend,
                                                 pass_sizes=pass_sizes)
        want = _truth(q, k, v, dout, cu)
        single = _single_process(q, k, v, dout, cu, backend=backend)
        lse_want = _truth_lse(q, k, cu)[:, lo:hi]
        for mode in MODES:
            _compare(results[mode], single, lo, hi, *TOL_VS_SINGLE[(mode, dtype)], f"{mode} vs single-process")
            _compare(results[mode], want, lo, hi, *TOL_VS_TRUTH[dtype], f"{mode} vs float64 truth")
            # The returned log-sum-exp is float32 (the contract), over keys of every rank.
            torch.testing.assert_close(results[mode][4].double(), lse_want, atol=1e-5, rtol=1e-6,
                                       msg=lambda m: f"{mode} lse: {m}")
        if dtype == torch.float32:
            # The two modes agree with each other to float32 rounding, gradients included.
            for name, a, b in zip(("out", "dq", "dk", "dv", "lse"), results["ring"], results["allgather_kv"]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"ring vs allgather {name}: {m}")
        return "ok"
    return case


CASES = {
    # One dense sequence split evenly (197 is not a multiple of 2 or 4: ranks differ by one token).
    "dense": _attention_case({2: [99, 98], 4: [50, 49, 49, 49]}, None, h=3, hk=3, d=64, dv=64),
    # Very uneven shards (a 1-token rank), grouped-query heads, head dims 80/96.
    "uneven_gqa": _attention_case({2: [1, 196], 4: [7, 1, 150, 39]}, None, h=4, hk=2, d=80, dv=96, seed=1),
    # Packed sequences (zero-length ones included) that straddle shard boundaries.
    "packed": _attention_case({2: [400, 385], 4: [100, 300, 185, 200]},
                              {2: [0, 300, 5, 0, 200, 1, 279], 4: [0, 300, 5, 0, 200, 1, 279]},
                              h=2, hk=2, d=96, dv=96, seed=2),
    # Ranks with no tokens at all.
    "empty_shards": _attention_case({2: [0, 50], 4: [0, 40, 0, 23]}, {2: [10, 0, 40], 4: [10, 0, 40, 13]},
                                    h=2, hk=1, d=8, dv=8, seed=3),
    # Wide heads: the ring's backward splits its widened values over several fused-width calls.
    "head_dim_128": _attention_case({2: [20, 21], 4: [10, 11, 9, 11]}, None, h=2, hk=2, d=128, dv=128, seed=4),
    "head_dim_256": _attention_case({2: [20, 21], 4: [10, 11, 9, 11]}, None, h=1, hk=1, d=256, dv=256, seed=5),
    # The dtype models train in; both modes against float64 truth and against each other.
    "float32_packed": _attention_case({2: [300, 485], 4: [200, 185, 200, 200]},
                                      {2: [197, 197, 3, 388], 4: [197, 197, 3, 388]},
                                      h=3, hk=3, d=64, dv=64, dtype=torch.float32, seed=6),
    # Shard sizes given by the caller: no exchange of shapes.
    "shard_sizes_given": _attention_case({2: [400, 385], 4: [100, 300, 185, 200]},
                                         {2: [0, 300, 5, 0, 200, 1, 279], 4: [0, 300, 5, 0, 200, 1, 279]},
                                         h=2, hk=1, d=32, dv=48, seed=10, pass_sizes=True),
    # The same through the fastest backend of this install (the fused C++ kernel when it is built).
    "fastest_backend_float32": _attention_case({2: [300, 485], 4: [200, 185, 1, 399]},
                                               {2: [197, 197, 3, 388], 4: [197, 197, 3, 388]},
                                               h=4, hk=2, d=80, dv=80, dtype=torch.float32, seed=9, backend=None),
}


def _module_case(rank, world):
    """SequenceParallelAttention + all_reduce_gradients == the same layer run on the whole sequence."""
    dim, heads, total = 48, 4, 61
    cu = torch.tensor([0, 20, 20, 61])
    x = torch.randn(total, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(total, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sizes = even_shard_sizes(total, world)
    lo, hi = shard_offsets(sizes)[rank], shard_offsets(sizes)[rank + 1]
    runs = {}
    for mode in MODES:          # collectives first (see _attention_case), comparisons after
        torch.manual_seed(0)
        layer = SequenceParallelAttention(dim, heads, mode=mode, backend=BACKEND).double()
        pos = torch.nn.Parameter(torch.randn(total, dim, dtype=torch.float64))   # learned position embedding
        y_local = layer(shard_sequence(x, sizes=sizes) + shard_sequence(pos, sizes=sizes), cu_seqlens=cu)
        (y_local * shard_sequence(w, sizes=sizes)).sum().backward()      # this rank's share of the loss
        all_reduce_gradients(list(layer.parameters()) + [pos])
        runs[mode] = (layer, pos, y_local)
    for mode, (layer, pos, y_local) in runs.items():
        # Single process: the same weights on the whole sequence, per-sequence attention by the float64 truth.
        torch.manual_seed(0)
        ref = SequenceParallelAttention(dim, heads, backend=BACKEND).double()
        ref.load_state_dict(layer.state_dict())
        pos_ref = torch.nn.Parameter(pos.detach().clone())
        q, k, v = ref.qkv(x + pos_ref).view(total, 3, heads, dim // heads).unbind(1)
        y_ref = ref.proj(truth.varlen(q, k, v, cu, cu).reshape(total, dim))
        (y_ref * w).sum().backward()
        tol = dict(atol=5e-6, rtol=1e-5)      # float64 with vitkern's float32 log-sum-exp (see TOL_VS_TRUTH)
        torch.testing.assert_close(y_local, y_ref[lo:hi], **tol)
        for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=lambda m: f"{mode} {name}: {m}")
        torch.testing.assert_close(pos.grad, pos_ref.grad, **tol, msg=lambda m: f"{mode} pos: {m}")
    return "ok"


def _gather_sequence_case(rank, world):
    """gather_sequence along a middle dim with uneven shards, and sum_over_ranks; both backwards sum the ranks'
    gradients (the sum-of-losses convention)."""
    sizes = [3, 5, 1, 4][:world]
    x = torch.randn(2, sum(sizes), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    xl = shard_sequence(x, dim=1, sizes=sizes).clone().requires_grad_()
    full = gather_sequence(xl, dim=1)
    torch.testing.assert_close(full, x, atol=0, rtol=0)
    (full * (rank + 1)).sum().backward()               # rank r's loss weighs every token by r + 1
    expect = torch.full_like(xl, sum(r + 1 for r in range(world)))
    # sum_over_ranks: the forward sums the ranks' tensors, the backward the ranks' gradients.
    y = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    total = sum_over_ranks(y)
    (total * (rank + 1)).sum().backward()
    torch.testing.assert_close(xl.grad, expect, atol=0, rtol=0)
    torch.testing.assert_close(total.detach(), torch.full((3,), float(sum(range(1, world + 1))), dtype=torch.float64))
    torch.testing.assert_close(y.grad, torch.full((3,), float(sum(range(1, world + 1))), dtype=torch.float64))
    return "ok"


def _subgroup_case(rank, world):
    """A group that is not WORLD (ring neighbours are translated to global ranks); size 1 on world 2."""
    members = [1, 3] if world == 4 else [0]
    group = dist.new_group(members)              # collective over WORLD: every rank creates it
    if rank not in members:
        return "ok"
    q, k, v, dout = _tensors(37, 2, 2, 16, 16, torch.float64, seed=8)
    want = _truth(q, k, v, dout, None)
    sizes = even_shard_sizes(37, len(members))
    got = {mode: _run_shard(q, k, v, dout, None, sizes, members.index(rank), mode, group=group) for mode in MODES}
    for mode, (res, (lo, hi)) in got.items():
        _compare(res, want, lo, hi, *TOL_VS_TRUTH[torch.float64], f"subgroup {mode}")
    return "ok"


def _error(fn):
    """Run ``fn``; the error it raised (type and message), or 'no error'."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the test asserts on the type)
        return {"type": type(e).__name__, "message": str(e)}
    return "no error"


def _errors_case(rank, world):
    """Bad or disagreeing arguments raise on every rank; afterwards the group still works."""
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 3, 5 * world])
    spa = sequence_parallel_attention
    last = rank == world - 1
    out = {}
    out["rank1_2d_query"] = _error(lambda: spa(x[:, 0] if rank == 1 else x, x, x))
    out["heads_disagree"] = _error(lambda: spa(*(x[:, :1] if last else x,) * 3))
    out["cu_total_wrong"] = _error(lambda: spa(x, x, x, cu_seqlens=cu + torch.tensor([0, 0, 1])))
    out["cu_disagree"] = _error(lambda: spa(x, x, x, cu_seqlens=torch.tensor([0, 3 + (rank == 0), 5 * world])))
    out["cu_decreasing"] = _error(lambda: spa(x, x, x, cu_seqlens=torch.tensor(
        [0, 7, 6, 5 * world] if rank == 0 else [0, 3, 5, 5 * world])))
    out["mode_disagree"] = _error(lambda: spa(x, x, x, mode="ring" if rank else "allgather_kv"))
    out["mode_unknown"] = _error(lambda: spa(x, x, x, mode="ulysses"))
    out["dtype_disagree"] = _error(lambda: spa(*(x.float() if rank == 0 else x,) * 3))
    out["k_dtype"] = _error(lambda: spa(x, x.float(), x))
    out["cu_not_tensor"] = _error(lambda: spa(x, x, x, cu_seqlens=[0, 5 * world]))
    out["head_dim_mismatch"] = _error(lambda: spa(x, x[..., :4], x))
    out["scale_bad"] = _error(lambda: spa(x, x, x, scale=float("nan") if rank else None))
    out["backend_unknown"] = _error(lambda: spa(x, x, x, backend="cudnn" if rank == 0 else None))
    # With shard_sizes the checks are local (no exchange): these are wrong on every rank, so all raise.
    out["sizes_wrong_count"] = _error(lambda: spa(x, x, x, shard_sizes=[5] * (world + 1)))
    out["sizes_wrong_entry"] = _error(lambda: spa(x, x, x, shard_sizes=[6] * world))
    out["sizes_cu_total"] = _error(lambda: spa(x, x, x, cu_seqlens=cu + torch.tensor([0, 0, 1]),
                                               shard_sizes=[5] * world, mode="ring"))
    ok = sequence_parallel_attention(x, x, x, cu_seqlens=cu, backend=BACKEND)
    out["still_usable"] = "ok" if ok.shape == (5, 2, 8) and bool(torch.isfinite(ok).all()) else "broken"
    return out


CASES.update({"module": _module_case, "gather_sequence": _gather_sequence_case, "subgroup": _subgroup_case,
              "errors": _errors_case})


def _init(rank, world, port):
    torch.set_num_threads(1)   # 4 ranks share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))


def _worker(rank, world, port, names, out_dir):
    _init(rank, world, port)
    results = {}
    for name in names:
        try:
            results[name] = CASES[name](rank, world)
        except Exception:  # noqa: BLE001  (reported to the parent, which fails the test with it)
            results[name] = "FAILED on rank %d:\n%s" % (rank, traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _crash_worker(rank, world, port, names, out_dir):
    """Rank 1 dies before the call; rank 0 must get an error, not wait forever."""
    _init(rank, world, port)
    dist.barrier()
    if rank == 1:
        os._exit(3)
    t0 = time.monotonic()
    x = torch.randn(6, 2, 8)
    res = _error(lambda: sequence_parallel_attention(x, x, x, backend=BACKEND))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"crash": res, "seconds": time.monotonic() - t0}, f)
    os._exit(0)   # the group is broken: skip the collective teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, names, out_dir, target=_worker):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, names, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {JOIN_DEADLINE_S} s (a hang)"
    results = []
    for r in range(world):
        path = os.path.join(str(out_dir), f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            results.append({"exitcode": procs[r].exitcode})
    return results


ALL = list(CASES)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def group_results(request, tmp_path_factory):
    world = request.param
    return world, _spawn(world, ALL, tmp_path_factory.mktemp(f"dist{world}"))


@pytest.mark.parametrize("case", [c for c in ALL if c != "errors"])
def test_matches_single_process(group_results, case):
    world, results = group_results
    for r, res in enumerate(results):
        assert case in res, f"rank {r} wrote no result: {res}"
        assert res[case] == "ok", res[case]


ERROR_ARG = {"rank1_2d_query": "q_local", "heads_disagree": "q_local", "cu_total_wrong": "cu_seqlens",
             "cu_disagree": "cu_seqlens", "cu_decreasing": "cu_seqlens", "mode_disagree": "mode",
             "mode_unknown": "mode", "dtype_disagree": "q_local", "head_dim_mismatch": "k_local",
             "scale_bad": "scale", "backend_unknown": "backend", "k_dtype": "k_local", "cu_not_tensor": "cu_seqlens",
             "sizes_wrong_count": "shard_sizes", "sizes_wrong_entry": "shard_sizes", "sizes_cu_total": "cu_seqlens"}
TYPE_ERRORS = {"k_dtype", "cu_not_tensor"}   # the rest are ValueErrors


@pytest.mark.parametrize("what", list(ERROR_ARG))
def test_bad_arguments_raise_on_every_rank(group_results, what):
    world, results = group_results
    for r, res in enumerate(results):
        got = res["errors"] if isinstance(res.get("errors"), dict) else pytest.fail(str(res.get("errors")))
        err = got[what]
        assert isinstance(err, dict), (r, err)
        if ERROR_ARG[what] in err["message"]:
            assert err["type"] == ("VitkernTypeError" if what in TYPE_ERRORS else "VitkernValueError"), (r, err)
        else:
            assert err["type"] == "VitkernValueError", (r, err)
        # The rank that passed the bad argument names it; the others name the rank that stopped them.
        assert ERROR_ARG[what] in err["message"] or "rejected their arguments" in err["message"], (r, err)
    assert any(ERROR_ARG[what] in res["errors"][what]["message"] for res in results)
    assert all(res["errors"]["still_usable"] == "ok" for res in results)


def test_a_dead_rank_gives_an_error_not_a_hang(tmp_path):
    results = _spawn(2, [], tmp_path, target=_crash_worker)
    res = results[0]
    assert isinstance(res.get("crash"), dict), res
    assert res["seconds"] < PG_TIMEOUT_S + 10, res
