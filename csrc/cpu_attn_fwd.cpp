// Fused attention forward on CPU: for each tile of queries, an online softmax over tiles of keys with fp32
// (fp64 for float64) accumulators, never an Nq x Nk buffer. Tiles a mask summary marks empty are skipped, clean
// tiles get no mask work, causal tiles past the diagonal are never visited. Saves the log-sum-exp for the
// backward. Memory beyond the inputs: one bm x bn score tile and one bm x Dv accumulator per thread, plus the
// float32 copies of bf16/fp16 operands (O(N·D)) on the fp32 path; the bf16 path reads bf16 operands in place and
// packs one key tile at a time (cpu_tile_products.h).
#include "cpu_attn_fwd.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

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

// T: the accumulator dtype (float, double); the operands live in the tile-products object (cpu_tile_products.h).
template <typename T>
struct ForwardArgs {
  Strided<T> out;
  Strided<bf16> out_bf16;  // set instead of out on the bf16 paths: rows stored rounded, no float32 staging copy
  T* lse;  // [B, Hq, Nq] contiguous, in the compute dtype (float64 inputs keep a float64 lse)
  const Problem* p;
  MaskView mask;
  const MaskSummary* summary;
  Dropout dropout;
  Tiles tiles;
};

template <typename T, typename Products>
void forward_tile(const ForwardArgs<T>& a, Products& prod, const QueryTile& w, T* s_buf, T* o_buf, T* m_buf,
                  T* l_buf) {
  const Problem& p = *a.p;
  const int64_t bn = a.tiles.bn, ld = a.tiles.ld();
  const int64_t mq = w.q1 - w.q0, hk = w.h / (p.Hq / p.Hk), dv = p.Dv, ldo = prod.o_ld();
  const T ninf = -std::numeric_limits<T>::infinity();
  prod.start(w);
  const uint8_t* codes = a.summary ? a.summary->tiles_of(w.b, w.h) + w.qt * a.summary->n_kt : nullptr;
  const int64_t bh = w.b * p.Hq + w.h;

  fill_row(m_buf, mq, ninf);
  fill_row(l_buf, mq, T(0));
  bool o_live = false;  // the accumulator is written by the first visited tile's product (beta = 0)

  for (int64_t j0 = w.k_lo; j0 < w.k_hi; j0 += bn) {
    const int64_t nb = std::min(bn, w.k_hi - j0);
    const uint8_t code = codes ? codes[(j0 - w.k_lo) / bn] : uint8_t(kTileClean);
    if (code == kTileSkip) continue;
    // Some pair of this tile lies above the diagonal when its last key is past the first query's reach.
    const bool causal_cut = p.causal && j0 + nb - 1 > w.q0 + w.causal_shift;
    // The bf16 paths take raw dot products and fold the scale into the exp's FMA: max(scale·s) = scale·max(s)
    // for scale > 0 (rounding is monotone). An additive mask needs scaled scores, dropout a float32 P row.
    bool raw = false;
    if constexpr (Products::kLowp) {
      raw = p.scale > 0 && !a.dropout.active && !(code == kTilePartial && a.mask.kind == MaskView::kFloat);
      prod.scores(w, hk, j0, nb, s_buf, ld, /*scaled=*/!raw);
    } else {
      prod.scores(w, hk, j0, nb, s_buf, ld);
    }
    for (int64_t r = 0; r < mq; ++r) {
      T* s = s_buf + r * ld;
      const int64_t i = w.q0 + r;
      if (code == kTilePartial) a.mask.apply_row(s, nb, w.b, w.h, i, j0);
      if (causal_cut) {
        const int64_t allowed = std::max<int64_t>(0, std::min(nb, i + w.causal_shift - j0 + 1));
        fill_row(s + allowed, nb - allowed, ninf);
      }
      // row_max skips NaN scores; the sum below keeps them.
      const T m_new = std::max(m_buf[r], raw ? T(p.scale) * row_max(s, nb) : row_max(s, nb));
      if (m_new == ninf) {  // nothing taken part in this row so far, unless a score is NaN
        if (has_nan(s, nb)) l_buf[r] = std::numeric_limits<T>::quiet_NaN();  // stays NaN: l * alpha + sum
        if constexpr (Products::kLowp) fill_row(prod.p_row(r), prod.p_k, bf16(0.0f));
        else fill_row(s, nb, T(0));
        continue;
      }
      const T alpha = exp_poly(m_buf[r] - m_new);  // 0 when the row had no key yet
      T sum;
      if constexpr (Products::kLowp) {
        if (a.dropout.active) {
          sum = exp_shift_sum(s, nb, m_new);
          a.dropout.apply_row(s, nb, a.dropout.row_state(bh, i), j0);
          round_row_bf16(s, nb, prod.p_k, prod.p_row(r));
        } else {
          sum = exp2_row_to_bf16(s, nb, prod.p_k, raw ? float(p.scale) * kLog2e : kLog2e, m_new * kLog2e,
                                 prod.p_row(r));
        }
      } else {
        sum = exp_shift_sum(s, nb, m_new);
        if (a.dropout.active) a.dropout.apply_row(s, nb, a.dropout.row_state(bh, i), j0);
      }
      l_buf[r] = l_buf[r] * alpha + sum;
      m_buf[r] = m_new;
      if (o_live && alpha != T(1)) scale_row(o_buf + r * ldo, dv, alpha);
    }
    if constexpr (Products::kLowp) prod.accumulate_p(w, hk, j0, o_buf, o_live);
    else prod.accumulate(w, hk, j0, nb, s_buf, ld, o_buf, o_live);
    o_live = true;
  }
  if (!o_live) fill_row(o_buf, mq * ldo, T(0));  // no key tile at all: rows are empty

  const T keep_scale = T(a.dropout.active ? a.dropout.keep_scale : 1.0);
  T* lse = a.lse + (w.b * p.Hq + w.h) * p.Nq + w.q0;
  for (int64_t r = 0; r < mq; ++r) {
    const T l = l_buf[r];
    const T inv = l == T(0) ? T(0) : keep_scale / l;  // a NaN l (a NaN score) gives a NaN row
    T* acc = o_buf + r * ldo;
    if constexpr (std::is_same_v<T, float>) {
      if (a.out_bf16.data) {
        round_row_bf16(acc, dv, dv, a.out_bf16.row(w.b, w.h, w.q0 + r), inv);
        continue;
      }
    }
    T* o = a.out.row(w.b, w.h, w.q0 + r);
#pragma omp simd
    for (int64_t c = 0; c < dv; ++c) o[c] = acc[c] * inv;
  }
  // Separate loop: a libm call inside the row loop above would spill its registers on every row.
  for (int64_t r = 0; r < mq; ++r)
    lse[r] = l_buf[r] == T(0) ? ninf : m_buf[r] + std::log(l_buf[r]);
}

// make_products() builds one tile-products object per thread (they hold per-thread packing buffers).
template <typename T, typename MakeProducts>
void run_forward(const ForwardArgs<T>& a, const std::vector<QueryTile>& items, const MakeProducts& make_products) {
  std::atomic<int64_t> next{0};
  run_on_threads(*a.p, int64_t(items.size()), [&](int64_t) {
    const BlasSingleThreadScope one_blas_thread;
    auto prod = make_products();
    std::vector<T> s_buf(a.tiles.bm * a.tiles.ld()), o_buf(a.tiles.bm * prod.o_ld()), m_buf(a.tiles.bm),
        l_buf(a.tiles.bm);
    for (int64_t idx = next.fetch_add(1); idx < int64_t(items.size()); idx = next.fetch_add(1))
      forward_tile<T>(a, prod, items[idx], s_buf.data(), o_buf.data(), m_buf.data(), l_buf.data());
    prod.finish();
  });
}

// The tile products of `path` over the inputs: bf16 operands read in place on the reduced-precision paths, float
// copies (float32 for bf16/fp16 inputs) through the BLAS otherwise.
template <typename T>
void run_forward_on_path(const ForwardArgs<T>& a, const std::vector<QueryTile>& items, TilePath path,
                         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Problem& p, Tiles tiles) {
  if constexpr (std::is_same_v<T, float>) {
    if (path != TilePath::kFp32Blas) {
      const at::Tensor qb = gemm_operand(q, at::kBFloat16), kb = gemm_operand(k, at::kBFloat16),
                       vb = gemm_operand(v, at::kBFloat16);
      return run_forward<float>(a, items, [&] {
        return LowpProducts(strided<const bf16>(qb), strided<const bf16>(kb), strided<const bf16>(vb), p, tiles,
                            path);
      });
    }
  }
  const at::Tensor qc = gemm_operand(q, p.compute), kc = gemm_operand(k, p.compute), vc = gemm_operand(v, p.compute);
  run_forward<T>(a, items, [&] {
    return BlasProducts<T>(strided<const T>(qc), strided<const T>(kc), strided<const T>(vc), p, tiles);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& cu_q,
                                                 const std::optional<at::Tensor>& cu_k, double scale,
                                                 bool is_causal, double dropout_p, int64_t seed) {
  Problem p = check_problem(q, k, v, mask, cu_q, cu_k, scale, is_causal, dropout_p, seed);
  VisitPlan plan = plan_visits(p, mask, cu_q, cu_k);
  const SeqBlocks& blocks = plan.blocks;
  const MaskView& mv = plan.mask;
  const Tiles tiles = forward_tiles(p, mv.kind != MaskView::kNone);

  at::Tensor out = empty_bhnd(p.B, p.Hq, p.Nq, p.Dv, p.dtype);
  at::Tensor lse = at::empty({p.B, p.Hq, p.Nq}, at::TensorOptions().dtype(p.compute));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const TilePath path = chosen_path(p.dtype);
  const bool direct_bf16 = path != TilePath::kFp32Blas;  // only bf16 inputs take a reduced-precision path
  at::Tensor out_acc =
      p.dtype == p.compute || direct_bf16 ? out : empty_bhnd(p.B, p.Hq, p.Nq, p.Dv, p.compute);
  const MaskSummary summary = summarize_mask(mv, p.B, p.Hq, p.Nq, p.Nk, tiles);
  const auto items = forward_work(p, blocks, tiles);

  AT_DISPATCH_FLOATING_TYPES(p.compute, "vitkern_cpu::flash_fwd", [&] {
    ForwardArgs<scalar_t> a{direct_bf16 ? Strided<scalar_t>{} : strided<scalar_t>(out_acc),
                            direct_bf16 ? strided<bf16>(out) : Strided<bf16>{}, lse.data_ptr<scalar_t>(), &p, mv,
                            mv.kind == MaskView::kNone ? nullptr : &summary, Dropout(dropout_p, seed), tiles};
    run_forward_on_path<scalar_t>(a, items, path, q, k, v, p, tiles);
  });
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return {out, lse};
}

}  // namespace vitkern_cpu
