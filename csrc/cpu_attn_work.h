// Work lists of the fused kernels: query tiles for the forward, key ranges for the backward, each with the key
// (query) range it may touch, so varlen and causal inputs visit only tiles inside their blocks.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu_attn_plan.h"

namespace vitkern_cpu {

// Queries [q0, q1) of head h in batch b attend to keys [k_lo, k_hi); causal: key j <= query i + causal_shift.
struct QueryTile {
  int64_t b, h, q0, q1, k_lo, k_hi, causal_shift, qt;
};

// Keys [k0, k1) of kv head hk in batch b receive gradient from queries [q_lo, q_hi) (each of the head's query
// group); their dQ contribution goes to partial buffer `part`.
struct KeyRange {
  int64_t b, hk, k0, k1, q_lo, q_hi, causal_shift, part;
};

std::vector<QueryTile> forward_work(const Problem& p, const SeqBlocks& blocks, Tiles t);

// n_parts: how many dQ partial buffers the list uses (> 1 when there are fewer kv heads · blocks than threads).
std::vector<KeyRange> backward_work(const Problem& p, const SeqBlocks& blocks, Tiles t, int64_t n_threads,
                                    int64_t* n_parts);

}  // namespace vitkern_cpu
