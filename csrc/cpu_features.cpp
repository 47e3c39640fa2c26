// cpuid / xgetbv probing and the per-dtype tile-path choice (see cpu_features.h).
#include "cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define VITKERN_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <torch/library.h>

#include "cpu_blas.h"
#include "cpu_amx_gemm.h"
#include "cpu_lowp_gemm.h"
#include "cpu_sgemm_avx512.h"

namespace vitkern_cpu {
namespace {

#if defined(VITKERN_X86)
uint64_t xgetbv0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux keeps AMX tile data off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(VITKERN_X86)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  f.amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "Auth" "enti" "cAMD"
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  f.avx512_os_enabled = (xcr0 & 0xE6) == 0xE6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm_os && ((b >> 5) & 1);
  f.fma = f.fma && ymm_os;
  const bool z = f.avx512_os_enabled;
  f.avx512f = z && ((b >> 16) & 1);
  f.avx512bw = z && ((b >> 30) & 1);
  f.avx512vl = z && ((b >> 31) & 1);
  f.avx512_fp16 = z && ((d >> 23) & 1);
  f.amx_bf16 = (d >> 22) & 1;
  f.amx_tile = (d >> 24) & 1;
  const unsigned max_sub = a;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512_bf16 = z && ((a >> 5) & 1);
    f.amx_fp16 = (a >> 21) & 1;
  }
  const bool tile_state = (xcr0 & (uint64_t(3) << 17)) == (uint64_t(3) << 17);
  f.amx_os_enabled = f.amx_tile && tile_state && request_amx_permission();
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* path_name(TilePath p) {
  switch (p) {
    case TilePath::kFp32Blas: return "fp32_blas";
    case TilePath::kAvx512Bf16: return "avx512_bf16";
    case TilePath::kAmxBf16: return "amx_bf16";
  }
  return "?";
}

bool path_runs(TilePath p, at::ScalarType dt, std::string* why) {
  const CpuFeatures& f = cpu_features();
  const auto no = [&](const char* reason) {
    if (why) *why = reason;
    return false;
  };
  if (p == TilePath::kFp32Blas) return true;
  if (dt != at::kBFloat16) return no("only bfloat16 inputs have a reduced-precision path");
  if (p == TilePath::kAvx512Bf16) {
    if (!lowp_kernels_compiled()) return no("this build has no AVX512-BF16 kernels (compiler without the target)");
    if (!(f.avx512f && f.avx512bw && f.avx512vl && f.avx512_bf16))
      return no("the CPU (or the OS) lacks AVX512F/BW/VL + AVX512_BF16");
    return true;
  }
  if (!b_in_panels(TilePath::kAmxBf16) && !brgemm_available())
    return no("neither the own AMX kernel (compiler without amx-tile/amx-bf16, or VITKERN_CPU_AMX_GEMM=brgemm) nor "
              "libtorch's oneDNN brgemm ukernel is usable for bfloat16 here");
  if (!(f.amx_bf16 && f.amx_os_enabled)) return no("the CPU lacks AMX-BF16 or the OS did not grant tile use");
  return true;
}

Fp32Gemm chosen_fp32_gemm() {
  const CpuFeatures& f = cpu_features();
  const bool avx2_runs = f.avx2 && f.fma, avx512_runs = f.avx512f && sgemm_avx512_compiled();
  if (const char* env = std::getenv("VITKERN_CPU_SGEMM"); env && env[0]) {
    if (!std::strcmp(env, "blas")) return Fp32Gemm::kBlas;
    if (!std::strcmp(env, "avx512")) {
      TORCH_CHECK(avx512_runs, "VITKERN_CPU_SGEMM=avx512: that GEMM cannot run here: ",
                  sgemm_avx512_compiled() ? "the CPU (or the OS) lacks AVX-512F" : "this build lacks it");
      return Fp32Gemm::kAvx512;
    }
    TORCH_CHECK(!std::strcmp(env, "avx2"), "VITKERN_CPU_SGEMM: expected blas, avx2 or avx512, got '", env, "'");
    TORCH_CHECK(avx2_runs, "VITKERN_CPU_SGEMM=avx2: that GEMM cannot run here: the CPU (or the OS) lacks AVX2+FMA");
    return Fp32Gemm::kAvx2;
  }
  // AVX-512: the own kernel, measured 21-28% faster than MKL in the kernel on a 2-core Zen 4 (benchmarks/NOTES.md).
  // AVX2 only: on AMD the own AVX2 kernel (0-22% ahead of MKL in-kernel on a Zen 3), elsewhere the BLAS; that
  // kernel wherever there is no BLAS.
  if (avx512_runs) return Fp32Gemm::kAvx512;
  return avx2_runs && (f.amd || !have_blas()) ? Fp32Gemm::kAvx2 : Fp32Gemm::kBlas;
}

const char* fp32_path_name(Fp32Gemm g) {
  switch (g) {
    case Fp32Gemm::kAvx2: return "fp32_avx2";
    case Fp32Gemm::kAvx512: return "fp32_avx512";
    case Fp32Gemm::kBlas: break;
  }
  return "fp32_blas";
}

TilePath chosen_path(at::ScalarType dt) {
  if (const char* env = std::getenv("VITKERN_CPU_PATH"); env && env[0]) {
    TilePath p;
    if (!std::strcmp(env, "fp32")) p = TilePath::kFp32Blas;
    else if (!std::strcmp(env, "avx512_bf16")) p = TilePath::kAvx512Bf16;
    else if (!std::strcmp(env, "amx")) p = TilePath::kAmxBf16;
    else TORCH_CHECK(false, "VITKERN_CPU_PATH: expected fp32, avx512_bf16 or amx, got '", env, "'");
    // A forced reduced-precision path only concerns bf16 inputs; other dtypes keep their own path.
    if (dt != at::kBFloat16) return TilePath::kFp32Blas;
    std::string why;
    TORCH_CHECK(path_runs(p, dt, &why), "VITKERN_CPU_PATH=", env, ": that path cannot run here: ", why);
    return p;
  }
  if (dt == at::kBFloat16) {
    for (TilePath p : {TilePath::kAmxBf16, TilePath::kAvx512Bf16})
      if (path_runs(p, dt, nullptr)) return p;
  }
  return TilePath::kFp32Blas;
}

std::string cpu_features_json() {
  const CpuFeatures& f = cpu_features();
  std::ostringstream o;
  o << "{\"compiled\": [\"fp32_blas\", \"fp32_avx2\"";
  if (sgemm_avx512_compiled()) o << ", \"fp32_avx512\"";
  if (lowp_kernels_compiled()) o << ", \"avx512_bf16\"";
  if (amx_kernel_compiled() || brgemm_available()) o << ", \"amx_bf16\"";
  o << "], \"amx_gemm\": \"" << (b_in_panels(TilePath::kAmxBf16) ? "own" : "brgemm") << "\", \"cpu\": {";
  const std::pair<const char*, bool> flags[] = {
      {"avx2", f.avx2}, {"fma", f.fma}, {"avx512f", f.avx512f}, {"avx512bw", f.avx512bw},
      {"avx512vl", f.avx512vl}, {"avx512_bf16", f.avx512_bf16}, {"avx512_fp16", f.avx512_fp16},
      {"amx_tile", f.amx_tile}, {"amx_bf16", f.amx_bf16}, {"amx_fp16", f.amx_fp16},
      {"avx512_os_enabled", f.avx512_os_enabled}, {"amx_os_enabled", f.amx_os_enabled}, {"amd", f.amd}};
  bool first = true;
  for (const auto& [name, on] : flags) {
    o << (first ? "" : ", ") << '"' << name << "\": " << (on ? "true" : "false");
    first = false;
  }
  o << "}, \"chosen\": {";
  const std::pair<const char*, at::ScalarType> dts[] = {
      {"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}};
  first = true;
  for (const auto& [name, dt] : dts) {
    std::string p;
    try {
      const TilePath tp = chosen_path(dt);
      p = tp == TilePath::kFp32Blas ? fp32_path_name(chosen_fp32_gemm()) : path_name(tp);
    } catch (const c10::Error& e) {  // a VITKERN_CPU_PATH that cannot run: say so instead of failing
      p = "error: " + std::string(e.what_without_backtrace());
      for (char& ch : p) if (ch == '"' || ch == '\\' || ch == '\n') ch = ' ';
    }
    o << (first ? "" : ", ") << '"' << name << "\": \"" << p << '"';
    first = false;
  }
  o << "}}";
  return o.str();
}

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
#if defined(__linux__)
    for (int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
      const long v = sysconf(name);
      if (v > 0) return int64_t(v);
    }
#endif
    return int64_t(32) << 20;
  }();
  return bytes;
}

}  // namespace vitkern_cpu

// Not a tensor op: a catch-all kernel, callable as torch.ops.vitkern_cpu.cpu_features() (vitkern.info, benchmarks).
TORCH_LIBRARY_FRAGMENT(vitkern_cpu, m) {
  m.def("cpu_features() -> str", []() { return vitkern_cpu::cpu_features_json(); });
}
