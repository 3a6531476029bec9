"""Fused N:M sparse flash attention in Triton: forward, backward and a mask probe.

Layout of the score tile. Keys of a ``BLOCK_N`` tile are loaded in a permuted order: the
physical column ``c`` holds the logical key ``n0 + (c % G) * M + c // G`` with
``G = BLOCK_N // M``. The ``M`` members of a group then sit ``G`` columns apart, in the top
``log2(M)`` bits of the column index. On the tensor-core accumulator those bits belong to
registers of one thread, so splitting the tile into its members (``_split_half``) and
joining a per-group value back (``_join_half``) are register relabellings, and the
selection below is pure ALU work with no data movement between threads. Masks always use
the logical key index, so the rule never depends on the tile size; permuting the
contraction index of P·V is harmless because V's rows are permuted the same way.

The rule itself (docs/semantics.md) lives in ``_allowed_scores``, ``_dense_region`` and
``_selection_exponent``. ``_key_tile_segments`` and ``_query_block_segments`` split the tiles into
interior ones, which provably need neither of the first two tests and run a loop body
without them, and edge ones. The forward, both backward kernels and the mask probe share
all of these.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from .switches import env_flag
from .api import interpreting
from .reference import SparseParams
from .triton_launch import DirectLauncher, LaunchPlan, hooks_allow_plans

# -inf is written as a literal in the kernels, not as a global constexpr: torch.compile
# (Inductor) re-emits a kernel's globals with repr(), and repr(-inf) is not Python.
# Compiled kernels may use inline PTX; the interpreter cannot run it.
PTX = tl.constexpr(not interpreting())
LOG2E = 1.4426950408889634  # host-side only


# --------------------------------------------------------------------------------------
# Register-level group selection
# --------------------------------------------------------------------------------------
@triton.jit
def _split_half(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """[ROWS, WIDTH] -> (columns [0, WIDTH/2), columns [WIDTH/2, WIDTH))."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _join_half(a, b, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """Inverse of ``_split_half``: a fills columns [0, WIDTH/2), b the rest."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (ROWS, WIDTH))


@triton.jit
def _cx(a, b):
    """Compare-exchange, larger first."""
    return tl.maximum(a, b), tl.minimum(a, b)


# Batcher's odd-even merge of two descending lists; the compiler drops every comparator
# whose outputs the caller does not use, so asking for one rank costs only its cone.
@triton.jit
def _merge2(a0, a1, b0, b1):
    e0, e1 = _cx(a0, b0)
    o0, o1 = _cx(a1, b1)
    r1, r2 = _cx(o0, e1)
    return e0, r1, r2, o1


@triton.jit
def _merge4(a0, a1, a2, a3, b0, b1, b2, b3):
    e0, e1, e2, e3 = _merge2(a0, a2, b0, b2)
    o0, o1, o2, o3 = _merge2(a1, a3, b1, b3)
    r1, r2 = _cx(o0, e1)
    r3, r4 = _cx(o1, e2)
    r5, r6 = _cx(o2, e3)
    return e0, r1, r2, r3, r4, r5, r6, o3


@triton.jit
def _merge8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    e0, e1, e2, e3, e4, e5, e6, e7 = _merge4(a0, a2, a4, a6, b0, b2, b4, b6)
    o0, o1, o2, o3, o4, o5, o6, o7 = _merge4(a1, a3, a5, a7, b1, b3, b5, b7)
    r1, r2 = _cx(o0, e1)
    r3, r4 = _cx(o1, e2)
    r5, r6 = _cx(o2, e3)
    r7, r8 = _cx(o3, e4)
    r9, r10 = _cx(o4, e5)
    r11, r12 = _cx(o5, e6)
    r13, r14 = _cx(o6, e7)
    return e0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, o7


@triton.jit
def _sort4(x0, x1, x2, x3):
    a0, a1 = _cx(x0, x1)
    b0, b1 = _cx(x2, x3)
    return _merge2(a0, a1, b0, b1)


@triton.jit
def _sort8(x0, x1, x2, x3, x4, x5, x6, x7):
    a0, a1, a2, a3 = _sort4(x0, x1, x2, x3)
    b0, b1, b2, b3 = _sort4(x4, x5, x6, x7)
    return _merge4(a0, a1, a2, a3, b0, b1, b2, b3)


@triton.jit
def _members2(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    return _split_half(x, ROWS, WIDTH)


@triton.jit
def _members4(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    lo, hi = _split_half(x, ROWS, WIDTH)
    x0, x1 = _split_half(lo, ROWS, WIDTH // 2)
    x2, x3 = _split_half(hi, ROWS, WIDTH // 2)
    return x0, x1, x2, x3


@triton.jit
def _members8(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    lo, hi = _split_half(x, ROWS, WIDTH)
    x0, x1, x2, x3 = _members4(lo, ROWS, WIDTH // 2)
    x4, x5, x6, x7 = _members4(hi, ROWS, WIDTH // 2)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _group_nth_largest(x, N: tl.constexpr, M: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                       WITH_NEXT: tl.constexpr = False):
    """[ROWS, WIDTH/M]: the N-th largest member (with multiplicity) of every group, and with
    ``WITH_NEXT`` the (N+1)-th as well."""
    if M == 2:
        x0, x1 = _members2(x, ROWS, WIDTH)
        ranked = _cx(x0, x1)
    elif M == 4:
        x0, x1, x2, x3 = _members4(x, ROWS, WIDTH)
        ranked = _sort4(x0, x1, x2, x3)
    elif M == 8:
        x0, x1, x2, x3, x4, x5, x6, x7 = _members8(x, ROWS, WIDTH)
        ranked = _sort8(x0, x1, x2, x3, x4, x5, x6, x7)
    else:
        lo, hi = _split_half(x, ROWS, WIDTH)
        a0, a1, a2, a3, a4, a5, a6, a7 = _members8(lo, ROWS, WIDTH // 2)
        b0, b1, b2, b3, b4, b5, b6, b7 = _members8(hi, ROWS, WIDTH // 2)
        a0, a1, a2, a3, a4, a5, a6, a7 = _sort8(a0, a1, a2, a3, a4, a5, a6, a7)
        b0, b1, b2, b3, b4, b5, b6, b7 = _sort8(b0, b1, b2, b3, b4, b5, b6, b7)
        ranked = _merge8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7)
    if WITH_NEXT:
        return ranked[N - 1], ranked[N]
    else:
        return ranked[N - 1]


@triton.jit
def _row_max(qk, EDGE: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr,
             ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row max of a score tile. On interior sparse tiles it is the max of the group maxima,
    which the selection network computes anyway: the compiler shares those comparisons
    with ``_group_floor``, and the row reduction shrinks from BLOCK_N to BLOCK_N / M
    values."""
    if SPARSITY_N > 0 and not EDGE:
        return tl.max(_group_nth_largest(qk, 1, SPARSITY_M, ROWS, BLOCK_N), 1)
    else:
        return tl.max(qk, 1)


@triton.jit
def _broadcast_to_members(t, M: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """[ROWS, WIDTH/M] per-group values -> [ROWS, WIDTH], repeated on every member column."""
    G: tl.constexpr = WIDTH // M
    full = _join_half(t, t, ROWS, 2 * G)
    if M >= 4:
        full = _join_half(full, full, ROWS, 4 * G)
    if M >= 8:
        full = _join_half(full, full, ROWS, 8 * G)
    if M >= 16:
        full = _join_half(full, full, ROWS, 16 * G)
    return full


@triton.jit
def _group_floor(x, N: tl.constexpr, M: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """[ROWS, WIDTH]: the N-th largest of each element's group, on every member."""
    return _broadcast_to_members(_group_nth_largest(x, N, M, ROWS, WIDTH), M, ROWS, WIDTH)


@triton.jit
def _index_ordered_keys(qk, M: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """Distinct int64 keys that order scores like the floats, ties broken by lower index.

    The float's bits are mapped to an int32 with the same order (negatives flipped, -0
    folded onto +0), then the member index fills 4 low bits, reversed so a lower index is
    larger. Selecting the N largest keys is then exactly the "index" rule.
    """
    bits = qk.to(tl.int32, bitcast=True)
    bits = tl.where(qk == 0, 0, bits)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    member = tl.arange(0, WIDTH) // (WIDTH // M)
    return ordered * 16 + (M - 1 - member)[None, :]


@triton.jit
def _allowed_scores(qk, q_pos, k_idx, kv_len, slide, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """-inf outside the sequence's keys, when causal after the query's position, and with
    a sliding window on keys ``slide`` or more positions before the query."""
    allowed = (k_idx < kv_len)[None, :]
    if IS_CAUSAL:
        allowed = allowed & (k_idx[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        allowed = allowed & (q_pos[:, None] - k_idx[None, :] < slide)
    return tl.where(allowed, qk, float("-inf"))


@triton.jit
def _tanh(x):
    """tanh from one exp2 of a non-positive argument (never overflows; tanh(-inf) = -1).
    The absolute error is a few fp32 ulps of 1, i.e. a few ulps of the cap in the score."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _log2_scores(qk, qk_scale, cap_scale, cap_inv_scale, SOFTCAP: tl.constexpr):
    """The softmax exponent in the log2 domain of raw scores q·k (or of a row max of them):
    ``qk * scale * log2(e)``, or with a soft cap ``cap * tanh(qk * scale / cap) * log2(e)``.
    -inf (a disallowed score) stays -inf: the cap would otherwise lift it to -cap.
    ``cap_scale = cap * log2(e)``, ``cap_inv_scale = softmax_scale / cap`` (host-side
    products, named ``*scale`` so that launchers type them as floats)."""
    if SOFTCAP:
        return tl.where(qk > float("-inf"), cap_scale * _tanh(qk * cap_inv_scale), float("-inf"))
    else:
        return qk * qk_scale


@triton.jit
def _dense_region(q_pos, k_idx, q_len, num_sink, window):
    """Entries that skip N:M selection: sink keys, the window of ``window`` keys ending at
    the query's own position, and every entry of a single-token (decode) step."""
    distance = q_pos[:, None] - k_idx[None, :]
    return (q_len == 1) | (k_idx[None, :] < num_sink) | ((distance >= 0) & (distance < window))


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
def _selection_exponent(
    qk, arg, q_pos, k_idx, q_len, num_sink, window,
    EDGE: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr, TIE_INDEX: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``arg`` (the softmax exponent of the raw scores ``qk``) where N:M selection keeps the
    score, and an exponent whose exp2 is exactly 0 (-inf, or below -2**42) where it drops it.

    On edge tiles ``qk`` and ``arg`` already hold -inf on disallowed entries
    (``_allowed_scores``), which then count as -inf in their group. On interior tiles
    (``EDGE`` false) the dense region is empty and no score is -inf, by construction.

    A score is kept when it is at or above its group's N-th largest (``_group_floor``).
    Interior tiles evaluate that test with ``_drop_below_floor``, on the FMA pipe, since
    the selection network already fills the compare/min/max pipe. No i1 tensor may cross a
    branch: Triton packs it into integer bitmasks and unpacks it again, which once cost
    more than the selection itself. That is also why the interior/edge split is made by
    loop, not by a branch inside one loop body.
    """
    if SPARSITY_N > 0:
        if EDGE:
            scores = _index_ordered_keys(qk, SPARSITY_M, ROWS, BLOCK_N) if TIE_INDEX else qk
            kept = scores >= _group_floor(scores, SPARSITY_N, SPARSITY_M, ROWS, BLOCK_N)
            kept = kept | _dense_region(q_pos, k_idx, q_len, num_sink, window)
            arg = tl.where(kept, arg, float("-inf"))
        elif TIE_INDEX:
            # The rules differ only in a group whose N-th and (N+1)-th largest are equal.
            # Interior tiles hold no -inf, so such exact ties are rare: test the tile for
            # one and build the exact (and costly) index keys only when there is one.
            nth, nxt = _group_nth_largest(qk, SPARSITY_N, SPARSITY_M, ROWS, BLOCK_N, True)
            if tl.max(tl.where(nth == nxt, 1, 0)) > 0:
                keys = _index_ordered_keys(qk, SPARSITY_M, ROWS, BLOCK_N)
                arg = tl.where(keys >= _group_floor(keys, SPARSITY_N, SPARSITY_M, ROWS, BLOCK_N), arg, float("-inf"))
            else:
                arg = _drop_below_floor(arg, qk, _broadcast_to_members(nth, SPARSITY_M, ROWS, BLOCK_N))
        else:
            arg = _drop_below_floor(arg, qk, _group_floor(qk, SPARSITY_N, SPARSITY_M, ROWS, BLOCK_N))
    return arg


@triton.jit
def _kept_entries(
    qk, q_pos, k_idx, q_len, num_sink, window,
    EDGE: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr, TIE_INDEX: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Bool: the entries of a score tile (disallowed ones already -inf) that the softmax
    keeps. The selection is applied to an all-zero exponent, then exp2, exactly as the
    kernels apply it: 1 where kept, and 0 where dropped only if the drop really zeroes the
    probability, whatever the scores' range."""
    zero = tl.where(qk > float("-inf"), 0.0, float("-inf"))
    return tl.math.exp2(_selection_exponent(
        qk, zero, q_pos, k_idx, q_len, num_sink, window, EDGE, SPARSITY_N, SPARSITY_M, TIE_INDEX, ROWS, BLOCK_N,
    )) > 0.0


@triton.jit
def _drop_below_floor(arg, scores, floor):
    """``arg`` where ``scores >= floor``, else ``arg - 2**127 * sat((floor - scores) * 2**64)``.

    For finite scores this is the kept test ``scores >= floor`` computed by three FMA-pipe
    instructions (sub, mul.sat, fma) instead of a compare and a select on the pipe that
    runs the selection network. Kept: floor - scores <= 0 saturates to 0 and ``arg`` is
    returned unchanged. Dropped: floor - scores is at least the smallest subnormal
    (2**-149, no flush to zero), so the saturated value is at least 2**-85 (or 1 on
    overflow) and the exponent falls by at least 2**42: exp2 gives exactly 0. Every
    product is by a power of two, hence exact, so the interpreter's version below rounds
    the same way.
    """
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 d; sub.f32 d, $3, $2; mul.sat.f32 d, d, 0f5F800000; fma.rn.f32 $0, d, 0fFF000000, $1; }",
            "=r,r,r,r", [arg, scores, floor], dtype=tl.float32, is_pure=True, pack=1)
    else:
        below = tl.minimum(tl.maximum((floor - scores) * 18446744073709551616.0, 0.0), 1.0)
        return arg - below * 1.7014118346046923e38


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


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, STATS,
    Q_START, Q_LEN, K_START, K_LEN,
    qk_scale, num_sink, window, slide, cap_scale, cap_inv_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    stride_qb, stride_kb, stride_vb, stride_ob, stride_lb,
    max_q_bucket,  # autotune key only
    LEARNED_SINKS,  # [Hq] logits (any float dtype), read only with HAS_LEARNED_SINKS
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr,
    TIE_INDEX: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, WITH_STATS: tl.constexpr, WITH_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEARNED_SINKS: tl.constexpr = False,
):
    # Sequence s reads rows Q_START[s]... of batch row s when the tensors are a padded batch
    # [B, S, H, D] (batch strides set), or of the one packed row [T, H, D] (batch strides 0).
    pid_m = tl.program_id(0)
    # Float scalars arrive as fp64 when torch.compile (Inductor) launches the kernel;
    # the softmax runs in fp32 either way.
    qk_scale = tl.cast(qk_scale, tl.float32)
    if SOFTCAP:
        cap_scale = tl.cast(cap_scale, tl.float32)
        cap_inv_scale = tl.cast(cap_inv_scale, tl.float32)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUPS
    q_len = tl.load(Q_LEN + seq)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    q_start = tl.load(Q_START + seq).to(tl.int64)
    k_start = tl.load(K_START + seq).to(tl.int64)
    kv_len = tl.load(K_LEN + seq)
    rows, row_valid, q_pos, p_lo, p_hi = _query_rows(start_m, q_len, kv_len, BLOCK_M)
    dim = tl.arange(0, BLOCK_D)

    batch_row = seq.to(tl.int64)
    q = _load_rows(Q + batch_row * stride_qb + q_start * stride_qt + head * stride_qh, rows, row_valid, stride_qt,
                   dim, HEAD_DIM, UPCAST)
    k_base = K + batch_row * stride_kb + k_start * stride_kt + kv_head * stride_kh
    v_base = V + batch_row * stride_vb + k_start * stride_vt + kv_head * stride_vh

    if HAS_LEARNED_SINKS:
        # The learned sink is the online softmax's initial state: one term exp(sink) with no
        # value row, i.e. running max = the sink's logit and running sum = 1, in the log2
        # units of the scores (sink * log2 e: it is not scaled or capped). Every later tile
        # rescales it like any other term, so it is counted exactly once.
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(LEARNED_SINKS + head).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WITH_STATS:
        l_dropped = tl.zeros([BLOCK_M], tl.float32)
        n_allowed = tl.zeros([BLOCK_M], tl.int32)
        n_kept = tl.zeros([BLOCK_M], tl.int32)

    s0, a_lo, a_hi, b_lo, b_hi, end = _key_tile_segments(p_lo, p_hi, q_len, kv_len, num_sink, window, slide,
                                                         IS_CAUSAL, SPARSITY_N, BLOCK_N, HAS_WINDOW)
    # Interior tiles first, then the edge; the online softmax does not care about order.
    for EDGE in tl.static_range(2):
        for t in range(0, _segment_trip(s0, a_lo, a_hi, b_lo, b_hi, end, EDGE, BLOCK_N)):
            n0 = _segment_start(t, s0, a_lo, a_hi, b_lo, b_hi, EDGE, BLOCK_N)
            k_idx, k, v = _key_tile(k_base, v_base, n0, kv_len, stride_kt, stride_vt, dim,
                                    HEAD_DIM, UPCAST, BLOCK_N, SPARSITY_N, SPARSITY_M, EDGE)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if EDGE:
                qk = _allowed_scores(qk, q_pos, k_idx, kv_len, slide, IS_CAUSAL, HAS_WINDOW)
            # A group's maximum always survives selection, so the row max of the allowed
            # scores is the row max of the kept ones (the soft cap is increasing).
            m_tile = _log2_scores(_row_max(qk, EDGE, SPARSITY_N, SPARSITY_M, BLOCK_M, BLOCK_N), qk_scale,
                                  cap_scale, cap_inv_scale, SOFTCAP)
            m_new = tl.maximum(m_i, m_tile)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_shift)
            arg = _log2_scores(qk, qk_scale, cap_scale, cap_inv_scale, SOFTCAP) - m_shift[:, None]
            if WITH_STATS:
                p_allowed = tl.math.exp2(arg)
                kept = _kept_entries(qk, q_pos, k_idx, q_len, num_sink, window,
                                     EDGE, SPARSITY_N, SPARSITY_M, TIE_INDEX, BLOCK_M, BLOCK_N)
                p = tl.where(kept, p_allowed, 0.0)
                n_allowed += tl.sum((qk > float("-inf")).to(tl.int32), 1)
                n_kept += tl.sum(kept.to(tl.int32), 1)
                # Summing only the dropped terms keeps dense attention at exactly 0.
                l_dropped = l_dropped * alpha + tl.sum(p_allowed - p, 1)
            else:
                p = tl.math.exp2(_selection_exponent(
                    qk, arg, q_pos, k_idx, q_len, num_sink, window,
                    EDGE, SPARSITY_N, SPARSITY_M, TIE_INDEX, BLOCK_M, BLOCK_N,
                ))
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + batch_row * stride_ob + (q_start + rows[:, None]) * stride_ot + head * stride_oh + dim[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_valid[:, None] & (dim < HEAD_DIM)[None, :])
    lse_offset = batch_row * stride_lb + (q_start + rows) * stride_lt + head * stride_lh
    if WITH_LSE:  # only the backward reads it
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + lse_offset, lse, mask=row_valid)
    if WITH_STATS:
        # Per row: allowed count, kept count, dropped softmax mass; reduced on the host.
        # With a learned sink its term is in both l_i and l_allowed (docs/semantics.md).
        l_allowed = l_i + l_dropped
        has_keys = l_allowed > 0.0
        dropped = tl.where(has_keys, l_dropped / tl.where(has_keys, l_allowed, 1.0), 0.0)
        s_ptr = STATS + lse_offset * 3
        tl.store(s_ptr, n_allowed.to(tl.float32), mask=row_valid)
        tl.store(s_ptr + 1, n_kept.to(tl.float32), mask=row_valid)
        tl.store(s_ptr + 2, dropped, mask=row_valid)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------
@triton.jit
def _recomputed_probabilities(
    qk, lse, qk_scale, q_pos, k_idx, q_len, kv_len, num_sink, window, slide, cap_scale, cap_inv_scale,
    EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr,
    TIE_INDEX: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward's softmax probabilities of one tile, rebuilt from its raw scores q·kᵀ and
    its lse (log2 domain): exp2(q·kᵀ·qk_scale - lse) on kept entries, exactly 0 on the others.

    Callers issue dO·vᵀ right after q·kᵀ, so that the tensor cores compute it while this
    runs on the other pipes (docs/performance.md, item 22)."""
    if EDGE:
        qk = _allowed_scores(qk, q_pos, k_idx, kv_len, slide, IS_CAUSAL, HAS_WINDOW)
    return tl.math.exp2(_selection_exponent(
        qk, _log2_scores(qk, qk_scale, cap_scale, cap_inv_scale, SOFTCAP) - lse[:, None],
        q_pos, k_idx, q_len, num_sink, window,
        EDGE, SPARSITY_N, SPARSITY_M, TIE_INDEX, ROWS, BLOCK_N,
    ))


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA, total,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta = rowsum(o * do) in fp32 for every row and head: the softmax-gradient term both
    backward kernels subtract. One pass over o and do, no fp32 copies of them in memory."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    head = tl.program_id(1)
    dim = tl.arange(0, BLOCK_D)
    valid = rows < total
    o = _load_rows(O + head * stride_oh, rows, valid, stride_ot, dim, HEAD_DIM, True)
    do = _load_rows(DO + head * stride_doh, rows, valid, stride_dot, dim, HEAD_DIM, True)
    tl.store(DELTA + rows * stride_lt + head * stride_lh, tl.sum(o * do, 1), mask=valid)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_START, Q_LEN, K_START, K_LEN,
    softmax_scale, qk_scale, num_sink, window, slide, cap_scale, cap_inv_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    max_k_bucket,  # autotune key only
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr,
    TIE_INDEX: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    # Float scalars arrive as fp64 when torch.compile (Inductor) launches the kernel.
    qk_scale = tl.cast(qk_scale, tl.float32)
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    if SOFTCAP:
        cap_scale = tl.cast(cap_scale, tl.float32)
        cap_inv_scale = tl.cast(cap_inv_scale, tl.float32)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    kv_len = tl.load(K_LEN + seq)
    n0 = pid_n * BLOCK_N
    if n0 >= kv_len:
        return
    q_start = tl.load(Q_START + seq).to(tl.int64)
    q_len = tl.load(Q_LEN + seq)
    k_start = tl.load(K_START + seq).to(tl.int64)
    dim = tl.arange(0, BLOCK_D)

    k_idx, k, v = _key_tile(K + k_start * stride_kt + kv_head * stride_kh,
                            V + k_start * stride_vt + kv_head * stride_vh, n0, kv_len,
                            stride_kt, stride_vt, dim, HEAD_DIM, UPCAST, BLOCK_N, SPARSITY_N, SPARSITY_M)
    k_valid = k_idx < kv_len
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    s0, a_lo, a_hi, b_lo, b_hi, end = _query_block_segments(n0, q_len, kv_len, num_sink, window, slide,
                                                            IS_CAUSAL, SPARSITY_N, BLOCK_M, BLOCK_N, HAS_WINDOW)
    for g in range(GROUPS):
        head = kv_head * GROUPS + g
        q_base = Q + q_start * stride_qt + head * stride_qh
        do_base = DO + q_start * stride_dot + head * stride_doh
        if TMA:
            # Tensor-memory-accelerator copies take the address arithmetic of the two
            # biggest loads off the threads (experimental, MODELOPT_SPARSE_TMA=1).
            q_desc = tl.make_tensor_descriptor(q_base, [q_len, HEAD_DIM], [stride_qt, 1], [BLOCK_M, BLOCK_D])
            do_desc = tl.make_tensor_descriptor(do_base, [q_len, HEAD_DIM], [stride_dot, 1], [BLOCK_M, BLOCK_D])
        for EDGE in tl.static_range(2):
            for t in range(0, _segment_trip(s0, a_lo, a_hi, b_lo, b_hi, end, EDGE, BLOCK_M)):
                start_m = _segment_start(t, s0, a_lo, a_hi, b_lo, b_hi, EDGE, BLOCK_M)
                rows, row_valid, q_pos, p_lo, p_hi = _query_rows(start_m, q_len, kv_len, BLOCK_M)
                if TMA and not EDGE:
                    q = q_desc.load([start_m, 0])
                    do = do_desc.load([start_m, 0])
                    if UPCAST:
                        q, do = q.to(tl.float32), do.to(tl.float32)
                else:
                    # Interior query blocks are whole blocks: no row predicates on their loads.
                    q = _load_rows(q_base, rows, row_valid, stride_qt, dim, HEAD_DIM, UPCAST, not EDGE)
                    do = _load_rows(do_base, rows, row_valid, stride_dot, dim, HEAD_DIM, UPCAST, not EDGE)
                lse_ptr = (q_start + rows) * stride_lt + head * stride_lh
                if EDGE:
                    # Rows past the sequence get lse = +inf, hence p = 0 and no gradient,
                    # without a per-element select.
                    lse = tl.load(LSE + lse_ptr, mask=row_valid, other=float("inf"))
                    delta = tl.load(DELTA + lse_ptr, mask=row_valid, other=0.0)
                else:
                    lse = tl.load(LSE + lse_ptr)
                    delta = tl.load(DELTA + lse_ptr)
                # Rows with no key at all have p = 0 whatever finite value stands in.
                lse = tl.where(lse == float("-inf"), 0.0, lse)

                # dO·vᵀ does not need p: issued here, it runs on the tensor cores while p
                # is rebuilt (item 22: +3-4 % fwd+bwd; the sparse variants spill a little
                # more from the two live score tiles and still gain).
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                p = _recomputed_probabilities(
                    qk, lse, qk_scale, q_pos, k_idx, q_len, kv_len, num_sink, window, slide, cap_scale,
                    cap_inv_scale, EDGE, IS_CAUSAL, SPARSITY_N, SPARSITY_M, TIE_INDEX, HAS_WINDOW, SOFTCAP,
                    BLOCK_M, BLOCK_N,
                )
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
                ds = p * (dp - delta[:, None])
                if SOFTCAP:
                    # Through the cap: d(c tanh(x / c))/dx = 1 - tanh^2, on the raw scores.
                    t = _tanh(qk * cap_inv_scale)
                    ds = ds * (1.0 - t * t)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    out_mask = k_valid[:, None] & (dim < HEAD_DIM)[None, :]
    dk_ptrs = DK + (k_start + k_idx[:, None]) * stride_dkt + kv_head * stride_dkh + dim[None, :]
    dv_ptrs = DV + (k_start + k_idx[:, None]) * stride_dvt + kv_head * stride_dvh + dim[None, :]
    tl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    Q_START, Q_LEN, K_START, K_LEN,
    softmax_scale, qk_scale, num_sink, window, slide, cap_scale, cap_inv_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_lh, stride_dqt, stride_dqh,
    max_q_bucket,  # autotune key only
    LEARNED_SINKS, DSINK_ROWS,  # read / written only with HAS_LEARNED_SINKS
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr,
    TIE_INDEX: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEARNED_SINKS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    # Float scalars arrive as fp64 when torch.compile (Inductor) launches the kernel.
    qk_scale = tl.cast(qk_scale, tl.float32)
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    if SOFTCAP:
        cap_scale = tl.cast(cap_scale, tl.float32)
        cap_inv_scale = tl.cast(cap_inv_scale, tl.float32)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUPS
    q_len = tl.load(Q_LEN + seq)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    q_start = tl.load(Q_START + seq).to(tl.int64)
    k_start = tl.load(K_START + seq).to(tl.int64)
    kv_len = tl.load(K_LEN + seq)
    rows, row_valid, q_pos, p_lo, p_hi = _query_rows(start_m, q_len, kv_len, BLOCK_M)
    dim = tl.arange(0, BLOCK_D)

    q = _load_rows(Q + q_start * stride_qt + head * stride_qh, rows, row_valid, stride_qt, dim, HEAD_DIM, UPCAST)
    do = _load_rows(DO + q_start * stride_dot + head * stride_doh, rows, row_valid, stride_dot, dim, HEAD_DIM, UPCAST)
    lse_ptr = (q_start + rows) * stride_lt + head * stride_lh
    lse = tl.load(LSE + lse_ptr, mask=row_valid, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + lse_ptr, mask=row_valid, other=0.0)
    if HAS_LEARNED_SINKS:
        # The sink's softmax gradient is -exp(sink - lse) * delta per row: this stores
        # exp(sink - lse) * delta, from what the program holds anyway, and the host sums
        # the rows per head and negates (deterministic, no atomics). A row
        # with lse -inf (sink -inf, no key) reads lse 0 here and gives exp2(-inf) = 0.
        sink = tl.load(LEARNED_SINKS + head).to(tl.float32) * 1.4426950408889634
        tl.store(DSINK_ROWS + lse_ptr, tl.math.exp2(sink - lse) * delta, mask=row_valid)
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    s0, a_lo, a_hi, b_lo, b_hi, end = _key_tile_segments(p_lo, p_hi, q_len, kv_len, num_sink, window, slide,
                                                         IS_CAUSAL, SPARSITY_N, BLOCK_N, HAS_WINDOW)
    for EDGE in tl.static_range(2):
        for t in range(0, _segment_trip(s0, a_lo, a_hi, b_lo, b_hi, end, EDGE, BLOCK_N)):
            n0 = _segment_start(t, s0, a_lo, a_hi, b_lo, b_hi, EDGE, BLOCK_N)
            k_idx, k, v = _key_tile(k_base, v_base, n0, kv_len, stride_kt, stride_vt, dim,
                                    HEAD_DIM, UPCAST, BLOCK_N, SPARSITY_N, SPARSITY_M, EDGE)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            p = _recomputed_probabilities(
                qk, lse, qk_scale, q_pos, k_idx, q_len, kv_len, num_sink, window, slide, cap_scale,
                cap_inv_scale, EDGE, IS_CAUSAL, SPARSITY_N, SPARSITY_M, TIE_INDEX, HAS_WINDOW, SOFTCAP,
                BLOCK_M, BLOCK_N,
            )
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                t = _tanh(qk * cap_inv_scale)
                ds = ds * (1.0 - t * t)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq_ptrs = DQ + (q_start + rows[:, None]) * stride_dqt + head * stride_dqh + dim[None, :]
    tl.store(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=row_valid[:, None] & (dim < HEAD_DIM)[None, :])


# --------------------------------------------------------------------------------------
# Mask probe: the kept mask exactly as the kernels compute it (for tests and tooling)
# --------------------------------------------------------------------------------------
@triton.jit
def _kept_mask_probe(
    QK, KEPT, INTERIOR, VISITED, q_len, kv_len, num_sink, window, slide,
    IS_CAUSAL: tl.constexpr, SPARSITY_N: tl.constexpr, SPARSITY_M: tl.constexpr,
    TIE_INDEX: tl.constexpr, HAS_WINDOW: tl.constexpr, BY_KEYS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One tile per program, classified as the forward and dQ kernels (BY_KEYS false) or
    the dK/dV kernel (BY_KEYS true) classify it, then masked as they mask it. A tile the
    kernel never visits (after the causal end, or older than the sliding window) keeps
    nothing, so a wrongly skipped tile shows up as a mismatch with ``kept_mask``."""
    start_m = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    rows, row_valid, q_pos, p_lo, p_hi = _query_rows(start_m, q_len, kv_len, BLOCK_M)
    if BY_KEYS:
        s0, a_lo, a_hi, b_lo, b_hi, end = _query_block_segments(n0, q_len, kv_len, num_sink, window, slide,
                                                                IS_CAUSAL, SPARSITY_N, BLOCK_M, BLOCK_N, HAS_WINDOW)
        interior = _in_interior(start_m, a_lo, a_hi, b_lo, b_hi)
        visited = (start_m >= s0) & (start_m < end)
    else:
        s0, a_lo, a_hi, b_lo, b_hi, end = _key_tile_segments(p_lo, p_hi, q_len, kv_len, num_sink, window, slide,
                                                             IS_CAUSAL, SPARSITY_N, BLOCK_N, HAS_WINDOW)
        interior = _in_interior(n0, a_lo, a_hi, b_lo, b_hi)
        visited = (n0 >= s0) & (n0 < end)
    k_idx = _key_index(n0, BLOCK_N, SPARSITY_N, SPARSITY_M)
    mask = row_valid[:, None] & (k_idx < kv_len)[None, :]
    qk = tl.load(QK + rows[:, None] * kv_len + k_idx[None, :], mask=mask, other=0.0)
    if interior:
        kept = _kept_entries(qk, q_pos, k_idx, q_len, num_sink, window, False,
                             SPARSITY_N, SPARSITY_M, TIE_INDEX, BLOCK_M, BLOCK_N)
    else:
        qk = _allowed_scores(qk, q_pos, k_idx, kv_len, slide, IS_CAUSAL, HAS_WINDOW)
        kept = _kept_entries(qk, q_pos, k_idx, q_len, num_sink, window, True,
                             SPARSITY_N, SPARSITY_M, TIE_INDEX, BLOCK_M, BLOCK_N)
    kept = kept & visited
    tl.store(KEPT + rows[:, None] * kv_len + k_idx[None, :], kept.to(tl.int8), mask=mask)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(INTERIOR + tile, interior.to(tl.int8))
    tl.store(VISITED + tile, visited.to(tl.int8))


def kernel_kept_mask(qk: torch.Tensor, q_len: int, kv_len: int, params, block_m: int = 32, block_n: int = 64,
                     by_keys: bool = False, return_interior: bool = False, return_visited: bool = False):
    """The kept mask of one sequence's raw scores ``qk`` [q_len, kv_len] (fp32) as the
    Triton kernels decide it, for any tile shape; compare with ``semantics.kept_mask``.

    ``by_keys`` classifies tiles as the dK/dV kernel does instead of as the forward and dQ
    kernels do. ``return_interior`` also returns the [query blocks, key tiles] bool grid
    of tiles that skipped the per-element tests, and ``return_visited`` (after it) the grid of
    tiles the kernel visits at all (the others are skipped: past the causal end, or older
    than the sliding window)."""
    qk = qk.contiguous().to(torch.float32)
    kept = torch.zeros(q_len, kv_len, dtype=torch.int8, device=qk.device)
    grid = (triton.cdiv(q_len, block_m), triton.cdiv(kv_len, block_n))
    interior = torch.zeros(grid, dtype=torch.int8, device=qk.device)
    visited = torch.zeros(grid, dtype=torch.int8, device=qk.device)
    _kept_mask_probe[grid](
        qk, kept, interior, visited, q_len, kv_len, params.num_sink_tokens, params.dense_window_size,
        params.sliding_window, IS_CAUSAL=params.is_causal, SPARSITY_N=params.sparsity_n,
        SPARSITY_M=params.sparsity_m, TIE_INDEX=params.tie_break == "index", HAS_WINDOW=params.sliding_window > 0,
        BY_KEYS=by_keys, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    result = (kept.bool(),)
    if return_interior:
        result += (interior.bool(),)
    if return_visited:
        result += (visited.bool(),)
    return result if len(result) > 1 else result[0]


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------
# Launch configs (BLOCK_M, BLOCK_N, warps, stages), best first. With autotuning off the
# first one that fits is used; the order comes from sweeping every config on the H200
# (tools/sweep_configs.py, docs/performance.md): sparse forward prefers small tiles on
# one warpgroup, dense prefers 128x128 at D >= 128 and 128x64 below.
_SHAPES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2),
            (64, 32, 4, 2)],
    "fwd_sparse": [(64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                   (64, 128, 4, 1)],
    "fwd_small_d": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 32, 4, 2)],
    "dkdv": [(128, 64, 8, 2), (64, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2),
             (64, 128, 4, 1)],
    # At D <= 64 the dK/dV accumulators of a 128-key tile fit: 326 against 268 TFLOPS
    # fwd+bwd for (128, 64) (dense, S=16384, causal; 255 against 231 at 2:4).
    "dkdv_small_d": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2),
                     (64, 32, 4, 2), (64, 128, 4, 1)],
    # The index rule's int64 keys spill in 128-key tiles (175 TFLOPS, against 204 here).
    "dkdv_small_d_index": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2),
                           (64, 32, 4, 2), (64, 128, 4, 1)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2),
           (64, 128, 4, 1)],
}
# Opt-in shared memory per block on sm_90 (227 KB); kernels that need more fail to launch.
_SMEM_LIMIT = 232448


def _configs(kind: str):
    if interpreting():
        # One config: a multi-config autotune fails in the interpreter; large tiles keep
        # the number of interpreted tile operations small.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    shapes = list(dict.fromkeys(sum((v for k, v in _SHAPES.items() if k.startswith(kind)), [])))
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in shapes
    ]


def _smem_bytes(kind, bm, bn, bd, stages, elem):
    """Shared memory of a launch: resident tiles plus one buffer per pipeline stage (exact
    for the forward and dQ kernels; an upper bound for dK/dV, which also stages P and dS)."""
    if kind == "fwd":
        return (bm * bd + stages * 2 * bn * bd) * elem
    if kind == "dq":
        return (2 * bm * bd + stages * 2 * bn * bd) * elem
    return (2 * bn * bd + stages * 2 * bm * bd + 2 * bm * bn) * elem


def _min_block_n(kind, m):
    """Narrowest key tile worth launching for groups of M.

    With G = BLOCK_N / M >= 8 a group's members differ only in register bits of the
    accumulator's column index; below that, splitting the tile moves data between threads.
    The dK/dV kernel is the exception at M = 16: its 128-wide tiles spill, which costs more
    than the data movement of 64-wide ones (236 against 182 TFLOPS fwd+bwd, H200 sweep).
    """
    return 4 * m if (kind == "dkdv" and m == 16) else 8 * m


def _prune(configs, named_args, kind, **kwargs):
    args = {**named_args, **kwargs}
    m, sparse, d = args["SPARSITY_M"], args["SPARSITY_N"] > 0, args["BLOCK_D"]
    elem = args["Q"].element_size()
    if kind == "fwd":
        order = _SHAPES["fwd_sparse"] if sparse else (_SHAPES["fwd_small_d"] if d <= 64 else _SHAPES["fwd"])
    elif kind == "dkdv" and d <= 64:
        order = _SHAPES["dkdv_small_d_index" if args.get("TIE_INDEX") else "dkdv_small_d"]
    else:
        order = _SHAPES[kind]
    rank = {shape: i for i, shape in enumerate(order)}

    def shape(cfg):
        return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages

    def fits(cfg):
        bm, bn, _, stages = shape(cfg)
        if sparse and bn < _min_block_n(kind, m):
            return False
        if _smem_bytes(kind, bm, bn, d, stages, elem) > _SMEM_LIMIT:
            return False
        # The widest tiles spill at the largest head dims.
        return d <= 128 or bm * bn <= 64 * 128

    kept = sorted((c for c in configs if fits(c)), key=lambda c: rank.get(shape(c), len(rank)))
    if not kept:
        # Any tile whose width is a multiple of M is correct, just slower: take the
        # widest single-stage tile that fits.
        for bn, bm in itertools.product((8 * m, 4 * m, 2 * m, 64, 32, 16), (64, 32)):
            if bn >= (m if sparse else 16) and _smem_bytes(kind, bm, bn, d, 1, elem) <= _SMEM_LIMIT:
                kept = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
                break
    if not env_flag("MODELOPT_SPARSE_AUTOTUNE", True):
        # Tests compile many shape/pattern combinations; tuning each would take minutes.
        return kept[:1]
    return kept


_SHARED_KEYS = ["GROUPS", "HEAD_DIM", "IS_CAUSAL", "SPARSITY_N", "SPARSITY_M", "TIE_INDEX", "HAS_WINDOW", "SOFTCAP",
                "DOT_PRECISION"]


class _TunedKernel:
    """An autotuned kernel that remembers the config chosen for each launch key.

    The first launch of a key goes through ``triton.autotune`` (which tunes, or takes the
    pruned default); later ones call the JIT function with that config directly. The
    autotuner's own per-call bookkeeping over some forty arguments cost about as much host
    time as the rest of the launch, which shows on short sequences (docs/performance.md,
    item 21). ``key`` must determine the config: it holds the autotune key's values, the
    dtype and the device.
    """

    def __init__(self, kernel, kind, length_key, extra_keys=()):
        self.autotuner = triton.autotune(
            _configs(kind),
            key=[length_key, *_SHARED_KEYS, *extra_keys],
            prune_configs_by={
                "early_config_prune": lambda configs, named_args, **kw: _prune(configs, named_args, kind, **kw)
            },
        )(kernel)
        self._chosen = {}
        self.kind = kind
        # MODELOPT_SPARSE_DIRECT_LAUNCH=0 (read at import) keeps every launch on JITFunction.run.
        direct = not interpreting() and os.environ.get("MODELOPT_SPARSE_DIRECT_LAUNCH", "1").strip() != "0"
        self.launcher = DirectLauncher(kernel) if direct else None

    def __call__(self, grid, key, *args, **kwargs):
        config = self._chosen.get(key)
        if config is None:
            self.autotuner[grid](*args, **kwargs)
            self._chosen[key] = self.autotuner.best_config
        elif self.launcher is None:
            self.autotuner.fn[grid](*args, **kwargs, **config.all_kwargs())
        else:
            self.launcher(grid(config.kwargs), key, args, {**kwargs, **config.all_kwargs()})

    def config_for(self, key, q, kwargs):
        """The config a launch with this key runs: the one chosen before, else the rule's
        first (what an untuned launch takes). Compiled graphs launch with it directly."""
        config = self._chosen.get(key)
        if config is None:
            config = _prune(self.autotuner.configs, {"Q": q}, self.kind, **kwargs)[0]
        return config

    def plan(self, grid, key, args, kwargs, pointer_slots, plan_args=None):
        """A :class:`LaunchPlan` of this launch, if it went direct before (else None).
        ``plan_args``: the arguments the plan keeps (default ``args``), e.g. with a tensor
        outside ``pointer_slots`` replaced by its address."""
        config = self._chosen.get(key)
        if config is None or self.launcher is None:
            return None
        entry = self.launcher.compiled(key, args)
        if entry is None:
            return None
        kernel, tail = entry
        return LaunchPlan(kernel, grid(config.kwargs), args if plan_args is None else plan_args, tail, pointer_slots)

    def verify_plan(self, plan, key, args, kwargs) -> None:
        """``MODELOPT_SPARSE_VERIFY_LAUNCH=1``: the plan's kernel must be Triton's pick."""
        if self.launcher is not None and self.launcher._verify:
            self.launcher.verify(plan.kernel, plan.grid, args, {**kwargs, **self._chosen[key].all_kwargs()})

    def forget(self):
        """Drop every chosen config (after the autotuner's configs were changed)."""
        self._chosen.clear()
        self.autotuner.cache.clear()
        if self.launcher is not None:
            self.launcher.clear()
        _FORWARD_PLANS.clear()


_fwd = _TunedKernel(_attn_fwd, "fwd", "max_q_bucket", ["WITH_STATS", "HAS_LEARNED_SINKS"])
_dkdv = _TunedKernel(_attn_bwd_dkdv, "dkdv", "max_k_bucket", ["TMA"])  # correct given lse: no sink input
_dq = _TunedKernel(_attn_bwd_dq, "dq", "max_q_bucket", ["HAS_LEARNED_SINKS"])


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a JIT function: calling it from Python
    costs microseconds per launch)."""
    return -(-a // b)


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _common_constexprs(q, groups, params):
    return _constexprs(q.dtype, q.shape[-1], groups, params, interpreting())


def _window_softcap_args(params):
    """Runtime scalars of the sliding window and the soft cap (slide, cap * log2 e,
    scale / cap): zeros when off, where the kernels never read them."""
    cap = params.softcap
    if cap > 0:
        return params.sliding_window, cap * LOG2E, params.softmax_scale / cap
    return params.sliding_window, 0.0, 0.0


def _launch_key(q, groups, params):
    """What decides a launch's config besides its length bucket and kernel switches."""
    return q.dtype, q.device, q.shape[-1], groups, params


@functools.lru_cache(maxsize=256)
def _constexprs(dtype, head_dim, groups, params, upcast):
    """Shared by every launch of one (dtype, head dim, GQA, params): callers must not mutate it."""
    return dict(
        GROUPS=groups,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=params.is_causal,
        SPARSITY_N=params.sparsity_n,
        SPARSITY_M=params.sparsity_m,
        TIE_INDEX=params.tie_break == "index",
        # Off (the defaults), the window and cap code is dead and compiles away.
        HAS_WINDOW=params.sliding_window > 0,
        SOFTCAP=params.softcap > 0,
        UPCAST=upcast,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


# Two launch functions hold the whole host side. Eager calls reach them through a plain
# autograd.Function; under torch.compile they sit behind two torch.library custom ops, so
# that Dynamo sees one opaque call with a fake (shape-only) implementation instead of
# tracing into the Triton launch, which Inductor would otherwise rebuild and re-type. The
# custom-op wrapper is not used in eager mode: on torch 2.11 it cost ~1 ms of host time per
# forward+backward, which made 4k-token layers host-bound (docs/performance.md, item 19).
# Params travel as scalar arguments, in SparseParams field order.
def _launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
    max_q: int, max_k: int, q_covered: bool, k_covered: bool, with_stats: bool,
    is_causal: bool, softmax_scale: float, sparsity_n: int, sparsity_m: int,
    num_sink_tokens: int, dense_window_size: int, tie_break: str, sliding_window: int = 0, softcap: float = 0.0,
    learned_sinks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, per-row stats [rows, heads, 3] or an empty tensor). The window, cap and
    learned sinks default to off, so callers of the seven-field form (tools/host_cost.py)
    keep working."""
    params = SparseParams(is_causal, softmax_scale, sparsity_n, sparsity_m, num_sink_tokens,
                          dense_window_size, tie_break, sliding_window, softcap)
    out, lse, row_stats = _forward_launch(q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, q_covered,
                                          with_stats, params, learned_sinks=learned_sinks)
    if row_stats is None:
        row_stats = q.new_empty(0, q.shape[-2], 3, dtype=torch.float32)
    return out, lse, row_stats


# Launch plans of the forward kernel (inference calls without statistics), by everything
# that fixes the launch except the tensors' addresses. Cleared with the chosen configs.
_FORWARD_PLANS: dict = {}
_PLAN_LIMIT = 1024
# Positions of the forward kernel's pointer arguments (Q ... K_LEN), in signature order.
_FWD_POINTERS = range(10)


def _forward_launch(q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, with_stats, params,
                    with_lse=True, learned_sinks=None):
    """The forward launch proper; eager calls come here with their params object.

    q, k, v are packed rows ``[T, H, D]`` or a padded batch ``[B, S, H, D]`` (sequence b in
    batch row b). Returns ``(out, lse, row_stats)``: out contiguous like q's shape, lse
    ``q.shape[:-1]`` fp32 (``None`` without ``with_lse``), row_stats ``None`` without
    ``with_stats``.
    """
    if not with_stats and _fwd.launcher is not None:
        # The hot path of a model's layer: everything but the addresses is in the key.
        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(),
                    q_start.data_ptr(), q_len.data_ptr(), k_start.data_ptr(), k_len.data_ptr())
        # A plan is specialized on 16-byte aligned pointers; other calls take the ordinary path.
        aligned = not (pointers[0] | pointers[1] | pointers[2] | pointers[3] | pointers[4] | pointers[5]
                       | pointers[6]) & 15
        device = q.get_device()
        # The learned sinks are no pointer slot of the plan: their address is in the key.
        sinks_key = None if learned_sinks is None else (learned_sinks.dtype, learned_sinks.data_ptr())
        plan_key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q_len.shape[0], q.dtype, device, params,
                    max_q, q_covered, with_lse, sinks_key) if aligned else None
        plan = _FORWARD_PLANS.get(plan_key) if aligned else None
        if plan is not None and device == _current_cuda_device() and hooks_allow_plans():
            out, lse, _ = _forward_outputs(q, q_covered, with_lse, False)
            out_ptr, lse_ptr = out.data_ptr(), lse.data_ptr()
            if _fwd.launcher._verify:
                _fwd.verify_plan(plan, *_forward_args(q, k, v, out, lse, None, q_start, q_len, k_start, k_len,
                                                      max_q, params, with_lse, learned_sinks))
            plan((pointers[0], pointers[1], pointers[2], out_ptr, lse_ptr, lse_ptr,
                  pointers[3], pointers[4], pointers[5], pointers[6]))
            return out, (lse if with_lse else None), None
    else:
        plan_key = None
    q, k, v = (_unit_stride_rows(t) for t in (q, k, v))
    out, lse, row_stats = _forward_outputs(q, q_covered, with_lse, with_stats)
    launch_key, args, kwargs = _forward_args(q, k, v, out, lse, row_stats, q_start, q_len, k_start, k_len, max_q,
                                             params, with_lse, learned_sinks)
    grid = lambda cfg: (_cdiv(max_q, cfg["BLOCK_M"]), q_len.shape[0], q.shape[-2])  # noqa: E731
    with _on_device(q):
        _fwd(grid, launch_key, *args, **kwargs)
    if plan_key is not None and len(_FORWARD_PLANS) < _PLAN_LIMIT and hooks_allow_plans():
        # The plan keeps the sinks' address (in its key), not the tensor; without sinks the
        # stand-in's address, never read.
        plan_args = (*args[:-1], args[-1].data_ptr())
        plan = _fwd.plan(grid, launch_key, args, kwargs, _FWD_POINTERS, plan_args)
        if plan is not None:
            _FORWARD_PLANS[plan_key] = plan
    return out, (lse if with_lse else None), row_stats


def _forward_outputs(q, q_covered, with_lse, with_stats):
    """The forward's output (contiguous, q's shape; zero-filled unless the sequences cover
    every row), its lse (fp32 ``q.shape[:-1]``; the output stands in when none is stored)
    and its per-row statistics (``None`` without them)."""
    out = q.new_empty(q.shape) if q_covered else q.new_zeros(q.shape)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32) if with_lse else out
    row_stats = q.new_zeros(*q.shape[:-1], 3, dtype=torch.float32) if with_stats else None
    return out, lse, row_stats


def _forward_args(q, k, v, out, lse, row_stats, q_start, q_len, k_start, k_len, max_q, params, with_lse,
                  learned_sinks=None):
    """(launch key, runtime arguments, constexpr keywords) of one forward launch. The
    learned sinks are the last runtime argument (q stands in when there are none)."""
    hq = q.shape[-2]
    groups = hq // k.shape[-2]
    consts = _common_constexprs(q, groups, params)
    bucket = _bucket(max_q)
    with_stats = row_stats is not None
    # Row and head strides, then batch strides (0 for packed rows: one "batch row" holds all).
    # lse and the row statistics are contiguous [..., H] (statistics x3) whether or not lse
    # is stored, so their strides follow from q's shape.
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    if q.dim() == 4:
        rows = (qs[1], qs[2], ks[1], ks[2], vs[1], vs[2], os_[1], os_[2], hq, 1)
        batch = (qs[0], ks[0], vs[0], os_[0], q.shape[1] * hq)
    else:
        rows = (qs[0], qs[1], ks[0], ks[1], vs[0], vs[1], os_[0], os_[1], hq, 1)
        batch = (0, 0, 0, 0, 0)
    args = (q, k, v, out, lse, row_stats if with_stats else lse,
            q_start, q_len, k_start, k_len,
            params.softmax_scale * LOG2E, params.num_sink_tokens, params.dense_window_size,
            *_window_softcap_args(params), *rows, *batch, bucket,
            q if learned_sinks is None else learned_sinks)
    has_sinks = learned_sinks is not None
    launch_key = (q.dtype, q.device, q.shape[-1], groups, params, bucket, with_stats, with_lse, has_sinks)
    # HAS_LEARNED_SINKS is passed even when off (its default): Inductor's launcher for a
    # traced kernel expects every constexpr in the call; a default variant compiles the same.
    kwargs = dict(WITH_STATS=with_stats, WITH_LSE=with_lse, HAS_LEARNED_SINKS=has_sinks, **consts)
    return launch_key, args, kwargs


_current_cuda_device = torch._C._cuda_getDevice if hasattr(torch._C, "_cuda_getDevice") else torch.cuda.current_device


def _traced_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
    max_q: int, max_k: int, q_covered: bool, k_covered: bool, with_stats: bool,
    is_causal: bool, softmax_scale: float, sparsity_n: int, sparsity_m: int,
    num_sink_tokens: int, dense_window_size: int, tie_break: str, sliding_window: int, softcap: float,
    learned_sinks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward as torch.compile traces it: the kernel launched through ``wrap_triton``,
    so Inductor emits the launch itself (no opaque-op wrapper per layer), with the config
    an eager launch of the same key would run."""
    params = SparseParams(is_causal, softmax_scale, sparsity_n, sparsity_m, num_sink_tokens,
                          dense_window_size, tie_break, sliding_window, softcap)
    q, k, v = (_unit_stride_rows(t) for t in (q, k, v))
    out, lse, row_stats = _forward_outputs(q, q_covered, True, with_stats)
    launch_key, args, kwargs = _forward_args(q, k, v, out, lse, row_stats,
                                             q_start, q_len, k_start, k_len, max_q, params, True, learned_sinks)
    config = _fwd.config_for(launch_key, q, kwargs)
    grid = (_cdiv(max_q, config.kwargs["BLOCK_M"]), q_len.shape[0], q.shape[-2])
    torch.library.wrap_triton(_attn_fwd)[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                               num_stages=config.num_stages)
    if row_stats is None:
        row_stats = q.new_empty(0, q.shape[-2], 3, dtype=torch.float32)
    return out, lse, row_stats


if interpreting():
    # Interpreted kernels cannot be traced (wrap_triton hands them back as they are): on
    # the CPU a compiled caller gets one opaque op with a shape-only fake.
    _forward_op = torch.library.custom_op("modelopt_sparse::nm_attention_forward", mutates_args=())(_launch_forward)

    @_forward_op.register_fake
    def _(q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered, with_stats, *params_and_sinks):
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        rows = q.shape[:-1] if with_stats else (0, q.shape[-2])
        return q.new_empty(q.shape), lse, q.new_empty(*rows, 3, dtype=torch.float32)
else:
    _forward_op = torch.library.triton_op("modelopt_sparse::nm_attention_forward", mutates_args=())(_traced_forward)


def _launch_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
    max_q: int, max_k: int, q_covered: bool, k_covered: bool,
    is_causal: bool, softmax_scale: float, sparsity_n: int, sparsity_m: int,
    num_sink_tokens: int, dense_window_size: int, tie_break: str, sliding_window: int, softcap: float,
    learned_sinks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d learned_sinks) from the forward's inputs, output and lse; the last is
    empty without learned sinks (a custom op returns tensors only)."""
    params = SparseParams(is_causal, softmax_scale, sparsity_n, sparsity_m, num_sink_tokens,
                          dense_window_size, tie_break, sliding_window, softcap)
    q, k, v, do = (_unit_stride_rows(t) for t in (q, k, v, grad_out))
    hq, hkv = q.shape[1], k.shape[1]
    delta = torch.empty(q.shape[0], hq, dtype=torch.float32, device=q.device)
    dq, dk, dv = _output_like(q, q_covered), _output_like(k, k_covered), _output_like(v, k_covered)
    has_sinks = learned_sinks is not None
    # Per row and head: exp(sink - lse) * delta, written by the dQ kernel for the rows of
    # every sequence (the others stay 0); [T, Hq] like lse.
    sink_rows = _output_like(delta, q_covered) if has_sinks else delta
    sink_kwargs = dict(HAS_LEARNED_SINKS=has_sinks)
    consts = _common_constexprs(q, hq // hkv, params)
    key = _launch_key(q, hq // hkv, params)
    tma = _use_tma(q, do)
    scale = params.softmax_scale
    with _on_device(q):
        if q.shape[0]:
            block_t = 64
            _attn_bwd_delta[(_cdiv(q.shape[0], block_t), hq)](
                out, do, delta, q.shape[0],
                out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0), delta.stride(1),
                HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], BLOCK_T=block_t, num_warps=4,
            )
        _dkdv(
            lambda cfg: (_cdiv(max_k, cfg["BLOCK_N"]), q_len.shape[0], hkv), (*key, _bucket(max_k), tma),
            q, k, v, do, lse, delta, dk, dv,
            q_start, q_len, k_start, k_len,
            scale, scale * LOG2E, params.num_sink_tokens, params.dense_window_size, *_window_softcap_args(params),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), lse.stride(0), lse.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            _bucket(max_k),
            TMA=tma,
            **consts,
        )
        _dq(
            lambda cfg: (_cdiv(max_q, cfg["BLOCK_M"]), q_len.shape[0], hq), (*key, _bucket(max_q), has_sinks),
            q, k, v, do, lse, delta, dq,
            q_start, q_len, k_start, k_len,
            scale, scale * LOG2E, params.num_sink_tokens, params.dense_window_size, *_window_softcap_args(params),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), lse.stride(0), lse.stride(1), dq.stride(0), dq.stride(1),
            _bucket(max_q),
            learned_sinks if has_sinks else q, sink_rows,
            **consts, **sink_kwargs,
        )
    if not has_sinks:
        return dq, dk, dv, q.new_empty(0)
    d_sinks = sink_rows.sum(0).neg_()  # every row holds 0 outside the sequences
    return dq, dk, dv, d_sinks.to(learned_sinks.dtype)


_backward_op = torch.library.custom_op("modelopt_sparse::nm_attention_backward", mutates_args=())(_launch_backward)


_PARAM_FIELDS = 9  # SparseParams' fields, passed as scalars after with_stats


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered, *params):
    learned_sinks = params[_PARAM_FIELDS] if len(params) > _PARAM_FIELDS else None
    d_sinks = q.new_empty(0) if learned_sinks is None else torch.empty_like(learned_sinks)
    return (*(torch.empty_like(_unit_stride_rows(t)) for t in (q, k, v)), d_sinks)


def _setup_context(ctx, inputs, output):
    q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered, _with_stats, *params = inputs
    learned_sinks = params[_PARAM_FIELDS] if len(params) > _PARAM_FIELDS else None
    out, lse, row_stats = output
    ctx.mark_non_differentiable(lse, row_stats)
    ctx.save_for_backward(q, k, v, out, lse, q_start, q_len, k_start, k_len, learned_sinks)
    ctx.scalars = (max_q, max_k, q_covered, k_covered, *params[:_PARAM_FIELDS])


def _gradients(ctx, grad_out, launch_backward):
    """The gradients of the forward's 22 inputs: q, k, v, then 18 non-tensors, then the
    learned sinks (None without them)."""
    q, k, v, out, lse, q_start, q_len, k_start, k_len, learned_sinks = ctx.saved_tensors
    dq, dk, dv, d_sinks = launch_backward(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len,
                                          *ctx.scalars, learned_sinks)
    return (dq, dk, dv) + (None,) * 18 + ((d_sinks if learned_sinks is not None else None),)


_forward_op.register_autograd(
    lambda ctx, grad_out, _grad_lse, _grad_stats: _gradients(ctx, grad_out, _backward_op),
    setup_context=_setup_context,
)


class _EagerAttention(torch.autograd.Function):
    """The eager path: the same launches as the custom ops, without their wrapper."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _launch_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_stats):
        with torch.no_grad():
            dq, dk, dv, *nones, d_sinks = _gradients(ctx, grad_out, _launch_backward)
        if torch.is_grad_enabled():  # create_graph=True
            q, k, v = ctx.saved_tensors[:3]
            dq, dk, dv = _NoSecondDerivative.apply(dq, dk, dv, q, k, v, grad_out)
            if d_sinks is not None:
                d_sinks = _NoSecondDerivativeOfSinks.apply(d_sinks, ctx.saved_tensors[-1], grad_out)
        return (dq, dk, dv, *nones, d_sinks)


class _NoSecondDerivative(torch.autograd.Function):
    """Marks gradients from the Triton backward as not differentiable. It hangs off the
    real graph inputs (unlike ``once_differentiable``, whose error node
    ``torch.autograd.grad(..., inputs=q)`` prunes away), so differentiating them again
    raises instead of returning a second derivative that silently lacks this term."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *graph_inputs):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "modelopt_sparse: the Triton attention backward is not differentiable, so second "
            "derivatives through it are not available; use backend='torch' for them"
        )


class _NoSecondDerivativeOfSinks(_NoSecondDerivative):
    """The same for the learned sinks' gradient (hung off the sinks and grad_out)."""

    @staticmethod
    def forward(ctx, d_sinks, *graph_inputs):
        return d_sinks.view_as(d_sinks)


def _use_tma(*tensors) -> bool:
    """On by default on the GPU (``MODELOPT_SPARSE_TMA=0`` turns it off; in the interpreter
    ``=1`` turns it on): the dK/dV kernel loads its interior Q and dO blocks through tensor
    descriptors (+7.6 % fwd+bwd dense at D=128 on the H200). Needs sm_90+ (or the
    interpreter) and 16-byte aligned bases, head offsets and row strides; otherwise the
    pointer loads run, with a warning (once per reason) if ``MODELOPT_SPARSE_TMA=1`` asked
    for descriptors explicitly. On the GPU the descriptors need a Triton allocator: a caller's own
    (``triton.set_allocator``) is used as it is, else one backed by PyTorch's caching
    allocator is installed."""
    if not env_flag("MODELOPT_SPARSE_TMA", not interpreting()):
        return False
    if not interpreting() and torch.cuda.get_device_capability(tensors[0].device) < (9, 0):
        return _tma_declined("it needs compute capability 9.0 or newer")
    for t in tensors:
        elem = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * elem) % 16 or (t.stride(1) * elem) % 16 or t.stride(2) != 1:
            return _tma_declined("q or grad_out is not 16-byte aligned (base, head or row stride)")
    if not interpreting():
        _ensure_allocator()
    return True


try:  # the context variable behind triton.set_allocator (triton 3.6 to 3.9)
    from triton.runtime._allocation import NullAllocator as _NullAllocator
    from triton.runtime._allocation import _allocator as _triton_allocator
except ImportError:
    _triton_allocator = None


def _ensure_allocator():
    """Install ``_descriptor_scratch`` unless the caller set a Triton allocator already."""
    if _triton_allocator is None or isinstance(_triton_allocator.get(), _NullAllocator):
        triton.set_allocator(_descriptor_scratch)


def _tma_declined(reason: str) -> bool:
    if os.environ.get("MODELOPT_SPARSE_TMA", "").strip() == "1":
        _warn_tma_declined(reason)
    return False


@functools.lru_cache(maxsize=None)
def _warn_tma_declined(reason: str) -> bool:
    warnings.warn(f"MODELOPT_SPARSE_TMA=1 ignored: {reason}; the dK/dV kernel uses pointer loads",
                  RuntimeWarning, stacklevel=5)
    return False


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _unit_stride_rows(t):
    """The kernels need unit stride along the head dim; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _output_like(x, covered):
    """The kernels write every row of every sequence; rows outside all sequences read as 0."""
    return torch.empty_like(x) if covered else torch.zeros_like(x)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _nullcontext()


def _on_device(t):
    """Make ``t``'s GPU current for the launches, unless it already is (switching costs a
    few microseconds of host time on every call)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NULL


def _reduce_row_stats(row_stats, q_start, q_len, stats):
    """Sum per-row statistics of the rows that belong to a sequence into per-head totals."""
    total = row_stats.shape[0]
    owned = torch.zeros(total + 1, dtype=torch.int32, device=row_stats.device)
    owned.index_add_(0, q_start.long(), torch.ones_like(q_start))
    owned.index_add_(0, (q_start + q_len).long(), -torch.ones_like(q_start))
    in_seq = owned.cumsum(0)[:total] > 0
    rs = row_stats[in_seq].double()
    stats["allowed"] += rs[..., 0].sum(0).round().long()
    stats["kept"] += rs[..., 1].sum(0).round().long()
    stats["rows"] += (rs[..., 0] > 0).sum(0)
    stats["dropped_mass"] += rs[..., 2].sum(0)


def triton_attention(q, k, v, q_start, q_len, max_q, k_start, k_len, max_k, params, stats=None,
                     covered=(False, False), learned_sinks=None):
    """Launch the fused kernels; inputs are validated by :func:`modelopt_sparse.kernels.attention`.

    ``covered``: whether the sequences cover every packed query / key row; rows outside
    every sequence read as 0 in the output and gradients, which then needs a zero fill."""
    p = params
    if torch.compiler.is_compiling():
        forward = _forward_op
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            learned_sinks is not None and learned_sinks.requires_grad)):
        forward = _EagerAttention.apply
    else:  # inference: no autograd node to build, and the params object as it is
        out, _lse, row_stats = _forward_launch(
            q, k, v, q_start, q_len, k_start, k_len, max(int(max_q), 1), max(int(max_k), 1),
            bool(covered[0]), stats is not None, p, with_lse=False, learned_sinks=learned_sinks)
        if stats is not None:
            _reduce_row_stats(row_stats, q_start, q_len, stats)
        return out
    out, _lse, row_stats = forward(
        q, k, v, q_start, q_len, k_start, k_len, max(int(max_q), 1), max(int(max_k), 1),
        bool(covered[0]), bool(covered[1]), stats is not None,
        bool(p.is_causal), float(p.softmax_scale), int(p.sparsity_n), int(p.sparsity_m),
        int(p.num_sink_tokens), int(p.dense_window_size), str(p.tie_break), int(p.sliding_window),
        float(p.softcap), learned_sinks,
    )
    if stats is not None:
        _reduce_row_stats(row_stats, q_start, q_len, stats)
    return out


__all__ = ["triton_attention", "kernel_kept_mask"]
