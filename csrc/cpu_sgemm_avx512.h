// vitkern's own float32 tile GEMM for AVX-512 CPUs: 6 rows x 64 columns of C in 24 zmm accumulators, one
// broadcast of A and four 16-column loads of B per k step (24 FMAs to 10 loads). B is read in place when it is
// row-major; a transposed B (Kᵀ for S = Q·Kᵀ, Vᵀ for dP = dO·Vᵀ) is transposed once per call into a [k][n]
// panel. A transposed A (Pᵀ, dSᵀ for dV, dK) is broadcast from its columns in place: no copy at all.
#pragma once
#include <cstdint>

namespace vitkern_cpu {

// Whether this build carries the kernel (compiled with target attributes under any -march).
bool sgemm_avx512_compiled();

// Row-major C[m, n] = alpha · op(A) · op(B) + beta · C on the calling thread, where op(A)(i, p) is
// a[i·lda + p] (a_trans: a[p·lda + i]) and op(B)(p, j) is b[p·ldb + j] (b_trans: b[j·ldb + p]). Takes m, n, k > 0
// and beta 0 (C is never read) or 1; cpu_blas.cpp's caller handles the rest. Only call when the CPU and the OS
// have AVX-512F (cpu_features()).
void sgemm_avx512(bool a_trans, bool b_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace vitkern_cpu
