"""The Hopper engine under ``torch.compile``: one torch.library custom op for the forward.

Dynamo cannot trace the engine's launch (nvcc at first use, the driver API through ctypes), so a
compiled graph calls it as one opaque op, ``modelopt_sparse::hopper_attention_forward``, with a
fake implementation that gives the outputs' shapes (``out`` as ``q``, contiguous; the log2-domain
``lse`` fp32 ``[T, Hq]``). Its gradient is the Triton backward's custom op on the kernel's output
and lse (learned sinks included), as in eager mode. Registered when this module is imported (the
package imports it).

Under CUDA graphs (``mode="reduce-overhead"``) the first, uncaptured run compiles and loads the
variant; the captured launch then records the kernel with its parameter block and tensor maps by
value, and reads nothing from the device on the host (the barrier-timeout check of
``MODELOPT_SPARSE_HOPPER_CHECK=1`` does, and is for eager tests only).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import SparseParams
from .engine import _aligned_rows, forward


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
    max_q: int, max_k: int, q_covered: bool, k_covered: bool,
    is_causal: bool, softmax_scale: float, sparsity_n: int, sparsity_m: int,
    num_sink_tokens: int, dense_window_size: int, tie_break: str, sliding_window: int, softcap: float,
    learned_sinks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the kernel; the arguments of the Triton backward op, minus its first."""
    params = SparseParams(is_causal, softmax_scale, sparsity_n, sparsity_m, num_sink_tokens, dense_window_size,
                          tie_break, sliding_window, softcap)
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    return forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params, q_covered=q_covered, with_lse=True,
                   learned_sinks=learned_sinks)


_forward_op = torch.library.custom_op("modelopt_sparse::hopper_attention_forward", mutates_args=())(_launch)


@_forward_op.register_fake
def _(q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered, *params):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, q_start, q_len, k_start, k_len, *scalars, learned_sinks = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, q_start, q_len, k_start, k_len, learned_sinks)
    ctx.scalars = tuple(scalars)  # max_q, max_k, q_covered, k_covered and the nine SparseParams fields


def _backward(ctx, grad_out, _grad_lse):
    from ..triton_attention.ops import _backward_op  # Triton only when a compiled graph is differentiated

    q, k, v, out, lse, q_start, q_len, k_start, k_len, learned_sinks = ctx.saved_tensors
    dq, dk, dv, d_sinks = _backward_op(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len, *ctx.scalars,
                                       learned_sinks)
    return (dq, dk, dv) + (None,) * (4 + len(ctx.scalars)) + (d_sinks if learned_sinks is not None else None,)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def traced_attention(q, k, v, q_start, q_len, max_q, k_start, k_len, max_k, params, covered=(False, False),
                     learned_sinks=None):
    """:func:`~.engine.hopper_attention` as a compiled graph calls it: the custom op, whose
    autograd formula is the Triton backward."""
    p = params
    out, _lse = _forward_op(q, k, v, q_start, q_len, k_start, k_len, max(int(max_q), 1), max(int(max_k), 1),
                            bool(covered[0]), bool(covered[1]),
                            bool(p.is_causal), float(p.softmax_scale), int(p.sparsity_n), int(p.sparsity_m),
                            int(p.num_sink_tokens), int(p.dense_window_size), str(p.tie_break),
                            int(p.sliding_window), float(p.softcap), learned_sinks)
    return out
