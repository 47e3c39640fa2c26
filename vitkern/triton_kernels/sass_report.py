"""What the compiler emits for the attention kernels on a GPU target, read from the SASS (no GPU needed).

For each kernel variant that aot_check.py builds (same launches, same specialization), compiled for sm_90 by
default: registers, shared memory, spilled bytes, and the innermost tensor-core loop found in the disassembly
(cuobjdump from Triton's package): its length, the MMA instruction kinds in it (HGMMA = Hopper's warpgroup
wgmma, HMMA = the older per-warp mma.sync), whether loads use TMA (UTMALDG), and

    warp-instructions per CTA per 128x64 (query, key) tile = loop length x num_warps x 8192 / (BLOCK_M x BLOCK_N)

the issue cost of one unit of work, comparable across tile shapes (a non-warp-specialized flash kernel on Hopper
is bound by instruction issue). Loop lengths are static counts: a branch skipped inside the loop still counts;
the "fast path" leaves out the blocks a forward branch skips that hold no MMA (e.g. the mask read of a tile
the mask summary calls full), the cost of such a tile.

Each loop is also put against the three throughputs of an sm_90 SM that bound it (``cycle_bounds``), per
128x64 tile: the tensor cores (the loop's wgmma / mma.sync shapes at 2,048 bf16/fp16 FMA per clock per SM),
the MUFU unit (16 lanes per clock: EX2 of the softmax) and instruction issue (4 warp-instructions per clock).
The largest is the loop's lower bound in cycles; ``useful`` is the work the variant's head dims need (no
padding), so ``peak_fraction`` = useful tensor cycles / bound says how close to the tensor-core peak the loop
can get at best (it assumes perfect overlap; measured kernels reach 60-75% of it on Hopper).

    python -m vitkern.triton_kernels.sass_report [--set static|quick|test|candidates] [--json OUT] [--md OUT]
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from dataclasses import asdict, dataclass, field

from . import aot_check

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH_OPS = ("BRA",)
_MMA_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "DMMA")
_END_OPS = ("EXIT", "RET")

# sm_90 (H100 / H200) per SM per clock: dense fp16/bf16 tensor-core FMAs, MUFU lanes, warp-instructions issued.
TENSOR_FMA_PER_CLK = 2048
MUFU_LANES_PER_CLK = 16
ISSUE_PER_CLK = 4
# Products of head-dim width per kernel: forward S and P.V; dQ S, dP and dQ; dK/dV S^T, dP^T, dV and dK.
# A dK/dV launch split by config.split_dkdv (GRADS 1: dV, 2: dK) computes S^T, dV or S^T, dP^T, dK.
_PRODUCTS = {"_attention_fwd_kernel": ("d", "dv"), "_bwd_dq_kernel": ("d", "dv", "d"),
             "_bwd_dkdv_kernel": ("d", "dv", "dv", "d"), "_bwd_dkdv_kernel:dV": ("d", "dv"),
             "_bwd_dkdv_kernel:dK": ("d", "dv", "d")}
_GRAD_NAMES = {1: "dV", 2: "dK"}


def kernel_label(name: str, kwargs: dict) -> str:
    """The kernel's name, with the gradient it computes when a dK/dV launch is split (config.split_dkdv)."""
    grads = kwargs.get("GRADS", 3)
    return f"{name}:{_GRAD_NAMES[grads]}" if grads in _GRAD_NAMES else name
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"^HMMA\.(\d\d)(\d)(\d+)")


@dataclass
class Instr:
    addr: int
    op: str          # full opcode with modifiers, e.g. "HGMMA.64x64x16.F32.BF16"
    text: str        # the instruction without its predicate

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Loop:
    start: int       # address of the backward branch's target
    end: int         # address of the backward branch
    length: int      # instructions in [start, end]
    mma: dict        # MMA opcode (with shape modifiers) -> count
    ops: dict = field(default_factory=dict)   # base opcode -> count
    fast: int = 0    # length less the blocks a forward branch can skip that hold no MMA (e.g. a mask read)


def parse_sass(text: str) -> list[Instr]:
    """The instructions of one function's cuobjdump -sass listing (a single kernel per cubin)."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        body = m.group(2)
        if body.startswith("@"):
            body = body.split(None, 1)[1] if " " in body else ""
        op = body.split(None, 1)[0] if body else ""
        out.append(Instr(int(m.group(1), 16), op, body))
    return out


def _branch_target(ins: Instr):
    if ins.base not in _BRANCH_OPS:
        return None
    hexes = re.findall(r"0x([0-9a-f]+)", ins.text)
    return int(hexes[-1], 16) if hexes else None


def mma_loops(instrs: list[Instr]) -> list[Loop]:
    """The innermost loops that contain MMA instructions, in address order.

    A loop is a backward branch's range [target, branch]. Ranges that contain an EXIT/RET are not loops of the
    kernel body (out-of-line blocks after the exit, e.g. barrier-wait retries, jump back into the main loop);
    of the ranges that hold MMA instructions, those that contain no other such range are innermost (small
    wait/retry loops inside the main loop hold no MMA and do not count)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    ranges = []
    for j, ins in enumerate(instrs):
        t = _branch_target(ins)
        if t is None or t > ins.addr or t not in index:
            continue
        i = index[t]
        body = instrs[i:j + 1]
        if any(b.base in _END_OPS for b in body) or not any(b.base in _MMA_OPS for b in body):
            continue
        ranges.append((i, j))
    inner = [r for r in set(ranges)
             if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    loops = []
    for i, j in sorted(inner):
        body = instrs[i:j + 1]
        mma = collections.Counter(b.op for b in body if b.base in _MMA_OPS)
        ops = collections.Counter(b.base for b in body)
        loops.append(Loop(instrs[i].addr, instrs[j].addr, len(body), dict(mma), dict(ops.most_common()),
                          len(body) - _skippable(body)))
    return loops


def _skippable(body: list[Instr]) -> int:
    """Instructions of a loop body inside [branch, target) of forward branches that stay in the body and jump
    over no MMA instruction: the work a tile can skip (counted once where such ranges overlap)."""
    end = body[-1].addr
    skip = set()
    for k, ins in enumerate(body[:-1]):
        t = _branch_target(ins)
        if t is None or t <= ins.addr or t > end:
            continue
        span = [b for b in body[k + 1:] if b.addr < t]
        if not any(b.base in _MMA_OPS for b in span):
            skip.update(b.addr for b in span)
    return len(skip)


def per_tile(length: int, num_warps: int, block_m: int, block_n: int) -> float:
    """Warp-instructions per CTA per 128x64 (query, key) tile of one loop iteration's static length."""
    return length * num_warps * 8192 / (block_m * block_n)


def mma_fmas(mma: dict, num_warps: int) -> int:
    """FMAs one loop iteration of a CTA issues to the tensor cores: an HGMMA.MxNxK is one warpgroup's (each of
    its 4 warps lists it), an HMMA.16816 one warp's."""
    total = 0
    for op, count in mma.items():
        g = _HGMMA_SHAPE.match(op)
        if g:
            total += count * int(g[1]) * int(g[2]) * int(g[3]) * (num_warps // 4)
            continue
        h = _HMMA_SHAPE.match(op)
        if h:
            total += count * int(h[1]) * int(h[2]) * int(h[3]) * num_warps
    return total


def cycle_bounds(loop: Loop, num_warps: int, block_m: int, block_n: int, kernel: str, d: int, dv: int) -> dict:
    """Cycles per 128x64 tile each sm_90 unit needs for one iteration of ``loop`` (``kernel``: kernel_label): tensor (as issued, padding
    included), mufu, issue, their max (``bound``), ``useful`` (tensor cycles of the unpadded head dims) and
    ``peak_fraction`` = useful / bound."""
    tiles = block_m * block_n / 8192
    widths = {"d": d, "dv": dv}
    useful = 128 * 64 * sum(widths[w] for w in _PRODUCTS.get(kernel, ())) / TENSOR_FMA_PER_CLK
    tensor = mma_fmas(loop.mma, num_warps) / TENSOR_FMA_PER_CLK / tiles
    mufu = loop.ops.get("MUFU", 0) * num_warps * 32 / MUFU_LANES_PER_CLK / tiles
    issue = loop.length * num_warps / ISSUE_PER_CLK / tiles
    bound = max(tensor, mufu, issue)
    return dict(tensor=round(tensor), mufu=round(mufu), issue=round(issue), bound=round(bound),
                useful=round(useful), peak_fraction=round(useful / bound, 3) if bound and useful else None)


def analyse(cubin: bytes, num_warps: int, block_m: int, block_n: int, kernel: str = "", d: int = 0,
            dv: int = 0) -> dict:
    """Resource use and the main loop (the first innermost MMA loop by address: the kernels run their interior,
    check-free key tiles first) of one compiled kernel."""
    instrs = parse_sass(aot_check.cuobjdump(cubin, "-sass"))
    regs, stack = aot_check._resource_usage(cubin)
    loops = mma_loops(instrs)
    main = loops[0] if loops else None
    kinds = sorted({op.split(".")[0] for op in main.mma}) if main else []
    return dict(
        regs=regs, stack=stack,
        tma=any(i.base == "UTMALDG" for i in instrs),
        loop_tma=bool(main and main.ops.get("UTMALDG")),
        mma_kinds=kinds,
        loop_length=main.length if main else None,
        per_tile=round(per_tile(main.length, num_warps, block_m, block_n)) if main else None,
        fast_per_tile=round(per_tile(main.fast, num_warps, block_m, block_n)) if main else None,
        cycles=cycle_bounds(main, num_warps, block_m, block_n, kernel, d, dv) if main and main.mma else None,
        loops=[asdict(lp) for lp in loops])


VARIANT_SETS = ("static", "quick", "test", "candidates")


def variants(which: str) -> list:
    """aot_check's variant tuples (dtype, d, mask kind, causal, varlen, dropout, n) of a named set; "test" is a
    small set covering each kernel family with dense, masked (bool; float with its gradient), causal, varlen (alone,
    and both with dropout) and head dims 64..256 (80 and 96 in two column chunks; 256 with dK/dV in two launches)."""
    import torch
    if which in ("static", "candidates"):
        base = aot_check._variants(False)
        return base + [(torch.bfloat16, 64, 0, False, False, False, 4096),
                       (torch.bfloat16, 80, 0, False, False, False, 4096),
                       (torch.bfloat16, 96, 0, False, False, False, 4096)]
    if which == "quick":
        return aot_check._variants(True)
    b16 = torch.bfloat16
    return [(b16, 64, 0, False, False, False, 256), (b16, 128, 0, False, False, False, 256),
            (b16, 80, 0, False, False, False, 256), (b16, 96, 0, False, False, False, 256),
            (b16, 64, 1, False, False, False, 197), (b16, 96, 1, False, False, False, 197),
            (b16, 64, 2, False, False, False, 197),
            (b16, 128, 2, True, False, True, 197), (b16, 64, 0, True, True, True, 197),
            (b16, 64, 0, False, True, False, 197), (b16, 128, 0, False, True, False, 197),
            (b16, 64, 0, True, False, False, 197),
            (b16, 256, 0, False, False, False, 256), (b16, 256, 2, True, False, True, 197)]


def report(which: str = "static", arch: int = 90, verbose: bool = False) -> list[dict]:
    """One row per distinct compiled kernel of the set ``which`` (see variants)."""
    rows = []
    for what, variant, kernel, kw, options, compiled in aot_check.compile_variants(
            variants(which), arch, candidates=which == "candidates"):
        dtype, d, mk, causal, varlen, dropout, n = variant
        row = dict(kernel=kernel_label(kernel.__name__, kw), dtype=str(dtype)[6:], head_dim=d, mask=mk, causal=causal,
                   varlen=varlen, dropout=dropout, n=n, block_m=kw.get("BLOCK_M"), block_n=kw.get("BLOCK_N"),
                   num_warps=options["num_warps"], num_stages=options["num_stages"])
        if isinstance(compiled, Exception):
            row["error"] = f"{type(compiled).__name__}: {str(compiled).strip().splitlines()[-1:]}"
        else:
            row["shared"] = compiled.metadata.shared
            bm, bn = kw.get("BLOCK_M") or 1, kw.get("BLOCK_N") or 1
            row.update(analyse(compiled.asm["cubin"], options["num_warps"], bm, bn, row["kernel"], d, d))
        rows.append(row)
        if verbose:
            print(what, {k: row.get(k) for k in ("regs", "stack", "mma_kinds", "per_tile", "error")}, flush=True)
    return rows


def _cycles(c) -> str:
    return f"{c['tensor']}/{c['mufu']}/{c['issue']}" if c else ""


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | dtype | d | mask | causal | varlen | dropout | tile | warps | stages | regs | spill B | "
            "shared B | loop MMA | TMA | loop | per 128x64 tile | fast path per tile | cycles tensor/mufu/issue | "
            "peak fraction |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | | | | | | | | | | | "
                         f"error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['mask']} | {int(r['causal'])} | "
            f"{int(r['varlen'])} | {int(r['dropout'])} | {r['block_m']}x{r['block_n']} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['regs']} | {r['stack']} | {r['shared']} | {'+'.join(r['mma_kinds']) or '-'} | "
            f"{'yes' if r['tma'] else 'no'} | {r['loop_length']} | {r['per_tile']} | {r['fast_per_tile']} | "
            f"{_cycles(r.get('cycles'))} | {(r.get('cycles') or {}).get('peak_fraction') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=VARIANT_SETS, default="static", help="which variants (see variants())")
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200, 80: A100)")
    ap.add_argument("--json", help="write the rows (and the Triton version) as JSON here")
    ap.add_argument("--md", help="write the markdown table here (default: print it)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if aot_check.cuobjdump_path() is None:
        print("this Triton ships no cuobjdump: nothing to disassemble", file=sys.stderr)
        return 2
    import triton
    rows = report(args.set, args.arch, args.verbose)
    table = markdown(rows)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    else:
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, set=args.set, rows=rows), f, indent=1)
            f.write("\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
