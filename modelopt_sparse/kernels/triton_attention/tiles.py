"""Which tiles a program visits, which of them are interior, and how their rows are loaded.

``_key_tile_segments`` (query block -> key tiles: forward, dQ) and ``_query_block_segments``
(key tile -> query blocks: dK/dV) split the visited tiles into interior ones, which provably
need neither ``rule._allowed_scores`` nor ``rule._dense_region`` and run a loop body without
them, and edge ones. The loaders read a tile's rows, keys in the permuted order of
:mod:`.network`.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Tile classification. A tile is *interior* when, for every valid query row and every key
# of it, ``_allowed_scores`` and ``_dense_region`` are no-ops: all keys exist, none lies
# after a query (causal) and, when sparse, none is a sink or inside a row's window and the
# step is not a decode step. Nearly every tile of a long sequence is interior and runs a
# loop body without those per-element tests; the rest (the *edge*) run the full rule. The
# visited tiles split into five points s <= a_lo <= a_hi <= b_lo <= b_hi <= end: interior
# [a_lo, a_hi) and [b_lo, b_hi), edge [s, a_lo), [a_hi, b_lo) and [b_hi, end). Each bound
# below is conservative; calling an interior tile edge only costs time.
@triton.jit
def _segments(s, a_lo, a_hi, b_lo, b_hi, end):
    a_lo = tl.minimum(tl.maximum(a_lo, s), end)
    a_hi = tl.minimum(tl.maximum(a_hi, a_lo), end)
    b_lo = tl.minimum(tl.maximum(b_lo, a_hi), end)
    b_hi = tl.minimum(tl.maximum(b_hi, b_lo), end)
    return s, a_lo, a_hi, b_lo, b_hi, end


@triton.jit
def _key_tile_segments(
    p_lo, p_hi, q_len, kv_len, num_sink, window, slide,
    IS_CAUSAL: tl.constexpr, SPARSITY_N: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Key tiles (starts, multiples of BLOCK_N) visited by the query block whose valid
    rows sit at positions p_lo..p_hi, split into interior and edge. With a sliding window
    (causal only) the visit starts at the tile of the first key row p_lo still sees."""
    end = kv_len
    if IS_CAUSAL:
        end = tl.minimum(kv_len, p_hi + 1)
    end = tl.cdiv(end, BLOCK_N) * BLOCK_N
    full = (kv_len // BLOCK_N) * BLOCK_N  # tiles below hold only existing keys
    a_lo = 0
    a_hi = full
    b_lo = end
    b_hi = end
    if IS_CAUSAL:
        # The tile's last key n0 + BLOCK_N - 1 is at most p_lo.
        a_hi = tl.minimum(a_hi, (tl.maximum(p_lo + 1, 0) // BLOCK_N) * BLOCK_N)
    if SPARSITY_N > 0:
        a_lo = tl.cdiv(num_sink, BLOCK_N) * BLOCK_N
        # p_lo - (n0 + BLOCK_N - 1) >= window: every pair is at least a window apart.
        clear = (tl.maximum(p_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
        if IS_CAUSAL:
            a_hi = tl.minimum(a_hi, clear)
        else:
            a_hi = tl.where(window > 0, tl.minimum(a_hi, clear), a_hi)
            # Without the causal mask, tiles wholly after the last row are outside the window too.
            b_lo = tl.where(window > 0, tl.cdiv(tl.maximum(p_hi + 1, num_sink), BLOCK_N) * BLOCK_N, end)
            b_hi = tl.where(window > 0, full, end)
        decode = q_len <= 1
        a_hi = tl.where(decode, a_lo, a_hi)
        b_lo = tl.where(decode, end, b_lo)
    s = 0
    if HAS_WINDOW:
        # Tiles whose last key n0 + BLOCK_N - 1 <= p_lo - slide are older than every
        # row's window: never visited (the speed-up of a sliding window).
        s = (tl.maximum(p_lo - slide + 1, 0) // BLOCK_N) * BLOCK_N
        # Interior tiles are inside every row's window: p_hi - n0 < slide.
        a_lo = tl.maximum(a_lo, tl.cdiv(tl.maximum(p_hi - slide + 1, 0), BLOCK_N) * BLOCK_N)
    return _segments(s, a_lo, a_hi, b_lo, b_hi, end)


@triton.jit
def _query_block_segments(
    n0, q_len, kv_len, num_sink, window, slide,
    IS_CAUSAL: tl.constexpr, SPARSITY_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Query blocks (starts, multiples of BLOCK_M) that see the key tile starting at n0,
    split into interior and edge: the same tiles as ``_key_tile_segments``, seen from the
    key side, except that a partial last block is always edge."""
    offset = _first_query_position(q_len, kv_len)
    s = 0
    if IS_CAUSAL:
        s = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M  # first block reaching key n0
    end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    eligible = n0 + BLOCK_N <= kv_len
    upper = 0  # blocks from here on have p_lo far enough after the tile
    lower = s  # blocks before this have p_hi before the tile (no causal mask only)
    if IS_CAUSAL:
        upper = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    if SPARSITY_N > 0:
        eligible = eligible & (n0 >= num_sink) & (q_len > 1)
        clear = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + window - offset, 0), BLOCK_M) * BLOCK_M
        if IS_CAUSAL:
            upper = tl.maximum(upper, clear)
        else:
            upper = tl.where(window > 0, clear, 0)
            # p_hi <= start_m + BLOCK_M - 1 + offset < n0
            lower = tl.where(window > 0, (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M, s)
    # Interior blocks must also be whole: their loads skip the row predicates.
    whole = (q_len // BLOCK_M) * BLOCK_M
    a_hi = tl.minimum(tl.where(eligible, lower, s), whole)
    b_lo = tl.where(eligible, upper, end)
    b_hi = whole
    if HAS_WINDOW:
        # Rows at positions >= n0 + BLOCK_N - 1 + slide see none of the tile's keys: the
        # blocks after the last row that does are never visited.
        end = tl.minimum(end, tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + slide - offset, 0), BLOCK_M) * BLOCK_M)
        # Interior blocks see every key of the tile inside their window: p_hi - n0 < slide,
        # i.e. start_m + BLOCK_M <= n0 + slide - offset.
        b_hi = tl.minimum(b_hi, (tl.maximum(n0 + slide - offset, 0) // BLOCK_M) * BLOCK_M)
    return _segments(s, s, a_hi, b_lo, b_hi, end)


@triton.jit
def _segment_trip(s, a_lo, a_hi, b_lo, b_hi, end, EDGE: tl.constexpr, BLOCK: tl.constexpr):
    """Number of interior (EDGE=False) or edge tiles."""
    if EDGE:
        return (a_lo - s + b_lo - a_hi + end - b_hi) // BLOCK
    else:
        return (a_hi - a_lo + b_hi - b_lo) // BLOCK


@triton.jit
def _segment_start(t, s, a_lo, a_hi, b_lo, b_hi, EDGE: tl.constexpr, BLOCK: tl.constexpr):
    """Start of the t-th interior (EDGE=False) or edge tile, in increasing order."""
    if EDGE:
        n = s + t * BLOCK
        n = tl.where(n >= a_lo, n + (a_hi - a_lo), n)
        n = tl.where(n >= b_lo, n + (b_hi - b_lo), n)
    else:
        n = a_lo + t * BLOCK
        n = tl.where(n >= a_hi, n + (b_lo - a_hi), n)
    return n


@triton.jit
def _in_interior(n, a_lo, a_hi, b_lo, b_hi):
    return ((n >= a_lo) & (n < a_hi)) | ((n >= b_lo) & (n < b_hi))


@triton.jit
def _key_index(n0, BLOCK_N: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr):
    """Logical key index of each physical column of the tile starting at key n0."""
    col = tl.arange(0, BLOCK_N)
    if SPARSITY_N > 0:
        G: tl.constexpr = BLOCK_N // SPARSITY_M
        return n0 + (col % G) * SPARSITY_M + col // G
    else:
        return n0 + col


@triton.jit
def _load_rows(base, rows, row_valid, stride_t, dim, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
               ALL_VALID: tl.constexpr = False, other=0.0):
    """[len(rows), BLOCK_D] tile of token rows; ``other`` outside valid rows, zero outside
    the head dim. ``ALL_VALID``: the caller guarantees every row is valid (interior
    tiles), so the load needs no per-row predicate."""
    ptrs = base + rows[:, None] * stride_t + dim[None, :]
    if ALL_VALID:
        if HEAD_DIM == dim.shape[0]:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(dim < HEAD_DIM)[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_valid[:, None] & (dim < HEAD_DIM)[None, :], other=other)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _first_query_position(q_len, kv_len):
    """Key-space position of a sequence's first query: the queries are the last q_len keys
    (the Triton side of ``semantics.aligned_query_position``)."""
    return kv_len - q_len


@triton.jit
def _query_rows(start_m, q_len, kv_len, BLOCK_M: tl.constexpr):
    """Rows of a query block, their validity and key-space positions, and the positions of
    its first and last valid rows."""
    rows = start_m + tl.arange(0, BLOCK_M)
    offset = _first_query_position(q_len, kv_len)
    p_hi = tl.minimum(start_m + BLOCK_M, q_len) - 1 + offset
    return rows, rows < q_len, rows + offset, start_m + offset, p_hi


@triton.jit
def _key_tile(k_base, v_base, n0, kv_len, stride_kt, stride_vt, dim,
              HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
              SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr, EDGE: tl.constexpr = True):
    """The K and V rows of the tile starting at key n0, in the permuted order. Interior
    tiles (``EDGE`` false) lie wholly inside the keys and load without row predicates."""
    k_idx = _key_index(n0, BLOCK_N, SPARSITY_N, SPARSITY_M)
    k_valid = k_idx < kv_len
    k = _load_rows(k_base, k_idx, k_valid, stride_kt, dim, HEAD_DIM, UPCAST, not EDGE)
    v = _load_rows(v_base, k_idx, k_valid, stride_vt, dim, HEAD_DIM, UPCAST, not EDGE)
    return k_idx, k, v
