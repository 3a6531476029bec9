"""The mask probe: the kept mask exactly as the kernels compute it, tile by tile (for tests
and tooling; compare with ``semantics.kept_mask``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rule import _allowed_scores, _kept_entries
from .tiles import _in_interior, _key_index, _key_tile_segments, _query_block_segments, _query_rows


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
