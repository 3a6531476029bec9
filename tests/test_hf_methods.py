"""Custom sparse-attention methods on a model, and the shipped examples."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import modelopt_sparse as mts

from .hf_tiny import as_oracle, logits, settings, tiny_model, token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@mts.register_method("test_layerwise_nm")
class LayerwiseNM(mts.SparseAttentionMethod):
    """4:8 on the first layer, the configured pattern on the others."""

    def kernel_kwargs(self, module_name, module):
        kw = super().kernel_kwargs(module_name, module)
        if module.layer_idx == 0:
            kw.update(sparsity_n=4, sparsity_m=8)
        return kw


@mts.register_method("test_counting")
class Counting(mts.SparseAttentionMethod):
    """Overrides the computation itself: counts calls, then defers to the kernel."""

    backends = ("auto", "torch")

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def select_backend(self, device):
        return "torch"

    def attention(self, module, q, k, v, batch, **kwargs):
        self.calls.append((q.shape[0], k.shape[0], batch.b_seq_len.tolist()))
        return super().attention(module, q, k, v, batch, **kwargs)


@mts.register_method("test_broken")
class Broken(mts.SparseAttentionMethod):
    def kernel_kwargs(self, module_name, module):
        kw = super().kernel_kwargs(module_name, module)
        kw["sparsity_n"] = kw["sparsity_m"]
        return kw


@mts.register_method("test_extra_key")
class ExtraKey(mts.SparseAttentionMethod):
    def kernel_kwargs(self, module_name, module):
        return {**super().kernel_kwargs(module_name, module), "softcap": 30.0}


@mts.register_method("test_missing_key")
class MissingKey(mts.SparseAttentionMethod):
    def kernel_kwargs(self, module_name, module):
        kw = super().kernel_kwargs(module_name, module)
        del kw["tie_break"]
        return kw


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_per_layer_method_matches_oracle(llama):
    cfg = {"sparse_cfg": {"default": {"method": "test_layerwise_nm", "sparsity_n": 1, "sparsity_m": 4,
                                      "dense_window_size": 0}}}
    model = mts.sparsify(copy.deepcopy(llama), cfg)
    ids = token_ids(2, 40)
    oracle = as_oracle(copy.deepcopy(llama), lambda i: settings(4, 8, 0, 0) if i == 0 else settings(1, 4, 0, 0))
    torch.testing.assert_close(logits(model, ids), logits(oracle, ids), atol=1e-10, rtol=0)
    rows = mts.print_summary(model).splitlines()
    assert "4:8" in rows[2] and "test_layerwise_nm" in rows[2] and "1:4" in rows[3]
    state = mts.sparse_state(model)
    assert state["modules"]["model.layers.0.self_attn"]["kernel_kwargs"]["sparsity_m"] == 8


def test_method_can_override_the_computation(llama):
    cfg = {"sparse_cfg": {"default": {"method": "test_counting"}}}
    model = mts.sparsify(copy.deepcopy(llama), cfg)
    ids = token_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    logits(model, ids, attention_mask=mask)
    method = model.model.layers[0].self_attn._mts_state.method
    # Padded batches keep one block of rows per batch entry; rows past a sequence are padding.
    assert method.calls == [(2 * 12, 2 * 12, [12, 7])]
    assert model.model.layers[1].self_attn._mts_state.method is not method  # one instance per module


def test_invalid_kernel_kwargs_fail_at_conversion(llama):
    model = copy.deepcopy(llama)
    with pytest.raises(ValueError, match=r"Broken.kernel_kwargs\(\) for 'model.layers.0.self_attn'.*0 <= N < M"):
        mts.sparsify(model, {"sparse_cfg": {"default": {"method": "test_broken"}}})
    assert not mts.is_sparsified(model)


@pytest.mark.parametrize("method", ["test_extra_key", "test_missing_key"])
def test_kernel_kwargs_must_have_exactly_the_kernel_keys(llama, method):
    """A key the kernel does not take (or a missing one) is named at conversion, not left
    to fail as a bare TypeError/KeyError inside the first forward."""
    model = copy.deepcopy(llama)
    with pytest.raises(ValueError, match=r"kernel_kwargs\(\) for 'model.layers.0.self_attn' must return a dict with keys"):
        mts.sparsify(model, {"sparse_cfg": {"default": {"method": method}}})
    assert not mts.is_sparsified(model)


@pytest.mark.parametrize("script", ["quickstart.py", "custom_method.py"])
def test_examples_run(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
