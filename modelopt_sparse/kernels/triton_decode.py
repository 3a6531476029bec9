"""Dense single-query (decode) attention in Triton, reading a KV cache in place.

A generate() decode step attends one query per row to every cached key, so N:M selection
never applies (the decode guard) and the step is plain dense attention. For small models
the GPU finishes such a layer in microseconds and the host cost of issuing it dominates:
SDPA with a boolean mask, GQA ``repeat_kv`` copies, slices and a ``torch.where`` are some
ten aten ops per layer. :func:`decode_attention` is one allocation and one launch instead.

Kernel (flash-decoding). One program per (row, kv head, key split) runs every query head
of its kv head against the keys, so K and V are read once per kv head, not once per query
head. The G query heads are padded to a tile of at least 16 rows for ``tl.dot``. Long
caches with few (row, kv head) pairs are split across programs that write partial
(acc, max, sum) triples to fp32 scratch, and a second small kernel merges them; the split
count depends only on shapes (and on whether a compiled graph issues the launch, see
``split_plan``), never on tensor values, so the call stays sync-free.

Host. Eager calls go through ``DirectLauncher`` with a fixed config per (dtype, head dim,
group size, optional inputs): no autotuning, no per-call dataclasses, one dict lookup.
Under ``torch.compile`` the launch sits in a ``torch.library.triton_op``, so Inductor sees
a user-defined Triton kernel (no graph break, no opaque custom-op wrapper).
"""

# No ``from __future__ import annotations``: the op signatures below are read by
# torch.library's schema inference, which then needs real types, not strings.
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .api import interpreting
from .semantics import check_learned_sinks, check_window_softcap
from .triton_attention import _tanh
from .triton_launch import DirectLauncher, LaunchPlan, hooks_allow_plans

LOG2E = 1.4426950408889634
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.bool, torch.int32, torch.int64)

# Split rule (host side, shapes only). Up to SINGLE_PASS_MAX_KEYS keys one program per
# (row, kv head) is short enough; beyond, keys are split until about SPLIT_TARGET_WAVES
# programs per SM exist, each with at least MIN_KEYS_PER_SPLIT keys. MAX_SPLITS is a power
# of two: the merge kernel reads all partials of a row as one tile of that height.
SINGLE_PASS_MAX_KEYS = 1024
MIN_KEYS_PER_SPLIT = 256
SPLIT_TARGET_WAVES = 2
MAX_SPLITS = 64
# The same rule for launches that a compiled graph issues (Inductor, CUDA graphs), when the
# (row, kv head) programs alone fill less than one wave: there a second launch costs no host
# time, and a few programs streaming a whole cache each (batch 1 with 3 kv heads is 3 of 132
# SMs) are bound by the latency of their one pipeline. Split from GRAPH_SINGLE_PASS_MAX_KEYS
# keys on, into pieces of at least GRAPH_MIN_KEYS_PER_SPLIT keys (two 64-key tiles). Eager
# calls keep the rule above: there the host issues each launch, and the second one (and
# the scratch) would cost more host time than the GPU saves.
GRAPH_SINGLE_PASS_MAX_KEYS = 256
GRAPH_MIN_KEYS_PER_SPLIT = 128
_DEFAULT_SM_COUNT = 132  # H200; used where no GPU is asked (the interpreter)

# The interpreter computes bf16 wrongly (numpy has no bf16), so there every tile is upcast
# to fp32 on load, as in triton_attention (``launch._common_constexprs``).
_UPCAST = interpreting()


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, rows, row_valid, stride_row, dim, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """[len(rows), BLOCK_D] tile, zero outside valid rows and past the head dim."""
    ptrs = base + rows[:, None] * stride_row + dim[None, :]
    x = tl.load(ptrs, mask=row_valid[:, None] & (dim < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attended_keys(KEY_VALID, mask_row_offset, stride_mn, cols, hi, HAS_KEY_VALID: tl.constexpr):
    """Which key slots of the tile take part: inside this program's range and, with a key
    mask, marked valid. Doubles as the K/V load mask, so padding slots cost no traffic."""
    attended = cols < hi
    if HAS_KEY_VALID:
        flags = tl.load(KEY_VALID + mask_row_offset + cols * stride_mn, mask=attended, other=0)
        attended = attended & (flags.to(tl.int32) != 0)
    return attended


@triton.jit
def _last_attended_slot(KEY_VALID, mask_row_offset, stride_mn, n_keys, HAS_KEY_VALID: tl.constexpr,
                        SCAN: tl.constexpr):
    """The query's own position: the row's last attended key slot (a decode step's token is
    the newest key of its row; later slots of a static cache are empty), or ``n_keys - 1``
    without a key mask; -1 if no slot is attended. Scans the mask backwards from the end,
    ``SCAN`` slots at a time, and stops at the first block holding an attended slot: one
    block for a dynamic cache, the empty tail of a static one."""
    if HAS_KEY_VALID:
        last = tl.full([], -1, tl.int32)
        start = ((n_keys - 1) // SCAN) * SCAN
        while (last < 0) & (start >= 0):
            cols = start + tl.arange(0, SCAN)
            flags = tl.load(KEY_VALID + mask_row_offset + cols * stride_mn, mask=cols < n_keys, other=0)
            last = tl.max(tl.where(flags.to(tl.int32) != 0, cols, -1), 0)
            start -= SCAN
        return last
    else:
        return n_keys - 1


@triton.jit(do_not_specialize=["n_keys", "keys_per_split", "stats_offset", "slide"])
def _decode_kernel(
    Q, K, V, OUT, KEY_VALID, QUERY_VALID,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mn,
    n_keys, keys_per_split, stats_offset, qk_scale,
    # Read only with the matching switch below (defaults off: a default variant compiles as before).
    slide, cap_scale, cap_inv_scale, LEARNED_SINKS,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_KEY_VALID: tl.constexpr, HAS_QUERY_VALID: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, HAS_LEARNED_SINKS: tl.constexpr = False,
):
    # Inductor passes float scalars as fp64; the softmax runs in fp32 either way.
    qk_scale = tl.cast(qk_scale, tl.float32)
    if SOFTCAP:
        cap_scale = tl.cast(cap_scale, tl.float32)
        cap_inv_scale = tl.cast(cap_inv_scale, tl.float32)
    G_TILES: tl.constexpr = (GROUPS + BLOCK_G - 1) // BLOCK_G
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // G_TILES
    split = tl.program_id(2)
    group = (tl.program_id(1) % G_TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    head_valid = group < GROUPS
    head = kv_head * GROUPS + group
    dim = tl.arange(0, BLOCK_D)

    if HAS_WINDOW:
        # Keys j with pos - j >= slide are disallowed (docs/semantics.md). The splits divide
        # the window's keys, not the whole cache: a long cache costs only its window.
        pos = _last_attended_slot(KEY_VALID, batch * stride_mb, stride_mn, n_keys, HAS_KEY_VALID, 4 * BLOCK_N)
        lo = tl.maximum(pos - slide + 1, 0) + split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, pos + 1)
    else:
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, n_keys)
    if HAS_QUERY_VALID:
        # An empty key range makes the row come out as zeros, split or not.
        hi = tl.where(tl.load(QUERY_VALID + batch).to(tl.int32) != 0, hi, lo)

    q = _load_rows(Q + batch * stride_qb, head, head_valid, stride_qh, dim, HEAD_DIM, UPCAST)
    k_base = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_LEARNED_SINKS:
        # The learned sink is the initial state of the first split's online softmax
        # (running max = its logit in log2 units, running sum 1, no value): the merge then
        # counts it exactly once, and a row without keys comes out as 0.
        sink = tl.load(LEARNED_SINKS + head, mask=head_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(split == 0, sink, float("-inf"))
        l_i = tl.where(split == 0, 1.0, 0.0) + tl.zeros([BLOCK_G], tl.float32)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        attended = _attended_keys(KEY_VALID, batch * stride_mb, stride_mn, start + offs_n, hi, HAS_KEY_VALID)
        # The tile's first slot in int64: a static cache's buffer can exceed 2**31 elements.
        first = tl.cast(start, tl.int64)
        k = _load_rows(k_base + first * stride_kn, offs_n, attended, stride_kn, dim, HEAD_DIM, UPCAST)
        v = _load_rows(v_base + first * stride_vn, offs_n, attended, stride_vn, dim, HEAD_DIM, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:  # Gemma 2's order: scale, then cap (log2 units: cap * log2 e outside the tanh)
            scores = cap_scale * _tanh(qk * cap_inv_scale)
        else:
            scores = qk * qk_scale
        scores = tl.where(attended[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no attended key yet keeps m = -inf; shifting by 0 then gives
        # exp2(-inf) = 0 instead of NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(scores - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    q_heads = (tl.num_programs(1) // G_TILES) * GROUPS
    row = batch * q_heads + head  # [B, 1, Hq, D] contiguous: row-major over (batch, head)
    tile_mask = head_valid[:, None] & (dim < HEAD_DIM)[None, :]
    if SPLIT:
        part = row * tl.num_programs(2) + split
        tl.store(OUT + part[:, None] * HEAD_DIM + dim[None, :], acc, mask=tile_mask)
        tl.store(OUT + stats_offset + part * 2, m_i, mask=head_valid)
        tl.store(OUT + stats_offset + part * 2 + 1, l_i, mask=head_valid)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(OUT + row[:, None] * HEAD_DIM + dim[None, :], out.to(OUT.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=["n_splits", "stats_offset"])
def _merge_splits_kernel(
    PARTIAL, OUT, n_splits, stats_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (row, query head) per program: rescale every split's partial sums to the common
    maximum and divide once. Splits that saw no attended key hold m = -inf and l = 0."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_valid = s < n_splits
    dim = tl.arange(0, BLOCK_D)
    part = row * n_splits + s
    m = tl.load(PARTIAL + stats_offset + part * 2, mask=s_valid, other=float("-inf"))
    l = tl.load(PARTIAL + stats_offset + part * 2 + 1, mask=s_valid, other=0.0)
    acc = tl.load(PARTIAL + part[:, None] * HEAD_DIM + dim[None, :],
                  mask=s_valid[:, None] & (dim < HEAD_DIM)[None, :], other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(l * weight, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + row * HEAD_DIM + dim, out.to(OUT.dtype.element_ty), mask=dim < HEAD_DIM)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_CONFIGS: dict = {}


def _config(dtype, head_dim, groups, has_key_valid, has_query_valid, device_index, has_window=False, has_softcap=False,
            has_learned_sinks=False):
    """(BLOCK_N, query-head tiles per kv head, (launch key, kwargs) single pass, the same
    split) for one kernel variant on one device. A fixed rule, no autotuning (decode is
    bound by reading K and V, not by the tile shape): K/V tiles of 64 keys (32 at D > 128)
    in a 3-stage pipeline, 2 stages for fp32 at D >= 128, which keeps shared memory below
    ~140 KB in every case. Not yet swept on hardware. The window, cap and sink switches are
    passed explicitly, on or off (see below)."""
    key = (dtype, head_dim, groups, has_key_valid, has_query_valid, device_index, has_window, has_softcap,
           has_learned_sinks)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        block_d = max(16, _next_pow2(head_dim))
        # Wide GQA groups are split over several programs rather than grow the fp32
        # accumulator past what stays in registers.
        block_g = min(max(16, _next_pow2(groups)), 64 if block_d <= 128 else 32)
        block_n = 64 if block_d <= 128 else 32
        stages = 2 if (dtype == torch.float32 and block_d >= 128) else 3
        consts = dict(
            GROUPS=groups, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=block_n,
            HAS_KEY_VALID=has_key_valid, HAS_QUERY_VALID=has_query_valid, UPCAST=_UPCAST,
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            num_warps=4, num_stages=stages,
        )
        # Passed even when off (their defaults): Inductor's launcher for a traced kernel
        # expects every constexpr in the call (torch 2.11 dropped defaulted ones and the grid
        # then filled their slots); a default variant compiles the same either way.
        consts.update(HAS_WINDOW=has_window, SOFTCAP=has_softcap, HAS_LEARNED_SINKS=has_learned_sinks)
        cfg = (block_n, _cdiv(groups, block_g),
               ((key, False), {**consts, "SPLIT": False}), ((key, True), {**consts, "SPLIT": True}))
        _CONFIGS[key] = cfg
    return cfg


_SM_COUNTS: dict = {}


def _sm_count(q) -> int:
    if not q.is_cuda:
        return _DEFAULT_SM_COUNT
    index = q.get_device()
    count = _SM_COUNTS.get(index)
    if count is None:
        count = _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def split_plan(programs: int, n_keys: int, block_n: int, sm_count: int, graph: bool = False) -> tuple[int, int]:
    """(splits, keys per split) for ``programs`` (row, kv head, head tile) programs over
    ``n_keys`` key slots. Every split but the last holds a whole number of key tiles, and
    none is empty. ``graph``: the launch belongs to a compiled graph (see
    GRAPH_SINGLE_PASS_MAX_KEYS); it changes the rule only while ``programs < sm_count``."""
    if graph and programs < sm_count:
        single_max, min_keys = GRAPH_SINGLE_PASS_MAX_KEYS, GRAPH_MIN_KEYS_PER_SPLIT
    else:
        single_max, min_keys = SINGLE_PASS_MAX_KEYS, MIN_KEYS_PER_SPLIT
    if n_keys <= single_max:
        return 1, n_keys
    splits = min(_cdiv(SPLIT_TARGET_WAVES * sm_count, programs), _cdiv(n_keys, min_keys), MAX_SPLITS)
    if splits <= 1:
        return 1, n_keys
    per_split = _cdiv(_cdiv(n_keys, splits), block_n) * block_n
    return _cdiv(n_keys, per_split), per_split


def _launch(q, k, v, key_valid, query_valid, softmax_scale, launch_decode, launch_merge, softcap=0.0, sliding_window=0,
            learned_sinks=None, graph=False):
    """Allocate the output (and scratch when split) and launch; ``launch_*`` are
    ``(grid, key, args, kwargs)`` callables. Inputs are validated already; ``softcap`` and
    ``sliding_window`` are 0 when off; ``graph``: the compiled op's split rule (split_plan)."""
    batch, q_heads, _, head_dim = q.shape
    _, kv_heads, n_keys, _ = k.shape
    has_key_valid = key_valid is not None
    if has_key_valid:
        n_keys = key_valid.shape[1]
        stride_mb, stride_mn = key_valid.stride()
    else:
        key_valid, stride_mb, stride_mn = q, 0, 0  # never read: HAS_KEY_VALID is off
    has_query_valid = query_valid is not None
    if not has_query_valid:
        query_valid = q
    # int(): under torch.compile(dynamic=True) these are SymInts; they become constexprs,
    # so they specialize (a guard), as Triton would anyway.
    head_dim = int(head_dim)
    block_n, g_tiles, single, split = _config(q.dtype, head_dim, int(q_heads // kv_heads),
                                              has_key_valid, has_query_valid, q.get_device(),
                                              sliding_window > 0, softcap > 0, learned_sinks is not None)
    out = q.new_empty((batch, 1, q_heads, head_dim))
    if batch == 0:
        return out
    programs = batch * kv_heads * g_tiles
    # With a sliding window a row reads at most its window: the splits divide that.
    visited = min(n_keys, sliding_window) if sliding_window > 0 else n_keys
    splits, per_split = split_plan(programs, visited, block_n, _sm_count(q), graph)
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    strides = (sq[0], sq[1], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], stride_mb, stride_mn)
    qk_scale = softmax_scale * LOG2E
    # Window, cap (cap * log2 e, scale / cap) and sinks (q stands in when off: never read).
    extras = (sliding_window, softcap * LOG2E, softmax_scale / softcap if softcap > 0 else 0.0,
              q if learned_sinks is None else learned_sinks)
    if splits == 1:
        launch_decode((batch, kv_heads * g_tiles, 1), single[0],
                      (q, k, v, out, key_valid, query_valid, *strides, n_keys, per_split, 0, qk_scale, *extras),
                      single[1])
        return out
    rows = batch * q_heads
    stats_offset = rows * splits * head_dim
    partial = torch.empty(stats_offset + rows * splits * 2, dtype=torch.float32, device=q.device)
    launch_decode((batch, kv_heads * g_tiles, splits), split[0],
                  (q, k, v, partial, key_valid, query_valid, *strides, n_keys, per_split, stats_offset, qk_scale,
                   *extras), split[1])
    block_s = _next_pow2(MAX_SPLITS)
    launch_merge((rows, 1, 1), (head_dim, block_s, q.get_device()), (partial, out, splits, stats_offset),
                 dict(HEAD_DIM=head_dim, BLOCK_D=max(16, _next_pow2(head_dim)), BLOCK_S=block_s, num_warps=4))
    return out


def _plain(kernel):
    def launch(grid, key, args, kwargs):
        kernel[grid](*args, **kwargs)
    return launch


def _traced(kernel):
    def launch(grid, key, args, kwargs):
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    return launch


# MODELOPT_SPARSE_DIRECT_LAUNCH=0 (read at import) keeps every launch on JITFunction.run.
if not _UPCAST and os.environ.get("MODELOPT_SPARSE_DIRECT_LAUNCH", "1").strip() != "0":
    _eager_launchers = (DirectLauncher(_decode_kernel), DirectLauncher(_merge_splits_kernel))
    _PLANS_ON = True
else:
    _eager_launchers = (_plain(_decode_kernel), _plain(_merge_splits_kernel))
    _PLANS_ON = False
_traced_launchers = (_traced(_decode_kernel), _traced(_merge_splits_kernel))


@torch.library.triton_op("modelopt_sparse::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
               query_valid: Optional[torch.Tensor], softmax_scale: float, softcap: float = 0.0,
               sliding_window: int = 0, learned_sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch(q, k, v, key_valid, query_valid, softmax_scale, *_traced_launchers, softcap, sliding_window,
                   learned_sinks, graph=True)


# Interpreted kernels cannot be traced (wrap_triton hands them back unwrapped), so on the
# CPU a compiled caller gets one opaque op with a shape-only fake instead.
@torch.library.custom_op("modelopt_sparse::decode_attention_interpreted", mutates_args=())
def _interpreted_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
                    query_valid: Optional[torch.Tensor], softmax_scale: float, softcap: float = 0.0,
                    sliding_window: int = 0, learned_sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    # The compiled op's stand-in: the compiled op's split rule, so CPU tests exercise it.
    return _launch(q, k, v, key_valid, query_valid, softmax_scale, *_eager_launchers, softcap, sliding_window,
                   learned_sinks, graph=True)


@_interpreted_op.register_fake
def _(q, k, v, key_valid, query_valid, softmax_scale, softcap=0.0, sliding_window=0, learned_sinks=None):
    return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))


_compiled_op = _interpreted_op if _UPCAST else _decode_op


_current_device = torch._C._cuda_getDevice if hasattr(torch._C, "_cuda_getDevice") else torch.cuda.current_device


def decode_attention(q, k, v, key_valid=None, query_valid=None, *, softmax_scale=None, softcap=None,
                     learned_sinks=None, sliding_window=None) -> torch.Tensor:
    """Dense attention of one query per row over a KV cache, read in place.

    Args:
        q: ``[B, Hq, 1, D]``.
        k, v: ``[B, Hkv, L, D]``, any strides with a unit-stride last dim (a static cache's
            full buffer, ``view().transpose(1, 2)`` views). ``Hq`` a positive multiple of
            ``Hkv``. fp16, bf16 or fp32, one dtype, one device; ``16 <= D <= 256``.
        key_valid: optional ``[B, W]`` bool/int32/int64 with ``W <= L``: slot ``j`` of row
            ``b`` is attended iff ``j < W`` and ``key_valid[b, j] != 0``. ``None``: all L.
        query_valid: optional bool ``[B]``; rows where it is False come out as zeros.
        softmax_scale: positive and finite; defaults to ``1/sqrt(D)``.
        softcap: ``None`` (off) or ``c > 0``: scores ``c * tanh(softmax_scale * q.k / c)``
            (Gemma 2), as in :func:`modelopt_sparse.kernels.attention`.
        learned_sinks: ``None`` (off) or ``[Hq]`` float logits on q's device: one extra term
            per query head in the softmax denominator, no value row, not scaled or capped
            (GPT-OSS's ``s_aux``), as in :func:`modelopt_sparse.kernels.attention`.
        sliding_window: ``None`` (off) or ``W >= 1``: slot ``j`` is attended only if also
            ``pos - j < W``, where ``pos`` is the query's own position in the cache: the
            row's last attended slot (its newest key, the step's own token; later slots of a
            static cache are not attended), or ``L - 1`` without ``key_valid``. Slots count
            as positions, padding included, as transformers' cache positions do. Only the
            window's keys are read.

    Returns:
        ``[B, 1, Hq, D]`` contiguous, dtype of ``q`` (fp32 accumulation). A row with no
        attended key is zeros. No device value is read on the host: the call can be
        captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``.

    Raises:
        TypeError, ValueError: for bad input, before any kernel runs.
    """
    options = (softcap, learned_sinks, sliding_window)
    plan_key = None
    if _PLANS_ON and type(q) is torch.Tensor and q.is_cuda and not torch.compiler.is_compiling():
        plan_key, pointers = _plan_key(q, k, v, key_valid, query_valid, softmax_scale, options)
        plan = _PLANS.get(plan_key) if plan_key is not None else None
        if plan is not None and q.get_device() == _current_device() and hooks_allow_plans():
            # The same shapes, strides, dtypes, devices, scale and options passed _checked before.
            out = q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))
            if getattr(_eager_launchers[0], "_verify", False):
                _verify_plan(plan, q, k, v, key_valid, query_valid, softmax_scale, options)
            plan((pointers[0], pointers[1], pointers[2], out.data_ptr(), pointers[3], pointers[4]))
            return out
    softmax_scale = _checked(q, k, v, key_valid, query_valid, softmax_scale)
    softcap, sliding_window, learned_sinks = _checked_options(q, *options)
    if torch.compiler.is_compiling():
        return _compiled_op(q, k, v, key_valid, query_valid, softmax_scale, softcap, sliding_window, learned_sinks)
    launchers = _eager_launchers
    recorded = []
    if plan_key is not None and len(_PLANS) < _PLAN_LIMIT:
        launchers = (_recording(_eager_launchers[0], recorded), _eager_launchers[1])
    if q.is_cuda and q.get_device() != _current_device():
        with torch.cuda.device(q.device):
            return _launch(q, k, v, key_valid, query_valid, softmax_scale, *launchers, softcap, sliding_window,
                           learned_sinks)
    out = _launch(q, k, v, key_valid, query_valid, softmax_scale, *launchers, softcap, sliding_window, learned_sinks)
    if len(recorded) == 1 and not recorded[0][1][1] and hooks_allow_plans():  # one single-pass launch
        grid, key, args, kwargs = recorded[0]
        compiled = getattr(_eager_launchers[0], "compiled", None)  # a DirectLauncher's cache
        entry = compiled(key, args) if compiled is not None else None
        if entry is not None:
            # The sinks (last argument) by address, which the plan's key holds: the plan keeps
            # no tensor. Without sinks the stand-in's address, never read.
            plan_args = (*args[:-1], args[-1].data_ptr())
            _PLANS[plan_key] = LaunchPlan(entry[0], grid, plan_args, entry[1], range(6))
    return out


# Launch plans of single-pass decode launches (DirectLauncher only), by everything that
# decides the launch and the validation except the tensors' addresses.
_PLANS: dict = {}
_PLAN_LIMIT = 1024


_SINK_TYPES = (torch.Tensor, torch.nn.Parameter)  # models hold their sinks as parameters


def _tensor_signature(t, types=(torch.Tensor,)):
    if t is None:
        return None
    if type(t) not in types:
        raise TypeError
    return t.shape, t.stride(), t.dtype, t.get_device()


def _plan_key(q, k, v, key_valid, query_valid, softmax_scale, options=(None, None, None)):
    """``(key, pointers of q, k, v, key_valid, query_valid)``, or ``(None, None)`` for a
    call no plan covers (unusual types, unaligned pointers). ``options``: softcap,
    learned_sinks, sliding_window as passed; the sinks are keyed by address too (a plan
    launches with the address its key holds)."""
    softcap, learned_sinks, sliding_window = options
    try:
        signature = (_tensor_signature(q), _tensor_signature(k), _tensor_signature(v),
                     _tensor_signature(key_valid), _tensor_signature(query_valid),
                     _tensor_signature(learned_sinks, _SINK_TYPES))
    except TypeError:
        return None, None
    if softmax_scale is not None and type(softmax_scale) is not float:
        return None, None
    if (softcap is not None and type(softcap) is not float) or (
            sliding_window is not None and type(sliding_window) is not int):
        return None, None
    if learned_sinks is not None and learned_sinks.stride(0) != 1:  # launched from a temporary copy
        return None, None
    pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(),
                q.data_ptr() if key_valid is None else key_valid.data_ptr(),
                q.data_ptr() if query_valid is None else query_valid.data_ptr())
    if (pointers[0] | pointers[1] | pointers[2] | pointers[3] | pointers[4]) & 15:
        return None, None
    # The split rule's constants decide the launch too (tests change them).
    sinks_address = None if learned_sinks is None else learned_sinks.data_ptr()
    return (signature, softmax_scale, softcap, sliding_window, sinks_address, SINGLE_PASS_MAX_KEYS,
            MIN_KEYS_PER_SPLIT, SPLIT_TARGET_WAVES, MAX_SPLITS), pointers


def _verify_plan(plan, q, k, v, key_valid, query_valid, softmax_scale, options) -> None:
    """``MODELOPT_SPARSE_VERIFY_LAUNCH=1``: the plan must launch what the ordinary path
    would (the same kernel as Triton picks, the same grid and arguments)."""
    calls = []
    softcap, sliding_window, learned_sinks = _checked_options(q, *options)
    _launch(q, k, v, key_valid, query_valid, _checked(q, k, v, key_valid, query_valid, softmax_scale),
            lambda *call: calls.append(call), lambda *call: calls.append(call), softcap, sliding_window, learned_sinks)
    grid, _key, args, kwargs = calls[0]
    _eager_launchers[0].verify(plan.kernel, grid, args, kwargs)
    # The sinks travel by address; without them the stand-in is never read.
    expected = (*args[6:-1], args[-1].data_ptr() if learned_sinks is not None else plan._after[len(args) - 7])
    if len(calls) != 1 or tuple(grid) != plan.grid or plan._after[:len(args) - 6] != expected:
        raise RuntimeError("a decode launch plan would launch other arguments than the ordinary path")


def _recording(launcher, calls):
    def launch(grid, key, args, kwargs):
        calls.append((grid, key, args, kwargs))
        launcher(grid, key, args, kwargs)
    return launch


def _checked(q, k, v, key_valid, query_valid, softmax_scale) -> float:
    """Validate everything checkable from metadata alone; return the softmax scale. Every
    call pays for this, so each attribute is read once."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"decode_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise ValueError(f"decode_attention: {name} must be 4-D, got shape {tuple(shape)}")
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"decode_attention: q, k and v must share one dtype, got {dtype}, {k.dtype}, {v.dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"decode_attention: unsupported dtype {dtype}; use float16, bfloat16 or float32")
    device = q.device
    if k.device != device or v.device != device:
        raise ValueError(f"decode_attention: q, k and v must be on one device, got {device}, {k.device}, {v.device}")
    if not (q.is_cuda or (_UPCAST and device.type == "cpu")):
        raise ValueError(f"decode_attention: needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")
    batch, q_heads, q_len, head_dim = q_shape
    if q_len != 1:
        raise ValueError(f"decode_attention: q must be [B, Hq, 1, D] (one query per row), got {tuple(q_shape)}")
    if k_shape != v_shape:
        raise ValueError(f"decode_attention: k and v must have one shape, got {tuple(k_shape)} and {tuple(v_shape)}")
    if k_shape[0] != batch:
        raise ValueError(f"decode_attention: k/v batch {k_shape[0]} differs from q batch {batch}")
    if k_shape[3] != head_dim:
        raise ValueError(f"decode_attention: q and k/v head dims differ: {head_dim} and {k_shape[3]}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    kv_heads = k_shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"decode_attention: query heads ({q_heads}) must be a positive multiple of key/value heads ({kv_heads})")
    for name, strides in (("q", q.stride()), ("k", k.stride()), ("v", v.stride())):
        if strides[3] != 1:
            raise ValueError(f"decode_attention: {name} must have unit stride in its last dim, got strides {strides}")
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor):
            raise TypeError(f"decode_attention: key_valid must be a tensor or None, got {type(key_valid).__name__}")
        if key_valid.dtype not in _MASK_DTYPES:
            raise TypeError(f"decode_attention: key_valid must be bool, int32 or int64, got {key_valid.dtype}")
        mask_shape = key_valid.shape
        if len(mask_shape) != 2 or mask_shape[0] != batch:
            raise ValueError(f"decode_attention: key_valid must be [B={batch}, W], got shape {tuple(mask_shape)}")
        if mask_shape[1] > k_shape[2]:
            raise ValueError(
                f"decode_attention: key_valid covers {mask_shape[1]} key slots but k/v hold {k_shape[2]}")
        if key_valid.device != device:
            raise ValueError(f"decode_attention: key_valid is on {key_valid.device} but q is on {device}")
    if query_valid is not None:
        if not isinstance(query_valid, torch.Tensor):
            raise TypeError(f"decode_attention: query_valid must be a tensor or None, got {type(query_valid).__name__}")
        if query_valid.dtype != torch.bool:
            raise TypeError(f"decode_attention: query_valid must be bool, got {query_valid.dtype}")
        if query_valid.shape != (batch,):
            raise ValueError(f"decode_attention: query_valid must be [B={batch}], got shape {tuple(query_valid.shape)}")
        if query_valid.device != device:
            raise ValueError(f"decode_attention: query_valid is on {query_valid.device} but q is on {device}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"decode_attention: softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"decode_attention: softmax_scale must be positive and finite, got {softmax_scale}")
    return float(softmax_scale)


def _checked_options(q, softcap, learned_sinks, sliding_window):
    """``(softcap, sliding_window, learned_sinks)`` validated, the first two as 0 when off;
    the sinks contiguous (the kernel indexes them by head)."""
    if softcap is not None or sliding_window is not None:
        try:
            check_window_softcap(sliding_window, softcap)
        except (TypeError, ValueError) as error:
            raise type(error)(f"decode_attention: {error}") from None
    if learned_sinks is not None:
        check_learned_sinks(learned_sinks, q.shape[1], q.device, caller="decode_attention: ")
        if learned_sinks.stride(0) != 1:
            learned_sinks = learned_sinks.contiguous()
    return float(softcap or 0.0), int(sliding_window or 0), learned_sinks


__all__ = ["decode_attention", "split_plan"]
