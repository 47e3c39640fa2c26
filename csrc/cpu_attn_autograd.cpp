// The C++ autograd node of the eager CPU path (see the header). A Python autograd.Function costs ~20 µs per
// forward+backward of bookkeeping (the ctx object, saved tensors, the engine calling back into Python), more
// than the fused kernels take at a tiny size; torch::autograd::Function keeps all of it in C++.
#include "cpu_attn_autograd.h"

#include <torch/autograd.h>

#include "cpu_attn_bwd.h"
#include "cpu_attn_fwd.h"

namespace vitkern_cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct FlashAttention : public torch::autograd::Function<FlashAttention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                               const std::optional<at::Tensor>& cu_k, double scale, bool is_causal,
                               double dropout_p, int64_t seed, bool mask_grad) {
    auto [out, lse] = flash_fwd_cpu(q, k, v, mask, cu_q, cu_k, scale, is_causal, dropout_p, seed);
    const at::Tensor none;
    ctx->save_for_backward({q, k, v, out, lse, mask.value_or(none), cu_q.value_or(none), cu_k.value_or(none)});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["mask_grad"] = mask_grad;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const bool mask_grad = ctx->saved_data["mask_grad"].toBool();
    // lse is an auxiliary output: its gradient is not propagated (as in flash-attn). An unused out has none.
    at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    auto [dq, dk, dv, dmask] = flash_bwd_cpu(dout, s[0], s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]), opt(s[7]),
                                             ctx->saved_data["scale"].toDouble(),
                                             ctx->saved_data["is_causal"].toBool(),
                                             ctx->saved_data["dropout_p"].toDouble(),
                                             ctx->saved_data["seed"].toInt(), mask_grad);
    const at::Tensor none;
    return {dq, dk, dv, mask_grad ? dmask : none, none, none, none, none, none, none, none};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& mask,
                                                            const std::optional<at::Tensor>& cu_q,
                                                            const std::optional<at::Tensor>& cu_k, double scale,
                                                            bool is_causal, double dropout_p, int64_t seed,
                                                            bool mask_grad) {
  variable_list r = FlashAttention::apply(q, k, v, mask, cu_q, cu_k, scale, is_causal, dropout_p, seed, mask_grad);
  return {r[0], r[1]};
}

}  // namespace vitkern_cpu
