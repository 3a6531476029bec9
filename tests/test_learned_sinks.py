"""Learned attention sinks (``learned_sinks=``, GPT-OSS's ``s_aux``; issue 16).

One extra logit per query head in every row's softmax denominator, with no value row, in
the units of the softmax's inputs (not scaled, not capped), outside N:M selection.

* The rule: the reference against an independent float64 formula written here (sink column
  concatenated, softmax, column dropped; autograd for the gradients, which also checks the
  hand-written sink gradient ``-sum_i exp(sink - lse_i) * delta_i``), against transformers'
  GPT-OSS eager attention, and through ``torch.autograd.gradcheck``.
* Teeth: on the very inputs of the equality tests, the plausible mistakes (sink multiplied by
  the softmax scale, sink soft-capped, sink counted once per key tile, sink given a value
  row, sink left out of the normaliser) change the result by far more than the tolerance.
* Bad input: clear errors before any kernel runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from modelopt_sparse.kernels import attention, kept_mask

from .helpers import rel_err, separated_inputs, varlen

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL64 = 1e-12


# --------------------------------------------------------------------------------------
# An independent statement of the rule
# --------------------------------------------------------------------------------------
def sink_formula(q, k, v, lens_q, lens_k, sinks, *, is_causal=True, softmax_scale=None, sparsity_n=0,
                 sparsity_m=4, num_sink_tokens=0, dense_window_size=64, tie_break="threshold",
                 sliding_window=None, softcap=None, mistake=None, key_tile=64):
    """Packed ``[T, H, D]`` float64 inputs -> ``[T_q, Hq, D]``, written straight from
    docs/semantics.md: per sequence and query head, the kept scores (mask from
    ``semantics.kept_mask``, checked against the loop oracle elsewhere), the head's sink
    logit concatenated as one more column, a softmax over the row, the column dropped, the
    product with V. Rows outside every sequence stay 0.

    ``mistake`` computes a plausible wrong variant instead: ``"scaled"`` (sink multiplied by
    the softmax scale), ``"capped"`` (sink soft-capped), ``"per_tile"`` (one sink term per
    key tile of ``key_tile`` keys the row visits, as if added inside the tile loop),
    ``"value_row"`` (the sink's probability multiplies the first key's value, as if the
    dropped column were kept against V shifted by one), ``"not_in_sum"`` (the sink only
    raises the running maximum, its term missing from the normaliser)."""
    hq, hkv = q.shape[1], k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    out = torch.zeros(q.shape[0], hq, v.shape[-1], dtype=torch.float64)
    rows_q, rows_k = 0, 0
    for lq, lk in zip(lens_q, lens_k):
        for h in range(hq):
            qh = q[rows_q:rows_q + lq, h].double()
            kh = k[rows_k:rows_k + lk, h // (hq // hkv)].double()
            vh = v[rows_k:rows_k + lk, h // (hq // hkv)].double()
            qk = qh @ kh.T
            keep = kept_mask(qk.detach(), lq, lk, is_causal=is_causal, sparsity_n=sparsity_n, sparsity_m=sparsity_m,
                             num_sink_tokens=num_sink_tokens, dense_window_size=dense_window_size,
                             tie_break=tie_break, sliding_window=sliding_window)
            s = qk * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~keep, -math.inf)
            sink = sinks[h].double()
            if mistake == "scaled":
                sink = sink * scale
            elif mistake == "capped":
                sink = softcap * torch.tanh(sink / softcap)
            column = sink.expand(lq, 1)
            if mistake == "per_tile":
                # Key tiles a row sees: up to and including its own position when causal.
                last = (torch.arange(lq) + (lk - lq)) if is_causal else torch.full((lq,), lk - 1)
                tiles = (last.clamp(min=0) // key_tile + 1).double()
                column = sink + torch.log(tiles)[:, None]  # exp(column) = tiles * exp(sink)
            p = torch.softmax(torch.cat([s, column], 1), 1)
            if mistake == "not_in_sum":
                e = torch.exp(s - torch.maximum(s.amax(1, keepdim=True), sink))
                p = torch.cat([e / e.sum(1, keepdim=True).clamp_min(1e-300), p[:, -1:]], 1)
            o = p[:, :-1] @ vh
            if mistake == "value_row":
                o = o + p[:, -1:] * vh[:1]
            out = out.index_put((torch.arange(rows_q, rows_q + lq), torch.full((lq,), h)), o)
        rows_q += lq
        rows_k += lk
    return out


def _packed_call(xs, lens_q, lens_k, sinks, backend, *, starts_q=None, **kw):
    sq, lq, mq, _ = varlen(lens_q, DEVICE)
    sk, lk, mk, _ = varlen(lens_k, DEVICE)
    if starts_q is not None:
        sq = torch.tensor(starts_q, dtype=torch.int32, device=DEVICE)
    return attention(*xs, sq, lq, mq, b_start_loc_k=sk, b_seq_len_k=lk, max_input_len_k=mk, backend=backend,
                     learned_sinks=sinks, **kw)


def _sinks(hq, seed=0, low=1.0, high=5.0):
    """Sink logits of the size of log(number of keys): each takes a real share of the row."""
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(hq, generator=g, dtype=torch.float64))


# --------------------------------------------------------------------------------------
# The rule: reference against the formula, autograd, gradcheck, transformers
# --------------------------------------------------------------------------------------
REFERENCE_CASES = {
    # name: (lens_q, lens_k, hq, hkv, kwargs)
    "dense_causal_gqa": ([30, 7], [30, 7], 4, 2, dict(sparsity_n=0)),
    "2of4_sinks_window_varlen": ([45, 20, 1], [45, 20, 33], 4, 2,
                                 dict(sparsity_n=2, sparsity_m=4, num_sink_tokens=2, dense_window_size=3)),
    "3of8_noncausal_mqa": ([25, 12], [25, 40], 3, 1,
                           dict(is_causal=False, sparsity_n=3, sparsity_m=8, dense_window_size=0,
                                tie_break="index")),
    "sliding_window_softcap": ([40, 9], [50, 9], 4, 2,
                               dict(sparsity_n=2, sparsity_m=4, dense_window_size=2, sliding_window=11, softcap=0.7,
                                    softmax_scale=0.9)),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_equals_the_formula_forward_and_gradients(case):
    """Forward and the gradients of q, k, v and the sinks (the reference's hand-written
    backward against autograd of the formula), N:M patterns, sink tokens, dense and sliding
    windows, soft-cap, GQA/MQA, varlen, chunked prefill, decode rows, causal and not."""
    lens_q, lens_k, hq, hkv, kw = REFERENCE_CASES[case]
    m = kw.get("sparsity_m", 4)
    inputs = separated_inputs(lens_q, lens_k, hq, hkv, 16, m, torch.float64, seed=len(case))
    xs = [t.clone().requires_grad_() for t in inputs]
    sinks = _sinks(hq, seed=len(case)).requires_grad_()
    got = _packed_call(xs, lens_q, lens_k, sinks, "torch", **kw)
    want = sink_formula(*xs, lens_q, lens_k, sinks, **kw)
    assert rel_err(got, want) < TOL64
    do = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_got = torch.autograd.grad(got, xs + [sinks], do)
    g_want = torch.autograd.grad(want, xs + [sinks], do)
    for name, a, b in zip(("dq", "dk", "dv", "d_sinks"), g_got, g_want):
        assert rel_err(a, b) < TOL64, name
    assert g_got[3].dtype == sinks.dtype and g_got[3].shape == sinks.shape


@pytest.mark.parametrize("mistake", ["scaled", "capped", "per_tile", "value_row", "not_in_sum"])
def test_plausible_mistakes_change_the_result(mistake):
    """Teeth of the kernel tests below: on their inputs, every plausible mistake moves the
    output by far more than their tolerance (and the sink gradient too, where the mistake
    is in the sink's own term). The soft-cap case needs a cap, the per-tile case keys that
    span several tiles."""
    lens = [150, 40]
    inputs = separated_inputs(lens, lens, 4, 2, 16, 4, torch.float64, seed=3)
    sinks = _sinks(4, seed=3)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=3, softcap=0.8 if mistake == "capped" else None)
    right = sink_formula(*inputs, lens, lens, sinks, **kw)
    wrong = sink_formula(*inputs, lens, lens, sinks, mistake=mistake, **kw)
    assert rel_err(wrong, right) > 1e-2  # the fp32 kernel tolerance is 2e-5


def test_sink_gradient_formula_by_hand():
    """d sink_h = -sum_i exp(sink_h - lse_i) * (dO_i . O_i): derived by hand, checked
    against autograd of the formula in float64 (with rows that see no key, where the sink
    takes the whole row)."""
    lens_q, lens_k = [12, 5], [8, 5]  # causal with q_len > kv_len: the first 4 rows see nothing
    inputs = separated_inputs(lens_q, lens_k, 2, 1, 16, 4, torch.float64, seed=7)
    sinks = _sinks(2, seed=7).requires_grad_()
    out = sink_formula(*inputs, lens_q, lens_k, sinks, sparsity_n=2)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (want,) = torch.autograd.grad(out, sinks, do)
    # lse of every row, from the formula's pieces, and delta = dO . O.
    q, k, _ = inputs
    delta = (do * out.detach()).sum(-1)
    by_hand = torch.zeros(2, dtype=torch.float64)
    rows_q = rows_k = 0
    for lq, lk in zip(lens_q, lens_k):
        for h in range(2):
            qk = q[rows_q:rows_q + lq, h] @ k[rows_k:rows_k + lk, 0].T
            keep = kept_mask(qk, lq, lk, is_causal=True, sparsity_n=2, sparsity_m=4, num_sink_tokens=0,
                             dense_window_size=64, tie_break="threshold")
            s = (qk / 4).masked_fill(~keep, -math.inf)
            lse = torch.logsumexp(torch.cat([s, sinks[h].detach().expand(lq, 1)], 1), 1)
            by_hand[h] -= (torch.exp(sinks[h].detach() - lse) * delta[rows_q:rows_q + lq, h]).sum()
        rows_q += lq
        rows_k += lk
    assert rel_err(by_hand, want) < TOL64
    sq, lq_t, mq, _ = varlen(lens_q)
    sk, lk_t, mk, _ = varlen(lens_k)
    got = attention(*inputs, sq, lq_t, mq, b_start_loc_k=sk, b_seq_len_k=lk_t, max_input_len_k=mk, sparsity_n=2,
                    learned_sinks=sinks, backend="torch")
    assert torch.equal(got[:4], torch.zeros_like(got[:4]))  # rows without a key: 0, not NaN
    (ref,) = torch.autograd.grad(got, sinks, do)
    assert rel_err(ref, want) < TOL64


def test_reference_gradcheck():
    """torch.autograd.gradcheck of the reference (its hand-written backward) in float64,
    sparse, GQA, a sliding window and a soft cap, every input including the sinks."""
    lens = [7, 4]
    inputs = separated_inputs(lens, lens, 2, 1, 16, 4, torch.float64, seed=5)
    sq, lq, mq, _ = varlen(lens)
    xs = [t.clone().requires_grad_() for t in inputs] + [_sinks(2, seed=5).requires_grad_()]

    def fn(q, k, v, sinks):
        return attention(q, k, v, sq, lq, mq, sparsity_n=2, sparsity_m=4, dense_window_size=1, sliding_window=6,
                         softcap=1.5, softmax_scale=0.7, learned_sinks=sinks, backend="torch")

    assert torch.autograd.gradcheck(fn, xs)


def test_matches_gpt_oss_eager_attention():
    """transformers' GPT-OSS eager attention (models/gpt_oss/modeling_gpt_oss.py,
    ``eager_attention_forward``): scores scaled, mask added, ``module.sinks`` concatenated as
    a last column, softmax, column dropped. Dense, causal, GQA; gradients too."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    g = torch.Generator().manual_seed(11)
    s, hq, hkv, d, scale = 20, 4, 2, 16, 0.35
    q, k, v = (torch.randn(1, h, s, d, generator=g, dtype=torch.float64).requires_grad_() for h in (hq, hkv, hkv))
    module = torch.nn.Module()
    module.num_key_value_groups = hq // hkv
    module.sinks = torch.nn.Parameter(torch.randn(hq, generator=g, dtype=torch.float64) + 2)
    module.eval()
    mask = torch.zeros(s, s, dtype=torch.float64).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), -math.inf)
    want, _ = eager_attention_forward(module, q, k, v, mask[None, None], scaling=scale)
    lens = torch.tensor([s], dtype=torch.int32)
    got = attention(*(t[0].transpose(0, 1) for t in (q, k, v)), torch.zeros(1, dtype=torch.int32), lens, s,
                    softmax_scale=scale, sparsity_n=0, learned_sinks=module.sinks, backend="torch")
    assert rel_err(got, want[0]) < TOL64
    do = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_want = torch.autograd.grad(want, (q, k, v, module.sinks), do)
    g_got = torch.autograd.grad(got, (q, k, v, module.sinks), do[0])
    assert max(rel_err(a, b) for a, b in zip(g_got, g_want)) < TOL64


def test_padded_rows_and_rows_without_keys():
    """Packed rows outside every sequence stay 0 with no gradient; rows that see no key
    (causal, more queries than keys) are 0, never NaN; their sink takes the whole row, so
    they pass no gradient to anything either (delta = dO . 0 = 0)."""
    inputs = separated_inputs([6, 9], [3, 9], 2, 2, 16, 4, torch.float64, seed=2)
    q = torch.cat([inputs[0][:6], torch.full((3, 2, 16), float("nan")), inputs[0][6:]])  # 3 unused rows
    xs = [t.clone().requires_grad_() for t in (q, inputs[1], inputs[2])]
    sinks = _sinks(2).requires_grad_()
    out = _packed_call(xs, [6, 9], [3, 9], sinks, "torch", starts_q=[0, 9], sparsity_n=2, dense_window_size=0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and torch.equal(out[6:9], torch.zeros_like(out[6:9]))
    grads = torch.autograd.grad(out.square().sum(), xs + [sinks])
    assert all(torch.isfinite(g).all() for g in grads)
    want = sink_formula(inputs[0], *xs[1:], [6, 9], [3, 9], sinks, sparsity_n=2, dense_window_size=0)
    assert rel_err(torch.cat([out[:6], out[9:]]), want) < TOL64


def test_minus_inf_sink_is_no_sink_and_other_dtypes():
    """A sink of -inf takes nothing (the result of no sink, gradient 0); sinks in another
    float dtype than q are used in the compute dtype and get their gradient in their own."""
    lens = [20]
    inputs = separated_inputs(lens, lens, 2, 1, 16, 4, torch.float64, seed=9)
    kw = dict(sparsity_n=2, dense_window_size=2)
    plain = _packed_call(inputs, lens, lens, None, "torch", **kw)
    sinks = torch.tensor([-math.inf, -math.inf], dtype=torch.float64, requires_grad=True)
    out = _packed_call(inputs, lens, lens, sinks, "torch", **kw)
    assert torch.equal(out, plain)
    (grad,) = torch.autograd.grad(out.sum(), sinks)
    assert torch.equal(grad, torch.zeros_like(grad))
    q, k, v = (t.float() for t in inputs)
    half = torch.tensor([2.0, 3.0], dtype=torch.bfloat16, requires_grad=True)
    out = _packed_call((q, k, v), lens, lens, half, "torch", **kw)
    (grad,) = torch.autograd.grad(out.sum(), half)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert rel_err(out, sink_formula(*inputs, lens, lens, half.double(), **kw)) < 1e-6


def test_statistics_count_the_sink_in_the_dense_mass():
    """Dense attention with sinks drops exactly 0; sparse, the dropped mass is the dense
    softmax's probability (sink in the denominator) of the dropped keys, summed over the
    rows that see a key; the sink is counted in neither ``allowed`` nor ``kept``."""
    lens_q, lens_k = [10, 30], [6, 30]  # 4 rows of the first sequence see no key
    inputs = separated_inputs(lens_q, lens_k, 2, 1, 16, 4, torch.float64, seed=4)
    sinks = _sinks(2, seed=4)
    _, dense = _packed_call(inputs, lens_q, lens_k, sinks, "torch", sparsity_n=0, return_stats=True)
    _, plain = _packed_call(inputs, lens_q, lens_k, None, "torch", sparsity_n=0, return_stats=True)
    assert torch.equal(dense["dropped_mass"], torch.zeros(2, dtype=torch.float64))
    for key in ("allowed", "kept", "rows"):
        assert torch.equal(dense[key], plain[key]), key
    kw = dict(sparsity_n=1, sparsity_m=4, dense_window_size=0)
    _, sparse = _packed_call(inputs, lens_q, lens_k, sinks, "torch", return_stats=True, **kw)
    q, k, _ = inputs
    want = torch.zeros(2, dtype=torch.float64)
    rows_q = rows_k = 0
    for lq, lk in zip(lens_q, lens_k):
        for h in range(2):
            qk = q[rows_q:rows_q + lq, h] @ k[rows_k:rows_k + lk, 0].T
            allowed = kept_mask(qk, lq, lk, is_causal=True, sparsity_n=0, sparsity_m=4, num_sink_tokens=0,
                                dense_window_size=0, tie_break="threshold")
            kept = kept_mask(qk, lq, lk, is_causal=True, num_sink_tokens=0, tie_break="threshold", **kw)
            s = torch.cat([(qk / 4).masked_fill(~allowed, -math.inf), sinks[h].expand(lq, 1)], 1)
            p_dense = torch.softmax(s, 1)[:, :-1]
            want[h] += (p_dense * (allowed & ~kept)).sum()
        rows_q += lq
        rows_k += lk
    assert rel_err(sparse["dropped_mass"], want) < TOL64
    assert torch.equal(sparse["rows"], plain["rows"]) and (sparse["kept"] < sparse["allowed"]).all()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sinks,error,match", [
    (torch.zeros(5), ValueError, r"learned_sinks must have shape \[4\]"),
    (torch.zeros(1, 4), ValueError, r"learned_sinks must have shape \[4\]"),
    (torch.tensor(1.0), ValueError, r"learned_sinks must have shape \[4\]"),
    (torch.zeros(4, dtype=torch.int32), TypeError, "learned_sinks must be float16, bfloat16, float32 or float64"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "learned_sinks must be float16, bfloat16, float32 or float64"),
    (torch.zeros(4, device="meta"), ValueError, "learned_sinks is on meta but q is on cpu"),
    ([0.0, 0.0, 0.0, 0.0], TypeError, "learned_sinks must be a tensor of shape"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_learned_sinks_are_refused(sinks, error, match, backend):
    if backend == "triton" and not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET")):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    q = torch.zeros(6, 4, 16)
    k = torch.zeros(6, 2, 16)
    lens = torch.tensor([6], dtype=torch.int32)
    with pytest.raises(error, match=match):
        attention(q, k, k, torch.zeros(1, dtype=torch.int32), lens, 6, learned_sinks=sinks, backend=backend)
