"""The forward kernel: one query block of one sequence and head per program, online softmax
over its interior key tiles, then its edge tiles."""

from __future__ import annotations

import triton
import triton.language as tl

from .network import _row_max
from .rule import _allowed_scores, _kept_entries, _log2_scores, _selection_exponent
from .tiles import _key_tile, _key_tile_segments, _load_rows, _query_rows, _segment_start, _segment_trip


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
