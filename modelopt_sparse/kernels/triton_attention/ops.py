"""The entry point: ``triton_attention``, the torch.library custom ops that compiled callers
reach, and the autograd.Function of the eager path.

The custom ops are registered when this module is imported (once: Python imports it once).
"""

from __future__ import annotations

import dataclasses

import torch

from ..api import interpreting
from ..reference import SparseParams
from .launch import (_backward_launch, _forward_launch, _launch_backward, _launch_forward, _reduce_row_stats,
                     _traced_forward, _unit_stride_rows)


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
    """The gradients of the custom forward op's 22 inputs (compiled callers): q, k, v, then 18
    non-tensors, then the learned sinks (None without them)."""
    q, k, v, out, lse, q_start, q_len, k_start, k_len, learned_sinks = ctx.saved_tensors
    dq, dk, dv, d_sinks = launch_backward(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len,
                                          *ctx.scalars, learned_sinks)
    return (dq, dk, dv) + (None,) * 18 + ((d_sinks if learned_sinks is not None else None),)


_forward_op.register_autograd(
    lambda ctx, grad_out, _grad_lse, _grad_stats: _gradients(ctx, grad_out, _backward_op),
    setup_context=_setup_context,
)


class _EagerAttention(torch.autograd.Function):
    """The eager path: the same launches as the custom ops, without their wrapper.

    Called as ``(q, k, v, learned_sinks, call)`` with everything else in one tuple ``call =
    (q_start, q_len, k_start, k_len, (max_q, max_k, q_covered, k_covered, with_stats,
    params))``: every argument of ``apply`` costs host time (the custom ops' 22 did, and the
    three outputs and their zero gradients too). The output is ``out``, or ``(out,
    row_stats)`` with statistics; the lse is saved for the backward, not returned."""

    @staticmethod
    def forward(ctx, q, k, v, learned_sinks, call):
        q_start, q_len, k_start, k_len, scalars = call
        max_q, max_k, q_covered, _k_covered, with_stats, params = scalars
        out, lse, row_stats = _forward_launch(q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, q_covered,
                                              with_stats, params, True, learned_sinks)
        ctx.save_for_backward(q, k, v, out, lse, q_start, q_len, k_start, k_len, learned_sinks)
        ctx.scalars = scalars
        if row_stats is None:
            return out
        ctx.mark_non_differentiable(row_stats)
        return out, row_stats

    @staticmethod
    def backward(ctx, grad_out, *_grad_stats):
        q, k, v, out, lse, q_start, q_len, k_start, k_len, learned_sinks = ctx.saved_tensors
        max_q, max_k, q_covered, k_covered, _with_stats, params = ctx.scalars
        with torch.no_grad():
            dq, dk, dv, d_sinks = _backward_launch(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len,
                                                   max_q, max_k, q_covered, k_covered, params, learned_sinks)
        if learned_sinks is None:
            d_sinks = None
        if torch.is_grad_enabled():  # create_graph=True
            dq, dk, dv = _NoSecondDerivative.apply(dq, dk, dv, q, k, v, grad_out)
            if d_sinks is not None:
                d_sinks = _NoSecondDerivativeOfSinks.apply(d_sinks, learned_sinks, grad_out)
        return dq, dk, dv, d_sinks, None


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


# What Function.apply (Python) does for a Function without setup_context while no functorch
# transform is active: unwrap dead functorch wrappers among the tensor arguments, then call
# the C half. The eager path does that itself for q, k, v and the sinks (~2 us less per call
# on the CPU harness, tools/host_cost_cpu.py; the int32 metadata need no unwrapping: nothing
# differentiates through them); with a transform active it calls Function.apply, which raises
# torch's message as before. A torch without these internals gets Function.apply.
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_c_apply = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_eager_apply = (_c_apply.__get__(_EagerAttention, _EagerAttention)
                if _c_apply is not None and _unwrap_if_dead is not None and _functorch_active is not None else None)


_PLAIN_PARAMS: dict = {}
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SparseParams))


def _plain_params(p):
    """``p`` with every field of its exact type (bool, float, int, str), as the custom ops'
    scalar arguments rebuild it: ``p`` itself when it is already (SparseParams made by
    :func:`modelopt_sparse.kernels.attention` are), remembered per object."""
    hit = _PLAIN_PARAMS.get(id(p))
    if hit is not None and hit[0] is p:
        return hit[1]
    plain = SparseParams(bool(p.is_causal), float(p.softmax_scale), int(p.sparsity_n), int(p.sparsity_m),
                         int(p.num_sink_tokens), int(p.dense_window_size), str(p.tie_break), int(p.sliding_window),
                         float(p.softcap))
    if type(p) is SparseParams and all(type(getattr(plain, f)) is type(getattr(p, f)) for f in _FIELD_NAMES):
        plain = p
    if len(_PLAIN_PARAMS) < 4096:
        _PLAIN_PARAMS[id(p)] = (p, plain)  # p held: its id is not reused while remembered
    return plain


def triton_attention(q, k, v, q_start, q_len, max_q, k_start, k_len, max_k, params, stats=None,
                     covered=(False, False), learned_sinks=None):
    """Launch the fused kernels; inputs are validated by :func:`modelopt_sparse.kernels.attention`.

    ``covered``: whether the sequences cover every packed query / key row; rows outside
    every sequence read as 0 in the output and gradients, which then needs a zero fill."""
    p = params
    if torch.compiler.is_compiling():
        out, _lse, row_stats = _forward_op(
            q, k, v, q_start, q_len, k_start, k_len, max(int(max_q), 1), max(int(max_k), 1),
            bool(covered[0]), bool(covered[1]), stats is not None,
            bool(p.is_causal), float(p.softmax_scale), int(p.sparsity_n), int(p.sparsity_m),
            int(p.num_sink_tokens), int(p.dense_window_size), str(p.tie_break), int(p.sliding_window),
            float(p.softcap), learned_sinks,
        )
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            learned_sinks is not None and learned_sinks.requires_grad)):
        scalars = (max(int(max_q), 1), max(int(max_k), 1), bool(covered[0]), bool(covered[1]), stats is not None,
                   _plain_params(p))
        if _eager_apply is not None and not _functorch_active():
            u = _unwrap_if_dead  # the differentiable inputs; the int32 metadata are read as they are
            result = _eager_apply(u(q), u(k), u(v), None if learned_sinks is None else u(learned_sinks),
                                  (q_start, q_len, k_start, k_len, scalars))
        else:
            result = _EagerAttention.apply(q, k, v, learned_sinks, (q_start, q_len, k_start, k_len, scalars))
        if stats is None:
            return result
        out, row_stats = result
    else:  # inference: no autograd node to build, and the params object as it is
        out, _lse, row_stats = _forward_launch(
            q, k, v, q_start, q_len, k_start, k_len, max(int(max_q), 1), max(int(max_k), 1),
            bool(covered[0]), stats is not None, p, with_lse=False, learned_sinks=learned_sinks)
    if stats is not None:
        _reduce_row_stats(row_stats, q_start, q_len, stats)
    return out
