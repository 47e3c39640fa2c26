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

// One 32-row strip of a product, C[32, Np] (+)= A[32, Kp] · B (B in the panels above), run a few 32-deep k-steps
// at a time (amx_advance) so that vector work can sit between its tile instructions in the instruction stream: the
// tile unit works through the queued tdpbf16ps while the vector units run the rest (measured on a Sapphire-Rapids
// class Xeon: 4 tdpbf16ps with 24 independent FMAs take as long as the 4 tdpbf16ps alone). A, B and C must hold
// all 32 rows. Until a started job finishes, the thread runs no other tile code: its accumulators stay in tmm0-3.
struct AmxStripJob {
  const c10::BFloat16* a = nullptr;
  int64_t lda = 0;
  const c10::BFloat16* b = nullptr;
  int64_t Np = 0, Kp = 0;
  float* c = nullptr;
  int64_t ldc = 0;
  bool add = false;
  int64_t col = 0, k = 0;  // progress: the current 32-column block and its next k
  // k-steps (each 2 or 4 tdpbf16ps) left to run.
  int64_t steps_left() const { return col >= Np ? 0 : ((Np - col + 31) / 32) * (Kp / 32) - k / 32; }
};

// Configures the thread's tiles for whole 32-row strips (amx_advance); checks the shapes of a job.
void amx_strips_begin();
void amx_check_strip(const AmxStripJob& job);

// Runs up to `steps` k-steps of the job.
void amx_advance(AmxStripJob& job, int64_t steps);

// Releases the tile state of this thread (tilerelease).
void amx_release();

}  // namespace vitkern_cpu
