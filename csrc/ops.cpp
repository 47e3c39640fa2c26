// Schemas of the fused CPU kernels (namespace vitkern_cpu). The Python op layer (vitkern/ops.py) calls them
// through vitkern/backends/cpu.py; the layout contract is in vitkern/backends/base.py.
#include <torch/library.h>

TORCH_LIBRARY(vitkern_cpu, m) {
  m.def("flash_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "float scale, bool is_causal, float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  m.def("flash_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, float scale, bool is_causal, float dropout_p, int seed, "
        "bool mask_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
}
