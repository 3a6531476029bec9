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
# Causality: the module's is_causal flag and the is_causal kwarg (SDPA's precedence)
# --------------------------------------------------------------------------------------
def _oracle_rows(q, k, v, lens, causal):
    """tests/oracle.py on the real rows of a [B, H, S, D] batch (``lens`` real tokens per
    row, left-padded), back in [B, S, H, D] with zero padded rows."""
    from .oracle import oracle_attention

    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
    for b, n in enumerate(lens):
        rows = slice(q.shape[2] - n, q.shape[2])
        got, _, _ = oracle_attention(
            q[b, :, rows].transpose(0, 1), k[b, :, rows].transpose(0, 1), v[b, :, rows].transpose(0, 1),
            [n], [n], causal=causal, scale=0.25, n=2, m=4, sink=0, window=2, tie_break="threshold")
        out[b, rows] = got
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_is_causal_follows_module_flag_then_kwarg(sparse, padded):
    """transformers passes no is_causal kwarg to the attention function for most models: the
    module's own flag decides, and an explicit kwarg overrides it (as in transformers' SDPA
    integration). Non-causal rows see every real key of their sequence, padding excluded."""
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs(2, 12)
    lens = [12, 9] if padded else [12, 12]
    mask = None
    if padded:
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, :3] = False
    causal = _oracle_rows(q, k, v, lens, True)
    bidirectional = _oracle_rows(q, k, v, lens, False)
    assert (causal - bidirectional).abs().max() > 1e-3
    call = lambda **kw: sparse_attention_forward(module, q, k, v, mask, scaling=0.25, **kw)[0]  # noqa: E731
    torch.testing.assert_close(call(), causal, atol=ATOL, rtol=0)
    torch.testing.assert_close(call(is_causal=False), bidirectional, atol=ATOL, rtol=0)
    module.is_causal = False
    try:
        torch.testing.assert_close(call(), bidirectional, atol=ATOL, rtol=0)
        torch.testing.assert_close(call(is_causal=None), bidirectional, atol=ATOL, rtol=0)
        torch.testing.assert_close(call(is_causal=True), causal, atol=ATOL, rtol=0)
    finally:
        module.is_causal = True


def test_non_causal_4d_mask_must_be_bidirectional(sparse):
    """A materialized 4-D mask is checked against what the module computes: the all-ones
    mask for a bidirectional call, the causal one for a causal call."""
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs(1, 8)
    full = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    causal = torch.tril(full)
    want = sparse_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=False)[0]
    got = sparse_attention_forward(module, q, k, v, full, scaling=0.25, is_causal=False)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with pytest.raises(NotImplementedError, match="not the bidirectional mask"):
        sparse_attention_forward(module, q, k, v, causal, scaling=0.25, is_causal=False)
    with pytest.raises(NotImplementedError, match="not the causal mask"):
        sparse_attention_forward(module, q, k, v, full, scaling=0.25)


def test_non_causal_needs_a_method_that_takes_is_causal(llama):
    """A custom method whose attention() predates the keyword is refused for bidirectional
    modules at conversion, naming the module, its class and the feature."""

    @mts.register_method("test_no_is_causal", overwrite=True)
    class NoIsCausal(mts.SparseAttentionMethod):
        def attention(self, module, q, k, v, batch, *, softmax_scale, kernel_kwargs, return_stats):
            return super().attention(module, q, k, v, batch, softmax_scale=softmax_scale,
                                     kernel_kwargs=kernel_kwargs, return_stats=return_stats)

    model = copy.deepcopy(llama)
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    with pytest.raises(NotImplementedError,
                       match=r"model\.layers\.0\.self_attn \(LlamaAttention\): bidirectional attention"):
        mts.sparsify(model, sparse_cfg(method="test_no_is_causal"))
    assert not mts.is_sparsified(model)
    # Causal modules keep working with it.
    mts.sparsify(copy.deepcopy(llama), sparse_cfg(method="test_no_is_causal"))


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


# --------------------------------------------------------------------------------------
# Sliding windows: transformers' masks against the window the module passes
# --------------------------------------------------------------------------------------
def test_only_the_plain_sliding_window_mask_is_recognized():
    """The mask function keeps padding codes only for transformers' plain
    sliding_window_causal_mask_function(W); compositions (packing, chunking, bidirectional
    windows) are other functions and are materialized and checked instead."""
    from transformers import masking_utils as mu

    from modelopt_sparse.hf_attention import sliding_window_of

    assert sliding_window_of(mu.sliding_window_causal_mask_function(8)) == 8
    packed = mu.and_masks(mu.sliding_window_causal_mask_function(8), mu.packed_sequence_mask_function(torch.zeros(1, 4)))
    for other in (mu.causal_mask_function, mu.sliding_window_bidirectional_mask_function(8),
                  mu.chunked_causal_mask_function(8, torch.zeros(1, dtype=torch.long)), packed,
                  mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(8))):
        assert sliding_window_of(other) is None


def test_packed_sequences_in_a_sliding_window_model_equal_separate_runs():
    """position_ids that restart: transformers composes a packed sliding-window mask, which
    the adapter checks against block-causal within the module's window, then runs packed."""
    model = mts.sparsify(tiny_model("mistral", sliding_window=6), sparse_cfg(2, 4, 1, 2))
    seqs = [token_ids(1, n, seed=60 + i) for i, n in enumerate((11, 17))]
    pos = torch.cat([torch.arange(11), torch.arange(17)])[None]
    packed = logits(model, torch.cat(seqs, 1), position_ids=pos)
    torch.testing.assert_close(packed[0, :11], logits(model, seqs[0])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[0, 11:], logits(model, seqs[1])[0], atol=ATOL, rtol=0)


def test_4d_mask_with_another_window_is_refused():
    model = mts.sparsify(tiny_model("mistral", sliding_window=6), sparse_cfg(2, 4, 1, 2))
    module = model.model.layers[0].self_attn
    q, k, v = attention_inputs(1, 12)
    rows, cols = torch.arange(12)[:, None], torch.arange(12)[None, :]
    for window in (6, 5, 7):
        mask = ((cols <= rows) & (rows - cols < window))[None, None]
        if window == 6:
            want = sparse_attention_forward(module, q, k, v, None, scaling=0.25, sliding_window=6)[0]
            got = sparse_attention_forward(module, q, k, v, mask, scaling=0.25, sliding_window=6)[0]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            continue
        with pytest.raises(NotImplementedError, match="not the causal mask of one sequence per row "
                                                      "\\(no position_ids\\) within a sliding window of 6"):
            sparse_attention_forward(module, q, k, v, mask, scaling=0.25, sliding_window=6)


def test_window_decode_step_is_dense_within_the_window():
    """A decode step of a windowed layer keeps every key inside the window and none outside,
    whatever the pattern (the decode guard), through a cache that keeps the window only:
    it equals the last row of a dense forward without a cache."""
    model = mts.sparsify(tiny_model("mistral", sliding_window=6), sparse_cfg(2, 4, 0, 0))
    ids = token_ids(2, 21)
    mts.disable(model)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values  # dense prefill
        full = logits(model, ids)[:, -1:]
        mts.enable(model)
        step = model(input_ids=ids[:, -1:], use_cache=True, **{CACHE_KW: cache}).logits
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


def test_chunk_after_a_sliding_cache_dropped_keys():
    """A 3-token chunk after 20 cached tokens: transformers' cache for the sliding layers
    kept the last 7 keys, so the groups would count from the first cached key. Refused;
    with a cache that keeps every key the chunk equals the same rows of a full forward."""
    from transformers import DynamicCache

    model = mts.sparsify(tiny_model("mistral", sliding_window=8), sparse_cfg(2, 4, 0, 2))
    ids = token_ids(2, 23)
    full = logits(model, ids)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :20], use_cache=True).past_key_values
        with pytest.raises(NotImplementedError,
                           match=r"model\.layers\.0\.self_attn \(MistralAttention\): a chunk of queries after a "
                                 r"sliding-window cache that dropped the oldest keys: N:M groups would count"):
            model(input_ids=ids[:, 20:], use_cache=True, **{CACHE_KW: cache})
        keep_all = DynamicCache()
        model(input_ids=ids[:, :20], use_cache=True, **{CACHE_KW: keep_all})
        chunk = model(input_ids=ids[:, 20:], use_cache=True, **{CACHE_KW: keep_all}).logits
    torch.testing.assert_close(chunk, full[:, 20:], atol=ATOL, rtol=0)
