"""The Hopper engine proper: whether a call runs here, the launch, and autograd.

:func:`unsupported_reason` says why a call cannot run on this engine; :func:`choose` is
``attention()``'s dispatch between this engine and Triton (``backend="hopper"`` raises
:class:`HopperUnavailable`, ``backend="auto"`` logs the reason once and keeps Triton, and keeps
calls below :data:`AUTO_MIN_WORK` on Triton silently). :func:`forward` fills the kernel's
parameter block and tensor maps and launches the variant :func:`~.variants.variant_for` picks;
:func:`hopper_attention` is the entry from :func:`modelopt_sparse.kernels.attention` (forward
by this kernel, backward by the Triton kernels on its output and LSE); :func:`forward_with_lse`
and :func:`kept_mask_probe` serve the tests.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch

from ..reference import SparseParams
from ..switches import env_flag
from .build import _NO_NVCC, SOURCE_DIR, HopperUnavailable, find_nvcc
from .driver import _FwdParams, _module, _TmaParams, _TmaParams3D
from .variants import HEAD_DIMS, variant_for

LOG = logging.getLogger("modelopt_sparse")
BACKEND = "hopper"
BLOCK_M = 128  # query rows per CTA with two consumer warpgroups (the three-warpgroup D = 64 variant: 192)
THREADS = 384
LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
# The clock-stamp build (Variant.phase_clocks, measurement only): stamps per tile step and tiles
# recorded per consumer warpgroup (CLOCK_STAMPS, CLOCK_TILES in nm_attention_fwd.cu), and the
# last launch's stamps, (int32 buffer, grid, consumer warpgroups), for the `phases` command.
PHASE_CLOCK_STAMPS, PHASE_CLOCK_TILES = 8, 128
last_phase_clocks = None


# --------------------------------------------------------------------------------------
# What can run here
# --------------------------------------------------------------------------------------
def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: SparseParams,
                       *, stats=None, learned_sinks=None, check_toolchain: bool = True) -> str | None:
    """Why this engine cannot run the call (a sentence), or None when it can. Cheap checks
    first; the toolchain (nvcc present, sources present) last."""
    if not q.is_cuda:
        return f"it needs CUDA tensors, got {q.device}"
    major, minor = _capability(q.device.index)
    if (major, minor) != (9, 0):
        return f"it needs an sm_90 GPU (H100/H200), this one is sm_{major}{minor}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it supports float16 and bfloat16, not {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"it supports head_dim 64 and 128, not {q.shape[-1]}"
    if stats is not None:
        return "return_stats=True runs on the Triton forward (the Hopper kernel keeps no statistics)"
    if params.softcap:
        return "softcap is not implemented in the Hopper kernel"
    if q.shape[-2] > 65535:
        return f"at most 65535 query heads, got {q.shape[-2]}"
    return _toolchain_reason() if check_toolchain else None


# The two questions about this machine, asked while torch.compile traces a call as well: Dynamo
# runs them once at trace time and keeps the answer as a constant (it cannot trace a file
# system lookup), as an eager call would get the same answer every time.
@torch.compiler.assume_constant_result
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@torch.compiler.assume_constant_result
def _toolchain_reason() -> str | None:
    """Why the kernels cannot be built here (no nvcc, or the CUDA sources missing), or None.
    Remembered per environment that find_nvcc reads: the search globs site-packages/nvidia and
    stats a dozen paths, which every engine call repeated before (session 24, the H200 host: 255 us
    of host time per engine call before, 142-215 us after, Triton's 20)."""
    key = (find_nvcc, *(os.environ.get(name) for name in _NVCC_ENV))
    if key not in _TOOLCHAIN_REASONS:
        if find_nvcc() is None:
            reason = _NO_NVCC
        elif not (SOURCE_DIR / "nm_attention_fwd.cu").is_file():
            reason = f"the engine's CUDA sources are missing ({SOURCE_DIR})"
        else:
            reason = None
        _TOOLCHAIN_REASONS.clear()  # one environment at a time
        _TOOLCHAIN_REASONS[key] = reason
    return _TOOLCHAIN_REASONS[key]


_NVCC_ENV = ("MODELOPT_SPARSE_NVCC", "CUDA_HOME", "CUDA_PATH", "PATH")
_TOOLCHAIN_REASONS: dict = {}


_logged: set = set()


@torch.compiler.assume_constant_result  # a compiled call logs when it is traced
def log_fallback_once(reason: str) -> None:
    """One log line per distinct reason, for ``backend="auto"`` falling back to Triton."""
    if reason not in _logged:
        _logged.add(reason)
        LOG.warning("modelopt_sparse: the Hopper engine is not used (%s); using the Triton kernels", reason)


def auto_enabled() -> bool:
    """Whether ``backend="auto"`` considers this engine: on by default since the H200 run of
    session 10 (docs/hopper_engine.md: 1.40x the Triton forward dense, 1.14-1.36x at N:M);
    ``MODELOPT_SPARSE_HOPPER=0`` opts out."""
    return env_flag("MODELOPT_SPARSE_HOPPER", True)


# ``backend="auto"`` keeps small calls on Triton: below about this many query-key-head products
# (4k x 4k tokens x 32 heads) an engine call costs the host more (142-215 us against Triton's ~20)
# than its kernel saves. Measured on the H200 (session 24, causal forward, engine over Triton with
# 50 calls back to back, the host running ahead as in a GPU-bound model; D = 128, 32 heads):
# S = 1024 / 2048 / 4096 / 8192: dense 0.21 / 0.50 / 1.38 / 1.23, 2:4 0.44 / 0.61 / 1.31 / 1.35
# (D = 64 with 64 / 8 heads: dense 0.17 / 0.57 / 1.09 / 1.11, 2:4 0.44 / 1.05 / 1.11 / 1.16).
# Session 10 had set 2k x 2k x 32 without a measurement of the crossover.
AUTO_MIN_WORK = 4096 * 4096 * 32


# ... and sliding windows shorter than these (keys): a call then does little work per CTA and the
# engine's larger host cost per call and its one CTA per SM do not pay back. Measured on the H200 (session 24, S = 16384, causal forward, one synchronized call per
# timing, Triton's time over the engine's) at windows 128 / 512 / 1024 / 2048 / 4096: dense
# D = 128 0.95 / 1.20 / 1.27 / 1.33 / 1.50, D = 64 0.97 / 0.91 / 1.07 / 1.25 / 1.41; 2:4 D = 128
# 0.90 / 1.03 / 1.01 / 1.20 / 1.21, D = 64 0.80 / 0.86 / 0.95 / 1.05 / 1.12.
AUTO_MIN_WINDOW_DENSE = 1024
AUTO_MIN_WINDOW_SPARSE = 2048


def below_auto_threshold(q, k, params: SparseParams | None = None) -> bool:
    """Whether ``backend="auto"`` keeps this call on Triton by its shapes and window alone: less
    work than :data:`AUTO_MIN_WORK`, or a sliding window shorter than
    :data:`AUTO_MIN_WINDOW_DENSE` (dense) / :data:`AUTO_MIN_WINDOW_SPARSE` (N:M) that drops keys
    (one at least as long as the key rows drops none)."""
    if _work(q, k) < AUTO_MIN_WORK:
        return True
    window = params.sliding_window if params is not None else 0
    if window and window < k.shape[-3]:
        return window < (AUTO_MIN_WINDOW_SPARSE if params.sparsity_n else AUTO_MIN_WINDOW_DENSE)
    return False


def choose(q, k, v, params, *, forced: bool, stats=None, learned_sinks=None) -> str:
    """``"hopper"`` or ``"triton"`` for one call. Forced (``backend="hopper"``): raises
    :class:`HopperUnavailable` when it cannot run, except for ``return_stats=True``, which is
    served by the Triton forward (documented fallback). Auto: calls smaller than
    :data:`AUTO_MIN_WORK` or with a short sliding window (:func:`below_auto_threshold`) stay on
    Triton silently; otherwise the engine, or Triton with one log line naming the reason. The
    same under torch.compile, where the engine runs as one custom op (ops.py) and the choice is
    made once, at trace time."""
    if not forced and below_auto_threshold(q, k, params):
        return "triton"
    reason = unsupported_reason(q, k, v, params, stats=stats, learned_sinks=learned_sinks)
    if reason is None:
        return BACKEND
    if forced and stats is None:
        raise HopperUnavailable(f"backend='hopper' cannot run this call: {reason}")
    log_fallback_once(reason)
    return "triton"


def window_fields(params: SparseParams, key_rows: int) -> tuple[int, int, int]:
    """The kernel's ``num_sink``, ``dense_window`` and ``sliding_window`` (0 = off) fields for
    keys packed in ``key_rows`` rows.

    Every key index and every distance ``pos - key`` (pos <= kv_len - 1) is below ``key_rows``,
    so a sink count or dense window of ``key_rows`` already covers every key, and a sliding
    window of ``key_rows`` or more drops none (= off): clamping to that keeps the semantics
    exactly. It matters because the fields are int32 (ctypes wraps a larger int silently: 2**40
    read as 0, a dense window turned off) and the kernel's tile bounds subtract the windows from
    positions that can be negative (more queries than keys), which overflows near 2**31."""
    bound = min(key_rows, _INT32_MAX)
    sliding = params.sliding_window or 0
    return (min(params.num_sink_tokens, bound), min(params.dense_window_size, bound),
            sliding if sliding < bound else 0)


def _work(q, k) -> int:
    """Query rows x key rows x query heads, an upper bound of a call's score entries (packed
    ``[T, H, D]`` or batched ``[B, S, H, D]``)."""
    if q.dim() == 4:
        return q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
    return q.shape[0] * k.shape[0] * q.shape[1]


# --------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------
def _grid(max_q: int, hq: int, batch: int, block_m: int = BLOCK_M) -> tuple[int, int, int]:
    if batch > 65535:
        raise HopperUnavailable(f"at most 65535 sequences per call, got {batch}")
    return (max(1, math.ceil(max_q / block_m)), hq, batch)


def _checked() -> bool:
    """MODELOPT_SPARSE_HOPPER_CHECK=1: synchronize after every launch and raise if a barrier
    wait in the kernel timed out (a deadlock shows as an error, not a hang). For tests."""
    return env_flag("MODELOPT_SPARSE_HOPPER_CHECK", False)


def forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params: SparseParams, *, q_covered: bool,
            with_lse: bool, probe=None, source_dir=None, learned_sinks=None):
    """Launch the kernel: ``(out, lse or None)``; out is contiguous ``[T, Hq, D]`` in q's
    dtype (rows outside every sequence are 0 unless ``q_covered``), lse fp32 ``[T, Hq]``
    (log2 domain, as the Triton forward's; with ``learned_sinks``, ``[Hq]`` logits in natural-log
    units, their terms included, as the Triton backward reads it). ``probe``: (scores, kept) buffers
    ``[Hq, T, keys]`` for a mask-probe build. ``source_dir``: the kernel built from other CUDA
    sources with the same kernel arguments (``ab --against``; developer use)."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    variant = variant_for(params, q.dtype, d, probe=probe is not None, learned_sinks=learned_sinks is not None)
    if variant.tma:  # a tensor map's strides must be non-zero multiples of 16 bytes (broadcast views are not)
        q, k, v = (t.contiguous() if 0 in (t.stride(0), t.stride(1)) else t for t in (q, k, v))
    device = q.get_device()
    mod = _module(variant, device, source_dir)
    out = q.new_empty(q.shape) if q_covered else q.new_zeros(q.shape)
    lse = q.new_empty(q.shape[:2], dtype=torch.float32) if with_lse else None
    p = _FwdParams()
    p.q, p.k, p.v, p.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.lse = lse.data_ptr() if lse is not None else None
    if learned_sinks is not None:  # fp32 for the kernel (a [Hq] copy at most); kept alive to the launch
        learned_sinks = learned_sinks.detach().to(torch.float32).contiguous()
        p.sinks = learned_sinks.data_ptr()
    p.q_start, p.q_len, p.k_start, p.k_len = (t.data_ptr() for t in (q_start, q_len, k_start, k_len))
    p.q_row, p.q_head = q.stride(0), q.stride(1)
    p.k_row, p.k_head = k.stride(0), k.stride(1)
    p.v_row, p.v_head = v.stride(0), v.stride(1)
    p.o_row, p.o_head = out.stride(0), out.stride(1)
    if probe is not None:
        scores, kept = probe
        p.probe_s, p.probe_kept = scores.data_ptr(), kept.data_ptr()
        p.probe_head, p.probe_row = scores.stride(0), scores.stride(1)
    p.groups = hq // hkv
    p.lse_row = hq
    p.is_causal = int(params.is_causal)
    p.num_sink, p.dense_window, p.sliding_window = window_fields(params, k.shape[0])
    p.scale_log2 = params.softmax_scale * LOG2E
    grid = _grid(max_q, hq, q_len.shape[0], mod.block_m)
    if q.shape[0] == 0:
        return out, lse
    if variant.phase_clocks:  # measurement build: the stamps go where a probe's scores would
        global last_phase_clocks
        stamps = torch.zeros(math.prod(grid) * (mod.block_m // 64) * PHASE_CLOCK_TILES * PHASE_CLOCK_STAMPS,
                             dtype=torch.int32, device=q.device)
        p.probe_s = stamps.data_ptr()
        last_phase_clocks = (stamps, grid, mod.block_m // 64)
    tma = None
    if variant.tma3d:
        tma = _TmaParams3D()
        mod.driver.encode_tma(tma.q, q, 1, mod.block_m)
        for field, t in (("k", k), ("v", v)):
            mod.driver.encode_tma_grouped(getattr(tma, field), t, variant.sparsity_m)
        tma.kv_rows = min(k.shape[0], v.shape[0])  # the kernel recomputes the maps' g extent from it
    elif variant.tma and variant.sparse_pv:
        tma = _TmaParams3D()
        mod.driver.encode_tma(tma.q, q, 1, mod.block_m)
        mod.driver.encode_tma(tma.k, k, variant.sparsity_m, 128)
        mod.driver.encode_tma_sparse_pv(tma.v, v)
        tma.kv_rows = v.shape[0]  # the kernel recomputes the V map's bound from it
    elif variant.tma:
        tma = _TmaParams()
        step = variant.sparsity_m if variant.sparsity_n else 1
        for field, t, row_step, rows in (("q", q, 1, mod.block_m), ("k", k, step, mod.block_n),
                                         ("v", v, step, mod.block_n)):
            mod.driver.encode_tma(getattr(tma, field), t, row_step, rows)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        mod.launch(grid, p, stream, tma)
        if _checked():
            torch.cuda.synchronize(device)
            flag = mod.take_timeout()
            if flag:
                flag -= 1
                raise RuntimeError(
                    f"modelopt_sparse hopper: a barrier wait timed out in {variant.tag} (barrier id {flag >> 16}, "
                    f"parity {(flag >> 15) & 1}, block {flag & 32767}): a synchronization bug in the kernel")
    return out, lse


def _backward_fields(params: SparseParams) -> tuple:
    return tuple(getattr(params, f.name) for f in dataclasses.fields(params))


class _HopperAttention(torch.autograd.Function):
    """Forward by the Hopper kernel, backward by the Triton kernels on its output and LSE."""

    @staticmethod
    def forward(ctx, q, k, v, learned_sinks, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered,
                params):
        out, lse = forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params, q_covered=q_covered,
                           with_lse=True, learned_sinks=learned_sinks)
        ctx.save_for_backward(q, k, v, learned_sinks, out, lse, q_start, q_len, k_start, k_len)
        ctx.scalars = (max_q, max_k, q_covered, k_covered, *_backward_fields(params))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from ..triton_attention import _launch_backward, _NoSecondDerivative
        from ..triton_attention.ops import _NoSecondDerivativeOfSinks

        q, k, v, learned_sinks, out, lse, q_start, q_len, k_start, k_len = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv, d_sinks = _launch_backward(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len,
                                                   *ctx.scalars, learned_sinks)
        d_sinks = d_sinks if learned_sinks is not None else None
        if torch.is_grad_enabled():  # create_graph=True: refuse a second derivative, as Triton does
            dq, dk, dv = _NoSecondDerivative.apply(dq, dk, dv, q, k, v, grad_out)
            if d_sinks is not None:
                d_sinks = _NoSecondDerivativeOfSinks.apply(d_sinks, learned_sinks, grad_out)
        return (dq, dk, dv, d_sinks) + (None,) * 9


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """cp.async moves 16-byte chunks: unit stride along head_dim and 16-byte aligned base,
    row and head strides; anything else is copied once."""
    if t.stride(-1) != 1 or t.stride(0) % 8 or t.stride(1) % 8 or t.data_ptr() % 16:
        return t.contiguous()
    return t


def hopper_attention(q, k, v, q_start, q_len, max_q, k_start, k_len, max_k, params, covered=(False, False),
                     learned_sinks=None):
    """The engine's entry from :func:`modelopt_sparse.kernels.attention` (inputs validated
    there, packed 3-D tensors)."""
    max_q, max_k = max(int(max_q), 1), max(int(max_k), 1)
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            learned_sinks is not None and learned_sinks.requires_grad)):
        return _HopperAttention.apply(q, k, v, learned_sinks, q_start, q_len, k_start, k_len, max_q, max_k,
                                      bool(covered[0]), bool(covered[1]), params)
    out, _ = forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params, q_covered=bool(covered[0]),
                     with_lse=False, learned_sinks=learned_sinks)
    return out


def forward_with_lse(q, k, v, q_start, q_len, max_q, k_start, k_len, params, covered=False, learned_sinks=None):
    """(out, lse) of the Hopper forward (for tests and comparisons with the Triton forward)."""
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    return forward(q, k, v, q_start, q_len, max(int(max_q), 1), k_start, k_len, params, q_covered=covered,
                   with_lse=True, learned_sinks=learned_sinks)


def kept_mask_probe(q, k, v, q_start, q_len, max_q, k_start, k_len, params, keys: int):
    """Run the mask-probe build: ``(scores, kept)`` of shape ``[Hq, T, keys]``: the raw
    scores q·k the kernel computed (NaN on tiles it never visited) and the entries its
    softmax kept (False where not visited). Compare ``kept`` with ``semantics.kept_mask`` of
    the same scores, sequence by sequence."""
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    hq, total = q.shape[1], q.shape[0]
    scores = torch.full((hq, total, keys), float("nan"), dtype=torch.float32, device=q.device)
    kept = torch.zeros((hq, total, keys), dtype=torch.uint8, device=q.device)
    forward(q, k, v, q_start, q_len, max(int(max_q), 1), k_start, k_len, params, q_covered=False, with_lse=True,
            probe=(scores, kept))
    return scores, kept.bool()
