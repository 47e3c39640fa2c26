// vitkern's own float32 tile GEMM for AVX2+FMA CPUs: a 6×16 register-blocked micro-kernel over B packed in
// 16-column panels (the BLIS layout for 16 ymm registers: 12 accumulators, two B vectors, one broadcast), and
// a 6×8 one for a last panel with at most 8 columns used (197 keys: 5 of the 13th panel's 16).
// The attention tiles are short in one dimension (k = head dim 64 for S = Q·Kᵀ, n = 64 for P·V): MKL reaches
// 54–64 GFLOP/s on them against 76 for a square product on one Zen 3 core; this kernel's loop does nothing but
// FMAs and loads, whatever the shape.
#pragma once
#include <cstdint>

#include "cpu_prefetch.h"

namespace vitkern_cpu {

// Row-major C[m, n] = alpha · op(A) · op(B) + beta · C on the calling thread, where op(A)(i, p) is
// a[i·lda + p] (a_trans: a[p·lda + i]) and op(B)(p, j) is b[p·ldb + j] (b_trans: b[j·ldb + p]). Takes m, n, k > 0
// and beta 0 (C is never read) or 1; cpu_blas.cpp's caller handles the rest. Only call when the CPU has AVX2 and FMA
// (cpu_features()).
void sgemm_avx2(bool a_trans, bool b_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// The same product with op(B) packed ahead, for a B that several products share (a key tile's K and V across
// the query tiles of a long sequence). sgemm_avx2_pack writes op(B)[k, n] (b_trans as above) as the kernel's
// 16-column panels, columns past n zero, into bp of sgemm_avx2_panels_size(n, k) floats; sgemm_avx2_packed
// computes C[m, n] = alpha · A[m, k] · op(B) + beta · C from them (A row-major, m, n, k > 0, beta 0 or 1),
// fetching the lines queued in `ahead` (if any) a few before each micro-kernel call: spread that thin, the
// fetches wait for a free miss buffer less often than a burst of them between softmax rows did.
int64_t sgemm_avx2_panels_size(int64_t n, int64_t k);
void sgemm_avx2_pack(bool b_trans, int64_t n, int64_t k, const float* b, int64_t ldb, float* bp);
void sgemm_avx2_packed(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* bp,
                       float beta, float* c, int64_t ldc, LinesAhead* ahead = nullptr);

}  // namespace vitkern_cpu
