// Tile products on bfloat16 operands with float32 accumulation, for the reduced-precision paths of the fused
// CPU attention (cpu_features.h chooses the path). B operands are packed once per tile into the VNNI layout
// both the AMX tiles and vdpbf16ps read: pairs of consecutive k interleaved, [ceil(K/2)][Np][2] with Np the
// column count padded to 16 and the padding zeroed, so products never read past a tile and padded columns are 0.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu_features.h"

namespace vitkern_cpu {

using bf16 = c10::BFloat16;

// Whether this build carries the AVX512-BF16 micro-kernels (compiled with target attributes, any -march).
bool lowp_kernels_compiled();
// Whether libtorch's oneDNN brgemm ukernel accepts bfloat16 products on this CPU.
bool brgemm_available();

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Whether `path`'s B operands are packed in column panels (the own AMX kernel, cpu_amx_gemm.h): panel s of
// w = min(32, Np - s) columns is [Kp/2][w][2] at element s * Kp. Otherwise one [Kp/2][Np][2] block (oneDNN's
// brgemm, the vdpbf16ps kernels). Both take Kp * Np elements.
bool b_in_panels(TilePath path);
// What a reduction over the head dim is padded to on `path` (the A operand and B's k-pairs zero past D): 32, a
// whole AMX tile row, on the own AMX kernel; else 2, one k-pair.
int64_t head_pad(TilePath path);

// Where B[k, n] of a packed B operand (kp rows, np columns) lives, for writers that produce B directly (the
// backward's P and dS pairs): panel columns `panel` (32 in panels, np in one block), offset(k, n) in elements.
struct VnniLayout {
  int64_t kp = 0, np = 0, panel = 0;
  int64_t offset(int64_t k, int64_t n) const {
    const int64_t s = n / panel * panel, w = panel < np - s ? panel : np - s;
    return s * kp + (k / 2) * 2 * w + (n - s) * 2 + (k % 2);
  }
};
inline VnniLayout vnni_layout(TilePath path, int64_t kp, int64_t np) {
  return {kp, np, b_in_panels(path) ? 32 : np};
}

// Packs B[k, n] = src[n * ld_src + k] (B is the transpose of row-major src [N, K], e.g. K tile rows for Q·Kᵀ)
// for `path` with Kp >= K rows (even; rows past K zero) and Np = round_up(N, 16) columns (the padding zero).
void pack_vnni_transposed(TilePath path, const bf16* src, int64_t ld_src, int64_t K, int64_t Kp, int64_t N,
                          bf16* dst);
// Packs row-major B[k, n] = src[k * ld_src + n] (e.g. V rows for P·V) for `path` with Kp = round_up(K,
// kp_multiple) rows, the extra rows zero.
void pack_vnni(TilePath path, const bf16* src, int64_t ld_src, int64_t K, int64_t N, int64_t kp_multiple, bf16* dst);

// C[M, Np] (+)= A[M, Kp] · B where A is row-major bf16 (lda >= Kp, Kp even: callers pad A with zero columns)
// and B is packed by the functions above for `path`, Kp rows and Np = round_up(N, 16) columns. C is float32 with row stride ldc >= Np.
void lowp_gemm(TilePath path, int64_t M, int64_t Np, int64_t Kp, const bf16* a, int64_t lda, const bf16* b,
               float* c, int64_t ldc, bool add);

// Ends the thread's use of the AMX tile state (oneDNN keeps the tile configuration loaded between calls).
void lowp_release(TilePath path);

// Rounds n floats times factor to bf16 (one float product, then nearest even; NaN stays NaN) and zeroes
// dst[n, n_padded).
void round_row_bf16(const float* src, int64_t n, int64_t n_padded, bf16* dst, float factor = 1.0f);

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, and 0 for rows <= r < ld_dst (even): a bf16
// tile transposed into the A operand of a product reducing over its rows (Qᵀ·dS, dOᵀ·P in the backward).
void transpose_bf16(const bf16* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst, int64_t ld_dst);

}  // namespace vitkern_cpu
