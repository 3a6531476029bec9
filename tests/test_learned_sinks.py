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

from modelopt_sparse.kernels import attention, interpreting, kept_mask

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
    device = xs[0].device  # CPU-reference cases run on CPU tensors on a GPU host too
    sq, lq, mq, _ = varlen(lens_q, device)
    sk, lk, mk, _ = varlen(lens_k, device)
    if starts_q is not None:
        sq = torch.tensor(starts_q, dtype=torch.int32, device=device)
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


# --------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU): forward, backward, statistics, decode
# --------------------------------------------------------------------------------------
triton_only = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="needs a GPU or TRITON_INTERPRET=1"
)
TOL32 = 2e-5


def _run(backend, dtype, inputs, lens_q, lens_k, sinks, do, *, grad=True, batched=False, **kw):
    """(out, dq, dk, dv, d sinks) of one backend on copies of the inputs in ``dtype``."""
    xs = [t.detach().to(DEVICE, dtype).requires_grad_(grad) for t in inputs]
    s = sinks.detach().to(DEVICE, dtype).requires_grad_(grad)
    if batched:  # one sequence per batch row, right-padded to the longest
        starts = torch.zeros(len(lens_q), dtype=torch.int32, device=DEVICE)
        lens = torch.tensor(lens_q, dtype=torch.int32, device=DEVICE)
        out = attention(*xs, starts, lens, max(lens_q), backend=backend, learned_sinks=s, **kw)
    else:
        out = _packed_call(xs, lens_q, lens_k, s, backend, **kw)
    grads = torch.autograd.grad(out, xs + [s], do.to(DEVICE, dtype)) if grad else ()
    return (out, *grads)


def _check_triton(inputs, lens_q, lens_k, sinks, *, mistakes=(), grad=True, batched=False, seed=0, **kw):
    """Triton (fp32) against the float64 reference, output and every gradient (the sinks'
    included); ``mistakes``: variants of ``sink_formula`` that must be far from the
    reference on these inputs (so the equality catches them in the kernels)."""
    do = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = _run("triton", torch.float32, inputs, lens_q, lens_k, sinks, do, grad=grad, batched=batched, **kw)
    want = _run("torch", torch.float64, inputs, lens_q, lens_k, sinks, do, grad=grad, batched=batched, **kw)
    assert all(torch.isfinite(t).all() for t in got)
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    assert max(errs) < TOL32, errs
    for mistake in mistakes:
        packed = [t.flatten(0, 1) for t in inputs] if batched else inputs
        wrong = sink_formula(*packed, lens_q if not batched else [inputs[0].shape[1]] * len(lens_q),
                             lens_k if not batched else [inputs[0].shape[1]] * len(lens_q), sinks, mistake=mistake,
                             **kw)
        right = sink_formula(*packed, lens_q if not batched else [inputs[0].shape[1]] * len(lens_q),
                             lens_k if not batched else [inputs[0].shape[1]] * len(lens_q), sinks, **kw)
        assert rel_err(wrong, right) > 100 * TOL32, mistake
    return got, want


@triton_only
def test_triton_sparse_gqa_varlen_decode_row():
    """2:4 with sink tokens and a dense window, GQA, varlen with a sequence of several key
    tiles (the interpreter runs 32x64 tiles) and a one-token sequence (decode row)."""
    lens = [150, 40, 1]
    inputs = separated_inputs(lens, lens, 4, 2, 16, 4, torch.float64, seed=3)
    _check_triton(inputs, lens, lens, _sinks(4, seed=3), sparsity_n=2, sparsity_m=4, num_sink_tokens=2,
                  dense_window_size=3, mistakes=("scaled", "per_tile", "value_row", "not_in_sum"))


@triton_only
def test_triton_window_softcap_chunked_mqa():
    """A sliding window (tiles below it are skipped: the sink must still be counted once),
    a soft cap small against the sinks (a capped sink would be far off), chunked prefill
    after a cached prefix, MQA, 3:8 with the index rule."""
    lens_q, lens_k = [60, 20], [170, 20]
    inputs = separated_inputs(lens_q, lens_k, 3, 1, 32, 8, torch.float64, seed=5)
    _check_triton(inputs, lens_q, lens_k, _sinks(3, seed=5), sparsity_n=3, sparsity_m=8, tie_break="index",
                  dense_window_size=4, sliding_window=70, softcap=0.8, mistakes=("capped", "per_tile"))


@triton_only
def test_triton_noncausal_dense_and_statistics():
    """Dense non-causal attention with sinks; then 2:4 statistics: counts exact, dropped mass
    (sink in both sums, docs/semantics.md) as the reference's, dense exactly 0."""
    lens = [90, 40]
    inputs = separated_inputs(lens, lens, 2, 1, 16, 4, torch.float64, seed=9)
    sinks = _sinks(2, seed=9)
    _check_triton(inputs, lens, lens, sinks, is_causal=False, sparsity_n=0, mistakes=("scaled", "value_row"))
    sq, lq, mq, _ = varlen(lens, DEVICE)
    for n in (0, 2):
        stats = {}
        for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
            q, k, v = (t.to(DEVICE, dtype) for t in inputs)
            _, stats[backend] = attention(q, k, v, sq, lq, mq, is_causal=False, sparsity_n=n, sparsity_m=4,
                                          dense_window_size=0, learned_sinks=sinks.to(DEVICE, dtype),
                                          backend=backend, return_stats=True)
        a, b = stats["triton"], stats["torch"]
        for key in ("allowed", "kept", "rows"):
            assert torch.equal(a[key].cpu(), b[key].cpu()), key
        assert torch.allclose(a["dropped_mass"].cpu(), b["dropped_mass"].cpu(), rtol=1e-5, atol=1e-6)
        if n == 0:
            assert torch.equal(a["dropped_mass"].cpu(), torch.zeros(2, dtype=torch.float64))


@triton_only
def test_triton_padded_rows_rows_without_keys_and_minus_inf_sink():
    """Packed rows outside every sequence (NaN-filled: never read) and rows that see no key
    come out 0 with finite gradients; a -inf sink is no sink (gradient 0)."""
    lens_q, lens_k = [40, 9], [30, 9]  # causal, q_len > kv_len: 10 rows see no key
    inputs = separated_inputs(lens_q, lens_k, 2, 2, 16, 4, torch.float64, seed=2)
    q = torch.cat([inputs[0][:40], torch.full((3, 2, 16), float("nan"), dtype=torch.float64), inputs[0][40:]])
    sinks = torch.tensor([2.5, -math.inf], dtype=torch.float64)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(starts_q=[0, 43], sparsity_n=2, dense_window_size=0)
    got = _run("triton", torch.float32, (q, *inputs[1:]), lens_q, lens_k, sinks, do, **kw)
    want = _run("torch", torch.float64, (q, *inputs[1:]), lens_q, lens_k, sinks, do, **kw)
    out, dq = got[0], got[1]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got[1:])
    assert torch.equal(out[:10].cpu(), torch.zeros(10, 2, 16)) and torch.equal(out[40:43].cpu(), torch.zeros(3, 2, 16))
    assert torch.equal(dq[40:43].cpu(), torch.zeros(3, 2, 16))
    assert got[4][1].item() == 0.0
    assert max(rel_err(a, b) for a, b in zip(got, want)) < TOL32


@triton_only
@pytest.mark.parametrize("grad", ["none", "sinks_only"])
def test_triton_padded_batch(grad):
    """The padded-batch layout [B, S, H, D]: read in place by the inference forward; with
    only the sinks requiring a gradient the call still takes the differentiable path."""
    lens = [100, 37]
    s = max(lens)
    inputs = [t.view(2, s, *t.shape[1:]) for t in separated_inputs([s, s], [s, s], 4, 2, 16, 4, torch.float64,
                                                                   seed=4)]
    sinks = _sinks(4, seed=4)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=2, sliding_window=50)
    if grad == "none":
        _check_triton(inputs, lens, lens, sinks, batched=True, grad=False, **kw)
        return
    sq = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    lq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    results = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        sinks_x = sinks.to(DEVICE, dtype).requires_grad_()
        out = attention(*(t.to(DEVICE, dtype) for t in inputs), sq, lq, s, learned_sinks=sinks_x, backend=backend,
                        **kw)
        # Rows past each sequence's end are padding: weigh only the real ones.
        real = (torch.arange(s, device=DEVICE)[None, :] < lq[:, None]).to(dtype)
        (d_sinks,) = torch.autograd.grad((out.sum((-1, -2)) * real).sum(), sinks_x)
        results.append((out, d_sinks))
    assert rel_err(results[0][0], results[1][0]) < TOL32 and rel_err(results[0][1], results[1][1]) < TOL32


@triton_only
def test_triton_compiled_forward_backward():
    """Under torch.compile (fullgraph; metadata trusted, as compiled callers pass it) the
    forward and backward with sinks run as custom ops: the values and gradients of eager
    calls, Triton and reference backends alike."""
    lens = [70, 20]
    inputs = separated_inputs(lens, lens, 2, 1, 16, 4, torch.float64, seed=8)
    sq, lq, mq, _ = varlen(lens, DEVICE)
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        def step(q, k, v, sinks):
            return attention(q, k, v, sq, lq, mq, sparsity_n=2, dense_window_size=2, softcap=1.0,
                             learned_sinks=sinks, backend=backend, check_metadata=False)

        xs = [t.to(DEVICE, dtype).requires_grad_() for t in inputs] + [_sinks(2, seed=8).to(DEVICE, dtype)
                                                                       .requires_grad_()]
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="eager", fullgraph=True)
        got = compiled(*xs)
        want = step(*xs)
        assert torch.equal(got, want), backend
        for a, b in zip(torch.autograd.grad(got.sum(), xs), torch.autograd.grad(want.sum(), xs)):
            assert rel_err(a, b) < 1e-6, backend
    torch._dynamo.reset()


@triton_only
def test_triton_second_derivative_raises():
    """The Triton backward is not differentiable: with create_graph=True the sinks' first
    gradient matches the reference and differentiating it again raises."""
    lens = [24]
    inputs = separated_inputs(lens, lens, 2, 1, 16, 4, torch.float64, seed=12)
    xs = [t.to(DEVICE, torch.float32).requires_grad_() for t in inputs]
    grads, sinks = {}, {}
    for backend in ("triton", "torch"):
        sinks[backend] = _sinks(2, seed=12).to(DEVICE, torch.float32).requires_grad_()
        out = _packed_call(xs, lens, lens, sinks[backend], backend, sparsity_n=2, dense_window_size=2)
        (grads[backend],) = torch.autograd.grad(out.square().sum(), sinks[backend], create_graph=True)
    assert rel_err(grads["triton"], grads["torch"]) < TOL32
    # The sinks also reach the loss directly, so only the attention term could go missing.
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(grads["triton"].square().sum() + sinks["triton"].square().sum(), sinks["triton"])


def _decode_reference(q, k, v, key_valid, query_valid, scale, softcap, sinks, window):
    """[B, 1, Hq, D] float64 on the CPU, from the rule: slots attended by the key mask and,
    with a window, within ``window`` of the row's last attended slot (the query's own);
    scores scaled and capped; the sink column concatenated and dropped; rows without a
    valid query 0. Computed on q's device, per kv head (no GQA copies of long caches)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    width = k.shape[2] if key_valid is None else key_valid.shape[1]
    keys, values = k[:, :, :width].double(), v[:, :, :width].double()
    attended = torch.ones(b, width, dtype=torch.bool, device=q.device) if key_valid is None else key_valid != 0
    slots = torch.arange(width, device=q.device)
    if window:
        position = torch.where(attended, slots, -1).amax(1)
        attended = attended & (position[:, None] - slots[None, :] < window)
    if query_valid is not None:
        attended = attended & query_valid[:, None]
    scores = torch.einsum("bhgd,bhjd->bhgj", q.double().view(b, hkv, hq // hkv, d), keys) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~attended[:, None, None, :], -math.inf)
    column = sinks.double().to(q.device).view(1, hkv, hq // hkv, 1).expand(b, -1, -1, 1)
    probs = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1].nan_to_num(0.0)  # nothing at all: 0
    values = values.masked_fill(~attended[:, None, :, None], 0.0)  # NaN in unattended slots
    return torch.einsum("bhgj,bhjd->bhgd", probs, values).reshape(b, 1, hq, d).cpu()


def _decode_inputs(b, hq, hkv, length, d, dtype, seed, width=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE, dtype)
               for shape in ((b, hq, 1, d), (b, hkv, length, d), (b, hkv, length, d)))
    width = length if width is None else width
    key_valid = torch.ones(b, width, dtype=torch.int32)
    key_valid[0, :7] = 0  # left padding
    if b > 1:
        key_valid[1, width - width // 3:] = 0  # a static cache's empty tail: the query sits before it
    if b > 2:
        key_valid[2, 3] = 0  # a hole
    k[:, :, width:] = float("nan")  # slots past the mask are never read
    v[:, :, width:] = float("nan")
    return q, k, v, key_valid.to(DEVICE)


@triton_only
@pytest.mark.parametrize("split", [False, True], ids=["single_pass", "split"])
def test_decode_kernel_sinks_window_softcap(split, monkeypatch):
    """The decode kernel with learned sinks, a soft cap and a sliding window, alone and
    together, GQA, key and query masks, single pass and split (the sink counted in the
    first split only): against the rule written above, in fp32."""
    from modelopt_sparse.kernels import triton_decode as td

    grids = []
    if split:  # split every launch with more than 32 keys into one-tile pieces
        monkeypatch.setattr(td, "SINGLE_PASS_MAX_KEYS", 32)
        monkeypatch.setattr(td, "MIN_KEYS_PER_SPLIT", 32)
        monkeypatch.setattr(td, "_PLANS", {})
        decode_launch, merge_launch = td._eager_launchers

        def recording(grid, key, args, kwargs):
            grids.append(grid)
            decode_launch(grid, key, args, kwargs)

        monkeypatch.setattr(td, "_eager_launchers", (recording, merge_launch))
    q, k, v, key_valid = _decode_inputs(3, 4, 2, 300, 32, torch.float32, seed=1, width=290)
    query_valid = torch.tensor([True, True, False], device=DEVICE)
    # Random scores of a few hundred keys: sinks this large take a real share of the row.
    sinks = _sinks(4, seed=1, low=5.0, high=8.0).float().to(DEVICE)
    for softcap, window, with_sinks, masks in [(None, None, True, True), (0.9, None, False, True),
                                               (None, 150, False, True), (0.9, 150, True, True),
                                               (None, 200, True, False)]:
        kv, qv = (key_valid, query_valid) if masks else (None, None)
        kk, vv = (k, v) if masks else (k[:, :, :290], v[:, :, :290])
        s = sinks if with_sinks else None
        out = td.decode_attention(q, kk, vv, kv, qv, softmax_scale=0.3, softcap=softcap, learned_sinks=s,
                                  sliding_window=window)
        none = torch.full((4,), -math.inf)
        want = _decode_reference(q, kk, vv, kv, qv, 0.3, softcap, sinks if with_sinks else none, window)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double().cpu(), want, atol=1e-5, rtol=1e-5)
        if with_sinks:  # teeth: once per split, unscaled, uncapped
            wrong = _decode_reference(q, kk, vv, kv, qv, 0.3, softcap, sinks * 0.3, window)
            assert (wrong - want).abs().max() > 1e-2
    # Every case split, the windowed ones into fewer pieces (only their window is read).
    assert not split or (len(grids) == 5 and all(g[2] > 1 for g in grids) and grids[2][2] < grids[1][2])


@triton_only
def test_decode_kernel_matches_attention_on_one_query():
    """decode_attention's window and sinks mean what attention()'s do on a one-query
    sequence (aligned position kv_len - 1), for a cache without holes."""
    from modelopt_sparse.kernels.triton_decode import decode_attention

    q, k, v, _ = _decode_inputs(2, 4, 2, 90, 16, torch.float32, seed=3)
    sinks = _sinks(4, seed=3).float().to(DEVICE)
    kw = dict(softmax_scale=0.4, softcap=1.2, sliding_window=33)
    got = decode_attention(q, k, v, learned_sinks=sinks, **kw)
    lens_k = [90, 90]
    packed_q = q.transpose(1, 2).flatten(0, 1)
    packed_k, packed_v = (t.transpose(1, 2).flatten(0, 1) for t in (k, v))
    want = _packed_call((packed_q, packed_k, packed_v), [1, 1], lens_k, sinks, "torch", sparsity_n=2, **kw)
    assert rel_err(got.flatten(0, 1), want) < TOL32


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(learned_sinks=torch.zeros(3)), ValueError, r"decode_attention: learned_sinks must have shape \[4\]"),
    (dict(learned_sinks=torch.zeros(4, dtype=torch.int64)), TypeError, "decode_attention: learned_sinks must be"),
    (dict(learned_sinks=torch.zeros(4, device="meta")), ValueError, "decode_attention: learned_sinks is on meta"),
    (dict(sliding_window=0), ValueError, "decode_attention: sliding_window must be >= 1"),
    (dict(softcap=-1.0), ValueError, "decode_attention: softcap must be positive"),
    (dict(softcap="2"), TypeError, "decode_attention: softcap must be a float"),
])
@triton_only
def test_decode_bad_options_are_refused(kwargs, error, match):
    from modelopt_sparse.kernels.triton_decode import decode_attention

    q = torch.zeros(2, 4, 1, 16, device=DEVICE)
    k = torch.zeros(2, 2, 8, 16, device=DEVICE)
    if DEVICE == "cuda" and "learned_sinks" in kwargs and kwargs["learned_sinks"].device.type == "cpu":
        kwargs = {**kwargs, "learned_sinks": kwargs["learned_sinks"].cuda()}
    with pytest.raises(error, match=match):
        decode_attention(q, k, k, **kwargs)


# --------------------------------------------------------------------------------------
# GPU only: half precision, long sequences and caches, launch plans, graphs, Inductor
# --------------------------------------------------------------------------------------
GPU_TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative L2, as tests/test_kernel_triton.py
DECODE_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # atol = rtol, as tests/test_decode_kernel.py
GPU_CASES = {
    "dense": dict(sparsity_n=0),
    "2of4_sinks_window": dict(sparsity_n=2, sparsity_m=4, num_sink_tokens=4, dense_window_size=64),
    "4of8_sliding_softcap": dict(sparsity_n=4, sparsity_m=8, dense_window_size=16, sliding_window=700, softcap=5.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_forward_backward(dtype, d, case):
    """Compiled kernels in half precision against the float64 reference on the same rounded
    inputs (sinks in q's dtype, as a model holds them): output, dq, dk, dv and d sinks."""
    kw = GPU_CASES[case]
    lens = [2048, 333, 1]
    inputs = separated_inputs(lens, lens, 16, 4, d, kw.get("sparsity_m", 4), torch.float64, seed=d)
    inputs = [t.to(dtype).double() for t in inputs]
    sinks = _sinks(16, seed=d, low=4.0, high=9.0).to(dtype).double()  # ~ log(keys): a real share
    do = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = _run("triton", dtype, inputs, lens, lens, sinks, do, **kw)
    want = _run("torch", torch.float64, inputs, lens, lens, sinks, do, **kw)
    assert all(torch.isfinite(t).all() for t in got)
    assert got[4].dtype == dtype
    scale = max(b.double().norm().item() for b in want[1:])
    errs = [rel_err(got[0], want[0])] + [rel_err(a, b, floor=1e-2 * scale) for a, b in zip(got[1:], want[1:])]
    assert max(errs) < GPU_TOL[dtype], errs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length,width,window", [(700, 650, None), (20000, 20000, None), (20000, 19000, 4096),
                                                 (6000, 5000, 100)],
                         ids=["single_pass", "split", "split_window", "static_tail_window"])
def test_gpu_decode(dtype, length, width, window):
    """The decode kernel on real cache lengths (single pass and split), left padding, a
    static cache's empty tail (the query before it), holes, sinks, a soft cap, a window."""
    from modelopt_sparse.kernels.triton_decode import decode_attention

    q, k, v, key_valid = _decode_inputs(3, 32, 8, length, 128, dtype, seed=2, width=width)
    query_valid = torch.tensor([True, True, False], device=DEVICE)
    sinks = _sinks(32, seed=2, low=5.0, high=10.0).to(DEVICE, dtype)
    for softcap in (None, 30.0):
        out = decode_attention(q, k, v, key_valid, query_valid, softmax_scale=0.125, softcap=softcap,
                               learned_sinks=sinks, sliding_window=window)
        want = _decode_reference(q, k, v, key_valid, query_valid, 0.125, softcap, sinks, window)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double().cpu(), want, atol=DECODE_TOL[dtype], rtol=DECODE_TOL[dtype])


@pytest.mark.gpu
def test_gpu_launch_plans_with_sinks(monkeypatch):
    """Repeated inference calls with sinks run from launch plans (verified against the
    ordinary path on every hit); the plans read the sinks at their address, so an in-place
    update is seen, and another sinks tensor gets its own plan. Forward and decode."""
    from modelopt_sparse.kernels.triton_attention import configs, launch
    from modelopt_sparse.kernels import triton_decode as td

    plans = {}  # where _forward_launch looks the plans up, and where forget() clears them
    monkeypatch.setattr(launch, "_FORWARD_PLANS", plans)
    monkeypatch.setattr(configs, "_FORWARD_PLANS", plans)
    monkeypatch.setattr(td, "_PLANS", {})
    if configs._fwd.launcher is not None:
        monkeypatch.setattr(configs._fwd.launcher, "_verify", True)
    monkeypatch.setattr(td._eager_launchers[0], "_verify", True, raising=False)
    lens = [300, 77]
    inputs = [t.to(DEVICE, torch.bfloat16) for t in separated_inputs(lens, lens, 8, 2, 64, 4, torch.float64, seed=1)]
    sinks = _sinks(8, seed=1, low=3.0, high=6.0).to(DEVICE, torch.bfloat16)
    q, k, v, key_valid = _decode_inputs(3, 8, 2, 700, 64, torch.bfloat16, seed=3, width=650)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=8)
    with torch.no_grad():
        for step in range(3):
            if step == 2:
                sinks.add_(1.0)  # in place: the same address, new values
            for _ in range(3):
                out = _packed_call(inputs, lens, lens, sinks, "triton", **kw)
                dec = td.decode_attention(q, k, v, key_valid, learned_sinks=sinks, sliding_window=300, softcap=20.0)
            want = _packed_call([t.double() for t in inputs], lens, lens, sinks.double(), "torch", **kw)
            assert rel_err(out, want) < GPU_TOL[torch.bfloat16]
            ref = _decode_reference(q, k, v, key_valid, None, 1 / 8, 20.0, sinks, 300)
            torch.testing.assert_close(dec.double().cpu(), ref, atol=1.6e-2, rtol=1.6e-2)
        other = sinks.clone()  # another address: another plan
        _packed_call(inputs, lens, lens, other, "triton", **kw)
        td.decode_attention(q, k, v, key_valid, learned_sinks=other, sliding_window=300, softcap=20.0)
    if configs._fwd.launcher is not None:
        assert len(launch._FORWARD_PLANS) == 2 and sum(p.launches for p in launch._FORWARD_PLANS.values()) > 0
    if td._PLANS_ON:
        assert len(td._PLANS) == 2 and sum(p.launches for p in td._PLANS.values()) > 0


@pytest.mark.gpu
def test_gpu_graph_replay_and_no_synchronisation():
    """With sinks, the forward and the decode kernel read no device value on the host
    (sync debug mode raises otherwise) and replay in a CUDA graph on new sinks values."""
    from modelopt_sparse.kernels.triton_decode import decode_attention

    q, k, v, key_valid = _decode_inputs(3, 8, 2, 5000, 128, torch.bfloat16, seed=4, width=4800)
    sinks = _sinks(8, seed=4, low=5.0, high=9.0).to(DEVICE, torch.bfloat16)
    lens = [500, 21]
    sq, lq, mq, _ = varlen(lens, DEVICE)
    inputs = [t.to(DEVICE, torch.bfloat16) for t in separated_inputs(lens, lens, 8, 2, 128, 4, torch.float64)]

    def step():
        out = attention(*inputs, sq, lq, mq, sparsity_n=2, learned_sinks=sinks, check_metadata=False)
        return out, decode_attention(q, k, v, key_valid, learned_sinks=sinks, sliding_window=1000)

    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, dec = step()
        sinks.copy_(_sinks(8, seed=5, low=5.0, high=9.0).to(DEVICE, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_dec = step()
    assert torch.equal(out, want_out) and torch.equal(dec, want_dec)


@pytest.mark.gpu
def test_gpu_compile_inductor():
    """torch.compile (Inductor, fullgraph) of a forward+backward and of a decode step with
    sinks: no graph break, the eager values and gradients."""
    from modelopt_sparse.kernels.triton_decode import decode_attention

    lens = [600, 90]
    sq, lq, mq, _ = varlen(lens, DEVICE)
    inputs = separated_inputs(lens, lens, 8, 2, 64, 4, torch.float64, seed=6)
    xs = [t.to(DEVICE, torch.bfloat16).requires_grad_() for t in inputs]
    sinks = _sinks(8, seed=6, low=3.0, high=7.0).to(DEVICE, torch.bfloat16).requires_grad_()

    def prefill(q, k, v, s):
        return attention(q, k, v, sq, lq, mq, sparsity_n=2, sliding_window=200, softcap=10.0, learned_sinks=s,
                         check_metadata=False)

    torch._dynamo.reset()
    got = torch.compile(prefill, fullgraph=True)(*xs, sinks)
    want = prefill(*xs, sinks)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.float().sum(), xs + [sinks]),
                    torch.autograd.grad(want.float().sum(), xs + [sinks])):
        torch.testing.assert_close(a, b)
    q, k, v, key_valid = _decode_inputs(2, 8, 2, 3000, 64, torch.bfloat16, seed=7)

    def decode(q, k, v, key_valid, s):
        return decode_attention(q, k, v, key_valid, learned_sinks=s, sliding_window=1024, softcap=20.0)

    with torch.no_grad():
        got = torch.compile(decode, fullgraph=True)(q, k, v, key_valid, sinks)
        # A compiled graph's launch splits the 3000 keys more ways than the eager one (the
        # split rule for graphs, triton_decode.split_plan): the same values, summed in another
        # order, so they agree to bf16 rounding, not bit for bit.
        torch.testing.assert_close(got, decode(q, k, v, key_valid, sinks), atol=1.6e-2, rtol=1.6e-2)
    torch._dynamo.reset()
