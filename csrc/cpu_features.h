// Run-time CPU feature detection (cpuid, XCR0, Linux AMX tile permission) and the choice of tile-product path per
// dtype. One binary serves every x86-64: ISA-specific kernels are compiled with function-level target attributes
// and only called when the CPU (and the OS) has the features. VITKERN_CPU_PATH forces a path, for tests.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "cpu_blas.h"

namespace vitkern_cpu {

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512_bf16 = false,
       avx512_fp16 = false, amx_tile = false, amx_bf16 = false, amx_fp16 = false;
  bool avx512_os_enabled = false;  // XCR0 has the opmask and zmm state
  bool amx_os_enabled = false;     // XCR0 has the tile state and the kernel granted this process its use
  bool amd = false;                // vendor "AuthenticAMD": MKL runs its generic kernels there (fp32 GEMM choice)
};

// Detected once per process (the AMX permission request is made then).
const CpuFeatures& cpu_features();

// For the per-row dispatch of the bf16 paths' vector loops: a load, not a call, after the first use.
inline bool cpu_has_avx512_bf16() {
  static const bool has = cpu_features().avx512_bf16;
  return has;
}

// How a dtype's tile products run.
//   kFp32Blas   operands converted to float32, products through the BLAS (MKL sgemm): the fallback, every CPU;
//   kAvx512Bf16 bf16 operands, vdpbf16ps register-blocked micro-kernels with fp32 accumulation;
//   kAmxBf16    bf16 operands, oneDNN's brgemm ukernel inside libtorch, which runs on AMX tiles here.
enum class TilePath { kFp32Blas, kAvx512Bf16, kAmxBf16 };

const char* path_name(TilePath p);

// The float32 GEMM under kFp32Blas's tile products (Fp32Gemm, cpu_blas.h):
//   kBlas    libtorch's sgemm (MKL or OpenBLAS);
//   kAvx2    vitkern's own 6×16 AVX2+FMA micro-kernel (cpu_sgemm_avx2.h). On one Zen 3 core it runs the
//            attention tile shapes alone at 75–88 GFLOP/s where MKL gives 54–64; inside the kernel, round-robin
//            on a 2-core Zen 3, 0-22% faster than MKL in two of three sessions, the same in the third
//            (benchmarks/NOTES.md);
//   kAvx512  vitkern's own 6×64 AVX-512 micro-kernel (cpu_sgemm_avx512.h): the default where the CPU has
//            AVX-512F (21-28% faster than MKL inside the kernel on a 2-core Zen 4, benchmarks/NOTES.md).
// VITKERN_CPU_SGEMM=blas|avx2|avx512 forces one (an error if it cannot run here). Without AVX-512 the default is
// kAvx2 on an AMD CPU with AVX2+FMA, kBlas on others (MKL's own kernels for Intel CPUs; not measured against
// kAvx2), and kAvx2 wherever libtorch exports no sgemm (the plain loops are the last resort).
Fp32Gemm chosen_fp32_gemm();
// The float32 path's name as reported: fp32_blas, fp32_avx2 or fp32_avx512.
const char* fp32_path_name(Fp32Gemm g);
// Whether this CPU and this build can run the path for the dtype; if not, *why says why.
bool path_runs(TilePath p, at::ScalarType dt, std::string* why);
// The path the kernels take for inputs of dtype dt: VITKERN_CPU_PATH (fp32 | avx512_bf16 | amx) when set — an
// error if it cannot run here for that dtype — else the fastest that runs. float64 always computes in float64.
TilePath chosen_path(at::ScalarType dt);

// The last-level cache's size in bytes as the OS reports it (L3, else L2), 32 MiB when it reports none.
int64_t last_level_cache_bytes();

// {"compiled": [...], "cpu": {...}, "chosen": {"float32": ..., "bfloat16": ..., "float16": ...}} as JSON.
std::string cpu_features_json();

}  // namespace vitkern_cpu
