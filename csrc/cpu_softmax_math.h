// Row operations of the online softmax: max, exp-and-sum, scaling. The float max and exp loops have AVX-512
// (exp16) and AVX2+FMA (exp8) versions, picked by what the build targets; the generic loops are the fallback
// (GCC does not vectorize exp_poly's selects, so on an AVX2 build without exp8 they ran one lane at a time).
// exp is a Cephes-style polynomial (exp_poly, exp16; exp8 a table and a short polynomial), each within about one
// ulp, that returns exactly 0 for masked (-inf) scores, so masked keys contribute nothing, not 1e-38. Every version
// sums a row in 32 interleaved partial sums (by i % 32), reduced pairwise: a sequential float sum of a 197-score
// row is off by up to ~3.5 ulp, this by about one.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define VITKERN_STREAM_STORES 1
#else
#define VITKERN_STREAM_STORES 0
#endif

namespace vitkern_cpu {

inline float exp_poly(float x) {
  // Below this the true value is under the smallest normal float: treat as 0 (covers -inf).
  const bool underflow = x < -87.33654f;
  x = x > 88.37626f ? 88.37626f : x;
  x = x < -87.33654f ? -87.33654f : x;
  // Round to nearest by the 1.5 * 2^23 trick: a plain add/subtract pair, which vectorizes (floorf does not).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // x - n*ln2 in two pieces so the reduction is exact to float precision.
  float f = x - n * 0.693359375f;
  f = f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return underflow ? 0.0f : p * two_n;
}

inline double exp_poly(double x) { return std::exp(x); }

template <typename T>
inline T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename T>
inline bool has_nan(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return true;
  return false;
}

// x[i] = exp(x[i] - shift) in place; returns the sum, in 32 partial sums as the vector versions. shift finite.
template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T shift) {
  T part[32] = {};
  for (int64_t i = 0; i < n; ++i) {
    const T e = exp_poly(x[i] - shift);
    x[i] = e;
    part[i % 32] += e;
  }
  for (int w = 16; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

// x[i] = exp(x[i] - shift) in place, no sum (shift finite).
template <typename T>
inline void exp_shift(T* x, int64_t n, T shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_poly(x[i] - shift);
}

#if defined(__AVX512F__)
// 16 lanes of exp(x) for the softmax, where x = score - row max <= 0 or -inf: exp_poly's reduction and polynomial,
// with the 2^n scaling as one vscalefps. Lanes below -87.3 (-inf included) are zeroed by the write mask rather
// than left to underflow: an underflowing result costs a microcode assist of ~100 cycles on Intel cores, and a
// masked tile has many such lanes. That mask is also why x needs no clamp: a -inf lane's NaN reduction is never
// written, and above 88.4 vscalefps overflows to inf as exp does (no caller gets there: x <= 0). NaN propagates
// (the unordered compare keeps the lane). Dropping the two clamps was 2-3% of a ViT-B/16 fp32 forward on Zen 4.
inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// Two (exp-sum) or four (max) accumulators: one would chain every vector add or max of a row behind the
// previous one (4 cycles each), and a softmax row is short (197 scores = 13 vectors).
template <>
inline float exp_shift_sum<float>(float* x, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), sh));
    _mm512_storeu_ps(x + i, e0);
    _mm512_storeu_ps(x + i + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    _mm512_storeu_ps(x + i, e);
    acc0 = _mm512_add_ps(acc0, e);
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), tail, x + i);
    const __m512 e = exp16(_mm512_sub_ps(v, sh));  // the -inf lanes give 0: nothing added
    _mm512_mask_storeu_ps(x + i, tail, e);
    acc1 = _mm512_add_ps(acc1, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// NaN scores are skipped, as in the generic row_max (max_ps returns its second operand when either is NaN).
template <>
inline float row_max<float>(const float* x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(x + i), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(x + i + 16), m1);
    m2 = _mm512_max_ps(_mm512_loadu_ps(x + i + 32), m2);
    m3 = _mm512_max_ps(_mm512_loadu_ps(x + i + 48), m3);
  }
  for (; i + 16 <= n; i += 16) m0 = _mm512_max_ps(_mm512_loadu_ps(x + i), m0);
  if (i < n) m1 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, static_cast<__mmask16>((1u << (n - i)) - 1), x + i), m1);
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

template <>
inline void exp_shift<float>(float* x, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(x + i, tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + i), sh)));
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// 8 lanes of exp(x), x = score - row max <= 0 or -inf, as 2^(k/8) · e^f: k = round(x·8·log2e), f = x - k·ln2/8,
// |f| <= ln2/16. 2^(k/8) is 2^(k>>3) times 2^((k&7)/8) from an 8-entry table that fits one register (vpermps reads
// only an index's low 3 bits), so e^f needs just a degree-4 Taylor polynomial (under 0.01 ulp on |f| <= 0.0434).
// k comes from one FMA against 1.5·2^23 + 8·127, whose sum keeps k + 8·127 in its low mantissa bits: shifted up by
// 20 they give 2^(k>>3)'s exponent field plus (k&7) << 20, which exp8_table's entries subtract back out. 8 FMA-pipe
// operations instead of the degree-6 polynomial's 11 (0.80x the exp pass's time on Zen 3) and a tighter worst case:
// 0.88 ulp against 1.02, over every float in [-88, 0]. Lanes below -87.3 (-inf included) are zeroed by the mask,
// which is also why x needs no clamp: their garbage exponent is never kept. Valid for x <= 88 (callers: x <= 0).
// NaN propagates (the unordered compare keeps the lane, and f is NaN whatever the table returns).
// Entry j: the bits of 2^(j/8) rounded to float, minus 127 << 23 and j << 20.
alignas(32) inline constexpr int32_t exp8_table[8] = {0, -289342, -509968, -655657, -719629, -694486, -572163, -343865};

inline __m256 exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m256 shifter = _mm256_set1_ps(12582912.0f + 1016.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(8.0f * 1.44269504088896341f), shifter);
  const __m256 k = _mm256_sub_ps(t, shifter);
  // x - k·ln2/8 in two pieces: k·(0.693359375/8) is exact (9 + 11 bits), so only the small second term rounds.
  __m256 f = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f / 8), x);
  f = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f / 8), f);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 24), f, _mm256_set1_ps(1.0f / 6));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.5f));
  const __m256 r = _mm256_fmadd_ps(q, _mm256_mul_ps(f, f), f);  // e^f - 1
  const __m256i tbits = _mm256_castps_si256(t);
  const __m256i table = _mm256_load_si256(reinterpret_cast<const __m256i*>(exp8_table));
  const __m256i entry = _mm256_castps_si256(_mm256_permutevar8x32_ps(_mm256_castsi256_ps(table), tbits));
  const __m256 two_k8 = _mm256_castsi256_ps(_mm256_add_epi32(entry, _mm256_slli_epi32(tbits, 20)));
  // 2^(k/8) · (1 + r) in one rounding.
  return _mm256_and_ps(live, _mm256_fmadd_ps(two_k8, r, two_k8));
}

// Lanes [0, r) of 8 set (r < 8), as maskload/maskstore want them.
inline __m256i tail_mask8(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Four accumulators: 32 partial sums, and four independent add chains for a short row. Named, not an array: an
// array indexed by a run-time counter would live in memory.
template <>
inline float exp_shift_sum<float>(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  const auto step = [&](int64_t at, __m256& acc) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + at), sh));
    _mm256_storeu_ps(x + at, e);
    acc = _mm256_add_ps(acc, e);
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    step(i, a0);
    step(i + 8, a1);
    step(i + 16, a2);
    step(i + 24, a3);
  }
  if (i + 8 <= n) step(i, a0), i += 8;
  if (i + 8 <= n) step(i, a1), i += 8;
  if (i + 8 <= n) step(i, a2), i += 8;
  if (i < n) {
    const __m256i tail = tail_mask8(n - i);
    // Lanes past the row read as -inf: their exp is 0, nothing is added.
    const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                      _mm256_maskload_ps(x + i, tail), _mm256_castsi256_ps(tail));
    const __m256 e = exp8(_mm256_sub_ps(v, sh));
    _mm256_maskstore_ps(x + i, tail, e);
    a3 = _mm256_add_ps(a3, e);
  }
  return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
}

// NaN scores are skipped, as in the generic row_max (max_ps returns its second operand when either is NaN).
template <>
inline float row_max<float>(const float* x, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), m1);
    m2 = _mm256_max_ps(_mm256_loadu_ps(x + i + 16), m2);
    m3 = _mm256_max_ps(_mm256_loadu_ps(x + i + 24), m3);
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
  if (i < n) {
    const __m256i tail = tail_mask8(n - i);
    m1 = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_maskload_ps(x + i, tail), _mm256_castsi256_ps(tail)), m1);
  }
  return hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
}

template <>
inline void exp_shift<float>(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
  if (i < n) {
    const __m256i tail = tail_mask8(n - i);
    _mm256_maskstore_ps(x + i, tail, exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i, tail), sh)));
  }
}
#endif

// Streaming (non-temporal) stores of float rows: o[c] = x[c] · a written around the caches, then one
// stream_fence() before the rows are handed on. Where the build has no AVX2, can_stream_rows is false.
inline bool can_stream_rows(const float* base, int64_t n, int64_t row_stride) {
#if VITKERN_STREAM_STORES
  return n % 8 == 0 && reinterpret_cast<uintptr_t>(base) % 32 == 0 && row_stride % 8 == 0;
#else
  (void)base, (void)n, (void)row_stride;
  return false;
#endif
}

inline void stream_scaled_row(float* o, const float* x, int64_t n, float a) {
#if VITKERN_STREAM_STORES
  const __m256 va = _mm256_set1_ps(a);
  for (int64_t c = 0; c < n; c += 8) _mm256_stream_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(x + c), va));
#else
  for (int64_t c = 0; c < n; ++c) o[c] = x[c] * a;
#endif
}

inline void stream_fence() {
#if VITKERN_STREAM_STORES
  _mm_sfence();
#endif
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

template <typename T>
inline void fill_row(T* x, int64_t n, T v) {
  for (int64_t i = 0; i < n; ++i) x[i] = v;
}

}  // namespace vitkern_cpu
