"""``modelopt-sparse eval --model DIR`` on every decoder of the model matrix.

Each tiny decoder of tests/hf_tiny.py (its own attention features on: sliding windows,
soft-capping, learned sinks, MoE) is saved with ``save_pretrained`` next to a byte-level BPE
tokenizer trained offline, then evaluated on the CPU: dense and 2:4 on one short window.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from .eval_tiny import build_tiny_llama, run_cli
from .hf_tiny import MATRIX_DECODERS, matrix_config, matrix_model

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer_and_text(tmp_path_factory):
    tiny = build_tiny_llama(tmp_path_factory.mktemp("tokenizer"), max_positions=64, layers=1)
    return tiny["tokenizer"], tiny["text"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # The CLI sets these for its process; pinning them here keeps the test session's env unchanged.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("family", list(MATRIX_DECODERS))
def test_eval_runs_on_every_matrix_decoder(family, tokenizer_and_text, tmp_path, capsys):
    tokenizer, text = tokenizer_and_text
    model_dir = tmp_path / family
    cfg = matrix_config(family, vocab_size=len(tokenizer))
    matrix_model(transformers.AutoModelForCausalLM, cfg, dtype=torch.float32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--text-file", text, "--patterns", "dense,2:4",
                             "--window", 4, "--seq-len", SEQ_LEN, "--max-windows", 1, "--device", "cpu",
                             "--backend", "torch", "--out", out_dir)
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())["results"]
    dense, sparse = results
    assert dense["label"] == "dense" and sparse["pattern"] == "2:4"
    for r in results:
        assert r["predicted_tokens"] == SEQ_LEN - 1
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert [row["layer"] for row in r["per_layer"]] == [0, 1]
    assert dense["kept_fraction"] == 1.0 and dense["dropped_mass"] == 0.0
    assert sparse["kept_fraction"] < 1 and sparse["ppl"] != dense["ppl"]
