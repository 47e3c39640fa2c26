// What the fused CPU attention kernels share: the checked problem description (shapes, strides, options), the
// dense-mask view and its per-tile summary, varlen sequence blocks, tile sizes and the operand preparation.
// The layout contract is vitkern/backends/base.py: q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv],
// mask [B, Hq, Nq, Nk] (any strides, zeros from broadcasting), varlen as B == 1 with cu_seqlens.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "cpu_blas.h"

namespace vitkern_cpu {

constexpr int64_t kMaxHeadDim = 256;

// A [B, H, N, X] operand with a unit-stride last dim: element strides of the first three dims.
template <typename T>
struct Strided {
  T* data = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
  T* row(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1), t.stride(2)};
}

// An uninitialized [b, h, n, d] tensor stored as [b, n, h, d]: the output layout of backends/base.py empty_bhnd.
inline at::Tensor empty_bhnd(int64_t b, int64_t h, int64_t n, int64_t d, at::ScalarType dt) {
  return at::empty({b, n, h, d}, at::TensorOptions().dtype(dt)).transpose(1, 2);
}

// The tensor as a BLAS operand in the compute dtype: unit stride along the last dim and a row stride of at
// least the row length. Already-fitting float32/float64 tensors are used in place (no copy).
at::Tensor gemm_operand(const at::Tensor& t, at::ScalarType compute);

// Tile sizes (queries x keys). VITKERN_CPU_TILES="BMxBN" overrides them, for tuning and tests;
// VITKERN_CPU_FWD_TILES / VITKERN_CPU_BWD_TILES one pass's only, ahead of it.
struct Tiles {
  int64_t bm, bn;
  // Row stride of score tiles: rounded up to 16 floats so every row starts on a 64-byte vector boundary, and to
  // an odd number of 64-byte lines: at 1,024 keys (4 KB) every row would start in the same L1 set, and the 16
  // rows of one AMX tile store (or of a GEMM's C block) would evict each other.
  int64_t ld() const {
    const int64_t ld16 = (bn + 15) / 16 * 16;
    return (ld16 / 16) % 2 ? ld16 : ld16 + 16;
  }
};
// Unmasked inputs take large tiles (fewer BLAS calls and softmax rescales); masked and varlen ones smaller
// tiles, so skipping is finer. Declared after Problem below.
struct Problem;
Tiles forward_tiles(const Problem& p, bool masked);
// The largest tile of at most `cap` that splits n into equal parts (197 -> 4 x 50, not 3 x 64 + 5).
int64_t balanced(int64_t n, int64_t cap);
Tiles backward_tiles(const Problem& p, bool masked);

// A dense mask, read element by element only in tiles its summary marks partial.
struct MaskView {
  enum Kind : uint8_t { kNone, kBool, kFloat } kind = kNone;
  at::ScalarType dtype = at::kBool;
  const char* data = nullptr;  // byte pointer; element strides below
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  int64_t elem_size = 1;

  static MaskView of(const std::optional<at::Tensor>& mask);
  // Adds the mask to scores s[0, n) of row i, columns j0.. (float) or sets dropped ones to -inf (bool).
  template <typename T>
  void apply_row(T* s, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const;
};

enum TileCode : uint8_t { kTileSkip = 0, kTileClean = 1, kTilePartial = 2 };

// Per (query tile, key tile) of each distinct mask slice: skip (nothing takes part), clean (everything takes
// part, no mask work) or partial (apply the mask element-wise). A mask broadcast over batch or heads (stride 0)
// has one slice there, summarized once.
struct MaskSummary {
  int64_t n_qt = 0, n_kt = 0, n_h_slices = 1;
  bool per_batch = false, per_head = false;
  std::vector<uint8_t> codes;
  const uint8_t* tiles_of(int64_t b, int64_t h) const {
    const int64_t slice = (per_batch ? b : 0) * n_h_slices + (per_head ? h : 0);
    return codes.data() + slice * n_qt * n_kt;
  }
};
MaskSummary summarize_mask(const MaskView& m, int64_t B, int64_t H, int64_t nq, int64_t nk, Tiles t);

// Varlen blocks: sequence s owns queries [q[s], q[s+1]) and keys [k[s], k[s+1]). Dense is one block.
struct SeqBlocks {
  std::vector<int64_t> q, k;
  int64_t count() const { return int64_t(q.size()) - 1; }
};
SeqBlocks read_blocks(const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t nq,
                      int64_t nk);

// A bool mask that is the same for every batch and head and is block-diagonal with square blocks tiling [0, N)
// (a packed NaViT batch given as a dense mask) is served as varlen blocks: no mask reads, no partial tiles.
// Returns the blocks, or nothing (then the tile summary serves). Scans the mask once, stopping at the first
// row that breaks the pattern.
std::optional<SeqBlocks> block_diagonal_blocks(const MaskView& m, int64_t B, int64_t H, int64_t nq, int64_t nk);

// Checked sizes and options common to forward and backward.
struct Problem {
  int64_t B, Hq, Hk, Nq, Nk, D, Dv;
  double scale;
  bool causal;
  double dropout_p;
  int64_t seed;
  bool varlen;
  at::ScalarType dtype, compute;
  Fp32Gemm fp32_gemm = Fp32Gemm::kBlas;  // the GEMM of float32 tile products (chosen_fp32_gemm())
};
Problem check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                      const std::optional<at::Tensor>& cu_k, double scale, bool is_causal, double dropout_p,
                      int64_t seed);

// The blocks a call visits and the mask it still has to read: varlen blocks from cu_seqlens (dense: one block),
// or, for a dense block-diagonal bool mask, that mask's blocks with no mask left (p.varlen is then set).
struct VisitPlan {
  SeqBlocks blocks;
  MaskView mask;
};
VisitPlan plan_visits(Problem& p, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                      const std::optional<at::Tensor>& cu_k);

// Runs body(thread_index) on up to min(threads, items) worker threads (a tiny problem on the calling thread alone);
// work inside is taken from a shared atomic counter so uneven items (varlen, causal, skipped tiles) balance.
// Results never depend on which thread took which item.
void run_on_threads(const Problem& p, int64_t items, const std::function<void(int64_t)>& body);

}  // namespace vitkern_cpu
