// The tile products of the fused CPU kernels, one type per path (cpu_features.h), so the kernels' softmax and
// mask bookkeeping is written once. Each type owns the operands and any per-thread packing buffers:
//   BlasProducts<T>  float32/float64 operands (bf16/fp16 inputs converted to float32) through the BLAS;
//   LowpProducts     bf16 operands on the dot-product units (AMX: own kernel or oneDNN's brgemm; vdpbf16ps):
//                    B operands packed per tile into VNNI, P rounded to bf16 before P·V, fp32 accumulators.
// Products write fp32 (fp64) score tiles at row stride ld and an output accumulator at row stride o_ld().
#pragma once
#include <type_traits>
#include <vector>

#include "cpu_attn_plan.h"
#include "cpu_amx_gemm.h"
#include "cpu_attn_work.h"
#include "cpu_blas.h"
#include "cpu_lowp_gemm.h"
#include "cpu_sgemm_avx2.h"
#include "cpu_sgemm_avx512.h"

namespace vitkern_cpu {

// Rows [lo, hi) of K (or V) of (b, h) transposed into one [D][ld] panel for the own AVX-512 GEMM, which then reads
// it in place as B; kept until another (b, h, lo, hi) is asked for.
template <typename T>
struct KeysTransposed {
  std::vector<T> panel;
  int64_t b = -1, h = -1, lo = -1, hi = -1, ld = 0;
  // The panel's column j0 - lo, or nullptr when the products do not run on the own AVX-512 GEMM.
  const T* columns(Fp32Gemm gemm, Strided<const T> x, int64_t b_, int64_t h_, int64_t lo_, int64_t hi_, int64_t d,
                   int64_t j0) {
    if constexpr (!std::is_same_v<T, float>) return nullptr;
    else {
      if (gemm != Fp32Gemm::kAvx512) return nullptr;
      if (b_ != b || h_ != h || lo_ != lo || hi_ != hi) {
        ld = panel_ld(hi_ - lo_);
        if (int64_t(panel.size()) < d * ld) panel.resize(d * ld);
        transpose_panel_f32(x.row(b_, h_, lo_), x.sn, d, hi_ - lo_, panel.data(), ld);
        b = b_, h = h_, lo = lo_, hi = hi_;
      }
      return panel.data() + (j0 - lo);
    }
  }
};

// K and V of keys [lo, hi) of (b, hk) as the own AVX2 GEMM's packed B panels (sgemm_avx2_pack), one block per
// key tile, each packed when first used and kept until another (b, hk, lo, hi) is asked for: the query tiles of
// a long sequence (16 of 4,096 tokens) and of a masked one (32-query tiles) then share one packing of K and V
// instead of each repacking every key tile.
struct KeyPanelsAvx2 {
  std::vector<float> k, v;
  std::vector<uint8_t> ready;
  int64_t b = -1, hk = -1, lo = -1, hi = -1, bn = 0, k_tile = 0, v_tile = 0;
  // The panels of key tile [j0, j0 + nb) of the range: Kᵀ (D x nb) into *kp, V (nb x Dv) into *vp.
  void tile(Strided<const float> ks, Strided<const float> vs, int64_t b_, int64_t hk_, int64_t lo_, int64_t hi_,
            int64_t bn_, int64_t D, int64_t Dv, int64_t j0, int64_t nb, const float** kp, const float** vp) {
    if (b_ != b || hk_ != hk || lo_ != lo || hi_ != hi || bn_ != bn) {
      b = b_, hk = hk_, lo = lo_, hi = hi_, bn = bn_;
      k_tile = sgemm_avx2_panels_size(bn, D), v_tile = sgemm_avx2_panels_size(Dv, bn);
      const int64_t tiles = (hi - lo + bn - 1) / bn;
      if (int64_t(k.size()) < tiles * k_tile) k.resize(tiles * k_tile);
      if (int64_t(v.size()) < tiles * v_tile) v.resize(tiles * v_tile);
      ready.assign(tiles, 0);
    }
    const int64_t t = (j0 - lo) / bn;
    float* kt = k.data() + t * k_tile;
    float* vt = v.data() + t * v_tile;
    if (!ready[t]) {
      sgemm_avx2_pack(/*b_trans=*/true, nb, D, ks.row(b, hk, j0), ks.sn, kt);
      sgemm_avx2_pack(/*b_trans=*/false, Dv, nb, vs.row(b, hk, j0), vs.sn, vt);
      ready[t] = 1;
    }
    *kp = kt, *vp = vt;
  }
  bool holds(int64_t b_, int64_t hk_, int64_t lo_, int64_t hi_, int64_t j0) const {
    return b_ == b && hk_ == hk && lo_ == lo && hi_ == hi && ready[(j0 - lo) / bn];
  }
};

template <typename T>
struct BlasProducts {
  static constexpr bool kLowp = false;
  Strided<const T> q, k, v;
  int64_t D, Dv;
  T scale;
  Fp32Gemm own;  // p.fp32_gemm
  // With the own AVX-512 GEMM, Kᵀ of keys [k_lo, k_hi) of (b, hk) as one panel (transpose_panel_f32), made when a
  // query tile of another key range starts: the query tiles of a long sequence reuse it.
  KeysTransposed<T> kt;
  // With the own AVX2 GEMM (float only), the key tiles' K and V panels, shared by the query tiles of a key range.
  KeyPanelsAvx2 panels;
  const float *k_panel = nullptr, *v_panel = nullptr;  // the current key tile's, set by scores()
  int64_t bn;

  BlasProducts(Strided<const T> q_, Strided<const T> k_, Strided<const T> v_, const Problem& p, Tiles t)
      : q(q_), k(k_), v(v_), D(p.D), Dv(p.Dv), scale(T(p.scale)), own(p.fp32_gemm), bn(t.bn) {}
  int64_t o_ld() const { return Dv; }
  void start(const QueryTile&) {}
  // The lines to fetch during the next scores() (forward_tile's queue_inputs); the products take them only on
  // the own AVX2 GEMM (takes_ahead()), between its micro-kernel calls.
  LinesAhead* ahead = nullptr;
  bool takes_ahead() const { return own == Fp32Gemm::kAvx2; }
  // Whether key tile j0 of keys [lo, hi) of (b, hk) is packed already, so its K and V rows will not be read.
  bool keys_packed(int64_t b, int64_t hk, int64_t lo, int64_t hi, int64_t j0) const {
    return own == Fp32Gemm::kAvx2 && panels.holds(b, hk, lo, hi, j0);
  }
  // S[mq, nb] = scale · Q[q0:q1] · K[j0:j0+nb]ᵀ of query head w.h, kv head hk.
  void scores(const QueryTile& w, int64_t hk, int64_t j0, int64_t nb, T* s, int64_t ld) {
    const int64_t mq = w.q1 - w.q0;
    if constexpr (std::is_same_v<T, float>) {
      if (own == Fp32Gemm::kAvx2) {
        panels.tile(k, v, w.b, hk, w.k_lo, w.k_hi, bn, D, Dv, j0, nb, &k_panel, &v_panel);
        return sgemm_avx2_packed(mq, nb, D, scale, q.row(w.b, w.h, w.q0), q.sn, k_panel, 0.0f, s, ld, ahead);
      }
    }
    if (const T* panel = kt.columns(own, k, w.b, hk, w.k_lo, w.k_hi, D, j0))
      return gemm_nn<T>(mq, nb, D, scale, q.row(w.b, w.h, w.q0), q.sn, panel, kt.ld, T(0), s, ld, own);
    gemm_nt<T>(mq, nb, D, scale, q.row(w.b, w.h, w.q0), q.sn, k.row(w.b, hk, j0), k.sn, T(0), s, ld, own);
  }
  // O[mq, Dv] (+)= P[mq, nb] · V[j0:j0+nb].
  void accumulate(const QueryTile& w, int64_t hk, int64_t j0, int64_t nb, const T* s, int64_t ld, T* o, bool add) {
    if constexpr (std::is_same_v<T, float>)
      if (own == Fp32Gemm::kAvx2)
        return sgemm_avx2_packed(w.q1 - w.q0, Dv, nb, 1.0f, s, ld, v_panel, add, o, Dv, ahead);
    gemm_nn<T>(w.q1 - w.q0, Dv, nb, T(1), s, ld, v.row(w.b, hk, j0), v.sn, T(add ? 1 : 0), o, Dv, own);
  }
  void finish() {}
};

// A operand rows [rows][n] padded with zero columns to np, or read in place when n == np (sets *lda).
const bf16* padded_rows(const bf16* src, int64_t ld_src, int64_t rows, int64_t n, int64_t np, std::vector<bf16>& pad,
                        int64_t* lda);

struct LowpProducts {
  static constexpr bool kLowp = true;  // forward_tile writes P as bf16 rows (p_row) and calls accumulate_p
  Strided<const bf16> q, k, v;
  int64_t D, Dv, Dp, Dvp;  // Dp: D padded to head_pad (cpu_lowp_gemm.h), Dvp: Dv rounded up to 16 (output columns)
  float scale;
  TilePath path;
  int64_t kpad;  // the key count of P·V is padded to a multiple of this (cpu_tile_products.cpp)
  std::vector<bf16> q_pad, k_pack, v_pack, p_lowp;
  const bf16* qa = nullptr;  // the query tile as the A operand (in place, or q_pad when D % head_pad != 0)
  // p_k: the current key tile's count padded to kpad (P·V's reduction length); p_ld: p_lowp's row stride, fixed
  int64_t lda = 0, p_k = 0, p_ld = 0;
  // k_pack / v_pack hold every key tile of keys [k_lo, k_hi) of (b, hk), packed when a query tile of another
  // key range starts: a long sequence's query tiles (256 of 4096) reuse them instead of repacking each.
  int64_t packed_b = -1, packed_hk = -1, packed_lo = -1, packed_hi = -1, k_tile = 0, v_tile = 0, bn = 0;

  LowpProducts(Strided<const bf16> q_, Strided<const bf16> k_, Strided<const bf16> v_, const Problem& p, Tiles t,
               TilePath path_);
  int64_t o_ld() const { return Dvp; }
  void start(const QueryTile& w);
  LinesAhead* ahead = nullptr;  // never taken: forward_tile fetches between its softmax rows
  bool takes_ahead() const { return false; }
  bool keys_packed(int64_t b, int64_t hk, int64_t lo, int64_t hi, int64_t) const {
    return b == packed_b && hk == packed_hk && lo == packed_lo && hi == packed_hi;
  }
  // S = Q·Kᵀ of the tile, times scale when `scaled` (else the raw dot products; the exp pass applies the scale).
  void scores(const QueryTile& w, int64_t hk, int64_t j0, int64_t nb, float* s, int64_t ld, bool scaled);
  // Row r of the bf16 P tile of the current key tile: p_k entries, those past nb zero.
  bf16* p_row(int64_t r) { return p_lowp.data() + r * p_ld; }
  // O[mq, Dvp] (+)= P · V[j0:j0+nb] with P the bf16 rows written through p_row.
  void accumulate_p(const QueryTile& w, int64_t hk, int64_t j0, float* o, bool add);
  void finish() { lowp_release(path); }

  // The own AMX kernel's forward (forward_tile_strips in cpu_attn_fwd.cpp): the query tile as whole 32-row strips,
  // each product one AmxStripJob. P rows live in two buffers (p_rows(0), p_rows(1)) of round_up(bm, 32) rows.
  // Off with VITKERN_CPU_FWD_STRIPS=0 (forward_tile's order instead, for measuring one against the other).
  bool strips() const { return use_strips; }
  // Packs the keys of w, and copies a ragged last strip of its queries into q_tail (zero rows past the tile).
  void start_strips(const QueryTile& w, int64_t hk);
  // S[strip] = Q[strip] · K[j0 : j0 + nb]ᵀ, raw dot products, into s (row stride ld).
  AmxStripJob score_strip(const QueryTile& w, int64_t j0, int64_t nb, int64_t strip, float* s, int64_t ld) const;
  // O[strip] (+)= P[strip] · V[j0 : j0 + nb], P the strip's bf16 rows (stride p_ld), O at stride o_ld().
  AmxStripJob value_strip(const QueryTile& w, int64_t j0, int64_t nb, const bf16* p, float* o, bool add) const;
  bf16* p_rows(int64_t buffer) { return p_lowp.data() + buffer * strip_rows * p_ld; }
  int64_t strip_rows = 0;  // round_up(bm, 32) when strips()

 private:
  void pack_keys(const QueryTile& w, int64_t hk);
  std::vector<bf16> q_tail;  // [32][Dp]
  bool use_strips = false;
};

// The backward's five products for one key tile [j0, j0 + nb) of kv head w.hk against query tile [i0, i0 + mq)
// of query head h: S = scale·Q·Kᵀ, dP = dO·Vᵀ, dV += Pᵀ·dO, dK += scale·dSᵀ·Q, dQ += scale·dS·K. dK and dV
// accumulate across the key tile's query tiles (add: not the first); finish_keys() stores them.
template <typename T>
struct BlasBackwardProducts {
  static constexpr bool kLowp = false;  // the kernel zero-fills dK/dV rows no query reached (finish_keys does not)
  Strided<const T> q, k, v, dout;
  Strided<T> dk, dv;
  int64_t D, Dv;
  T scale;
  Fp32Gemm own;  // p.fp32_gemm
  KeysTransposed<T> kt, vt;  // Kᵀ and Vᵀ of the key tile for the own AVX-512 GEMM, made once per key tile

  BlasBackwardProducts(Strided<const T> q_, Strided<const T> k_, Strided<const T> v_, Strided<const T> dout_,
                       Strided<T> dk_, Strided<T> dv_, const Problem& p, Tiles)
      : q(q_), k(k_), v(v_), dout(dout_), dk(dk_), dv(dv_), D(p.D), Dv(p.Dv), scale(T(p.scale)),
        own(p.fp32_gemm) {}
  void start_keys(const KeyRange&, int64_t, int64_t) {}
  void start_queries(const KeyRange&, int64_t, int64_t, int64_t) {}
  void scores(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, T* s, int64_t ld) {
    if (const T* panel = kt.columns(own, k, w.b, w.hk, j0, j0 + nb, D, j0))
      return gemm_nn<T>(mq, nb, D, scale, q.row(w.b, h, i0), q.sn, panel, kt.ld, T(0), s, ld, own);
    gemm_nt<T>(mq, nb, D, scale, q.row(w.b, h, i0), q.sn, k.row(w.b, w.hk, j0), k.sn, T(0), s, ld, own);
  }
  void dprobs(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, T* dp, int64_t ld) {
    if (const T* panel = vt.columns(own, v, w.b, w.hk, j0, j0 + nb, Dv, j0))
      return gemm_nn<T>(mq, nb, Dv, T(1), dout.row(w.b, h, i0), dout.sn, panel, vt.ld, T(0), dp, ld, own);
    gemm_nt<T>(mq, nb, Dv, T(1), dout.row(w.b, h, i0), dout.sn, v.row(w.b, w.hk, j0), v.sn, T(0), dp, ld, own);
  }
  void add_dv(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, const T* pr,
              int64_t ld, bool add) {
    gemm_tn<T>(nb, Dv, mq, T(1), pr, ld, dout.row(w.b, h, i0), dout.sn, T(add ? 1 : 0), dv.row(w.b, w.hk, j0),
               dv.sn, own);
  }
  void add_dk(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, const T* ds,
              int64_t ld, bool add) {
    gemm_tn<T>(nb, D, mq, scale, ds, ld, q.row(w.b, h, i0), q.sn, T(add ? 1 : 0), dk.row(w.b, w.hk, j0), dk.sn, own);
  }
  void add_dq(const KeyRange& w, int64_t mq, int64_t j0, int64_t nb, const T* ds, int64_t ld, T* dq, int64_t ldq) {
    gemm_nn<T>(mq, D, nb, scale, ds, ld, k.row(w.b, w.hk, j0), k.sn, T(1), dq, ldq, own);
  }
  void finish_keys(const KeyRange&, int64_t, int64_t, bool) {}
  void finish() {}
};

// bf16 backward: K and V of the key tile are packed once (Kᵀ and Vᵀ for S and dP, K for dQ), Q and dO once per
// query tile (as A rows for S and dP, transposed for dK and dV); P and dS are rounded to bf16. dK and dV accumulate
// transposed, dKᵀ += Qᵀ·dS and dVᵀ += dOᵀ·P, in fp32 tiles owned by the thread: P and dS then enter as B operands,
// whose VNNI packing interleaves row pairs, instead of as transposed A operands (a 16x16 transpose per block of
// every (key tile, query tile) pair, 9% of a PiT-64 step); only the small Qᵀ and dOᵀ are transposed per pair,
// and the accumulators once per key tile, when finish_keys stores them as bf16 rows. dQ goes through a tile too
// (padded columns never touch a neighbouring head's rows) unless the head dim is a multiple of 16 and dS already
// carries the scale (the fused rows): then it accumulates straight into dQ.
// Two ways in: float32 P and dS tiles (add_dv / add_dk / add_dq: dropout and the mask gradient need them), or,
// with fused_rows, the kernel's pair pass (softmax_grad_pair_to_bf16) writes dS rows through ds_row and P and dS
// straight into the packed B operands (p_pack, ds_pack, layout pairs()), ds already times the scale.
struct LowpBackwardProducts {
  static constexpr bool kLowp = true;  // finish_keys stores bf16 dK/dV rows, zeros where no query reached them
  Strided<const bf16> q, k, v, dout;
  Strided<bf16> dk, dv;
  int64_t D, Dv, Dp, Dvp, Dk16, Dv16;  // Dp/Dvp: padded to head_pad; Dk16/Dv16: to 16 (product columns)
  float scale;
  TilePath path;
  int64_t kpad;  // reduction lengths over keys or queries are padded to a multiple of this
  bool fused_rows;  // the kernel writes bf16 P and scale·dS (ds_row, p_pack, ds_pack) instead of float32 tiles
  std::vector<bf16> kt_pack, vt_pack, k_pack, q_t, do_t, q_pad, do_pad, lowp_a, lowp_b, ds_pack;
  // dk_acc [D][acc_ld], dv_acc [Dv][acc_ld]: dKᵀ and dVᵀ of the key tile; key_rows: one of them as [nb][16-padded]
  std::vector<float> dk_acc, dv_acc, dq_tile, key_rows;
  int64_t acc_ld = 0;
  const bf16 *qa = nullptr, *doa = nullptr;
  int64_t lda_q = 0, lda_do = 0, mqk = 0;  // mqk: the query count rounded up to kpad (q_t's and do_t's row stride)
  int64_t row_ld = 0;  // row stride of the bf16 dS rows: the key tile's count padded to kpad

  LowpBackwardProducts(Strided<const bf16> q_, Strided<const bf16> k_, Strided<const bf16> v_,
                       Strided<const bf16> dout_, Strided<bf16> dk_, Strided<bf16> dv_, const Problem& p, Tiles t,
                       TilePath path_, bool fused_rows_);
  void start_keys(const KeyRange& w, int64_t j0, int64_t nb);
  void start_queries(const KeyRange& w, int64_t h, int64_t i0, int64_t mq);
  // S = Q·Kᵀ, times scale when `scaled` (else the raw dot products: the fused rows fold the scale into the exp).
  void scores(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, float* s, int64_t ld,
              bool scaled = true);
  void dprobs(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, float* dp, int64_t ld);
  void add_dv(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, const float* pr,
              int64_t ld, bool add);
  void add_dk(const KeyRange& w, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nb, const float* ds,
              int64_t ld, bool add);
  void add_dq(const KeyRange& w, int64_t mq, int64_t j0, int64_t nb, const float* ds, int64_t ld, float* dq,
              int64_t ldq);
  // The fused pass of the current (key tile, query tile) pair: dS row r (row_ld entries, zero past the key count),
  // and P and dS as B operands of mqk rows (pairs(nb): where row k, column n goes; zero past the key count).
  bf16* ds_row(int64_t r) { return lowp_a.data() + r * row_ld; }
  bf16* p_pack() { return lowp_b.data(); }
  bf16* ds_packed() { return ds_pack.data(); }
  VnniLayout pairs(int64_t nb) const { return vnni_layout(path, mqk, round_up(nb, 16)); }
  // dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K from the fused pass over mq queries and nb keys.
  void add_from_pairs(int64_t mq, int64_t nb, float* dq, int64_t ldq);
  void finish_keys(const KeyRange& w, int64_t j0, int64_t nb, bool live);
  void finish() { lowp_release(path); }

 private:
  void add_transposed(const bf16* a, int64_t rows, const bf16* x, int64_t ld, int64_t mq, int64_t nb, float* acc);
  void store_keys(const float* acc, int64_t cols, int64_t nb, float factor, Strided<bf16> out, const KeyRange& w,
                  int64_t j0);
  void dq_from(const bf16* ds, int64_t mq, int64_t nbk, float factor, float* dq, int64_t ldq);
};

}  // namespace vitkern_cpu
