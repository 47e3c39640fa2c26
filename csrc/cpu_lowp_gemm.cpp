// bf16 tile products (see cpu_lowp_gemm.h): oneDNN's brgemm ukernel from libtorch (AMX on CPUs that have it) and
// own AVX512-BF16 micro-kernels. The micro-kernels and the vector conversions carry function-level target
// attributes, so a build without -march=native still has them and runs them only where cpuid says they work.
#include "cpu_lowp_gemm.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu_amx_gemm.h"
#include "cpu_avx512_transpose.h"
#include "cpu_bf16_target.h"

namespace vitkern_cpu {

bool lowp_kernels_compiled() {
#if defined(VITKERN_LOWP_KERNELS)
  return true;
#else
  return false;
#endif
}

bool brgemm_available() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  static const bool ok = [] {
    try {
      return at::native::cpublas::could_pack(at::kBFloat16);
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return ok;
#else
  return false;
#endif
}

namespace {

// Which AMX product runs where both can (Kp a multiple of 32): VITKERN_CPU_AMX_GEMM=brgemm|own, default own
// (benchmarks/NOTES.md: the measurement that chose it).
bool own_amx_kernel() {
  static const bool own = [] {
    const char* env = std::getenv("VITKERN_CPU_AMX_GEMM");
    if (!env || !std::strcmp(env, "own")) return true;
    TORCH_CHECK(!std::strcmp(env, "brgemm"), "VITKERN_CPU_AMX_GEMM: expected 'own' or 'brgemm', got '", env, "'");
    return false;
  }();
  return own;
}

void pack_vnni_transposed_scalar(const bf16* src, int64_t ld_src, int64_t K, int64_t N, bf16* dst) {
  // A pair of consecutive k of one row of src is one 32-bit word: the packing is a transpose of 32-bit words,
  // [N][K/2] -> [K/2][Np].
  const int64_t np = round_up(N, 16), pairs = (K + 1) / 2;
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t n = 0; n < N; ++n) {
    const bf16* row = src + n * ld_src;
    for (int64_t p = 0; p < K / 2; ++p) {
      uint32_t w;
      std::memcpy(&w, row + 2 * p, 4);
      d[p * np + n] = w;
    }
    if (K % 2) {  // odd K: the last pair's second half is zero
      uint16_t lo;
      std::memcpy(&lo, row + K - 1, 2);
      d[(pairs - 1) * np + n] = lo;
    }
  }
  for (int64_t p = 0; p < pairs; ++p) std::memset(d + p * np + N, 0, (np - N) * 4);
}

void pack_vnni_scalar(const bf16* src, int64_t ld_src, int64_t K, int64_t N, int64_t kp_multiple, bf16* dst) {
  const int64_t np = round_up(N, 16), kp = round_up(K, kp_multiple);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t k = 0; k < kp; ++k) {
    uint16_t* out = d + (k / 2) * np * 2 + (k % 2);
    if (k >= K) {
      for (int64_t n = 0; n < np; ++n) out[2 * n] = 0;
      continue;
    }
    const uint16_t* in = s + k * ld_src;
    for (int64_t n = 0; n < N; ++n) out[2 * n] = in[n];
    for (int64_t n = N; n < np; ++n) out[2 * n] = 0;
  }
}

}  // namespace

#if defined(VITKERN_LOWP_KERNELS)
namespace {

inline __mmask32 first32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1; }

// Even K: a k-pair is one 32-bit word, so the packing is a transpose of words [N][K/2] -> [K/2][Np].
VITKERN_BF16_TARGET void pack_vnni_transposed_avx512(const bf16* src, int64_t ld_src, int64_t K, int64_t N,
                                                     bf16* dst) {
  transpose_words(src, ld_src * int64_t(sizeof(bf16)), K / 2, N, reinterpret_cast<uint32_t*>(dst), round_up(N, 16));
}

// Row pairs (2p, 2p + 1) interleaved element by element, 32 columns per step; missing rows and columns are 0.
VITKERN_BF16_TARGET void pack_vnni_avx512(const bf16* src, int64_t ld_src, int64_t K, int64_t N,
                                          int64_t kp_multiple, bf16* dst) {
  const int64_t np = round_up(N, 16), kp = round_up(K, kp_multiple);
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < kp; k += 2) {
    bf16* out = dst + k * np;  // pair k / 2 starts at (k / 2) * np * 2
    for (int64_t n0 = 0; n0 < np; n0 += 32) {
      const __mmask32 live = first32(N - n0 > 0 ? N - n0 : 0);
      const __m512i a = k < K ? _mm512_maskz_loadu_epi16(live, src + k * ld_src + n0) : _mm512_setzero_si512();
      const __m512i b = k + 1 < K ? _mm512_maskz_loadu_epi16(live, src + (k + 1) * ld_src + n0) : _mm512_setzero_si512();
      _mm512_storeu_si512(reinterpret_cast<void*>(out + 2 * n0), _mm512_permutex2var_epi16(a, lo, b));
      if (n0 + 16 < np)
        _mm512_storeu_si512(reinterpret_cast<void*>(out + 2 * n0 + 32), _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// dst[c · ld_dst + r] = src[r · ld_src + c], 32 rows x 16 columns per step: each row pair becomes one vector of 16
// words (row 2i in the low half of each word, 2i + 1 in the high half), and the 16 pair vectors are transposed as
// words. Rows at or past `rows` read as zeros up to ld_dst (even).
VITKERN_BF16_TARGET void transpose_avx512(const bf16* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst,
                                          int64_t ld_dst) {
  alignas(64) static const uint16_t inter_idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i inter = _mm512_load_si512(inter_idx);
  const int64_t pairs = ld_dst / 2;
  const auto row = [&](int64_t ra, int64_t c0, __mmask16 live) VITKERN_BF16_TARGET {
    return ra < rows ? _mm256_maskz_loadu_epi16(live, src + ra * ld_src + c0) : _mm256_setzero_si256();
  };
  __m512i r[16];
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const __mmask16 live = first16(cols - c0);
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      for (int i = 0; i < 16; ++i) {
        const int64_t ra = 2 * (p0 + i);
        const __m512i pair = _mm512_inserti64x4(_mm512_castsi256_si512(row(ra, c0, live)), row(ra + 1, c0, live), 1);
        r[i] = _mm512_permutexvar_epi16(inter, pair);
      }
      transpose16x16_epi32(r);
      const __mmask16 words = first16(pairs - p0);
      for (int64_t c = 0; c < std::min<int64_t>(16, cols - c0); ++c)
        _mm512_mask_storeu_epi32(dst + (c0 + c) * ld_dst + 2 * p0, words, r[c]);
    }
  }
}

}  // namespace
#endif

namespace {

// One [Kp/2][Np][2] block (Kp >= K, even) of the transposed packing: the K/2 whole pairs, then zero pairs.
void pack_block_transposed(const bf16* src, int64_t ld_src, int64_t K, int64_t Kp, int64_t N, bf16* dst) {
  const int64_t np = round_up(N, 16);
#if defined(VITKERN_LOWP_KERNELS)
  if (K % 2 == 0 && cpu_has_avx512_bf16()) pack_vnni_transposed_avx512(src, ld_src, K, N, dst);
  else pack_vnni_transposed_scalar(src, ld_src, K, N, dst);
#else
  pack_vnni_transposed_scalar(src, ld_src, K, N, dst);
#endif
  const int64_t pairs = (K + 1) / 2;
  std::memset(dst + pairs * np * 2, 0, (Kp / 2 - pairs) * np * 2 * sizeof(bf16));
}

void pack_block(const bf16* src, int64_t ld_src, int64_t K, int64_t N, int64_t kp_multiple, bf16* dst) {
#if defined(VITKERN_LOWP_KERNELS)
  if (cpu_has_avx512_bf16()) return pack_vnni_avx512(src, ld_src, K, N, kp_multiple, dst);
#endif
  pack_vnni_scalar(src, ld_src, K, N, kp_multiple, dst);
}

}  // namespace

bool b_in_panels(TilePath path) { return path == TilePath::kAmxBf16 && amx_kernel_compiled() && own_amx_kernel(); }

int64_t head_pad(TilePath path) { return b_in_panels(path) ? 32 : 2; }

void pack_vnni_transposed(TilePath path, const bf16* src, int64_t ld_src, int64_t K, int64_t Kp, int64_t N,
                          bf16* dst) {
  if (!b_in_panels(path)) return pack_block_transposed(src, ld_src, K, Kp, N, dst);
  for (int64_t n0 = 0; n0 < N; n0 += 32)  // panel n0 is the block of keys [n0, n0 + 32)
    pack_block_transposed(src + n0 * ld_src, ld_src, K, Kp, std::min<int64_t>(32, N - n0), dst + n0 * Kp);
}

void pack_vnni(TilePath path, const bf16* src, int64_t ld_src, int64_t K, int64_t N, int64_t kp_multiple,
               bf16* dst) {
  if (!b_in_panels(path)) return pack_block(src, ld_src, K, N, kp_multiple, dst);
  const int64_t kp = round_up(K, kp_multiple);
  for (int64_t n0 = 0; n0 < N; n0 += 32)
    pack_block(src + n0, ld_src, K, std::min<int64_t>(32, N - n0), kp_multiple, dst + n0 * kp);
}

#if defined(VITKERN_LOWP_KERNELS)
namespace {

// C[MR rows, NV * 16 cols] (+)= A · B over Kp/2 k-pairs: MR x NV zmm accumulators, one vdpbf16ps per
// (row, vector, pair); A's pair is broadcast as one 32-bit word, B's 16 column pairs are one 64-byte load.
// Every loop over MR and NV is unrolled by pragma and ADD is a template argument: otherwise GCC keeps the
// accumulator array on the stack around the k loop (four extra zmm moves per accumulator per call, 10-15% of
// a 32-pair product). With ADD, C is read after the k loop, not before it: the first products then never wait
// on C (dQ rows in L2 or memory), 4-7% faster in a micro-benchmark of the backward's dQ update.
template <int MR, int NV, bool ADD>
VITKERN_BF16_TARGET void micro(int64_t pairs, const bf16* a, int64_t lda, const bf16* b, int64_t np, float* c,
                               int64_t ldc) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint32_t* aw = reinterpret_cast<const uint32_t*>(a);
  const int64_t lda_w = lda / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(b + (p * np + 16 * v) * 2));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(aw[r * lda_w + p]));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* cv = c + r * ldc + 16 * v;
      _mm512_storeu_ps(cv, ADD ? _mm512_add_ps(_mm512_loadu_ps(cv), acc[r][v]) : acc[r][v]);
    }
}

template <int MR, bool ADD>
VITKERN_BF16_TARGET void row_block(int64_t pairs, const bf16* a, int64_t lda, const bf16* b, int64_t np, float* c,
                                   int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + 64 <= np; n0 += 64) micro<MR, 4, ADD>(pairs, a, lda, b + n0 * 2, np, c + n0, ldc);
  switch ((np - n0) / 16) {
    case 3: micro<MR, 3, ADD>(pairs, a, lda, b + n0 * 2, np, c + n0, ldc); break;
    case 2: micro<MR, 2, ADD>(pairs, a, lda, b + n0 * 2, np, c + n0, ldc); break;
    case 1: micro<MR, 1, ADD>(pairs, a, lda, b + n0 * 2, np, c + n0, ldc); break;
    default: break;
  }
}

template <bool ADD>
VITKERN_BF16_TARGET void gemm_rows(int64_t M, int64_t np, int64_t pairs, const bf16* a, int64_t lda, const bf16* b,
                                   float* c, int64_t ldc) {
  // Rows in blocks of 6 (24 accumulators + 4 B vectors + 1 broadcast of the 32 zmm registers); the B panel
  // (Kp x Np bf16, 8-64 KB for attention tiles) stays in L1/L2 across row blocks.
  int64_t m0 = 0;
  for (; m0 + 6 <= M; m0 += 6) row_block<6, ADD>(pairs, a + m0 * lda, lda, b, np, c + m0 * ldc, ldc);
  const bf16* ar = a + m0 * lda;
  float* cr = c + m0 * ldc;
  switch (M - m0) {
    case 5: row_block<5, ADD>(pairs, ar, lda, b, np, cr, ldc); break;
    case 4: row_block<4, ADD>(pairs, ar, lda, b, np, cr, ldc); break;
    case 3: row_block<3, ADD>(pairs, ar, lda, b, np, cr, ldc); break;
    case 2: row_block<2, ADD>(pairs, ar, lda, b, np, cr, ldc); break;
    case 1: row_block<1, ADD>(pairs, ar, lda, b, np, cr, ldc); break;
    default: break;
  }
}

VITKERN_BF16_TARGET void gemm_avx512_bf16(int64_t M, int64_t np, int64_t kp, const bf16* a, int64_t lda,
                                          const bf16* b, float* c, int64_t ldc, bool add) {
  if (add) return gemm_rows<true>(M, np, kp / 2, a, lda, b, c, ldc);
  gemm_rows<false>(M, np, kp / 2, a, lda, b, c, ldc);
}

VITKERN_BF16_TARGET void round_row_avx512(const float* src, int64_t n, int64_t n_padded, bf16* dst, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i + 16), f),
                                            _mm512_mul_ps(_mm512_loadu_ps(src + i), f));
    _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), (__m512i)v);
  }
  for (; i < n_padded; i += 16) {
    const int64_t live = std::max<int64_t>(0, std::min<int64_t>(16, n - i));
    const int64_t width = std::min<int64_t>(16, n_padded - i);
    const __m512 x = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << live) - 1), src + i);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(x, f));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(dst + i), static_cast<__mmask16>((1u << width) - 1),
                             (__m256i)h);
  }
}

}  // namespace
#endif

void transpose_bf16(const bf16* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst, int64_t ld_dst) {
#if defined(VITKERN_LOWP_KERNELS)
  if (cpu_has_avx512_bf16()) return transpose_avx512(src, ld_src, rows, cols, dst, ld_dst);
#endif
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    for (int64_t r = rows; r < ld_dst; ++r) dst[c * ld_dst + r] = bf16(0.0f);
  }
}

void round_row_bf16(const float* src, int64_t n, int64_t n_padded, bf16* dst, float factor) {
#if defined(VITKERN_LOWP_KERNELS)
  if (cpu_has_avx512_bf16()) return round_row_avx512(src, n, n_padded, dst, factor);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16(src[i] * factor);  // c10 rounds to nearest even, keeps NaN
  for (int64_t i = n; i < n_padded; ++i) dst[i] = bf16(0.0f);
}

void lowp_gemm(TilePath path, int64_t M, int64_t Np, int64_t Kp, const bf16* a, int64_t lda, const bf16* b,
               float* c, int64_t ldc, bool add) {
  if (M == 0 || Np == 0) return;
  if (Kp == 0) {
    if (!add)
      for (int64_t r = 0; r < M; ++r) std::memset(c + r * ldc, 0, Np * sizeof(float));
    return;
  }
  if (path == TilePath::kAmxBf16) {
    if (b_in_panels(path)) return amx_gemm(M, Np, Kp, a, lda, b, c, ldc, add);
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
    return at::native::cpublas::brgemm(M, Np, Kp, lda, Np, ldc, add, a, b, c, /*is_vnni=*/true);
#endif
  }
#if defined(VITKERN_LOWP_KERNELS)
  if (path == TilePath::kAvx512Bf16) return gemm_avx512_bf16(M, Np, Kp, a, lda, b, c, ldc, add);
#endif
  TORCH_CHECK(false, "vitkern_cpu: tile path ", path_name(path), " is not compiled into this build");
}

void lowp_release(TilePath path) {
  if (path == TilePath::kAmxBf16) amx_release();
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if (path == TilePath::kAmxBf16) at::native::cpublas::brgemm_release(true);
#endif
}

}  // namespace vitkern_cpu
