"""@triton.jit helpers shared by the forward and backward attention kernels.

- ``load_rows``: a [rows, cols] tile load whose bounds checks vanish for the dimensions a constexpr says are
  even (EVEN_M / EVEN_N / EVEN_HEADDIM in flash_attn_triton.py's terms); ``load_tma_rows`` the same tile
  through a TMA descriptor (sm_90+, config.use_tma);
- ``mask_scores``: applies a dense bool/float mask (through its strides, broadcast dims have stride 0), causal
  (top-left) and key bounds to a tile of scaled scores;
- ``dropout_keep``: the counter-based hash of vitkern/dropout.py in uint32 arithmetic, bit-exact with
  ``vitkern.dropout.keep_mask``.

Scores stay in natural units (q.k * scale + bias) and exponentials are exp2((s - m) * log2(e)): the
subtraction comes before the multiply, so logits of ~1e4 lose nothing to rounding and the backward's
recomputed P is exactly the forward's (folding log2(e) into the scale, as the Triton tutorial does, makes
|s| * 2**-24 errors in P at large logits).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# vitkern/dropout.py's constants (all wrap modulo 2**32).
_MIX_1 = tl.constexpr(0x7FEB352D)
_MIX_2 = tl.constexpr(0x846CA68B)
_GOLDEN = tl.constexpr(0x9E3779B9)
_COL_MUL = tl.constexpr(0x85EBCA6B)

# Tile states written by mask_summary.py.
TILE_EMPTY = tl.constexpr(0)     # no pair takes part: skip the tile
TILE_FULL = tl.constexpr(1)      # every pair takes part with a zero bias: skip the mask load
TILE_PARTIAL = tl.constexpr(2)   # load the mask


@triton.jit
def load_rows(ptrs, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load ptrs [R, C] (row offsets ``rows`` [R], column offsets ``cols`` [C]); out of bounds reads give 0."""
    if EVEN_ROWS:
        if EVEN_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        if EVEN_COLS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return x


@triton.jit
def load_tma_rows(desc, b, h, row0, col0, rows, n_rows, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  ZERO_ROWS: tl.constexpr):
    """Tile [BLOCK_R, BLOCK_C] at (b, h, row0, col0) of a [B, H, N, D] TMA descriptor (config.tma_descriptor):
    one bulk copy into shared memory, no address math per element; rows past N and columns past D come back 0.
    ZERO_ROWS: rows at or past n_rows (``rows`` their positions) are zeroed too: in a packed batch they are the
    next sequence's, and a 0 weight times a NaN there would reach this one (callers whose products mask those
    rows out leave it off)."""
    x = desc.load([b, h, row0.to(tl.int32), col0]).reshape(BLOCK_R, BLOCK_C)
    if ZERO_ROWS:
        x = tl.where(rows[:, None] < n_rows, x, 0.0)
    return x


@triton.jit
def store_rows(ptrs, x, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS:
        if EVEN_COLS:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=cols[None, :] < n_cols)
    else:
        if EVEN_COLS:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def apply_bias(s, mask_ptrs, read, LOADED: tl.constexpr):
    """s plus the float mask entries at mask_ptrs (loaded where ``read``; LOADED: mask_ptrs holds the entries
    themselves, a TMA tile); a -inf entry takes the pair out even when its score is NaN (NaN + -inf is NaN)."""
    if LOADED:
        bias = mask_ptrs.to(tl.float32)
    else:
        bias = tl.load(mask_ptrs, mask=read, other=0.0).to(tl.float32)
    return tl.where(bias == float("-inf"), float("-inf"), s + bias)


@triton.jit
def mask_bits_keep(word_ptrs, first_col, rows, n_rows, BLOCK_C: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Bool [R, BLOCK_C]: the bits of columns [first_col, first_col + BLOCK_C) of a packed bool mask
    (mask_bits.py), word_ptrs [R] pointing at each row's word 0; CHECK_ROWS: rows at or past n_rows (``rows``
    their positions) are not read (False). first_col is a multiple of BLOCK_C. Each word is a 1-D load per
    row; which word a column's bit lies in is fixed per register (the column's word index folds to a constant
    in the MMA layout), so a score costs a bit test and, at the caller, a select."""
    cols = tl.arange(0, BLOCK_C)
    if BLOCK_C >= 32:
        w0 = first_col // 32
        words = _load_words(word_ptrs + w0, rows, n_rows, CHECK_ROWS)[:, None] + tl.zeros([1, BLOCK_C], tl.int32)
        for j in tl.static_range(1, BLOCK_C // 32):
            w = _load_words(word_ptrs + w0 + j, rows, n_rows, CHECK_ROWS)
            words = tl.where((cols // 32)[None, :] == j, w[:, None], words)
        keep = (words & (1 << (cols % 32))[None, :]) != 0
    else:
        w = _load_words(word_ptrs + first_col // 32, rows, n_rows, CHECK_ROWS) >> (first_col % 32)
        keep = (w[:, None] & (1 << cols)[None, :]) != 0
    return keep


@triton.jit
def _load_words(ptrs, rows, n_rows, CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        w = tl.load(ptrs, mask=rows < n_rows, other=0)
    else:
        w = tl.load(ptrs)
    return w


@triton.jit
def query_tile_mask(mask_base, mask_tile, offs_m, offs_n, first_col, q_len, stride_mn,
                    MASK_KIND: tl.constexpr, MASK_TMA: tl.constexpr):
    """What a query-major tile (forward, dQ) of keys offs_n (from first_col) hands mask_scores / the backward's
    _probs as its mask: a bool mask's row words mask_base [BM] as they are (mask_bits.py); a float mask's entries
    as a TMA tile (MASK_TMA: mask_tile = (descriptor, batch, head, first row), mask_operand.py) or as pointers
    built per tile from the rows' mask_base [BM, 1] (a [BM, BN] pointer tile would live in registers)."""
    m = mask_base
    if MASK_KIND == 2:
        if MASK_TMA:
            desc, b, h, row = mask_tile
            m = load_tma_rows(desc, b, h, row, first_col, offs_m, q_len, offs_m.shape[0], offs_n.shape[0], False)
        else:
            m = mask_base + offs_n.to(tl.int64)[None, :] * stride_mn
    return m


@triton.jit
def chunk_columns(BLOCK: tl.constexpr, BLOCK2: tl.constexpr):
    """Column offsets of a head dim's two chunks (config.head_split): [0, BLOCK) and [BLOCK, BLOCK + BLOCK2);
    the second is a placeholder (the first again) when BLOCK2 == 0, for code that uses it only when > 0."""
    cols = tl.arange(0, BLOCK)
    cols2 = cols
    if BLOCK2 > 0:
        cols2 = BLOCK + tl.arange(0, BLOCK2)
    return cols, cols2


@triton.jit
def tile_at(order_base, i, stride, LISTED: tl.constexpr):
    """The tile a loop visits at step i: i itself, or (LISTED) the i-th entry of a mask_summary tile list."""
    t = i
    if LISTED:
        t = tl.load(order_base + i * stride)
    return t


@triton.jit
def list_ends(ends):
    """Where a resident tile's three tile lists end (mask_summary.row_lists / col_lists: full tiles without
    checks, full tiles with them, partial tiles): positions [0, e_full), [e_full, e_edge), [e_edge, e_part)."""
    return tl.load(ends), tl.load(ends + 1), tl.load(ends + 2)


@triton.jit
def mask_scores(s, offs_m, offs_n, first_col, q_len, k_len, mask_ptrs,
                MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
                MASK_TMA: tl.constexpr = False):
    """s [BM, BN] (scaled scores); offs_m / offs_n are positions inside the sequence (causal is top-left).

    MASK_KIND: 0 none, 1 bool packed in words (mask_bits.py; mask_ptrs [BM] the rows' word pointers, the tile's
    first column first_col), 2 float (added to the scores; mask_ptrs [BM, BN] the entries' pointers, or under
    MASK_TMA the entries, a TMA tile; mask_operand.py): the mask is read
    (the callers hand only tiles the mask summary calls partial to a masked call). CAUSAL / CHECK_N say
    whether this tile can hold pairs above the diagonal / keys past k_len (callers split their loops so most
    tiles need neither); CHECK_M whether rows past q_len exist (only their mask reads matter).
    """
    if MASK_KIND == 1:
        # Keys past the end have 0 bits; rows past q_len are not read.
        keep = mask_bits_keep(mask_ptrs, first_col, offs_m, q_len, s.shape[1], CHECK_M)
        s = tl.where(keep, s, float("-inf"))
    elif MASK_KIND == 2:
        read = tl.full(s.shape, 1, tl.int1)
        if CHECK_M:
            read = read & (offs_m[:, None] < q_len)
        if CHECK_N:
            read = read & (offs_n[None, :] < k_len)
        s = apply_bias(s, mask_ptrs, read, MASK_TMA)
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    if CHECK_N and MASK_KIND != 1:      # a bool mask's words have 0 bits past the last key (mask_bits.py)
        s = tl.where(offs_n[None, :] < k_len, s, float("-inf"))
    return s


@triton.jit
def _mix32(x):
    # lowbias32 on uint32: multiplications wrap modulo 2**32 like the int64-masked spec.
    x = x ^ (x >> 16)
    x = x * _MIX_1
    x = x ^ (x >> 15)
    x = x * _MIX_2
    x = x ^ (x >> 16)
    return x


@triton.jit
def dropout_keep(seed, bh, rows, cols, threshold):
    """Bool [len(rows), len(cols)]: which (row, col) scores of query head ``bh`` survive dropout.

    seed, threshold: int32 kernel arguments holding uint32 bit patterns; bh: batch * Hq + head;
    rows / cols: token indices (in the packed sequence for varlen).
    """
    seed_u = seed.to(tl.uint32, bitcast=True)
    thr_u = threshold.to(tl.uint32, bitcast=True)
    a = _mix32(seed_u + bh.to(tl.uint32) * _GOLDEN)
    r = _mix32(a ^ rows.to(tl.uint32))
    u = _mix32(r[:, None] + cols.to(tl.uint32)[None, :] * _COL_MUL)
    return u >= thr_u


@triton.jit
def query_block_of_program(pid, num_m_blocks, num_heads, groups, BlockSeq, BlockStart, CuQ, CuK, seq_len_q,
                           seq_len_k, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The query block program ``pid`` of a 1-D grid owns:
    (b, h, hk, pid_m, pid_bh, m_start, q_start, q_len, k_start, k_len), pid_m indexing the block (or the varlen
    map's entry) and pid_bh = b * num_heads + h.

    Consecutive programs are the query blocks of one head, so that head's K/V stay in L2. Varlen programs read
    their (sequence, block) from the device-side map of varlen_map.py; q_start/k_start are then the sequence's
    first token and m_start the block's first row within it.
    """
    pid_m = pid % num_m_blocks
    if IS_CAUSAL and not IS_VARLEN:
        pid_m = num_m_blocks - 1 - pid_m      # longest rows first: better tail balance
    pid_bh = pid // num_m_blocks
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // groups
    if IS_VARLEN:
        seq = tl.load(BlockSeq + pid_m)
        m_start = tl.load(BlockStart + pid_m)
        q_start = tl.load(CuQ + seq).to(tl.int64)
        q_len = (tl.load(CuQ + seq + 1) - q_start).to(tl.int32)
        k_start = tl.load(CuK + seq).to(tl.int64)
        k_len = (tl.load(CuK + seq + 1) - k_start).to(tl.int32)
    else:
        m_start = pid_m * BLOCK_M
        q_start = 0
        k_start = 0
        q_len = seq_len_q
        k_len = seq_len_k
    return b, h, hk, pid_m, pid_bh, m_start, q_start, q_len, k_start, k_len
