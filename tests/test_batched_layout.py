"""The padded-batch layout of ``attention()``: ``[B, S, H, D]`` tensors (any strides with a
unit stride along D) holding sequence b in batch row b at a row-local offset.

Every backend must give exactly what the packed layout gives for the same sequences: the
same mask (separated inputs make every backend's scores exact), the same outputs, the same
gradients, and zeros in rows outside the sequences.
"""

import pytest
import torch

from modelopt_sparse.kernels import attention, interpreting

from .helpers import rel_err, separated_inputs, varlen

BACKENDS = ["torch"] + (["triton"] if (torch.cuda.is_available() or interpreting()) else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k, hq, hkv, d, m, dtype):
    """Padded [B, S, H, D] tensors (made as transposed [B, H, S, D], as transformers has
    them) and the packed tensors of the same sequences."""
    q, k, v = separated_inputs(seqs_q, seqs_k, hq, hkv, d, m, torch.float64)
    batch = len(seqs_q)
    q4 = torch.randn(batch, hq, rows_q, d, dtype=torch.float64).transpose(1, 2)
    k4 = torch.randn(batch, hkv, rows_k, d, dtype=torch.float64).transpose(1, 2)
    v4 = torch.randn(batch, hkv, rows_k, d, dtype=torch.float64).transpose(1, 2)
    oq = ok = 0
    for b in range(batch):
        q4[b, starts_q[b]:starts_q[b] + seqs_q[b]] = q[oq:oq + seqs_q[b]]
        k4[b, starts_k[b]:starts_k[b] + seqs_k[b]] = k[ok:ok + seqs_k[b]]
        v4[b, starts_k[b]:starts_k[b] + seqs_k[b]] = v[ok:ok + seqs_k[b]]
        oq, ok = oq + seqs_q[b], ok + seqs_k[b]
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    meta4 = (as_int(starts_q), as_int(seqs_q), max(seqs_q), as_int(starts_k), as_int(seqs_k), max(seqs_k))
    sq, lq, mq, _ = varlen(seqs_q, DEVICE)
    sk, lk, mk, _ = varlen(seqs_k, DEVICE)
    cast = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return [cast(t) for t in (q4, k4, v4)], meta4, [cast(t) for t in (q, k, v)], (sq, lq, mq, sk, lk, mk)


def _call(q, k, v, meta, backend, **kw):
    s, l, mq, sk, lk, mk = meta
    return attention(q, k, v, s, l, mq, kw.pop("is_causal", True), None, sk, lk, mk, backend=backend, **kw)


CASES = [
    # seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k
    ([20, 13], [20, 13], 20, 20, [0, 7], [0, 7]),  # left padding
    ([20, 13], [20, 13], 20, 20, [0, 0], [0, 0]),  # right padding
    ([5, 1, 9], [30, 17, 9], 9, 32, [4, 0, 0], [2, 15, 0]),  # chunked prefill and a decode row
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("pattern", [(0, 4), (2, 4), (1, 8)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_batched_equals_packed(backend, case, pattern, is_causal):
    seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k = CASES[case]
    if not is_causal and seqs_q != seqs_k:
        pytest.skip("non-causal chunked rows are the same rule; one layout is enough")
    n, m = pattern
    dtype = torch.float32
    (q4, k4, v4), meta4, (q, k, v), meta = _batch(seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k, 4, 2, 32, m,
                                                  dtype)
    kw = dict(sparsity_n=n, sparsity_m=m, dense_window_size=4, num_sink_tokens=1, is_causal=is_causal)
    expected = _call(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                     [t.cpu() if isinstance(t, torch.Tensor) else t for t in meta], "torch", **kw)
    with torch.no_grad():
        out4 = _call(q4, k4, v4, meta4, backend, **kw)
    assert out4.shape == q4.shape and out4.is_contiguous()
    offset = 0
    for b, (start, length) in enumerate(zip(starts_q, seqs_q)):
        got = out4[b, start:start + length].double().cpu()
        assert rel_err(got, expected[offset:offset + length]) < 1e-5, (b, start, length)
        outside = torch.ones(rows_q, dtype=torch.bool)
        outside[start:start + length] = False
        assert torch.count_nonzero(out4[b][outside]) == 0  # rows outside the sequence are zeros
        offset += length


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_gradients_equal_packed(backend):
    seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k = CASES[0]
    (q4, k4, v4), meta4, (q, k, v), meta = _batch(seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k, 4, 2, 32, 4,
                                                  torch.float32)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=4)
    leaves4 = [t.detach().requires_grad_() for t in (q4, k4, v4)]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out4 = _call(*leaves4, meta4, backend, **kw)
    out = _call(*leaves, meta, backend, **kw)
    g = torch.randn_like(out)
    g4 = torch.zeros_like(out4)
    offset = 0
    for b, (start, length) in enumerate(zip(starts_q, seqs_q)):
        g4[b, start:start + length] = g[offset:offset + length]
        offset += length
    (out4 * g4).sum().backward()
    (out * g).sum().backward()
    for name, t4, t, starts, seqs in (("dq", leaves4[0], leaves[0], starts_q, seqs_q),
                                      ("dk", leaves4[1], leaves[1], starts_k, seqs_k),
                                      ("dv", leaves4[2], leaves[2], starts_k, seqs_k)):
        offset = 0
        for b, (start, length) in enumerate(zip(starts, seqs)):
            assert rel_err(t4.grad[b, start:start + length], t.grad[offset:offset + length]) < 1e-5, (name, b)
            offset += length


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_unchecked_metadata_and_stats(backend):
    """check_metadata=False (what the HF adapter passes) and return_stats give the same."""
    seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k = CASES[2]
    (q4, k4, v4), meta4, _, _ = _batch(seqs_q, seqs_k, rows_q, rows_k, starts_q, starts_k, 4, 4, 32, 4, torch.float32)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=2)
    with torch.no_grad():
        checked, stats = _call(q4, k4, v4, meta4, backend, return_stats=True, **kw)
        unchecked = _call(q4, k4, v4, meta4, backend, check_metadata=False, **kw)
        packed_stats = _call(q4.reshape(-1, 4, 32), k4.reshape(-1, 4, 32), v4.reshape(-1, 4, 32),
                             (meta4[0] + torch.arange(3, dtype=torch.int32, device=DEVICE) * rows_q, *meta4[1:3],
                              meta4[3] + torch.arange(3, dtype=torch.int32, device=DEVICE) * rows_k, *meta4[4:]),
                             backend, return_stats=True, **kw)[1]
    assert torch.equal(checked, unchecked)
    for key in ("allowed", "kept", "rows"):
        assert torch.equal(stats[key], packed_stats[key]), key
        assert stats[key].shape == (4,)
    assert int(stats["kept"].sum()) < int(stats["allowed"].sum())


def test_batched_bounds_are_per_row():
    q4 = torch.randn(2, 8, 4, 32)
    k4 = torch.randn(2, 8, 2, 32)
    starts = torch.tensor([0, 3], dtype=torch.int32)
    lens = torch.tensor([8, 6], dtype=torch.int32)  # row 1: rows 3..9 of 8
    with pytest.raises(ValueError, match="query rows 3..9 exceed the 8 rows of its batch row"):
        attention(q4, k4, k4, starts, lens, 8, backend="torch")
