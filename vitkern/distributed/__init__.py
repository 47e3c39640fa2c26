"""Sequence-parallel attention on torch.distributed (LSS): a long token sequence split across ranks.

    sequence_parallel_attention   attention of this rank's queries against every rank's keys
                                  (mode "allgather_kv" or "ring")
    SequenceParallelAttention     the nn.Module (qkv, attention, projection) on a rank's shard
    shard_sequence, gather_sequence, shard_sizes, sum_over_ranks, all_reduce_gradients
                                  splitting/joining a sequence, pooling over it, gradient sync
    even_shard_sizes, clip_cu_seqlens                                    token-range arithmetic

NCCL on GPUs, gloo on CPU: whatever process group torch.distributed was initialized with.
"""
from .attention import sequence_parallel_attention
from .module import SequenceParallelAttention
from .sequence import all_reduce_gradients, gather_sequence, shard_sequence, shard_sizes, sum_over_ranks
from .shards import clip_cu_seqlens, even_shard_sizes

__all__ = ["sequence_parallel_attention", "SequenceParallelAttention", "shard_sequence", "gather_sequence",
           "shard_sizes", "sum_over_ranks", "all_reduce_gradients", "even_shard_sizes", "clip_cu_seqlens"]
