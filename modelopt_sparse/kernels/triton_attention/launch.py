"""The host side of the kernels: the forward and backward launches (arguments, constexprs,
outputs, launch plans) and the forward as torch.compile traces it."""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from ..api import interpreting
from ..reference import SparseParams
from ..triton_launch import hooks_allow_plans
from .backward import _attn_bwd_delta
from .configs import _FORWARD_PLANS, _dkdv, _dq, _fwd
from .forward import _attn_fwd
from .tma import _use_tma


LOG2E = 1.4426950408889634  # host-side only


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
    # empty_like skips new_empty's argument parsing (~1 µs of host time per call); it keeps a
    # non-contiguous q's strides, so only a contiguous q takes it.
    if q_covered:
        out = torch.empty_like(q) if q.is_contiguous() else q.new_empty(q.shape)
    else:
        out = q.new_zeros(q.shape)
    lse = _empty_lse(q) if with_lse else out
    row_stats = q.new_zeros(*q.shape[:-1], 3, dtype=torch.float32) if with_stats else None
    return out, lse, row_stats


_LSE_TEMPLATES: dict = {}


def _empty_lse(q):
    """An uninitialised fp32 ``q.shape[:-1]`` on q's device. Through ``empty_like`` of a
    broadcast one-element template (4 bytes, remembered per shape and device), which skips
    ``new_empty``'s argument parsing: ~1.5 µs less host time per call that stores the lse.
    Only for plain tensors: a fake tensor (the traced forward under torch.compile runs with
    them, and Dynamo's is_compiling() is False there) must never become a template."""
    if type(q) is not torch.Tensor or torch.compiler.is_compiling():
        return q.new_empty(q.shape[:-1], dtype=torch.float32)
    key = (q.shape, q.get_device() if q.is_cuda else q.device)
    template = _LSE_TEMPLATES.get(key)
    if template is None:
        template = q.new_empty(1, dtype=torch.float32).expand(q.shape[:-1])
        if len(_LSE_TEMPLATES) < 256:
            _LSE_TEMPLATES[key] = template
    return torch.empty_like(template)


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
    return _backward_launch(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len, max_q, max_k, q_covered,
                            k_covered, params, learned_sinks)


def _backward_launch(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered,
                     params, learned_sinks=None):
    """The backward launches proper (:func:`_launch_backward` with its params object, as the
    eager autograd.Function calls them)."""
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
