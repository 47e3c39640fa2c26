// `import vitkern._C`: the ops register themselves through TORCH_LIBRARY in the other files; this module adds
// direct bindings of the same two kernels for the eager path (vitkern/backends/cpu.py). A call through
// torch.ops parses its arguments against the schema and goes through the dispatcher, about 2–3 µs of a tiny
// call; the eager path is already below autograd and below the vitkern::attention op, so the dispatcher has
// nothing left to do there. Traced and compiled graphs still see only the ops.
#include <torch/extension.h>

#include "cpu_attn_autograd.h"
#include "cpu_attn_bwd.h"
#include "cpu_attn_fwd.h"
#include "cpu_softmax_math.h"

namespace {

// The varlen forward for packed [T, H, D] inputs: the [1, H, T, D] views and the result's [T, H, Dv] view made
// here, where a view costs a fraction of what it costs from Python.
std::tuple<at::Tensor, at::Tensor> flash_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& cu_q, const at::Tensor& cu_k, double scale,
                                                    bool is_causal, double dropout_p, int64_t seed) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v: expected [T, H, D] tensors, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto bhnd = [](const at::Tensor& t) { return t.unsqueeze(0).transpose(1, 2); };
  auto [out, lse] = vitkern_cpu::flash_fwd_cpu(bhnd(q), bhnd(k), bhnd(v), std::nullopt, cu_q, cu_k, scale,
                                               is_causal, dropout_p, seed);
  return {out.select(0, 0).transpose(0, 1), lse.select(0, 0)};
}

// The online softmax's exp pass on its own, for the tests that bound its error in ulp: each row of a float32
// [R, N] tensor becomes exp(x - shift) in place (the vector exp this build runs); returns the row sums [R].
at::Tensor softmax_exp_rows_(at::Tensor& x, double shift) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "x: expected a contiguous float32 [R, N] CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor sums = at::empty({rows}, x.options());
  float* data = x.data_ptr<float>();
  float* row_sums = sums.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    row_sums[r] = vitkern_cpu::exp_shift_sum<float>(data + r * n, n, static_cast<float>(shift));
  return sums;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  // The GIL is released as the dispatcher's own calls do, so other Python threads run during a long kernel.
  m.def("flash_fwd", &vitkern_cpu::flash_fwd_cpu, "vitkern_cpu::flash_fwd without the dispatcher",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("flash_bwd", &vitkern_cpu::flash_bwd_cpu, "vitkern_cpu::flash_bwd without the dispatcher",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("flash_varlen_fwd", &flash_varlen_fwd,
        "flash_fwd on packed [T, H, D] inputs -> (out [T, H, Dv], lse [H, T]), no autograd",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("flash_attention_autograd", &vitkern_cpu::flash_attention_autograd,
        "flash_fwd with a C++ autograd node whose backward is flash_bwd (the eager path's boundary)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("softmax_exp_rows_", &softmax_exp_rows_,
        "test hook: x [R, N] float32 <- exp(x - shift) in place by the kernels' exp pass; returns the row sums [R]");
}
