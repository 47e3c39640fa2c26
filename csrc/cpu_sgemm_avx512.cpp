// The AVX-512 tile GEMM (see the header). Loops, outermost first: 64-column blocks of C (the block's B, k x 64
// floats, 16 KB at k = 64, stays in L1 while every row block passes over it), 6-row blocks of A, the k loop.
// The last 16-column vector of a block is loaded and stored under a lane mask, so no shape needs padding.
#include "cpu_sgemm_avx512.h"

#include <algorithm>
#include <vector>

#include <c10/util/Exception.h>

#include "cpu_avx512_transpose.h"

namespace vitkern_cpu {

#if defined(VITKERN_AVX512_TRANSPOSE)
bool sgemm_avx512_compiled() { return true; }

namespace {

constexpr int kMr = 6, kNv = 4;

// C[MR, 16·NV] (+)= alpha · A · B over k steps, the last vector's lanes limited to `tail`. Every loop over MR and
// NV is unrolled by pragma and ADD is a template argument, so the accumulators stay in registers (GCC keeps an
// array indexed by a run-time counter on the stack); C is read after the k loop, never before it.
template <int MR, int NV, bool ATRANS, bool ADD>
VITKERN_AVX512F_TARGET void micro(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                  int64_t ldc, float alpha, __mmask16 tail) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NV];
    const float* bp = b + p * ldb;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      bv[v] = v + 1 < NV ? _mm512_loadu_ps(bp + 16 * v) : _mm512_maskz_loadu_ps(tail, bp + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ATRANS ? a[p * lda + r] : a[r * lda + p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* cv = c + r * ldc + 16 * v;
      const __mmask16 lanes = v + 1 < NV ? __mmask16(0xFFFF) : tail;
      __m512 x = _mm512_mul_ps(acc[r][v], al);
      if (ADD) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, cv));
      _mm512_mask_storeu_ps(cv, lanes, x);
    }
}

using Micro = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, float, __mmask16);

template <int MR, bool ATRANS, bool ADD>
constexpr Micro kByWidth[kNv + 1] = {nullptr, micro<MR, 1, ATRANS, ADD>, micro<MR, 2, ATRANS, ADD>,
                                     micro<MR, 3, ATRANS, ADD>, micro<MR, 4, ATRANS, ADD>};

template <bool ATRANS, bool ADD>
constexpr const Micro* kTable[kMr + 1] = {nullptr,
                                          kByWidth<1, ATRANS, ADD>,
                                          kByWidth<2, ATRANS, ADD>,
                                          kByWidth<3, ATRANS, ADD>,
                                          kByWidth<4, ATRANS, ADD>,
                                          kByWidth<5, ATRANS, ADD>,
                                          kByWidth<6, ATRANS, ADD>};

template <bool ATRANS, bool ADD>
VITKERN_AVX512F_TARGET void blocked(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                                    const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < n; j0 += 16 * kNv) {
    const int64_t cols = std::min<int64_t>(16 * kNv, n - j0), nv = (cols + 15) / 16;
    const __mmask16 tail = first16(cols - 16 * (nv - 1));
    for (int64_t i0 = 0; i0 < m; i0 += kMr) {
      const int64_t rows = std::min<int64_t>(kMr, m - i0);
      const float* ap = ATRANS ? a + i0 : a + i0 * lda;
      kTable<ATRANS, ADD>[rows][nv](k, ap, lda, b + j0, ldb, c + i0 * ldc + j0, ldc, alpha, tail);
    }
  }
}

}  // namespace

void sgemm_avx512(bool a_trans, bool b_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (b_trans) {  // Bᵀ rows [n][k] into a [k][np] panel, once per call
    thread_local std::vector<float> panel;
    const int64_t np = panel_ld(n);
    if (int64_t(panel.size()) < k * np) panel.resize(k * np);
    transpose_panel_f32(b, ldb, k, n, panel.data(), np);
    b = panel.data();
    ldb = np;
  }
  const bool add = beta != 0.0f;
  if (a_trans) {
    if (add) return blocked<true, true>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
    return blocked<true, false>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
  }
  if (add) return blocked<false, true>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
  blocked<false, false>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

void transpose_panel_f32(const float* src, int64_t ld_src, int64_t k, int64_t n, float* dst, int64_t ld_dst) {
  transpose_words(src, ld_src * int64_t(sizeof(float)), k, n, reinterpret_cast<uint32_t*>(dst), ld_dst);
}

#else
bool sgemm_avx512_compiled() { return false; }

void transpose_panel_f32(const float*, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "vitkern_cpu: this build has no AVX-512 float32 GEMM (compiler without the target)");
}

void sgemm_avx512(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float,
                  float*, int64_t) {
  TORCH_CHECK(false, "vitkern_cpu: this build has no AVX-512 float32 GEMM (compiler without the target)");
}
#endif

}  // namespace vitkern_cpu
