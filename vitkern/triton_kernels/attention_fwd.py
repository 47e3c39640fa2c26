"""Forward attention kernel: out = softmax(q k^T * scale + mask) v with an online softmax, and the LSE.

Features
- one kernel for dense [B, H, N, D] batches and packed varlen batches (IS_VARLEN: cu_seqlens with a device-side
  program map, zero-length sequences, Nq != Nk, no host sync);
- dense masks (MASK_KIND 1 bool / 2 float; stride-0 broadcast dims are never materialized), with a per-tile
  summary (mask_summary.py): each query tile walks lists of its full tiles (the unmasked loop body, no mask
  read, no branch) and then of its partial ones; empty tiles are never visited. A bool mask is read packed,
  a bit per pair (mask_bits.py: 1-D word loads per row, a bit test and a select per score), a float mask
  through its strides, or on sm_90+ as TMA tiles (MASK_TMA, mask_operand.py: 16-bit entries with rows of
  their own, copied once into 16-byte-aligned rows where needed);
- causal (top-left aligned, per sequence for varlen), grouped-query attention (Hq a multiple of Hk);
- fp16 / bf16 / fp32 (fp32 products are exact, input_precision="ieee", unless tf32x3 / tf32 is opted into
  with VITKERN_TRITON_FP32_PRECISION, see config.py);
- head dims 1..256 in one or two power-of-two column chunks >= 16 (80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32,
  config.head_split), the rest of a chunk masked off; Dv may differ from D;
- dropout with vitkern/dropout.py's counter-based hash (bit-exact), the same keep-mask regenerated backward;
- a row with no key gives out = 0 and lse = -inf; a NaN score of a taking-part pair gives a NaN row and lse;
- one FFMA + one EX2 per score: exp2(s * c - m * c) with the product exact inside the FFMA (no rounding of
  s * c on its own, so large logits lose nothing), c = scale * log2(e) applied to the row max of the raw dots;
- the key loop is split: interior tiles (left of the diagonal, inside the sequence) run without causal or bounds
  checks, only the last / diagonal tiles pay for them; causal grids start with the longest rows;
- block sizes: config.py's spill-free table, or on a GPU the fastest of a few candidates around it, timed once
  per key (head dims, dtype, mask kind, causal, varlen, dropout; never lengths) by autotune.py.
Limits
- head dims > 256 are not served (register/shared-memory budget); float64 is not served;
- the mask summary, a bool mask's packing and a float mask's aligned copy are remembered while the mask is
  unchanged (tensor_memo.py); a mask is assumed not to change between the forward and the backward;
- Q / K / V tiles come through TMA descriptors on sm_90+ without a mask or dropout (config.use_tma: 16-bit,
  16-byte aligned strides; VITKERN_TRITON_TMA=0 turns it off), pointer tiles elsewhere (sm_80, fp32, odd
  strides, masks and dropout, the interpreter unless VITKERN_TRITON_TMA=1); the output stays a pointer store
  (a TMA store would write past a packed sequence's end); no warp specialization (Triton's Hopper pass
  duplicates or rejects this kernel, benchmarks/NOTES.md).
"""
import math

import torch
import triton
import triton.language as tl

from . import autotune, config, varlen_map
from .mask_operand import float_tiles_by_tma, mask_kind, mask_operand
from .mask_summary import row_lists, tile_summary
from .tile_ops import (LN2, LOG2E, chunk_columns, dropout_keep, list_ends, load_rows, load_tma_rows, mask_scores,
                       query_block_of_program, query_tile_mask, store_rows, tile_at)

LOG2E_HOST = 1 / math.log(2)


@triton.jit
def _fma(a, b, c, EMULATE: tl.constexpr):
    """a * b + c with one rounding: FFMA on a GPU. Triton's interpreter rounds a * b first (numpy), which at
    large logits costs ~1e-3 in an exponent; there the exact product is formed in float64 instead."""
    if EMULATE:
        r = (a.to(tl.float64) * b + c).to(tl.float32)
    else:
        r = tl.fma(a, b, c)
    return r


@triton.jit
def _fwd_tiles(acc, acc2, m_i, o_i, l_i, q, q2, k_base, v_base, kv_descs, b, hk, mask_base, mask_tile, order_base,
               t_lo, t_hi,
               offs_m, rows, k_start, q_len, k_len, head_dim, head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd,
               stride_mn, stride_tn, scale, to_log2, seed, bh, drop_threshold, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
               MASK_KIND: tl.constexpr, LISTED: tl.constexpr, HAS_DROPOUT: tl.constexpr, CAUSAL: tl.constexpr,
               CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, EVEN_D: tl.constexpr, RAW_MAX: tl.constexpr,
               EMULATE_FMA: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, IS_VARLEN: tl.constexpr,
               MASK_TMA: tl.constexpr):
    """Online-softmax update of (acc, acc2, m_i, o_i, l_i) over key tiles [t_lo, t_hi), or, LISTED, over the key
    tiles at positions [t_lo, t_hi) of the list at order_base (mask_summary.row_lists). MASK_KIND != 0: read
    the mask on every tile (the lists hand only partial tiles to such a loop: no branch, whose merged scores
    would make Triton move the whole score tile through shared memory).

    Head dims come in up to two column chunks (config.head_split): q / k columns [0, BLOCK_D) and, when
    BLOCK_D2 > 0, [BLOCK_D, BLOCK_D + BLOCK_D2) in q2 (s sums both products); v / out likewise with acc2.

    m_i is the running row max of s, o_i = m_i * to_log2 (rounded) the log2 offset the exponentials use (l_i
    and acc are relative to it). RAW_MAX: s is the raw dot q.k and ``to_log2`` = scale * log2(e) (needs
    scale > 0 and no float mask: rounding is monotone, so max(s) * c is the max of the scaled scores: one multiply
    per row, not per score); otherwise s = q.k * scale + bias and ``to_log2`` = log2(e). Either way a score costs
    one FFMA (s * to_log2 - o_i, the product exact before the one rounding) and one EX2. Dropout's 1 / (1 - p)
    is applied to the output once, not per score.

    USE_TMA: K / V tiles come through the TMA descriptors kv_descs = (k, k2, v, v2) (config.tma_descriptor; b, hk
    their batch and head coordinates) instead of pointer tiles; V rows past a packed sequence's end are zeroed
    (keys past it are masked in the scores already). MASK_TMA: a float mask's tiles through the descriptor of
    mask_tile = (descriptor, batch, head, first row) (mask_operand.py), not through mask_base."""
    offs_d, offs_d2 = chunk_columns(BLOCK_D, BLOCK_D2)
    offs_dv, offs_dv2 = chunk_columns(BLOCK_DV, BLOCK_DV2)
    k_desc, k_desc2, v_desc, v_desc2 = kv_descs
    if not USE_TMA:
        # One scalar 64-bit base per tensor advances a tile per step; the per-element offsets inside a tile are
        # loop-invariant int32 (rebuilding 64-bit pointers from the indices costs ~5 instructions per load).
        if not LISTED:
            first = k_start + t_lo * BLOCK_N
            k_tile = k_base + first * stride_kn
            v_tile = v_base + first * stride_vn
        offs_j = tl.arange(0, BLOCK_N)
        k_offs = offs_j[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_offs = offs_j[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        k_offs2 = offs_j[:, None] * stride_kn + offs_d2[None, :] * stride_kd
        v_offs2 = offs_j[:, None] * stride_vn + offs_dv2[None, :] * stride_vd
    for i in range(t_lo, t_hi):
        t = tile_at(order_base, i, stride_tn, LISTED)
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_TMA or LISTED:
            first = k_start + t * BLOCK_N
        if not USE_TMA:
            if LISTED:
                k_at = k_base + first * stride_kn
                v_at = v_base + first * stride_vn
            else:
                k_at = k_tile
                v_at = v_tile
        if USE_TMA:
            k = load_tma_rows(k_desc, b, hk, first, 0, offs_n, k_len, BLOCK_N, BLOCK_D, False)
        else:
            k = load_rows(k_at + k_offs, offs_n, k_len, offs_d, head_dim, not CHECK_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            if USE_TMA:
                k2 = load_tma_rows(k_desc2, b, hk, first, BLOCK_D, offs_n, k_len, BLOCK_N, BLOCK_D2, False)
            else:
                k2 = load_rows(k_at + k_offs2, offs_n, k_len, offs_d2, head_dim, not CHECK_N, EVEN_D)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
        if not RAW_MAX:
            s = s * scale
        m_ptrs = query_tile_mask(mask_base, mask_tile, offs_m, offs_n, t * BLOCK_N, q_len, stride_mn, MASK_KIND,
                                 MASK_TMA)
        s = mask_scores(s, offs_m, offs_n, t * BLOCK_N, q_len, k_len, m_ptrs, MASK_KIND, CAUSAL, CHECK_M, CHECK_N,
                        MASK_TMA)
        m_i = tl.maximum(m_i, tl.max(s, 1))
        o_new = m_i * to_log2
        # A row with no key so far keeps o = -inf; subtracting 0 instead keeps exp2 from making NaN. Without a
        # mask, causal or bounds a score is -inf only by inf arithmetic, whose row is NaN anyway. A NaN score is
        # not caught here (max drops it) but reaches p, l and acc, so its row ends NaN.
        o_use = o_new
        if MASK_KIND != 0 or CAUSAL or CHECK_N:
            o_use = tl.where(o_new == float("-inf"), 0.0, o_new)
        p = tl.math.exp2(_fma(s, to_log2, -o_use[:, None], EMULATE_FMA))
        alpha = tl.math.exp2(o_i - o_use)
        o_i = o_new
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if BLOCK_DV2 > 0:
            acc2 = acc2 * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, bh, rows, k_start + offs_n.to(tl.int64), drop_threshold)
            p = tl.where(keep, p, 0.0)
        if USE_TMA:
            v = load_tma_rows(v_desc, b, hk, first, 0, offs_n, k_len, BLOCK_N, BLOCK_DV, IS_VARLEN and CHECK_N)
        else:
            v = load_rows(v_at + v_offs, offs_n, k_len, offs_dv, head_dim_v, not CHECK_N, EVEN_D)
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
        if BLOCK_DV2 > 0:
            if USE_TMA:
                v2 = load_tma_rows(v_desc2, b, hk, first, BLOCK_DV, offs_n, k_len, BLOCK_N, BLOCK_DV2,
                                   IS_VARLEN and CHECK_N)
            else:
                v2 = load_rows(v_at + v_offs2, offs_n, k_len, offs_dv2, head_dim_v, not CHECK_N, EVEN_D)
            acc2 = tl.dot(p, v2, acc2, input_precision=PRECISION)
        if not LISTED and not USE_TMA:
            k_tile += BLOCK_N * stride_kn
            v_tile += BLOCK_N * stride_vn
    return acc, acc2, m_i, o_i, l_i


@triton.jit(do_not_specialize=["num_m_blocks", "seq_len_q", "seq_len_k", "seed", "drop_threshold"])
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, Mask, TileOrder, TileEnds, CuQ, CuK, BlockSeq, BlockStart, QD, QD2, KD, KD2, VD, VD2, MD,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_rb, stride_rh, stride_rm,
    num_heads, groups, num_m_blocks, seq_len_q, seq_len_k, head_dim, head_dim_v,
    scale, to_log2, seed, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SUMMARY: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    RAW_MAX: tl.constexpr, EMULATE_FMA: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    MASK_TMA: tl.constexpr,
):
    # RAW_MAX with a float mask: raw scores (one FFMA and one EX2 a score) on the mask-free full tiles, scaled
    # ones (the bias is in their units) on the partial tiles after them.
    BIAS_SCALED: tl.constexpr = RAW_MAX and MASK_KIND == 2 and HAS_SUMMARY
    tail_to_log2 = to_log2      # the last loop's (the partial tiles' under BIAS_SCALED), which the LSE takes too
    if BIAS_SCALED:
        tail_to_log2 = LOG2E
    b, h, hk, pid_m, pid_bh, m_start, q_start, q_len, k_start, k_len = query_block_of_program(
        tl.program_id(0), num_m_blocks, num_heads, groups, BlockSeq, BlockStart, CuQ, CuK, seq_len_q, seq_len_k,
        BLOCK_M, IS_CAUSAL, IS_VARLEN)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = q_start + offs_m.to(tl.int64)          # token index in the (packed) sequence
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_rows = Q + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qm
    # Under TMA, Q comes through a descriptor too: warp specialization hands every load of the loop's operands
    # to the producer warps, and those issue only TMA copies. Rows past a packed sequence's end are the next
    # sequence's queries; their rows are never stored.
    if USE_TMA:
        q = load_tma_rows(QD, b, h, q_start + m_start, 0, offs_m, q_len, BLOCK_M, BLOCK_D, False)
    else:
        q = load_rows(q_rows + offs_d[None, :] * stride_qd, offs_m, q_len, offs_d, head_dim, EVEN_M, EVEN_D)
    q2 = q
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        if USE_TMA:
            q2 = load_tma_rows(QD2, b, h, q_start + m_start, BLOCK_D, offs_m, q_len, BLOCK_M, BLOCK_D2, False)
        else:
            q2 = load_rows(q_rows + offs_d2[None, :] * stride_qd, offs_m, q_len, offs_d2, head_dim, EVEN_M,
                           EVEN_D)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    # Bool: each row's word 0 [BLOCK_M] (mask_bits.py); float: each row's first entry [BLOCK_M, 1].
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh + rows * stride_mm
    if MASK_KIND == 2:
        mask_base = mask_base[:, None]
    order_base = TileOrder + b64 * stride_tb + h64 * stride_th + pid_m * stride_tm
    kv_descs = (KD, KD2, VD, VD2)     # TMA descriptors of K / V (two column chunks each) when USE_TMA
    # MASK_TMA: float mask tiles through MD at (batch, head) coordinates 0 where it broadcasts (mask_operand.py)
    mask_tile = (MD, b * stride_mb, h * stride_mh, m_start)

    # Key tiles this query tile visits: [t_lo, t_hi); those below t_mid hold only in-range keys left of the
    # diagonal and skip the causal / bounds checks.
    n_end = k_len
    if IS_CAUSAL:
        n_end = tl.minimum(n_end, m_start + BLOCK_M)
    if IS_VARLEN:
        n_end = tl.where(m_start < q_len, n_end, 0)   # a program past the last block does nothing
    t_lo = 0
    t_hi = tl.cdiv(n_end, BLOCK_N)
    t_mid = t_hi
    if not EVEN_N:
        t_mid = tl.minimum(t_mid, k_len // BLOCK_N)
    if IS_CAUSAL:
        t_mid = tl.minimum(t_mid, (m_start + 1) // BLOCK_N)
    t_mid = tl.maximum(t_mid, t_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    o_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc2 = 0.0      # the second value chunk's accumulator, when there is one
    if BLOCK_DV2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2], dtype=tl.float32)
    if HAS_SUMMARY:
        # The lists of mask_summary.row_lists: full tiles without checks, full tiles with them, partial tiles.
        e_full, e_edge, e_part = list_ends(TileEnds + b64 * stride_rb + h64 * stride_rh + pid_m * stride_rm)
        acc, acc2, m_i, o_i, l_i = _fwd_tiles(acc, acc2, m_i, o_i, l_i, q, q2, k_base, v_base, kv_descs, b, hk,
                                              mask_base, mask_tile, order_base, 0, e_full, offs_m, rows, k_start,
                                              q_len, k_len,
                                              head_dim, head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd,
                                              stride_mn, stride_tn, scale, to_log2, seed, pid_bh, drop_threshold,
                                              BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, 0, True, HAS_DROPOUT,
                                              False, not EVEN_M, False, EVEN_D, RAW_MAX, EMULATE_FMA, PRECISION,
                                              USE_TMA, IS_VARLEN, MASK_TMA)
        if IS_CAUSAL or not EVEN_N:
            acc, acc2, m_i, o_i, l_i = _fwd_tiles(acc, acc2, m_i, o_i, l_i, q, q2, k_base, v_base, kv_descs, b, hk,
                                                  mask_base, mask_tile, order_base, e_full, e_edge, offs_m, rows,
                                                  k_start, q_len,
                                                  k_len, head_dim, head_dim_v, stride_kn, stride_kd, stride_vn,
                                                  stride_vd, stride_mn, stride_tn, scale, to_log2, seed, pid_bh,
                                                  drop_threshold, BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, 0,
                                                  True, HAS_DROPOUT, IS_CAUSAL, not EVEN_M, not EVEN_N, EVEN_D, RAW_MAX,
                                                  EMULATE_FMA, PRECISION, USE_TMA, IS_VARLEN, MASK_TMA)
        if BIAS_SCALED:
            # A float mask is added to scaled scores: from here on the row max is in their units (rounding is
            # monotone, so max(s) * scale is the max of the scaled scores); o_i, which l and acc are relative
            # to, stays. The full tiles before ran on raw scores: no multiply per score there.
            m_i = m_i * scale
        acc, acc2, m_i, o_i, l_i = _fwd_tiles(acc, acc2, m_i, o_i, l_i, q, q2, k_base, v_base, kv_descs, b, hk,
                                              mask_base, mask_tile, order_base, e_edge, e_part, offs_m, rows, k_start,
                                              q_len,
                                              k_len, head_dim, head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd,
                                              stride_mn, stride_tn, scale, tail_to_log2, seed, pid_bh, drop_threshold,
                                              BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, MASK_KIND, True,
                                              HAS_DROPOUT, IS_CAUSAL, not EVEN_M, not EVEN_N, EVEN_D,
                                              RAW_MAX and not BIAS_SCALED, EMULATE_FMA, PRECISION, USE_TMA, IS_VARLEN,
                                              MASK_TMA)
    else:
        acc, acc2, m_i, o_i, l_i = _fwd_tiles(acc, acc2, m_i, o_i, l_i, q, q2, k_base, v_base, kv_descs, b, hk,
                                              mask_base, mask_tile, order_base, t_lo, t_mid, offs_m, rows, k_start,
                                              q_len, k_len,
                                              head_dim, head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd,
                                              stride_mn, stride_tn, scale, to_log2, seed, pid_bh, drop_threshold,
                                              BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, 0, False, HAS_DROPOUT,
                                              False, not EVEN_M, False, EVEN_D, RAW_MAX, EMULATE_FMA, PRECISION,
                                              USE_TMA, IS_VARLEN, MASK_TMA)
        if IS_CAUSAL or not EVEN_N:
            acc, acc2, m_i, o_i, l_i = _fwd_tiles(acc, acc2, m_i, o_i, l_i, q, q2, k_base, v_base, kv_descs, b, hk,
                                                  mask_base, mask_tile, order_base, t_mid, t_hi, offs_m, rows,
                                                  k_start, q_len,
                                                  k_len, head_dim, head_dim_v, stride_kn, stride_kd, stride_vn,
                                                  stride_vd, stride_mn, stride_tn, scale, to_log2, seed, pid_bh,
                                                  drop_threshold, BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, 0,
                                                  False, HAS_DROPOUT, IS_CAUSAL, not EVEN_M, not EVEN_N, EVEN_D,
                                                  RAW_MAX, EMULATE_FMA, PRECISION, USE_TMA, IS_VARLEN, MASK_TMA)

    # l == 0 only for a row with no key (its max score gives p = 1 otherwise); a NaN l fails the test and stays.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = drop_scale / l_safe
    out = acc * inv_l[:, None]
    # lse = m * scale + ln(sum exp((s - m) * scale)): the offset's own rounding (o = m * c rounded, the residual
    # exact through an FMA) is taken out, so a rounded scale * log2(e) is never multiplied by a large m.
    m_nat = m_i * scale if RAW_MAX and not BIAS_SCALED else m_i
    lse = tl.where(empty, float("-inf"),
                   m_nat + (tl.math.log2(l_safe) - _fma(m_i, tail_to_log2, -o_i, EMULATE_FMA)) * LN2)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_rows = Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om
    store_rows(o_rows + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty), offs_m, q_len, offs_dv,
               head_dim_v, EVEN_M, EVEN_D)
    if BLOCK_DV2 > 0:
        offs_dv2 = BLOCK_DV + tl.arange(0, BLOCK_DV2)
        store_rows(o_rows + offs_dv2[None, :] * stride_od, (acc2 * inv_l[:, None]).to(Out.dtype.element_ty),
                   offs_m, q_len, offs_dv2, head_dim_v, EVEN_M, EVEN_D)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * seq_len_q + rows
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < q_len)


def dropout_args(seed, dropout_p: float) -> tuple[int, int, float]:
    """(seed, threshold, 1 / (1 - p)) as kernel arguments: uint32 bit patterns passed as int32 so that every
    seed launches the same compiled kernel."""
    if dropout_p <= 0:
        return 0, 0, 1.0
    from .. import dropout as _dropout

    def as_i32(x: int) -> int:
        x &= 0xFFFFFFFF
        return x - 2**32 if x >= 2**31 else x
    s = int(seed.reshape(-1)[0]) if seed is not None else 0
    scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return as_i32(s), as_i32(_dropout.threshold(dropout_p)), scale


def _heavy(mask, dropout_p, q, v, arch=None) -> bool:
    return config.is_heavy("fwd", mask_kind(mask), dropout_p > 0, False, False, q.shape[3], v.shape[3], q.dtype,
                           float_tiles_by_tma(mask, arch))


def tile_descriptors(tensors_rows, dummy, use_tma: bool) -> tuple:
    """TMA descriptors (config.tma_descriptor) for [B, H, N, D] tensors read in tiles of the given rows, one per
    column chunk (config.head_split): (t, t2) per (tensor, rows) pair, ``dummy`` where a chunk is absent or TMA
    is off."""
    out = []
    for t, rows in tensors_rows:
        if not use_tma:
            out += [dummy, dummy]
            continue
        block, block2 = config.head_split(t.shape[3])
        out += [config.tma_descriptor(t, rows, block), config.tma_descriptor(t, rows, block2) if block2 else dummy]
    return tuple(out)


def forward_launches(q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p, out, lse,
                     cfg=None, arch=None):
    """The kernel launches that fill out / lse with tiles ``cfg`` (default: config.py's table): a list of
    (kernel, grid, args, kwargs). Apart from launching (attention_forward), aot_check.py compiles them ahead of
    time with the same arguments, for compute capability ``arch`` (default: the tensors' device), which decides
    whether K / V tiles come through TMA (config.use_tma)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if cfg is None:
        cfg = config.forward_config(D, Dv, q.dtype, heavy=_heavy(mask, dropout_p, q, v, arch))
    (block_d, block_d2), (block_dv, block_dv2) = config.head_split(D), config.head_split(Dv)
    varlen = cu_q is not None
    dummy = lse
    if varlen:
        block_seq, block_start, num_m_blocks = varlen_map.block_map(cu_q, Nq, cfg.block_m, max_q)
        even_m = even_n = False
    else:
        block_seq = block_start = cu_q = cu_k = dummy
        num_m_blocks = config.cdiv(Nq, cfg.block_m)
        even_m, even_n = Nq % cfg.block_m == 0, Nk % cfg.block_n == 0
    mop = mask_operand(mask, dummy, False, cfg.block_m, cfg.block_n, arch)
    if mask is not None:
        order, ends = row_lists(tile_summary(mask, cfg.block_m, cfg.block_n), cfg.block_m, cfg.block_n, Nk,
                                is_causal)
        t_strides, r_strides = order.stride(), ends.stride()[:3]
    else:
        order = ends = dummy
        t_strides, r_strides = (0, 0, 0, 0), (0, 0, 0)
    d_seed, d_thr, d_scale = dropout_args(seed, dropout_p)
    # Raw scores need scale > 0 (rounding is monotone). A float mask's partial tiles take scaled ones; fp32 tiles
    # keep one unit throughout (their registers have no room for the switch: a 64x16 candidate spills 8 B).
    raw_max = scale > 0 and not (mask_kind(mask) == 2 and q.dtype == torch.float32)
    # TMA for the light kernel only: with a mask or dropout its loops are issue-bound, and a TMA load's
    # per-tile barrier work outweighs the address math it saves there (benchmarks/NOTES.md, version 4).
    tma = mask is None and dropout_p <= 0 and config.use_tma((q, k, v), arch)
    bs = config.batch_strides
    args = (q, k, v, out, lse, mop.tensor, order, ends, cu_q, cu_k, block_seq, block_start,
            *tile_descriptors(((q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n)), dummy, tma), mop.desc,
            *bs(q), *bs(k), *bs(v), *bs(out), *mop.strides, *t_strides, *r_strides,
            Hq, Hq // Hk, num_m_blocks, Nq, Nk, D, Dv, scale, scale * LOG2E_HOST if raw_max else LOG2E_HOST,
            d_seed, d_thr, d_scale)
    kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_D2=block_d2, BLOCK_DV=block_dv,
                  BLOCK_DV2=block_dv2, MASK_KIND=mask_kind(mask), HAS_SUMMARY=mask is not None,
                  IS_CAUSAL=bool(is_causal), IS_VARLEN=varlen, HAS_DROPOUT=dropout_p > 0, EVEN_M=even_m, EVEN_N=even_n,
                  EVEN_D=(D == block_d + block_d2 and Dv == block_dv + block_dv2), RAW_MAX=raw_max,
                  EMULATE_FMA=config.interpreting(), PRECISION=config.input_precision(q.dtype), USE_TMA=tma,
                  MASK_TMA=mop.tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return [(_attention_fwd_kernel, (num_m_blocks * B * Hq,), args, kwargs)]


def attention_forward(q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p, out, lse):
    """Fill out [B, Hq, Nq, Dv] (any strides) and lse float32 [B, Hq, Nq] (contiguous); returns (out, lse).

    q [B, Hq, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] (any strides); mask None or [B, Hq, Nq, Nk] bool/float
    (dense only); cu_q / cu_k None or int [S + 1] with B == 1 (packed layout).
    """
    def build(cfg):
        return forward_launches(q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p, out,
                                lse, cfg)
    # Every candidate rewrites all of out / lse: what tuning runs leave behind is overwritten.
    autotune.launch_tuned("fwd", q, v.shape[3], mask, is_causal, cu_q is not None, dropout_p > 0,
                          _heavy(mask, dropout_p, q, v), build)
    return out, lse
