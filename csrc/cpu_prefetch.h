// Software prefetch: for the rows the kernels store to, and (LinesAhead) for the inputs of the next work item.
// Stores: the outputs are [B, N, H, D] tensors, their rows (128-512 bytes) H·D elements apart, a few per 4 KB
// page, so the hardware's stream prefetchers never lock on and every row stored waits for its lines. The forward
// fetches an output row for writing while the last key tile's softmax runs (ViT-B/16 fp32 forward on an Intel
// Xeon AMX, model 167: the output stores were 8% of the kernel's samples; with the prefetch the forward is 5-8%
// faster, fp32 and bf16, 1-2 threads). The same for the dQ, dK and dV rows of the backward measured nothing
// outside the noise, so the backward has none.
#pragma once
#include <cstdint>

namespace vitkern_cpu {

// The lines of [p, p + bytes), for writing (prefetchw where the target has it).
inline void prefetch_for_write(const void* p, int64_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes);
  for (uintptr_t line = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); line < end; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line), 1, 3);
}

// The lines of a few row ranges (the next work item's inputs), fetched a few at a time between pieces of the
// current item's work, so they arrive while it computes. Why: a query tile's K and V rows (and Q's) were read
// from memory by the first product that packs them, the core idle meanwhile: on a Zen 3 EPYC the packing
// passes were 11% of a ViT-B/16 fp32 forward's kernel samples, nearly all of it waiting on those loads. Reads
// are fetched with prefetcht1 (1-2% faster than prefetcht0 there: the fetches still stall on miss buffers now and
// then, the T0 ones more).
class LinesAhead {
 public:
  void clear() { n_ranges_ = k_ = r_ = 0, line_ = end_ = 0, lines_ = 0; }
  // rows rows of `bytes` bytes, `stride` bytes apart from p on (at most kMaxRanges ranges; more are dropped);
  // write: fetched for writing (prefetchw where the target has it).
  void add(const void* p, int64_t rows, int64_t stride, int64_t bytes, bool write = false) {
    if (n_ranges_ == kMaxRanges || rows <= 0 || bytes <= 0) return;
    ranges_[n_ranges_++] = {static_cast<const char*>(p), rows, stride, bytes, write};
    lines_ += rows * ((bytes + 63) / 64 + 1);
  }
  // An upper bound on the lines queued: what a caller spreads over its pieces of work.
  int64_t lines() const { return lines_; }
  // Up to n more lines of the queue, in order.
  void issue(int64_t n) {
    while (n > 0) {
      if (line_ < end_) {
        if (write_) __builtin_prefetch(reinterpret_cast<const void*>(line_), 1, 3);
        else __builtin_prefetch(reinterpret_cast<const void*>(line_), 0, 2);  // prefetcht1: see above
        line_ += 64, --n;
        continue;
      }
      if (k_ == n_ranges_) return;
      const Range& g = ranges_[k_];
      const uintptr_t row = reinterpret_cast<uintptr_t>(g.p + r_ * g.stride);
      line_ = row & ~uintptr_t(63), end_ = row + uintptr_t(g.bytes), write_ = g.write;
      if (++r_ == g.rows) ++k_, r_ = 0;
    }
  }

 private:
  static constexpr int kMaxRanges = 4;
  struct Range {
    const char* p;
    int64_t rows, stride, bytes;
    bool write;
  };
  Range ranges_[kMaxRanges];
  int n_ranges_ = 0, k_ = 0;
  int64_t r_ = 0, lines_ = 0;
  uintptr_t line_ = 0, end_ = 0;
  bool write_ = false;
};

}  // namespace vitkern_cpu
