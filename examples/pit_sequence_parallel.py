"""A pixel transformer (PiT: one token per pixel) trained one step with its pixels split across ranks.

At 224x224 one image is 50,176 tokens. Each rank keeps only its contiguous share of the pixels (and of the
learned position embedding) and runs every layer on it; attention reaches the other ranks' tokens through
``vitkern.distributed.sequence_parallel_attention`` (LSS: all-gather K/V, or the ring). The mean-pool over all
pixels is a differentiable all-reduce. Prints each rank's token count, peak memory and step time.

    torchrun --nproc-per-node 2 examples/pit_sequence_parallel.py --image-size 64
    torchrun --nproc-per-node 4 examples/pit_sequence_parallel.py --image-size 64 --mode ring --check
    torchrun --nproc-per-node 8 examples/pit_sequence_parallel.py --image-size 224 --dtype bfloat16   # GPUs

NCCL when CUDA is available (one GPU per rank), gloo on CPU. ``--check`` also runs the whole image on rank 0
alone in float32 and compares the loss and every gradient (small images only).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vitkern.distributed import (SequenceParallelAttention, all_reduce_gradients, shard_sequence, shard_sizes,
                                 sum_over_ranks)


class Block(nn.Module):
    """Pre-norm transformer block on a rank's tokens [T_r, C]."""

    def __init__(self, dim, heads, group, mode, backend):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SequenceParallelAttention(dim, heads, group=group, mode=mode, backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, shard_sizes):
        x = x + self.attn(self.norm1(x), shard_sizes=shard_sizes)
        return x + self.mlp(self.norm2(x))


class PixelTransformer(nn.Module):
    """image [3, S, S] -> logits [classes]; the S*S pixel tokens are split across ``group``'s ranks."""

    def __init__(self, image_size, dim, heads, depth, classes, group=None, mode="allgather_kv", backend=None):
        super().__init__()
        self.tokens, self.group = image_size * image_size, group
        self.embed = nn.Linear(3, dim)
        self.pos = nn.Parameter(torch.randn(self.tokens, dim) * 0.02)    # learned: LSS sums its gradient
        self.blocks = nn.ModuleList(Block(dim, heads, group, mode, backend) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, image):
        sizes = shard_sizes(self.tokens, self.group)
        pixels = shard_sequence(image.flatten(1).t(), self.group, sizes=sizes)   # this rank's [T_r, 3]
        x = self.embed(pixels) + shard_sequence(self.pos, self.group, sizes=sizes)
        for blk in self.blocks:
            # Every rank knows every shard's size (same rule everywhere): no per-layer exchange of shapes.
            x = blk(x, sizes)
        # Mean over every rank's pixels; the all-reduce's backward hands each rank the pooled gradient.
        pooled = sum_over_ranks(self.norm(x).sum(0), self.group) / self.tokens
        return self.head(pooled)


def release_freed_memory_to_the_os():
    """glibc keeps freed blocks up to a self-raising threshold in its heap, which hides freed tensors from the
    resident-set peak; a fixed mmap threshold makes every large tensor its own mapping, returned when freed."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the process's peak resident set (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def memory_mib(device, peak: bool) -> float:
    """Allocated (CUDA) or resident (CPU) memory of this process, now or its peak since the last reset."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / 2**20
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--mode", choices=["allgather_kv", "ring"], default="allgather_kv")
    ap.add_argument("--backend", default=None, help="vitkern backend (default: fastest available)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--check", action="store_true", help="compare with the whole image on rank 0 alone")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        release_freed_memory_to_the_os()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)   # same weights and image on every rank
    model = PixelTransformer(args.image_size, args.dim, args.heads, args.depth, args.classes, mode=args.mode,
                             backend=args.backend).to(device, dtype)
    image = torch.randn(3, args.image_size, args.image_size, device=device, dtype=dtype)
    label = torch.tensor([3], device=device)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(image)
        # Every rank computes the same loss; dividing by the world size makes the ranks' losses sum to it.
        loss = F.cross_entropy(logits.float()[None], label) / world
        loss.backward()
        all_reduce_gradients(model.parameters())
        return loss.detach() * world

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    base = memory_mib(device, peak=False)
    peak_memory_reset(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = memory_mib(device, peak=True)
    tokens = shard_sizes(model.tokens)[rank]
    line = (f"rank {rank}/{world}: {tokens} of {model.tokens} tokens, mode {args.mode}, loss {loss.item():.5f}, "
            f"step {seconds * 1e3:.1f} ms, peak {'allocated' if cuda else 'resident'} memory {peak:.0f} MiB "
            f"({peak - base:.0f} MiB above the model and data)")
    for r in range(world):   # one rank at a time, so lines do not interleave
        if r == rank:
            print(line, flush=True)
        dist.barrier()

    if args.check:
        # The whole image on rank 0 alone, in float32 (the reference for low-precision runs too).
        solo = dist.new_group([0])
        if rank == 0:
            ref = PixelTransformer(args.image_size, args.dim, args.heads, args.depth, args.classes, group=solo,
                                   backend=args.backend).to(device, torch.float32)
            ref.load_state_dict(model.state_dict())
            ref_loss = F.cross_entropy(ref(image.float())[None], label)
            ref_loss.backward()
            errors = {name: ((p.grad.float() - r.grad).norm() / r.grad.norm().clamp_min(1e-30)).item()
                      for (name, p), r in zip(model.named_parameters(), ref.parameters())}
            worst = max(errors, key=errors.get)
            print(f"check: loss {loss.item():.6f} vs single process (float32) {ref_loss.item():.6f}; largest "
                  f"relative gradient error {errors[worst]:.2e} ({worst})", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
