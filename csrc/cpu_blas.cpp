// Tile matrix products: BLAS from the already-loaded libtorch when it exports the Fortran symbols (it does with
// MKL and OpenBLAS builds), else straightforward loops. A row-major C[m, n] is the column-major C^T[n, m], so
// each helper calls the column-major routine with the operands swapped.
#include "cpu_blas.h"
#include "cpu_sgemm_avx2.h"
#include "cpu_sgemm_avx512.h"

#include <dlfcn.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <type_traits>

#include <c10/util/Exception.h>

namespace vitkern_cpu {
namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);

void* find_symbol(const char* name) {
  // libtorch_cpu (our dependency, so already loaded) first: its BLAS is the one torch itself uses; then the
  // process at large.
  if (void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD))
    if (void* p = dlsym(h, name)) return p;
  return dlsym(RTLD_DEFAULT, name);
}

using set_threads_local_fn = int (*)(int);

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  set_threads_local_fn mkl_threads_local = nullptr;  // MKL only; returns the previous setting
  Blas() {
    if (const char* off = std::getenv("VITKERN_CPU_NO_BLAS"); off && off[0] == '1') return;
    sgemm = reinterpret_cast<sgemm_fn>(find_symbol("sgemm_"));
    dgemm = reinterpret_cast<dgemm_fn>(find_symbol("dgemm_"));
    mkl_threads_local = reinterpret_cast<set_threads_local_fn>(find_symbol("MKL_Set_Num_Threads_Local"));
  }
};

const Blas& blas() {
  static const Blas b;
  return b;
}

template <typename T>
void call_colmajor(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                   int64_t ldb, T beta, T* c, int64_t ldc);

template <>
void call_colmajor<float>(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  blas().sgemm(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

template <>
void call_colmajor<double>(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                           int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  blas().dgemm(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

template <typename T>
bool use_blas(int64_t lda, int64_t ldb, int64_t ldc) {
  const bool have = std::is_same_v<T, float> ? blas().sgemm != nullptr : blas().dgemm != nullptr;
  // The Fortran interface takes 32-bit ints (LP64).
  return have && std::max({lda, ldb, ldc}) < INT_MAX;
}

// Fallback: C[m, n] = alpha * sum_p A(i, p) * B(p, j) + beta * C with element accessors given by strides.
template <typename T>
void loops(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_si, int64_t a_sp, const T* b,
           int64_t b_sp, int64_t b_sj, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == T(0) ? T(0) : beta * ci[j];
    for (int64_t p = 0; p < k; ++p) {
      const T aip = alpha * a[i * a_si + p * a_sp];
      const T* bp = b + p * b_sp;
      for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j * b_sj];
    }
  }
}

void own_sgemm(Fp32Gemm gemm, bool a_trans, bool b_trans, int64_t m, int64_t n, int64_t k, float alpha,
               const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // The kernels take m, n, k > 0 and beta 0 or 1.
  if (m <= 0 || n <= 0) return;
  if (beta != 0.0f && beta != 1.0f) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] *= beta;
    beta = 1.0f;
  }
  if (k <= 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  if (gemm == Fp32Gemm::kAvx512) return sgemm_avx512(a_trans, b_trans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  sgemm_avx2(a_trans, b_trans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace

bool have_blas() { return blas().sgemm != nullptr && blas().dgemm != nullptr; }

BlasSingleThreadScope::BlasSingleThreadScope() {
  if (blas().mkl_threads_local) previous_ = blas().mkl_threads_local(1);
}

BlasSingleThreadScope::~BlasSingleThreadScope() {
  // 0 restores "use the global setting", which is what a thread that never set a local value had.
  if (blas().mkl_threads_local && previous_ >= 0) blas().mkl_threads_local(previous_);
}

template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
             T* c, int64_t ldc, Fp32Gemm gemm) {
  if constexpr (std::is_same_v<T, float>)
    if (gemm != Fp32Gemm::kBlas) return own_sgemm(gemm, false, true, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (use_blas<T>(lda, ldb, ldc)) return call_colmajor<T>('T', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  loops<T>(m, n, k, alpha, a, lda, 1, b, 1, ldb, beta, c, ldc);
}

template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
             T* c, int64_t ldc, Fp32Gemm gemm) {
  if constexpr (std::is_same_v<T, float>)
    if (gemm != Fp32Gemm::kBlas) return own_sgemm(gemm, false, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (use_blas<T>(lda, ldb, ldc)) return call_colmajor<T>('N', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  loops<T>(m, n, k, alpha, a, lda, 1, b, ldb, 1, beta, c, ldc);
}

template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
             T* c, int64_t ldc, Fp32Gemm gemm) {
  if constexpr (std::is_same_v<T, float>)
    if (gemm != Fp32Gemm::kBlas) return own_sgemm(gemm, true, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (use_blas<T>(lda, ldb, ldc)) return call_colmajor<T>('N', 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  loops<T>(m, n, k, alpha, a, 1, lda, b, ldb, 1, beta, c, ldc);
}

#define VITKERN_GEMM_INSTANTIATE(T)                                                                         \
  template void gemm_nt<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*, int64_t, \
                           Fp32Gemm);                                                                         \
  template void gemm_nn<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*, int64_t, \
                           Fp32Gemm);                                                                         \
  template void gemm_tn<T>(int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*, int64_t, \
                           Fp32Gemm);
VITKERN_GEMM_INSTANTIATE(float)
VITKERN_GEMM_INSTANTIATE(double)
#undef VITKERN_GEMM_INSTANTIATE

}  // namespace vitkern_cpu
