"""collect_stats on a converted model: counts that add up, restoring the hook, nesting."""

from __future__ import annotations

import math

import pytest
import torch

import modelopt_sparse as mts
from modelopt_sparse.stats import collect_stats

LAYERS, HEADS, KV_HEADS = 3, 4, 2


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=16,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


def _sparsify(model, n, m, sink=0, window=0):
    return mts.sparsify(model, {"sparse_cfg": {"default": {
        "sparsity_n": n, "sparsity_m": m, "num_sink_tokens": sink, "dense_window_size": window,
        "backend": "torch", "enable": True}}})


@pytest.fixture(scope="module")
def model():
    return _model()


def _ids(length, batch=1, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_counts_add_up_over_calls(model):
    _sparsify(model, 2, 4)
    lengths = (40, 17)
    with torch.no_grad(), collect_stats(model) as stats:
        for i, length in enumerate(lengths):
            model(_ids(length, seed=i))
    assert stats.has_data
    per_layer = stats.per_layer()
    assert [r["layer"] for r in per_layer] == list(range(LAYERS))
    assert [r["module"] for r in per_layer] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    causal_pairs = sum(L * (L + 1) // 2 for L in lengths)
    for row in per_layer:
        # Every head of every call: all causal pairs allowed, one row per query.
        assert row["allowed"] == HEADS * causal_pairs
        assert row["rows"] == HEADS * sum(lengths)
        assert row["allowed"] > row["kept"] > row["allowed"] // 2 - HEADS * sum(lengths)
        assert 0 < row["dropped_mass"] < 1
    heads = stats.per_head()
    assert len(heads) == LAYERS * HEADS
    assert sum(h["kept"] for h in heads) == sum(r["kept"] for r in per_layer)
    total = stats.total()
    assert total["kept_fraction"] == pytest.approx(
        sum(r["kept"] for r in per_layer) / sum(r["allowed"] for r in per_layer))
    assert total["dropped_mass"] == pytest.approx(
        sum(h["dropped_mass"] * h["rows"] for h in heads) / sum(h["rows"] for h in heads))
    table = stats.table()
    assert "kept_fraction" in table and "model.layers.2.self_attn" in table and "(all)" in table
    assert len(stats.table(by="head").splitlines()) == 2 + LAYERS * HEADS + 2
    with pytest.raises(ValueError, match="by must be"):
        stats.table(by="token")


def test_dense_keeps_everything_and_drops_nothing(model):
    _sparsify(model, 0, 4)
    with torch.no_grad(), collect_stats(model) as stats:
        model(_ids(33))
    total = stats.total()
    assert total["kept_fraction"] == 1.0 and total["dropped_mass"] == 0.0


def test_hook_is_restored_and_stats_stay_readable(model):
    _sparsify(model, 1, 4)
    modules = [m for _, m in model.named_modules() if hasattr(m, "_mts_stats")]
    assert len(modules) == LAYERS and all(m._mts_stats is None for m in modules)
    with torch.no_grad(), collect_stats(model) as stats:
        model(_ids(20))
        assert all(isinstance(m._mts_stats, list) for m in modules)
    assert all(m._mts_stats is None for m in modules)
    before = stats.total()
    with torch.no_grad():
        model(_ids(20))  # outside the block: not counted
    assert stats.total() == before
    stats.reset()
    assert not stats.has_data and math.isnan(stats.total()["kept_fraction"])
    assert "no attention call" in stats.table()


def test_nested_blocks_both_see_inner_calls(model):
    _sparsify(model, 2, 8)
    with torch.no_grad(), collect_stats(model) as outer:
        model(_ids(24, seed=3))
        with collect_stats(model) as inner:
            model(_ids(24, seed=4))
        _ = inner.total()  # reading the inner block must not hide its calls from the outer one
    assert inner.per_layer()[0]["rows"] == HEADS * 24
    assert outer.per_layer()[0]["rows"] == HEADS * 48


def test_stats_are_off_outside_and_do_not_change_outputs(model):
    _sparsify(model, 2, 4, sink=2, window=4)
    ids = _ids(30)
    with torch.no_grad():
        plain = model(ids).logits
        with collect_stats(model):
            counted = model(ids).logits
    torch.testing.assert_close(plain, counted, rtol=0, atol=0)


def test_unsparsified_model_is_refused():
    with pytest.raises(ValueError, match="call modelopt_sparse.sparsify"):
        with collect_stats(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with collect_stats("model"):
            pass


def test_exported_from_the_package():
    assert mts.collect_stats is collect_stats
