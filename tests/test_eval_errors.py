"""``modelopt-sparse eval`` refuses a model it cannot sparsify before it reads or tokenizes the text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelopt_sparse import cli
from modelopt_sparse.eval import command
from modelopt_sparse.eval import data as eval_data

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model directories with tokenizers: Bloom (attention computed in the module, not
    through transformers' attention interface) and a Qwen2-MoE whose sliding window only
    its mask applies (convertible module, unsupported feature)."""
    from transformers import BloomConfig, BloomForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    root = tmp_path_factory.mktemp("eval_errors")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    built = {
        "bloom": BloomForCausalLM(BloomConfig(vocab_size=384, hidden_size=32, n_layer=1, n_head=2)),
        "mask_window": Qwen2MoeForCausalLM(Qwen2MoeConfig(
            vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, use_sliding_window=True, sliding_window=16,
            max_window_layers=1, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
            shared_expert_intermediate_size=16)),
    }
    dirs = {}
    for name, model in built.items():
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    text = root / "text.txt"
    text.write_text(TEXT)
    return dirs, text


@pytest.fixture()
def text_untouched(monkeypatch):
    """Record any attempt to read or tokenize the text (and stop the run there)."""
    calls = []

    def refuse(name):
        def fake(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} called before the model was checked")
        return fake

    monkeypatch.setattr(command, "load_text", refuse("load_text"))
    monkeypatch.setattr(command, "tokenize", refuse("tokenize"))
    monkeypatch.setattr(eval_data, "tokenize", refuse("tokenize"))
    return calls


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def _run(capsys, *argv):
    code = cli.main(["eval", *map(str, argv)])
    return code, capsys.readouterr().err


def test_unsupported_architecture_fails_before_the_text(models, text_untouched, tmp_path, capsys):
    dirs, text = models
    code, err = _run(capsys, "--model", dirs["bloom"], "--text-file", text, "--seq-len", 32,
                     "--device", "cpu", "--out", tmp_path / "out")
    assert text_untouched == []
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"modelopt-sparse eval: error: --model {dirs['bloom']}: modelopt_sparse found no supported attention "
        "module in BloomForCausalLM (it has ['BloomAttention'], which compute attention themselves); "
        "modelopt_sparse converts attention modules whose forward dispatches through transformers' attention "
        "interface (ALL_ATTENTION_FUNCTIONS, selected by config._attn_implementation), as Llama, Mistral, Qwen, "
        "Gemma, Phi-3, OLMo, Granite, Cohere, BERT and ViT do in transformers 5.x"
    )


def test_unsupported_feature_fails_before_the_text(models, text_untouched, tmp_path, capsys):
    dirs, text = models
    code, err = _run(capsys, "--model", dirs["mask_window"], "--text-file", text, "--seq-len", 32,
                     "--device", "cpu", "--out", tmp_path / "out")
    assert text_untouched == []
    assert code == 2
    assert (f"--model {dirs['mask_window']}: model.layers.0.self_attn (Qwen2MoeAttention): this layer gets a "
            "sliding-window mask (sliding_window=16)") in err
    assert "does not pass sliding_window to the attention function" in err


def test_missing_text_file_still_fails_before_the_model(models, tmp_path, capsys, monkeypatch):
    dirs, _ = models
    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("model loaded first"))
    code, err = _run(capsys, "--model", dirs["bloom"], "--text-file", tmp_path / "missing.txt")
    assert code == 2 and "--text-file" in err and "no such file" in err


def test_default_output_directory_is_git_ignored():
    lines = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert f"/{command.DEFAULT_OUT}/" in lines
