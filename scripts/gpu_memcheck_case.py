"""One small forward + backward of one Triton kernel family, the program scripts/gpu_check.sh runs under
``compute-sanitizer --tool memcheck``.

    python scripts/gpu_memcheck_case.py FAMILY [FAMILY ...] [--device cuda|cpu]

FAMILY: dense (no mask, GQA), masked (a bool and a float mask, the float one with its gradient), varlen
(packed cu_seqlens with an empty sequence, causal), dropout (dense and varlen). Sizes are small but not tile
multiples, so every partial-tile edge is read. Prints ``FAMILY ok`` and exits 0 when each output and gradient
is finite and close to torch's math on the same inputs (a loose bf16 bound: this program looks for memory
errors, the test suite for accuracy); exits 1 otherwise. ``--device cpu`` runs the same code in Triton's
interpreter (set TRITON_INTERPRET=1; float16 there), to check this program without a GPU.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FAMILIES = ("dense", "masked", "varlen", "dropout")
# bf16 keeps 8 mantissa bits: outputs and gradients of these sizes land within a few 1e-2 of the math.
TOLERANCE = 0.1


def _rand(shape, dtype, device, gen, grad=True):
    return torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(grad)


def _run(fn, leaves, dout):
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, dout)


def _compare(name, got, want) -> list[str]:
    errors = []
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.float(), b.float()
        if not torch.isfinite(a).all():
            errors.append(f"{name}[{i}] has non-finite values")
            continue
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        if err > TOLERANCE:
            errors.append(f"{name}[{i}] max rel. error {err:.3g} > {TOLERANCE}")
    return errors


def _dense_case(dtype, device, gen, mask=None, dropout=False):
    import vitkern
    b, hq, hk, n, d = 2, 4, 2, 197, 64
    leaves = [_rand((b, hq, n, d), dtype, device, gen), _rand((b, hk, n, d), dtype, device, gen),
              _rand((b, hk, n, d), dtype, device, gen)]
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        leaves.append(mask)
    dout = torch.randn(b, hq, n, d, generator=gen).to(device, dtype)
    p = 0.1 if dropout else 0.0

    def ours(q, k, v, m=mask):
        return vitkern.scaled_dot_product_attention(q, k, v, m, dropout_p=p, enable_gqa=True, backend="triton")

    def theirs(q, k, v, m=mask):
        k, v = (x.repeat_interleave(hq // hk, dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                              m.float() if isinstance(m, torch.Tensor) and m.is_floating_point()
                                              else m)
    got = _run(ours, leaves, dout)
    if dropout:  # a different random keep-mask than torch's: only finiteness and shapes are checked
        return [f"dropout[{i}] has non-finite values" for i, x in enumerate(got) if not torch.isfinite(x).all()]
    want = _run(theirs, [x.detach().requires_grad_() for x in leaves], dout.float())
    return _compare("out/grads", got, want)


def _varlen_case(dtype, device, gen, dropout=False):
    import vitkern
    lens = [37, 0, 130, 1, 64]
    t, h, d = sum(lens), 3, 64
    cu = vitkern.lengths_to_cu_seqlens(lens, device=device)
    leaves = [_rand((t, h, d), dtype, device, gen) for _ in range(3)]
    dout = torch.randn(t, h, d, generator=gen).to(device, dtype)
    p = 0.1 if dropout else 0.0

    def ours(q, k, v):
        return vitkern.varlen_attention(q, k, v, cu, dropout_p=p, is_causal=not dropout, backend="triton")

    def theirs(q, k, v):
        outs, start = [], 0
        for n in lens:
            sl = slice(start, start + n)
            x = [y[sl].transpose(0, 1).float() for y in (q, k, v)]
            outs.append(F.scaled_dot_product_attention(*x, is_causal=True).transpose(0, 1) if n else
                        q[sl].float())
            start += n
        return torch.cat(outs, 0)
    got = _run(ours, leaves, dout)
    if dropout:
        return [f"varlen dropout[{i}] has non-finite values" for i, x in enumerate(got) if not torch.isfinite(x).all()]
    want = _run(theirs, [x.detach().requires_grad_() for x in leaves], dout.float())
    return _compare("varlen out/grads", got, want)


def run_family(family: str, device: str) -> list[str]:
    """The problems found in one family (empty: none)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(0)
    if family == "dense":
        return _dense_case(dtype, device, gen)
    if family == "masked":
        n = 197
        bool_mask = (torch.rand(n, n, generator=gen) > 0.4).to(device)
        bool_mask[:70, :64] = False        # whole empty tiles (skipped ones), no fully masked row
        float_mask = torch.randn(2, 1, n, n, generator=gen).to(device, dtype)
        float_mask = float_mask.masked_fill(torch.rand(2, 1, n, n, generator=gen).to(device) < 0.2, -math.inf)
        return _dense_case(dtype, device, gen, bool_mask) + \
            _dense_case(dtype, device, gen, float_mask.requires_grad_())
    if family == "varlen":
        return _varlen_case(dtype, device, gen)
    if family == "dropout":
        return _dense_case(dtype, device, gen, dropout=True) + _varlen_case(dtype, device, gen, dropout=True)
    raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="+", choices=FAMILIES, metavar="FAMILY", help=", ".join(FAMILIES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    failed = 0
    for family in args.families:
        problems = run_family(family, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        for p in problems:
            print(f"{family}: {p}", flush=True)
        print(f"{family} {'ok' if not problems else 'FAILED'}", flush=True)
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
