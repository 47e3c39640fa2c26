// Builds the work lists. Costs are estimated so the heaviest items are handed out first (threads take items
// from a shared counter), which keeps two cores busy with uneven varlen blocks and causal triangles.
#include "cpu_attn_work.h"

#include <algorithm>

namespace vitkern_cpu {
namespace {

template <typename Item, typename Cost>
void heaviest_first(std::vector<Item>& items, Cost cost) {
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) { return cost(a) > cost(b); });
}

}  // namespace

std::vector<QueryTile> forward_work(const Problem& p, const SeqBlocks& blocks, Tiles t) {
  std::vector<QueryTile> items;
  for (int64_t s = 0; s < blocks.count(); ++s) {
    const int64_t qs = blocks.q[s], qe = blocks.q[s + 1], ks = blocks.k[s], ke = blocks.k[s + 1];
    const int64_t shift = ks - qs;  // causal inside a block: key - ks <= query - qs
    // A varlen block gets equal query tiles (864 -> 4 x 216, not 3 x 256 + 96). Dense inputs keep t.bm: the
    // mask summary's tile grid is built on it.
    const int64_t bm = p.varlen ? balanced(qe - qs, t.bm) : t.bm;
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.Hq; ++h)
        for (int64_t q0 = qs; q0 < qe; q0 += bm) {
          const int64_t q1 = std::min(qe, q0 + bm);
          int64_t k_hi = ke;
          if (p.causal) k_hi = std::max(ks, std::min(ke, q1 + shift));  // last query q1-1 sees keys < q1+shift
          items.push_back({b, h, q0, q1, ks, k_hi, shift, (q0 - qs) / bm});
        }
  }
  if (p.causal || p.varlen)
    heaviest_first(items, [](const QueryTile& w) { return (w.q1 - w.q0) * (w.k_hi - w.k_lo); });
  return items;
}

std::vector<KeyRange> backward_work(const Problem& p, const SeqBlocks& blocks, Tiles t, int64_t n_threads,
                                    int64_t* n_parts) {
  // One item per (batch, kv head, block) owns its keys' dK/dV outright; with too few of them for the threads,
  // a block's keys are split into chunks whose dQ contributions land in separate partial buffers.
  int64_t n_base = 0, longest_tiles = 0;
  for (int64_t s = 0; s < blocks.count(); ++s) {
    const int64_t nk = blocks.k[s + 1] - blocks.k[s];
    if (nk == 0 || blocks.q[s + 1] == blocks.q[s]) continue;
    n_base += p.B * p.Hk;
    longest_tiles = std::max(longest_tiles, (nk + t.bn - 1) / t.bn);
  }
  const int64_t want = 4 * n_threads;
  int64_t parts = 1;
  if (n_threads > 1 && n_base > 0 && n_base < want)
    parts = std::min(longest_tiles, (want + n_base - 1) / n_base);
  parts = std::max<int64_t>(parts, 1);
  *n_parts = parts;

  std::vector<KeyRange> items;
  for (int64_t s = 0; s < blocks.count(); ++s) {
    const int64_t qs = blocks.q[s], qe = blocks.q[s + 1], ks = blocks.k[s], ke = blocks.k[s + 1];
    if (ke == ks || qe == qs) continue;  // keys without queries keep zero gradients (set by the caller)
    const int64_t n_tiles = (ke - ks + t.bn - 1) / t.bn;
    const int64_t chunks = std::min(parts, n_tiles);
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t hk = 0; hk < p.Hk; ++hk)
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t k0 = ks + (n_tiles * c / chunks) * t.bn;
          const int64_t k1 = std::min(ke, ks + (n_tiles * (c + 1) / chunks) * t.bn);
          items.push_back({b, hk, k0, k1, qs, qe, ks - qs, c});
        }
  }
  heaviest_first(items, [&](const KeyRange& w) {
    int64_t q_span = w.q_hi - w.q_lo;
    if (p.causal) q_span = std::max<int64_t>(0, w.q_hi - std::max(w.q_lo, w.k0 - w.causal_shift));
    return (w.k1 - w.k0) * q_span;
  });
  return items;
}

}  // namespace vitkern_cpu
