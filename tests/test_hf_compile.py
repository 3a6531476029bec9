"""A sparsified model under ``torch.compile`` gives the eager model's logits.

The attention function validates metadata on the host, so Dynamo breaks the graph around
it; what must hold is that compiling changes nothing but speed. On CPU the reference
backend runs; on CUDA (gpu-marked) the Triton kernels do.
"""

from __future__ import annotations

import copy

import pytest
import torch

import modelopt_sparse as mts

from .hf_tiny import logits, sparse_cfg, tiny_model, token_ids


def _check(device, backend, dtype, atol):
    torch._dynamo.reset()
    base = tiny_model("llama", dtype=dtype).to(device)
    model = mts.sparsify(copy.deepcopy(base), sparse_cfg(2, 4, sinks=1, window=4, backend=backend))
    ids = token_ids(2, 40).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    want = logits(model, ids, attention_mask=mask)
    compiled = torch.compile(model)
    got = logits(compiled, ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=atol, rtol=0)
    dense = logits(base, ids, attention_mask=mask)
    assert (got[mask.bool()] - dense[mask.bool()]).abs().max() > 10 * atol  # sparsity really applied


def test_compiled_sparsified_model_matches_eager_on_cpu():
    _check("cpu", "torch", torch.float32, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_sparsified_model_matches_eager_triton():
    _check("cuda", "triton", torch.float32, atol=1e-3)
