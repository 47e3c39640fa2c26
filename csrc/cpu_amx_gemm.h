// Own AMX-BF16 tile product for the bf16 path (cpu_lowp_gemm.h's operand layouts): C[M, Np] (+)= A[M, Kp] · B,
// A row-major bf16, B packed VNNI in column panels (cpu_lowp_gemm.h: panel s of 32 columns, or 16 for the last,
// is [Kp/2][w][2] at element s * Kp), Kp a multiple of 32 (whole tile rows), Np of 16. Beside
// oneDNN's brgemm (lowp_gemm) and chosen by measurement (benchmarks/NOTES.md): no kernel-cache lookup per call, and the tile
// configuration is reloaded only when the row shape changes.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace vitkern_cpu {

// Whether this build carries the AMX kernel (the compiler knows the amx-tile/amx-bf16 targets).
bool amx_kernel_compiled();

// Requires Kp % 32 == 0, Np % 16 == 0, lda >= Kp and ldc >= Np; the caller checks that AMX runs (cpu_features).
void amx_gemm(int64_t M, int64_t Np, int64_t Kp, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
              float* c, int64_t ldc, bool add);

// Releases the tile state of this thread (tilerelease).
void amx_release();

}  // namespace vitkern_cpu
