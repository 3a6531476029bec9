"""save/restore, sparse_state, and the save_pretrained/from_pretrained path."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers

import modelopt_sparse as mts
from modelopt_sparse.save_restore import STATE_FILE, WEIGHTS_FILE

from .hf_tiny import logits, sparse_cfg, tiny_model, token_ids

CFG = {"sparse_cfg": {
    "default": {"sparsity_n": 2, "sparsity_m": 4, "num_sink_tokens": 1, "dense_window_size": 4},
    "*layers.1.*": {"sparsity_n": 4, "sparsity_m": 8},
}}


@pytest.fixture(scope="module")
def ids():
    return token_ids(2, 40)


@pytest.fixture()
def sparse():
    model = mts.sparsify(tiny_model("llama", seed=0), CFG)
    mts.disable(model, "*layers.0.*")
    return model


def _assert_untouched(model, reference):
    assert not mts.is_sparsified(model)
    assert model.config._attn_implementation == "sdpa"
    for (n1, a), (n2, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_save_restore_gives_identical_logits(sparse, ids, tmp_path):
    want = logits(sparse, ids)
    mts.save(sparse, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS_FILE, STATE_FILE]
    fresh = tiny_model("llama", seed=7)  # other weights: restore must load them
    assert not torch.equal(logits(fresh, ids), want)
    mts.restore(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, ids), want, atol=0, rtol=0)
    # The whole state survives, the user's pattern config included, so a second save of
    # the restored model records what the first one did.
    assert mts.sparse_state(fresh) == mts.sparse_state(sparse)
    assert mts.sparse_state(fresh)["config"] is not None
    assert not fresh.model.layers[0].self_attn._mts_state.config.enable  # the disabled flag survives


def test_state_file_contents(sparse, tmp_path):
    mts.save(sparse, tmp_path)
    with open(tmp_path / STATE_FILE) as f:
        record = json.load(f)
    state = record["sparse_state"]
    assert state["modelopt_sparse_version"] == mts.__version__
    assert state["model_class"] == "LlamaForCausalLM"
    assert state["config"][1] == {"pattern": "*layers.1.*", "settings": {"sparsity_n": 4, "sparsity_m": 8}}
    layer1 = state["modules"]["model.layers.1.self_attn"]
    assert layer1["class"] == "LlamaAttention" and layer1["method"] == "triton_sparse_softmax"
    assert layer1["patterns"] == ["default", "*layers.1.*"]
    assert layer1["kernel_kwargs"] == {"sparsity_n": 4, "sparsity_m": 8, "num_sink_tokens": 1,
                                       "dense_window_size": 4, "tie_break": "threshold"}
    assert len(record["weights"]["sha256"]) == 64


def test_tied_weights(ids, tmp_path):
    model = mts.sparsify(tiny_model("qwen3", tie_word_embeddings=True), sparse_cfg(2, 4, 0, 4))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = logits(model, ids)
    mts.save(model, tmp_path)
    fresh = mts.restore(tiny_model("qwen3", seed=3, tie_word_embeddings=True), tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    torch.testing.assert_close(logits(fresh, ids), want, atol=0, rtol=0)


def test_sparse_state_round_trip(sparse, ids):
    state = mts.sparse_state(sparse)
    state = json.loads(json.dumps(state))  # JSON-able, and survives the trip
    fresh = copy.deepcopy(tiny_model("llama", seed=0))
    mts.restore_from_state(fresh, state)
    torch.testing.assert_close(logits(fresh, ids), logits(sparse, ids), atol=0, rtol=0)
    assert mts.sparse_state(fresh) == mts.sparse_state(sparse)


def test_save_pretrained_round_trip(sparse, ids, tmp_path):
    want = logits(sparse, ids)
    sparse.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert "model.layers.1.self_attn" in saved["modelopt_sparse"]["modules"]
    assert saved.get("_attn_implementation") in (None, "sdpa")  # never records our implementation
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not mts.is_sparsified(loaded)
    mts.restore_from_pretrained(loaded)
    torch.testing.assert_close(logits(loaded, ids), want, atol=0, rtol=0)


def test_config_record_follows_enable_disable(sparse):
    assert not sparse.config.modelopt_sparse["modules"]["model.layers.0.self_attn"]["config"]["enable"]
    mts.enable(sparse)
    assert sparse.config.modelopt_sparse["modules"]["model.layers.0.self_attn"]["config"]["enable"]


# --------------------------------------------------------------------------------------
# Errors: each leaves the target model unchanged
# --------------------------------------------------------------------------------------
@pytest.fixture()
def saved(sparse, tmp_path):
    mts.save(sparse, tmp_path)
    return tmp_path


@pytest.fixture()
def target():
    model = tiny_model("llama", seed=5)
    return model, copy.deepcopy(model)


def test_corrupted_weights(saved, target):
    model, reference = target
    path = saved / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensor data: header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: its SHA-256 does not match"):
        mts.restore(model, saved)
    _assert_untouched(model, reference)


def test_truncated_weights(saved, target):
    model, reference = target
    path = saved / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted"):
        mts.restore(model, saved)
    _assert_untouched(model, reference)


def test_corrupted_json(saved, target):
    model, reference = target
    path = saved / STATE_FILE
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match="corrupted \\(not valid JSON\\)"):
        mts.restore(model, saved)
    path.write_text(json.dumps({"weights": {}}))
    with pytest.raises(ValueError, match="missing 'sparse_state' or 'weights'"):
        mts.restore(model, saved)
    path.write_text(json.dumps({"sparse_state": {}, "weights": {"file": "../x", "sha256": "0"}}))
    with pytest.raises(ValueError, match="bad 'weights' entry"):
        mts.restore(model, saved)
    _assert_untouched(model, reference)


def test_missing_files(saved, target, tmp_path_factory):
    model, reference = target
    with pytest.raises(FileNotFoundError, match="not a modelopt_sparse checkpoint"):
        mts.restore(model, tmp_path_factory.mktemp("empty"))
    os.remove(saved / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match="is missing"):
        mts.restore(model, saved)
    _assert_untouched(model, reference)


def test_tampered_state(saved, target):
    model, reference = target
    path = saved / STATE_FILE
    good = json.loads(path.read_text())

    def attempt(mutate, match, exc=ValueError):
        record = copy.deepcopy(good)
        mutate(record["sparse_state"])
        path.write_text(json.dumps(record))
        with pytest.raises(exc, match=match):
            mts.restore(model, saved)
        _assert_untouched(model, reference)

    attempt(lambda s: s.update(format="other"), "not a modelopt_sparse state")
    attempt(lambda s: s.update(format_version=99), "format_version 99 is not supported")
    attempt(lambda s: s.update(modules={}), "no 'modules' entries")
    attempt(lambda s: s["modules"]["model.layers.0.self_attn"]["config"].update(sparsity_m=5),
            "invalid sparse config recorded for 'model.layers.0.self_attn'")
    attempt(lambda s: s["modules"]["model.layers.0.self_attn"]["config"].update(method="gone_method"),
            "unknown sparse-attention method 'gone_method'")
    attempt(lambda s: s["modules"]["model.layers.1.self_attn"]["kernel_kwargs"].update(sparsity_n=1),
            "the method's code changed")
    attempt(lambda s: s["modules"]["model.layers.1.self_attn"].update({"class": "Qwen2Attention"}),
            "architecture mismatch at 'model.layers.1.self_attn'")
    attempt(lambda s: s["modules"]["model.layers.0.self_attn"].update(patterns="default"),
            "'patterns' must be a list of strings")


def test_mismatched_architecture(saved):
    deeper = tiny_model("llama", num_hidden_layers=3)
    reference = copy.deepcopy(deeper)
    with pytest.raises(ValueError, match="architecture mismatch.*missing from the file"):
        mts.restore(deeper, saved)
    _assert_untouched(deeper, reference)
    wider = tiny_model("llama", intermediate_size=128)
    reference = copy.deepcopy(wider)
    with pytest.raises(ValueError, match="architecture mismatch.*shape mismatch: model.layers.0.mlp"):
        mts.restore(wider, saved)
    _assert_untouched(wider, reference)
    other = tiny_model("mistral")  # same weight names and shapes, other attention class
    reference = copy.deepcopy(other)
    with pytest.raises(ValueError, match="records 'LlamaAttention', the model has 'MistralAttention'"):
        mts.restore(other, saved)
    _assert_untouched(other, reference)


def test_extra_tensor_in_the_file_is_refused_before_loading(saved, target):
    """safetensors' strict load would copy the known tensors before it complains about an
    unknown one; the check must come first, so the model is left as it was."""
    from safetensors.torch import load_file, save_file

    model, reference = target
    weights = load_file(saved / WEIGHTS_FILE)
    weights["extra.weight"] = torch.zeros(3)
    save_file(weights, saved / WEIGHTS_FILE)
    record = json.loads((saved / STATE_FILE).read_text())
    record["weights"]["sha256"] = mts.save_restore._sha256(str(saved / WEIGHTS_FILE))
    (saved / STATE_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"architecture mismatch.*not in the model: \['extra.weight'\]"):
        mts.restore(model, saved)
    _assert_untouched(model, reference)


def test_restore_reads_the_modules_own_attention():
    """The state records the N:M settings, not the model's own attention: restored onto a
    model with a sliding window, the modules run (and report) that window."""
    state = mts.sparse_state(mts.sparsify(tiny_model("mistral"), CFG))
    windowed = mts.restore_from_state(tiny_model("mistral", sliding_window=16), state)
    rows = mts.conversion.summary_rows(windowed)
    assert [r["attention"] for r in rows] == ["causal, window 16"] * 2


def test_sharded_weights_are_refused(sparse, saved, tmp_path):
    # Stands in for an FSDP2 DTensor: the check goes by the class name, as torch's own
    # DTensor would need an initialised process group to build.
    class DTensor(torch.nn.Parameter):
        pass

    sparse.lm_head.weight = DTensor(sparse.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match=r"sharded \(FSDP2 DTensor\)"):
        mts.save(sparse, tmp_path / "sharded_ckpt")
    assert not (tmp_path / "sharded_ckpt").exists()
    with pytest.raises(ValueError, match=r"sharded \(FSDP2 DTensor\)"):
        mts.restore(sparse, saved)


def test_state_module_names_must_match(sparse):
    state = mts.sparse_state(sparse)
    model = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"the sparse state has 2 attention modules and LlamaForCausalLM has 3.*layers\.2"):
        mts.restore_from_state(model, state)
    assert not mts.is_sparsified(model)
    with pytest.raises(ValueError, match="must be a dict"):
        mts.restore_from_state(model, "state")


def test_version_mismatch_warns(sparse):
    state = mts.sparse_state(sparse)
    state["modelopt_sparse_version"] = "0.0.1"
    with pytest.warns(UserWarning, match="written by modelopt_sparse 0.0.1"):
        mts.restore_from_state(tiny_model("llama"), state)


def test_unsparsified_models_are_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not sparsified"):
        mts.save(model, tmp_path)
    with pytest.raises(ValueError, match="not sparsified"):
        mts.sparse_state(model)
    with pytest.raises(ValueError, match="has no 'modelopt_sparse' entry"):
        mts.restore_from_pretrained(model)
    assert not os.listdir(tmp_path)


def test_checkpoint_holds_no_pickle(saved):
    for name in os.listdir(saved):
        head = (saved / name).read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"PK"  # neither raw pickle nor a torch.save zip


def test_meta_weights_are_refused_not_silently_skipped(sparse, saved, tmp_path):
    # Copying into a meta parameter is a silent no-op in PyTorch; both directions must refuse.
    sparse.lm_head.weight = torch.nn.Parameter(torch.empty_like(sparse.lm_head.weight, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        mts.save(sparse, tmp_path / "meta_ckpt")
    assert not (tmp_path / "meta_ckpt").exists()
    with pytest.raises(ValueError, match="meta device"):
        mts.restore(sparse, saved)
