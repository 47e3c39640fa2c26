// Whether this compiler can build the AVX512-BF16 code of the bf16 paths, and the function-level target attribute
// that code carries: any -march builds it, and cpuid decides at run time whether it is called (cpu_features.h).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#include <immintrin.h>
#define VITKERN_LOWP_KERNELS 1
#define VITKERN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif
