"""sparsify() on tiny HuggingFace models: numerics against an independent oracle, padding,
packing, caches, enable/disable, statistics and per-model isolation (CPU, float64)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import modelopt_sparse as mts
from modelopt_sparse.hf_attention import ATTN_IMPLEMENTATION

from .hf_tiny import CACHE_KW, as_oracle, logits, settings, sparse_cfg, tiny_model, token_ids

ATOL = 1e-10


def _oracle_logits(model, ids, per_layer):
    oracle = as_oracle(copy.deepcopy(model), per_layer)
    return logits(oracle, ids)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# --------------------------------------------------------------------------------------
# Against the oracle
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,m,sinks,window",
    [
        (2, 4, 0, 0), (2, 4, 0, 8), (2, 4, 3, 0), (2, 4, 3, 8),
        (4, 8, 0, 0), (4, 8, 2, 5), (1, 8, 0, 4),
        (8, 16, 0, 0), (8, 16, 4, 6), (3, 16, 1, 0),
    ],
)
def test_logits_match_oracle(llama, n, m, sinks, window):
    ids = token_ids(2, 45)
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(n, m, sinks, window))
    want = _oracle_logits(llama, ids, lambda i: settings(n, m, sinks, window))
    got = logits(sparse, ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    dense = logits(llama, ids)
    assert (got - dense).abs().max() > 1e-3, "sparsity had no visible effect: the test would prove nothing"


def test_index_tie_break_matches_oracle(llama):
    ids = token_ids(1, 33)
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 1, 4, tie_break="index"))
    want = _oracle_logits(llama, ids, lambda i: settings(2, 4, 1, 4, "index"))
    torch.testing.assert_close(logits(sparse, ids), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_match_oracle(family):
    model = tiny_model(family)
    ids = token_ids(2, 30)
    sparse = mts.sparsify(copy.deepcopy(model), sparse_cfg(2, 4, 1, 4))
    want = _oracle_logits(model, ids, lambda i: settings(2, 4, 1, 4))
    torch.testing.assert_close(logits(sparse, ids), want, atol=ATOL, rtol=0)


def test_reference_method_matches_oracle(llama):
    ids = token_ids(2, 30)
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(4, 8, 0, 4, method="torch_sparse_softmax"))
    want = _oracle_logits(llama, ids, lambda i: settings(4, 8, 0, 4))
    torch.testing.assert_close(logits(sparse, ids), want, atol=ATOL, rtol=0)


def test_pattern_overrides_per_layer(llama):
    cfg = {"sparse_cfg": {
        "default": {"sparsity_n": 4, "sparsity_m": 8, "dense_window_size": 0},
        "*layers.1.*": {"sparsity_n": 2},  # keeps M=8 and window=0 from the default
        "*layers.0.*": {"enable": False},
    }}
    sparse = mts.sparsify(copy.deepcopy(llama), cfg)
    ids = token_ids(1, 40)
    want = _oracle_logits(llama, ids, lambda i: settings(0, 8, 0, 0) if i == 0 else settings(2, 8, 0, 0))
    torch.testing.assert_close(logits(sparse, ids), want, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------
# Dense paths
# --------------------------------------------------------------------------------------
# transformers' eager attention takes its softmax in float32 even for float64 models.
@pytest.mark.parametrize("impl,atol", [("sdpa", ATOL), ("eager", 1e-4)])
def test_disable_restores_dense_logits(llama, impl, atol):
    ids = token_ids(2, 37)
    base = copy.deepcopy(llama)
    base.set_attn_implementation(impl)
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 8))
    assert mts.disable(sparse) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    torch.testing.assert_close(logits(sparse, ids), logits(base, ids), atol=atol, rtol=0)
    mts.enable(sparse)
    assert (logits(sparse, ids) - logits(base, ids)).abs().max() > 1e-3


def test_disable_by_pattern(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 0))
    assert mts.disable(sparse, "*layers.1.*") == ["model.layers.1.self_attn"]
    ids = token_ids(1, 40)
    want = _oracle_logits(llama, ids, lambda i: settings(2, 4, 0, 0) if i == 0 else settings(0, 4))
    torch.testing.assert_close(logits(sparse, ids), want, atol=ATOL, rtol=0)
    assert mts.enable(sparse, lambda name: name.endswith("1.self_attn")) == ["model.layers.1.self_attn"]
    want = _oracle_logits(llama, ids, lambda i: settings(2, 4, 0, 0))
    torch.testing.assert_close(logits(sparse, ids), want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="matches no sparse attention module"):
        mts.disable(sparse, "*nothing*")
    with pytest.raises(ValueError, match="not sparsified"):
        mts.disable(copy.deepcopy(llama))


def test_unmatched_modules_run_dense(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), {"sparse_cfg": {"*layers.0.*": {"dense_window_size": 0}}})
    ids = token_ids(1, 40)
    want = _oracle_logits(llama, ids, lambda i: settings(2, 4, 0, 0) if i == 0 else settings(0, 4))
    torch.testing.assert_close(logits(sparse, ids), want, atol=ATOL, rtol=0)
    text = mts.print_summary(sparse)
    assert "(none: dense)" in text and "1 sparse, 1 dense" in text


# --------------------------------------------------------------------------------------
# Padding, packing, caches
# --------------------------------------------------------------------------------------
def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_unpadded(llama, side):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 1, 3))
    lengths = [29, 17, 23]
    seqs = [token_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    got = logits(sparse, ids, attention_mask=mask, position_ids=_positions(mask))
    assert torch.isfinite(got).all()
    for b, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        alone = logits(sparse, s[None])
        torch.testing.assert_close(got[b, sl], alone[0], atol=ATOL, rtol=0)


def test_fully_padded_rows_give_zeros_not_nan(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), mts.SPARSE_SOFTMAX_DEFAULT)
    module = sparse.model.layers[0].self_attn
    q = torch.randn(3, 4, 6, 16, dtype=torch.float64)
    k = torch.randn(3, 2, 6, 16, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :4] = False
    mask[2] = False  # a sequence with no token at all
    from modelopt_sparse.hf_attention import sparse_attention_forward

    out, weights = sparse_attention_forward(module, q, k, k, mask, scaling=0.25)
    assert weights is None and out.shape == (3, 6, 4, 16)
    assert torch.isfinite(out).all() and (out[1, :4] == 0).all() and (out[1, 4:] != 0).any()
    assert (out[2] == 0).all()


def test_packed_cu_seq_lens_equals_separate(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 2))
    lengths = [13, 21, 8]
    seqs = [token_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 13, 34, 42], dtype=torch.int32)
    kw = dict(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=21, max_length_k=21)
    for use_cache in (True, False):  # without a cache transformers also builds a packed mask
        with torch.no_grad():
            got = sparse(input_ids=ids, use_cache=use_cache, **kw).logits
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            torch.testing.assert_close(got[0, a:b], logits(sparse, s[None])[0], atol=ATOL, rtol=0)


def test_packed_by_position_ids_equals_separate(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 2))
    lengths = [11, 19]
    seqs = [token_ids(1, n, seed=30 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    got = logits(sparse, ids, position_ids=pos)  # use_cache=False: transformers detects packing
    torch.testing.assert_close(got[0, :11], logits(sparse, seqs[0][None])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[0, 11:], logits(sparse, seqs[1][None])[0], atol=ATOL, rtol=0)


def test_chunked_prefill_matches_full_prefill(llama):
    """Queries after a cached prefix are aligned to the end of the keys: same groups, same logits."""
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 1, 3))
    ids = token_ids(2, 40)
    full = logits(sparse, ids)
    with torch.no_grad():
        first = sparse(input_ids=ids[:, :25], use_cache=True)
        second = sparse(input_ids=ids[:, 25:], **{CACHE_KW: first.past_key_values}, use_cache=True)
    torch.testing.assert_close(second.logits, full[:, 25:], atol=ATOL, rtol=0)


def test_decode_steps_are_dense(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 0))
    ids = token_ids(2, 30)
    with torch.no_grad():
        prefill = sparse(input_ids=ids[:, :-1], use_cache=True)
        cache = prefill.past_key_values
        sparse_step = sparse(input_ids=ids[:, -1:], **{CACHE_KW: copy.deepcopy(cache)}, use_cache=True).logits
        mts.disable(sparse)
        dense_step = sparse(input_ids=ids[:, -1:], **{CACHE_KW: copy.deepcopy(cache)}, use_cache=True).logits
    torch.testing.assert_close(sparse_step, dense_step, atol=ATOL, rtol=0)


def test_generate_left_padded_batch_equals_single(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 2))
    a, b = token_ids(1, 21, seed=40)[0], token_ids(1, 14, seed=41)[0]
    ids = torch.zeros(2, 21, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, 7:], mask[1, 7:] = b, 1
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = sparse.generate(input_ids=ids, attention_mask=mask, **gen)[:, 21:]
        alone_a = sparse.generate(input_ids=a[None], attention_mask=torch.ones(1, 21, dtype=torch.long), **gen)
        alone_b = sparse.generate(input_ids=b[None], attention_mask=torch.ones(1, 14, dtype=torch.long), **gen)
    assert torch.equal(batch[0], alone_a[0, 21:])
    assert torch.equal(batch[1], alone_b[0, 14:])


def test_static_cache_generate_equals_dynamic(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 2))
    ids = token_ids(2, 18)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        dynamic = sparse.generate(input_ids=ids, **gen)
        static = sparse.generate(input_ids=ids, cache_implementation="static", **gen)
    assert torch.equal(dynamic, static)


def test_training_backward_flows(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 2))
    sparse.train()
    ids = token_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    loss = sparse(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grad = sparse.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# Statistics hook, summary, isolation
# --------------------------------------------------------------------------------------
def test_stats_hook(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 0))
    modules = [m for _, m in sparse.named_modules() if hasattr(m, "_mts_stats")]
    assert len(modules) == 2 and all(m._mts_stats is None for m in modules)
    modules[0]._mts_stats = []
    logits(sparse, token_ids(2, 20))
    (stats,) = modules[0]._mts_stats
    assert set(stats) >= {"allowed", "kept", "rows", "dropped_mass"}
    assert stats["kept"].shape == (4,) and (stats["kept"] < stats["allowed"]).all()
    assert modules[1]._mts_stats is None


def test_print_summary_and_is_sparsified(llama, capsys):
    model = copy.deepcopy(llama)
    assert not mts.is_sparsified(model)
    mts.sparsify(model, mts.SPARSE_SOFTMAX_4_8)
    assert mts.is_sparsified(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    mts.disable(model, "*layers.0.*")
    text = mts.print_summary(model)
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["module", "class", "method", "pattern", "backend", "N:M", "sinks", "window",
                                "attention", "enabled"]
    assert "model.layers.0.self_attn" in lines[2] and "dense" in lines[2] and "no" in lines[2]
    assert "4:8" in lines[3] and "auto->torch" in lines[3] and "LlamaAttention" in lines[3]
    assert " causal " in lines[3]


def test_two_models_do_not_share_flags(llama):
    a = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 0))
    b = mts.sparsify(copy.deepcopy(llama), sparse_cfg(8, 16, 0, 0))
    ids = token_ids(2, 36)
    want_a = _oracle_logits(llama, ids, lambda i: settings(2, 4, 0, 0))
    want_b = _oracle_logits(llama, ids, lambda i: settings(8, 16, 0, 0))
    mts.disable(b, "*layers.0.*")
    want_b0 = _oracle_logits(llama, ids, lambda i: settings(0, 16) if i == 0 else settings(8, 16, 0, 0))
    torch.testing.assert_close(logits(a, ids), want_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(b, ids), want_b0, atol=ATOL, rtol=0)
    mts.enable(b)

    results, errors = {}, []

    def run(name, model):
        try:
            for _ in range(3):
                results.setdefault(name, []).append(logits(model, ids))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n, m)) for n, m in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for out in results["a"]:
        torch.testing.assert_close(out, want_a, atol=ATOL, rtol=0)
    for out in results["b"]:
        torch.testing.assert_close(out, want_b, atol=ATOL, rtol=0)


def test_sparsify_again_replaces_settings(llama):
    model = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 0))
    mts.sparsify(model, sparse_cfg(4, 8, 0, 0))
    ids = token_ids(1, 30)
    want = _oracle_logits(llama, ids, lambda i: settings(4, 8, 0, 0))
    torch.testing.assert_close(logits(model, ids), want, atol=ATOL, rtol=0)
    assert type(model.model.layers[0].self_attn).__name__ == "SparseLlamaAttention"


def test_state_dict_keys_unchanged(llama):
    model = mts.sparsify(copy.deepcopy(llama), mts.SPARSE_SOFTMAX_DEFAULT)
    assert list(model.state_dict()) == list(llama.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in llama.named_parameters()]
    assert isinstance(model.model.layers[0].self_attn, type(llama.model.layers[0].self_attn))


def test_mask_with_holes_equals_sequence_without_them(llama):
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 1, 2))
    ids = token_ids(1, 24, seed=60)
    mask = torch.ones_like(ids)
    mask[0, [5, 6, 13]] = 0
    got = logits(sparse, ids, attention_mask=mask, position_ids=_positions(mask))
    alone = logits(sparse, ids[mask.bool()][None])
    torch.testing.assert_close(got[mask.bool()], alone[0], atol=ATOL, rtol=0)


def test_decode_after_right_padding_equals_single(llama):
    """A token decoded after a right-padded prompt leaves a hole of padding in the cache."""
    sparse = mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 2))
    a, b = token_ids(1, 19, seed=70)[0], token_ids(1, 12, seed=71)[0]
    ids = torch.zeros(2, 19, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, :11], mask[1, :11] = b[:11], 1
    step = torch.tensor([[5], [int(b[11])]])
    with torch.no_grad():
        cache = sparse(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True).past_key_values
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        got = sparse(input_ids=step, attention_mask=mask2, position_ids=torch.tensor([[19], [11]]),
                     use_cache=True, **{CACHE_KW: cache}).logits
    for row, prompt in ((0, a), (1, b[:11])):
        # The reference: the same prompt alone, then the same (dense) decode step.
        with torch.no_grad():
            alone = sparse(input_ids=prompt[None], use_cache=True).past_key_values
            want = sparse(input_ids=step[row : row + 1], use_cache=True, **{CACHE_KW: alone}).logits
        torch.testing.assert_close(got[row], want[0], atol=ATOL, rtol=0)
