"""``modelopt-sparse finetune``: the data order, the schedule, one run end to end on a tiny
model (sparse and dense control trained, saved, restored), the training corpus in a run
(tests/test_eval_finetune_corpus.py tests the corpus itself), and its option errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import modelopt_sparse as mts
from modelopt_sparse.eval.corpus import TrainData, build_corpus
from modelopt_sparse.eval.data import load_text, split_tokens, split_windows, tokenize
from modelopt_sparse.eval.finetune import TrainSettings, batch_starts, lr_factor
from modelopt_sparse.eval.perplexity import perplexity
from modelopt_sparse.eval.sweep import Setting

from .eval_tiny import argument_error, build_tiny_llama, load_tiny, run_cli

SEQ, STEPS, BATCH, SEED = 32, 6, 2, 5


def _settings(**overrides) -> TrainSettings:
    values = dict(steps=STEPS, batch_size=BATCH, seq_len=SEQ, lr=3e-3, warmup_steps=2, weight_decay=0.0,
                  max_grad_norm=1.0, seed=SEED)
    return TrainSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("finetune_tiny"), max_positions=128)


@pytest.fixture(autouse=True)
def _offline_and_fresh_accelerate(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_batches_depend_on_the_seed_only_and_split_by_rank():
    a, b = batch_starts(1000, _settings()), batch_starts(1000, _settings())
    assert torch.equal(a, b) and a.shape == (STEPS, BATCH)
    assert not torch.equal(a, batch_starts(1000, _settings(seed=SEED + 1)))
    assert int(a.min()) >= 0 and int(a.max()) <= 1000 - SEQ
    # Two ranks slicing a global batch of 4 see exactly the windows one process sees.
    four = batch_starts(1000, _settings(batch_size=4))
    assert torch.equal(torch.cat([four[:, 0:2], four[:, 2:4]], dim=1), four)


def test_batches_take_each_token_once_per_pass():
    # 1000 tokens hold 31 windows of 32: 12 windows are distinct, non-overlapping, on the grid.
    once = batch_starts(1000, _settings()).flatten()
    assert len(set(once.tolist())) == STEPS * BATCH and all(int(s) % SEQ == 0 for s in once)
    # 31 windows exactly: one whole pass, every window once.
    whole = batch_starts(31 * SEQ + 5, _settings(steps=31, batch_size=1)).flatten()
    assert sorted(whole.tolist()) == [SEQ * i for i in range(31)]
    # More than a pass: the first pass is whole, then a new order on a shifted grid.
    more = batch_starts(10 * SEQ, _settings(steps=15, batch_size=2)).flatten()
    assert sorted(more[:10].tolist()) == [SEQ * i for i in range(10)]
    second = more[10:19]
    assert len(set((second % SEQ).tolist())) == 1 and len(set(second.tolist())) == 9
    assert int(more.max()) <= 10 * SEQ - SEQ


def test_schedule_warms_up_then_decays_to_a_tenth():
    s = _settings(steps=10, warmup_steps=2)
    factors = [lr_factor(i, s) for i in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(x >= y for x, y in zip(factors[2:], factors[3:]))
    assert factors[2] == pytest.approx(1.0) and lr_factor(10, s) == pytest.approx(0.1)


def test_finetune_end_to_end(tiny, tmp_path, capsys):
    out_dir, ckpt = tmp_path / "ft", tmp_path / "ckpt"
    code, out, err = run_cli(capsys, "finetune", "--model", tiny["dir"], "--text-file", tiny["text"],
                             "--pattern", "2:4", "--window", 2, "--seq-len", SEQ, "--steps", STEPS,
                             "--batch-size", BATCH, "--lr", "3e-3", "--warmup-steps", 2, "--seed", SEED,
                             "--eval-windows", 3, "--eval-every", 3, "--device", "cpu", "--checkpoint", ckpt,
                             "--out", out_dir)
    assert code == 0, err
    doc = json.loads((out_dir / "finetune.json").read_text())
    sparse, dense, summary = doc["runs"]["sparse"], doc["runs"]["dense"], doc["summary"]
    assert sparse["setting"] == "2:4 sink=0 window=2" and dense["setting"] == "dense"
    assert doc["meta"]["processes"] == 1 and doc["meta"]["mixed_precision"] == "no"
    for run in (sparse, dense):
        assert len(run["train_loss"]) == STEPS
        # lr 3e-3 on a random model: the held-out perplexity must come down.
        assert run["heldout_ppl_after"] < 0.9 * run["heldout_ppl_before"]

    # The numbers are what an independent evaluation of the same models gives.
    ids = tokenize(tiny["tokenizer"], load_text(tiny["text"]).text)
    train_ids, heldout_ids = split_tokens(ids, 0.1)
    heldout = split_windows(heldout_ids, SEQ, 3, "held-out")
    base = load_tiny(tiny)
    sparse_base = mts.sparsify(load_tiny(tiny), Setting(2, 4, 0, 2).sparse_cfg("torch"))
    assert perplexity(sparse_base, heldout) == pytest.approx(sparse["heldout_ppl_before"], rel=1e-6)
    dense_base = mts.sparsify(base, Setting(0, 4, 0, 0).sparse_cfg("torch"))
    assert perplexity(dense_base, heldout) == pytest.approx(dense["heldout_ppl_before"], rel=1e-6)
    # The sparse run trained through the sparse kernel: its first loss is the 2:4 model's
    # loss on the first seeded batch, not the dense model's.
    starts = batch_starts(train_ids.numel(), TrainSettings(STEPS, BATCH, SEQ, 3e-3, 2, 0.0, 1.0, SEED))[0]
    first = train_ids[starts[:, None] + torch.arange(SEQ)]
    with torch.no_grad():
        sparse_loss = float(sparse_base(input_ids=first, labels=first).loss)
        dense_loss = float(dense_base(input_ids=first, labels=first).loss)
    assert sparse["train_loss"][0] == pytest.approx(sparse_loss, rel=1e-5)
    assert dense["train_loss"][0] == pytest.approx(dense_loss, rel=1e-5)
    assert sparse_loss != pytest.approx(dense_loss, rel=1e-5)

    gap_before = sparse["heldout_ppl_before"] / dense["heldout_ppl_before"] - 1
    gap_after = sparse["heldout_ppl_after"] / dense["heldout_ppl_after"] - 1
    assert summary["gap_before_pct"] == pytest.approx(100 * gap_before)
    assert summary["gap_after_pct"] == pytest.approx(100 * gap_after)
    if gap_before > 0:
        assert summary["gap_closed_fraction"] == pytest.approx((gap_before - gap_after) / gap_before)
    # --eval-every 3: both runs measured at steps 0, 3 and 6, the gap at each of them.
    for run in (sparse, dense):
        assert [p["step"] for p in run["heldout_curve"]] == [0, 3, STEPS]
        assert run["heldout_curve"][0]["heldout_ppl"] == run["heldout_ppl_before"]
        assert run["heldout_curve"][-1]["heldout_ppl"] == run["heldout_ppl_after"]
    assert [g["step"] for g in summary["gap_curve"]] == [0, 3, STEPS]
    assert summary["gap_curve"][-1]["gap_pct"] == pytest.approx(summary["gap_after_pct"])

    # mts.save wrote the fine-tuned sparse model; mts.restore into a fresh copy gives it back.
    assert sparse["restored_matches"] is True
    assert sparse["restored_heldout_ppl"] == pytest.approx(sparse["heldout_ppl_after"], rel=1e-6)
    restored = mts.restore(load_tiny(tiny), ckpt)
    assert perplexity(restored, heldout) == pytest.approx(sparse["heldout_ppl_after"], rel=1e-6)
    assert all(m._mts_state.kernel_kwargs["sparsity_n"] == 2 for _, m in mts.conversion.sparse_modules(restored))
    assert "gap closed by fine-tuning" in out and "matches the fine-tuned model" in out
    assert (out_dir / "finetune.png").read_bytes()[:4] == b"\x89PNG"

    # The run gave accelerate's process-wide state back: other settings are accepted now.
    from accelerate import Accelerator

    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"


def test_finetune_under_bf16_autocast(tiny, tmp_path, capsys):
    """--mixed-precision bf16 (the GPU default): under autocast the model hands attention
    float32 q and k (after RoPE) and a bf16 v. The H200 run failed here with "q, k and v
    must share one dtype" before attention() followed SDPA's autocast rule."""
    code, out, err = run_cli(capsys, "finetune", "--model", tiny["dir"], "--text-file", tiny["text"],
                             "--seq-len", SEQ, "--steps", 2, "--batch-size", 2, "--warmup-steps", 1,
                             "--eval-windows", 1, "--device", "cpu", "--mixed-precision", "bf16",
                             "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "ft")
    assert code == 0, err
    doc = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert doc["meta"]["mixed_precision"] == "bf16"
    assert all(math.isfinite(x) for run in doc["runs"].values() for x in run["train_loss"])


@pytest.mark.parametrize("train_data", ["stdlib", "split"])
def test_finetune_training_data(train_data, tiny, tmp_path, capsys):
    """12 steps of 4 x 64 tokens need more than the training split of a short text: with
    'stdlib' the standard library's sources follow it and no token is trained on twice;
    with 'split' the split is passed over more than once, and the run says so."""
    seq, steps, batch = 64, 12, 4
    text_file = tmp_path / "short.txt"
    text_file.write_text(load_text(tiny["text"]).text[:5_000])
    code, out, err = run_cli(capsys, "finetune", "--model", tiny["dir"], "--text-file", text_file,
                             "--train-data", train_data, "--seq-len", seq, "--steps", steps, "--batch-size", batch,
                             "--warmup-steps", 2, "--seed", SEED, "--eval-windows", 1, "--device", "cpu",
                             "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "ft")
    assert code == 0, err
    meta = json.loads((tmp_path / "ft" / "finetune.json").read_text())["meta"]
    ids = tokenize(tiny["tokenizer"], load_text(text_file).text)
    split, heldout = split_tokens(ids, 0.1)
    trained = steps * batch * seq
    corpus = build_corpus(tiny["tokenizer"], split, heldout, TrainData(train_data), trained)
    recorded = meta["train_corpus"]
    assert recorded == json.loads(json.dumps(corpus.meta(trained)))  # the same corpus, token for token
    assert meta["train_data"] == train_data and meta["train_split_tokens"] == split.numel() < trained
    assert meta["trained_tokens"] == trained and meta["train_tokens"] == corpus.ids.numel()
    assert meta["train_passes"] == pytest.approx(trained / corpus.ids.numel())
    assert f"{meta['train_passes']:.2f} passes over the training data" in out
    starts = batch_starts(corpus.ids.numel(), TrainSettings(steps, batch, seq, 1e-4, 2, 0.0, 1.0, SEED))
    if train_data == "stdlib":
        # The corpus is cut at the tokens the run trains on: every token exactly once.
        assert recorded["documents"] >= 1 and meta["train_tokens"] == trained and meta["train_passes"] == 1.0
        assert "standard library sources" in recorded["label"] and "note:" not in out
        assert sorted(starts.flatten().tolist()) == list(range(0, trained, seq))
    else:
        assert recorded["documents"] == 0 and meta["train_tokens"] == split.numel()
        passes = meta["train_passes"]
        assert passes > 1.05 and f"note: training sees each token ~{passes:.1f} times (--train-data split)" in out
    # Both runs trained on those windows: the dense control's first loss is the base
    # model's loss on the first of them.
    first = corpus.ids[starts[0][:, None] + torch.arange(seq)]
    dense_base = mts.sparsify(load_tiny(tiny), Setting(0, 4, 0, 0).sparse_cfg("torch"))
    with torch.no_grad():
        loss = float(dense_base(input_ids=first, labels=first).loss)
    doc = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert doc["runs"]["dense"]["train_loss"][0] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--pattern", "dense"], "argument --pattern: needs a sparse N:M pattern such as 2:4, not 'dense'"),
    (["--pattern", "2:6"], "bad pattern '2:6'"),
    (["--lr", "0"], "argument --lr: must be in (0, 1], got 0"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--heldout-fraction", "0.6"], "argument --heldout-fraction: must be in (0, 0.5], got 0.6"),
    (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--train-data", "topics"],
     "argument --train-data: expected split, stdlib or a UTF-8 text file, got 'topics': no such file"),
    (["--train-data", "."], "argument --train-data: expected split, stdlib or a UTF-8 text file, got '.': "
                            "not a regular file"),
])
def test_bad_options_are_argument_errors(argv, message, capsys):
    assert message in argument_error(capsys, "finetune", *argv)


def test_errors_after_parsing(tiny, tmp_path, capsys, monkeypatch):
    common = ("--model", tiny["dir"], "--text-file", tiny["text"], "--device", "cpu", "--out", tmp_path)
    code, _, err = run_cli(capsys, "finetune", *common, "--seq-len", 129)
    assert code == 2 and "--seq-len 129 is longer than the model supports (max_position_embeddings = 128)" in err
    code, _, err = run_cli(capsys, "finetune", *common, "--steps", 3, "--warmup-steps", 4)
    assert code == 2 and "--warmup-steps 4 is more than --steps 3" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "finetune", "--device", "cuda", "--out", tmp_path)
        assert code == 2 and "CUDA is not available" in err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "finetune", "--help")
    text = capsys.readouterr().out
    for needle in ("dense control", "accelerate launch --num_processes", "--mixed-precision {auto,no,bf16}",
                   "--checkpoint DIR", "modelopt_sparse.save", "examples:", "--train-data split|stdlib|PATH",
                   "each token about once"):
        assert needle in text
