// Software prefetch for the rows the kernels store to. Why: the outputs are [B, N, H, D] tensors, their rows
// (128-512 bytes) H·D elements apart, a few per 4 KB page, so the hardware's stream prefetchers never lock on and
// every row stored waits for its lines. The forward fetches an output row for writing while the last key tile's
// softmax runs (ViT-B/16 fp32 forward on an Intel Xeon AMX, model 167: the output stores were 8% of the kernel's
// samples; with the prefetch the forward is 5-8% faster, fp32 and bf16, 1-2 threads). The same for the dQ, dK and
// dV rows of the backward measured nothing outside the noise, so the backward has none.
#pragma once
#include <cstdint>

namespace vitkern_cpu {

// The lines of [p, p + bytes), for writing (prefetchw where the target has it).
inline void prefetch_for_write(const void* p, int64_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes);
  for (uintptr_t line = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); line < end; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line), 1, 3);
}

}  // namespace vitkern_cpu
