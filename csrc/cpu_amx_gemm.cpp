// amx_gemm (cpu_amx_gemm.h): 32 x 32 output blocks in four accumulator tiles (tmm0-3), two A row tiles (tmm4-5)
// and two B column tiles (tmm6-7), 32 k per step; each loaded tile feeds two tdpbf16ps. B comes in panels of 32
// columns, so a B tile's 16 rows are 128 bytes apart: in one [Kp/2][Np][2] block they would be Np * 4 bytes
// apart, 4 KB for a 1,024-key tile, all 16 rows in one L1 set (measured: 136 cycles per tdpbf16ps at 256 x 1024
// x 64, against 56 on a small L1-resident product). Row tails of 1-31 rows
// run with a second configuration whose tiles have fewer rows, so no tile ever reads or writes past row M.
#include "cpu_amx_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 11)
#include <immintrin.h>
#define VITKERN_AMX_KERNEL 1
#define VITKERN_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#endif

namespace vitkern_cpu {

bool amx_kernel_compiled() {
#if defined(VITKERN_AMX_KERNEL)
  return true;
#else
  return false;
#endif
}

#if defined(VITKERN_AMX_KERNEL)
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration for row blocks of r0 and r1 rows (16 and 16 for whole 32-row blocks; a tail of
// r <= 16 rows runs as one block, r1 = 0) unless the thread already has it. The check reads the live
// configuration (sttilecfg) instead of remembering what was loaded: anything else on the thread (torch's own
// AMX attention, oneDNN's brgemm) may have released or replaced it between two calls, and a tile instruction
// under a released configuration faults. ldtilecfg zeroes every tile, so it is skipped when nothing changed.
VITKERN_AMX_TARGET void configure(int r0, int r1) {
  TileConfig want;
  for (int t = 0; t < 8; ++t) want.colsb[t] = 64;
  want.rows[0] = want.rows[1] = want.rows[4] = uint8_t(r0);  // C rows of block 0, A rows of block 0
  want.rows[2] = want.rows[3] = want.rows[5] = uint8_t(r1 ? r1 : 1);  // unused when r1 == 0, but must be valid
  want.rows[6] = want.rows[7] = 16;  // B: 16 k-pairs
  TileConfig live;
  _tile_storeconfig(&live);
  if (std::memcmp(&live, &want, sizeof want) != 0) _tile_loadconfig(&want);
}

// One block of up to 32 rows (TWO_ROWS: both row tiles) by 16 * NC columns (NC = 1 or 2).
template <bool TWO_ROWS, int NC>
VITKERN_AMX_TARGET inline void block(int64_t Kp, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                                     int64_t np, float* c, int64_t ldc, bool add) {
  // np: B's row stride in columns (a k-pair row holds np column pairs)
  const int64_t sa = lda * 2, sb = np * 4, sc = ldc * 4;
  float* c1 = c + 16 * ldc;
  // Overwritten C rows (score tiles of 64-1,024 keys, in L2) are fetched for ownership ahead of the tile stores,
  // which otherwise wait for each line: 93 -> 78 cycles per tdpbf16ps at 256 x 1024 x 64.
  if (!add) {
    for (int r = 0; r < (TWO_ROWS ? 32 : 16); ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_ET0);
      if (NC == 2) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 16), _MM_HINT_ET0);
    }
  }
  if (add) {
    _tile_loadd(0, c, sc);
    if (NC == 2) _tile_loadd(1, c + 16, sc);
    if (TWO_ROWS) {
      _tile_loadd(2, c1, sc);
      if (NC == 2) _tile_loadd(3, c1 + 16, sc);
    }
  } else {
    _tile_zero(0);
    if (NC == 2) _tile_zero(1);
    if (TWO_ROWS) {
      _tile_zero(2);
      if (NC == 2) _tile_zero(3);
    }
  }
  for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
    const c10::BFloat16* bk = b + k0 * np;  // k-pair k0 / 2 starts at (k0 / 2) * np * 2
    _tile_loadd(4, a + k0, sa);
    _tile_loadd(6, bk, sb);
    if (NC == 2) _tile_loadd(7, bk + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NC == 2) _tile_dpbf16ps(1, 4, 7);
    if (TWO_ROWS) {
      _tile_loadd(5, a + 16 * lda + k0, sa);
      _tile_dpbf16ps(2, 5, 6);
      if (NC == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if (NC == 2) _tile_stored(1, c + 16, sc);
  if (TWO_ROWS) {
    _tile_stored(2, c1, sc);
    if (NC == 2) _tile_stored(3, c1 + 16, sc);
  }
}

// Rows [0, M) (M <= 32 when ROWS_OUTER is false: one strip of rows already configured) against the column
// panels in [n0, n1), reduction [k0, k0 + kc) of Kp.
template <bool TWO_ROWS>
VITKERN_AMX_TARGET void panels(int64_t rows, int64_t n0, int64_t n1, int64_t Np, int64_t Kp, int64_t k0, int64_t kc,
                               const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, float* c, int64_t ldc,
                               bool add) {
  for (int64_t m0 = 0; m0 < rows; m0 += 32)
    for (int64_t s = n0; s < n1; s += 32) {
      const int64_t w = std::min<int64_t>(32, Np - s);
      const c10::BFloat16* bs = b + s * Kp + k0 * w;  // panel s holds Kp / 2 rows of w column pairs
      if (w == 32) block<TWO_ROWS, 2>(kc, a + m0 * lda + k0, lda, bs, w, c + m0 * ldc + s, ldc, add);
      else block<TWO_ROWS, 1>(kc, a + m0 * lda + k0, lda, bs, w, c + m0 * ldc + s, ldc, add);
    }
}

// Whole 32-row strips under one configuration, then the 1-31 tail rows under another.
VITKERN_AMX_TARGET void all_rows(int64_t M, int64_t n0, int64_t n1, int64_t Np, int64_t Kp, int64_t k0, int64_t kc,
                                 const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, float* c, int64_t ldc,
                                 bool add) {
  const int64_t whole = M / 32 * 32, tail = M - whole;
  if (whole) {
    configure(16, 16);
    panels<true>(whole, n0, n1, Np, Kp, k0, kc, a, lda, b, c, ldc, add);
  }
  if (!tail) return;
  configure(tail > 16 ? 16 : int(tail), tail > 16 ? int(tail - 16) : 0);
  if (tail > 16) panels<true>(tail, n0, n1, Np, Kp, k0, kc, a + whole * lda, lda, b, c + whole * ldc, ldc, add);
  else panels<false>(tail, n0, n1, Np, Kp, k0, kc, a + whole * lda, lda, b, c + whole * ldc, ldc, add);
}

}  // namespace

// The operand that fits L1 stays there: with A small (a query tile against many keys) one column panel at a time
// over every row; otherwise row strips over every panel, the reduction in chunks whose B rows fit L1 when B is
// large too (P·V of a long key tile).
VITKERN_AMX_TARGET void amx_gemm(int64_t M, int64_t Np, int64_t Kp, const c10::BFloat16* a, int64_t lda,
                                 const c10::BFloat16* b, float* c, int64_t ldc, bool add) {
  TORCH_CHECK(Kp % 32 == 0 && Np % 16 == 0 && lda >= Kp && ldc >= Np, "vitkern_cpu: amx_gemm shape M=", M,
              " Np=", Np, " Kp=", Kp, " lda=", lda, " ldc=", ldc);
  if (M <= 0 || Np <= 0) return;
  constexpr int64_t kL1Bytes = 32 << 10;
  if (M * Kp * 2 <= kL1Bytes) {
    for (int64_t s = 0; s < Np; s += 32) all_rows(M, s, std::min(Np, s + 32), Np, Kp, 0, Kp, a, lda, b, c, ldc, add);
    return;
  }
  const int64_t kc = std::max<int64_t>(32, kL1Bytes / (Np * 2) / 32 * 32);
  for (int64_t k0 = 0; k0 < Kp; k0 += kc)
    all_rows(M, 0, Np, Np, Kp, k0, std::min(kc, Kp - k0), a, lda, b, c, ldc, add || k0 > 0);
}

VITKERN_AMX_TARGET void amx_strips_begin() { configure(16, 16); }

void amx_check_strip(const AmxStripJob& j) {
  TORCH_CHECK(j.Kp % 32 == 0 && j.Kp > 0 && j.Np % 16 == 0 && j.lda >= j.Kp && j.ldc >= j.Np,
              "vitkern_cpu: amx strip shape Np=", j.Np, " Kp=", j.Kp, " lda=", j.lda, " ldc=", j.ldc);
}

// The k-steps of block() one at a time, the accumulators left in tmm0-3 between calls.
VITKERN_AMX_TARGET void amx_advance(AmxStripJob& j, int64_t steps) {
  for (; steps > 0 && j.col < j.Np; --steps) {
    const bool wide = j.Np - j.col >= 32;  // two 16-column tiles, else the last panel's one
    float* c = j.c + j.col;
    float* c1 = c + 16 * j.ldc;
    const int64_t sc = j.ldc * 4, w = wide ? 32 : 16;
    if (j.k == 0) {
      if (j.add) {
        _tile_loadd(0, c, sc);
        _tile_loadd(2, c1, sc);
        if (wide) {
          _tile_loadd(1, c + 16, sc);
          _tile_loadd(3, c1 + 16, sc);
        }
      } else {
        for (int r = 0; r < 32; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(c + r * j.ldc), _MM_HINT_ET0);
          if (wide) _mm_prefetch(reinterpret_cast<const char*>(c + r * j.ldc + 16), _MM_HINT_ET0);
        }
        _tile_zero(0);
        _tile_zero(2);
        if (wide) {
          _tile_zero(1);
          _tile_zero(3);
        }
      }
    }
    const c10::BFloat16* bk = j.b + j.col * j.Kp + j.k * w;  // panel col, k-pair k / 2
    _tile_loadd(4, j.a + j.k, j.lda * 2);
    _tile_loadd(6, bk, w * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, j.a + 16 * j.lda + j.k, j.lda * 2);
    _tile_dpbf16ps(2, 5, 6);
    if (wide) {
      _tile_loadd(7, bk + 32, w * 4);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    j.k += 32;
    if (j.k < j.Kp) continue;
    _tile_stored(0, c, sc);
    _tile_stored(2, c1, sc);
    if (wide) {
      _tile_stored(1, c + 16, sc);
      _tile_stored(3, c1 + 16, sc);
    }
    j.k = 0;
    j.col += 32;
  }
}

VITKERN_AMX_TARGET void amx_release() { _tile_release(); }

#else

void amx_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*, float*, int64_t,
              bool) {
  TORCH_CHECK(false, "vitkern_cpu: the AMX kernel is not compiled into this build");
}
void amx_strips_begin() { TORCH_CHECK(false, "vitkern_cpu: the AMX kernel is not compiled into this build"); }
void amx_check_strip(const AmxStripJob&) {}
void amx_advance(AmxStripJob&, int64_t) {}
void amx_release() {}

#endif

}  // namespace vitkern_cpu
