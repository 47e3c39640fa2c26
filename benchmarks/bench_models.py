"""End-to-end cell: one training step (forward, backward, optimizer) of each example model and of a timm
ViT-B/16, with vitkern and without (torch SDPA), median wall time.

    python benchmarks/bench_models.py                 # CPU: small batches, about 3 minutes on 2 cores
    python benchmarks/bench_models.py --quick         # smoke run, seconds
    python benchmarks/bench_models.py --device cuda   # larger batches, bf16 autocast
    python benchmarks/bench_models.py --amp           # CPU under bf16 autocast (for CPUs with bf16 units)

"Without vitkern" is the same model with every attention on torch's SDPA: ``backend="torch"`` for the example
models (for NaViT's packed batch that means a dense block-diagonal bool mask over all packed tokens, what one
writes without a varlen kernel), and the unpatched timm model for ViT-B/16. Writes
benchmarks/results/models-<device>-<YYYYMMDD>.{json,md}. Also times NaViT's packing (pack_images) alone, to
show it is cheap next to the step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from cct import CCT  # noqa: E402
from navit import NaViT  # noqa: E402
from pit import PiT  # noqa: E402
from train import MODELS as TRAIN_MODELS  # noqa: E402
from vit import ViT  # noqa: E402

import vitkern  # noqa: E402
from benchmarks.measure import steady_allocator  # noqa: E402
from vitkern.navit import pack_images  # noqa: E402


def _navit_images(n: int, sides, patch: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    hw = torch.tensor(sides)[torch.randint(len(sides), (n, 2), generator=g)] * patch
    return [torch.randn(3, int(h), int(w), generator=g) for h, w in hw.tolist()]


def cells(device: str, quick: bool) -> list[dict]:
    """name, a model factory taking a backend, a batch factory, what the tokens look like."""
    cpu = device == "cpu"
    b = (lambda cpu_b, gpu_b: 2 if quick else (cpu_b if cpu else gpu_b))
    out = [
        dict(name="ViT-S/4 on 32x32 (65 tokens)", tokens="65",
             model=lambda be: ViT(img_size=32, patch_size=4, in_chans=3, dim=384, depth=2 if quick else 6,
                                  num_heads=6, mlp_ratio=4, backend=be),
             batch=lambda: torch.randn(b(32, 256), 3, 32, 32)),
        dict(name="CCT-7/3x1 on 32x32 (256 tokens)", tokens="256",
             model=lambda be: CCT(img_size=32, in_chans=3, dim=256, depth=2 if quick else 7, num_heads=4,
                                  mlp_ratio=2, conv_layers=1, kernel=3, backend=be),
             batch=lambda: torch.randn(b(16, 128), 3, 32, 32)),
        dict(name="PiT on 32x32 pixels (1,025 tokens)", tokens="1025",
             model=lambda be: PiT(img_size=32, in_chans=3, dim=192, depth=2 if quick else 4, num_heads=3,
                                  mlp_ratio=4, pos_embed="sincos", backend=be),
             batch=lambda: torch.randn(b(4, 64), 3, 32, 32)),
        dict(name="NaViT packed, 16-256 tokens per image", tokens="packed",
             model=lambda be: NaViT(patch_size=8, in_chans=3, dim=384, depth=2 if quick else 6, num_heads=6,
                                    mlp_ratio=4, max_tokens=1024, backend=be),
             batch=lambda: _navit_images(b(24, 256), (4, 8, 12, 16), 8), packed=True),
    ]
    # The CCT examples/train.py trains (8x8 digits: 64 tokens, 4 heads of 16), at its batch size.
    out.append(dict(name="CCT of examples/train.py (8x8 digits, 64 tokens)", tokens="64",
                    model=lambda be: TRAIN_MODELS["cct"](be),
                    batch=lambda: torch.randn(b(64, 256), 1, 8, 8)))
    try:
        import timm  # noqa: F401
        # ViT-Ti at batch 8 is issue 12's per-call-overhead cell: 3 heads of 64, so attention is a small share
        # of the step and any host cost per call shows.
        out.append(dict(name="timm ViT-Ti/16 224 (197 tokens)", tokens="197", timm=True,
                        model=lambda be: _timm_vit(be, quick, "vit_tiny_patch16_224"),
                        batch=lambda: torch.randn(b(8, 256), 3, 224, 224)))
        out.append(dict(name="timm ViT-B/16 224 (197 tokens)", tokens="197", timm=True,
                        model=lambda be: _timm_vit(be, quick),
                        batch=lambda: torch.randn(b(2, 64), 3, 224, 224)))
    except ImportError:
        pass
    return out


def _timm_vit(backend, quick: bool, name: str = "vit_base_patch16_224"):
    import timm

    from vitkern.integrations.timm import patch_timm
    model = timm.create_model(name, pretrained=False, depth=2 if quick else 12)
    if backend != "torch":
        patch_timm(model, backend=backend)
    return model


def _to(batch, device):
    if isinstance(batch, list):
        return [x.to(device) for x in batch]
    return batch.to(device)


class _Stepper:
    """One training step (forward, cross-entropy, backward, AdamW) of ``model`` on ``batch``, timed."""

    def __init__(self, model, batch, device: str, amp: bool):
        self.model, self.batch, self.device, self.amp = model.train(), batch, device, amp
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        n = len(batch) if isinstance(batch, list) else batch.shape[0]
        self.target = torch.randint(0, 10, (n,), device=device)

    def __call__(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(self.batch)
        loss = F.cross_entropy(logits.float()[:, :10], self.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def time_pair(steppers: dict, repeats: int, warmup: int) -> dict:
    """Median seconds per step of each stepper, their steps interleaved so that load from other processes on a
    shared machine hits both alike."""
    times = {k: [] for k in steppers}
    for i in range(warmup + repeats):
        for k, step in steppers.items():
            t = step()
            if i >= warmup:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny depths and batches, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per cell (default 5 CPU, 20 CUDA)")
    ap.add_argument("--only", default="", help="run only cells whose name contains this")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    repeats = args.repeats or (1 if args.quick else (5 if device == "cpu" else 20))
    warmup = 1 if args.quick else 2
    amp = device == "cuda" or args.amp
    allocator = steady_allocator() if device == "cpu" else None  # as bench_attn: see measure.steady_allocator
    rows = []
    for cell in cells(device, args.quick):
        if args.only and args.only not in cell["name"]:
            continue
        torch.manual_seed(0)
        batch = _to(cell["batch"](), device)
        base_model = cell["model"]("torch").to(device)
        ours_model = cell["model"](None).to(device)
        ours_model.load_state_dict(base_model.state_dict())
        row = {"cell": cell["name"], "tokens": cell["tokens"],
               "batch": len(batch) if isinstance(batch, list) else batch.shape[0]}
        medians = time_pair({"torch": _Stepper(base_model, batch, device, amp),
                             "vitkern": _Stepper(ours_model, batch, device, amp)}, repeats, warmup)
        for label, sec in medians.items():
            row[f"{label}_ms"] = 1000 * sec
        row["speedup"] = row["torch_ms"] / row["vitkern_ms"]
        if cell.get("packed"):
            pack_times = []
            for _ in range(3):
                t0 = time.perf_counter()
                packed = pack_images(batch, 8, 1024)
                pack_times.append(time.perf_counter() - t0)
            row["pack_ms"] = 1000 * min(pack_times)
            row["packed_tokens"] = int(packed.patches.shape[0])
            row["images"] = len(batch)
        rows.append(row)
        print(f"{row['cell']:40s} batch {row['batch']:4d}  torch {row['torch_ms']:9.1f} ms  vitkern "
              f"{row['vitkern_ms']:9.1f} ms  x{row['speedup']:.2f}"
              + (f"  (packing {row['pack_ms']:.1f} ms, {row['packed_tokens']} tokens)" if "pack_ms" in row
                 else ""), flush=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "vitkern_backends":
            vitkern.available_backends(), "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "amp_bf16": amp, "repeats": repeats, "quick": args.quick, "allocator": allocator,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"models-{device}-{datetime.now(timezone.utc):%Y%m%d}{'-bf16' if amp and device == 'cpu' else ''}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(_markdown(meta, rows))
    print(f"wrote {stem}.json and .md")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        return f"{name} ({os.cpu_count()} cores)"
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Training step, with and without vitkern ({meta['date']})", "",
             f"Device: {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, vitkern backends "
             f"{meta['vitkern_backends']}, 1-min load average at the end {meta['load_avg_1m']}, median of "
             f"{meta['repeats']} steps (the two variants' steps interleaved)" + (", bf16 autocast" if meta["amp_bf16"] else ", fp32") + "."
             + (f" Allocator: {meta['allocator']}." if meta.get("allocator") else ""), "",
             "| model | batch | torch SDPA (ms) | vitkern (ms) | speed-up |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['batch']} | {r['torch_ms']:.1f} | {r['vitkern_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    packed = [r for r in rows if "pack_ms" in r]
    if packed:
        lines += ["", "NaViT packing (pack_images, CPU): " + "; ".join(
            f"{r['images']} images -> {r['packed_tokens']} tokens in {r['pack_ms']:.1f} ms" for r in packed)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
