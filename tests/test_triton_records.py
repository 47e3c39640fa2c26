"""The per-Triton-release records of config.py (spilling launch configs, replaced table entries) and
aot_check's release_record, which makes them. No kernel runs: only table look-ups and a record built from
made-up compile results."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vitkern.triton_kernels import aot_check, config  # noqa: E402
from vitkern.triton_kernels.config import LaunchConfig, TritonRecord  # noqa: E402

HEAVY_128 = ("fwd", "16", 128, True)


@pytest.fixture
def on_gpu(monkeypatch):
    """The GPU's tables (not the interpreter's tiny tiles), whatever TRITON_INTERPRET says."""
    monkeypatch.setattr(config, "interpreting", lambda: False)


def test_nearest_release_is_used(monkeypatch):
    old, new = TritonRecord({}), TritonRecord({})
    monkeypatch.setattr(config, "TRITON_RECORDS", {(3, 6): old, (3, 8): new})
    assert config.record((3, 6)) is old and config.record((3, 5)) is old and config.record((2, 9)) is old
    assert config.record((3, 8)) is new and config.record((3, 9)) is new and config.record((4, 0)) is new
    assert config.record((3, 7)) is new                     # as near to both: the newer
    assert config.record() is config.record(config.triton_version())


def test_installed_release_has_a_record():
    assert config.record() in config.TRITON_RECORDS.values()
    assert config.SPILLS is config.record().spills


def test_replaced_table_entry_is_used_everywhere(monkeypatch, on_gpu):
    own = config.forward_config(128, 128, torch.float16, heavy=True)
    other = LaunchConfig(32, 64, 4, 2)
    assert other != own
    rec = TritonRecord({HEAVY_128: {tuple(vars(own).values())}}, {HEAVY_128: other})
    monkeypatch.setattr(config, "TRITON_RECORDS", {config.triton_version(): rec})
    for dtype in (torch.float16, torch.bfloat16):
        assert config.forward_config(112, 112, dtype, heavy=True) == other
        assert config.static_config("fwd", 128, 128, dtype, heavy=True) == other
        cands = config.candidates("fwd", 128, 128, dtype, heavy=True)
        assert cands[0] == other and own not in cands
    # Other keys keep the table's own entries; so does the interpreter.
    assert config.forward_config(128, 128, torch.float16, heavy=False) != other
    assert config.forward_config(128, 128, torch.float32, heavy=True) != other
    monkeypatch.setattr(config, "interpreting", lambda: True)
    assert config.forward_config(128, 128, torch.float16, heavy=True) == LaunchConfig(32, 16, 1, 1)


def test_backward_table_entries_are_replaced_one_kernel_at_a_time(monkeypatch, on_gpu):
    kv, q = config.backward_configs(64, 64, torch.bfloat16)
    other = LaunchConfig(64, 32, 4, 1)
    rec = TritonRecord({}, {("bwd_dq", "16", 64, False): other})
    monkeypatch.setattr(config, "TRITON_RECORDS", {config.triton_version(): rec})
    assert config.backward_configs(64, 64, torch.bfloat16) == (kv, other)


def test_every_neighbour_includes_the_recorded_spills(on_gpu):
    for key, bad in config.SPILLS.items():
        kernel, bits, width, heavy = key
        dtype = torch.float32 if bits == "32" else torch.float16
        first = config.static_config(kernel, width, width, dtype, heavy)
        neighbours = {tuple(vars(c).values()) for c in config._neighbours(kernel, first)}
        every = {tuple(vars(c).values()) for c in config.candidates(kernel, width, width, dtype, heavy, every=True)}
        cands = {tuple(vars(c).values()) for c in config.candidates(kernel, width, width, dtype, heavy)}
        assert cands <= every and neighbours <= every and (bad & neighbours) <= every


def _result(kernel, cfg, stack, cands, d=128, mask=2):   # a float mask with dropout: heavy
    return {"kernel": kernel, "dtype": torch.float16, "d": d, "mask": mask, "varlen": False, "dropout": mask != 0,
            "causal": False, "stack": stack, "cfg": cfg, "candidates": cands}


def test_release_record_replaces_a_spilling_table_entry():
    table, n1, n2, n3 = (64, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 8, 2)
    cands = [table, n1, n2, n3]
    results = [_result("_attention_fwd_kernel", table, 208, cands),
               _result("_attention_fwd_kernel", n1, 0, cands),
               _result("_attention_fwd_kernel", n1, 16, cands, d=112),   # spills in another variant of the key
               _result("_attention_fwd_kernel", n2, 0, cands),
               _result("_attention_fwd_kernel", n3, 0, cands),
               _result("_bwd_dq_kernel", (128, 32, 8, 2), 0, [(128, 32, 8, 2)], mask=0),
               _result("_tile_state_kernel", n3, 8, cands),       # the mask summary with the forward's tiles
               _result("_bwd_preprocess", (128, None, 4, 3), 64, [])]  # not tuned: ignored
    spills, replaced = aot_check.release_record(results)
    assert spills == {HEAVY_128: {table, n1, n3}}
    assert replaced == {HEAVY_128: LaunchConfig(*n2)}


def test_release_record_counts_a_failed_compile_as_spilling():
    cands = [(64, 64, 8, 2), (32, 64, 8, 2)]
    spills, replaced = aot_check.release_record([_result("_attention_fwd_kernel", cands[0], -1, cands),
                                                 _result("_attention_fwd_kernel", cands[1], 0, cands),
                                                 _result("_attention_fwd_kernel", cands[1], None, cands, d=112)])
    assert spills == {HEAVY_128: {cands[0]}} and replaced == {HEAVY_128: LaunchConfig(*cands[1])}


def test_release_record_keeps_a_clean_table_entry():
    cands = [(128, 64, 8, 3), (128, 64, 4, 3)]
    spills, replaced = aot_check.release_record([_result("_attention_fwd_kernel", cands[0], 0, cands, mask=0),
                                                 _result("_attention_fwd_kernel", cands[1], 32, cands, mask=0)])
    assert spills == {("fwd", "16", 128, False): {cands[1]}} and replaced == {}


@pytest.mark.parametrize("source,numpy_version,bad", [
    ("lambda self: int(self.handle.data))", "2.4.6", True),            # Triton 3.6's interpreter
    ("lambda self: int(self.handle.data))", "2.3.5", False),
    ("lambda self: int(self.handle.data.squeeze()))", "2.4.6", False),  # Triton 3.8's
])
def test_interpreter_numpy_problem_is_named(monkeypatch, source, numpy_version, bad):
    import inspect

    import numpy
    from vitkern.backends import triton_backend
    monkeypatch.setattr(triton_backend, "_INTERP_PROBLEM", None)
    monkeypatch.setattr(inspect, "getsource", lambda obj: source)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = triton_backend._interpreter_problem()
    assert (problem is not None) == bad
    if bad:
        assert "numpy below 2.4" in problem and numpy_version in problem
    monkeypatch.setattr(triton_backend, "_INTERP_PROBLEM", None)


def test_release_record_prefers_the_table_tiles_at_another_depth():
    # A spilling table entry is replaced by the same tiles and warps with another pipeline depth when that
    # compiles clean, before candidates with other tiles (which change the work per instruction).
    table, other_tiles, deeper = (128, 128, 8, 2), (64, 128, 8, 2), (128, 128, 8, 3)
    cands = [table, other_tiles, deeper]
    spills, replaced = aot_check.release_record([_result("_attention_fwd_kernel", c, s, cands)
                                                 for c, s in ((table, 16), (other_tiles, 0), (deeper, 0))])
    assert spills == {HEAVY_128: {table}} and replaced == {HEAVY_128: LaunchConfig(*deeper)}
