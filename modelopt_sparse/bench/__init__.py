"""TFLOPS of modelopt_sparse N:M sparse flash attention against PyTorch's and FlashAttention-4's kernels.

One run measures, for every configuration (mode x causal x sequence length x head dim):

* ours: ``modelopt_sparse.kernels.attention`` on one varlen-packed sequence, dense and
  2:4, 4:8, 8:16 and 2:4 with ``tie_break="index"``;
* peers: PyTorch SDPA pinned to the flash and to the cuDNN backend, FlexAttention
  compiled with ``torch.compile`` (causal through a ``create_block_mask`` BlockMask), and
  FlashAttention-4 (``flash_attn.cute``; n/a with the reason when it is not installed).

TFLOPS are *effective*: every implementation of a configuration is credited with the dense
FLOPs ``4*S^2*H*D`` (halved when causal, x3.5 for forward+backward), so a ratio of two
TFLOPS numbers is a ratio of speeds. A peer or variant that cannot run is reported as
"n/a" with its reason; it never stops the run.

Run ``modelopt-sparse bench --help`` (or ``python benchmarks/bench_attention.py --help`` from
a checkout); benchmarks/README.md explains the output. Other scripts can
``from modelopt_sparse.bench import run_benchmarks``. Whole models against SDPA:
``modelopt-sparse bench model`` (:mod:`modelopt_sparse.bench.model`).

The modules: ``cases`` (what is measured), ``prepare`` (what each implementation runs),
``timing``, ``runner`` (the loop), ``report`` (ratios, tables, chart), ``env`` (versions and
commit), ``errors`` (how failures are recorded) and ``command`` (the CLI).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .cases import (
    DEFAULT_PEERS,
    DTYPES,
    FULL_SHAPES,
    MODES,
    OUR_VARIANTS,
    PEERS,
    QUICK_SHAPES,
    BenchConfig,
    Case,
    cases,
    implementations,
    resolve_config,
)
from .command import DESCRIPTION, EPILOG, config_from_args, fill_parser, run_from_args
from .command import build_parser as _build_kernel_parser
from .env import REPO_ROOT, collect_env
from .errors import Unsupported
from .prepare import Prepared
from .report import MAIN_HEAD_DIM, TARGETS, Target, compute_ratios, format_report, save_plot
from .runner import run_benchmarks
from .timing import HOST_BOUND_SHARE
from .timing import host_enqueue_ms as _host_enqueue_ms  # noqa: F401  (tests time the enqueue path)

__all__ = [
    "BenchConfig", "Case", "DEFAULT_PEERS", "DESCRIPTION", "DTYPES", "EPILOG", "FULL_SHAPES", "HOST_BOUND_SHARE",
    "MAIN_HEAD_DIM", "MODES", "OUR_VARIANTS", "PEERS", "Prepared", "QUICK_SHAPES", "REPO_ROOT", "TARGETS",
    "Target", "Unsupported", "add_arguments", "build_parser", "cases", "collect_env", "compute_ratios",
    "config_from_args", "format_report", "implementations", "main", "resolve_config", "run_benchmarks",
    "run_from_args", "save_plot",
]


def _add_model_subcommand(p: argparse.ArgumentParser) -> None:
    # `bench` alone is the kernel benchmark; `bench model` is a sub-subcommand with its own
    # options and handler (argparse copies the subparser's handler over the kernel one).
    from .model.command import add_arguments as add_model_arguments

    sub = p.add_subparsers(
        dest="bench_command", metavar="[model]", title="whole-model benchmark",
        description="'bench model' times HuggingFace models (SmolLM2-135M, a Llama-3-8B shape, generate)\n"
                    "with SDPA against mts.sparsify; its options: modelopt-sparse bench model --help",
    )
    add_model_arguments(sub.add_parser("model"))


def build_parser(prog: str = "modelopt-sparse bench") -> argparse.ArgumentParser:
    p = _build_kernel_parser(prog)
    _add_model_subcommand(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Fill the ``modelopt-sparse bench`` subparser (see modelopt_sparse/cli.py)."""
    p.description, p.epilog = DESCRIPTION, EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    fill_parser(p)
    p.set_defaults(handler=lambda args: run_from_args(args, p))
    _add_model_subcommand(p)


def main(argv: Sequence[str] | None = None, prog: str = "modelopt-sparse bench") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
