// exp2_row_to_bf16 (cpu_lowp_softmax.h): an AVX-512 version (target attributes, chosen by cpuid) and a scalar one.
#include "cpu_lowp_softmax.h"

#include <algorithm>
#include <cmath>

#include "cpu_bf16_target.h"
#include "cpu_features.h"

namespace vitkern_cpu {
namespace {

// 2^f on [-1/2, 1/2]: a relative-error fit of degree 4 (least squares on Chebyshev nodes, re-weighted towards
// minimax); evaluated by Horner in float32 its error is 2.7e-6. Degree 4, not 5: P is rounded to bf16 (a relative
// error up to 2^-9 = 2.0e-3) and the row sum shares the same e values, so 2.7e-6 is invisible beside the rounding;
// the fifth FMA was 1 of the ~13 vector instructions per 16 scores of the softmax pass.
constexpr float kP0 = 0.9999992847442627f, kP1 = 0.6931217908859253f, kP2 = 0.2402474582195282f,
                kP3 = 0.05591785907745361f, kP4 = 0.00957008171826601f;
// Arguments below this give 0: 2^-126 is the smallest normal float, and a subnormal P would round to a bf16
// subnormal that contributes nothing measurable to a row whose largest P is 1.
constexpr float kMinArg = -126.0f;

float exp2_scalar(float x) {
  if (!(x >= kMinArg)) return x != x ? x : 0.0f;  // NaN stays NaN; -inf and underflow give 0
  const float n = std::nearbyint(x), f = x - n;
  float p = kP4;
  p = std::fma(p, f, kP3);
  p = std::fma(p, f, kP2);
  p = std::fma(p, f, kP1);
  p = std::fma(p, f, kP0);
  return std::ldexp(p, int(n));
}

float exp2_row_scalar(const float* s, int64_t n, int64_t n_padded, float c, float b, c10::BFloat16* dst) {
  float part[32] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp2_scalar(std::fma(s[i], c, -b));
    dst[i] = c10::BFloat16(e);
    part[i % 32] += e;
  }
  for (int64_t i = n; i < n_padded; ++i) dst[i] = c10::BFloat16(0.0f);
  for (int w = 16; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

void softmax_grad_pair_scalar(const GradRow& r0, const GradRow& r1, int64_t k, int64_t n, int64_t ds_padded, float c,
                              float ds_factor, const VnniLayout& layout, c10::BFloat16* p_pack,
                              c10::BFloat16* ds_pack) {
  const GradRow* rows[2] = {&r0, &r1};
  for (int t = 0; t < 2; ++t) {
    const GradRow& r = *rows[t];
    for (int64_t i = 0; i < std::max(ds_padded, layout.np); ++i) {
      float e = 0.0f, d = 0.0f;
      if (r.live && i < n) {
        e = exp2_scalar(std::fma(r.s[i], c, -r.b));
        d = ds_factor * (e * (r.dp[i] - r.delta));
      }
      if (r.ds && i < ds_padded) r.ds[i] = c10::BFloat16(d);
      if (i < layout.np) {
        p_pack[layout.offset(k + t, i)] = c10::BFloat16(e);
        ds_pack[layout.offset(k + t, i)] = c10::BFloat16(d);
      }
    }
  }
}

#if defined(VITKERN_LOWP_KERNELS)

// 16 lanes of 2^(s·c - b). Lanes under kMinArg (-inf included) are zeroed by the write mask of the final
// vscalefps, never computed as subnormals (a microcode assist on Intel cores). That mask is also why x needs no
// clamp: a -inf lane's NaN reduction (-inf - -inf) is never written, and no normal x gives a subnormal on the way.
// The unordered compare keeps NaN lanes live, so NaN reaches the result.
VITKERN_BF16_TARGET inline __m512 exp2_16(__m512 s, __m512 c, __m512 nb) {
  const __m512 x = _mm512_fmadd_ps(s, c, nb);
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMinArg), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kP4);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP0));
  return _mm512_maskz_scalef_ps(live, p, n);
}

VITKERN_BF16_TARGET float exp2_row_avx512(const float* s, int64_t n, int64_t n_padded, float c, float b,
                                                c10::BFloat16* dst) {
  const __m512 cv = _mm512_set1_ps(c), nbv = _mm512_set1_ps(-b);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp2_16(_mm512_loadu_ps(s + i), cv, nbv);
    const __m512 e1 = exp2_16(_mm512_loadu_ps(s + i + 16), cv, nbv);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
    _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  }
  // The tail in 16-lane pieces up to n_padded: lanes past n load -inf, so their P is 0 and adds nothing.
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (bool first = true; i < n_padded; i += 16, first = !first) {
    const int64_t live = std::max<int64_t>(0, std::min<int64_t>(16, n - i));
    const int64_t width = std::min<int64_t>(16, n_padded - i);
    const __m512 e = exp2_16(_mm512_mask_loadu_ps(ninf, static_cast<__mmask16>((1u << live) - 1), s + i), cv, nbv);
    if (first) acc0 = _mm512_add_ps(acc0, e);
    else acc1 = _mm512_add_ps(acc1, e);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(dst + i), static_cast<__mmask16>((1u << width) - 1),
                             (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

VITKERN_BF16_TARGET void softmax_grad_pair_avx512(const GradRow& r0, const GradRow& r1, int64_t k, int64_t n,
                                                  int64_t ds_padded, float c, float ds_factor,
                                                  const VnniLayout& layout, c10::BFloat16* p_pack,
                                                  c10::BFloat16* ds_pack) {
  // Lane 2j of the interleaved vector is column j of row k, lane 2j + 1 column j of row k + 1 (one k-pair word).
  alignas(64) static const uint16_t inter_idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i inter = _mm512_load_si512(inter_idx);
  const __m512 cv = _mm512_set1_ps(c), f = _mm512_set1_ps(ds_factor);
  const __m512 nb0 = _mm512_set1_ps(-r0.b), nb1 = _mm512_set1_ps(-r1.b);
  const __m512 dl0 = _mm512_set1_ps(r0.delta), dl1 = _mm512_set1_ps(r1.delta);
  const __mmask16 live0 = r0.live ? 0xFFFF : 0, live1 = r1.live ? 0xFFFF : 0;
  const int64_t end = std::max(ds_padded, layout.np);
  for (int64_t i = 0; i < end; i += 16) {
    const __mmask16 cols = static_cast<__mmask16>((1u << std::max<int64_t>(0, std::min<int64_t>(16, n - i))) - 1);
    const __mmask16 m0 = cols & live0, m1 = cols & live1;
    const __m512 e0 = _mm512_maskz_mov_ps(m0, exp2_16(_mm512_maskz_loadu_ps(m0, r0.s + i), cv, nb0));
    const __m512 e1 = _mm512_maskz_mov_ps(m1, exp2_16(_mm512_maskz_loadu_ps(m1, r1.s + i), cv, nb1));
    const __m512 d0 =
        _mm512_maskz_mul_ps(m0, f, _mm512_mul_ps(e0, _mm512_sub_ps(_mm512_maskz_loadu_ps(m0, r0.dp + i), dl0)));
    const __m512 d1 =
        _mm512_maskz_mul_ps(m1, f, _mm512_mul_ps(e1, _mm512_sub_ps(_mm512_maskz_loadu_ps(m1, r1.dp + i), dl1)));
    const __m512i dd = (__m512i)_mm512_cvtne2ps_pbh(d1, d0);  // row k's dS in the low half, row k + 1's high
    if (i < ds_padded) {
      const __mmask16 width = static_cast<__mmask16>((1u << std::min<int64_t>(16, ds_padded - i)) - 1);
      if (r0.ds) _mm256_mask_storeu_epi16(r0.ds + i, width, _mm512_castsi512_si256(dd));
      if (r1.ds) _mm256_mask_storeu_epi16(r1.ds + i, width, _mm512_extracti64x4_epi64(dd, 1));
    }
    if (i < layout.np) {  // np is a multiple of 16: the 16 columns are one run of 32 pair words
      const int64_t at = layout.offset(k, i);
      _mm512_storeu_si512(p_pack + at, _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(e1, e0)));
      _mm512_storeu_si512(ds_pack + at, _mm512_permutexvar_epi16(inter, dd));
    }
  }
}
#endif

}  // namespace

float exp2_row_to_bf16(const float* s, int64_t n, int64_t n_padded, float c, float b, c10::BFloat16* dst) {
#if defined(VITKERN_LOWP_KERNELS)
  if (cpu_has_avx512_bf16()) return exp2_row_avx512(s, n, n_padded, c, b, dst);
#endif
  return exp2_row_scalar(s, n, n_padded, c, b, dst);
}

void softmax_grad_pair_to_bf16(const GradRow& r0, const GradRow& r1, int64_t k, int64_t n, int64_t ds_padded,
                               float c, float ds_factor, const VnniLayout& layout, c10::BFloat16* p_pack,
                               c10::BFloat16* ds_pack) {
#if defined(VITKERN_LOWP_KERNELS)
  if (cpu_has_avx512_bf16())
    return softmax_grad_pair_avx512(r0, r1, k, n, ds_padded, c, ds_factor, layout, p_pack, ds_pack);
#endif
  softmax_grad_pair_scalar(r0, r1, k, n, ds_padded, c, ds_factor, layout, p_pack, ds_pack);
}

}  // namespace vitkern_cpu
