// exp2_row_to_bf16 (cpu_lowp_softmax.h): an AVX-512 version (target attributes, chosen by cpuid) and a scalar one.
#include "cpu_lowp_softmax.h"

#include <algorithm>
#include <cmath>

#include "cpu_bf16_target.h"
#include "cpu_features.h"

namespace vitkern_cpu {
namespace {

// 2^f on [-1/2, 1/2]: a relative-error fit of degree 5 (least squares on Chebyshev nodes, re-weighted towards
// minimax); evaluated by Horner in float32 its error is 2.3e-7.
constexpr float kP0 = 1.0000001192092896f, kP1 = 0.6931469440460205f, kP2 = 0.24022120237350464f,
                kP3 = 0.05550713464617729f, kP4 = 0.009675540961325169f, kP5 = 0.001327641773968935f;
// Arguments below this give 0: 2^-126 is the smallest normal float, and a subnormal P would round to a bf16
// subnormal that contributes nothing measurable to a row whose largest P is 1.
constexpr float kMinArg = -126.0f;

float exp2_scalar(float x) {
  if (!(x >= kMinArg)) return x != x ? x : 0.0f;  // NaN stays NaN; -inf and underflow give 0
  const float n = std::nearbyint(x), f = x - n;
  float p = kP5;
  p = std::fma(p, f, kP4);
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

void softmax_grad_row_scalar(const float* s, const float* dp, int64_t n, int64_t n_padded, float c, float b,
                             float delta, float ds_factor, c10::BFloat16* p_dst, c10::BFloat16* ds_dst) {
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp2_scalar(std::fma(s[i], c, -b));
    p_dst[i] = c10::BFloat16(e);
    ds_dst[i] = c10::BFloat16(ds_factor * (e * (dp[i] - delta)));
  }
  for (int64_t i = n; i < n_padded; ++i) p_dst[i] = ds_dst[i] = c10::BFloat16(0.0f);
}

#if defined(VITKERN_LOWP_KERNELS)

// 16 lanes of 2^(s·c - b). Lanes under kMinArg (-inf included) are zeroed by the write mask of the final
// vscalefps, never computed as subnormals (a microcode assist on Intel cores); the unordered compare keeps NaN
// lanes live, and max returns its second operand when either is NaN, so NaN reaches the result.
VITKERN_BF16_TARGET inline __m512 exp2_16(__m512 s, __m512 c, __m512 nb) {
  __m512 x = _mm512_fmadd_ps(s, c, nb);
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMinArg), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(kMinArg), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kP5);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP4));
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

VITKERN_BF16_TARGET void softmax_grad_row_avx512(const float* s, const float* dp, int64_t n, int64_t n_padded,
                                                 float c, float b, float delta, float ds_factor,
                                                 c10::BFloat16* p_dst, c10::BFloat16* ds_dst) {
  const __m512 cv = _mm512_set1_ps(c), nbv = _mm512_set1_ps(-b), dl = _mm512_set1_ps(delta),
               f = _mm512_set1_ps(ds_factor);
  // A lambda does not inherit the function's target attribute: it needs its own, or a build without
  // -march=native support for AVX-512 cannot inline the intrinsics into it.
  const auto ds16 = [&](__m512 e, __m512 d) VITKERN_BF16_TARGET {
    return _mm512_mul_ps(f, _mm512_mul_ps(e, _mm512_sub_ps(d, dl)));
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp2_16(_mm512_loadu_ps(s + i), cv, nbv);
    const __m512 e1 = exp2_16(_mm512_loadu_ps(s + i + 16), cv, nbv);
    const __m512 d0 = ds16(e0, _mm512_loadu_ps(dp + i)), d1 = ds16(e1, _mm512_loadu_ps(dp + i + 16));
    _mm512_storeu_si512(reinterpret_cast<void*>(p_dst + i), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    _mm512_storeu_si512(reinterpret_cast<void*>(ds_dst + i), (__m512i)_mm512_cvtne2ps_pbh(d1, d0));
  }
  for (; i < n_padded; i += 16) {  // lanes past n are written as 0 whatever delta is
    const __mmask16 live = static_cast<__mmask16>((1u << std::max<int64_t>(0, std::min<int64_t>(16, n - i))) - 1);
    const __mmask16 width = static_cast<__mmask16>((1u << std::min<int64_t>(16, n_padded - i)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, exp2_16(_mm512_maskz_loadu_ps(live, s + i), cv, nbv));
    const __m512 d = _mm512_maskz_mov_ps(live, ds16(e, _mm512_maskz_loadu_ps(live, dp + i)));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p_dst + i), width, (__m256i)_mm512_cvtneps_pbh(e));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(ds_dst + i), width, (__m256i)_mm512_cvtneps_pbh(d));
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

void softmax_grad_row_to_bf16(const float* s, const float* dp, int64_t n, int64_t n_padded, float c, float b,
                              float delta, float ds_factor, c10::BFloat16* p_dst, c10::BFloat16* ds_dst) {
#if defined(VITKERN_LOWP_KERNELS)
  if (cpu_has_avx512_bf16()) return softmax_grad_row_avx512(s, dp, n, n_padded, c, b, delta, ds_factor, p_dst, ds_dst);
#endif
  softmax_grad_row_scalar(s, dp, n, n_padded, c, b, delta, ds_factor, p_dst, ds_dst);
}

}  // namespace vitkern_cpu
