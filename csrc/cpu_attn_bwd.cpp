// Fused attention backward on CPU. Each work item owns a range of keys of one kv head: it recomputes the
// probabilities P = exp(S - lse) tile by tile for every query head of its group (so GQA heads never race on
// dK/dV), accumulates dK and dV for its keys in per-thread tiles, and adds its dQ contribution into the partial
// buffer its item names. With enough heads there is one partial buffer (dQ itself); with few (one long PiT
// sequence) the keys are split over several buffers that are summed in a fixed order afterwards, so results do
// not depend on scheduling. Skipping follows the forward: mask summary, causal diagonal, varlen blocks.
#include "cpu_attn_bwd.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_attn_plan.h"
#include "cpu_attn_work.h"
#include "cpu_blas.h"
#include "cpu_dropout.h"
#include "cpu_features.h"
#include "cpu_lowp_softmax.h"
#include "cpu_softmax_math.h"
#include "cpu_tile_products.h"

namespace vitkern_cpu {
namespace {

// T: the accumulator dtype; the operands live in the tile-products object (cpu_tile_products.h).
template <typename T>
struct BackwardArgs {
  const T* lse;  // [B, Hq, Nq], in the compute dtype
  const T* delta;    // [B, Hq, Nq]: rowsum(dout * out)
  Strided<T> dk, dv;
  T* dq_parts;  // [parts, B, Nq, Hq, D]
  Strided<T> dq_in_part;
  int64_t part_stride;
  const Problem* p;
  MaskView mask;
  const MaskSummary* summary;
  Dropout dropout;
  Tiles tiles;
  char* dmask;  // [B, Hq, Nq, Nk] contiguous in the mask's dtype, or null
};

template <typename T, typename E>
void store_row(char* dst, const T* src, int64_t n) {
  E* d = reinterpret_cast<E*>(dst);
  for (int64_t c = 0; c < n; ++c) d[c] = static_cast<E>(src[c]);
}

template <typename T>
void store_mask_grad_row(const MaskView& m, char* dst, const T* ds, int64_t n) {
  switch (m.dtype) {
    case at::kFloat: store_row<T, float>(dst, ds, n); break;
    case at::kDouble: store_row<T, double>(dst, ds, n); break;
    case at::kHalf: store_row<T, c10::Half>(dst, ds, n); break;
    case at::kBFloat16: store_row<T, c10::BFloat16>(dst, ds, n); break;
    default: TORCH_CHECK(false, "mask_grad: needs a floating mask, got ", m.dtype);
  }
}

// Score row s of query i over keys [j0, j0 + nb): the mask where the tile is partial, -inf past the causal edge.
template <typename T>
void mask_scores(const BackwardArgs<T>& a, const KeyRange& w, int64_t h, uint8_t code, bool causal_cut, T* s,
                 int64_t nb, int64_t i, int64_t j0) {
  if (code == kTilePartial) a.mask.apply_row(s, nb, w.b, h, i, j0);
  if (causal_cut) {
    const int64_t allowed = std::max<int64_t>(0, std::min(nb, i + w.causal_shift - j0 + 1));
    fill_row(s + allowed, nb - allowed, -std::numeric_limits<T>::infinity());
  }
}

// One (key tile, query tile) pair on the bf16 paths without dropout or mask gradient: each row of P and
// scale·dS is computed in one pass from the score and dP rows and written as bf16 (no float32 P or dS tile,
// no separate scaling, exp, dS and rounding passes). The scale folds into the exp's FMA unless an additive mask
// needs scaled scores. Returns whether any row had keys.
template <typename Products>
bool lowp_pair(const BackwardArgs<float>& a, Products& prod, const KeyRange& w, int64_t h, int64_t i0, int64_t mq,
               int64_t j0, int64_t nb, uint8_t code, bool causal_cut, float* s_buf, float* dp_buf, float* dq) {
  const Problem& p = *a.p;
  const int64_t ld = a.tiles.ld();
  const bool raw = !(code == kTilePartial && a.mask.kind == MaskView::kFloat);
  const float c = raw ? float(p.scale) * kLog2e : kLog2e;
  const float* lse = a.lse + (w.b * p.Hq + h) * p.Nq;
  const float* delta = a.delta + (w.b * p.Hq + h) * p.Nq;
  prod.scores(w, h, i0, mq, j0, nb, s_buf, ld, /*scaled=*/!raw);
  prod.dprobs(w, h, i0, mq, j0, nb, dp_buf, ld);
  bool any_row = false;
  const VnniLayout pairs = prod.pairs(nb);
  for (int64_t r = 0; r < mq; r += 2) {  // row pairs: P and dS go into the packed B operands as interleaved words
    GradRow rows[2];
    for (int64_t t = 0; t < 2; ++t) {
      const int64_t i = i0 + r + t;
      GradRow& g = rows[t];
      g = GradRow{s_buf + r * ld, dp_buf + r * ld, 0.0f, 0.0f, false, nullptr};  // past the tile: a zero row
      if (r + t == mq) continue;
      float* s = s_buf + (r + t) * ld;
      g.s = s;
      g.dp = dp_buf + (r + t) * ld;
      g.ds = prod.ds_row(r + t);
      const float l = lse[i];
      g.live = l != -std::numeric_limits<float>::infinity();  // a row with no key: P = dS = 0 (a NaN lse goes on)
      if (!g.live) continue;
      any_row = true;
      g.b = l * kLog2e;
      g.delta = delta[i];
      mask_scores(a, w, h, code, causal_cut, s, nb, i, j0);
    }
    softmax_grad_pair_to_bf16(rows[0], rows[1], r, nb, prod.row_ld, c, float(p.scale), pairs, prod.p_pack(),
                              prod.ds_packed());
  }
  if (!any_row) return false;
  prod.add_from_pairs(mq, nb, dq, a.dq_in_part.sn);
  return true;
}

template <typename T, typename Products>
void backward_keys(const BackwardArgs<T>& a, Products& prod, const KeyRange& w, T* p_buf, T* dp_buf, T* pd_buf) {
  const Problem& p = *a.p;
  const int64_t bm = a.tiles.bm, bn = a.tiles.bn, ld = a.tiles.ld(), d = p.D, dv = p.Dv, groups = p.Hq / p.Hk;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T keep_scale = T(a.dropout.keep_scale);

  for (int64_t j0 = w.k0; j0 < w.k1; j0 += bn) {
    const int64_t nb = std::min(bn, w.k1 - j0);
    prod.start_keys(w, j0, nb);
    // dK and dV rows of this key tile are accumulated across its query tiles: the first visited query tile
    // overwrites (add = false), the rest add.
    bool live = false;
    // Queries that see at least key j0: causal keeps i + shift >= j0. Query tiles stay on the block's grid.
    int64_t first_q = w.q_lo;
    if (p.causal) first_q = std::max(w.q_lo, j0 - w.causal_shift);
    const int64_t qt_first = (first_q - w.q_lo) / bm;
    const int64_t kt = (j0 - (w.q_lo + w.causal_shift)) / bn;  // key tile index inside the block (dense: j0/bn)

    for (int64_t h = w.hk * groups; h < (w.hk + 1) * groups; ++h) {
      const uint8_t* codes = a.summary ? a.summary->tiles_of(w.b, h) : nullptr;
      const T* lse = a.lse + (w.b * p.Hq + h) * p.Nq;
      const T* delta = a.delta + (w.b * p.Hq + h) * p.Nq;
      const int64_t bh = w.b * p.Hq + h;
      T* dq_part = a.dq_parts + w.part * a.part_stride;
      for (int64_t i0 = w.q_lo + qt_first * bm; i0 < w.q_hi; i0 += bm) {
        const int64_t mq = std::min(bm, w.q_hi - i0);
        const uint8_t code = codes ? codes[((i0 - w.q_lo) / bm) * a.summary->n_kt + kt] : uint8_t(kTileClean);
        if (code == kTileSkip) continue;
        const bool causal_cut = p.causal && j0 + nb - 1 > i0 + w.causal_shift;
        prod.start_queries(w, h, i0, mq);
        T* dqp = dq_part + w.b * a.dq_in_part.sb + h * a.dq_in_part.sh + i0 * a.dq_in_part.sn;
        if constexpr (Products::kLowp) {
          if (prod.fused_rows) {
            if (lowp_pair(a, prod, w, h, i0, mq, j0, nb, code, causal_cut, p_buf, dp_buf, dqp)) live = true;
            continue;
          }
        }
        prod.scores(w, h, i0, mq, j0, nb, p_buf, ld);
        bool any_row = false;
        for (int64_t r = 0; r < mq; ++r) {
          T* s = p_buf + r * ld;
          const int64_t i = i0 + r;
          const T l = lse[i];
          if (l == ninf) {  // a row with no key: P = 0, no gradient (a NaN lse goes on: NaN grads)
            fill_row(s, nb, T(0));
            continue;
          }
          any_row = true;
          mask_scores(a, w, h, code, causal_cut, s, nb, i, j0);
          exp_shift(s, nb, l);
        }
        if (!any_row) continue;

        prod.dprobs(w, h, i0, mq, j0, nb, dp_buf, ld);
        const T* pd = p_buf;
        if (a.dropout.active) {
          for (int64_t r = 0; r < mq; ++r) {
            const uint32_t st = a.dropout.row_state(bh, i0 + r);
            T* pr = pd_buf + r * ld;
            T* dpr = dp_buf + r * ld;
            const T* src = p_buf + r * ld;
            for (int64_t c = 0; c < nb; ++c) pr[c] = src[c] * keep_scale;
            a.dropout.apply_row(pr, nb, st, j0);
            for (int64_t c = 0; c < nb; ++c) dpr[c] *= keep_scale;
            a.dropout.apply_row(dpr, nb, st, j0);
          }
          pd = pd_buf;
        }
        prod.add_dv(w, h, i0, mq, j0, nb, pd, ld, live);

        for (int64_t r = 0; r < mq; ++r) {  // dS = P * (dP - delta), written over dP
          T* ds = dp_buf + r * ld;
          const T* pr = p_buf + r * ld;
          const T dl = delta[i0 + r];
#pragma omp simd
          for (int64_t c = 0; c < nb; ++c) ds[c] = pr[c] * (ds[c] - dl);
          if (a.dmask) {
            char* dst = a.dmask + (((bh * p.Nq) + i0 + r) * p.Nk + j0) * a.mask.elem_size;
            store_mask_grad_row(a.mask, dst, ds, nb);
          }
        }
        prod.add_dk(w, h, i0, mq, j0, nb, dp_buf, ld, live);
        live = true;
        prod.add_dq(w, mq, j0, nb, dp_buf, ld, dqp, a.dq_in_part.sn);
      }
    }
    prod.finish_keys(w, j0, nb, live);
    if (!Products::kLowp && !live) {  // no query reached these keys (masked out, causal, empty rows): zero gradients
      for (int64_t c = 0; c < nb; ++c) {
        fill_row(a.dk.row(w.b, w.hk, j0 + c), d, T(0));
        fill_row(a.dv.row(w.b, w.hk, j0 + c), dv, T(0));
      }
    }
  }
}

// Products and sum in T (float32 for bf16 inputs, which convert exactly).
template <typename T, typename E>
T dot(const E* x, const E* y, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += static_cast<T>(x[c]) * static_cast<T>(y[c]);
  return acc;
}

// delta [B, H, N] = rowsum(dO * O) in dtype `compute`, row by row from the operands as they are (bf16 ones are
// read in place): no [B, H, N, Dv] product or float32 copy is materialized (fresh pages on every call).
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& b, at::ScalarType compute) {
  const int64_t H = a.size(1), N = a.size(2), D = a.size(3);
  at::Tensor out = at::empty({a.size(0), H, N}, a.options().dtype(compute));
  const auto run = [&](auto elem, auto acc) {
    using E = decltype(elem);
    using T = decltype(acc);
    const Strided<const E> x = strided<const E>(a), y = strided<const E>(b);
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, out.numel(), 1024, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        dst[r] = dot<T>(x.row(r / (N * H), (r / N) % H, r % N), y.row(r / (N * H), (r / N) % H, r % N), D);
    });
  };
  const bool unit = a.stride(3) == 1 && b.stride(3) == 1;
  if (unit && a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && compute == at::kFloat) {
    run(c10::BFloat16(), 0.0f);
  } else if (unit && a.scalar_type() == compute && b.scalar_type() == compute) {
    AT_DISPATCH_FLOATING_TYPES(compute, "vitkern_cpu::row_dots", [&] { run(scalar_t(), scalar_t()); });
  } else {  // other dtypes or strides: compute-dtype copies with unit stride, which take the branch above
    return row_dots(gemm_operand(a, compute), gemm_operand(b, compute), compute);
  }
  return out;
}

template <typename T, typename MakeProducts>
void run_backward(const BackwardArgs<T>& a, const std::vector<KeyRange>& items, const MakeProducts& make_products) {
  std::atomic<int64_t> next{0};
  run_on_threads(*a.p, int64_t(items.size()), [&](int64_t) {
    const BlasSingleThreadScope one_blas_thread;
    auto prod = make_products();
    const int64_t tile = a.tiles.bm * a.tiles.ld();
    std::vector<T> p_buf(tile), dp_buf(tile), pd_buf(a.dropout.active ? tile : 0);
    for (int64_t idx = next.fetch_add(1); idx < int64_t(items.size()); idx = next.fetch_add(1))
      backward_keys<T>(a, prod, items[idx], p_buf.data(), dp_buf.data(), pd_buf.data());
    prod.finish();
  });
}

// The tile products of `path`: bf16 operands read in place on the reduced-precision paths, float copies
// (float32 for bf16/fp16 inputs) through the BLAS otherwise. dk/dv: the accumulator-dtype outputs.
// dk/dv: the accumulator-dtype outputs on the BLAS path, the bf16 outputs themselves on the others.
template <typename T>
void run_backward_on_path(const BackwardArgs<T>& a, const std::vector<KeyRange>& items, TilePath path,
                          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                          const at::Tensor& dk, const at::Tensor& dv, const Problem& p, Tiles tiles) {
  if constexpr (std::is_same_v<T, float>) {
    if (path != TilePath::kFp32Blas) {
      const at::Tensor qb = gemm_operand(q, at::kBFloat16), kb = gemm_operand(k, at::kBFloat16),
                       vb = gemm_operand(v, at::kBFloat16), dob = gemm_operand(dout, at::kBFloat16);
      return run_backward<float>(a, items, [&] {
        return LowpBackwardProducts(strided<const bf16>(qb), strided<const bf16>(kb), strided<const bf16>(vb),
                                    strided<const bf16>(dob), strided<bf16>(dk), strided<bf16>(dv), p, tiles,
                                    path, /*fused_rows=*/!a.dropout.active && !a.dmask);
      });
    }
  }
  const at::Tensor qc = gemm_operand(q, p.compute), kc = gemm_operand(k, p.compute), vc = gemm_operand(v, p.compute),
                   doc = gemm_operand(dout, p.compute);
  run_backward<T>(a, items, [&] {
    return BlasBackwardProducts<T>(strided<const T>(qc), strided<const T>(kc), strided<const T>(vc),
                                   strided<const T>(doc), strided<T>(dk), strided<T>(dv), p, tiles);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, double scale, bool is_causal, double dropout_p, int64_t seed,
    bool mask_grad) {
  Problem p = check_problem(q, k, v, mask, cu_q, cu_k, scale, is_causal, dropout_p, seed);
  const std::vector<int64_t> o_shape{p.B, p.Hq, p.Nq, p.Dv};
  TORCH_CHECK(dout.dim() == 4 && dout.sizes() == at::IntArrayRef(o_shape), "dout: expected shape ",
              at::IntArrayRef(o_shape), ", got ", dout.sizes());
  TORCH_CHECK(out.dim() == 4 && out.sizes() == at::IntArrayRef(o_shape), "out: expected shape ",
              at::IntArrayRef(o_shape), ", got ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == p.dtype && out.scalar_type() == p.dtype, "dout, out: expected dtype ", p.dtype,
              ", got ", dout.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(dout.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(),
              "dout, out, lse: expected CPU tensors");
  TORCH_CHECK((lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble) && lse.dim() == 3 &&
                  lse.size(0) == p.B && lse.size(1) == p.Hq && lse.size(2) == p.Nq,
              "lse: expected float32/float64 [", p.B, ", ", p.Hq, ", ", p.Nq, "], got ", lse.scalar_type(), " ",
              lse.sizes());
  const bool has_mask = mask.has_value() && mask->defined();
  TORCH_CHECK(!mask_grad || (has_mask && mask->is_floating_point()),
              "mask_grad: needs a floating mask, got ", has_mask ? c10::toString(mask->scalar_type()) : "none");

  VisitPlan plan = plan_visits(p, mask, cu_q, cu_k);
  const SeqBlocks& blocks = plan.blocks;
  const MaskView& mv = plan.mask;
  const Tiles tiles = backward_tiles(p, mv.kind != MaskView::kNone);
  const at::TensorOptions acc_opts = at::TensorOptions().dtype(p.compute);

  at::Tensor dq = empty_bhnd(p.B, p.Hq, p.Nq, p.D, p.dtype);
  at::Tensor dk = empty_bhnd(p.B, p.Hk, p.Nk, p.D, p.dtype);
  at::Tensor dv = empty_bhnd(p.B, p.Hk, p.Nk, p.Dv, p.dtype);
  at::Tensor dmask = mask_grad ? at::zeros({p.B, p.Hq, p.Nq, p.Nk}, at::TensorOptions().dtype(mask->scalar_type()))
                               : at::empty({0}, q.options());
  const TilePath path = chosen_path(p.dtype);
  const bool direct_bf16 = path != TilePath::kFp32Blas;  // dK, dV stored rounded from the kernel's fp32 tiles
  at::Tensor dk_acc = p.dtype == p.compute || direct_bf16 ? dk : empty_bhnd(p.B, p.Hk, p.Nk, p.D, p.compute);
  at::Tensor dv_acc = p.dtype == p.compute || direct_bf16 ? dv : empty_bhnd(p.B, p.Hk, p.Nk, p.Dv, p.compute);
  // Work items write every key row of blocks that have queries; the keys of the other blocks get zeros here.
  for (int64_t s = 0; s < blocks.count(); ++s) {
    if (blocks.q[s + 1] > blocks.q[s] || blocks.k[s + 1] == blocks.k[s]) continue;
    dk_acc.narrow(2, blocks.k[s], blocks.k[s + 1] - blocks.k[s]).zero_();
    dv_acc.narrow(2, blocks.k[s], blocks.k[s + 1] - blocks.k[s]).zero_();
  }

  int64_t parts = 1;
  const auto items = backward_work(p, blocks, tiles, at::get_num_threads(), &parts);
  // dQ is accumulated into partial buffers [parts, B, Nq, Hq, D]; with one part and a float32/64 dq, into dq.
  const bool dq_direct = parts == 1 && p.dtype == p.compute;
  at::Tensor dq_parts =
      dq_direct ? dq.transpose(1, 2).unsqueeze(0) : at::empty({parts, p.B, p.Nq, p.Hq, p.D}, acc_opts);
  dq_parts.zero_();

  if (!items.empty()) {
    const at::Tensor delta = row_dots(dout, out, p.compute);
    const at::Tensor lse_c = lse.to(p.compute).contiguous();  // float64 math keeps a float64 lse
    const MaskSummary summary = summarize_mask(mv, p.B, p.Hq, p.Nq, p.Nk, tiles);
    AT_DISPATCH_FLOATING_TYPES(p.compute, "vitkern_cpu::flash_bwd", [&] {
      const at::Tensor part0 = dq_parts[0].transpose(1, 2);  // [B, Hq, Nq, D] view of one part
      BackwardArgs<scalar_t> a{lse_c.const_data_ptr<scalar_t>(), delta.const_data_ptr<scalar_t>(),
                               direct_bf16 ? Strided<scalar_t>{} : strided<scalar_t>(dk_acc),
                               direct_bf16 ? Strided<scalar_t>{} : strided<scalar_t>(dv_acc),
                               dq_parts.data_ptr<scalar_t>(), strided<scalar_t>(part0), dq_parts.stride(0), &p, mv,
                               mv.kind == MaskView::kNone ? nullptr : &summary, Dropout(dropout_p, seed), tiles,
                               mask_grad ? static_cast<char*>(dmask.data_ptr()) : nullptr};
      run_backward_on_path<scalar_t>(a, items, path, q, k, v, dout, dk_acc, dv_acc, p, tiles);
    });
  }
  // Fixed summation order over the partial buffers: deterministic.
  if (!dq_direct) dq.copy_((parts == 1 ? dq_parts[0] : dq_parts.sum(0)).transpose(1, 2));
  if (!dk_acc.is_same(dk)) dk.copy_(dk_acc);
  if (!dv_acc.is_same(dv)) dv.copy_(dv_acc);
  return {dq, dk, dv, dmask};
}

}  // namespace vitkern_cpu
