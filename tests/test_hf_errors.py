"""Every unsupported input or HuggingFace feature raises a clear error naming it."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import modelopt_sparse as mts
from modelopt_sparse.hf_attention import (
    ATTN_IMPLEMENTATION,
    register_with_transformers,
    sparse_attention_forward,
    sparse_attention_mask,
)

from .hf_tiny import llama, sparse  # noqa: F401  (shared fixtures)
from .hf_tiny import attention_inputs, logits, sparse_cfg, tiny_model, token_ids


def _untouched(model, reference):
    assert not mts.is_sparsified(model)
    assert model.config._attn_implementation == "sdpa"
    for (n1, a), (n2, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_model_without_interface_attention_is_refused():
    """Bloom computes attention itself (ALiBi), so switching attn_implementation would not
    reach it: refused, naming its attention class and the rule."""
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"no supported attention module in BloomForCausalLM.*BloomAttention.*"
                                         r"ALL_ATTENTION_FUNCTIONS"):
        mts.sparsify(bloom, mts.SPARSE_SOFTMAX_DEFAULT)
    with pytest.raises(ValueError, match=r"no supported attention module in Linear; modelopt_sparse converts"):
        mts.sparsify(torch.nn.Linear(2, 2), mts.SPARSE_SOFTMAX_DEFAULT)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mts.sparsify("model", mts.SPARSE_SOFTMAX_DEFAULT)


@mts.register_method("test_causal_only")
class CausalOnly(mts.SparseAttentionMethod):
    """A method written before sliding windows: its attention() takes no sliding_window."""

    def attention(self, module, q, k, v, batch, *, softmax_scale, kernel_kwargs, return_stats):
        return super().attention(module, q, k, v, batch, softmax_scale=softmax_scale, kernel_kwargs=kernel_kwargs,
                                 return_stats=return_stats)


def test_method_without_the_window_keyword_is_refused_for_windowed_layers():
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    reference = copy.deepcopy(model)
    with pytest.raises(NotImplementedError,
                       match=r"model\.layers\.1\.self_attn \(Qwen2Attention\): sliding-window attention "
                             r"\(sliding_window=8\) needs a method whose attention\(\) takes sliding_window; "
                             r"CausalOnly\.attention does not"):
        mts.sparsify(model, sparse_cfg(method="test_causal_only"))
    _untouched(model, reference)
    # The same method converts a model without windows (layer 0 of this one is full).
    mts.sparsify(tiny_model("qwen2"), sparse_cfg(method="test_causal_only"))


def test_invalid_config_leaves_model_unchanged(llama):
    model = copy.deepcopy(llama)
    with pytest.raises(ValueError, match="sparsity_m must be one of"):
        mts.sparsify(model, {"sparse_cfg": {"default": {"sparsity_m": 6}}})
    with pytest.raises(TypeError, match="SparseAttentionConfig or a dict"):
        mts.sparsify(model, ["default"])
    _untouched(model, llama)


def test_output_attentions_is_refused(sparse):
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        sparse(input_ids=token_ids(1, 10), output_attentions=True)


def test_training_dropout_is_refused():
    model = mts.sparsify(tiny_model("llama", attention_dropout=0.1), mts.SPARSE_SOFTMAX_DEFAULT)
    logits(model, token_ids(1, 10))  # eval: transformers passes dropout=0
    model.train()
    with pytest.raises(NotImplementedError, match=r"dropout=0\.1"):
        model(input_ids=token_ids(1, 10))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"position_bias": torch.zeros(1, 4, 8, 8)}, "position_bias"),
        ({"indices": torch.zeros(1, 8, 4, dtype=torch.long)}, r"indices \(keys chosen per query"),
        ({"output_attentions": True}, "output_attentions=True"),
        ({"dropout": 0.2}, r"dropout=0\.2"),
        ({"head_mask": torch.ones(4)}, "head_mask is not supported"),
    ],
)
def test_unsupported_kwargs_raise(sparse, kwargs, match):
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs()
    with pytest.raises(NotImplementedError, match=match):
        sparse_attention_forward(module, q, k, v, None, scaling=0.25, **kwargs)


def test_window_argument_and_mask_window_must_agree():
    """A layer whose own sliding_window differs from the window transformers builds into its
    mask (config.sliding_window): eager/SDPA would apply the mask's, the kernel the argument's."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model.model.layers[1].self_attn.sliding_window = 6
    reference = copy.deepcopy(model)
    with pytest.raises(NotImplementedError,
                       match=r"model\.layers\.1\.self_attn \(Qwen2Attention\): its forward passes sliding_window=6 "
                             r"but its sliding-window mask uses 8 \(config\.sliding_window\)"):
        mts.sparsify(model, mts.SPARSE_SOFTMAX_DEFAULT)
    _untouched(model, reference)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sliding_window": 0}, ValueError, r"sliding_window=0: a window must hold at least the query itself"),
        ({"sliding_window": 4.0}, TypeError, "sliding_window must be an int or None, got float"),
        ({"sliding_window": 4, "is_causal": False}, NotImplementedError,
         r"sliding_window=4 on bidirectional attention \(is_causal=False\) is not supported"),
        ({"softcap": "30"}, TypeError, "softcap must be a float or None, got str"),
        ({"s_aux": torch.zeros(2)}, ValueError, r"s_aux \(learned sinks\) must be a tensor of one logit per query "
                                                r"head, shape \(4,\), got \(2,\)"),
    ],
)
def test_feature_kwargs_are_checked_naming_the_module(sparse, kwargs, error, match):
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs()
    with pytest.raises(error, match=r"model\.layers\.0\.self_attn \(LlamaAttention\): " + match):
        sparse_attention_forward(module, q, k, v, None, scaling=0.25, **kwargs)


def test_unknown_kwarg_warns(sparse):
    q, k, v = attention_inputs()
    with pytest.warns(RuntimeWarning, match="mystery_flag"):
        sparse_attention_forward(sparse.model.layers[0].self_attn, q, k, v, None, mystery_flag=True)


def test_unconverted_module_is_refused(llama):
    register_with_transformers()
    model = copy.deepcopy(llama)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="not converted"):
        logits(model, token_ids(1, 8))


def test_custom_4d_masks(sparse):
    ids = token_ids(1, 10)
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool))[None, None]
    torch.testing.assert_close(logits(sparse, ids, attention_mask=causal), logits(sparse, ids), atol=1e-12, rtol=0)
    additive = torch.zeros(1, 1, 10, 10, dtype=torch.float64).masked_fill(~causal, torch.finfo(torch.float64).min)
    torch.testing.assert_close(logits(sparse, ids, attention_mask=additive), logits(sparse, ids), atol=1e-12, rtol=0)
    holes = causal.clone()
    holes[..., 5, 2] = False
    with pytest.raises(NotImplementedError, match="not the causal mask"):
        logits(sparse, ids, attention_mask=holes)
    bias = additive.clone()
    bias[..., 3, 1] = 0.5
    with pytest.raises(NotImplementedError, match="additive attention biases"):
        logits(sparse, ids, attention_mask=bias)


@pytest.mark.parametrize(
    "batch,kwargs,match",
    [
        (2, {"cu_seq_lens_q": [0, 4, 8], "cu_seq_lens_k": [0, 4, 8]}, "batch size 1"),
        (1, {"cu_seq_lens_q": [0, 4, 8]}, "both cu_seq_lens_q and cu_seq_lens_k"),
        (1, {"cu_seq_lens_q": [0, 4, 7], "cu_seq_lens_k": [0, 4, 7]}, "rise from 0 to the 8"),
        (1, {"cu_seq_lens_q": [0, 5, 4, 8], "cu_seq_lens_k": [0, 5, 4, 8]}, "rise from 0"),
        (1, {"cu_seq_lens_q": [0, 8], "cu_seq_lens_k": [0, 4, 8]}, "different numbers of sequences"),
        (1, {"cu_seq_lens_q": [0, 4, 8], "cu_seq_lens_k": [0, 4, 8], "max_length_q": 3}, "max_length_q=3"),
    ],
)
def test_bad_packing_metadata(sparse, batch, kwargs, match):
    q, k, v = attention_inputs(batch)
    kwargs = {key: torch.tensor(val, dtype=torch.int32) if isinstance(val, list) else val for key, val in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        sparse_attention_forward(sparse.model.layers[0].self_attn, q, k, v, None, **kwargs)


def test_packing_plus_padding_mask_is_refused(sparse):
    q, k, v = attention_inputs()
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="not both"):
        sparse_attention_forward(
            sparse.model.layers[0].self_attn, q, k, v, torch.ones(1, 8, dtype=torch.bool),
            cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        )


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.ones(1, 8, dtype=torch.float64), "not floating point"),
        (torch.ones(2, 8, dtype=torch.bool), "does not fit batch 1"),
        (torch.ones(1, 5, dtype=torch.bool), "does not fit"),
        (torch.ones(1, 8, 8, dtype=torch.bool), "2-D or 4-D"),
    ],
)
def test_bad_masks(sparse, mask, match):
    q, k, v = attention_inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_attention_forward(sparse.model.layers[0].self_attn, q, k, v, mask)


PLACE = "cannot place {q} queries at offset {offset} among {kv} keys \\(kv_offset {kv_offset}\\)"
COVER = "the 2-D attention_mask covers {width} positions but the queries reach position {reach}"


@pytest.mark.parametrize("tensor_offset", [False, True], ids=["int offset", "static cache offset"])
@pytest.mark.parametrize(
    "q,kv,offset,kv_offset,width,match",
    [
        (1, 8, 8, 0, None, PLACE.format(q=1, offset=8, kv=8, kv_offset=0)),  # past the end of the cache
        (1, 8, 8, 0, 12, PLACE.format(q=1, offset=8, kv=8, kv_offset=0)),  # ...with a mask long enough
        (4, 8, 6, 0, 12, PLACE.format(q=4, offset=6, kv=8, kv_offset=0)),  # the queries run past the end
        (1, 8, 2, 3, None, PLACE.format(q=1, offset=2, kv=8, kv_offset=3)),  # before the first key
        (9, 8, 0, 0, None, PLACE.format(q=9, offset=0, kv=8, kv_offset=0)),  # more queries than keys
        (1, 8, 4, 0, 4, COVER.format(width=4, reach=5)),  # the mask ends before the query
        (2, 8, 0, 0, 1, COVER.format(width=1, reach=2)),  # the mask is shorter than the queries
        (1, 8, 5, 2, 5, COVER.format(width=5, reach=6)),  # the mask counts kv_offset positions too
    ],
)
def test_mask_function_refuses_queries_it_cannot_place(tensor_offset, q, kv, offset, kv_offset, width, match):
    """The mask function's placement errors, for a Python offset (raised on the host) and for a
    static cache's device offset (a device check: raised at once on the CPU)."""
    mask = None if width is None else torch.ones(2, width, dtype=torch.bool)
    q_offset = torch.tensor(offset) if tensor_offset else offset
    with pytest.raises(ValueError, match=match):
        sparse_attention_mask(2, q, kv, q_offset=q_offset, kv_offset=kv_offset, attention_mask=mask)


def test_mask_function_places_queries_at_both_bounds():
    """The placement check admits the first and the last slot that fit (off by one either way fails above)."""
    for tensor_offset in (False, True):
        for offset, width in ((0, 8), (7, 8), (3, 4)):
            q_offset = torch.tensor(offset) if tensor_offset else offset
            codes = sparse_attention_mask(1, 1, 8, q_offset=q_offset, attention_mask=torch.ones(1, width, dtype=torch.bool))
            assert codes[0, offset] == 2 and (codes[0, offset + 1:] == 0).all() and (codes[0, :offset] == 1).all()


def test_bad_stats_sink(sparse):
    module = sparse.model.layers[0].self_attn
    module._mts_stats = {}
    q, k, v = attention_inputs()
    with pytest.raises(TypeError, match="_mts_stats must be a list or None"):
        sparse_attention_forward(module, q, k, v, None)


def test_bad_shapes(sparse):
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match="4-D query/key/value"):
        sparse_attention_forward(sparse.model.layers[0].self_attn, q[0], k, v, None)
    with pytest.raises(ValueError, match="only 4 keys"):
        sparse_attention_forward(sparse.model.layers[0].self_attn, q, k[:, :, :4], v[:, :, :4], None)


def test_layout_is_computed_once_per_forward(sparse, monkeypatch):
    from modelopt_sparse.hf_attention import layouts

    calls = []
    original = layouts._codes_layout
    monkeypatch.setattr(layouts, "_codes_layout", lambda *a: calls.append(1) or original(*a))
    ids = token_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits(sparse, ids, attention_mask=mask)
    assert len(calls) == 1  # two layers, one layout


def test_layout_memo_follows_in_place_writes(sparse):
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs(2)
    mask = torch.ones(2, 8, dtype=torch.bool)
    first = sparse_attention_forward(module, q, k, v, mask)[0]
    mask[1, :3] = False  # same tensor object, new version
    second = sparse_attention_forward(module, q, k, v, mask)[0]
    fresh = sparse_attention_forward(module, q, k, v, mask.clone())[0]
    assert torch.equal(second, fresh) and not torch.equal(first, second)


def test_enable_disable_and_summary_argument_errors(sparse, llama, capsys):
    with pytest.raises(TypeError, match="fnmatch string or a callable"):
        mts.enable(sparse, 3)
    assert "not sparsified" in mts.print_summary(copy.deepcopy(llama))
    assert "not sparsified" in capsys.readouterr().out


def _block_causal_by_loop(starts_q, lens_q, starts_k, lens_k, batch, q_len, kv_len):
    """The block-causal mask written out sequence by sequence, as docs/semantics.md states it."""
    keep = torch.zeros(batch * q_len, batch * kv_len, dtype=torch.bool)
    for sq, lq, sk, lk in zip(starts_q, lens_q, starts_k, lens_k):
        for i in range(lq):
            for j in range(lk):
                keep[sq + i, sk + j] = j <= i + lk - lq
    # Rows of one batch entry only ever see keys of the same entry.
    return torch.stack([keep[b * q_len:(b + 1) * q_len, b * kv_len:(b + 1) * kv_len] for b in range(batch)])[:, None]


@pytest.mark.parametrize(
    "batch,q_len,kv_len,seqs",
    [
        (1, 12, 12, [(0, 5, 0, 5), (5, 0, 5, 0), (5, 7, 5, 7)]),  # a zero-length sequence between two
        (2, 6, 6, [(0, 6, 0, 6), (6, 2, 6, 2), (9, 3, 9, 3)]),  # row 8 of entry 1 is in no sequence
        (2, 3, 7, [(0, 3, 0, 7), (3, 2, 7, 5)]),  # chunked: queries end-aligned to their keys
    ],
)
def test_block_causal_mask_matches_a_loop_over_sequences(batch, q_len, kv_len, seqs):
    from modelopt_sparse import PackedBatch
    from modelopt_sparse.hf_attention import _block_causal, _Layout

    sq, lq, sk, lk = (list(col) for col in zip(*seqs))
    meta = PackedBatch(*(torch.tensor(x, dtype=torch.int32) for x in (sq, lq)), max(lq),
                       *(torch.tensor(x, dtype=torch.int32) for x in (sk, lk)), max(lk))
    got = _block_causal(_Layout(meta, kv_len), batch, q_len, kv_len, "cpu")
    assert torch.equal(got, _block_causal_by_loop(sq, lq, sk, lk, batch, q_len, kv_len))


def test_packed_mask_is_checked_once_per_forward(sparse, monkeypatch):
    """position_ids that restart make transformers pass a 4-D block-causal mask to every
    layer; its layout and its check are computed once and reused by the other layers."""
    from modelopt_sparse.hf_attention import layouts

    calls = []
    original = layouts._verify_dense_mask
    monkeypatch.setattr(layouts, "_verify_dense_mask", lambda *a: calls.append(1) or original(*a))
    ids = token_ids(1, 14)
    pos = torch.cat([torch.arange(6), torch.arange(8)])[None]
    logits(sparse, ids, position_ids=pos)
    assert len(calls) == 1 and len(sparse.model.layers) == 2


@pytest.mark.parametrize("mask_dtype", [None, torch.int64, torch.bool])
def test_inference_mode_reads_no_metadata_back(sparse, monkeypatch, mask_dtype):
    """Under torch.inference_mode() the mask and the layout are built outside inference mode,
    so that they keep version counters and the layout memo works; the adapter's metadata is
    valid by construction, so the kernel's host-side metadata check (a device sync) never
    runs, and the logits are those of torch.no_grad()."""
    from modelopt_sparse.hf_attention import layouts
    from modelopt_sparse.kernels import api

    layouts._DENSE_LAYOUTS.clear()  # its tensors were built by earlier tests
    checks = []
    original = api._check_metadata_values
    monkeypatch.setattr(api, "_check_metadata_values", lambda *a: checks.append(1) or original(*a))
    ids = token_ids(2, 12)
    mask = None if mask_dtype is None else torch.tensor([[1] * 12, [0] * 3 + [1] * 9], dtype=mask_dtype)
    with torch.inference_mode():
        got = sparse(input_ids=ids, use_cache=False, attention_mask=None if mask is None else mask.clone()).logits
    assert len(sparse.model.layers) == 2 and checks == []
    torch.testing.assert_close(got, logits(sparse, ids, attention_mask=mask), rtol=0, atol=0)


def test_packed_mask_memo_follows_in_place_writes(sparse):
    """The memo of a verified 4-D mask is keyed by the mask *and* position_ids: rewriting the
    positions in place re-derives the sequences, and a mask that no longer fits is refused."""
    module = sparse.model.layers[0].self_attn
    q, k, v = attention_inputs(1, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    from modelopt_sparse import PackedBatch
    from modelopt_sparse.hf_attention import _block_causal, _Layout

    meta = PackedBatch(torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3, 5], dtype=torch.int32), 5,
                       torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3, 5], dtype=torch.int32), 5)
    mask = _block_causal(_Layout(meta, 8), 1, 8, 8, "cpu")
    sparse_attention_forward(module, q, k, v, mask, position_ids=pos)
    sparse_attention_forward(module, q, k, v, mask, position_ids=pos)  # memo hit
    pos[0, 3:] = torch.arange(3, 8)  # one sequence now: the two-block mask is wrong for it
    with pytest.raises(NotImplementedError, match="not the causal mask"):
        sparse_attention_forward(module, q, k, v, mask, position_ids=pos)
