"""The configurations of one run: pattern strings, sink and window sweeps."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..kernels.semantics import check_pattern
from .errors import EvalError

DEFAULT_PATTERNS = "dense,2:4,4:8,8:16"


@dataclass(frozen=True)
class Setting:
    """One evaluated configuration. ``n == 0`` is dense attention (sinks and window unused)."""

    n: int
    m: int
    sink: int
    window: int

    @property
    def dense(self) -> bool:
        return self.n == 0

    @property
    def pattern(self) -> str:
        return "dense" if self.dense else f"{self.n}:{self.m}"

    @property
    def label(self) -> str:
        return "dense" if self.dense else f"{self.pattern} sink={self.sink} window={self.window}"

    def sparse_cfg(self, backend: str) -> dict:
        """The plugin config of this setting. Dense runs through the same converted
        modules and kernel with ``sparsity_n=0``, so it differs from the sparse rows in
        nothing but the pattern."""
        return {
            "sparse_cfg": {
                "default": {
                    "sparsity_n": self.n,
                    "sparsity_m": self.m,
                    "num_sink_tokens": self.sink,
                    "dense_window_size": self.window,
                    "backend": backend,
                    "enable": True,
                }
            }
        }


DENSE = Setting(0, 4, 0, 0)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"dense"`` -> ``(0, 4)``; ``"N:M"`` -> ``(N, M)``, checked by the kernel's own rule."""
    word = text.strip().lower()
    if word == "dense":
        return DENSE.n, DENSE.m
    parts = word.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise EvalError(f"bad pattern {text!r}: write 'dense' or N:M with integers, e.g. 2:4")
    n, m = (int(p) for p in parts)
    if n == 0:
        raise EvalError(f"bad pattern {text!r}: N=0 keeps every score; write 'dense'")
    try:
        check_pattern(n, m)
    except ValueError as err:
        raise EvalError(f"bad pattern {text!r}: {err}") from None  # check_pattern names the allowed values
    return n, m


def parse_patterns(text: str) -> list[tuple[int, int]]:
    """A comma-separated list of patterns, duplicates removed, order kept."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise EvalError("--patterns is empty: give e.g. dense,2:4,4:8")
    return list(dict.fromkeys(parse_pattern(item) for item in items))


def build_settings(patterns: list[tuple[int, int]], sinks: list[int], windows: list[int]) -> list[Setting]:
    """Dense first (always: it is the baseline of the Δppl column), then every sparse
    pattern with every (sink, window) pair."""
    for name, values in (("--sink", sinks), ("--window", windows)):
        bad = [v for v in values if v < 0]
        if bad:
            raise EvalError(f"{name} must be >= 0, got {bad[0]}")
    settings = [DENSE]
    for (n, m), sink, window in itertools.product(patterns, dict.fromkeys(sinks), dict.fromkeys(windows)):
        if n != 0:
            settings.append(Setting(n, m, sink, window))
    return settings
