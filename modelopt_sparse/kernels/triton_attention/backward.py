"""The backward kernels: delta = rowsum(o * do), then dK/dV (one key tile per program) and
dQ (one query block per program), each rebuilding the forward's probabilities from the lse."""

from __future__ import annotations

import triton
import triton.language as tl

from .rule import _allowed_scores, _log2_scores, _selection_exponent, _tanh
from .tiles import (_key_tile, _key_tile_segments, _load_rows, _query_block_segments, _query_rows,
                    _segment_start, _segment_trip)


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
