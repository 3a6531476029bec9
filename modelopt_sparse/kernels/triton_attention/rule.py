"""The rule per score (docs/semantics.md), as the kernels apply it to a tile.

``_allowed_scores`` (sequence, causal and sliding-window masks), ``_dense_region`` (sinks,
dense window, decode steps) and ``_selection_exponent`` (N:M selection, with the group
ranks from :mod:`.network`) are the rule itself; ``_log2_scores`` is the softmax exponent
with the optional soft cap. The forward, both backward kernels and the mask probe share all
of these.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..api import interpreting
from .network import _broadcast_to_members, _group_floor, _group_nth_largest, _index_ordered_keys


# -inf is written as a literal in the kernels, not as a global constexpr: torch.compile
# (Inductor) re-emits a kernel's globals with repr(), and repr(-inf) is not Python.
# Compiled kernels may use inline PTX; the interpreter cannot run it.
PTX = tl.constexpr(not interpreting())


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
