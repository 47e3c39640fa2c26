// Backward of the fused CPU attention (vitkern_cpu::flash_bwd); contract in vitkern/backends/base.py.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace vitkern_cpu {

// dout/out [B, Hq, Nq, Dv], lse float32 [B, Hq, Nq] from flash_fwd_cpu, the forward's other arguments ->
// dq like q, dk like k, dv like v (stored [B, N, H, X]); dmask [B, Hq, Nq, Nk] in the mask's dtype when
// mask_grad (the gradient of the scores, dS), else an empty tensor. Deterministic for a given thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, double scale, bool is_causal, double dropout_p, int64_t seed,
    bool mask_grad);

}  // namespace vitkern_cpu
