// The eager path's autograd boundary in C++ (vitkern/ops.py's _Attention, without Python in the backward):
// the fused CPU forward, with a graph node whose backward is the fused CPU backward.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace vitkern_cpu {

// flash_fwd_cpu's arguments and results; out carries the autograd node (lse is non-differentiable). Gradients
// flow to q, k, v, and to a floating mask when mask_grad (dS, as the Python boundary gives it).
std::tuple<at::Tensor, at::Tensor> flash_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& mask,
                                                            const std::optional<at::Tensor>& cu_q,
                                                            const std::optional<at::Tensor>& cu_k, double scale,
                                                            bool is_causal, double dropout_p, int64_t seed,
                                                            bool mask_grad);

}  // namespace vitkern_cpu
