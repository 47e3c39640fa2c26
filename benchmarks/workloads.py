"""The attention problems the benchmark times, named after the systems they stand for (see
/work/shared/context/seed-systems.md and anchors.md), with batch sizes scaled to the device.

A workload expands into one or more ``Case``s. A dense case is q, k, v [B, H, N, D] with no mask. A packed case
(NaViT) is ``packs`` sequences of ``seqlen`` tokens, each holding several images plus end padding; queries attend
only to keys of their own segment (images, and the padding as one segment of its own), so every peer computes
the same block-diagonal problem and the useful work is the image blocks only.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

DEVICE_KINDS = ("cpu", "cuda")


@dataclass(frozen=True)
class Case:
    """One attention problem.

    dense:  q, k, v [batch, heads, seqlen, head_dim]
    packed: q, k, v [batch * seqlen, heads, head_dim] (batch = number of packs); ``packs`` holds, per pack, the
            image token counts; the rest of each pack (``pad``) is padding.
    """

    workload: str
    label: str
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    packs: Optional[tuple[tuple[int, ...], ...]] = None
    notes: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def packed(self) -> bool:
        return self.packs is not None

    @property
    def tokens(self) -> int:
        return self.batch * self.seqlen

    def pads(self) -> list[int]:
        return [self.seqlen - sum(p) for p in self.packs] if self.packed else []

    def segments(self) -> list[int]:
        """Segment lengths in packed order (images, then each pack's padding if any); they sum to ``tokens``."""
        out: list[int] = []
        for imgs, pad in zip(self.packs, self.pads()):
            out.extend(imgs)
            if pad:
                out.append(pad)
        return out

    def useful_pairs(self) -> int:
        """(query, key) pairs that carry information, summed over the batch, per head."""
        if self.packed:
            return sum(n * n for p in self.packs for n in p)
        return self.batch * self.seqlen * self.seqlen

    def computed_pairs_dense(self) -> int:
        """Pairs a dense (masked) implementation computes: the whole N x N of every batch entry."""
        return self.batch * self.seqlen * self.seqlen

    def useful_flops(self, mode: str) -> float:
        """4·D per useful pair per head for the forward (QK^T and PV); the backward does 2.5x that."""
        fwd = 4.0 * self.head_dim * self.useful_pairs() * self.heads
        return fwd * (3.5 if mode == "fwdbwd" else 1.0)

    def describe(self) -> dict:
        d = {"workload": self.workload, "label": self.label, "batch": self.batch, "heads": self.heads,
             "seqlen": self.seqlen, "head_dim": self.head_dim, "tokens": self.tokens,
             "useful_pairs_per_head": self.useful_pairs(),
             "useful_fraction": self.useful_pairs() / self.computed_pairs_dense()}
        if self.packed:
            d["images_per_pack"] = [len(p) for p in self.packs]
            d["image_tokens_min_max"] = [min(n for p in self.packs for n in p), max(n for p in self.packs for n in p)]
            d["padding_fraction"] = sum(self.pads()) / self.tokens
        d.update(self.notes)
        return d


def _dense(workload: str, batch: int, heads: int, seqlen: int, head_dim: int, **notes) -> Case:
    return Case(workload, f"B={batch} H={heads} N={seqlen} D={head_dim}", batch, heads, seqlen, head_dim,
                notes=notes)


def draw_navit_packs(n_packs: int, pack_len: int, min_side: int, max_side: int, patch: int = 16,
                     seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """Image token counts of ``n_packs`` packs of at most ``pack_len`` tokens, drawn as NaViT batches are.

    Each image: height uniform in [min_side, max_side] px, aspect ratio log-uniform in [1/2, 2], width clipped
    to the same range, both cut to whole ``patch``-px patches. Greedy first-fit: an image goes into the first
    pack with room; one that fits no pack waits for the next batch (dropped here). Drawing stops after 50 images
    in a row fit nowhere, so the packs end nearly full (NaViT reports under 2% padding).
    """
    rng = random.Random(seed)
    packs: list[list[int]] = [[] for _ in range(n_packs)]
    free = [pack_len] * n_packs
    misses = 0
    while misses < 50:
        h = rng.uniform(min_side, max_side)
        w = min(max(h * math.exp(rng.uniform(math.log(0.5), math.log(2.0))), min_side), max_side)
        n = (int(h) // patch) * (int(w) // patch)
        slot = next((i for i in range(n_packs) if free[i] >= n), None)
        if slot is None:
            misses += 1
            continue
        misses = 0
        packs[slot].append(n)
        free[slot] -= n
    return tuple(tuple(p) for p in packs)


def _navit(name: str, batch: int, heads: int, pack_len: int, min_side: int, max_side: int) -> Case:
    packs = draw_navit_packs(batch, pack_len, min_side, max_side)
    n_img = sum(len(p) for p in packs)
    return Case(name, f"{batch}x{pack_len} tok, {n_img} images, H={heads} D=64", batch, heads, pack_len,
                64, packs=packs, notes={"image_sides_px": [min_side, max_side], "patch": 16, "seed": 0})


def _fa3_grid(quick: bool) -> list[Case]:
    # The FlashAttention-3 paper's setting: batch·seq = 16k tokens, heads·dim = 2048.
    tokens, width = (2048, 256) if quick else (16384, 2048)
    seqs = (512,) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    dims = (64,) if quick else (64, 128)
    return [_dense("fa3-grid", tokens // n, width // d, n, d) for d in dims for n in seqs]


# Per device kind: the full sizes. The CPU sizes keep a full run on the 2-core dev machine near 15 minutes;
# the GPU sizes are those of the anchors (FA3 grid) and of training batches on one 80 GB GPU.
_SIZES = {
    "cpu": {"vit-b16": 32, "cct-7": 32, "pit-28": (8, 6), "pit-64": (1, 6), "pit-224": (1, 1),
            "navit-packed": (1, 12)},
    "cuda": {"vit-b16": 256, "cct-7": 256, "pit-28": (64, 6), "pit-64": (8, 6), "pit-224": (1, 6),
             "navit-packed": (32, 12)},
}


# Image sides (px) of the NaViT workloads: navit-packed draws NaViT's range (about 13% of the pairs of a pack are
# inside an image); navit-small draws small images, as the anchors' CPU measurement did (about 3%).
_NAVIT_SIDES = {"navit-packed": (64, 512), "navit-small": (64, 224)}


def build(name: str, device_kind: str, quick: bool = False) -> list[Case]:
    """The cases of workload ``name`` for a device kind ("cpu" or "cuda"); ``quick`` gives tiny smoke sizes
    (pit-224 keeps its 50,176 tokens: its cells are then mostly skipped by the memory and time predictions)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: expected one of {list(WORKLOADS)}, got {name!r}")
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device_kind: expected one of {DEVICE_KINDS}, got {device_kind!r}")
    s = _SIZES[device_kind]
    if name == "vit-b16":
        return [_dense(name, 2 if quick else s[name], 12, 197, 64, system="ViT-B/16 at 224 px")]
    if name == "cct-7":
        return [_dense(name, 2 if quick else s[name], 4, 256, 64, system="CCT-7/3x1 on 32x32")]
    if name in ("pit-28", "pit-64", "pit-224"):
        side = int(name.split("-")[1])
        b, h = (1, 2 if side == 28 else 1) if quick else s[name]
        return [_dense(name, b, h, side * side, 64, system=f"PiT, one token per pixel at {side}x{side}")]
    if name in _NAVIT_SIDES:
        lo, hi = _NAVIT_SIDES[name]
        if quick:
            return [_navit(name, 1, 2, 512, lo, min(hi, 160))]
        b, h = s["navit-packed"]
        return [_navit(name, b, h, 4096, lo, hi)]
    return _fa3_grid(quick)


WORKLOADS = {
    "vit-b16": "ViT-B/16: 197 tokens, 12 heads of 64, no mask",
    "cct-7": "CCT-7/3x1: 256 tokens, 4 heads of 64, small batch",
    "pit-28": "PiT at 28x28 px: 784 tokens",
    "pit-64": "PiT at 64x64 px: 4,096 tokens",
    "pit-224": "PiT at 224x224 px: 50,176 tokens (1 head on CPU); materialized attention cannot fit",
    "navit-packed": "NaViT packs of 4,096 tokens, images of 64-512 px sides (patch 16, aspect 1:2-2:1), "
                    "block-diagonal attention",
    "navit-small": "NaViT packs of 4,096 tokens, images of 64-224 px sides (about 3% of the pairs useful, the "
                   "anchors' CPU setting)",
    "fa3-grid": "FlashAttention-3 paper grid: batch·seq = 16k tokens, heads·dim = 2048, seq 512-16k, D 64/128",
}

DEFAULT_WORKLOADS = {
    "cpu": ["vit-b16", "cct-7", "pit-28", "pit-64", "pit-224", "navit-packed", "navit-small"],
    "cuda": ["vit-b16", "cct-7", "pit-28", "pit-64", "pit-224", "navit-packed", "navit-small", "fa3-grid"],
}
