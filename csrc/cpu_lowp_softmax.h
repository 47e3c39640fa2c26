// The online softmax's exp pass for the bf16 paths: one read of a score row, P written straight into the bf16
// A operand of P·V (no float32 P row, no separate rounding pass), the row sum taken from the unrounded values as
// GPU flash kernels do. The scale and log2(e) fold into one FMA per score: x = s·c - b, P = 2^x.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace vitkern_cpu {

// log2(e): the exp passes below take 2^(s·c - b), so callers fold scale·log2(e) into c and m·log2(e) into b.
constexpr float kLog2e = 1.44269504088896341f;

// dst[i] = bf16(2^(s[i]·c - b)) for i < n (nearest even; -inf and anything under 2^-126 give exactly 0, NaN stays
// NaN) and dst[n, n_padded) = 0. Returns the float32 sum of the unrounded values, in 32 interleaved partial sums.
// 2^x comes from a degree-5 polynomial on the reduced argument: relative error under 3e-7, far below the bf16
// rounding of P (2^-9) that follows it.
float exp2_row_to_bf16(const float* s, int64_t n, int64_t n_padded, float c, float b, c10::BFloat16* dst);

// The backward's row of P and dS in one pass over the score row s and the dP row dp, for the bf16 paths:
// P = 2^(s·c - b) (b = lse·log2(e)), p_dst = bf16(P), ds_dst = bf16(ds_factor · P · (dp - delta)) with the
// unrounded P, as GPU flash kernels do; both rows zero in [n, n_padded). Same 2^x and special values as above.
void softmax_grad_row_to_bf16(const float* s, const float* dp, int64_t n, int64_t n_padded, float c, float b,
                              float delta, float ds_factor, c10::BFloat16* p_dst, c10::BFloat16* ds_dst);

}  // namespace vitkern_cpu
