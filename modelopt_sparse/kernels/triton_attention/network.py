"""Register-level group selection: the N-th largest member of every N:M group of a score tile.

Layout of the score tile. Keys of a ``BLOCK_N`` tile are loaded in a permuted order: the
physical column ``c`` holds the logical key ``n0 + (c % G) * M + c // G`` with
``G = BLOCK_N // M`` (``tiles._key_index``). The ``M`` members of a group then sit ``G``
columns apart, in the top ``log2(M)`` bits of the column index. On the tensor-core
accumulator those bits belong to registers of one thread, so splitting the tile into its
members (``_split_half``) and joining a per-group value back (``_join_half``) are register
relabellings, and the selection (``rule._selection_exponent``) is pure ALU work with no data
movement between threads. Masks always use the logical key index, so the rule never depends
on the tile size; permuting the contraction index of P·V is harmless because V's rows are
permuted the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
