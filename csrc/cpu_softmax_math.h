// Row operations of the online softmax, written as simple loops the compiler vectorizes (AVX-512/AVX2 under
// -march=native): max, exp-and-sum, scaling. exp is a Cephes-style polynomial (about 1 ulp) that returns exactly
// 0 for masked (-inf) scores, so masked keys contribute nothing, not 1e-38.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

// x[i] = exp(x[i] - shift) in place; returns the sum. shift must be finite.
template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T shift) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const T e = exp_poly(x[i] - shift);
    x[i] = e;
    s += e;
  }
  return s;
}

// x[i] = exp(x[i] - shift) in place, no sum (shift finite).
template <typename T>
inline void exp_shift(T* x, int64_t n, T shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_poly(x[i] - shift);
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
