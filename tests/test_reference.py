"""The PyTorch reference against the independent float64 oracle (tests/oracle.py)."""

import itertools

import pytest
import torch

from modelopt_sparse.kernels import attention, kept_mask

from .helpers import rel_err, tied_inputs, varlen
from .oracle import oracle_attention, oracle_mask

PATTERNS = [(0, 4), (1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8), (4, 16), (8, 16), (15, 16)]


def _run_both(lens_q, lens_k, hq, hkv, d, *, causal, n, m, sink, window, tie_break, seed=0, inputs=None):
    torch.manual_seed(seed)
    if inputs is None:
        q = torch.randn(sum(lens_q), hq, d, dtype=torch.float64)
        k = torch.randn(sum(lens_k), hkv, d, dtype=torch.float64)
        v = torch.randn(sum(lens_k), hkv, d, dtype=torch.float64)
    else:
        q, k, v = inputs
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    sq, lq, mq, _ = varlen(lens_q)
    sk, lk, mk, _ = varlen(lens_k)
    scale = 0.3
    out, stats = attention(
        q, k, v, sq, lq, mq, causal, scale, sk, lk, mk,
        sparsity_n=n, sparsity_m=m, num_sink_tokens=sink, dense_window_size=window,
        tie_break=tie_break, backend="torch", return_stats=True,
    )
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _, ref_stats = oracle_attention(
        q2, k2, v2, lens_q, lens_k, causal=causal, scale=scale, n=n, m=m, sink=sink,
        window=window, tie_break=tie_break,
    )
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), do)
    return out, ref, grads, ref_grads, stats, ref_stats


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("causal", [True, False])
def test_patterns_match_oracle(n, m, causal):
    lens = [1, 7, 37]
    out, ref, grads, ref_grads, stats, ref_stats = _run_both(
        lens, lens, 2, 1, 16, causal=causal, n=n, m=m, sink=2, window=3, tie_break="threshold"
    )
    assert rel_err(out, ref) < 1e-12
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-10
    assert stats["kept"].tolist() == ref_stats["kept"]
    assert stats["allowed"].tolist() == ref_stats["allowed"]
    assert stats["rows"].tolist() == ref_stats["rows"]
    torch.testing.assert_close(stats["dropped_mass"], torch.tensor(ref_stats["dropped_mass"], dtype=torch.float64))


@pytest.mark.parametrize(
    "sink,window", [(0, 0), (0, 1), (3, 0), (4, 16), (100, 0), (0, 100)]
)
@pytest.mark.parametrize("tie_break", ["threshold", "index"])
def test_sinks_windows_and_ties(sink, window, tie_break):
    lens = [5, 29]
    inputs = tied_inputs(lens, lens, 3, 3, 16, torch.float64, seed=sink + window)
    out, ref, grads, ref_grads, stats, ref_stats = _run_both(
        lens, lens, 3, 3, 16, causal=True, n=2, m=8, sink=sink, window=window,
        tie_break=tie_break, inputs=inputs,
    )
    assert rel_err(out, ref) < 1e-12
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-10
    assert stats["kept"].tolist() == ref_stats["kept"]


@pytest.mark.parametrize(
    "lens_q,lens_k",
    [
        ([1, 1, 1], [9, 17, 4]),     # decode: one query per sequence, always dense
        ([5, 12], [21, 12]),         # chunked prefill after a cached prefix
        ([8, 3], [3, 8]),            # more queries than keys: early causal rows see nothing
        ([0, 6], [4, 6]),            # an empty query sequence
    ],
)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_alignment_decode_gqa_mqa(lens_q, lens_k, hq, hkv):
    out, ref, grads, ref_grads, *_ = _run_both(
        lens_q, lens_k, hq, hkv, 24, causal=True, n=1, m=4, sink=1, window=2, tie_break="index"
    )
    assert rel_err(out, ref) < 1e-12
    assert torch.isfinite(out).all()
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-10 or rg.abs().max() == 0


def test_rows_without_keys_are_zero_not_nan():
    q = torch.randn(6, 2, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 16, dtype=torch.float64)
    sq, lq, mq, _ = varlen([6])
    sk, lk, mk, _ = varlen([2])
    out = attention(q, k, v, sq, lq, mq, True, None, sk, lk, mk, backend="torch", sparsity_n=2)
    # Query rows 0..3 sit at key positions -4..-1: no key is allowed.
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert torch.isfinite(out).all()


def test_decode_is_dense_even_when_sparse_is_requested():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 16, dtype=torch.float64)
    k = torch.randn(40, 2, 16, dtype=torch.float64)
    v = torch.randn(40, 2, 16, dtype=torch.float64)
    sq, lq, mq, _ = varlen([1])
    sk, lk, mk, _ = varlen([40])
    kw = dict(dense_window_size=0, backend="torch")
    sparse = attention(q, k, v, sq, lq, mq, True, None, sk, lk, mk, sparsity_n=1, sparsity_m=4, **kw)
    dense = attention(q, k, v, sq, lq, mq, True, None, sk, lk, mk, sparsity_n=0, **kw)
    assert torch.equal(sparse, dense)


def test_tie_rules_on_a_hand_made_group():
    # One query, keys with scores [1, 1, 1, 0 | 3, 2, 2, 2]: 2:4 threshold keeps 3 + 3 keys,
    # index keeps exactly 2 + 2 with the lower index winning ties.
    qk = torch.tensor([[1.0, 1, 1, 0, 3, 2, 2, 2]], dtype=torch.float64).expand(2, 8).clone()
    kw = dict(is_causal=False, sparsity_n=2, sparsity_m=4, num_sink_tokens=0, dense_window_size=0)
    thr = kept_mask(qk, 2, 8, tie_break="threshold", **kw)
    idx = kept_mask(qk, 2, 8, tie_break="index", **kw)
    assert thr[0].tolist() == [True, True, True, False, True, True, True, True]
    assert idx[0].tolist() == [True, True, False, False, True, True, False, False]


def test_dense_keys_still_take_part_in_selection():
    # Key 3 sits in the window (dense) and is the group's largest; under 1:4 it takes the
    # group's only selection slot, so key 0 (second largest) is dropped.
    qk = torch.tensor([[2.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    kept = kept_mask(qk, 1 + 1, 4, is_causal=False, sparsity_n=1, sparsity_m=4,
                     num_sink_tokens=0, dense_window_size=1, tie_break="threshold", row_offset=1)
    assert kept[0].tolist() == [False, False, False, True]


def test_reference_mask_equals_oracle_mask_exhaustively():
    torch.manual_seed(3)
    for (n, m), causal, tie in itertools.product([(1, 4), (2, 4), (3, 8), (6, 16)], [True, False], ["threshold", "index"]):
        q_len, kv_len = 9, 23
        qk = torch.randint(-2, 3, (q_len, kv_len)).double()
        kw = dict(causal=causal, n=n, m=m, sink=1, window=2, tie_break=tie)
        want = oracle_mask(qk, q_len, kv_len, **kw)
        got = kept_mask(qk, q_len, kv_len, is_causal=causal, sparsity_n=n, sparsity_m=m,
                        num_sink_tokens=1, dense_window_size=2, tie_break=tie)
        assert torch.equal(got, want), (n, m, causal, tie)


def test_reference_is_chunked(monkeypatch):
    # Forcing tiny chunks must not change anything: the chunking is exact.
    from modelopt_sparse.kernels import reference

    lens = [33]
    torch.manual_seed(0)
    q, k, v = (torch.randn(33, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sq, lq, mq, _ = varlen(lens)
    kw = dict(sparsity_n=2, sparsity_m=4, backend="torch")
    full = attention(q, k, v, sq, lq, mq, **kw)
    g_full = torch.autograd.grad(full.sum(), (q, k, v))
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 2 * 33 * 8 * 5)  # 5 rows per chunk
    chunked = attention(q, k, v, sq, lq, mq, **kw)
    g_chunked = torch.autograd.grad(chunked.sum(), (q, k, v))
    assert torch.allclose(full, chunked, rtol=0, atol=1e-14)
    for a, b in zip(g_full, g_chunked):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_autocast_casts_q_k_v_as_sdpa_does():
    """A transformers model under bf16 autocast hands attention float32 q and k (they leave
    the rotary embedding in float32) and a bf16 v; SDPA's autocast rule casts all three to
    bf16, and so does attention() (the GPU fine-tune once failed on "q, k and v must share
    one dtype" here). Gradients reach the float32 inputs."""
    from modelopt_sparse.kernels import attention

    torch.manual_seed(0)
    q = torch.randn(12, 2, 16, requires_grad=True)
    k = torch.randn(12, 2, 16, requires_grad=True)
    v = torch.randn(12, 2, 16).bfloat16().requires_grad_()
    start, lens = torch.zeros(1, dtype=torch.int32), torch.full((1,), 12, dtype=torch.int32)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=0, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, start, lens, 12, **kw)
    assert out.dtype == torch.bfloat16
    want = attention(q.detach().bfloat16(), k.detach().bfloat16(), v.detach(), start, lens, 12, **kw)
    assert torch.equal(out.detach(), want)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and k.grad.dtype == torch.float32
    assert v.grad.dtype == torch.bfloat16
    # Outside autocast mixed dtypes are still refused, with the same message.
    with pytest.raises(TypeError, match="share one dtype"):
        attention(q, k, v, start, lens, 12, **kw)
