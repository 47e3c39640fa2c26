// The online softmax's exp pass for the bf16 paths: one read of a score row, P written straight into the bf16
// A operand of P·V (no float32 P row, no separate rounding pass), the row sum taken from the unrounded values as
// GPU flash kernels do. The scale and log2(e) fold into one FMA per score: x = s·c - b, P = 2^x.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu_lowp_gemm.h"

namespace vitkern_cpu {

// log2(e): the exp passes below take 2^(s·c - b), so callers fold scale·log2(e) into c and m·log2(e) into b.
constexpr float kLog2e = 1.44269504088896341f;

// dst[i] = bf16(2^(s[i]·c - b)) for i < n (nearest even; -inf and anything under 2^-126 give exactly 0, NaN stays
// NaN) and dst[n, n_padded) = 0. Returns the float32 sum of the unrounded values, in 32 interleaved partial sums.
// 2^x comes from a degree-4 polynomial on the reduced argument: relative error under 3e-6, far below the bf16
// rounding of P (2^-9) that follows it.
float exp2_row_to_bf16(const float* s, int64_t n, int64_t n_padded, float c, float b, c10::BFloat16* dst);

// One query row of the backward's pass below: its score and dP rows, b = lse·log2(e), delta, whether it has keys at
// all (live: else its P and dS are 0 whatever s and dp hold), and where its bf16 dS row goes (null: nowhere).
struct GradRow {
  const float* s;
  const float* dp;
  float b, delta;
  bool live;
  c10::BFloat16* ds;
};

// The backward's P and dS of rows k and k + 1 (k even) of a query tile in one pass over their score and dP rows,
// for the bf16 paths: P = 2^(s·c - b), dS = ds_factor · P · (dp - delta) with the unrounded P, as GPU flash
// kernels do, both rounded to bf16 (same 2^x and special values as above). dS goes to each row's bf16 row
// (ds_padded entries, zero past n) for dQ = dS·K, and P and dS of both rows straight into B operands packed for
// `layout` (p_pack, ds_pack: columns [0, layout.np), zero past n) for dVᵀ += dOᵀ·P and dKᵀ += Qᵀ·dS: the row
// pair is interleaved in registers, so no packing pass reads P and dS again.
void softmax_grad_pair_to_bf16(const GradRow& r0, const GradRow& r1, int64_t k, int64_t n, int64_t ds_padded,
                               float c, float ds_factor, const VnniLayout& layout, c10::BFloat16* p_pack,
                               c10::BFloat16* ds_pack);

}  // namespace vitkern_cpu
