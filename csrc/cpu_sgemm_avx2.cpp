// The AVX2+FMA tile GEMM (see the header). Loops, outermost first: 256-column blocks of C, 256-deep slices of
// k (B's packed block, ≤ 256 KB, stays in L2), 6-row blocks of A, 16-column panels. A is read in place by
// broadcasts (6 rows × 256 floats: L1), so only B is packed.
#include "cpu_sgemm_avx2.h"

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu_prefetch.h"

#define VITKERN_AVX2_TARGET __attribute__((target("avx2,fma")))

namespace vitkern_cpu {
namespace {

constexpr int kMr = 6, kNr = 16;
constexpr int64_t kKc = 256, kNc = 256;

// dst[r·ldd + c] = src[c·lds + r] for an 8×8 block.
VITKERN_AVX2_TARGET inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[0..3] hold rows 0-3 of columns (0,1,2,3 | 4,5,6,7) split by 128-bit lane; r[4..7] rows 4-7.
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// B(k0 : k0 + kc, j0 : j0 + nc) into panels bp[panel][p][kNr], columns past n zero.
VITKERN_AVX2_TARGET void pack_b(bool b_trans, const float* b, int64_t ldb, int64_t k0, int64_t kc, int64_t j0,
                                int64_t nc, float* bp) {
  for (int64_t jp = 0; jp < nc; jp += kNr) {
    const int64_t w = std::min<int64_t>(kNr, nc - jp), j = j0 + jp;
    float* dst = bp + (jp / kNr) * kc * kNr;
    if (!b_trans) {
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = b + (k0 + p) * ldb + j;
        float* d = dst + p * kNr;
        if (w == kNr) {
          _mm256_storeu_ps(d, _mm256_loadu_ps(src));
          _mm256_storeu_ps(d + 8, _mm256_loadu_ps(src + 8));
        } else {
          for (int64_t c = 0; c < w; ++c) d[c] = src[c];
          for (int64_t c = w; c < kNr; ++c) d[c] = 0.0f;
        }
      }
    } else {
      // Column c of the panel is row j + c of b: 8×8 blocks transposed in registers, the rest one by one.
      int64_t p0 = 0;
      if (w == kNr)
        for (; p0 + 8 <= kc; p0 += 8)
          for (int half = 0; half < 2; ++half)
            transpose8x8(b + (j + 8 * half) * ldb + k0 + p0, ldb, dst + p0 * kNr + 8 * half, kNr);
      for (int64_t c = 0; c < w; ++c) {
        const float* src = b + (j + c) * ldb + k0;
        for (int64_t p = p0; p < kc; ++p) dst[p * kNr + c] = src[p];
      }
      for (int64_t c = w; c < kNr; ++c)
        for (int64_t p = p0; p < kc; ++p) dst[p * kNr + c] = 0.0f;
    }
  }
}

// Lanes [0, w) of 8 set, as maskload/maskstore want them.
VITKERN_AVX2_TARGET inline __m256i lanes_below(int64_t w) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(w, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// C[R, w] = alpha · A[R, kc] · Bp[kc, 16] (+ C when add), w ≤ 8·NV columns stored. NV = 1 reads only the first 8
// columns of each panel row: the last panel of a ragged n (197 keys: 5 of its 16 columns used) then costs 0.61 of
// a full call (6 FMAs a step against 12, still a broadcast per row), not a full one.
template <int R, bool ATrans, int NV>
VITKERN_AVX2_TARGET void micro_kernel(int64_t kc, const float* a, int64_t lda, const float* bp, float* c,
                                      int64_t ldc, float alpha, bool add, int64_t w) {
  static_assert(NV == 1 || NV == 2);
  __m256 acc[R][NV];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  // One step: acc[r] += A(r, p) · Bp[p, :8·NV], A(r, p) at ap[r · stride].
  const auto step = [&](const float* ap, int64_t stride, const float* b) VITKERN_AVX2_TARGET {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(ap + r * stride);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(x, bv[v], acc[r][v]);
    }
  };
  if constexpr (ATrans) {
    // A(i, p) = a[p·lda + i]: the R values of step p are adjacent.
    for (int64_t p = 0; p < kc; ++p, a += lda, bp += kNr) step(a, 1, bp);
  } else {
    for (int64_t p = 0; p < kc; ++p, bp += kNr) step(a + p, lda, bp);
  }
  const __m256 al = _mm256_set1_ps(alpha);
  if (w == 8 * NV) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        __m256 o = _mm256_mul_ps(acc[r][v], al);
        if (add) o = _mm256_add_ps(o, _mm256_loadu_ps(cr + 8 * v));
        _mm256_storeu_ps(cr + 8 * v, o);
      }
    }
    return;
  }
  __m256i m[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) m[v] = lanes_below(w - 8 * v);
  // Unrolled like every loop over acc: one indexed by a run-time r would keep the accumulators in memory.
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      __m256 o = _mm256_mul_ps(acc[r][v], al);
      if (add) o = _mm256_add_ps(o, _mm256_maskload_ps(cr + 8 * v, m[v]));
      _mm256_maskstore_ps(cr + 8 * v, m[v], o);
    }
  }
}

template <bool ATrans>
using MicroKernel = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, float, bool, int64_t);

// [rows][NV - 1]: the kernel for a block of `rows` rows of A and a panel of up to 8·NV columns.
template <bool ATrans>
constexpr MicroKernel<ATrans> kKernels[kMr + 1][2] = {
    {nullptr, nullptr},
    {micro_kernel<1, ATrans, 1>, micro_kernel<1, ATrans, 2>},
    {micro_kernel<2, ATrans, 1>, micro_kernel<2, ATrans, 2>},
    {micro_kernel<3, ATrans, 1>, micro_kernel<3, ATrans, 2>},
    {micro_kernel<4, ATrans, 1>, micro_kernel<4, ATrans, 2>},
    {micro_kernel<5, ATrans, 1>, micro_kernel<5, ATrans, 2>},
    {micro_kernel<6, ATrans, 1>, micro_kernel<6, ATrans, 2>}};

// C[m, nc] = alpha · op(A)[m, kc] · B (+ C when add), B's 16-column panels panel_stride floats apart from bp.
// ahead: `per_call` of its lines are fetched before each micro-kernel call.
template <bool ATrans>
VITKERN_AVX2_TARGET void run_panels(int64_t m, int64_t nc, int64_t kc, float alpha, const float* a, int64_t lda,
                                    const float* bp, int64_t panel_stride, bool add, float* c, int64_t ldc,
                                    LinesAhead* ahead = nullptr, int64_t per_call = 0) {
  for (int64_t i0 = 0; i0 < m; i0 += kMr) {
    const int64_t rows = std::min<int64_t>(kMr, m - i0);
    const float* ap = ATrans ? a + i0 : a + i0 * lda;
    for (int64_t jp = 0; jp < nc; jp += kNr) {
      if (ahead) ahead->issue(per_call);
      const int64_t w = std::min<int64_t>(kNr, nc - jp);
      kKernels<ATrans>[rows][w > 8](kc, ap, lda, bp + (jp / kNr) * panel_stride, c + i0 * ldc + jp, ldc, alpha,
                                    add, w);
    }
  }
}

template <bool ATrans>
VITKERN_AVX2_TARGET void blocked(bool b_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                 int64_t lda, const float* b, int64_t ldb, bool add_c, float* c, int64_t ldc) {
  thread_local std::vector<float> packed;
  packed.resize(kKc * kNc);
  for (int64_t j0 = 0; j0 < n; j0 += kNc) {
    const int64_t nc = std::min(kNc, n - j0);
    for (int64_t k0 = 0; k0 < k; k0 += kKc) {
      const int64_t kc = std::min(kKc, k - k0);
      pack_b(b_trans, b, ldb, k0, kc, j0, nc, packed.data());
      run_panels<ATrans>(m, nc, kc, alpha, ATrans ? a + k0 * lda : a + k0, lda, packed.data(), kc * kNr,
                         add_c || k0 > 0, c + j0, ldc);
    }
  }
}

}  // namespace

void sgemm_avx2(bool a_trans, bool b_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const bool add_c = beta != 0.0f;
  if (a_trans) return blocked<true>(b_trans, m, n, k, alpha, a, lda, b, ldb, add_c, c, ldc);
  blocked<false>(b_trans, m, n, k, alpha, a, lda, b, ldb, add_c, c, ldc);
}

int64_t sgemm_avx2_panels_size(int64_t n, int64_t k) { return (n + kNr - 1) / kNr * kNr * k; }

void sgemm_avx2_pack(bool b_trans, int64_t n, int64_t k, const float* b, int64_t ldb, float* bp) {
  pack_b(b_trans, b, ldb, 0, k, 0, n, bp);
}

// blocked()'s loops over panels packed once for the whole of k: a k-slice of a panel is a pointer offset.
void sgemm_avx2_packed(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* bp,
                       float beta, float* c, int64_t ldc, LinesAhead* ahead) {
  const int64_t calls = (m + kMr - 1) / kMr * ((n + kNr - 1) / kNr) * ((k + kKc - 1) / kKc);
  const int64_t per_call = ahead ? (ahead->lines() + calls - 1) / calls : 0;
  for (int64_t j0 = 0; j0 < n; j0 += kNc) {
    const int64_t nc = std::min(kNc, n - j0);
    for (int64_t k0 = 0; k0 < k; k0 += kKc)
      run_panels<false>(m, nc, std::min(kKc, k - k0), alpha, a + k0, lda, bp + (j0 / kNr) * k * kNr + k0 * kNr,
                        k * kNr, beta != 0.0f || k0 > 0, c + j0, ldc, ahead, per_call);
  }
}

}  // namespace vitkern_cpu
