"""Backward attention kernels: dQ (with the row statistics) then dK/dV, two kernels with no atomics.

With P = softmax(S) (regenerated from the saved LSE), dP = dO V^T (dropout applied), delta = rowsum(dO * O)
= rowsum(P * dP), dS = P * (dP - delta):
    dV = P_dropped^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K,   dMask = dS (float mask, when asked).
- ``_bwd_dq_kernel``: one program per (query tile, query head) walks its key tiles. It first writes the row
  statistics both kernels read (delta, and nlse = -lse, -inf for rows that had no key, so P comes out 0
  there), so no separate pre-pass is launched; it also writes dMask;
- ``_bwd_dkdv_kernel`` (launched second): one program per (key tile, key/value head) walks the query tiles of
  every query head of its group (GQA sums in registers), so dK/dV are written once: deterministic. It computes
  the transposed tile (S^T = K Q^T, dP^T = V dO^T), whose M dimension is the key tile (>= 64 rows on a GPU):
  every product is a wgmma on sm_90, P^T and dS^T stay in registers as the A operand of dV += P^T dO and
  dK += dS^T Q (no shared-memory round trip of P / dS). Where one warpgroup cannot hold both accumulators
  (16-bit head dim 256, config.split_dkdv) it runs twice, GRADS = dV then dK: 5 products instead of 4, all wgmma.
P = exp2(fma(dot, scale, -lse) * log2 e): at 1e4 logits nothing is rounded at the scores' magnitude but the
saved lse (one rounding per row, the same for every key of the row; folding log2 e into the FMA would round
lse * log2 e once more, measured 1.2x -> 1.5x the naive fp32 error of dK); the interpreter, whose fma rounds
twice, computes it in float64. Masking happens on the exponent: masked pairs, causal
pairs, keys past the sequence and float-mask entries of -inf become -inf before the exp (so a row with no pair
taking part gets P = 0 even when its q is NaN; a NaN lse gives NaN on every pair that takes part).
Each kernel has its own tiles (config.backward_configs; on a GPU autotuned once per key, autotune.py), hence
its own program map and mask summary. Features and limits are those of attention_fwd.py (varlen map, mask
summary ranges, causal, dropout bit-exact with the forward). The two-kernel split recomputes Q K^T and dO V^T
once more than an atomic-add dQ would; it buys a deterministic result without a workspace.
"""
import torch
import triton
import triton.language as tl

from . import autotune, config, varlen_map
from .attention_fwd import dropout_args, tile_descriptors
from .mask_operand import float_tiles_by_tma, mask_kind, mask_operand
from .mask_summary import col_lists, row_lists, tile_summary
from .tile_ops import (_COL_MUL, _GOLDEN, _mix32, LOG2E, apply_bias, chunk_columns, list_ends, load_rows, load_tma_rows,
                       mask_bits_keep, query_block_of_program, query_tile_mask, store_rows, tile_at)

_INTERPRET = tl.constexpr(config.interpreting())
# Which gradients a dK/dV launch accumulates (its GRADS argument; config.split_dkdv says when it is one each).
GRAD_DV = tl.constexpr(1)
GRAD_DK = tl.constexpr(2)
# A row's (nlse, delta) pair read as one int64 (_load_row_stats) for a row past the end: nlse = -inf (bits
# 0xff800000, the low half), delta = 0.
_NEG_INF_NO_DELTA = tl.constexpr(0xFF800000)



@triton.jit
def _fma(a, b, c):
    """a * b + c rounded once (the interpreter's fma rounds the product first, so it goes through float64)."""
    if _INTERPRET:
        return (a.to(tl.float64) * b + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _probs(s, nlse, qi, kj, q_len, k_len, mask_ptrs, tile_rows, first_col, scale,
           MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr,
           KEY_BOUNDS: tl.constexpr, MASK_TMA: tl.constexpr):
    """P of a tile in either orientation: s the raw q.k products, nlse / qi (query positions) / kj (key
    positions) broadcast to s's shape ([BM, 1] and [1, BN] for a query-major tile, the other way round for a
    key-major one), mask_ptrs the mask entries of the tile (read in bounds when MASK_KIND != 0: the tile lists
    hand only partial tiles to a masked call); a bool mask (MASK_KIND 1) comes packed (mask_bits.py): mask_ptrs
    [R] the words of the tile's rows (queries, or keys when key-major), tile_rows [R] their positions,
    first_col the tile's first column; a float mask's entries come loaded (a TMA tile) under MASK_TMA.
    KEY_BOUNDS: zero P of keys past k_len (the dQ kernel needs it; the dK/dV kernel never stores those rows)."""
    # Natural units first (one rounding, of a number near 0), then log2(e): lse's own rounding is then the
    # only one at the logits' magnitude, and it is the same for every key of the row.
    y = _fma(s, scale, nlse)
    if MASK_KIND == 1:
        if KEY_BOUNDS:      # query-major: rows are queries, words run along keys
            keep = mask_bits_keep(mask_ptrs, first_col, tile_rows, q_len, s.shape[1], CHECK_Q)
        else:
            keep = mask_bits_keep(mask_ptrs, first_col, tile_rows, k_len, s.shape[1], CHECK_K)
        y = tl.where(keep, y, float("-inf"))
    elif MASK_KIND == 2:
        read = tl.full(s.shape, 1, tl.int1)
        if CHECK_Q:
            read = read & (qi < q_len)
        if CHECK_K:
            read = read & (kj < k_len)
        y = apply_bias(y, mask_ptrs, read, MASK_TMA)
    if CAUSAL:
        y = tl.where(kj <= qi, y, float("-inf"))
    if KEY_BOUNDS and CHECK_K and MASK_KIND != 1:     # a bool mask's words have 0 bits past the last key
        y = tl.where(kj < k_len, y, float("-inf"))
    return tl.math.exp2(y * LOG2E)


@triton.jit
def _keep(seed, bh, rows, cols, threshold, KEY_MAJOR: tl.constexpr):
    """tile_ops.dropout_keep, [len(rows), len(cols)], or [len(cols), len(rows)] when KEY_MAJOR."""
    seed_u = seed.to(tl.uint32, bitcast=True)
    thr_u = threshold.to(tl.uint32, bitcast=True)
    a = _mix32(seed_u + bh.to(tl.uint32) * _GOLDEN)
    r = _mix32(a ^ rows.to(tl.uint32))
    c = cols.to(tl.uint32) * _COL_MUL
    if KEY_MAJOR:
        u = _mix32(r[None, :] + c[:, None])
    else:
        u = _mix32(r[:, None] + c[None, :])
    return u >= thr_u


@triton.jit
def _load_row_stats(Stats, row_ptr, offs_m, q_len, CHECK_M: tl.constexpr, PAIRED: tl.constexpr):
    """(nlse, delta) of rows ``row_ptr`` from the interleaved pairs of Stats [rows, 2]. PAIRED: one 8-byte load a
    row (the key-major dK/dV tile gives each thread 16 query columns: 16 loads a tile instead of 32), read as one
    int64 whose halves are the two floats (little-endian: nlse low), so the address is the row index times 8 as a
    plain float buffer's is times 4 (a [rows, 2] tile and tl.split cost 3-4 address instructions a load in the tile
    lists' loops). Otherwise two 4-byte loads (the dK-only launch of head dim 256, whose 4 query columns a thread
    gain little from pairs and whose registers spilled 8 B with them under Triton 3.6).
    Rows past q_len read nlse = -inf (P = 0) and delta = 0: they add nothing."""
    if PAIRED:
        ptrs = Stats.to(tl.pointer_type(tl.int64)) + row_ptr
        if CHECK_M:
            x = tl.load(ptrs, mask=offs_m < q_len, other=_NEG_INF_NO_DELTA)
        else:
            x = tl.load(ptrs)
        nlse = x.to(tl.int32).to(tl.float32, bitcast=True)
        delta = (x >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        ptrs = Stats + 2 * row_ptr
        if CHECK_M:
            nlse = tl.load(ptrs, mask=offs_m < q_len, other=float("-inf"))
            delta = tl.load(ptrs + 1, mask=offs_m < q_len, other=0.0)
        else:
            nlse = tl.load(ptrs)
            delta = tl.load(ptrs + 1)
    return nlse, delta


@triton.jit
def _row_dot(o, do):
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _write_row_stats(delta, Lse, Stats, row_ptr, offs_m, q_len, EVEN_M: tl.constexpr):
    """delta (= rowsum(o * do), from the caller) and nlse = -lse (-inf for rows that had no key: P comes out 0
    there) of one query tile, stored as pairs (nlse, delta) in Stats [rows, 2] for the dK/dV kernel and returned.
    Negated once a row here, so that P's FFMA takes it as its addend: the key-major dK/dV tile negated each of its
    16 query columns' lse every tile (a LOP3 each, 5% of the d64 loop)."""
    if EVEN_M:
        lse = tl.load(Lse + row_ptr)
    else:
        lse = tl.load(Lse + row_ptr, mask=offs_m < q_len, other=float("-inf"))
    nlse = tl.where(lse == float("-inf"), float("-inf"), -lse)
    ptrs = Stats + 2 * row_ptr[:, None] + tl.arange(0, 2)[None, :]
    if EVEN_M:
        tl.store(ptrs, tl.join(nlse, delta))
    else:
        tl.store(ptrs, tl.join(nlse, delta), mask=(offs_m < q_len)[:, None])
    return nlse, delta


@triton.jit(do_not_specialize=["num_rows"])
def _bwd_row_stats_kernel(Out, DOut, Lse, Stats,
                          stride_ob, stride_oh, stride_om, stride_od,
                          stride_db, stride_dh, stride_dm, stride_dd,
                          num_heads, num_rows, head_dim_v,
                          BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The row statistics as a pre-pass, where fusing them into the dQ kernel spills (fp32, head dim > 128)."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(num_rows, BLOCK_M)
    pid_bh = pid // num_m_blocks
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m.to(tl.int64)
    o = load_rows(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od,
                  offs_m, num_rows, offs_dv, head_dim_v, False, False)
    do = load_rows(DOut + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                   offs_m, num_rows, offs_dv, head_dim_v, False, False)
    _write_row_stats(_row_dot(o, do), Lse, Stats, pid_bh.to(tl.int64) * num_rows + rows, offs_m, num_rows,
                     False)


@triton.jit
def _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, qdo_descs, b, h, Stats, row_base, mask_base,
                mask_tile, order_base, t_lo, t_hi, offs_n, cols, q_start, q_len, k_len, head_dim, head_dim_v,
                stride_qm, stride_qd,
                stride_dm, stride_dd, stride_mm, stride_tm, scale, seed, bh, drop_threshold, drop_scale,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_DV2: tl.constexpr, MASK_KIND: tl.constexpr, LISTED: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                CAUSAL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, EVEN_D: tl.constexpr,
                PRECISION: tl.constexpr, GRADS: tl.constexpr, USE_TMA: tl.constexpr, IS_VARLEN: tl.constexpr,
                MASK_TMA: tl.constexpr):
    """Accumulate dK / dV [BLOCK_N, *] of one key tile over query tiles [t_lo, t_hi) (LISTED: the tiles at
    those positions of the list at order_base, mask_summary.col_lists) of one query head, on key-major tiles
    [BLOCK_N, BLOCK_M]. MASK_KIND != 0 reads the mask on every tile (partial tiles only). Second column chunks
    (k2, v2, dk2, dv2; config.head_split) take part when BLOCK_D2 / BLOCK_DV2 > 0, as in the forward. GRADS
    (GRAD_DK | GRAD_DV bits) says which of dK / dV are accumulated; the other comes back as it went in.
    USE_TMA: Q / dO tiles through the descriptors qdo_descs = (q, q2, do, do2) at (b, h), rows past a packed
    sequence's end zeroed (they are the next sequence's, and dK += dS^T Q would take 0 * NaN from them)."""
    offs_d, offs_d2 = chunk_columns(BLOCK_D, BLOCK_D2)
    offs_dv, offs_dv2 = chunk_columns(BLOCK_DV, BLOCK_DV2)
    q_desc, q_desc2, do_desc, do_desc2 = qdo_descs
    zero_rows: tl.constexpr = IS_VARLEN and CHECK_M
    for i in range(t_lo, t_hi):
        t = tile_at(order_base, i, stride_tm, LISTED)
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = q_start + offs_m.to(tl.uint32).to(tl.int64)      # zero-extended: no sign words in the row math
        if USE_TMA:
            first = q_start + t * BLOCK_M
            q = load_tma_rows(q_desc, b, h, first, 0, offs_m, q_len, BLOCK_M, BLOCK_D, zero_rows)
            do = load_tma_rows(do_desc, b, h, first, 0, offs_m, q_len, BLOCK_M, BLOCK_DV, zero_rows)
            if BLOCK_DV2 > 0:
                do2 = load_tma_rows(do_desc2, b, h, first, BLOCK_DV, offs_m, q_len, BLOCK_M, BLOCK_DV2, zero_rows)
        else:
            q_rows = q_base + rows[:, None] * stride_qm
            do_rows = do_base + rows[:, None] * stride_dm
            q = load_rows(q_rows + offs_d[None, :] * stride_qd, offs_m, q_len, offs_d, head_dim, not CHECK_M, EVEN_D)
            do = load_rows(do_rows + offs_dv[None, :] * stride_dd, offs_m, q_len, offs_dv, head_dim_v, not CHECK_M,
                           EVEN_D)
            if BLOCK_DV2 > 0:
                do2 = load_rows(do_rows + offs_dv2[None, :] * stride_dd, offs_m, q_len, offs_dv2, head_dim_v,
                                not CHECK_M, EVEN_D)
        nlse, delta = _load_row_stats(Stats, row_base + rows, offs_m, q_len, CHECK_M, GRADS != GRAD_DK)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            if USE_TMA:
                q2 = load_tma_rows(q_desc2, b, h, first, BLOCK_D, offs_m, q_len, BLOCK_M, BLOCK_D2, zero_rows)
            else:
                q2 = load_rows(q_rows + offs_d2[None, :] * stride_qd, offs_m, q_len, offs_d2, head_dim, not CHECK_M,
                               EVEN_D)
            st = tl.dot(k2, tl.trans(q2), st, input_precision=PRECISION)
        m_ptrs = mask_base      # bool: the keys' words of mask^T (mask_bits.py)
        if MASK_KIND == 2:
            if MASK_TMA:        # a [queries, keys] tile, transposed in shared memory
                m_desc, mb, mh, m_col = mask_tile
                m_ptrs = tl.trans(load_tma_rows(m_desc, mb, mh, q_start + t * BLOCK_M, m_col, offs_m, q_len, BLOCK_M,
                                                offs_n.shape[0], False))
            else:
                m_ptrs = mask_base + rows[None, :] * stride_mm
        pt = _probs(st, nlse[None, :], offs_m[None, :], offs_n[:, None], q_len, k_len, m_ptrs, offs_n,
                    q_start + t * BLOCK_M, scale, MASK_KIND, CAUSAL, CHECK_M, CHECK_N, False, MASK_TMA)
        if GRAD_DK & GRADS:
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if BLOCK_DV2 > 0:
                dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _keep(seed, bh, rows, cols, drop_threshold, True)
            pt_kept = tl.where(keep, pt * drop_scale, 0.0).to(do.dtype)
            if GRAD_DK & GRADS:
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            pt_kept = pt.to(do.dtype)
        if GRAD_DV & GRADS:
            dv += tl.dot(pt_kept, do, input_precision=PRECISION)
            if BLOCK_DV2 > 0:
                dv2 += tl.dot(pt_kept, do2, input_precision=PRECISION)
        if GRAD_DK & GRADS:
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk += tl.dot(dst, q, input_precision=PRECISION)
            if BLOCK_D2 > 0:
                dk2 += tl.dot(dst, q2, input_precision=PRECISION)
    return dk, dk2, dv, dv2


@triton.jit(do_not_specialize=["num_n_blocks", "seq_len_q", "seq_len_k", "seed", "drop_threshold"])
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Stats, DK, DV, Mask, TileOrder, TileEnds, CuQ, CuK, BlockSeq, BlockStart, QD, QD2, DOD,
    DOD2, MD,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_cb, stride_ch, stride_cn,
    num_heads, num_kv_heads, groups, num_n_blocks, seq_len_q, seq_len_k, head_dim, head_dim_v,
    scale, seed, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SUMMARY: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr, GRADS: tl.constexpr, USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_bhk = pid // num_n_blocks
    b = pid_bhk // num_kv_heads
    hk = pid_bhk % num_kv_heads
    if IS_VARLEN:
        seq = tl.load(BlockSeq + pid_n)
        n_start = tl.load(BlockStart + pid_n)
        q_start = tl.load(CuQ + seq).to(tl.int64)
        q_len = (tl.load(CuQ + seq + 1) - q_start).to(tl.int32)
        k_start = tl.load(CuK + seq).to(tl.int64)
        k_len = (tl.load(CuK + seq + 1) - k_start).to(tl.int32)
    else:
        n_start = pid_n * BLOCK_N
        q_start = 0
        k_start = 0
        q_len = seq_len_q
        k_len = seq_len_k
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = k_start + offs_n.to(tl.int64)
    b64 = b.to(tl.int64)
    k_rows = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + cols[:, None] * stride_kn
    v_rows = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + cols[:, None] * stride_vn
    k = load_rows(k_rows + offs_d[None, :] * stride_kd, offs_n, k_len, offs_d, head_dim, EVEN_N, EVEN_D)
    v = k   # a placeholder: only dK needs V (dP^T = V dO^T)
    if GRAD_DK & GRADS:
        v = load_rows(v_rows + offs_dv[None, :] * stride_vd, offs_n, k_len, offs_dv, head_dim_v, EVEN_N, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Second column chunks (config.head_split); placeholders that the loops leave alone when there are none.
    k2, v2, dk2, dv2 = k, v, 0.0, 0.0
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        k2 = load_rows(k_rows + offs_d2[None, :] * stride_kd, offs_n, k_len, offs_d2, head_dim, EVEN_N, EVEN_D)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    if BLOCK_DV2 > 0:
        offs_dv2 = BLOCK_DV + tl.arange(0, BLOCK_DV2)
        if GRAD_DK & GRADS:
            v2 = load_rows(v_rows + offs_dv2[None, :] * stride_vd, offs_n, k_len, offs_dv2, head_dim_v, EVEN_N,
                           EVEN_D)
        dv2 = tl.zeros([BLOCK_N, BLOCK_DV2], dtype=tl.float32)

    # Query tiles that see this key tile: [t_first, t_end); causal keeps queries >= n_start, and from t_full
    # on every query of the tile is past the key tile's last key (no causal check).
    t_first = 0
    t_end = tl.cdiv(q_len, BLOCK_M)
    if IS_CAUSAL:
        t_first = n_start // BLOCK_M
    if IS_VARLEN:
        t_end = tl.where(n_start < k_len, t_end, 0)     # a program past the last block does nothing
    qdo_descs = (QD, QD2, DOD, DOD2)     # TMA descriptors of Q / dO (two column chunks each) when USE_TMA
    for g in range(0, groups):
        h = hk * groups + g
        h64 = h.to(tl.int64)
        bh = b * num_heads + h
        order_base = TileOrder + b64 * stride_tb + h64 * stride_th + pid_n * stride_tn
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DOut + b64 * stride_db + h64 * stride_dh
        row_base = bh.to(tl.int64) * seq_len_q
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh + offs_n.to(tl.int64) * stride_mn
        if MASK_KIND == 2:
            mask_base = mask_base[:, None]
        # MASK_TMA: float mask tiles through MD at (batch, head) coordinates 0 where it broadcasts (mask_operand.py)
        mask_tile = (MD, b * stride_mb, h * stride_mh, n_start)
        if HAS_SUMMARY:
            # The lists of mask_summary.col_lists: full tiles without checks, full tiles with them, partial tiles.
            e_full, e_edge, e_part = list_ends(TileEnds + b64 * stride_cb + h64 * stride_ch + pid_n * stride_cn)
            dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, qdo_descs, b, h, Stats,
                                           row_base, mask_base, mask_tile, order_base, 0, e_full, offs_n, cols,
                                           q_start,
                                           q_len, k_len, head_dim, head_dim_v, stride_qm, stride_qd, stride_dm,
                                           stride_dd, stride_mm, stride_tm, scale, seed, bh, drop_threshold, drop_scale,
                                           BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, 0, True, HAS_DROPOUT, False,
                                           False, not EVEN_N, EVEN_D, PRECISION, GRADS, USE_TMA, IS_VARLEN, MASK_TMA)
            if IS_CAUSAL or not EVEN_M:
                dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, qdo_descs, b, h, Stats,
                                               row_base, mask_base, mask_tile, order_base, e_full, e_edge,
                                               offs_n, cols,
                                               q_start, q_len, k_len, head_dim, head_dim_v, stride_qm, stride_qd,
                                               stride_dm, stride_dd, stride_mm, stride_tm, scale, seed, bh,
                                               drop_threshold, drop_scale, BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_DV,
                                               BLOCK_DV2, 0, True, HAS_DROPOUT, IS_CAUSAL, not EVEN_M, not EVEN_N,
                                               EVEN_D, PRECISION, GRADS, USE_TMA, IS_VARLEN, MASK_TMA)
            dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, qdo_descs, b, h, Stats,
                                           row_base, mask_base, mask_tile, order_base, e_edge, e_part, offs_n,
                                           cols,
                                           q_start, q_len, k_len, head_dim, head_dim_v, stride_qm, stride_qd, stride_dm,
                                           stride_dd, stride_mm, stride_tm, scale, seed, bh, drop_threshold, drop_scale,
                                           BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, MASK_KIND, True,
                                           HAS_DROPOUT, IS_CAUSAL, not EVEN_M, not EVEN_N, EVEN_D, PRECISION, GRADS,
                                           USE_TMA, IS_VARLEN, MASK_TMA)
        else:
            t_full = t_first
            if IS_CAUSAL:
                t_full = tl.minimum(tl.maximum(tl.cdiv(n_start + BLOCK_N - 1, BLOCK_M), t_first), t_end)
                dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, qdo_descs, b, h, Stats,
                                               row_base, mask_base, mask_tile, order_base, t_first, t_full,
                                               offs_n, cols,
                                               q_start, q_len, k_len, head_dim, head_dim_v, stride_qm, stride_qd,
                                               stride_dm, stride_dd, stride_mm, stride_tm, scale, seed, bh,
                                               drop_threshold, drop_scale, BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_DV,
                                               BLOCK_DV2, 0, False, HAS_DROPOUT, True, not EVEN_M, not EVEN_N, EVEN_D,
                                               PRECISION, GRADS, USE_TMA, IS_VARLEN, MASK_TMA)
            # Below t_mid every query row of the tile is in range (no row checks on loads); the rest pay for them.
            t_mid = t_end
            if not EVEN_M:
                t_mid = tl.maximum(tl.minimum(t_end, q_len // BLOCK_M), t_full)
            dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, qdo_descs, b, h, Stats,
                                           row_base, mask_base, mask_tile, order_base, t_full, t_mid, offs_n,
                                           cols, q_start,
                                           q_len, k_len, head_dim, head_dim_v, stride_qm, stride_qd, stride_dm,
                                           stride_dd, stride_mm, stride_tm, scale, seed, bh, drop_threshold, drop_scale,
                                           BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2, 0, False, HAS_DROPOUT,
                                           False, False, not EVEN_N, EVEN_D, PRECISION, GRADS, USE_TMA, IS_VARLEN,
                                           MASK_TMA)
            if not EVEN_M:
                dk, dk2, dv, dv2 = _dkdv_tiles(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, qdo_descs, b, h, Stats,
                                               row_base, mask_base, mask_tile, order_base, t_mid, t_end,
                                               offs_n, cols,
                                               q_start, q_len, k_len, head_dim, head_dim_v, stride_qm, stride_qd,
                                               stride_dm, stride_dd, stride_mm, stride_tm, scale, seed, bh,
                                               drop_threshold, drop_scale, BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_DV,
                                               BLOCK_DV2, 0, False, HAS_DROPOUT, False, True, not EVEN_N, EVEN_D,
                                               PRECISION, GRADS, USE_TMA, IS_VARLEN, MASK_TMA)
    dk_rows = DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + cols[:, None] * stride_dkn
    dv_rows = DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + cols[:, None] * stride_dvn
    if GRAD_DK & GRADS:
        store_rows(dk_rows + offs_d[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty), offs_n, k_len,
                   offs_d, head_dim, EVEN_N, EVEN_D)
        if BLOCK_D2 > 0:
            store_rows(dk_rows + offs_d2[None, :] * stride_dkd, (dk2 * scale).to(DK.dtype.element_ty), offs_n,
                       k_len, offs_d2, head_dim, EVEN_N, EVEN_D)
    if GRAD_DV & GRADS:
        store_rows(dv_rows + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), offs_n, k_len, offs_dv,
                   head_dim_v, EVEN_N, EVEN_D)
        if BLOCK_DV2 > 0:
            store_rows(dv_rows + offs_dv2[None, :] * stride_dvd, dv2.to(DV.dtype.element_ty), offs_n, k_len,
                       offs_dv2, head_dim_v, EVEN_N, EVEN_D)


@triton.jit
def _dq_tiles(dq, dq2, q, q2, do, do2, nlse, delta, k_base, v_base, kv_descs, b, hk, mask_base, mask_tile,
              dmask_base, dmask_tile, order_base, t_lo, t_hi, offs_m, rows, k_start, q_len, k_len, head_dim, head_dim_v,
              stride_kn, stride_kd,
              stride_vn, stride_vd, stride_mn, stride_gn, stride_tn, scale, seed, bh, drop_threshold, drop_scale,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_DV2: tl.constexpr, MASK_KIND: tl.constexpr, LISTED: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              MASK_GRAD: tl.constexpr, CAUSAL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
              EVEN_D: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, IS_VARLEN: tl.constexpr,
              MASK_TMA: tl.constexpr, DMASK_TMA: tl.constexpr):
    """Accumulate dQ (and dq2, the second column chunk's) of one query tile over key tiles [t_lo, t_hi) (LISTED:
    the tiles at those positions of the list at order_base, mask_summary.row_lists); write dMask when asked
    (DMASK_TMA: as tiles through the descriptor of dmask_tile = (desc, b, h, first row); TMA clips the rows and
    columns past the ends, and no mask comes with varlen, so a tile never reaches another sequence's rows).
    MASK_KIND != 0 reads the mask on every tile (partial tiles only). USE_TMA: K / V tiles through the
    descriptors kv_descs = (k, k2, v, v2), as in the forward; rows past a packed sequence's end are zeroed in
    both (dQ += dS K takes K as an operand, and 0 * NaN there would reach this sequence)."""
    offs_d, offs_d2 = chunk_columns(BLOCK_D, BLOCK_D2)
    offs_dv, offs_dv2 = chunk_columns(BLOCK_DV, BLOCK_DV2)
    k_desc, k_desc2, v_desc, v_desc2 = kv_descs
    zero_rows: tl.constexpr = IS_VARLEN and CHECK_N
    for i in range(t_lo, t_hi):
        t = tile_at(order_base, i, stride_tn, LISTED)
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = k_start + offs_n.to(tl.int64)
        if USE_TMA:
            first = k_start + t * BLOCK_N
            k = load_tma_rows(k_desc, b, hk, first, 0, offs_n, k_len, BLOCK_N, BLOCK_D, zero_rows)
            v = load_tma_rows(v_desc, b, hk, first, 0, offs_n, k_len, BLOCK_N, BLOCK_DV, zero_rows)
        else:
            k_rows = k_base + cols[:, None] * stride_kn
            v_rows = v_base + cols[:, None] * stride_vn
            k = load_rows(k_rows + offs_d[None, :] * stride_kd, offs_n, k_len, offs_d, head_dim, not CHECK_N,
                          EVEN_D)
            v = load_rows(v_rows + offs_dv[None, :] * stride_vd, offs_n, k_len, offs_dv, head_dim_v, not CHECK_N,
                          EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            if USE_TMA:
                k2 = load_tma_rows(k_desc2, b, hk, first, BLOCK_D, offs_n, k_len, BLOCK_N, BLOCK_D2, zero_rows)
            else:
                k2 = load_rows(k_rows + offs_d2[None, :] * stride_kd, offs_n, k_len, offs_d2, head_dim, not CHECK_N,
                               EVEN_D)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
        m_ptrs = query_tile_mask(mask_base, mask_tile, offs_m, offs_n, t * BLOCK_N, q_len, stride_mn, MASK_KIND,
                                 MASK_TMA)
        p = _probs(s, nlse[:, None], offs_m[:, None], offs_n[None, :], q_len, k_len, m_ptrs, offs_m, t * BLOCK_N,
                   scale, MASK_KIND, CAUSAL, CHECK_M, CHECK_N, True, MASK_TMA)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if BLOCK_DV2 > 0:
            if USE_TMA:
                v2 = load_tma_rows(v_desc2, b, hk, first, BLOCK_DV, offs_n, k_len, BLOCK_N, BLOCK_DV2, zero_rows)
            else:
                v2 = load_rows(v_rows + offs_dv2[None, :] * stride_vd, offs_n, k_len, offs_dv2, head_dim_v,
                               not CHECK_N, EVEN_D)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(_keep(seed, bh, rows, cols, drop_threshold, False), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:
            if DMASK_TMA:
                g_desc, gb, gh, g_row = dmask_tile
                g_desc.store([gb, gh, g_row, t * BLOCK_N],
                             ds.to(dmask_base.dtype.element_ty).reshape(1, 1, ds.shape[0], BLOCK_N))
            else:
                store_rows(dmask_base + offs_n.to(tl.int64)[None, :] * stride_gn,
                           ds.to(dmask_base.dtype.element_ty), offs_m, q_len, offs_n, k_len, not CHECK_M, not CHECK_N)
        ds = ds.to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dq2 += tl.dot(ds, k2, input_precision=PRECISION)
    return dq, dq2


@triton.jit(do_not_specialize=["num_m_blocks", "seq_len_q", "seq_len_k", "seed", "drop_threshold"])
def _bwd_dq_kernel(
    Q, K, V, Out, DOut, Lse, Stats, DQ, DMask, Mask, TileOrder, TileEnds, CuQ, CuK, BlockSeq,
    BlockStart, KD, KD2, VD, VD2, MD, GD,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gn,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_rb, stride_rh, stride_rm,
    num_heads, groups, num_m_blocks, seq_len_q, seq_len_k, head_dim, head_dim_v,
    scale, seed, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SUMMARY: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr, FUSED_STATS: tl.constexpr, USE_TMA: tl.constexpr,
    MASK_TMA: tl.constexpr, DMASK_TMA: tl.constexpr,
):
    b, h, hk, pid_m, pid_bh, m_start, q_start, q_len, k_start, k_len = query_block_of_program(
        tl.program_id(0), num_m_blocks, num_heads, groups, BlockSeq, BlockStart, CuQ, CuK, seq_len_q, seq_len_k,
        BLOCK_M, IS_CAUSAL, IS_VARLEN)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = q_start + offs_m.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_rows = Q + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qm
    do_rows = DOut + b64 * stride_db + h64 * stride_dh + rows[:, None] * stride_dm
    o_rows = Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om
    q = load_rows(q_rows + offs_d[None, :] * stride_qd, offs_m, q_len, offs_d, head_dim, EVEN_M, EVEN_D)
    do = load_rows(do_rows + offs_dv[None, :] * stride_dd, offs_m, q_len, offs_dv, head_dim_v, EVEN_M, EVEN_D)
    # Second column chunks (config.head_split); placeholders the loops leave alone when there are none.
    q2, do2, dq2 = q, do, 0.0
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = load_rows(q_rows + offs_d2[None, :] * stride_qd, offs_m, q_len, offs_d2, head_dim, EVEN_M, EVEN_D)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    if BLOCK_DV2 > 0:
        offs_dv2 = BLOCK_DV + tl.arange(0, BLOCK_DV2)
        do2 = load_rows(do_rows + offs_dv2[None, :] * stride_dd, offs_m, q_len, offs_dv2, head_dim_v, EVEN_M,
                        EVEN_D)

    # Row statistics, for this tile's loop and for the dK/dV kernel after it (or read from the pre-pass).
    row_ptr = pid_bh.to(tl.int64) * seq_len_q + rows
    if FUSED_STATS:
        delta = _row_dot(load_rows(o_rows + offs_dv[None, :] * stride_od, offs_m, q_len, offs_dv, head_dim_v,
                                   EVEN_M, EVEN_D), do)
        if BLOCK_DV2 > 0:
            delta += _row_dot(load_rows(o_rows + offs_dv2[None, :] * stride_od, offs_m, q_len, offs_dv2,
                                        head_dim_v, EVEN_M, EVEN_D), do2)
        nlse, delta = _write_row_stats(delta, Lse, Stats, row_ptr, offs_m, q_len, EVEN_M)
    else:
        nlse, delta = _load_row_stats(Stats, row_ptr, offs_m, q_len, not EVEN_M, True)

    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh + rows * stride_mm      # bool: the rows' words
    if MASK_KIND == 2:
        mask_base = mask_base[:, None]
    mask_tile = (MD, b * stride_mb, h * stride_mh, m_start)     # MASK_TMA, as in the forward
    dmask_base = DMask + b64 * stride_gb + h64 * stride_gh + rows[:, None] * stride_gm
    dmask_tile = (GD, b, h, m_start)        # DMASK_TMA
    order_base = TileOrder + b64 * stride_tb + h64 * stride_th + pid_m * stride_tm
    kv_descs = (KD, KD2, VD, VD2)     # TMA descriptors of K / V (two column chunks each) when USE_TMA

    # Key tiles as in the forward: [t_lo, t_mid) need no causal / bounds checks, [t_mid, t_hi) do.
    n_end = k_len
    if IS_CAUSAL:
        n_end = tl.minimum(n_end, m_start + BLOCK_M)
    if IS_VARLEN:
        n_end = tl.where(m_start < q_len, n_end, 0)
    t_lo = 0
    t_hi = tl.cdiv(n_end, BLOCK_N)
    t_mid = t_hi
    if not EVEN_N:
        t_mid = tl.minimum(t_mid, k_len // BLOCK_N)
    if IS_CAUSAL:
        t_mid = tl.minimum(t_mid, (m_start + 1) // BLOCK_N)
    t_mid = tl.maximum(t_mid, t_lo)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_SUMMARY:
        # The lists of mask_summary.row_lists, as in the forward.
        e_full, e_edge, e_part = list_ends(TileEnds + b64 * stride_rb + h64 * stride_rh + pid_m * stride_rm)
        dq, dq2 = _dq_tiles(dq, dq2, q, q2, do, do2, nlse, delta, k_base, v_base, kv_descs, b, hk, mask_base,
                            mask_tile, dmask_base, dmask_tile,
                            order_base, 0, e_full, offs_m, rows, k_start, q_len, k_len, head_dim,
                            head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_gn, stride_tn,
                            scale, seed, pid_bh, drop_threshold, drop_scale, BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV,
                            BLOCK_DV2, 0, True, HAS_DROPOUT, MASK_GRAD, False, not EVEN_M, False, EVEN_D, PRECISION,
                            USE_TMA, IS_VARLEN, MASK_TMA, DMASK_TMA)
        if IS_CAUSAL or not EVEN_N:
            dq, dq2 = _dq_tiles(dq, dq2, q, q2, do, do2, nlse, delta, k_base, v_base, kv_descs, b, hk, mask_base,
                                mask_tile, dmask_base, dmask_tile,
                                order_base, e_full, e_edge, offs_m, rows, k_start, q_len,
                                k_len, head_dim,
                                head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_gn, stride_tn,
                                scale, seed, pid_bh, drop_threshold, drop_scale, BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV,
                                BLOCK_DV2, 0, True, HAS_DROPOUT, MASK_GRAD, IS_CAUSAL, not EVEN_M, not EVEN_N, EVEN_D,
                                PRECISION, USE_TMA, IS_VARLEN, MASK_TMA, DMASK_TMA)
        dq, dq2 = _dq_tiles(dq, dq2, q, q2, do, do2, nlse, delta, k_base, v_base, kv_descs, b, hk, mask_base,
                            mask_tile, dmask_base, dmask_tile,
                            order_base, e_edge, e_part, offs_m, rows, k_start, q_len, k_len,
                            head_dim,
                            head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_gn, stride_tn,
                            scale, seed, pid_bh, drop_threshold, drop_scale, BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV,
                            BLOCK_DV2, MASK_KIND, True, HAS_DROPOUT, MASK_GRAD, IS_CAUSAL, not EVEN_M, not EVEN_N,
                            EVEN_D, PRECISION, USE_TMA, IS_VARLEN, MASK_TMA, DMASK_TMA)
    else:
        dq, dq2 = _dq_tiles(dq, dq2, q, q2, do, do2, nlse, delta, k_base, v_base, kv_descs, b, hk, mask_base,
                            mask_tile, dmask_base, dmask_tile,
                            order_base, t_lo, t_mid, offs_m, rows, k_start, q_len, k_len,
                            head_dim,
                            head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_gn, stride_tn,
                            scale, seed, pid_bh, drop_threshold, drop_scale, BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV,
                            BLOCK_DV2, 0, False, HAS_DROPOUT, MASK_GRAD, False, not EVEN_M, False, EVEN_D, PRECISION,
                            USE_TMA, IS_VARLEN, MASK_TMA, DMASK_TMA)
        if IS_CAUSAL or not EVEN_N:
            dq, dq2 = _dq_tiles(dq, dq2, q, q2, do, do2, nlse, delta, k_base, v_base, kv_descs, b, hk, mask_base,
                                mask_tile, dmask_base, dmask_tile,
                                order_base, t_mid, t_hi, offs_m, rows, k_start, q_len, k_len,
                                head_dim,
                                head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_gn, stride_tn,
                                scale, seed, pid_bh, drop_threshold, drop_scale, BLOCK_N, BLOCK_D, BLOCK_D2, BLOCK_DV,
                                BLOCK_DV2, 0, False, HAS_DROPOUT, MASK_GRAD, IS_CAUSAL, not EVEN_M, not EVEN_N, EVEN_D,
                                PRECISION, USE_TMA, IS_VARLEN, MASK_TMA, DMASK_TMA)
    dq_rows = DQ + b64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqm
    store_rows(dq_rows + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty), offs_m, q_len, offs_d,
               head_dim, EVEN_M, EVEN_D)
    if BLOCK_D2 > 0:
        store_rows(dq_rows + offs_d2[None, :] * stride_dqd, (dq2 * scale).to(DQ.dtype.element_ty), offs_m, q_len,
                   offs_d2, head_dim, EVEN_M, EVEN_D)


def _tiling(cfg, resident_keys, mask, causal, cu_q, cu_k, Nq, Nk, max_q, max_k, dummy):
    """What one backward kernel needs for its tiles: the program map along its resident axis (keys for dK/dV,
    queries for dQ), EVEN flags, and the mask summary (state, and the loop range of each resident tile)."""
    varlen = cu_q is not None
    cu, total, block, hint = (cu_k, Nk, cfg.block_n, max_k) if resident_keys else (cu_q, Nq, cfg.block_m, max_q)
    if varlen:
        seq, start, num_blocks = varlen_map.block_map(cu, total, block, hint)
        even_m = even_n = False
    else:
        seq = start = dummy
        num_blocks = config.cdiv(total, block)
        even_m, even_n = Nq % cfg.block_m == 0, Nk % cfg.block_n == 0
    if mask is not None:
        summary = tile_summary(mask, cfg.block_m, cfg.block_n)
        lists = col_lists(summary, cfg.block_m, cfg.block_n, Nq, causal) if resident_keys else \
            row_lists(summary, cfg.block_m, cfg.block_n, Nk, causal)
        order, ends = lists
        # The kernels take the tile grid's strides as (b, h, query tile, key tile); col_lists' order is key-major.
        st = order.stride()
        t_strides, r_strides = (st[0], st[1], st[3], st[2]) if resident_keys else st, ends.stride()[:3]
    else:
        order = ends = dummy
        t_strides, r_strides = (0, 0, 0, 0), (0, 0, 0)
    flags = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_SUMMARY=mask is not None, EVEN_M=even_m,
                 EVEN_N=even_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return seq, start, num_blocks, order, ends, t_strides, r_strides, flags


class _BackwardCall:
    """The arguments of one backward call; each method builds the launch (kernel, grid, args, kwargs) of one
    kernel for the tiles it is given, so that the autotuner can build a launch per candidate."""

    def __init__(self, dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                 dropout_p, mask_grad, dq, dk, dv, dmask, arch=None):
        self.B, self.Hq, self.Nq, D = q.shape
        self.Hk, self.Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        self.dims, self.dtype = (D, Dv), q.dtype
        self.inputs, self.grads, self.dmask = (q, k, v, dout), (dq, dk, dv), dmask
        self.mask, self.hints, self.mask_grad = mask, (max_q, max_k), bool(mask_grad)
        self.causal = bool(is_causal)
        self.varlen = cu_q is not None
        # heavy: more live registers (float mask entries, dropout, varlen bounds, causal loops): config.is_heavy
        # dMask [B, Hq, Nq, Nk] as TMA tile stores where it can be (16-bit, rows 16-byte aligned: dmask_buffer pads
        # them): a pointer store costs ~1,500 instructions per 128x64 tile on sm_90, 64-bit address math per entry.
        self.dmask_tma = self.mask_grad and config.use_tma((dmask,), arch)
        self.heavy = config.is_heavy("bwd_dq", mask_kind(mask), dropout_p > 0, self.varlen, is_causal, D, Dv,
                                     q.dtype, float_tiles_by_tma(mask, arch) and (self.dmask_tma or not mask_grad))
        self.out, self.lse = out, lse.contiguous()
        # Written by the dQ kernel, read by the dK/dV kernel launched after it.
        self.stats = torch.empty((*self.lse.shape, 2), dtype=torch.float32, device=self.lse.device)   # (nlse, delta)
        self.cu = (cu_q, cu_k) if self.varlen else (None, None)
        self.cu_args = (cu_q, cu_k) if self.varlen else (self.stats, self.stats)
        self.arch = arch
        self.scalars = (self.Nq, self.Nk, D, Dv, scale, *dropout_args(seed, dropout_p))
        # Fusing the row statistics into the dQ kernel spills there for fp32 at head dims > 128.
        self.block_dv = config.padded_head_dim(Dv)
        self.fused_stats = not (q.dtype == torch.float32 and max(config.padded_head_dim(D), self.block_dv) > 128)
        (block_d, block_d2), (block_dv, block_dv2) = config.head_split(D), config.head_split(Dv)
        # TMA tiles only when asked for (VITKERN_TRITON_TMA=1), and as in the forward without a mask or dropout: on
        # sm_90 they add 6-58% to these loops' instructions (barrier work per Q / dO or K / V tile, small query
        # tiles in dK/dV) and save no cycle of their bound (benchmarks/NOTES.md, version 4); a GPU run decides.
        self.tma = (mask is None and dropout_p <= 0 and config.tma_mode() == "1"
                    and config.use_tma((q, k, v, dout), arch))
        self.common = dict(BLOCK_D=block_d, BLOCK_D2=block_d2, BLOCK_DV=block_dv, BLOCK_DV2=block_dv2,
                           MASK_KIND=mask_kind(mask), IS_CAUSAL=bool(is_causal), IS_VARLEN=self.varlen,
                           HAS_DROPOUT=dropout_p > 0, EVEN_D=(D == block_d + block_d2 and Dv == block_dv + block_dv2),
                           PRECISION=config.input_precision(q.dtype), USE_TMA=self.tma)

    def static_configs(self) -> tuple:
        return config.backward_configs(*self.dims, self.dtype, heavy=self.heavy)

    def _mask(self, cfg, resident_keys: bool):
        """The mask as the dK/dV (resident_keys: key-major tiles) or dQ kernel reads it (mask_operand.py)."""
        return mask_operand(self.mask, self.stats, resident_keys, cfg.block_m, cfg.block_n, self.arch)

    def _launch(self, kernel, cfg, resident_keys, head_tensors, outs, out_strides, heads, mop, out_descs=(), **kw):
        """The dK/dV or dQ launch: both take (inputs, row stats, outputs, mask and tile summary, program map,
        TMA descriptors of the looped-over tiles, strides, head counts, scalars) in the same order; the dQ kernel
        also reads out and lse. The dK/dV kernel loops over Q / dO tiles, the dQ kernel over K / V tiles."""
        bs = config.batch_strides
        seq, start, blocks, order, ends, t_str, r_str, flags = _tiling(
            cfg, resident_keys, self.mask, self.causal, *self.cu, self.Nq, self.Nk, *self.hints, self.stats)
        q, k, v, dout = self.inputs
        strided = (q, k, v) + head_tensors + (dout,)
        looped = ((q, cfg.block_m), (dout, cfg.block_m)) if resident_keys else ((k, cfg.block_n), (v, cfg.block_n))
        descs = tile_descriptors(looped, self.stats, self.tma)
        args = (q, k, v, *head_tensors, dout, *(() if resident_keys else (self.lse,)), self.stats,
                *outs, mop.tensor, order, ends, *self.cu_args, seq, start, *descs, mop.desc, *out_descs,
                *(x for t in strided for x in bs(t)), *out_strides, *t_str, *r_str, *heads, blocks, *self.scalars)
        return kernel, (blocks * self.B * heads[1 if resident_keys else 0],), args, dict(self.common, **kw, **flags,
                                                                                          MASK_TMA=mop.tma)

    def dkdv(self, cfg) -> list:
        """The dK/dV launch, or two (dV, then dK) where config.split_dkdv says both accumulators spill."""
        bs = config.batch_strides
        dk, dv = self.grads[1:]
        grads = (GRAD_DV.value, GRAD_DK.value) if config.split_dkdv(*self.dims, self.dtype) else \
            (GRAD_DV.value | GRAD_DK.value,)
        mop = self._mask(cfg, True)
        return [self._launch(_bwd_dkdv_kernel, cfg, True, (), (dk, dv), (*bs(dk), *bs(dv), *mop.strides),
                             (self.Hq, self.Hk, self.Hq // self.Hk), mop, GRADS=g) for g in grads]

    def dq(self, cfg):
        dq = self.grads[0]
        dm = self.dmask if self.mask_grad else self.stats
        g_strides = self.dmask.stride() if self.mask_grad else (0, 0, 0, 0)
        mop = self._mask(cfg, False)
        g_desc = config.tma_descriptor(dm, cfg.block_m, cfg.block_n) if self.dmask_tma else self.stats
        return self._launch(_bwd_dq_kernel, cfg, False, (self.out,), (dq, dm),
                            (*config.batch_strides(dq), *mop.strides, *g_strides),
                            (self.Hq, self.Hq // self.Hk), mop, (g_desc,), MASK_GRAD=self.mask_grad,
                            FUSED_STATS=self.fused_stats, DMASK_TMA=self.dmask_tma)

    def row_stats(self, block_m: int) -> list:
        """The pre-pass launch when the dQ kernel does not compute the row statistics itself, else nothing."""
        if self.fused_stats:
            return []
        dout, bs = self.inputs[3], config.batch_strides
        return [(_bwd_row_stats_kernel, (config.cdiv(self.Nq, block_m) * self.B * self.Hq,),
                 (self.out, dout, self.lse, self.stats, *bs(self.out), *bs(dout), self.Hq, self.Nq,
                  self.dims[1]),
                 dict(BLOCK_M=block_m, BLOCK_DV=self.block_dv))]


def backward_launches(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p,
                      mask_grad, dq, dk, dv, dmask, kv_cfg=None, q_cfg=None, arch=None):
    """The kernel launches of the backward, in order (dQ with the row statistics, then dK/dV): a list of
    (kernel, grid, args, kwargs), with tiles kv_cfg / q_cfg (default: config.py's table), for compute
    capability ``arch`` (default: the tensors' device; it decides TMA). aot_check.py compiles them."""
    call = _BackwardCall(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                         dropout_p, mask_grad, dq, dk, dv, dmask, arch)
    static_kv, static_q = call.static_configs()
    return call.row_stats(static_q.block_m) + [call.dq(q_cfg or static_q)] + call.dkdv(kv_cfg or static_kv)


def attention_backward(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                       dropout_p, mask_grad, dq, dk, dv, dmask):
    """Fill dq / dk / dv (shapes of q / k / v, any strides) and, when mask_grad, dmask [B, Hq, Nq, Nk] (which
    must arrive zeroed: skipped tiles are not written); returns (dq, dk, dv, dmask).

    dout / out [B, Hq, Nq, Dv], lse float32 [B, Hq, Nq] (the forward's), other arguments as in
    attention_fwd.attention_forward. Two launches: dQ (which also writes the row statistics), then dK/dV;
    each is autotuned separately (autotune.py).
    """
    call = _BackwardCall(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, seed, scale, is_causal,
                         dropout_p, mask_grad, dq, dk, dv, dmask)
    autotune.launch(call.row_stats(call.static_configs()[1].block_m))
    flags = (mask, is_causal, call.varlen, dropout_p > 0, call.heavy)
    # dq / dk / dv and the row statistics are rewritten whole by every candidate; dmask is not (skipped tiles
    # are left as they are), so it is zeroed again before the chosen config runs when tuning ran.
    autotune.launch_tuned("bwd_dq", q, v.shape[3], *flags, lambda cfg: [call.dq(cfg)],
                          reset=dmask.zero_ if mask_grad else None, mask_grad=bool(mask_grad))
    autotune.launch_tuned("bwd_dkdv", q, v.shape[3], *flags, call.dkdv)
    return dq, dk, dv, dmask
