"""The training corpus of ``modelopt-sparse finetune`` (``--train-data``).

The corpus always starts with the evaluation text's training split. The default text's
split holds ~107k tokens, so a GPU run of a few hundred steps of 8 x 1024 tokens would
pass over it many times and measure memorization, not adaptation to sparse attention.
``--train-data stdlib`` (the default) therefore follows the split with the Python
standard library's own ``.py`` sources, and a text file can follow it instead.

Nothing is tokenized beyond what the run needs: documents are added in a fixed order
until the corpus holds ``steps x batch x seq_len`` tokens (the last one cut there), so
training sees each token once. Any document that shares a run of :data:`GUARD_TOKENS` tokens with the
held-out split is left out (and named in finetune.json): the corpus beyond the split
never contains held-out text.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import EvalError

SPLIT, STDLIB = "split", "stdlib"
DEFAULT_TRAIN_DATA = STDLIB
# A shared run of this many tokens (~100 characters of prose, more of code) marks a
# document as holding held-out text; short common phrases and idioms do not.
GUARD_TOKENS = 32

# Standard library folders left out, at any depth:
# * test/, tests/: test suites (many distributions strip them, so keeping them would make
#   the corpus depend on the installation), full of generated data;
# * idlelib/: ships IDLE's copy of the Python documentation (help.html);
# * pydoc_data/: the default evaluation text itself, held-out split included;
# * encodings/: generated codec tables (hex literals, no language);
# * site-packages/, dist-packages/: installed third-party packages, not the standard library;
# * __pycache__/ and config-* (the build's Makefile and python-config).
# And files that are generated tables or describe the installation rather than Python:
# html/entities.py, stringprep.py, _sysconfigdata_*.py (build paths and flags).
# Whole sources rather than their docstrings alone: the docstrings of the standard library
# are ~0.4M tokens, a fifth of one GPU run, and the held-out text (the language reference)
# mixes English with Python examples just as documented source does.
_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "pydoc_data", "encodings", "site-packages",
                           "dist-packages", "__pycache__"})
_SKIPPED_FILES = frozenset({"html/entities.py", "stringprep.py"})
_TOKENIZE_BATCH = 32  # documents per tokenizer call (fast tokenizers run a batch in parallel)
_FILE_CHUNK_CHARS = 1 << 18  # a --train-data file is read and guarded in chunks of whole lines


@dataclass(frozen=True)
class TrainData:
    """What ``--train-data`` names: ``split``, ``stdlib`` or a UTF-8 text file."""

    kind: str  # SPLIT, STDLIB or "file"
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else self.kind


def train_data_option(value: str) -> TrainData:
    """argparse type of ``--train-data``: a bad value is an argument error naming the choices."""
    text = value.strip()
    if text in (SPLIT, STDLIB):
        return TrainData(text)
    expected = f"expected {SPLIT}, {STDLIB} or a UTF-8 text file, got {text!r}"
    if not text:
        raise argparse.ArgumentTypeError(expected)
    p = Path(text).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{expected}: no such file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{expected}: not a regular file")
    if p.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{expected}: the file is empty")
    return TrainData("file", p.resolve())


@dataclass
class Corpus:
    """Training tokens: the split, then the documents of the source that the run needs."""

    ids: torch.Tensor
    data: TrainData
    label: str
    split_tokens: int
    documents: list[str] = field(default_factory=list)  # after the split, in order
    skipped: list[str] = field(default_factory=list)  # left out: they hold held-out text
    exhausted: bool = False  # the source ended before the corpus reached its target

    def passes(self, trained_tokens: int) -> float:
        return trained_tokens / self.ids.numel()

    def meta(self, trained_tokens: int) -> dict:
        return {
            "name": self.data.name, "label": self.label, "tokens": int(self.ids.numel()),
            "split_tokens": self.split_tokens, "documents": len(self.documents),
            "first_document": self.documents[0] if self.documents else None,
            "last_document": self.documents[-1] if self.documents else None,
            "skipped_heldout_overlap": list(self.skipped), "guard_tokens": GUARD_TOKENS,
            "source_exhausted": self.exhausted, "trained_tokens": trained_tokens,
            "passes": self.passes(trained_tokens),
            "sha256": hashlib.sha256(self.ids.numpy().tobytes()).hexdigest(),
        }


class HeldoutGuard:
    """Finds runs of ``k`` tokens of the held-out split in other token sequences.

    Every ``k``-gram is hashed exactly (two polynomial hashes modulo primes below 2^31, in
    int64 without overflow), so a held-out run is always found; a hash collision can only
    leave out a document too many.
    """

    _P1, _P2 = 2_147_483_647, 2_147_483_629

    def __init__(self, heldout_ids: torch.Tensor, k: int = GUARD_TOKENS):
        self.k = max(1, min(k, heldout_ids.numel()))
        generator = torch.Generator().manual_seed(17)
        self._r1 = torch.randint(1, 2**31, (self.k,), generator=generator)
        self._r2 = torch.randint(1, 2**31, (self.k,), generator=generator)
        self._heldout = torch.unique(self._hashes(heldout_ids))

    def _hashes(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() < self.k:
            return torch.empty(0, dtype=torch.long)
        # Ids below 2^24: each product is below 2^55 and a sum of <= 32 of them below 2^60.
        # (Folding larger ids only adds collisions, never misses a run.)
        grams = (ids.long() % 2**24).unfold(0, self.k, 1)
        h1 = (grams * self._r1).sum(1) % self._P1
        h2 = (grams * self._r2).sum(1) % self._P2
        return h1 * self._P2 + h2

    def overlaps(self, ids: torch.Tensor) -> bool:
        return bool(torch.isin(self._hashes(ids), self._heldout).any())


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of the standard library's ``.py`` files in sorted path
    order, without the folders and files left out above (so the order depends on the Python
    version only, not on the file system)."""
    root = stdlib_root() if root is None else root
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("config-")]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata_"):
                path = Path(folder, name)
                rel = path.relative_to(root).as_posix()
                if rel not in _SKIPPED_FILES:
                    found.append((rel, path))
    found.sort(key=lambda item: item[0])
    return found


def _stdlib_documents() -> Iterator[tuple[str, str]]:
    files = stdlib_files()
    if not files:
        raise EvalError(f"--train-data {STDLIB}: no Python sources under {stdlib_root()}; "
                        f"use --train-data {SPLIT} or a text file")
    for rel, path in files:
        try:
            source = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue  # unreadable: skipped, as the same file is on every run of this installation
        if source.strip():
            # A blank line between files; nothing else marks the boundary.
            yield rel, source.rstrip("\n") + "\n\n"


def _file_documents(path: Path) -> Iterator[tuple[str, str]]:
    """A text file in chunks of whole lines, read as they are needed."""
    first, lines, size = 1, [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= _FILE_CHUNK_CHARS:
                    yield f"{path.name}:{first}-{number}", "".join(lines)
                    first, lines, size = number + 1, [], 0
    except UnicodeDecodeError as err:
        raise EvalError(f"--train-data {path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise EvalError(f"--train-data {path}: cannot read it ({err})") from None
    if lines:
        yield f"{path.name}:{first}-{first + len(lines) - 1}", "".join(lines)


def _tokenized(tokenizer, documents: Iterable[tuple[str, str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Documents tokenized a batch at a time, only as far as the caller reads."""
    batch: list[tuple[str, str]] = []

    def flush():
        ids = tokenizer([text for _, text in batch], add_special_tokens=False,
                        return_attention_mask=False)["input_ids"]
        for (name, _), doc in zip(batch, ids):
            if doc:
                yield name, torch.tensor(doc, dtype=torch.long)

    for document in documents:
        batch.append(document)
        if len(batch) == _TOKENIZE_BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def build_corpus(tokenizer, split_ids: torch.Tensor, heldout_ids: torch.Tensor, data: TrainData,
                 target_tokens: int) -> Corpus:
    """The split, then documents of ``data`` in order until the corpus holds
    ``target_tokens``, the last one cut there (no documents when the split already holds
    that many, or for ``split``): a run that trains on ``target_tokens`` then trains on
    every token once.

    Which documents are used depends on the split, the source and ``target_tokens`` only,
    never on the seed. A document is left out when any run of :data:`GUARD_TOKENS` tokens
    that would be in the corpus with it (including across its boundary with the previous
    one) is also in the held-out split.
    """
    split_label = f"the training split ({split_ids.numel():,} tokens)"
    corpus = Corpus(split_ids, data, split_label, int(split_ids.numel()))
    if data.kind == SPLIT or split_ids.numel() >= target_tokens:
        return corpus
    if data.kind == STDLIB:
        documents = _stdlib_documents()
        corpus.label = (f"{split_label} + Python {sys.version_info.major}.{sys.version_info.minor} "
                        f"standard library sources")
    else:
        documents = _file_documents(data.path)
        corpus.label = f"{split_label} + {data.path}"
    guard = HeldoutGuard(heldout_ids)
    parts, total = [split_ids], int(split_ids.numel())
    tail = split_ids[-(guard.k - 1):] if guard.k > 1 else split_ids[:0]
    for name, ids in _tokenized(tokenizer, documents):
        if guard.overlaps(torch.cat([tail, ids])):
            corpus.skipped.append(name)
            continue
        parts.append(ids)
        corpus.documents.append(name)
        total += ids.numel()
        tail = torch.cat([tail, ids])[-(guard.k - 1):] if guard.k > 1 else tail
        if total >= target_tokens:
            break
    else:
        corpus.exhausted = True
    corpus.ids = torch.cat(parts)[: max(target_tokens, split_ids.numel())]
    return corpus
