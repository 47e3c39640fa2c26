// In-register transposes of 32-bit words on AVX-512F, shared by the bf16 packing (a k-pair of bf16 is one word)
// and the float32 GEMM's Bᵀ panels. Function-level target attributes: callers carry the same or a wider target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define VITKERN_AVX512_TRANSPOSE 1
#define VITKERN_AVX512F_TARGET __attribute__((target("avx512f")))

namespace vitkern_cpu {

// r[i] holds row i of a 16 x 16 block on entry, column i on return. Three stages: 32-bit and 64-bit interleaves
// within 128-bit lanes, then two rounds of lane shuffles.
VITKERN_AVX512F_TARGET inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], lane L: column 4L + c of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44),
                  w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

inline __mmask16 first16(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
}

// dst[w * ld_dst + n] = word w of row n, for rows n < N of `words` 32-bit words each (row n starts at byte
// src + n * ld_src_bytes), and 0 for N <= n < round_up(N, 16): a [N][W] block transposed into [W][Np].
VITKERN_AVX512F_TARGET inline void transpose_words(const void* src, int64_t ld_src_bytes, int64_t words, int64_t N,
                                                   uint32_t* dst, int64_t ld_dst) {
  const char* s = static_cast<const char*>(src);
  __m512i r[16];
  for (int64_t n0 = 0; n0 < N; n0 += 16)
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const __mmask16 cols = first16(words - w0);
      // The next block's rows: the first touch of a head's K (or V) misses every cache, and 16 rows at a stride
      // are more streams than the hardware prefetcher follows (1-3% of a ViT-B/16 forward on a Zen 4).
      for (int i = 0; i < 16 && n0 + 16 + i < N; ++i)
        __builtin_prefetch(s + (n0 + 16 + i) * ld_src_bytes + 4 * w0, 0, 3);
      for (int i = 0; i < 16; ++i)
        r[i] = n0 + i < N ? _mm512_maskz_loadu_epi32(cols, s + (n0 + i) * ld_src_bytes + 4 * w0)
                          : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int64_t c = 0; c < std::min<int64_t>(16, words - w0); ++c)
        _mm512_storeu_si512(reinterpret_cast<void*>(dst + (w0 + c) * ld_dst + n0), r[c]);
    }
}

}  // namespace vitkern_cpu
#endif
