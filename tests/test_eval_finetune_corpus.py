"""The training corpus of ``modelopt-sparse finetune --train-data``: which standard library
files it reads and in which order, that it reads no more than the run needs, that it is the
same every time, and that nothing of the held-out split gets into it."""

from __future__ import annotations

import argparse

import pytest
import torch

from modelopt_sparse.eval import corpus as corpus_module
from modelopt_sparse.eval.corpus import (GUARD_TOKENS, HeldoutGuard, TrainData, build_corpus, stdlib_files,
                                         train_data_option)
from modelopt_sparse.eval.data import load_text, split_tokens, tokenize
from modelopt_sparse.eval.errors import EvalError

from .eval_tiny import build_tiny_llama


class CharTokenizer:
    """One token per character (its code point), so that text and tokens match exactly;
    counts the documents it tokenizes."""

    def __init__(self):
        self.documents = 0

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=False):
        self.documents += len(texts)
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in text], dtype=torch.long)


def grams(ids: torch.Tensor, k: int = GUARD_TOKENS) -> set[tuple[int, ...]]:
    values = ids.tolist()
    return {tuple(values[i : i + k]) for i in range(len(values) - k + 1)}


def fake_stdlib(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


HELDOUT = ("The held-out text: nothing of it may be trained on"
           "\n\nafter the paragraph break, more held-out prose follows here. " * 3)
SPLIT = "the training split of the evaluation text, which always starts the corpus. " * 2


@pytest.fixture
def use_stdlib(monkeypatch, tmp_path):
    """Point --train-data stdlib at a fake standard library under tmp_path/lib."""
    def use(files: dict[str, str]):
        root = fake_stdlib(tmp_path / "lib", files)
        monkeypatch.setattr(corpus_module, "stdlib_root", lambda: root)
        return root
    return use


def test_train_data_option(tmp_path):
    assert train_data_option("stdlib") == TrainData("stdlib") and train_data_option(" split ") == TrainData("split")
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n")
    assert train_data_option(str(text)) == TrainData("file", text.resolve())
    assert train_data_option(str(text)).name == str(text.resolve())
    (tmp_path / "empty.txt").write_text("")
    for value, why in [("stdlibs", "no such file"), (str(tmp_path), "not a regular file"),
                       (str(tmp_path / "empty.txt"), "the file is empty"), ("", "got ''")]:
        with pytest.raises(argparse.ArgumentTypeError, match="expected split, stdlib or a UTF-8 text file") as exc:
            train_data_option(value)
        assert why in str(exc.value)


def test_stdlib_files_sorted_without_tests_tables_and_the_heldout_text(tmp_path):
    root = fake_stdlib(tmp_path, {name: "x = 1\n" for name in [
        "zipfile.py", "os.py", "json/decoder.py", "json/__init__.py", "json/tests/test_x.py", "test/test_os.py",
        "idlelib/editor.py", "pydoc_data/topics.py", "encodings/cp1252.py", "site-packages/pkg/mod.py",
        "dist-packages/mod.py", "config-3.12-x86_64-linux-gnu/python-config.py", "html/entities.py",
        "html/parser.py", "stringprep.py", "_sysconfigdata__linux_x86_64-linux-gnu.py", "README.txt",
        "unittest/test/test_case.py"]})
    assert [rel for rel, _ in stdlib_files(root)] == [
        "html/parser.py", "json/__init__.py", "json/decoder.py", "os.py", "zipfile.py"]


def test_the_real_standard_library_listing():
    rels = [rel for rel, _ in stdlib_files()]
    assert rels == sorted(rels) and {"os.py", "json/decoder.py", "argparse.py"} <= set(rels)
    skipped = {"test", "tests", "idlelib", "pydoc_data", "encodings", "site-packages", "dist-packages"}
    assert not any(skipped & set(rel.split("/")[:-1]) for rel in rels)


def test_guard_finds_every_heldout_run_and_nothing_shorter():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50_000, (2_000,), generator=generator)
    guard = HeldoutGuard(ids[500:700])
    assert guard.k == GUARD_TOKENS
    for start in range(500, 700 - GUARD_TOKENS + 1, 7):
        run = ids[start : start + GUARD_TOKENS]
        assert guard.overlaps(torch.cat([ids[:100], run, ids[1000:1100]]))
        assert not guard.overlaps(torch.cat([ids[:100], run[:-1], ids[1000:1100]]))
    assert not guard.overlaps(ids[1000:]) and not guard.overlaps(ids[:10])
    # Ids past 2^24 (no tokenizer has that many) are still compared without overflow.
    big = ids + 2**40
    assert HeldoutGuard(big[500:700]).overlaps(big[550:600])
    # A held-out split shorter than GUARD_TOKENS is guarded as a whole.
    assert HeldoutGuard(ids[:5]).overlaps(ids[:5]) and not HeldoutGuard(ids[:5]).overlaps(ids[1:5])


def test_documents_with_heldout_text_are_left_out(use_stdlib):
    cut = HELDOUT.index("\n\n")
    use_stdlib({
        "a.py": "print('a')\n" * 20,
        "b.py": "# quoting the docs: " + HELDOUT[10:80] + "\n",  # a 70-character run of it
        # Neither file alone holds 32 characters of it; together with the blank line that
        # separates documents they do: c.py + d.py is caught at the boundary.
        "c.py": "print('c')\n" + HELDOUT[cut - 20 : cut],
        "d.py": HELDOUT[cut + 2 : cut + 30] + "\nprint('d')\n",
        "e.py": "print('e')\n" * 20,
        "pydoc_data/topics.py": HELDOUT,
    })
    split, heldout = ids_of(SPLIT), ids_of(HELDOUT)
    corpus = build_corpus(CharTokenizer(), split, heldout, TrainData("stdlib"), 10**9)
    assert corpus.documents == ["a.py", "c.py", "e.py"] and corpus.skipped == ["b.py", "d.py"]
    assert corpus.exhausted and torch.equal(corpus.ids[: split.numel()], split)
    assert "".join(map(chr, corpus.ids.tolist())) == (
        SPLIT + "print('a')\n" * 19 + "print('a')\n\n" + "print('c')\n" + HELDOUT[cut - 20 : cut] + "\n\n"
        + "print('e')\n" * 19 + "print('e')\n\n")
    assert not grams(corpus.ids[split.numel() - GUARD_TOKENS + 1 :]) & grams(heldout)


def test_reads_only_what_the_run_needs_and_is_deterministic(use_stdlib):
    use_stdlib({f"m{i:03d}.py": f"# module {i:03d}\n" + "value = 1\n" * 10 for i in range(200)})
    split, heldout = ids_of(SPLIT), ids_of(HELDOUT)
    tokenizer = CharTokenizer()
    small = build_corpus(tokenizer, split, heldout, TrainData("stdlib"), split.numel() + 1_000)
    per_doc = len("# module 000\n" + "value = 1\n" * 10) + 1  # + the blank line after it
    assert small.documents == [f"m{i:03d}.py" for i in range(-(-1_000 // per_doc))]
    # Cut at the target: the last document is used in part.
    assert small.ids.numel() == split.numel() + 1_000 and not small.exhausted
    assert tokenizer.documents <= len(small.documents) + corpus_module._TOKENIZE_BATCH
    again = build_corpus(CharTokenizer(), split, heldout, TrainData("stdlib"), split.numel() + 1_000)
    assert torch.equal(again.ids, small.ids) and again.meta(500) == small.meta(500)
    large = build_corpus(CharTokenizer(), split, heldout, TrainData("stdlib"), split.numel() + 3_000)
    assert torch.equal(large.ids[: small.ids.numel()], small.ids)
    # The split alone is enough: nothing else is read; 'split' never reads anything else.
    for data, target in [(TrainData("stdlib"), split.numel()), (TrainData("split"), 10**9)]:
        tokenizer = CharTokenizer()
        only = build_corpus(tokenizer, split, heldout, data, target)
        assert torch.equal(only.ids, split) and only.documents == [] and tokenizer.documents == 0
    meta = small.meta(small.ids.numel() // 2)
    assert meta["passes"] == pytest.approx(0.5, abs=1e-3) and meta["tokens"] == small.ids.numel()
    assert meta["name"] == "stdlib" and meta["split_tokens"] == split.numel()
    assert meta["documents"] == len(small.documents) == 9


def test_a_text_file_is_read_in_chunks_and_guarded(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_FILE_CHUNK_CHARS", 100)
    lines = [f"line {i} of my own corpus, long enough to fill a chunk.\n" for i in range(12)]
    lines[5] = HELDOUT[:45] + "\n"  # copied from the held-out text
    path = tmp_path / "mine.txt"
    path.write_text("".join(lines))
    split, heldout = ids_of(SPLIT), ids_of(HELDOUT)
    corpus = build_corpus(CharTokenizer(), split, heldout, TrainData("file", path), 10**9)
    assert corpus.documents == ["mine.txt:1-2", "mine.txt:3-4", "mine.txt:7-8", "mine.txt:9-10",
                                "mine.txt:11-12"]
    assert corpus.skipped == ["mine.txt:5-6"] and corpus.exhausted
    assert "".join(map(chr, corpus.ids.tolist())) == SPLIT + "".join(lines[:4] + lines[6:])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(EvalError, match="--train-data .*latin1.txt: not UTF-8 text"):
        build_corpus(CharTokenizer(), split, heldout, TrainData("file", bad), 10**9)


def test_real_standard_library_with_a_real_tokenizer(tmp_path):
    """The default corpus on this Python with the tiny model's byte-level BPE: the split,
    then the first standard library files in path order; no held-out run in it."""
    tiny = build_tiny_llama(tmp_path / "tiny")
    ids = tokenize(tiny["tokenizer"], load_text(tiny["text"]).text)
    split, heldout = split_tokens(ids, 0.1)
    corpus = build_corpus(tiny["tokenizer"], split, heldout, TrainData("stdlib"), split.numel() + 30_000)
    files = stdlib_files()
    last = [rel for rel, _ in files].index(corpus.documents[-1])
    # Every file up to the last one used, in order, is used or left out (empty files aside).
    read = [rel for rel, path in files[: last + 1] if path.read_text(errors="replace").strip()]
    assert sorted(corpus.documents + corpus.skipped) == read and corpus.documents == sorted(corpus.documents)
    assert corpus.ids.numel() == split.numel() + 30_000 and corpus.label.endswith("standard library sources")
    assert not grams(corpus.ids[split.numel() - GUARD_TOKENS + 1 :]) & grams(heldout)
