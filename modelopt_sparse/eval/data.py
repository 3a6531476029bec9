"""Evaluation text and its split into fixed windows of tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EvalError

# CPython ships its own documentation topics: real English prose and code, ~465k
# characters, present on every machine with no download.
DEFAULT_TEXT_LABEL = "CPython pydoc_data.topics"


@dataclass(frozen=True)
class Text:
    text: str
    label: str


def default_text() -> Text:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise EvalError(
            f"this Python has no pydoc_data.topics ({err}); pass a text file with --text-file PATH"
        ) from None
    return Text("\n\n".join(topics.values()), DEFAULT_TEXT_LABEL)


def check_text_file(path: str | Path | None) -> None:
    """Fail at once on a ``--text-file`` that is missing, without reading it (that comes later)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"--text-file {path}: no such file")
    if not p.is_file():
        raise EvalError(f"--text-file {path}: not a regular file")


def load_text(path: str | Path | None) -> Text:
    """The text of ``path`` (UTF-8), or the default text when ``path`` is None."""
    if path is None:
        return default_text()
    check_text_file(path)
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"--text-file {path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise EvalError(f"--text-file {path}: cannot read it ({err})") from None
    if not text.strip():
        raise EvalError(f"--text-file {path}: the file is empty")
    return Text(text, str(p))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text``, without special tokens.

    No BOS is added: every window is a plain slice of the running text, so all windows
    (and all configurations) see the same kind of input.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if not ids:
        # transformers can build an empty tokenizer for a directory without tokenizer files.
        raise EvalError("the tokenizer turned the text into no tokens: does the model directory hold "
                        "its tokenizer files (e.g. tokenizer.json)?")
    return torch.tensor(ids, dtype=torch.long)


def make_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """``[n, seq_len]``: the first ``n`` non-overlapping windows of ``ids``.

    The tail that does not fill a whole window is dropped, so every window has the same
    length and the same number of predicted tokens.
    """
    available = ids.numel() // seq_len
    if available == 0:
        raise EvalError(
            f"the text has only {ids.numel()} tokens, fewer than --seq-len {seq_len}; "
            "use a longer --text-file or a smaller --seq-len"
        )
    n = available if max_windows is None else min(available, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def split_tokens(ids: torch.Tensor, heldout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(head, tail)``: the text's tokens cut once, the last ``heldout_fraction`` held out.

    One contiguous cut, not interleaved windows: no held-out token has its neighbours in
    the other split, so nothing of the held-out text is seen during calibration or training.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise EvalError(f"the held-out fraction must be between 0 and 1, got {heldout_fraction}")
    cut = ids.numel() - int(round(ids.numel() * heldout_fraction))
    return ids[:cut], ids[cut:]


def split_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None, split: str) -> torch.Tensor:
    """:func:`make_windows` of one split, with an error that names the split."""
    if ids.numel() < seq_len:
        raise EvalError(f"the {split} split has {ids.numel():,} tokens, fewer than --seq-len {seq_len}; "
                        "use a longer --text-file, a smaller --seq-len or another --heldout-fraction")
    return make_windows(ids, seq_len, max_windows)
