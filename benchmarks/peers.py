"""Every implementation the benchmark times side by side, behind one small interface.

All peers of a case take the same inputs and return the output in the case's common layout, so one truth and one
``dout`` serve them all: dense cases q, k, v, out [B, H, N, D]; packed cases q, k, v, out [T, H, D] with T =
packs·seqlen. ``prepare`` builds per-batch metadata (masks) and is timed apart from ``run``, because a packed
batch changes every step and its mask must be rebuilt each time.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .workloads import Case

try:  # absent before torch 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None


@dataclass
class Inputs:
    """One case's tensors. Packed cases also carry their segment metadata, built on the host."""

    case: Case
    q: Tensor
    k: Tensor
    v: Tensor
    segments: Optional[list[int]] = None      # packed: segment lengths (images and padding), sum = T, on the host
    max_seqlen: int = 0

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    # Per-batch metadata, built from the host-side image lengths inside each peer's timed ``prepare``: a packed
    # batch changes every step, so what a peer needs to know about it is part of its cost.
    def cu_seqlens(self, dtype: torch.dtype = torch.int32) -> Tensor:
        """[S + 1] cumulative segment lengths on the device."""
        lengths = torch.tensor(self.segments, dtype=dtype)
        return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=dtype)]).to(self.q.device)

    def doc_ids(self) -> Tensor:
        """int32 [packs, seqlen]: the segment of each token."""
        lengths = torch.tensor(self.segments, device=self.q.device)
        ids = torch.repeat_interleave(torch.arange(len(self.segments), dtype=torch.int32, device=self.q.device),
                                      lengths, output_size=self.case.tokens)
        return ids.view(self.case.batch, self.case.seqlen)


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random q, k, v (standard normal, never zeros) in the case's common layout."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.tokens, case.heads, case.head_dim) if case.packed else \
        (case.batch, case.heads, case.seqlen, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
               for _ in range(3))
    if not case.packed:
        return Inputs(case, q, k, v)
    segs = case.segments()
    return Inputs(case, q, k, v, segs, max(segs))


class Peer:
    """Base class. ``name`` appears in the tables; ``family`` is "vitkern" or "peer"."""

    name = ""
    family = "peer"
    description = ""
    dense_work = False   # computes the full N x N of every batch entry (masked pairs included)
    compiles = False     # the first call per shape compiles (Triton JIT, torch.compile): reported as compile time,
                         # never a sample
    torch_compile = False  # needs torch.compile (skipped by --no-compile and --quick)

    def skip_reason(self, case: Case, device: torch.device, dtype: torch.dtype, mode: str) -> Optional[str]:
        """A known reason this peer can't take the cell, or None (then the call itself may still refuse)."""
        return None

    def prepare(self, inp: Inputs):
        return None

    def run(self, state, inp: Inputs, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def transient_bytes(self, case: Case, mode: str, elem: int) -> int:
        """Memory beyond inputs, output and gradients that one call needs (the prediction's main term)."""
        return 0


def _to_batched(x: Tensor, case: Case) -> Tensor:
    """Packed [T, H, D] -> [packs, H, seqlen, D] (a view)."""
    return x.view(case.batch, case.seqlen, case.heads, x.shape[-1]).transpose(1, 2)


def _to_packed(x: Tensor, case: Case) -> Tensor:
    return x.transpose(1, 2).reshape(case.tokens, case.heads, x.shape[-1])


def _score_elems(case: Case) -> int:
    return case.computed_pairs_dense() * case.heads


def _mask_elems(case: Case) -> int:
    return case.computed_pairs_dense() if case.packed else 0


# ---------------------------------------------------------------------------------------------- naive


class Naive(Peer):
    description = "PyTorch ops: QK^T -> masked_fill -> softmax -> PV (materializes B·H·N·N scores)"
    dense_work = True

    def __init__(self, packed: bool):
        self.name = "naive-mask" if packed else "naive"

    def prepare(self, inp):
        if not inp.case.packed:
            return None
        doc = inp.doc_ids()
        return doc[:, None, :, None] != doc[:, None, None, :]  # True = blocked

    def run(self, blocked, inp, q, k, v):
        case = inp.case
        if case.packed:
            q, k, v = (_to_batched(x, case) for x in (q, k, v))
        s = torch.matmul(q, k.transpose(-1, -2))
        s.mul_(inp.scale)  # in place: matmul's backward needs its inputs, not its output
        if blocked is not None:
            s.masked_fill_(blocked, float("-inf"))
        out = torch.matmul(torch.softmax(s, dim=-1), v)
        return _to_packed(out, case) if case.packed else out

    def transient_bytes(self, case, mode, elem):
        # scores + probabilities alive together; the backward adds their two gradients.
        return (2 if mode == "fwd" else 4) * _score_elems(case) * elem + _mask_elems(case)


# ---------------------------------------------------------------------------------------------- torch SDPA

_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                  "math": "MATH"}


class Sdpa(Peer):
    """torch SDPA, by default dispatch or pinned to one backend; packed cases pass the dense block mask."""

    def __init__(self, packed: bool, backend: Optional[str] = None):
        self.backend = backend
        base = "sdpa-mask" if packed else "sdpa"
        self.name = f"{base}-{backend}" if backend else base
        self.dense_work = packed or backend == "math"
        how = f"pinned to the {backend} backend" if backend else "default dispatch"
        self.description = f"torch SDPA, {how}" + (", dense bool block-diagonal mask" if packed else "")

    def skip_reason(self, case, device, dtype, mode):
        if self.backend and sdpa_kernel is None:
            return "this torch has no torch.nn.attention.sdpa_kernel"
        if self.backend and not hasattr(SDPBackend, _SDPA_BACKENDS[self.backend]):
            return f"this torch has no SDPBackend.{_SDPA_BACKENDS[self.backend]}"
        return None

    def prepare(self, inp):
        if not inp.case.packed:
            return None
        doc = inp.doc_ids()
        return doc[:, None, :, None] == doc[:, None, None, :]  # True = takes part

    def run(self, mask, inp, q, k, v):
        case = inp.case
        if case.packed:
            q, k, v = (_to_batched(x, case) for x in (q, k, v))
        if self.backend:
            with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[self.backend])):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return _to_packed(out, case) if case.packed else out

    def transient_bytes(self, case, mode, elem):
        if self.backend == "math":
            return (2 if mode == "fwd" else 4) * _score_elems(case) * max(elem, 4) + 5 * _mask_elems(case)
        # Fused kernels keep O(N) state; a bool mask is turned into an additive float one.
        return 5 * _mask_elems(case) + case.tokens * case.heads * 4 * 4


class SdpaLoop(Peer):
    name = "sdpa-loop"
    description = "a Python loop of torch SDPA, one call per image (and per padding run)"

    def run(self, state, inp, q, k, v):
        outs, start = [], 0
        for n in inp.segments:
            sl = slice(start, start + n)
            outs.append(F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                       v[sl].transpose(0, 1)).transpose(0, 1))
            start += n
        return torch.cat(outs, 0)


class SdpaNested(Peer):
    name = "sdpa-njt"
    description = "torch SDPA on jagged nested tensors (torch.nested.nested_tensor_from_jagged)"

    def __init__(self, on_cpu: bool):
        self.on_cpu = on_cpu
        self.dense_work = on_cpu

    def skip_reason(self, case, device, dtype, mode):
        if not hasattr(torch.nested, "nested_tensor_from_jagged"):
            return "this torch has no jagged nested tensors"
        return None

    def prepare(self, inp):
        return inp.cu_seqlens(torch.int64)

    def transient_bytes(self, case, mode, elem):
        if self.on_cpu:
            # On CPU the jagged SDPA falls back to a materializing path (measured: ~2.7 GB for one 4,096-token,
            # 12-head pack in fp32), so it is predicted like a dense implementation over the whole batch.
            return (3 if mode == "fwd" else 4) * case.tokens ** 2 * case.heads * max(elem, 4)
        return case.tokens * case.heads * 4 * 4

    def run(self, offsets, inp, q, k, v):
        nq, nk, nv = (torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=inp.max_seqlen).transpose(1, 2)
                      for x in (q, k, v))
        return F.scaled_dot_product_attention(nq, nk, nv).transpose(1, 2).values()


class TorchVarlen(Peer):
    name = "torch-varlen"
    description = "torch.nn.attention.varlen.varlen_attn (cu_seqlens, flash kernel)"

    def skip_reason(self, case, device, dtype, mode):
        try:
            importlib.import_module("torch.nn.attention.varlen")
        except ImportError:
            return "this torch has no torch.nn.attention.varlen"
        return None

    def prepare(self, inp):
        return inp.cu_seqlens()

    def run(self, cu, inp, q, k, v):
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q, k, v, cu, cu, inp.max_seqlen, inp.max_seqlen)


# ---------------------------------------------------------------------------------------------- FlexAttention

_FLEX_COMPILED = None


def _flex():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        # One compile per shape (a grid of cases x modes): keep dynamo from giving up and running flex eagerly.
        import torch._dynamo
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


class Flex(Peer):
    compiles = True
    torch_compile = True

    def __init__(self, packed: bool):
        self.name = "flex-doc" if packed else "flex"
        self.description = "FlexAttention, torch.compile'd" + (
            ", document mask_mod via create_block_mask (rebuilt per batch, timed as prep)" if packed else ", no mask")

    def skip_reason(self, case, device, dtype, mode):
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError:
            return "this torch has no FlexAttention"
        return None

    def prepare(self, inp):
        if not inp.case.packed:
            return None
        from torch.nn.attention.flex_attention import create_block_mask
        doc = inp.doc_ids()

        def same_image(b, h, q_idx, kv_idx):
            return doc[b, q_idx] == doc[b, kv_idx]

        case = inp.case
        return create_block_mask(same_image, case.batch, None, case.seqlen, case.seqlen, device=str(doc.device))

    def run(self, block_mask, inp, q, k, v):
        case = inp.case
        if case.packed:
            q, k, v = (_to_batched(x, case) for x in (q, k, v))
        out = _flex()(q, k, v, block_mask=block_mask)
        return _to_packed(out, case) if case.packed else out


# ---------------------------------------------------------------------------------------------- external


class FlashAttn(Peer):
    family = "peer"

    def __init__(self, packed: bool):
        self.packed = packed
        self.name = "flash-attn-varlen" if packed else "flash-attn"
        self.description = "Dao-AILab flash-attn " + ("flash_attn_varlen_func" if packed else "flash_attn_func")

    def skip_reason(self, case, device, dtype, mode):
        if device.type != "cuda":
            return "flash-attn runs on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn takes fp16/bf16, got {dtype}"
        return None

    def prepare(self, inp):
        return inp.cu_seqlens() if self.packed else None

    def run(self, cu, inp, q, k, v):
        import flash_attn
        if self.packed:
            return flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, inp.max_seqlen, inp.max_seqlen)
        return flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class Xformers(Peer):
    def __init__(self, packed: bool):
        self.packed = packed
        self.name = "xformers-blockdiag" if packed else "xformers"
        self.description = "xformers memory_efficient_attention" + (" with BlockDiagonalMask" if packed else "")

    def skip_reason(self, case, device, dtype, mode):
        return None if device.type == "cuda" else "xformers fmha is benchmarked on CUDA only"

    def prepare(self, inp):
        if not self.packed:
            return None
        from xformers.ops import fmha
        return fmha.BlockDiagonalMask.from_seqlens(inp.segments)

    def run(self, bias, inp, q, k, v):
        from xformers.ops import memory_efficient_attention
        if self.packed:
            return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
        return memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- vitkern


class Vitkern(Peer):
    family = "vitkern"

    def __init__(self, backend: str, packed: bool):
        self.backend = backend
        self.name = f"vitkern-{backend}"
        self.dense_work = backend == "reference"
        self.compiles = backend == "triton"  # JIT per kernel variant, autotuning once per key (not per shape)
        api = "varlen_attention (cu_seqlens)" if packed else "scaled_dot_product_attention"
        self.description = f"vitkern.{api}, backend={backend!r}"

    def prepare(self, inp):
        if not inp.case.packed:
            return None
        import vitkern
        return vitkern.lengths_to_cu_seqlens(inp.segments, device=inp.q.device)

    def run(self, cu, inp, q, k, v):
        import vitkern
        if inp.case.packed:
            return vitkern.varlen_attention(q, k, v, cu, max_seqlen_q=inp.max_seqlen,
                                            max_seqlen_k=inp.max_seqlen, backend=self.backend)
        return vitkern.scaled_dot_product_attention(q, k, v, backend=self.backend)

    def transient_bytes(self, case, mode, elem):
        if self.backend != "reference":
            return case.tokens * case.heads * 4 * 4
        # The reference materializes fp32 scores over the whole call: one [1, H, T, T] block for packed input.
        pairs = case.tokens ** 2 if case.packed else case.computed_pairs_dense()
        return (5 if mode == "fwd" else 7) * pairs * case.heads * max(elem, 4)


class VitkernTmaSetting(Vitkern):
    """vitkern-triton with VITKERN_TRITON_TMA set for the call: "0" pointer tiles everywhere, "1" TMA in the
    backward kernels too (the default is TMA in the forward only, on sm_90+). An A/B of the TMA paths in one run
    (benchmarks/NOTES.md, Triton version 4); setting the variable costs ~1 us a call, nothing next to these cells.
    The autotuner keys its choice on the setting, so each variant runs its own tuned tiles."""

    def __init__(self, setting: str, packed: bool = False):
        super().__init__("triton", packed)
        self.setting = setting
        self.name = f"vitkern-triton-tma{setting}"
        self.description += f", VITKERN_TRITON_TMA={setting}"

    def run(self, cu, inp, q, k, v):
        old = os.environ.get("VITKERN_TRITON_TMA")
        os.environ["VITKERN_TRITON_TMA"] = self.setting
        try:
            return super().run(cu, inp, q, k, v)
        finally:
            if old is None:
                del os.environ["VITKERN_TRITON_TMA"]
            else:
                os.environ["VITKERN_TRITON_TMA"] = old


# ---------------------------------------------------------------------------------------------- selection

# vitkern backends never timed on a device: Triton on CPU tensors is its interpreter; the C++ backend takes CPU
# tensors only; the reference materializes fp32 scores and is a test oracle, not a GPU contender. Every other
# backend in vitkern.available_backends() is timed.
VITKERN_EXCLUDED = {"cpu": {"triton"}, "cuda": {"cpu", "reference"}}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken install counts as absent
        return False


def peers_for(case: Case, device: torch.device) -> list[Peer]:
    """The peers of a case, the truth first (torch SDPA dense, the per-image SDPA loop packed), vitkern last."""
    cuda = device.type == "cuda"
    packed = case.packed
    out: list[Peer] = [SdpaLoop()] if packed else [Sdpa(False)]
    out.append(Naive(packed))
    if packed:
        out.append(Sdpa(True))
    if cuda:
        out += [Sdpa(packed, b) for b in _SDPA_BACKENDS]
    if packed:
        out += [SdpaNested(on_cpu=not cuda), TorchVarlen()]
    if packed or cuda:  # dense FlexAttention on CPU would only add compile minutes to a 2-core run
        out.append(Flex(packed))
    if cuda and _importable("flash_attn"):
        out.append(FlashAttn(packed))
    if cuda and _importable("xformers.ops"):
        out.append(Xformers(packed))
    import vitkern
    excluded = VITKERN_EXCLUDED.get(device.type, set())
    names = sorted((b for b in vitkern.available_backends() if b not in excluded), key=lambda b: b == "reference")
    out += [Vitkern(b, packed) for b in names]
    return out


def predicted_bytes(peer: Peer, case: Case, mode: str, elem: int) -> int:
    """Memory one call is predicted to allocate: output (and gradients), plus the peer's transient, +25%."""
    io = case.tokens * case.heads * case.head_dim * elem
    base = io * (1 if mode == "fwd" else 4)
    return int(1.25 * (base + peer.transient_bytes(case, mode, elem)))


def predicted_seconds(peer: Peer, case: Case, mode: str, rate_flops: float) -> float:
    """A rough time of one call, from the square-matmul rate (for skipping cells beyond --max-cell-s)."""
    pairs = case.computed_pairs_dense() if peer.dense_work else case.useful_pairs()
    flops = 4.0 * case.head_dim * pairs * case.heads * (3.5 if mode == "fwdbwd" else 1.0)
    efficiency = 0.25 if peer.dense_work else 0.5
    return flops / (rate_flops * efficiency)

