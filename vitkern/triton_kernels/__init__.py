"""Triton kernels of vitkern's ``triton`` backend (vitkern/backends/triton_backend.py).

One file per kernel family:
    attention_fwd.py   forward: online softmax, LSE out (dense, masked, packed varlen)
    attention_bwd.py   backward: dQ kernel (with the row statistics), dK/dV kernel (deterministic, no atomics)
    tile_ops.py        @triton.jit helpers shared by both (tile loads, masking, counter-based dropout)
    mask_summary.py    per-tile summary of a dense mask and each kernel's tile lists (full, partial; empty
                       tiles never visited), torch ops on device
    varlen_map.py      program -> (sequence, block) map for packed batches, built on device without a sync
    config.py          block sizes and launch parameters: the static table and the autotuner's candidates
    autotune.py        times the candidates once per key (never sequence lengths), caches the fastest
    aot_check.py       compiles every kernel variant for sm_90 without a GPU; reports shared memory and spills
    sass_report.py     the same builds' SASS: MMA kinds, instructions and unit-bound cycles per tile
    bench.py           GPU benchmark against torch SDPA (dense, ViT, NaViT packed, PiT 50k tokens)

Importing this package defines the kernels: set ``TRITON_INTERPRET=1`` before importing it to run them on CPU
tensors with Triton's interpreter.
"""
