"""The plugin on the Triton backend: interpreted on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported when there is no GPU), compiled on CUDA.

Skipped as a whole when the Triton kernel module is absent or cannot run here.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import modelopt_sparse as mts
from modelopt_sparse.kernels import interpreting

from .hf_tiny import CACHE_KW, logits, sparse_cfg, tiny_model, token_ids

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("modelopt_sparse.kernels.triton_attention") is None
    or not (torch.cuda.is_available() or interpreting()),
    reason="Triton backend not available (needs CUDA or TRITON_INTERPRET=1)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEN = dict(do_sample=False, pad_token_id=0)


def _pair(base, n=2, m=4, sinks=0, window=4):
    triton_model = mts.sparsify(copy.deepcopy(base), sparse_cfg(n, m, sinks, window, backend="triton"))
    torch_model = mts.sparsify(copy.deepcopy(base), sparse_cfg(n, m, sinks, window, method="torch_sparse_softmax"))
    return triton_model, torch_model


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", dtype=torch.float32).to(DEVICE)


def test_generate_triton_equals_reference(base):
    triton_model, torch_model = _pair(base)
    ids = token_ids(2, 26).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    torch.testing.assert_close(
        logits(triton_model, ids, attention_mask=mask)[mask.bool()],
        logits(torch_model, ids, attention_mask=mask)[mask.bool()],
        atol=2e-4, rtol=0,
    )
    with torch.no_grad():
        got = triton_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **GEN)
        want = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **GEN)
    assert torch.equal(got, want)


def test_triton_decode_steps_are_dense(base):
    triton_model, _ = _pair(base, window=0)
    ids = token_ids(2, 30).to(DEVICE)
    with torch.no_grad():
        cache = triton_model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = triton_model(input_ids=ids[:, -1:], use_cache=True, **{CACHE_KW: copy.deepcopy(cache)}).logits
        mts.disable(triton_model)
        dense = triton_model(input_ids=ids[:, -1:], use_cache=True, **{CACHE_KW: copy.deepcopy(cache)}).logits
    torch.testing.assert_close(step, dense, atol=1e-5, rtol=0)


def test_triton_packed_equals_separate(base):
    triton_model, _ = _pair(base, 4, 8, 1, 2)
    lengths = [9, 20]
    seqs = [token_ids(1, n, seed=50 + i)[0].to(DEVICE) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, 9, 29], dtype=torch.int32, device=DEVICE)
    pos = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    got = logits(triton_model, torch.cat(seqs)[None], position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=20, max_length_k=20)
    # float32 on a GPU: matmuls over 29 vs 9 rows round differently (seen: 2e-5 on logits ~5).
    torch.testing.assert_close(got[0, :9], logits(triton_model, seqs[0][None])[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[0, 9:], logits(triton_model, seqs[1][None])[0], atol=1e-4, rtol=0)


def test_triton_training_with_gradient_checkpointing_matches_reference(base, monkeypatch):
    """A training step through the Triton kernels, with HF gradient checkpointing (each
    layer's forward runs again during backward), gives the reference backend's loss and
    parameter gradients on a padded batch."""
    from modelopt_sparse.kernels.triton_attention import ops

    launches = []
    original = ops._forward_launch  # looked up there by the eager autograd.Function
    monkeypatch.setattr(ops, "_forward_launch", lambda *a, **kw: launches.append(1) or original(*a, **kw))
    grads, losses = {}, {}
    for name, model in zip(("triton", "torch"), _pair(base, 2, 4, 1, 4)):
        model.train()
        if name == "triton":
            # transformers >= 5.24 renamed it (the old name warns); the GPU image has 5.17.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = token_ids(2, 24, seed=7).to(DEVICE)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # Every layer's forward ran twice through the kernel: once, and again during backward.
    assert len(launches) == 2 * base.config.num_hidden_layers
    assert grads["triton"].keys() == grads["torch"].keys() and len(grads["torch"]) > 10
    torch.testing.assert_close(losses["triton"], losses["torch"], atol=1e-5, rtol=0)
    for n, g in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][n], g, atol=2e-5, rtol=1e-3, msg=n)
    assert any(g.abs().max() > 0 for n, g in grads["triton"].items() if "q_proj" in n)


# --------------------------------------------------------------------------------------
# GPU only: bf16 through the compiled kernel
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_bf16():
    return tiny_model(
        "llama", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_hidden_layers=2, initializer_range=0.05,
    ).to("cuda")


@pytest.mark.gpu
def test_gpu_bf16_preset_runs_triton_and_matches_reference(gpu_bf16):
    model = mts.sparsify(copy.deepcopy(gpu_bf16), mts.SPARSE_SOFTMAX_DEFAULT)  # auto -> triton on CUDA
    assert "triton" in mts.print_summary(model)
    reference = mts.sparsify(copy.deepcopy(gpu_bf16), sparse_cfg(2, 4, 0, 64, method="torch_sparse_softmax"))
    ids = token_ids(3, 300).to("cuda")
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    mask[2, 250:] = 0
    got = logits(model, ids, attention_mask=mask).float()[mask.bool()]
    want = logits(reference, ids, attention_mask=mask).float()[mask.bool()]
    assert torch.isfinite(got).all()
    # bf16 rounding can flip a near-tied N:M choice, so compare in bulk rather than element-wise.
    assert (got - want).abs().mean() < 2e-2 * want.abs().mean()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.97


@pytest.mark.gpu
def test_gpu_bf16_generate_and_dense_decode(gpu_bf16):
    model = mts.sparsify(copy.deepcopy(gpu_bf16), sparse_cfg(2, 4, 0, 16))
    ids = token_ids(2, 200).to("cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, **GEN)
        assert out.shape == (2, 208)
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=ids[:, -1:], use_cache=True, **{CACHE_KW: copy.deepcopy(cache)}).logits
        mts.disable(model)
        dense = model(input_ids=ids[:, -1:], use_cache=True, **{CACHE_KW: copy.deepcopy(cache)}).logits
    torch.testing.assert_close(step.float(), dense.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_fp32_generate_triton_equals_reference():
    base = tiny_model("llama", dtype=torch.float32).to("cuda")
    triton_model, torch_model = _pair(base)
    ids = token_ids(2, 64).to("cuda")
    with torch.no_grad():
        got = triton_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, **GEN)
        want = torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, **GEN)
    assert torch.equal(got, want)
