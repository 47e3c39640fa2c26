// Fused attention forward on CPU: for each tile of queries, an online softmax over tiles of keys with fp32
// (fp64 for float64) accumulators, never an Nq x Nk buffer. Tiles a mask summary marks empty are skipped, clean
// tiles get no mask work, causal tiles past the diagonal are never visited. Saves the log-sum-exp for the
// backward. Memory beyond the inputs: one bm x bn score tile and one bm x Dv accumulator per thread, plus the
// float32 copies of bf16/fp16 operands (O(N·D)) on the fp32 path; the bf16 path reads bf16 operands in place and
// packs one key tile at a time (cpu_tile_products.h).
#include "cpu_attn_fwd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_attn_plan.h"
#include "cpu_attn_work.h"
#include "cpu_blas.h"
#include "cpu_dropout.h"
#include "cpu_features.h"
#include "cpu_lowp_softmax.h"
#include "cpu_prefetch.h"
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
  bool stream_out = false;  // float32 output rows written with streaming stores (streams_output)
};

// What the softmax of one key tile's rows needs to know about the tile.
struct KeyTile {
  int64_t j0, nb;
  uint8_t code;     // kTileClean / kTilePartial (mask summary)
  bool causal_cut;  // some pair of the tile lies above the diagonal
  bool raw;         // bf16 paths: the scores are raw dot products, the scale goes into the exp
};

template <typename T, bool kLowp>
KeyTile key_tile(const ForwardArgs<T>& a, const QueryTile& w, int64_t j0, uint8_t code) {
  const Problem& p = *a.p;
  KeyTile t{j0, std::min(a.tiles.bn, w.k_hi - j0), code, false, false};
  // Some pair of this tile lies above the diagonal when its last key is past the first query's reach.
  t.causal_cut = p.causal && j0 + t.nb - 1 > w.q0 + w.causal_shift;
  // The bf16 paths take raw dot products and fold the scale into the exp's FMA: max(scale·s) = scale·max(s)
  // for scale > 0 (rounding is monotone). An additive mask needs scaled scores, dropout a float32 P row.
  if constexpr (kLowp)
    t.raw = p.scale > 0 && !a.dropout.active && !(code == kTilePartial && a.mask.kind == MaskView::kFloat);
  return t;
}

// Row r (query w.q0 + r) of a key tile's scores s: mask, causal cut, the online max and sum (m, l), P (bf16 row
// p_row of p_k entries on the reduced-precision paths, in place in s otherwise), the accumulator row o rescaled
// when o_live. scale_first: s holds raw dot products that must be scaled here (!t.raw on the strip path).
// No tile products to interleave (forward_tile).
struct NoFeed {
  static constexpr bool kActive = false;
  void tick() {}
};

// kExpChunk scores per piece of the exp pass when tile products are fed between the pieces (forward_tile_strips).
constexpr int64_t kExpChunk = 128;

template <typename T, bool kLowp, typename Feed = NoFeed>
inline void softmax_row(const ForwardArgs<T>& a, const QueryTile& w, const KeyTile& t, int64_t r, T* s,
                        bf16* p_row, int64_t p_k, T* m, T* l, T* o, bool o_live, bool scale_first,
                        Feed& feed) {
  const Problem& p = *a.p;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t i = w.q0 + r, nb = t.nb;
  if (scale_first) scale_row(s, nb, T(p.scale));
  if (t.code == kTilePartial) a.mask.apply_row(s, nb, w.b, w.h, i, t.j0);
  if (t.causal_cut) {
    const int64_t allowed = std::max<int64_t>(0, std::min(nb, i + w.causal_shift - t.j0 + 1));
    fill_row(s + allowed, nb - allowed, ninf);
  }
  // row_max skips NaN scores; the sum below keeps them.
  const T m_new = std::max(*m, t.raw ? T(p.scale) * row_max(s, nb) : row_max(s, nb));
  feed.tick();
  if (m_new == ninf) {  // nothing taken part in this row so far, unless a score is NaN
    if (has_nan(s, nb)) *l = std::numeric_limits<T>::quiet_NaN();  // stays NaN: l * alpha + sum
    if constexpr (kLowp) fill_row(p_row, p_k, bf16(0.0f));
    else fill_row(s, nb, T(0));
    return;
  }
  const T alpha = exp_poly(*m - m_new);  // 0 when the row had no key yet
  T sum;
  if constexpr (kLowp) {
    if (a.dropout.active) {
      sum = exp_shift_sum(s, nb, m_new);
      a.dropout.apply_row(s, nb, a.dropout.row_state(w.b * p.Hq + w.h, i), t.j0);
      round_row_bf16(s, nb, p_k, p_row);
    } else if constexpr (Feed::kActive) {
      // In pieces of kExpChunk, a few tile k-steps queued between them (forward_tile_strips).
      const float c = t.raw ? float(p.scale) * kLog2e : kLog2e, b = m_new * kLog2e;
      sum = 0;
      for (int64_t i0 = 0; i0 < nb; i0 += kExpChunk) {
        const bool last = i0 + kExpChunk >= nb;
        sum += exp2_row_to_bf16(s + i0, last ? nb - i0 : kExpChunk, last ? p_k - i0 : kExpChunk, c, b, p_row + i0);
        feed.tick();
      }
    } else {
      sum = exp2_row_to_bf16(s, nb, p_k, t.raw ? float(p.scale) * kLog2e : kLog2e, m_new * kLog2e, p_row);
    }
  } else {
    sum = exp_shift_sum(s, nb, m_new);
    if (a.dropout.active) a.dropout.apply_row(s, nb, a.dropout.row_state(w.b * p.Hq + w.h, i), t.j0);
  }
  *l = *l * alpha + sum;
  *m = m_new;
  if (o_live && alpha != T(1)) scale_row(o, p.Dv, alpha);
}

// Whether the float32 output is written with streaming stores, which skip the read of each line a store
// otherwise waits for. Only when the call's inputs and output together overflow the last-level cache, so the
// output would not stay cached for whoever reads it next anyway (ViT-B/16 at batch 32: 76 MB against a 32 MB L3),
// and only where the rows suit 32-byte stores. VITKERN_CPU_STREAM_OUT=0 / 1 forces it off / on (for measuring).
// Measured on a 2-core Zen 3 EPYC, fp32 forward, 2 threads, against the output rows fetched for writing during
// P·V: ViT-B/16 and CCT-7 at batch 32 +1.5%.
bool streams_output(const at::Tensor& out, int64_t input_bytes) {
  if (!can_stream_rows(out.data_ptr<float>(), out.size(3), out.stride(2))) return false;
  const char* env = std::getenv("VITKERN_CPU_STREAM_OUT");
  if (env && (env[0] == '0' || env[0] == '1')) return env[0] == '1';
  return input_bytes + int64_t(out.nbytes()) > last_level_cache_bytes();
}

// The output rows O / l (rounded to bf16 on the bf16 paths) and the log-sum-exp of a finished query tile.
template <typename T>
void store_rows(const ForwardArgs<T>& a, const QueryTile& w, const T* o_buf, int64_t ldo, const T* m_buf,
                const T* l_buf) {
  const Problem& p = *a.p;
  const int64_t mq = w.q1 - w.q0, dv = p.Dv;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T keep_scale = T(a.dropout.active ? a.dropout.keep_scale : 1.0);
  T* lse = a.lse + (w.b * p.Hq + w.h) * p.Nq + w.q0;
  for (int64_t r = 0; r < mq; ++r) {
    const T l = l_buf[r];
    const T inv = l == T(0) ? T(0) : keep_scale / l;  // a NaN l (a NaN score) gives a NaN row
    const T* acc = o_buf + r * ldo;
    if constexpr (std::is_same_v<T, float>) {
      if (a.out_bf16.data) {
        round_row_bf16(acc, dv, dv, a.out_bf16.row(w.b, w.h, w.q0 + r), inv);
        continue;
      }
    }
    T* o = a.out.row(w.b, w.h, w.q0 + r);
    if constexpr (std::is_same_v<T, float>) {
      if (a.stream_out) {
        stream_scaled_row(o, acc, dv, inv);
        continue;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < dv; ++c) o[c] = acc[c] * inv;
  }
  if (a.stream_out) stream_fence();
  // Separate loop: a libm call inside the row loop above would spill its registers on every row.
  for (int64_t r = 0; r < mq; ++r)
    lse[r] = l_buf[r] == T(0) ? ninf : m_buf[r] + std::log(l_buf[r]);
}

// Output row r of w fetched for writing, while the last key tile's softmax runs (cpu_prefetch.h).
template <typename T>
inline void prefetch_output_row(const ForwardArgs<T>& a, const QueryTile& w, int64_t r) {
  if (a.out_bf16.data) prefetch_for_write(a.out_bf16.row(w.b, w.h, w.q0 + r), 2 * a.p->Dv);
  else prefetch_for_write(a.out.row(w.b, w.h, w.q0 + r), int64_t(sizeof(T)) * a.p->Dv);
}

template <typename T>
void queue_output_rows(LinesAhead& ahead, const ForwardArgs<T>& a, const QueryTile& w) {
  const int64_t rows = w.q1 - w.q0;
  if (a.out_bf16.data) ahead.add(a.out_bf16.row(w.b, w.h, w.q0), rows, 2 * a.out_bf16.sn, 2 * a.p->Dv, true);
  else ahead.add(a.out.row(w.b, w.h, w.q0), rows, int64_t(sizeof(T)) * a.out.sn, int64_t(sizeof(T)) * a.p->Dv, true);
}

// The first key of the last key tile a query tile visits (w.k_hi when it visits none).
template <typename T>
int64_t last_visited(const ForwardArgs<T>& a, const QueryTile& w, const uint8_t* codes) {
  const int64_t bn = a.tiles.bn;
  if (w.k_hi <= w.k_lo) return w.k_hi;
  for (int64_t j0 = w.k_lo + (w.k_hi - w.k_lo - 1) / bn * bn; j0 >= w.k_lo; j0 -= bn)
    if (codes == nullptr || codes[(j0 - w.k_lo) / bn] != kTileSkip) return j0;
  return w.k_hi;
}

// What the key tile at j0 of w should fetch while its softmax runs: the K and V rows of w's next key tile, or
// after the last one the query rows and first key tile of `next` (the thread's next item, if any); K and V only
// when the products have not packed that key tile already. K and V are capped at kAheadBytes: a 1024-key fp32
// tile (512 KB) would evict the current tile's own working set.
constexpr int64_t kAheadBytes = 128 * 1024;

template <typename Products>
void queue_inputs(LinesAhead& ahead, const Products& prod, const Problem& p, int64_t bn, const QueryTile& w,
                  int64_t j0, const QueryTile* next) {
  using E = std::remove_const_t<std::remove_pointer_t<decltype(prod.q.data)>>;
  constexpr int64_t e = sizeof(E);
  ahead.clear();
  const QueryTile* keys_of = &w;
  int64_t k0 = j0 + bn;
  if (k0 >= w.k_hi) {
    if (next == nullptr) return;
    keys_of = next, k0 = next->k_lo;
    ahead.add(prod.q.row(next->b, next->h, next->q0), next->q1 - next->q0, prod.q.sn * e, p.D * e);
  }
  const int64_t hk = keys_of->h / (p.Hq / p.Hk);
  if (prod.keys_packed(keys_of->b, hk, keys_of->k_lo, keys_of->k_hi, k0)) return;
  const int64_t rows = std::min({bn, keys_of->k_hi - k0, kAheadBytes / ((p.D + p.Dv) * e)});
  ahead.add(prod.k.row(keys_of->b, hk, k0), rows, prod.k.sn * e, p.D * e);
  ahead.add(prod.v.row(keys_of->b, hk, k0), rows, prod.v.sn * e, p.Dv * e);
}

template <typename T, typename Products>
void forward_tile(const ForwardArgs<T>& a, Products& prod, const QueryTile& w, const QueryTile* next,
                  LinesAhead* ahead, T* s_buf, T* o_buf, T* m_buf, T* l_buf) {
  const Problem& p = *a.p;
  const int64_t bn = a.tiles.bn, ld = a.tiles.ld();
  const int64_t mq = w.q1 - w.q0, hk = w.h / (p.Hq / p.Hk), ldo = prod.o_ld();
  prod.start(w);
  const uint8_t* codes = a.summary ? a.summary->tiles_of(w.b, w.h) + w.qt * a.summary->n_kt : nullptr;

  fill_row(m_buf, mq, -std::numeric_limits<T>::infinity());
  fill_row(l_buf, mq, T(0));
  bool o_live = false;  // the accumulator is written by the first visited tile's product (beta = 0)
  const int64_t j_last = last_visited(a, w, codes);
  // The own AVX2 GEMM issues the queued fetches between its micro-kernel calls; otherwise they go between rows.
  const bool gemm_fetches = ahead && prod.takes_ahead();

  for (int64_t j0 = w.k_lo; j0 < w.k_hi; j0 += bn) {
    const uint8_t code = codes ? codes[(j0 - w.k_lo) / bn] : uint8_t(kTileClean);
    if (code == kTileSkip) continue;
    const KeyTile t = key_tile<T, Products::kLowp>(a, w, j0, code);
    if (ahead) queue_inputs(*ahead, prod, p, bn, w, j0, next);
    prod.ahead = gemm_fetches ? ahead : nullptr;
    if constexpr (Products::kLowp) prod.scores(w, hk, j0, t.nb, s_buf, ld, /*scaled=*/!t.raw);
    else prod.scores(w, hk, j0, t.nb, s_buf, ld);
    NoFeed none;
    const bool fetch_out = j0 == j_last && !a.stream_out;  // the output rows, for store_rows
    const int64_t per_row = ahead && !gemm_fetches ? (ahead->lines() + mq - 1) / mq : 0;
    for (int64_t r = 0; r < mq; ++r) {
      if (per_row) ahead->issue(per_row);
      if constexpr (Products::kLowp)
        softmax_row<T, true>(a, w, t, r, s_buf + r * ld, prod.p_row(r), prod.p_k, m_buf + r, l_buf + r,
                             o_buf + r * ldo, o_live, false, none);
      else
        softmax_row<T, false>(a, w, t, r, s_buf + r * ld, nullptr, 0, m_buf + r, l_buf + r, o_buf + r * ldo,
                              o_live, false, none);
      if (fetch_out && !gemm_fetches) prefetch_output_row(a, w, r);
    }
    if (gemm_fetches && fetch_out) {
      // The output rows, fetched for writing between P·V's micro-kernel calls: store_rows follows it.
      ahead->clear();
      queue_output_rows(*ahead, a, w);
    }
    prod.ahead = gemm_fetches && fetch_out ? ahead : nullptr;
    if constexpr (Products::kLowp) prod.accumulate_p(w, hk, j0, o_buf, o_live);
    else prod.accumulate(w, hk, j0, t.nb, s_buf, ld, o_buf, o_live);
    o_live = true;
  }
  if (!o_live) fill_row(o_buf, mq * ldo, T(0));  // no key tile at all: rows are empty
  store_rows(a, w, o_buf, ldo, m_buf, l_buf);
}

// The k-steps of two strip products owed to one softmax row, spread over its slots (after the row max, after
// each piece of the exp pass): P·V's first, then Q·Kᵀ's.
struct StripFeed {
  static constexpr bool kActive = true;
  AmxStripJob values, scores;
  int64_t owed = 0, slots = 0;
  void run(int64_t n) {
    owed -= n;
    const int64_t v = std::min(n, values.steps_left());
    amx_advance(values, v);
    amx_advance(scores, n - v);
  }
  void tick() { run(slots > 1 ? (owed + slots - 1) / slots-- : owed); }
};

// The own AMX kernel's forward (LowpProducts::strips()): the query tile as 32-row strips, and the steps (key
// tile, strip) as a software pipeline. While the vector units run step t's softmax, the tile unit runs P·V of
// step t - 1 and Q·Kᵀ of step t + 1, their k-steps spread evenly between the softmax rows so both sit in the
// out-of-order window at once (forward_tile ran the products and the softmax one after the other). Two score
// and two P buffers, by key tile parity: with one strip per tile, step t + 1's scores and step t's P would
// otherwise overwrite what step t still reads. s_bufs: 2 x strip_rows rows of ld; o_buf: strip_rows rows.
void forward_tile_strips(const ForwardArgs<float>& a, LowpProducts& prod, const QueryTile& w, float* s_bufs,
                         float* o_buf, float* m_buf, float* l_buf, std::vector<KeyTile>& tiles) {
  const Problem& p = *a.p;
  const int64_t bn = a.tiles.bn, ld = a.tiles.ld(), ldo = prod.o_ld(), rows32 = prod.strip_rows;
  const int64_t mq = w.q1 - w.q0, hk = w.h / (p.Hq / p.Hk), strips = (mq + 31) / 32;
  const uint8_t* codes = a.summary ? a.summary->tiles_of(w.b, w.h) + w.qt * a.summary->n_kt : nullptr;
  tiles.clear();
  for (int64_t j0 = w.k_lo; j0 < w.k_hi; j0 += bn) {
    const uint8_t code = codes ? codes[(j0 - w.k_lo) / bn] : uint8_t(kTileClean);
    if (code != kTileSkip) tiles.push_back(key_tile<float, true>(a, w, j0, code));
  }
  fill_row(m_buf, mq, -std::numeric_limits<float>::infinity());
  fill_row(l_buf, mq, 0.0f);
  if (tiles.empty()) {  // no key tile at all: rows are empty
    fill_row(o_buf, mq * ldo, 0.0f);
    return store_rows(a, w, o_buf, ldo, m_buf, l_buf);
  }
  prod.start_strips(w, hk);
  amx_strips_begin();
  const int64_t steps = int64_t(tiles.size()) * strips;
  const auto s_of = [&](int64_t t) { return s_bufs + ((t / strips) % 2 * rows32 + t % strips * 32) * ld; };
  const auto p_of = [&](int64_t t) { return prod.p_rows((t / strips) % 2) + t % strips * 32 * prod.p_ld; };
  const auto score_job = [&](int64_t t) {
    const KeyTile& kt = tiles[t / strips];
    return prod.score_strip(w, kt.j0, kt.nb, t % strips, s_of(t), ld);
  };
  const auto value_job = [&](int64_t t) {
    const KeyTile& kt = tiles[t / strips];
    return prod.value_strip(w, kt.j0, kt.nb, p_of(t), o_buf + t % strips * 32 * ldo, t >= strips);
  };
  StripFeed feed;
  feed.scores = score_job(0);
  amx_advance(feed.scores, feed.scores.steps_left());
  for (int64_t t = 0; t < steps; ++t) {
    const KeyTile& kt = tiles[t / strips];
    const int64_t r0 = t % strips * 32, rows = std::min<int64_t>(32, mq - r0), p_k = round_up(kt.nb, prod.kpad);
    feed.scores = t + 1 < steps ? score_job(t + 1) : AmxStripJob{};
    feed.values = t > 0 ? value_job(t - 1) : AmxStripJob{};
    // One strip per tile: P·V of step t - 1 writes the rows this softmax rescales, so it runs first.
    if (strips == 1) amx_advance(feed.values, feed.values.steps_left());
    float* s = s_of(t);
    bf16* pr = p_of(t);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t left = feed.values.steps_left() + feed.scores.steps_left();
      feed.owed = (left + rows - r - 1) / (rows - r);
      feed.slots = 1 + (kt.nb + kExpChunk - 1) / kExpChunk;
      softmax_row<float, true>(a, w, kt, r0 + r, s + r * ld, pr + r * prod.p_ld, p_k, m_buf + r0 + r, l_buf + r0 + r,
                               o_buf + (r0 + r) * ldo, t >= strips, !kt.raw, feed);
      feed.run(feed.owed);  // what a short path through the row (dropout, an empty row) left
      if (t / strips + 1 == int64_t(tiles.size())) prefetch_output_row(a, w, r0 + r);
    }
  }
  AmxStripJob values = value_job(steps - 1);
  amx_advance(values, values.steps_left());
  store_rows(a, w, o_buf, ldo, m_buf, l_buf);
}

// make_products() builds one tile-products object per thread (they hold per-thread packing buffers).
template <typename T, typename MakeProducts>
void run_forward(const ForwardArgs<T>& a, const std::vector<QueryTile>& items, const MakeProducts& make_products) {
  std::atomic<int64_t> next{0};
  run_on_threads(*a.p, int64_t(items.size()), [&](int64_t) {
    const BlasSingleThreadScope one_blas_thread;
    auto prod = make_products();
    bool strips = false;
    if constexpr (decltype(prod)::kLowp) strips = prod.strips();
    // The strip path's products write whole 32-row strips, scores into two buffers.
    const int64_t rows = strips ? round_up(a.tiles.bm, 32) : a.tiles.bm;
    std::vector<T> s_buf((strips ? 2 : 1) * rows * a.tiles.ld()), o_buf(rows * prod.o_ld()), m_buf(a.tiles.bm),
        l_buf(a.tiles.bm);
    std::vector<KeyTile> visit;
    LinesAhead ahead;
    const int64_t n = int64_t(items.size());
    const char* knob = std::getenv("VITKERN_CPU_FETCH_AHEAD");  // 0: off, for measuring it
    const bool fetch_ahead = !(knob && knob[0] == '0');
    // Each item is claimed one ahead, so its inputs can be fetched while the current one computes.
    for (int64_t idx = next.fetch_add(1), after = idx < n ? next.fetch_add(1) : n; idx < n;
         idx = after, after = idx < n ? next.fetch_add(1) : n) {
      if constexpr (decltype(prod)::kLowp) {
        if (strips) {
          forward_tile_strips(a, prod, items[idx], s_buf.data(), o_buf.data(), m_buf.data(), l_buf.data(), visit);
          continue;
        }
      }
      forward_tile<T>(a, prod, items[idx], after < n ? &items[after] : nullptr, fetch_ahead ? &ahead : nullptr,
                      s_buf.data(), o_buf.data(), m_buf.data(), l_buf.data());
    }
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
    if constexpr (std::is_same_v<scalar_t, float>)
      // Not into a float32 staging copy (fp16 inputs): out.copy_ reads it straight back.
      a.stream_out = !direct_bf16 && out_acc.is_same(out) &&
                     streams_output(out_acc, int64_t(q.nbytes() + k.nbytes() + v.nbytes()));
    run_forward_on_path<scalar_t>(a, items, path, q, k, v, p, tiles);
  });
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return {out, lse};
}

}  // namespace vitkern_cpu
