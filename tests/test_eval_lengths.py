"""Long-context ``modelopt-sparse eval``: several --seq-len values in one run, the model's
position limit, and the sink/window sweep the issue asks for (sink 0/4, window 0/64/256)."""

from __future__ import annotations

import json

import pytest

from modelopt_sparse.eval import command

from .eval_tiny import build_tiny_llama, needs_default_model, run_cli

LIMIT = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("lengths_tiny"), max_positions=LIMIT)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def _eval(capsys, tiny, out, *argv):
    return run_cli(capsys, "eval", "--model", tiny["dir"], "--text-file", tiny["text"], "--device", "cpu",
                   "--out", out, *argv)


def test_several_lengths_in_one_run(tiny, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    code, out, err = _eval(capsys, tiny, out_dir, "--patterns", "2:4,8:16", "--window", 0, "--seq-len", 32, "64",
                           "--max-windows", 2)
    assert code == 0, err
    summary = json.loads((out_dir / "lengths.json").read_text())
    assert summary["meta"]["seq_lens"] == [32, 64]
    assert [entry["seq_len"] for entry in summary["lengths"]] == [32, 64]
    for entry in summary["lengths"]:
        per_length = json.loads((out_dir / f"seq-len-{entry['seq_len']}" / "results.json").read_text())
        assert per_length["meta"]["seq_len"] == entry["seq_len"] and per_length["meta"]["windows"] == 2
        assert [r["label"] for r in entry["results"]] == ["dense", "2:4 sink=0 window=0", "8:16 sink=0 window=0"]
        for mine, full in zip(entry["results"], per_length["results"]):
            assert mine["ppl"] == full["ppl"] and mine["delta_ppl_pct"] == full["delta_ppl_pct"]
    assert (out_dir / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "seq-len-32" / "results.png").exists()
    assert "=== --seq-len 32 ===" in out and "=== --seq-len 64 ===" in out

    # A length in a sweep gives the numbers of a run of that length alone.
    alone = tmp_path / "alone"
    code, _, err = _eval(capsys, tiny, alone, "--patterns", "2:4,8:16", "--window", 0, "--seq-len", 64,
                         "--max-windows", 2)
    assert code == 0, err
    single = json.loads((alone / "results.json").read_text())["results"]
    assert [r["ppl"] for r in single] == [r["ppl"] for r in summary["lengths"][1]["results"]]
    assert not (alone / "lengths.json").exists()


def test_the_models_own_limit_runs(tiny, tmp_path, capsys):
    code, _, err = _eval(capsys, tiny, tmp_path, "--patterns", "2:4", "--seq-len", LIMIT, "--max-windows", 1)
    assert code == 0, err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["seq_len"] == LIMIT and doc["meta"]["max_position_embeddings"] == LIMIT
    assert doc["results"][1]["predicted_tokens"] == LIMIT - 1


def test_a_length_beyond_the_limit_fails_before_the_text(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "load_text", lambda *a, **k: pytest.fail("text read before the length check"))
    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("model loaded before the length check"))
    code, _, err = _eval(capsys, tiny, tmp_path, "--seq-len", 64, LIMIT + 1)
    assert code == 2
    assert (f"--seq-len {LIMIT + 1} is longer than the model supports (max_position_embeddings = {LIMIT}); "
            f"use --seq-len {LIMIT} or less") in err


def test_sink_and_window_sweep(tiny, tmp_path, capsys):
    code, out, err = _eval(capsys, tiny, tmp_path, "--patterns", "2:4", "--sink", 0, 4, "--window", 0, 64, 256,
                           "--seq-len", 32, "--max-windows", 1)
    assert code == 0, err
    labels = [r["label"] for r in json.loads((tmp_path / "results.json").read_text())["results"]]
    assert labels == ["dense"] + [f"2:4 sink={s} window={w}" for s in (0, 4) for w in (0, 64, 256)]




@needs_default_model
def test_default_model_limit_is_8192(tmp_path, capsys, monkeypatch):
    # SmolLM2's limit: 8192 is the longest --seq-len the GPU runs of issue 17 use.
    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("model loaded before the length check"))
    code, _, err = run_cli(capsys, "eval", "--seq-len", 4096, 8193, "--device", "cpu", "--out", tmp_path)
    assert code == 2
    assert "--seq-len 8193 is longer than the model supports (max_position_embeddings = 8192)" in err
