// LowpProducts (cpu_tile_products.h): per-tile VNNI packing and the bf16 products of the forward.
#include "cpu_tile_products.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace vitkern_cpu {

// A operand rows [rows][n] padded with zero columns to np (a whole k-pair, or a whole AMX tile row: head_pad),
// or read in place when n == np. Returns the rows and sets *lda.
const bf16* padded_rows(const bf16* src, int64_t ld_src, int64_t rows, int64_t n, int64_t np, std::vector<bf16>& pad,
                        int64_t* lda) {
  if (n == np) {
    *lda = ld_src;
    return src;
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(pad.data() + r * np, src + r * ld_src, n * sizeof(bf16));
    std::fill(pad.data() + r * np + n, pad.data() + (r + 1) * np, bf16(0.0f));
  }
  *lda = np;
  return pad.data();
}

namespace {
// The row stride of bf16 P rows of n entries: an odd number of 64-byte lines, so the 16 rows an AMX tile load
// reads from the A operand fall in different L1 sets (1,024 keys make 2 KB rows: two sets, 16 rows, 12 ways).
// Measured on the own AMX kernel, P·V 256 x 64 x 1024: 78 -> 67 cycles per tdpbf16ps.
int64_t p_stride(int64_t n) { return (n / 32) % 2 ? n : n + 32; }

// What the reduction length of a product over keys or queries (P·V, dQ, dK, dV) is padded to: whole AMX tiles
// (32 bf16 per row) there, whole k-pairs for vdpbf16ps (padding to 32 cost up to 14% more products at N = 197).
int64_t reduction_pad(TilePath path) { return path == TilePath::kAmxBf16 ? 32 : 2; }

bool strips_enabled() {
  const char* e = std::getenv("VITKERN_CPU_FWD_STRIPS");  // read per products object (once per thread and call)
  return !(e && e[0] == '0');
}
}  // namespace

LowpProducts::LowpProducts(Strided<const bf16> q_, Strided<const bf16> k_, Strided<const bf16> v_,
                           const Problem& p, Tiles t, TilePath path_)
    : q(q_), k(k_), v(v_), D(p.D), Dv(p.Dv), Dp(round_up(p.D, head_pad(path_))), Dvp(round_up(p.Dv, 16)),
      scale(float(p.scale)), path(path_), kpad(reduction_pad(path_)) {
  if (Dp != D) q_pad.resize(t.bm * Dp);
  k_tile = Dp * round_up(t.bn, 16);
  v_tile = round_up(t.bn, kpad) * Dvp;
  bn = t.bn;
  p_ld = p_stride(round_up(t.bn, kpad));
  use_strips = b_in_panels(path) && strips_enabled();
  if (use_strips) {
    // Rows past a tile's queries are read by the strip products, never written by the softmax: zero once.
    strip_rows = round_up(t.bm, 32);
    p_lowp.assign(2 * strip_rows * p_ld, bf16(0.0f));
    q_tail.resize(32 * Dp);
  } else {
    p_lowp.resize(t.bm * p_ld);
  }
}

void LowpProducts::start_strips(const QueryTile& w, int64_t hk) {
  start(w);
  pack_keys(w, hk);
  const int64_t mq = w.q1 - w.q0, whole = mq / 32 * 32;
  if (whole == mq) return;
  for (int64_t r = 0; r < 32; ++r) {
    bf16* dst = q_tail.data() + r * Dp;
    if (whole + r < mq) std::memcpy(dst, qa + (whole + r) * lda, Dp * sizeof(bf16));
    else std::fill(dst, dst + Dp, bf16(0.0f));
  }
}

AmxStripJob LowpProducts::score_strip(const QueryTile& w, int64_t j0, int64_t nb, int64_t strip, float* s,
                                      int64_t ld) const {
  AmxStripJob j;
  const bool ragged = 32 * (strip + 1) > w.q1 - w.q0;
  j.a = ragged ? q_tail.data() : qa + 32 * strip * lda;
  j.lda = ragged ? Dp : lda;
  j.b = k_pack.data() + (j0 - w.k_lo) / bn * k_tile;
  j.Np = round_up(nb, 16), j.Kp = Dp, j.c = s, j.ldc = ld;
  amx_check_strip(j);
  return j;
}

AmxStripJob LowpProducts::value_strip(const QueryTile& w, int64_t j0, int64_t nb, const bf16* p, float* o,
                                      bool add) const {
  AmxStripJob j;
  j.a = p, j.lda = p_ld;
  j.b = v_pack.data() + (j0 - w.k_lo) / bn * v_tile;
  j.Np = Dvp, j.Kp = round_up(nb, kpad), j.c = o, j.ldc = Dvp, j.add = add;
  amx_check_strip(j);
  return j;
}

void LowpProducts::start(const QueryTile& w) {
  const bf16* src = q.row(w.b, w.h, w.q0);
  qa = padded_rows(src, q.sn, w.q1 - w.q0, D, Dp, q_pad, &lda);
}

void LowpProducts::pack_keys(const QueryTile& w, int64_t hk) {
  if (w.b == packed_b && hk == packed_hk && w.k_lo == packed_lo && w.k_hi == packed_hi) return;
  const int64_t tiles = (w.k_hi - w.k_lo + bn - 1) / bn;
  if (int64_t(k_pack.size()) < tiles * k_tile) k_pack.resize(tiles * k_tile);
  if (int64_t(v_pack.size()) < tiles * v_tile) v_pack.resize(tiles * v_tile);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t j0 = w.k_lo + t * bn, nb = std::min(bn, w.k_hi - j0);
    pack_vnni_transposed(path, k.row(w.b, hk, j0), k.sn, D, Dp, nb, k_pack.data() + t * k_tile);
    pack_vnni(path, v.row(w.b, hk, j0), v.sn, nb, Dv, kpad, v_pack.data() + t * v_tile);
  }
  packed_b = w.b, packed_hk = hk, packed_lo = w.k_lo, packed_hi = w.k_hi;
}

void LowpProducts::scores(const QueryTile& w, int64_t hk, int64_t j0, int64_t nb, float* s, int64_t ld,
                          bool scaled) {
  const int64_t mq = w.q1 - w.q0;
  pack_keys(w, hk);
  p_k = round_up(nb, kpad);
  lowp_gemm(path, mq, round_up(nb, 16), Dp, qa, lda, k_pack.data() + (j0 - w.k_lo) / bn * k_tile, s, ld, false);
  if (!scaled) return;
  for (int64_t r = 0; r < mq; ++r) {
    float* row = s + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < nb; ++c) row[c] *= scale;
  }
}

void LowpProducts::accumulate_p(const QueryTile& w, int64_t, int64_t j0, float* o, bool add) {
  lowp_gemm(path, w.q1 - w.q0, Dvp, p_k, p_lowp.data(), p_ld, v_pack.data() + (j0 - w.k_lo) / bn * v_tile, o,
            Dvp, add);
}

}  // namespace vitkern_cpu

namespace vitkern_cpu {

namespace {
// The row stride of a float32 accumulator of n columns: whole 16-float lines, an odd number of them, so the 16 rows
// of an AMX tile load or store fall in different L1 sets (512 keys make 2 KB rows: two sets for all 16).
int64_t acc_stride(int64_t n) {
  const int64_t n16 = round_up(n, 16);
  return (n16 / 16) % 2 ? n16 : n16 + 16;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, and 0 for rows <= r < round_up(rows, 16).
void transpose_tile_f32(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  if (sgemm_avx512_compiled()) return transpose_panel_f32(src, ld_src, cols, rows, dst, ld_dst);
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    for (int64_t r = rows; r < round_up(rows, 16); ++r) dst[c * ld_dst + r] = 0.0f;
  }
}
}  // namespace

LowpBackwardProducts::LowpBackwardProducts(Strided<const bf16> q_, Strided<const bf16> k_, Strided<const bf16> v_,
                                           Strided<const bf16> dout_, Strided<bf16> dk_, Strided<bf16> dv_,
                                           const Problem& p, Tiles t, TilePath path_, bool fused_rows_)
    : q(q_), k(k_), v(v_), dout(dout_), dk(dk_), dv(dv_), D(p.D), Dv(p.Dv), Dp(round_up(p.D, head_pad(path_))),
      Dvp(round_up(p.Dv, head_pad(path_))), Dk16(round_up(p.D, 16)), Dv16(round_up(p.Dv, 16)), scale(float(p.scale)),
      path(path_), kpad(reduction_pad(path_)), fused_rows(fused_rows_) {
  const int64_t bn16 = round_up(t.bn, 16), bnk = round_up(t.bn, kpad), bmk = round_up(t.bm, kpad);
  kt_pack.resize(Dp * bn16);
  vt_pack.resize(Dvp * bn16);
  k_pack.resize(bnk * Dk16);
  q_t.resize(D * bmk);
  do_t.resize(Dv * bmk);
  if (Dp != D) q_pad.resize(t.bm * Dp);
  if (Dvp != Dv) do_pad.resize(t.bm * Dvp);
  lowp_a.resize(t.bm * bnk);
  lowp_b.resize(bmk * bn16);
  if (fused_rows) ds_pack.resize(bmk * bn16);
  acc_ld = acc_stride(t.bn);
  dk_acc.resize(D * acc_ld);
  dv_acc.resize(Dv * acc_ld);
  key_rows.resize(t.bn * std::max(Dk16, Dv16));
  dq_tile.resize(t.bm * Dk16);
}

void LowpBackwardProducts::start_keys(const KeyRange& w, int64_t j0, int64_t nb) {
  const bf16* kr = k.row(w.b, w.hk, j0);
  pack_vnni_transposed(path, kr, k.sn, D, Dp, nb, kt_pack.data());
  pack_vnni_transposed(path, v.row(w.b, w.hk, j0), v.sn, Dv, Dvp, nb, vt_pack.data());
  pack_vnni(path, kr, k.sn, nb, D, kpad, k_pack.data());
  std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
  std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
}

void LowpBackwardProducts::start_queries(const KeyRange& w, int64_t h, int64_t i0, int64_t mq) {
  const bf16* qr = q.row(w.b, h, i0);
  const bf16* dor = dout.row(w.b, h, i0);
  qa = padded_rows(qr, q.sn, mq, D, Dp, q_pad, &lda_q);
  doa = padded_rows(dor, dout.sn, mq, Dv, Dvp, do_pad, &lda_do);
  mqk = round_up(mq, kpad);
  transpose_bf16(qr, q.sn, mq, D, q_t.data(), mqk);
  transpose_bf16(dor, dout.sn, mq, Dv, do_t.data(), mqk);
}

void LowpBackwardProducts::scores(const KeyRange&, int64_t, int64_t, int64_t mq, int64_t, int64_t nb, float* s,
                                  int64_t ld, bool scaled) {
  lowp_gemm(path, mq, round_up(nb, 16), Dp, qa, lda_q, kt_pack.data(), s, ld, false);
  row_ld = round_up(nb, kpad);
  if (!scaled) return;
  for (int64_t r = 0; r < mq; ++r) {
    float* row = s + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < nb; ++c) row[c] *= scale;
  }
}

void LowpBackwardProducts::dprobs(const KeyRange&, int64_t, int64_t, int64_t mq, int64_t, int64_t nb, float* dp,
                                  int64_t ld) {
  lowp_gemm(path, mq, round_up(nb, 16), Dvp, doa, lda_do, vt_pack.data(), dp, ld, false);
}

// acc[rows, nb] += a[rows, mqk] · x[mq, nb] with x bf16 rows (stride ld) packed as the B operand: a is Qᵀ for dKᵀ,
// dOᵀ for dVᵀ.
void LowpBackwardProducts::add_transposed(const bf16* a, int64_t rows, const bf16* x, int64_t ld, int64_t mq,
                                          int64_t nb, float* acc) {
  pack_vnni(path, x, ld, mq, nb, kpad, lowp_b.data());
  lowp_gemm(path, rows, round_up(nb, 16), mqk, a, mqk, lowp_b.data(), acc, acc_ld, true);
}

void LowpBackwardProducts::add_dv(const KeyRange&, int64_t, int64_t, int64_t mq, int64_t, int64_t nb,
                                  const float* pr, int64_t ld, bool) {
  const int64_t nbk = round_up(nb, kpad);
  for (int64_t r = 0; r < mq; ++r) round_row_bf16(pr + r * ld, nb, nbk, lowp_a.data() + r * nbk);
  add_transposed(do_t.data(), Dv, lowp_a.data(), nbk, mq, nb, dv_acc.data());
}

void LowpBackwardProducts::add_dk(const KeyRange&, int64_t, int64_t, int64_t mq, int64_t, int64_t nb,
                                  const float* ds, int64_t ld, bool) {
  const int64_t nbk = round_up(nb, kpad);
  for (int64_t r = 0; r < mq; ++r) round_row_bf16(ds + r * ld, nb, nbk, lowp_a.data() + r * nbk);
  add_transposed(q_t.data(), D, lowp_a.data(), nbk, mq, nb, dk_acc.data());
}

// dQ[mq, D] += factor · dS · K with dS as bf16 rows of nbk (the key count padded to kpad): straight into dQ when
// the head dim fills whole 16-column vectors, else through dq_tile.
void LowpBackwardProducts::dq_from(const bf16* ds, int64_t mq, int64_t nbk, float factor, float* dq, int64_t ldq) {
  if (Dk16 == D && factor == 1.0f) return lowp_gemm(path, mq, Dk16, nbk, ds, nbk, k_pack.data(), dq, ldq, true);
  lowp_gemm(path, mq, Dk16, nbk, ds, nbk, k_pack.data(), dq_tile.data(), Dk16, false);
  for (int64_t r = 0; r < mq; ++r) {
    float* dst = dq + r * ldq;
    const float* src = dq_tile.data() + r * Dk16;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) dst[c] += factor * src[c];
  }
}

void LowpBackwardProducts::add_dq(const KeyRange&, int64_t mq, int64_t, int64_t nb, const float* ds, int64_t ld,
                                  float* dq, int64_t ldq) {
  const int64_t nbk = round_up(nb, kpad);
  for (int64_t r = 0; r < mq; ++r) round_row_bf16(ds + r * ld, nb, nbk, lowp_a.data() + r * nbk);
  dq_from(lowp_a.data(), mq, nbk, scale, dq, ldq);
}

void LowpBackwardProducts::add_from_pairs(int64_t mq, int64_t nb, float* dq, int64_t ldq) {
  const int64_t np = round_up(nb, 16);
  const int64_t k0 = round_up(mq, 2);  // the pass wrote the pairs up to k0 (an odd mq's last with a zero row)
  // Zero pairs past them up to the reduction padding: Qᵀ and dOᵀ are zero there too, but what an earlier pair
  // left in the buffers may be NaN (a NaN key of another key tile), and 0 · NaN is NaN.
  if (k0 < mqk) {
    const VnniLayout at = pairs(nb);
    for (int64_t n0 = 0; n0 < np; n0 += at.panel) {
      const int64_t w = std::min(at.panel, np - n0);  // each pair row of a panel holds 2 w elements
      std::fill_n(lowp_b.data() + at.offset(k0, n0), (mqk - k0) * w, bf16(0.0f));
      std::fill_n(ds_pack.data() + at.offset(k0, n0), (mqk - k0) * w, bf16(0.0f));
    }
  }
  lowp_gemm(path, Dv, np, mqk, do_t.data(), mqk, lowp_b.data(), dv_acc.data(), acc_ld, true);
  lowp_gemm(path, D, np, mqk, q_t.data(), mqk, ds_pack.data(), dk_acc.data(), acc_ld, true);
  dq_from(lowp_a.data(), mq, row_ld, 1.0f, dq, ldq);
}

// Rows j0 .. j0 + nb of `out` (kv head w.hk) = bf16(factor · accᵀ), acc the [cols][acc_ld] transposed accumulator.
void LowpBackwardProducts::store_keys(const float* acc, int64_t cols, int64_t nb, float factor, Strided<bf16> out,
                                      const KeyRange& w, int64_t j0) {
  const int64_t ld = round_up(cols, 16);
  transpose_tile_f32(acc, acc_ld, cols, nb, key_rows.data(), ld);
  for (int64_t c = 0; c < nb; ++c)
    round_row_bf16(key_rows.data() + c * ld, cols, cols, out.row(w.b, w.hk, j0 + c), factor);
}

void LowpBackwardProducts::finish_keys(const KeyRange& w, int64_t j0, int64_t nb, bool live) {
  if (!live) {  // no query reached these keys (masked out, causal, empty rows): zero gradients
    for (int64_t c = 0; c < nb; ++c) {
      bf16* dkr = dk.row(w.b, w.hk, j0 + c);
      bf16* dvr = dv.row(w.b, w.hk, j0 + c);
      std::fill(dkr, dkr + D, bf16(0.0f));
      std::fill(dvr, dvr + Dv, bf16(0.0f));
    }
    return;
  }
  store_keys(dk_acc.data(), D, nb, fused_rows ? 1.0f : scale, dk, w, j0);  // fused dS rows: already scaled
  store_keys(dv_acc.data(), Dv, nb, 1.0f, dv, w, j0);
}

}  // namespace vitkern_cpu
