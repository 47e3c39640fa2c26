// Registers the fused CPU kernels as the CPU implementations of the vitkern_cpu ops declared in ops.cpp.
#include <torch/library.h>

#include "cpu_attn_bwd.h"
#include "cpu_attn_fwd.h"

TORCH_LIBRARY_IMPL(vitkern_cpu, CPU, m) {
  m.impl("flash_fwd", &vitkern_cpu::flash_fwd_cpu);
  m.impl("flash_bwd", &vitkern_cpu::flash_bwd_cpu);
}
