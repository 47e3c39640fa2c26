// Argument checks, operand preparation, mask tile summaries and varlen blocks for the fused CPU kernels.
#include "cpu_attn_plan.h"
#include "cpu_features.h"
#include "cpu_lowp_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <limits>

namespace vitkern_cpu {

at::Tensor gemm_operand(const at::Tensor& t, at::ScalarType compute) {
  at::Tensor x = t.scalar_type() == compute ? t : t.to(compute);
  const bool fits = x.stride(3) == 1 && x.stride(2) >= x.size(3) && x.stride(0) >= 0 && x.stride(1) >= 0;
  return fits ? x : x.contiguous();
}

namespace {

// VITKERN_CPU_TILES sets both passes' tiles; `own` (VITKERN_CPU_FWD_TILES / VITKERN_CPU_BWD_TILES) one pass's,
// ahead of it: for tuning the two passes apart.
Tiles tiles_from_env(Tiles fallback, const char* own) {
  const char* name = own;
  const char* env = std::getenv(own);
  if (!env) env = std::getenv(name = "VITKERN_CPU_TILES");
  if (!env) return fallback;
  long bm = 0, bn = 0;
  if (std::sscanf(env, "%ldx%ld", &bm, &bn) == 2 && bm >= 1 && bn >= 1 && bm <= 4096 && bn <= 4096) return {bm, bn};
  TORCH_CHECK(false, name, ": expected 'BMxBN' with both in [1, 4096], got '", env, "'");
}

Tiles fwd_tiles(Tiles t) { return tiles_from_env(t, "VITKERN_CPU_FWD_TILES"); }
Tiles bwd_tiles(Tiles t) { return tiles_from_env(t, "VITKERN_CPU_BWD_TILES"); }

}  // namespace

int64_t round_up16(int64_t n) { return (n + 15) / 16 * 16; }

int64_t balanced(int64_t n, int64_t cap) {
  if (n <= 0) return cap;
  const int64_t parts = (n + cap - 1) / cap;
  return (n + parts - 1) / parts;
}

namespace {
// Unmasked dense bf16 on the own AMX kernel past 256 queries: its score tiles stay near L1, 64 queries (a whole
// number of 32-row tile strips) by every key up to 1,024, else 512; backward 64 x every key up to 1,024, else
// 128 x 512. Measured round-robin on a 2-core AMX Xeon (benchmarks/NOTES.md), both threads: forward PiT-28
// (784 tokens) 566 -> 798 GFLOP/s against 256 x 784, PiT-64 (4,096) 711 -> 846 against 256 x 1,024;
// forward+backward PiT-28 455 -> 575, PiT-64 667 -> 812. Short sequences keep the rules below (ViT-B/16:
// one 197 x 208 tile per head, 381 GFLOP/s against 338 at 64 x 208).
bool amx_long(const Problem& p) {
  return p.Nq > 256 && p.dtype == at::kBFloat16 && chosen_path(p.dtype) == TilePath::kAmxBf16 &&
         b_in_panels(TilePath::kAmxBf16);
}
}  // namespace

Tiles forward_tiles(const Problem& p, bool masked) {
  if (masked) return fwd_tiles({32, 64});
  // Varlen blocks are split into equal query tiles of at most 256 (forward_work); the key tile only caps.
  // Capped by the packed lengths: a small pack must not pay for zeroing a 256 x 512 score tile per call.
  if (p.varlen) return fwd_tiles({std::min<int64_t>(256, std::max<int64_t>(p.Nq, 1)),
                                       std::min<int64_t>(512, round_up16(std::max<int64_t>(p.Nk, 1)))});
  // Unmasked: big tiles. A short sequence is one tile per head (every key in one BLAS call, no rescaling, K
  // packed once); a long one 256 x 1024, which keeps the BLAS calls near peak while the score tile (1 MB) still
  // sits in L2. Smaller query tiles only when there are too few (batch, head, tile) items to keep every
  // thread busy. Measured on a 2-core AVX-512 Xeon: N = 197 runs 10% faster as 1 x 197 than as 4 x 50.
  const int64_t heads = p.B * p.Hq, want = 4 * at::get_num_threads();
  if (amx_long(p)) return fwd_tiles({64, p.Nk <= 1024 ? round_up16(p.Nk) : round_up16(balanced(p.Nk, 512))});
  int64_t bm = balanced(p.Nq, 256);
  while (bm > 32 && heads * ((p.Nq + bm - 1) / bm) < want) bm = balanced(p.Nq, bm / 2);
  // Key tiles a multiple of 16 (the BLAS panels and the vector loops have no ragged tails): 784 -> 784.
  return fwd_tiles({bm, round_up16(balanced(p.Nk, 1024))});
}

Tiles backward_tiles(const Problem& p, bool masked) {
  if (masked) return bwd_tiles({64, 64});
  if (p.varlen) return bwd_tiles({std::min<int64_t>(128, std::max<int64_t>(p.Nq, 1)),
                                       std::min<int64_t>(128, round_up16(std::max<int64_t>(p.Nk, 1)))});
  // A short sequence (ViT, CCT) with enough heads for the threads (backward_work's 4 items per thread) is one
  // tile per head: Q, dO, K and V packed once, dQ written once. Measured on a 2-core Zen 4, bf16, ViT-B/16
  // (197 tokens): 8% faster than 99 x 112; long sequences gained nothing clear from larger tiles (128 x 256,
  // 256 x 256 within 0-5% of 128 x 128 at 784 and 4,096 tokens).
  if (p.Nq <= 256 && p.Nk <= 256 && p.B * p.Hk >= 4 * at::get_num_threads())
    return bwd_tiles({std::max<int64_t>(p.Nq, 1), round_up16(std::max<int64_t>(p.Nk, 1))});
  if (amx_long(p)) return bwd_tiles(p.Nk <= 1024 ? Tiles{64, round_up16(p.Nk)} : Tiles{128, round_up16(balanced(p.Nk, 512))});
  return bwd_tiles({balanced(p.Nq, 128), round_up16(balanced(p.Nk, 128))});
}

MaskView MaskView::of(const std::optional<at::Tensor>& mask) {
  MaskView m;
  if (!mask.has_value() || !mask->defined()) return m;
  const at::Tensor& t = *mask;
  m.kind = t.scalar_type() == at::kBool ? kBool : kFloat;
  m.dtype = t.scalar_type();
  m.elem_size = t.element_size();
  m.data = static_cast<const char*>(t.const_data_ptr());
  m.sb = t.stride(0);
  m.sh = t.stride(1);
  m.sq = t.stride(2);
  m.sk = t.stride(3);
  return m;
}

namespace {

template <typename E>
inline double mask_value(const char* p) {
  return static_cast<double>(*reinterpret_cast<const E*>(p));
}

// A -inf entry removes the pair even when its score is NaN (a masked pair is never read); other entries add,
// so a NaN entry makes the row NaN.
template <typename T, typename E>
void add_float_row(T* s, int64_t n, const char* p, int64_t step) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    const T m = static_cast<T>(*reinterpret_cast<const E*>(p + c * step));
    s[c] = m == ninf ? ninf : s[c] + m;
  }
}

}  // namespace

template <typename T>
void MaskView::apply_row(T* s, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const {
  const char* p = data + (b * sb + h * sh + i * sq + j0 * sk) * elem_size;
  const int64_t step = sk * elem_size;
  const T ninf = -std::numeric_limits<T>::infinity();
  switch (dtype) {
    case at::kBool:
      if (step == 1) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) s[c] = p[c] ? s[c] : ninf;
      } else {
        for (int64_t c = 0; c < n; ++c) s[c] = p[c * step] ? s[c] : ninf;
      }
      break;
    case at::kFloat: add_float_row<T, float>(s, n, p, step); break;
    case at::kDouble: add_float_row<T, double>(s, n, p, step); break;
    case at::kHalf: add_float_row<T, c10::Half>(s, n, p, step); break;
    case at::kBFloat16: add_float_row<T, c10::BFloat16>(s, n, p, step); break;
    default: TORCH_CHECK(false, "mask: unsupported dtype ", dtype);
  }
}
template void MaskView::apply_row<float>(float*, int64_t, int64_t, int64_t, int64_t, int64_t) const;
template void MaskView::apply_row<double>(double*, int64_t, int64_t, int64_t, int64_t, int64_t) const;

namespace {

// Classifies one tile of a mask slice. Rows (columns) that a zero stride makes identical are read once.
// Bool rows with unit key stride: a byte sum per row says none / some / all allowed (vectorizes).
uint8_t classify_bool_rows(const char* base, int64_t sq, int64_t rows, int64_t cols) {
  // torch bools are bytes 0 / 1: an OR and an AND over the tile say whether any / all are allowed.
  uint8_t any = 0, all = 1;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(base + r * sq);
#pragma omp simd reduction(| : any) reduction(& : all)
    for (int64_t c = 0; c < cols; ++c) {
      any |= p[c];
      all &= p[c];
    }
    if (any && !all) return kTilePartial;
  }
  return all ? kTileClean : (any ? kTilePartial : kTileSkip);
}

template <typename E>
uint8_t classify_tile(const char* base, int64_t sq, int64_t sk, int64_t esz, int64_t rows, int64_t cols,
                      bool is_bool) {
  if (sq == 0) rows = 1;
  if (sk == 0) cols = 1;
  if (is_bool && (sk == 1 || cols == 1)) return classify_bool_rows(base, sq, rows, cols);
  bool any_allowed = false, any_work = false;
  for (int64_t r = 0; r < rows; ++r) {
    const char* p = base + r * sq * esz;
    for (int64_t c = 0; c < cols; ++c) {
      const char* e = p + c * sk * esz;
      if (is_bool) {
        if (*e) any_allowed = true; else any_work = true;
      } else {
        const double x = mask_value<E>(e);
        if (x == -std::numeric_limits<double>::infinity()) {
          any_work = true;
        } else {
          any_allowed = true;
          if (x != 0.0) any_work = true;
        }
      }
    }
    if (any_allowed && any_work) return kTilePartial;
  }
  if (!any_allowed) return kTileSkip;
  return any_work ? kTilePartial : kTileClean;
}

template <typename E>
void summarize_slices(const MaskView& m, MaskSummary& out, int64_t n_b, int64_t n_h, int64_t nq, int64_t nk,
                      Tiles t) {
  const int64_t per_slice = out.n_qt * out.n_kt;
  const bool rows_same = m.sq == 0;
  at::parallel_for(0, n_b * n_h * out.n_qt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t qt = idx % out.n_qt, slice = idx / out.n_qt;
      const int64_t b = slice / n_h, h = slice % n_h;
      uint8_t* codes = out.codes.data() + slice * per_slice + qt * out.n_kt;
      if (rows_same && qt > 0) continue;  // filled from tile row 0 below
      const int64_t i0 = qt * t.bm, rows = std::min(t.bm, nq - i0);
      for (int64_t kt = 0; kt < out.n_kt; ++kt) {
        const int64_t j0 = kt * t.bn, cols = std::min(t.bn, nk - j0);
        const char* base = m.data + (b * m.sb + h * m.sh + i0 * m.sq + j0 * m.sk) * m.elem_size;
        codes[kt] = classify_tile<E>(base, m.sq, m.sk, m.elem_size, rows, cols, m.kind == MaskView::kBool);
      }
    }
  });
  if (rows_same) {
    for (int64_t slice = 0; slice < n_b * n_h; ++slice) {
      uint8_t* s = out.codes.data() + slice * per_slice;
      for (int64_t qt = 1; qt < out.n_qt; ++qt) std::copy(s, s + out.n_kt, s + qt * out.n_kt);
    }
  }
}

}  // namespace

MaskSummary summarize_mask(const MaskView& m, int64_t B, int64_t H, int64_t nq, int64_t nk, Tiles t) {
  MaskSummary out;
  if (m.kind == MaskView::kNone) return out;
  out.n_qt = (nq + t.bm - 1) / t.bm;
  out.n_kt = (nk + t.bn - 1) / t.bn;
  out.per_batch = B > 1 && m.sb != 0;
  out.per_head = H > 1 && m.sh != 0;
  const int64_t n_b = out.per_batch ? B : 1, n_h = out.per_head ? H : 1;
  out.n_h_slices = n_h;
  out.codes.assign(n_b * n_h * out.n_qt * out.n_kt, kTileSkip);
  if (nq == 0 || nk == 0) return out;
  MaskView view = m;
  if (!out.per_batch) view.sb = 0;
  if (!out.per_head) view.sh = 0;
  switch (m.dtype) {
    case at::kBool: summarize_slices<bool>(view, out, n_b, n_h, nq, nk, t); break;
    case at::kFloat: summarize_slices<float>(view, out, n_b, n_h, nq, nk, t); break;
    case at::kDouble: summarize_slices<double>(view, out, n_b, n_h, nq, nk, t); break;
    case at::kHalf: summarize_slices<c10::Half>(view, out, n_b, n_h, nq, nk, t); break;
    case at::kBFloat16: summarize_slices<c10::BFloat16>(view, out, n_b, n_h, nq, nk, t); break;
    default: TORCH_CHECK(false, "mask: expected bool or a floating dtype, got ", m.dtype);
  }
  return out;
}

namespace {

// Whether all n bytes equal v (0 or 1; torch bools are bytes 0 / 1).
bool bytes_all(const uint8_t* p, int64_t n, uint8_t v) {
  uint8_t any = 0, all = 1;
#pragma omp simd reduction(| : any) reduction(& : all)
  for (int64_t c = 0; c < n; ++c) {
    any |= p[c];
    all &= p[c];
  }
  return v ? all == 1 : any == 0;
}

}  // namespace

std::optional<SeqBlocks> block_diagonal_blocks(const MaskView& m, int64_t B, int64_t H, int64_t nq, int64_t nk) {
  if (m.kind != MaskView::kBool || nq != nk || nq == 0 || m.sk != 1 || (B > 1 && m.sb != 0) ||
      (H > 1 && m.sh != 0))
    return std::nullopt;
  const int64_t n = nq;
  const auto row = [&](int64_t i) { return reinterpret_cast<const uint8_t*>(m.data) + i * m.sq; };
  SeqBlocks blocks;
  blocks.q.push_back(0);
  for (int64_t s = 0; s < n;) {
    // The block starting at row s ends where that row's run of allowed keys from column s ends.
    const uint8_t* first = row(s);
    int64_t e = s;
    while (e < n && first[e] == 1) ++e;
    if (e == s) return std::nullopt;
    for (int64_t i = s; i < e; ++i) {
      const uint8_t* r = row(i);
      if (!bytes_all(r, s, 0) || !bytes_all(r + s, e - s, 1) || !bytes_all(r + e, n - e, 0)) return std::nullopt;
    }
    blocks.q.push_back(e);
    s = e;
  }
  blocks.k = blocks.q;
  return blocks;
}

namespace {

std::vector<int64_t> read_cu(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.dim() == 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              name, ": expected a 1-D int32/int64 tensor, got ", cu.dim(), "-D ", cu.scalar_type());
  TORCH_CHECK(cu.device().is_cpu(), name, ": expected a CPU tensor, got one on ", cu.device());
  TORCH_CHECK(cu.numel() >= 1, name, ": expected at least one entry, got none");
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + c.numel());
  TORCH_CHECK(v.front() == 0, name, ": expected to start at 0, got ", v.front());
  for (size_t s = 1; s < v.size(); ++s)
    TORCH_CHECK(v[s] >= v[s - 1], name, ": expected non-decreasing offsets, got ", v[s - 1], " then ", v[s],
                " at index ", s);
  TORCH_CHECK(v.back() == total, name, ": expected to end at the token count ", total, ", got ", v.back());
  return v;
}

}  // namespace

SeqBlocks read_blocks(const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t nq,
                      int64_t nk) {
  SeqBlocks s;
  if (!cu_q.has_value()) {
    s.q = {0, nq};
    s.k = {0, nk};
    return s;
  }
  s.q = read_cu(*cu_q, "cu_seqlens_q", nq);
  s.k = read_cu(*cu_k, "cu_seqlens_k", nk);
  TORCH_CHECK(s.q.size() == s.k.size(), "cu_seqlens_k: expected ", s.q.size(), " entries (as cu_seqlens_q), got ",
              s.k.size());
  return s;
}

Problem check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                      const std::optional<at::Tensor>& cu_k, double scale, bool is_causal, double dropout_p,
                      int64_t seed) {
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D [B, Hq, Nq, D] tensor, got ", q.dim(), "-D ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected a 4-D [B, Hk, Nk, D] tensor, got ", k.dim(), "-D ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v: expected a 4-D [B, Hk, Nk, Dv] tensor, got ", v.dim(), "-D ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "q: expected float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "k, v: expected dtype ", dt, " (the query's), got ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "q, k, v: expected CPU tensors, got ", q.device(), ", ", k.device(), ", ", v.device());
  Problem p{};
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Nq = q.size(2);
  p.D = q.size(3);
  p.Hk = k.size(1);
  p.Nk = k.size(2);
  p.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == p.B && v.size(0) == p.B, "k, v: expected batch ", p.B, " (the query's), got ", k.size(0),
              " and ", v.size(0));
  TORCH_CHECK(v.size(1) == p.Hk && v.size(2) == p.Nk, "v: expected [", p.B, ", ", p.Hk, ", ", p.Nk,
              ", Dv] (the key's heads and length), got ", v.sizes());
  TORCH_CHECK(p.Hk >= 1 && p.Hq % p.Hk == 0, "k: expected a head count dividing the query's ", p.Hq, ", got ",
              p.Hk);
  TORCH_CHECK(k.size(3) == p.D, "k: expected head dim ", p.D, " (the query's), got ", k.size(3));
  TORCH_CHECK(p.D >= 1 && p.D <= kMaxHeadDim && p.Dv >= 1 && p.Dv <= kMaxHeadDim,
              "q, v: head dims must be in [1, ", kMaxHeadDim, "], got D=", p.D, ", Dv=", p.Dv);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.B && m.size(1) == p.Hq && m.size(2) == p.Nq && m.size(3) == p.Nk,
                "mask: expected shape [", p.B, ", ", p.Hq, ", ", p.Nq, ", ", p.Nk, "], got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "mask: expected bool or a floating dtype, got ", m.scalar_type());
    TORCH_CHECK(m.device().is_cpu(), "mask: expected a CPU tensor, got one on ", m.device());
    TORCH_CHECK(!cu_q.has_value(), "mask: not supported together with cu_seqlens (varlen)");
    for (int d = 0; d < 4; ++d) TORCH_CHECK(m.stride(d) >= 0, "mask: expected non-negative strides, got ", m.strides());
  }
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q, cu_seqlens_k: expected both or neither");
  p.varlen = cu_q.has_value();
  TORCH_CHECK(!p.varlen || p.B == 1, "q: varlen inputs must have batch 1 ([1, H, T, D]), got batch ", p.B);
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite float, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p: expected a float in [0, 1], got ", dropout_p);
  p.scale = scale;
  p.causal = is_causal;
  p.dropout_p = dropout_p;
  p.seed = seed;
  p.dtype = dt;
  p.compute = dt == at::kDouble ? at::kDouble : at::kFloat;
  p.fp32_gemm = p.compute == at::kFloat ? chosen_fp32_gemm() : Fp32Gemm::kBlas;
  return p;
}

void run_on_threads(const Problem& p, int64_t items, const std::function<void(int64_t)>& body) {
  // A parallel region wakes the other threads even for a few microseconds of work, and on a loaded machine waits
  // for a descheduled one (milliseconds): tiny calls and single items run on the calling thread.
  const double work = double(p.B) * p.Hq * p.Nq * p.Nk * (p.D + p.Dv);
  const int64_t n = work < (1 << 21) ? 1 : std::min<int64_t>(at::get_num_threads(), items);
  if (n <= 1) {
    body(0);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(t);
  });
}

VisitPlan plan_visits(Problem& p, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                      const std::optional<at::Tensor>& cu_k) {
  VisitPlan plan{read_blocks(cu_q, cu_k, p.Nq, p.Nk), MaskView::of(mask)};
  if (auto diag = block_diagonal_blocks(plan.mask, p.B, p.Hq, p.Nq, p.Nk)) {  // dense NaViT mask: run as varlen
    plan.blocks = std::move(*diag);
    plan.mask = MaskView();
    p.varlen = true;
  }
  return plan;
}

}  // namespace vitkern_cpu
