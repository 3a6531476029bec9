"""Edge cases of the HuggingFace adapter: layout memo keys, 4-D mask checks on every path,
static caches without padding, unsupported inputs, and short query chunks after a cache."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import StaticCache

import modelopt_sparse as mts
from modelopt_sparse.hf_attention import sparse_attention_forward

from .hf_tiny import llama, sparse  # noqa: F401  (shared fixtures)
from .hf_tiny import attention_inputs, CACHE_KW, logits, sparse_cfg, tiny_model, token_ids

ATOL = 1e-10


# --------------------------------------------------------------------------------------
# Layout memo
# --------------------------------------------------------------------------------------
def test_layout_memo_is_keyed_by_query_length(sparse):
    """One 2-D mask object reused with fewer queries: the memo of the 8-query layout must
    not be served for 4 queries."""
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs(2)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    sparse_attention_forward(module, q, k, v, mask)  # memoizes the 8-query layout on `mask`
    tail = q[:, :, 4:]
    second = sparse_attention_forward(module, tail, k, v, mask)[0]
    fresh = sparse_attention_forward(module, tail, k, v, mask.clone())[0]
    assert second.shape == (2, 4, 4, 16)
    assert torch.equal(second, fresh)


def test_packed_mask_memo_is_keyed_by_position_ids_object(sparse):
    """A block-causal mask verified for two packed sequences must be checked again when it
    comes with a different position_ids tensor (one sequence): it is not that causal mask."""
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs(1, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:3, :3] = causal[:3, :3]
    mask[3:, 3:] = causal[:5, :5]
    mask = mask[None, None]
    sparse_attention_forward(module, q, k, v, mask, position_ids=pos)  # verified and memoized
    with pytest.raises(NotImplementedError, match="not the causal mask of packed sequences found in position_ids"):
        sparse_attention_forward(module, q, k, v, mask, position_ids=torch.arange(8)[None])


# --------------------------------------------------------------------------------------
# 4-D masks that allow more than causal
# --------------------------------------------------------------------------------------
def test_all_true_4d_mask_with_cu_seq_lens_is_refused(sparse):
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs(1, 8)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="not the causal mask of cu_seq_lens_q/k"):
        sparse_attention_forward(module, q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool),
                                 cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_all_true_4d_mask_in_model_forward_is_refused(sparse):
    with pytest.raises(NotImplementedError, match="not the causal mask"):
        logits(sparse, token_ids(1, 10), attention_mask=torch.ones(1, 1, 10, 10, dtype=torch.bool))


# --------------------------------------------------------------------------------------
# Static cache without padding
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True], ids=["mask_none", "mask_all_ones"])
def test_static_cache_unpadded_equals_no_cache(sparse, with_mask):
    """18 tokens in a 32-slot static cache: the 14 empty slots must be dropped."""
    ids = token_ids(2, 18)
    want = logits(sparse, ids)
    cache = StaticCache(config=sparse.config, max_cache_len=32)
    mask = torch.ones_like(ids) if with_mask else None
    with torch.no_grad():
        got = sparse(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_KW: cache}).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------
# Unsupported inputs (the keyword-argument ones are in test_hf_errors.py)
# --------------------------------------------------------------------------------------
def test_non_causal_module_is_refused(sparse):
    """transformers passes no is_causal kwarg to the attention function: the module's own
    is_causal flag must be checked."""
    sparse.model.layers[0].self_attn.is_causal = False
    with pytest.raises(NotImplementedError, match="is_causal=False"):
        logits(sparse, token_ids(1, 10))


# --------------------------------------------------------------------------------------
# Short query chunks after a cache
# --------------------------------------------------------------------------------------
def test_two_token_chunk_after_prefill_is_sparse(llama):
    """Only single-token decode steps run dense; a 2-token chunk is sparse like the same
    rows of a full forward."""
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 0))
    ids = token_ids(2, 30)
    full = logits(sparse, ids)
    with torch.no_grad():
        cache = sparse(input_ids=ids[:, :28], use_cache=True).past_key_values
        chunk = sparse(input_ids=ids[:, 28:], use_cache=True, **{CACHE_KW: copy.deepcopy(cache)}).logits
        mts.disable(sparse)
        dense_chunk = sparse(input_ids=ids[:, 28:], use_cache=True, **{CACHE_KW: copy.deepcopy(cache)}).logits
    torch.testing.assert_close(chunk, full[:, 28:], atol=ATOL, rtol=0)
    assert (chunk - dense_chunk).abs().max() > 1e-3, "dense and sparse agree: the test would prove nothing"


# --------------------------------------------------------------------------------------
# Packing metadata
# --------------------------------------------------------------------------------------
def test_packed_sequence_with_more_queries_than_keys_is_refused(sparse):
    q, k, v = attention_inputs(1, 8)
    with pytest.raises(ValueError, match="a packed sequence has more queries than keys"):
        sparse_attention_forward(
            sparse.model.layers[0].self_attn, q, k, v, None,
            cu_seq_lens_q=torch.tensor([0, 5, 8], dtype=torch.int32),
            cu_seq_lens_k=torch.tensor([0, 4, 8], dtype=torch.int32),
        )
