"""Passkey retrieval: a 5-digit key hidden in filler text, asked for at the end.

The prompts are built at the token level so that every prompt of a given context length
has exactly that many tokens (prompt plus the answer budget), and the key sits at the
requested depth of the filler. The filler is a slice of the evaluation text, taken at an
offset drawn, like the key, from a generator seeded by ``(seed, length, depth, trial)``:
the same options give the same prompts, and adding a length or a depth leaves the other
cells unchanged. Scoring is greedy decoding and an exact match of the first number in the
continuation.

Layout of a prompt (``plain`` format)::

    INTRO  filler[:before]  NEEDLE  filler[before:]  QUESTION  ANSWER_PREFIX -> model answers

The ``chat`` format wraps ``INTRO ... QUESTION`` in the tokenizer's chat template as one
user turn and puts ``ANSWER_PREFIX`` at the start of the assistant's turn.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import EvalError

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key at the end.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = " The pass key is"
FORMATS = ("plain", "chat")

_FIRST_NUMBER = re.compile(r"\s*(\d+)")
_TEMPLATE_MARK = "\x00MTS_PASSKEY_CONTENT\x00"


@dataclass(frozen=True)
class PasskeyPrompt:
    length: int  # context length: prompt tokens plus the answer budget
    depth: int  # percent of the filler before the needle
    trial: int
    key: str
    ids: tuple[int, ...]
    needle_start: int  # token index where the needle begins
    filler_offset: int  # token offset of the filler slice in the text


@dataclass(frozen=True)
class PasskeyResult:
    prompt: PasskeyPrompt
    generated: str
    answer: str | None

    @property
    def correct(self) -> bool:
        return self.answer == self.prompt.key


@dataclass(frozen=True)
class _Frame:
    """The fixed token pieces around the filler and the needle."""

    head: list[int]  # chat-template opening (if any) + INTRO
    question: list[int]  # QUESTION + chat-template closing (if any) + ANSWER_PREFIX


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, return_attention_mask=False)["input_ids"])


def _frame(tokenizer, fmt: str) -> _Frame:
    if fmt == "plain":
        # add_special_tokens on the first piece only: a tokenizer that adds BOS adds it once.
        return _Frame(_encode(tokenizer, INTRO, special=True),
                      _encode(tokenizer, QUESTION) + _encode(tokenizer, ANSWER_PREFIX))
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise EvalError("--format chat: the model's tokenizer has no chat template; use --format plain")
        # Render the template around a marker, then tokenize the two sides: the haystack in
        # between stays token-exact, whatever the template looks like.
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _TEMPLATE_MARK}],
                                                 tokenize=False, add_generation_prompt=True)
        if rendered.count(_TEMPLATE_MARK) != 1:
            raise EvalError("--format chat: the chat template does not place the user message once; "
                            "use --format plain")
        before, after = rendered.split(_TEMPLATE_MARK)
        return _Frame(_encode(tokenizer, before) + _encode(tokenizer, INTRO),
                      _encode(tokenizer, QUESTION) + _encode(tokenizer, after)
                      + _encode(tokenizer, ANSWER_PREFIX.lstrip()))
    raise EvalError(f"unknown prompt format {fmt!r}; choose from {', '.join(FORMATS)}")


def minimum_length(tokenizer, fmt: str, answer_tokens: int) -> int:
    """The shortest context length that leaves at least one filler token."""
    frame = _frame(tokenizer, fmt)
    needle = len(_encode(tokenizer, NEEDLE.format(key="00000")))
    return len(frame.head) + needle + len(frame.question) + answer_tokens + 1


def cell_rng(seed: int, length: int, depth: int, trial: int) -> random.Random:
    # A string seed is hashed (SHA-512) by random.Random: stable across runs and platforms.
    return random.Random(f"passkey:{seed}:{length}:{depth}:{trial}")


def build_prompts(tokenizer, filler_ids: torch.Tensor | list[int], lengths: list[int], depths: list[int],
                  trials: int, seed: int, answer_tokens: int, fmt: str = "plain") -> list[PasskeyPrompt]:
    """Every (length, depth, trial) prompt, lengths outermost.

    Raises:
        EvalError: a length too short for the fixed parts of the prompt, or a text too
            short to fill the longest prompt.
    """
    filler = filler_ids.tolist() if isinstance(filler_ids, torch.Tensor) else list(filler_ids)
    frame = _frame(tokenizer, fmt)
    prompts = []
    for length in lengths:
        for depth in depths:
            if not 0 <= depth <= 100:
                raise EvalError(f"depth {depth} is not a percentage in 0..100")
            for trial in range(trials):
                rng = cell_rng(seed, length, depth, trial)
                key = str(rng.randint(10000, 99999))
                needle = _encode(tokenizer, NEEDLE.format(key=key))
                fixed = len(frame.head) + len(needle) + len(frame.question)
                n_filler = length - answer_tokens - fixed
                if n_filler < 1:
                    raise EvalError(
                        f"context length {length} leaves no room for filler: the fixed parts of the prompt "
                        f"take {fixed} tokens and the answer {answer_tokens}; use lengths of at least "
                        f"{fixed + answer_tokens + 1}")
                if n_filler > len(filler):
                    raise EvalError(f"the text has {len(filler):,} tokens, too few to fill a {length}-token "
                                    "prompt; use a longer --text-file or shorter --lengths")
                offset = rng.randrange(0, len(filler) - n_filler + 1)
                chunk = filler[offset : offset + n_filler]
                before = round(n_filler * depth / 100)
                ids = frame.head + chunk[:before] + needle + chunk[before:] + frame.question
                prompts.append(PasskeyPrompt(length, depth, trial, key, tuple(ids),
                                             len(frame.head) + before, offset))
    return prompts


def parse_answer(text: str) -> str | None:
    """The first number of a continuation (leading spaces allowed), or None if it starts otherwise."""
    found = _FIRST_NUMBER.match(text)
    return found.group(1) if found else None


def greedy_generator(model: torch.nn.Module, tokenizer, max_new_tokens: int) -> Callable[[tuple[int, ...]], str]:
    """``ids -> decoded continuation`` by greedy decoding (prefill through the sparse
    kernel, decode steps dense by the kernel's rule)."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    # A fresh config: the model's own may ask for sampling, and greedy must not depend on it.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=pad)
    device = next(model.parameters()).device

    @torch.no_grad()
    def generate(ids: tuple[int, ...]) -> str:
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config)
        return tokenizer.decode(out[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)

    return generate


def score(prompts: list[PasskeyPrompt], generate: Callable[[tuple[int, ...]], str],
          progress=None) -> list[PasskeyResult]:
    results = []
    for prompt in prompts:
        text = generate(prompt.ids)
        results.append(PasskeyResult(prompt, text, parse_answer(text)))
        if progress is not None:
            progress.update(1)
    return results


def accuracy(results: list[PasskeyResult], length: int | None = None, depth: int | None = None) -> float:
    """Share of correct answers among the results of one cell, row, column, or all."""
    chosen = [r for r in results
              if (length is None or r.prompt.length == length) and (depth is None or r.prompt.depth == depth)]
    return sum(r.correct for r in chosen) / len(chosen) if chosen else float("nan")


def accuracy_grid(results: list[PasskeyResult], lengths: list[int], depths: list[int]) -> list[list[float]]:
    """``grid[i][j]``: accuracy at ``depths[i]`` and ``lengths[j]``."""
    return [[accuracy(results, length, depth) for length in lengths] for depth in depths]
