"""Converting a model never changes a config object that another model (or the caller) holds.

HF models built from one config object share it: ``LlamaForCausalLM(cfg)`` twice gives two
models whose modules all read ``cfg``. Conversion switches ``_attn_implementation`` and adds
the ``modelopt_sparse`` record, so it must do that on a private copy.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import modelopt_sparse as mts

from .hf_tiny import logits, sparse_cfg, tiny_config, token_ids

CFG = sparse_cfg(2, 4, 0, 2)


def _twins(attn_implementation="sdpa", family="llama"):
    """Two models built from one config object (different weights)."""
    cfg = tiny_config(family, attn_implementation=attn_implementation)
    cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    torch.manual_seed(0)
    a = cls(cfg).double().eval()
    torch.manual_seed(1)
    b = cls(cfg).double().eval()
    assert a.config is b.config is cfg
    return cfg, a, b


def _configs_held(model):
    return [(n, m.config) for n, m in model.named_modules() if getattr(m, "config", None) is not None]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sibling_sharing_the_config_is_unaffected(impl):
    cfg, a, b = _twins(impl)
    ids = token_ids(2, 24)
    want_b, dense_a = logits(b, ids), logits(a, ids)
    mts.sparsify(a, CFG)
    assert cfg._attn_implementation == impl and not hasattr(cfg, mts.conversion.HF_CONFIG_ATTR)
    torch.testing.assert_close(logits(b, ids), want_b, atol=0, rtol=0)
    assert not mts.is_sparsified(b)
    # The converted model holds only its own copy, in every module.
    assert all(c is a.config for _, c in _configs_held(a)) and a.config is not cfg
    assert a.config._attn_implementation == "modelopt_sparse"
    assert not torch.allclose(logits(a, ids), dense_a)


def test_sibling_save_pretrained_has_no_sparse_entry(tmp_path):
    _, a, b = _twins()
    mts.sparsify(a, CFG)
    b.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "modelopt_sparse" not in saved
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    with pytest.raises(ValueError, match="has no 'modelopt_sparse' entry"):
        mts.restore_from_pretrained(reloaded)
    assert not mts.is_sparsified(reloaded)


def test_sparsified_twin_still_round_trips(tmp_path):
    _, a, b = _twins()
    ids = token_ids(2, 24)
    mts.sparsify(a, CFG)
    want = logits(a, ids)
    a.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    mts.restore_from_pretrained(loaded)
    torch.testing.assert_close(logits(loaded, ids), want, atol=0, rtol=0)
    mts.save(a, tmp_path / "mts")
    _, c, d = _twins()
    d_before = logits(d, ids)
    mts.restore(c, tmp_path / "mts")
    torch.testing.assert_close(logits(c, ids), want, atol=0, rtol=0)
    torch.testing.assert_close(logits(d, ids), d_before, atol=0, rtol=0)


@pytest.mark.parametrize("restore", ["state", "pretrained"])
def test_restore_paths_copy_the_config_too(restore):
    _, a, b = _twins()
    mts.sparsify(a, CFG)
    cfg, c, d = _twins()
    ids = token_ids(1, 16)
    want_d = logits(d, ids)
    if restore == "state":
        mts.restore_from_state(c, mts.sparse_state(a))
    else:
        # The record sits in the shared config, as from_pretrained would have put it.
        cfg.modelopt_sparse = mts.sparse_state(a)
        mts.restore_from_pretrained(c)
        del cfg.modelopt_sparse
    assert mts.is_sparsified(c) and c.config is not cfg
    assert cfg._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(d, ids), want_d, atol=0, rtol=0)


def test_enable_disable_and_resparsify_keep_the_private_copy():
    _, a, b = _twins()
    mts.sparsify(a, CFG)
    own = a.config
    mts.disable(a)
    mts.sparsify(a, CFG)  # already private: no further copy needed
    assert a.config is own and all(c is own for _, c in _configs_held(a))
    assert not hasattr(b.config, mts.conversion.HF_CONFIG_ATTR)


def test_composite_model_sub_configs_are_repointed():
    """Modules of a composite model hold sub-configs (``text_config``, ``vision_config``): each
    must be swapped for the matching sub-config of the copy, not for a copy of its own."""
    cfg = transformers.LlavaConfig(
        text_config=tiny_config("llama").to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2, image_size=30, patch_size=2),
        image_token_index=95,
    )
    torch.manual_seed(0)
    a = transformers.LlavaForConditionalGeneration(cfg).double().eval()
    b = transformers.LlavaForConditionalGeneration(cfg).double().eval()
    ids = token_ids(1, 16)
    want_b = logits(b, ids)
    text_before = cfg.text_config._attn_implementation
    mts.sparsify(a, CFG)
    assert cfg.text_config._attn_implementation == text_before
    assert cfg.vision_config._attn_implementation == text_before
    assert not hasattr(cfg, mts.conversion.HF_CONFIG_ATTR)
    old = {id(cfg), id(cfg.text_config), id(cfg.vision_config)}
    new = {id(a.config): a.config, id(a.config.text_config): a.config.text_config,
           id(a.config.vision_config): a.config.vision_config}
    for name, held in _configs_held(a):
        assert id(held) not in old and id(held) in new, name
    assert a.model.language_model.config is a.config.text_config
    assert a.model.vision_tower.config is a.config.vision_config
    torch.testing.assert_close(logits(b, ids), want_b, atol=0, rtol=0)
    assert mts.is_sparsified(a) and logits(a, ids).isfinite().all()


def test_parts_left_unconverted_keep_transformers_masks():
    """GIT: its vision encoder converts, its text decoder computes attention itself and adds the
    mask it gets to its scores. Only the configs the converted modules read switch to
    modelopt_sparse, so the text decoder keeps transformers' own masks: the text-only logits
    of a padded batch equal the unconverted model's exactly. (Before, every sub-config switched
    and the decoder added modelopt_sparse's token codes to its scores: off by 2e-2, silently.)"""
    cfg = transformers.GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GitForCausalLM(cfg).double().eval()
    ids = token_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    mts.sparsify(model, CFG)
    assert [n for n, _ in mts.conversion.sparse_modules(model)] == [
        "git.image_encoder.vision_model.encoder.layers.0.self_attn"]
    assert model.config._attn_implementation == "eager"
    assert model.git.image_encoder.config._attn_implementation == "modelopt_sparse"
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
