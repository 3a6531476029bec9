"""Pure-PyTorch N:M sparse attention on varlen packed sequences.

This is the CPU backend and the ground truth the Triton kernels are tested against. It
computes exactly what the kernels compute: the same mask (:func:`semantics.kept_mask`), the
same log-sum-exp, the same gradient with the mask held fixed. Memory stays bounded: each
sequence is processed in chunks of query rows, and the backward recomputes the scores
chunk by chunk, so no ``S x S`` tensor of a long sequence ever exists at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .semantics import capped_scores, kept_mask

# Bytes of one score chunk ([heads, rows, kv_len] in the compute dtype).
_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Segment:
    """One packed sequence: where its queries and keys start, and how many there are."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int


@dataclass(frozen=True)
class SparseParams:
    is_causal: bool
    softmax_scale: float
    sparsity_n: int
    sparsity_m: int
    num_sink_tokens: int
    dense_window_size: int
    tie_break: str
    # 0 = off (the public API's None). Last and defaulted, so existing positional
    # constructions keep their meaning.
    sliding_window: int = 0
    softcap: float = 0.0

    def scores(self, qk: torch.Tensor) -> torch.Tensor:
        """Softmax inputs of raw dot products: scaled, then soft-capped (-inf stays -inf)."""
        return capped_scores(qk * self.softmax_scale, self.softcap)

    def mask(self, qk: torch.Tensor, seg: Segment, row_offset: int) -> torch.Tensor:
        return kept_mask(
            qk,
            seg.q_len,
            seg.k_len,
            is_causal=self.is_causal,
            sparsity_n=self.sparsity_n,
            sparsity_m=self.sparsity_m,
            num_sink_tokens=self.num_sink_tokens,
            dense_window_size=self.dense_window_size,
            tie_break=self.tie_break,
            row_offset=row_offset,
            sliding_window=self.sliding_window,
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(seg: Segment, heads: int, elem_bytes: int):
    rows = max(1, _CHUNK_BYTES // max(1, heads * max(seg.k_len, 1) * elem_bytes))
    for r0 in range(0, seg.q_len, rows):
        yield r0, min(seg.q_len, r0 + rows)


def _heads_view(x: torch.Tensor, start: int, length: int, groups: int) -> torch.Tensor:
    """[tokens, H, D] slice -> [H_kv, groups, tokens, D] (for K/V groups == 1)."""
    x = x[start : start + length].transpose(0, 1)
    return x.unflatten(0, (-1, groups))


def _chunk_probs(q_c, k_b, seg, r0, p: SparseParams, lse=None):
    """Scores of one chunk; returns (masked softmax inputs, kept mask, raw dot products)."""
    qk = torch.einsum("hgid,hjd->hgij", q_c, k_b[:, 0])
    keep = p.mask(qk, seg, r0)
    s = torch.where(keep, p.scores(qk), float("-inf"))
    return s, keep, qk


def _sinks_by_head(learned_sinks, hkv: int, groups: int, cdt):
    """The per-query-head sink logits as ``[Hkv, groups]`` (query head ``h`` is
    ``[h // groups, h % groups]``, as in :func:`_heads_view`), or None."""
    if learned_sinks is None:
        return None
    return learned_sinks.to(cdt).view(hkv, groups)


def _with_sink_column(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """``s`` ``[Hkv, groups, rows, keys]`` with the learned sink logit of each query head
    appended as one more column (``sinks``: ``[Hkv, groups]``; None: ``s`` unchanged)."""
    if sinks is None:
        return s
    return torch.cat([s, sinks[:, :, None, None].expand(*s.shape[:-1], 1)], -1)


def sink_softmax(s: torch.Tensor, sinks: torch.Tensor | None):
    """The softmax of one chunk of masked scores ``s`` ``[Hkv, groups, rows, keys]`` (-inf
    where not kept) over its keys and, when ``sinks`` (``[Hkv, groups]``) is given, one
    extra logit per query head: the learned sink, a column concatenated after the keys,
    exactly as transformers' GPT-OSS eager attention does.

    Returns ``(e, z, shift)``: the unnormalised key weights ``exp(s - shift)`` (the sink
    column dropped again: it has no value row), the normaliser ``z`` ``[..., rows, 1]``
    (the sink's term included) and the shift (the row maximum, sink included). The
    natural-log log-sum-exp is ``shift + log(z)``. A row with nothing in its softmax (no
    kept key and no sink) has ``z = 0``, weights 0 and log-sum-exp -inf, never NaN."""
    full = _with_sink_column(s, sinks)
    row_max = full.amax(-1, keepdim=True)
    # A row with nothing kept has max -inf; shift by 0 there so exp gives 0, not NaN.
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(full - shift)
    z = e.sum(-1, keepdim=True)
    if sinks is not None:
        e = e[..., :-1]
    return e, z, shift


def _without_autocast(step):
    """The reference computes in its own dtype (float32 or float64): an autocast region
    around the call (or around ``backward()``) must not turn its matmuls into bf16. The
    inputs are already in the autocast dtype (attention() casts them, as SDPA does)."""
    @functools.wraps(step)
    def run(ctx, first, *args):
        device_type = first.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return step(ctx, first, *args)
        return step(ctx, first, *args)
    return run


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    @_without_autocast
    def forward(ctx, q, k, v, segments, params: SparseParams, stats, learned_sinks):
        cdt = _compute_dtype(q.dtype)
        hq, hkv = q.shape[1], k.shape[1]
        groups = hq // hkv
        qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
        sinks = _sinks_by_head(learned_sinks, hkv, groups, cdt)
        out = torch.zeros(q.shape, dtype=cdt, device=q.device)
        lse = torch.full((q.shape[0], hq), float("-inf"), dtype=cdt, device=q.device)
        for seg in segments:
            k_b = _heads_view(kc, seg.k_start, seg.k_len, 1)
            v_b = _heads_view(vc, seg.k_start, seg.k_len, 1)
            q_b = _heads_view(qc, seg.q_start, seg.q_len, groups)
            for r0, r1 in _row_chunks(seg, hq, qc.element_size()):
                s, keep, _ = _chunk_probs(q_b[:, :, r0:r1], k_b, seg, r0, params)
                e, z, shift = sink_softmax(s, sinks)
                o = torch.einsum("hgij,hjd->hgid", e, v_b[:, 0]) / torch.where(z > 0, z, 1)
                rows = slice(seg.q_start + r0, seg.q_start + r1)
                out[rows] = o.flatten(0, 1).transpose(0, 1)
                lse[rows] = (shift + torch.log(z)).squeeze(-1).flatten(0, 1).transpose(0, 1)
                if stats is not None:
                    _accumulate_stats(stats, q_b[:, :, r0:r1], k_b, seg, r0, params, keep, z, shift, sinks)
        ctx.save_for_backward(q, k, v, out, lse, learned_sinks)
        ctx.segments, ctx.params = segments, params
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, learned_sinks = ctx.saved_tensors
        params: SparseParams = ctx.params
        cdt = _compute_dtype(q.dtype)
        hq, hkv = q.shape[1], k.shape[1]
        groups = hq // hkv
        qc, kc, vc, do = q.to(cdt), k.to(cdt), v.to(cdt), grad_out.to(cdt)
        dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
        sinks = _sinks_by_head(learned_sinks, hkv, groups, cdt)
        d_sinks = None if sinks is None else torch.zeros_like(sinks)
        delta = (out * do).sum(-1)  # [tokens, Hq]
        for seg in ctx.segments:
            k_b = _heads_view(kc, seg.k_start, seg.k_len, 1)
            v_b = _heads_view(vc, seg.k_start, seg.k_len, 1)
            q_b = _heads_view(qc, seg.q_start, seg.q_len, groups)
            do_b = _heads_view(do, seg.q_start, seg.q_len, groups)
            lse_b = lse[seg.q_start : seg.q_start + seg.q_len].T.unflatten(0, (-1, groups))
            dl_b = delta[seg.q_start : seg.q_start + seg.q_len].T.unflatten(0, (-1, groups))
            if sinks is not None:
                d_sinks -= _sink_probability(sinks, lse_b).mul(dl_b).sum(-1)
            dk_b = torch.zeros_like(k_b[:, 0])
            dv_b = torch.zeros_like(v_b[:, 0])
            for r0, r1 in _row_chunks(seg, hq, qc.element_size()):
                s, _, qk = _chunk_probs(q_b[:, :, r0:r1], k_b, seg, r0, params)
                row_lse = lse_b[:, :, r0:r1, None]
                row_lse = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
                p = torch.exp(s - row_lse)
                do_c = do_b[:, :, r0:r1]
                dv_b += torch.einsum("hgij,hgid->hjd", p, do_c)
                dp = torch.einsum("hgid,hjd->hgij", do_c, v_b[:, 0])
                ds = p * (dp - dl_b[:, :, r0:r1, None]) * params.softmax_scale
                if params.softcap:
                    # d/dx [c tanh(x / c)] = 1 - tanh(x / c)^2, x the scaled score.
                    ds = ds * (1 - torch.tanh(qk * (params.softmax_scale / params.softcap)) ** 2)
                dq_c = torch.einsum("hgij,hjd->hgid", ds, k_b[:, 0])
                dq[seg.q_start + r0 : seg.q_start + r1] = dq_c.flatten(0, 1).transpose(0, 1)
                dk_b += torch.einsum("hgij,hgid->hjd", ds, q_b[:, :, r0:r1])
            dk[seg.k_start : seg.k_start + seg.k_len] = dk_b.transpose(0, 1)
            dv[seg.k_start : seg.k_start + seg.k_len] = dv_b.transpose(0, 1)
        d_learned_sinks = None if d_sinks is None else d_sinks.flatten().to(learned_sinks.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, d_learned_sinks


def _sink_probability(sinks, lse):
    """The softmax probability of the learned sink in rows with log-sum-exp ``lse``
    ``[Hkv, groups, rows]``: ``exp(sink - lse)``. Its gradient is
    ``d sink_h = -sum_i exp(sink_h - lse_i) * delta_i`` with ``delta_i = dO_i . O_i`` (the
    sink column's softmax gradient; it has no value row, so no ``dO . v`` term). A row whose
    softmax holds nothing (sink -inf and no kept key: lse -inf) contributes 0."""
    sinks = sinks[:, :, None].expand_as(lse)
    return torch.where(torch.isfinite(lse), torch.exp(sinks - lse), torch.zeros_like(lse))


def _accumulate_stats(stats, q_c, k_b, seg, r0, params: SparseParams, keep, z_kept, shift, sinks):
    """Add one chunk's per-head counts and dropped softmax mass to ``stats`` (dict of [Hq]).

    The dropped mass of a row is the share of its *dense* softmax (every allowed key, and
    the learned sink when there is one) that selection removes: ``1 - Z_kept / Z_allowed``,
    the sink's term in both sums. ``z_kept`` and ``shift`` are the forward's."""
    qk = torch.einsum("hgid,hjd->hgij", q_c, k_b[:, 0])
    allowed = kept_mask(
        qk, seg.q_len, seg.k_len, is_causal=params.is_causal, sparsity_n=0,
        sparsity_m=params.sparsity_m, num_sink_tokens=0, dense_window_size=0,
        tie_break=params.tie_break, row_offset=r0, sliding_window=params.sliding_window,
    )
    # The row max over allowed scores equals the one over kept scores (a group's maximum is
    # always kept), so both partition sums can share the forward's shift; summed the same
    # way, they are bit-equal for dense attention, which then drops exactly 0.
    scores = _with_sink_column(torch.where(allowed, params.scores(qk), float("-inf")), sinks)
    z_allowed = torch.exp(scores - shift).sum(-1)
    z_kept = z_kept.squeeze(-1)
    has_keys = allowed.any(-1)
    dropped = torch.where(has_keys, 1 - z_kept / torch.where(has_keys, z_allowed, 1), 0)
    stats["allowed"] += allowed.sum((-1, -2)).flatten().to(torch.int64)
    stats["kept"] += keep.sum((-1, -2)).flatten().to(torch.int64)
    stats["rows"] += has_keys.sum(-1).flatten().to(torch.int64)
    stats["dropped_mass"] += dropped.sum(-1).flatten().to(torch.float64)


def reference_attention(q, k, v, segments, params: SparseParams, stats=None, learned_sinks=None):
    """Returns (out [total_q, Hq, D] in q's dtype, lse [total_q, Hq] natural-log, compute dtype).

    ``learned_sinks``: None, or ``[Hq]`` logits, one extra softmax term per query head
    (no value row); differentiable, its gradient in its own dtype."""
    return _ReferenceAttention.apply(q, k, v, tuple(segments), params, stats, learned_sinks)


# Under torch.compile the reference runs as one custom op: its loop over sequences needs
# their bounds as host integers, which Dynamo could only get by breaking the graph. Params
# travel as scalars in SparseParams field order, the learned sinks last; the backward
# recomputes through autograd.
def _reference_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
    is_causal: bool, softmax_scale: float, sparsity_n: int, sparsity_m: int,
    num_sink_tokens: int, dense_window_size: int, tie_break: str, sliding_window: int, softcap: float,
    learned_sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    params = SparseParams(is_causal, softmax_scale, sparsity_n, sparsity_m, num_sink_tokens, dense_window_size,
                          tie_break, sliding_window, softcap)
    segments = host_segments(q_start, q_len, k_start, k_len)
    return reference_attention(q, k, v, segments, params, learned_sinks=learned_sinks)[0]


def _reference_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
    is_causal: bool, softmax_scale: float, sparsity_n: int, sparsity_m: int,
    num_sink_tokens: int, dense_window_size: int, tie_break: str, sliding_window: int, softcap: float,
    learned_sinks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d learned_sinks); the last is empty without learned sinks (a custom
    op's outputs are tensors)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        sinks = None if learned_sinks is None else learned_sinks.detach().requires_grad_()
        out = _reference_forward(*leaves, q_start, q_len, k_start, k_len, is_causal, softmax_scale, sparsity_n,
                                 sparsity_m, num_sink_tokens, dense_window_size, tie_break, sliding_window, softcap,
                                 sinks)
        grads = torch.autograd.grad(out, leaves + ([] if sinks is None else [sinks]), grad_out)
    d_sinks = grads[3] if sinks is not None else q.new_empty(0)
    return grads[0], grads[1], grads[2], d_sinks


def host_segments(q_start, q_len, k_start, k_len) -> list[Segment]:
    """The sequences as host integers (one read of the device values, unchecked)."""
    return [Segment(*row) for row in torch.stack((q_start, q_len, k_start, k_len), 1).tolist()]


_forward_op = torch.library.custom_op("modelopt_sparse::reference_attention", mutates_args=())(_reference_forward)
_backward_op = torch.library.custom_op("modelopt_sparse::reference_attention_backward",
                                       mutates_args=())(_reference_backward)


@_forward_op.register_fake
def _(q, k, v, *rest):
    return torch.empty_like(q)


_SCALAR_INPUTS = 9  # the SparseParams fields, after the seven tensors


@_backward_op.register_fake
def _(grad_out, q, k, v, *rest):
    learned_sinks = rest[4 + _SCALAR_INPUTS] if len(rest) > 4 + _SCALAR_INPUTS else None
    d_sinks = q.new_empty(0) if learned_sinks is None else torch.empty_like(learned_sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_sinks


def _setup_context(ctx, inputs, output):
    learned_sinks = inputs[7 + _SCALAR_INPUTS] if len(inputs) > 7 + _SCALAR_INPUTS else None
    ctx.save_for_backward(*inputs[:7], learned_sinks)
    ctx.scalars = inputs[7 : 7 + _SCALAR_INPUTS]


def _backward(ctx, grad_out):
    *tensors, learned_sinks = ctx.saved_tensors
    dq, dk, dv, d_sinks = _backward_op(grad_out, *tensors, *ctx.scalars, learned_sinks)
    return dq, dk, dv, *([None] * (4 + _SCALAR_INPUTS)), (d_sinks if learned_sinks is not None else None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def reference_attention_op(q, k, v, q_start, q_len, k_start, k_len, params: SparseParams, stats=None,
                           learned_sinks=None):
    """:func:`reference_attention`'s output as one custom op (what compiled code calls)."""
    if stats is not None:
        raise NotImplementedError("return_stats=True is not supported under torch.compile on the torch backend")
    return _forward_op(q, k, v, q_start, q_len, k_start, k_len, bool(params.is_causal), float(params.softmax_scale),
                       int(params.sparsity_n), int(params.sparsity_m), int(params.num_sink_tokens),
                       int(params.dense_window_size), str(params.tie_break), int(params.sliding_window),
                       float(params.softcap), learned_sinks)
