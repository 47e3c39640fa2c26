// Forward of the fused CPU attention (vitkern_cpu::flash_fwd); contract in vitkern/backends/base.py.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace vitkern_cpu {

// q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv], mask [B, Hq, Nq, Nk] or none, cu_seqlens [S + 1] or none
// -> out [B, Hq, Nq, Dv] (stored [B, Nq, Hq, Dv]), lse float32 [B, Hq, Nq] (-inf for a row with no key).
std::tuple<at::Tensor, at::Tensor> flash_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& cu_q,
                                                 const std::optional<at::Tensor>& cu_k, double scale,
                                                 bool is_causal, double dropout_p, int64_t seed);

}  // namespace vitkern_cpu
