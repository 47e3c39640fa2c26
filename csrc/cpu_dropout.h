// The counter-based dropout hash of vitkern/dropout.py, bit for bit: whether score (row, col) of query head bh is
// kept depends only on (seed, bh, row, col), so the backward regenerates the forward's mask without storing it.
#pragma once
#include <cmath>
#include <cstdint>

namespace vitkern_cpu {

inline uint32_t dropout_mix(uint32_t x) {  // "lowbias32"
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool active = false;
  uint32_t seed = 0;
  uint32_t threshold = 0;  // hashed value below this: dropped
  double keep_scale = 1.0; // 1 / (1 - p), 0 when p >= 1

  Dropout(double p, int64_t seed_) {
    active = p > 0.0;
    seed = static_cast<uint32_t>(static_cast<uint64_t>(seed_) & 0xFFFFFFFFu);
    // Python: min(int(p * 2**32), 2**32 - 1), the product taken in double precision.
    const double t = std::floor(p * 4294967296.0);
    threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
    keep_scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  }

  // Per-row state: mix(mix(seed + bh * golden) ^ row).
  uint32_t row_state(int64_t bh, int64_t row) const {
    const uint32_t a = dropout_mix(seed + static_cast<uint32_t>(bh) * 0x9E3779B9u);
    return dropout_mix(a ^ static_cast<uint32_t>(row));
  }

  // Zeroes p[c] for the dropped columns col0 + c, c < n (keeps the others unscaled).
  template <typename T>
  void apply_row(T* p, int64_t n, uint32_t row_st, int64_t col0) const {
    const uint32_t thr = threshold;
    const uint32_t c0 = static_cast<uint32_t>(col0);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t u = dropout_mix(row_st + (c0 + static_cast<uint32_t>(c)) * 0x85EBCA6Bu);
      p[c] = u >= thr ? p[c] : T(0);
    }
  }
};

}  // namespace vitkern_cpu
