"""Every bad input gets a specific error before any kernel runs: one test per error."""

import pytest
import torch

from modelopt_sparse.kernels import attention

from .helpers import varlen


def _inputs(t=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    q = torch.randn(t, hq, d, dtype=dtype)
    k = torch.randn(t, hkv, d, dtype=dtype)
    v = torch.randn(t, hkv, d, dtype=dtype)
    s, l, m, _ = varlen([t])
    return q, k, v, s, l, m


def _call(**overrides):
    q, k, v, s, l, m = _inputs()
    args = dict(q=q, k=k, v=v, b_start_loc=s, b_seq_len=l, max_input_len=m, backend="torch")
    args.update(overrides)
    return attention(**args)


CASES = [
    (dict(q=torch.ones(8, 4, 16, dtype=torch.int32), k=torch.ones(8, 2, 16, dtype=torch.int32), v=torch.ones(8, 2, 16, dtype=torch.int32)), TypeError, "unsupported dtype"),
    (dict(k=torch.randn(8, 2, 16, dtype=torch.float16)), TypeError, "one dtype"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(2, 8, 4, 16, 1)), ValueError, "q must have shape"),
    (dict(q=torch.randn(1, 8, 4, 16)), ValueError, "must all be packed .3-D. or all batched"),
    (dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16)), ValueError,
     "1 batch rows but k and v have 2"),
    (dict(q=torch.randn(2, 8, 4, 16), k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16)), ValueError,
     "one sequence per batch row: 2 rows but b_start_loc has 1"),
    (dict(v=torch.randn(8, 2, 32)), ValueError, "k and v must have the same shape"),
    (dict(q=torch.randn(8, 4, 32), k=torch.randn(8, 2, 16)), ValueError, "share head_dim"),
    (dict(q=torch.randn(8, 4, 8), k=torch.randn(8, 2, 8), v=torch.randn(8, 2, 8)), ValueError, "head_dim must be in"),
    (dict(q=torch.randn(8, 4, 512), k=torch.randn(8, 2, 512), v=torch.randn(8, 2, 512)), ValueError, "head_dim must be in"),
    (dict(q=torch.randn(8, 3, 16)), ValueError, "positive multiple"),
    (dict(b_start_loc=torch.tensor([0], dtype=torch.int64)), TypeError, "b_start_loc must be int32"),
    (dict(b_seq_len=torch.tensor([[8]], dtype=torch.int32)), ValueError, "b_seq_len must be 1-D"),
    (dict(b_seq_len=torch.tensor([8, 8], dtype=torch.int32)), ValueError, "b_seq_len has 2 entries"),
    (dict(b_start_loc=torch.zeros(0, dtype=torch.int32), b_seq_len=torch.zeros(0, dtype=torch.int32)), ValueError, "at least one sequence"),
    (dict(b_start_loc=[0]), TypeError, "b_start_loc must be an int32 tensor"),
    (dict(b_seq_len=torch.tensor([9], dtype=torch.int32), max_input_len=9), ValueError, "exceed the 8 packed rows"),
    (dict(b_seq_len=torch.tensor([-1], dtype=torch.int32)), ValueError, "negative"),
    (dict(max_input_len=4), ValueError, "exceeds max_input_len"),
    (dict(max_input_len=8.0), TypeError, "max_input_len must be an int"),
    (dict(b_start_loc=torch.tensor([0, 2], dtype=torch.int32), b_seq_len=torch.tensor([4, 4], dtype=torch.int32)), ValueError, "overlap"),
    (dict(b_start_loc_k=torch.tensor([0], dtype=torch.int32)), ValueError, "or none of them"),
    (dict(sparsity_n=4, sparsity_m=4), ValueError, "0 <= N < M"),
    (dict(sparsity_n=-1), ValueError, "0 <= N < M"),
    (dict(sparsity_n=2, sparsity_m=6), ValueError, "sparsity_m must be one of"),
    (dict(sparsity_n=2.0), TypeError, "sparsity_n must be an int"),
    (dict(tie_break="random"), ValueError, "tie_break must be one of"),
    (dict(num_sink_tokens=-1), ValueError, "num_sink_tokens must be >= 0"),
    (dict(dense_window_size=-5), ValueError, "dense_window_size must be >= 0"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be positive"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be positive"),
    (dict(softmax_scale="1"), TypeError, "softmax_scale must be a float"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(return_stats=1), TypeError, "return_stats must be a bool"),
]


@pytest.mark.parametrize("overrides,exc,match", CASES, ids=[c[2] for c in CASES])
def test_bad_input_raises(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _call(**overrides)


def test_triton_backend_rejects_float64():
    q, k, v, s, l, m = _inputs(dtype=torch.float64)
    if not (q.is_cuda or __import__("os").environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs the interpreter or a GPU")
    with pytest.raises(TypeError, match="not float64"):
        attention(q, k, v, s, l, m, backend="triton")


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, s, l, m = _inputs()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(q, k, v, s, l, m, backend="triton")


def test_metadata_on_another_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    q, k, v, s, l, m = _inputs()
    with pytest.raises(ValueError, match="is on"):
        attention(q.cuda(), k.cuda(), v.cuda(), s, l, m)


def test_metadata_is_checked_again_after_an_in_place_change():
    q, k, v, s, l, m = _inputs()
    attention(q, k, v, s, l, m, backend="torch")  # valid: remembered
    attention(q, k, v, s, l, m, backend="torch")  # served from the cache
    l.fill_(9)  # bumps the tensor's version: the cached verdict no longer applies
    with pytest.raises(ValueError, match="exceed the 8 packed rows"):
        attention(q, k, v, s, l, 9, backend="torch")


def test_inference_mode_metadata_is_always_checked():
    q, k, v, s, l, m = _inputs()
    with torch.inference_mode():
        s2, l2 = s.clone(), l.clone()
        attention(q, k, v, s2, l2, m, backend="torch")
        l2.fill_(9)
        with pytest.raises(ValueError, match="exceed the 8 packed rows"):
            attention(q, k, v, s2, l2, 9, backend="torch")
