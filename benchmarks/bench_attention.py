#!/usr/bin/env python3
"""Attention TFLOPS against SDPA and FlexAttention: ``modelopt-sparse bench`` as a script.

The benchmark lives in ``modelopt_sparse/bench/`` so that the installed console script
runs it; this file runs the copy in this checkout and re-exports its API for scripts that
``from benchmarks.bench_attention import run_benchmarks``.
"""

import sys
from pathlib import Path

# Benchmark the kernels of this checkout, not a copy that happens to be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelopt_sparse.bench import *  # noqa: E402,F401,F403
from modelopt_sparse.bench import OUR_VARIANTS, TARGETS, Case, compute_ratios, main, run_benchmarks  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main(prog="bench_attention.py"))
