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

// The row stride of a Bᵀ panel of n columns: n rounded up to 16, plus 16 when that is a multiple of 128 floats,
// so that the k rows a micro-kernel walks down do not all fall in the same L1 sets (1,024 keys: 4 KB apart).
inline int64_t panel_ld(int64_t n) {
  const int64_t np = (n + 15) / 16 * 16;
  return np % 128 == 0 ? np + 16 : np;
}

// dst[p · ld_dst + j] = src[j · ld_src + p] for p < k, j < n, and 0 for n <= j < round_up(n, 16): rows of Kᵀ
// (or Vᵀ) laid out as the row-major B that sgemm_avx512 reads in place. AVX-512F only, like the GEMM.
void transpose_panel_f32(const float* src, int64_t ld_src, int64_t k, int64_t n, float* dst, int64_t ld_dst);

}  // namespace vitkern_cpu
