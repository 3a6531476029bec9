"""Exact wording of messages that list or explain: truncated lists say how much is left out,
and allowed values are stated once."""

from __future__ import annotations

import re

import pytest

import modelopt_sparse as mts
from modelopt_sparse import cli

from .hf_tiny import sparse_cfg, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    mts.save(mts.sparsify(tiny_model("llama"), sparse_cfg()), path)
    return path


def test_missing_weights_list_says_how_many_more(saved):
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError) as err:
        mts.restore(deeper, saved)
    layer = "model.layers.2."
    assert str(err.value) == (
        f"architecture mismatch between {saved / 'model.safetensors'} and LlamaForCausalLM: missing from the file: "
        f"['{layer}input_layernorm.weight', '{layer}mlp.down_proj.weight', '{layer}mlp.gate_proj.weight', "
        f"'{layer}mlp.up_proj.weight'] and 5 more"
    )


def test_short_lists_have_no_more_suffix(saved):
    from safetensors.torch import load_file, save_file

    weights = load_file(saved / "model.safetensors")
    del weights["model.norm.weight"]
    path = saved.parent / "one_missing.safetensors"
    save_file(weights, path)
    with pytest.raises(ValueError, match=re.escape("missing from the file: ['model.norm.weight']") + "$"):
        mts.save_restore._check_weights_fit(tiny_model("llama"), str(path))


def test_module_lists_of_a_state_say_how_many_more(saved):
    state = mts.sparse_state(mts.sparsify(tiny_model("llama"), sparse_cfg()))
    with pytest.raises(ValueError) as err:
        mts.restore_from_state(tiny_model("llama", num_hidden_layers=7), state)
    assert str(err.value) == (
        "architecture mismatch: the sparse state has 2 attention modules and LlamaForCausalLM has 7; "
        "not in the state: ['model.layers.2.self_attn', 'model.layers.3.self_attn', 'model.layers.4.self_attn', "
        "'model.layers.5.self_attn'] and 1 more"
    )


def test_bad_m_is_explained_once_by_the_eval_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--patterns", "dense,2:3"])
    err = capsys.readouterr().err
    assert err.strip().endswith("argument --patterns: bad pattern '2:3': sparsity_m must be one of (2, 4, 8, 16), got 3")
    assert err.count("one of") == 1


def test_bad_m_is_explained_once_by_the_config_and_the_kernel():
    import torch

    with pytest.raises(ValueError) as err:
        mts.SparseAttentionConfig.coerce(sparse_cfg(2, 3))
    assert str(err.value).count("must be one of (2, 4, 8, 16)") == 1
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError) as err:
        mts.attention(q, q, q, torch.tensor([0]), torch.tensor([8]), 8, sparsity_n=2, sparsity_m=3)
    assert str(err.value) == "sparsity_m must be one of (2, 4, 8, 16), got 3"


def test_shape_mismatch_list_says_how_many_more(saved):
    wider = tiny_model("llama", intermediate_size=128)  # 3 MLP weights in each of 2 layers
    with pytest.raises(ValueError, match=r"shape mismatch: model\.layers\.0\.mlp\.down_proj\.weight \(64, 96\) vs "
                                         r"\(64, 128\), .* and 2 more$"):
        mts.restore(wider, saved)
