// The online softmax's exp pass for the bf16 paths: one read of a score row, P written straight into the bf16
// A operand of P·V (no float32 P row, no separate rounding pass), the row sum taken from the unrounded values as
// GPU flash kernels do. The scale and log2(e) fold into one FMA per score: x = s·c - b, P = 2^x.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace vitkern_cpu {

// dst[i] = bf16(2^(s[i]·c - b)) for i < n (nearest even; -inf and anything under 2^-126 give exactly 0, NaN stays
// NaN) and dst[n, n_padded) = 0. Returns the float32 sum of the unrounded values, in 32 interleaved partial sums.
// 2^x comes from a degree-5 polynomial on the reduced argument: relative error under 3e-7, far below the bf16
// rounding of P (2^-9) that follows it.
float exp2_row_to_bf16(const float* s, int64_t n, int64_t n_padded, float c, float b, c10::BFloat16* dst);

}  // namespace vitkern_cpu
