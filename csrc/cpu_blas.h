// Row-major matrix products on tiles through the BLAS that libtorch already carries (MKL or OpenBLAS: sgemm_ /
// dgemm_ looked up once at load time), or, for float, vitkern's own micro-kernels (Fp32Gemm below); a plain-loop
// fallback keeps a build against a BLAS-less torch correct. All three helpers
// compute C = alpha * op(A) * op(B) + beta * C on row-major storage with leading dimensions (row strides)
// lda/ldb/ldc in elements.
#pragma once
#include <cstdint>

namespace vitkern_cpu {

// The float32 GEMM under the fp32 path's tile products (cpu_features.h chooses one): libtorch's BLAS, or
// vitkern's own micro-kernels, AVX2+FMA (cpu_sgemm_avx2.h) or AVX-512 (cpu_sgemm_avx512.h).
enum class Fp32Gemm { kBlas, kAvx2, kAvx512 };

// C[m, n] = alpha * A[m, k] * B[n, k]^T + beta * C
template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
             T* c, int64_t ldc, Fp32Gemm gemm = Fp32Gemm::kBlas);

// C[m, n] = alpha * A[m, k] * B[k, n] + beta * C
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
             T* c, int64_t ldc, Fp32Gemm gemm = Fp32Gemm::kBlas);

// C[m, n] = alpha * A[k, m]^T * B[k, n] + beta * C
template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
             T* c, int64_t ldc, Fp32Gemm gemm = Fp32Gemm::kBlas);

// Whether the products run on a real BLAS (false: the slow fallback loops).
bool have_blas();

// Keeps the BLAS single-threaded on the calling thread while alive: the kernels already run one tile per thread,
// and a BLAS that opens its own nested team on top of that oversubscribes the cores (MKL does for larger tiles).
class BlasSingleThreadScope {
 public:
  BlasSingleThreadScope();
  ~BlasSingleThreadScope();
  BlasSingleThreadScope(const BlasSingleThreadScope&) = delete;
  BlasSingleThreadScope& operator=(const BlasSingleThreadScope&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace vitkern_cpu
