"""The ``modelopt-sparse`` command line.

Each subcommand lives in its own module and contributes two things: ``add_arguments(parser)``,
which fills in its subparser and sets ``handler``, and the handler itself, which takes the
parsed namespace and returns an exit status. Add a subcommand by adding a line to
``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# (name, one-line help, module with add_arguments(parser)), in the order --help lists them.
_SUBCOMMANDS = (
    ("eval", "perplexity of a model with N:M sparse attention, swept over patterns", "modelopt_sparse.eval.command"),
    ("passkey", "retrieval of a 5-digit pass key hidden in long text", "modelopt_sparse.eval.passkey_command"),
    ("search", "per-layer N:M patterns that keep perplexity within a budget", "modelopt_sparse.eval.search_command"),
    ("finetune", "sparse-aware fine-tuning against a dense control", "modelopt_sparse.eval.finetune_command"),
    ("bench", "speed against SDPA: attention TFLOPS (bench), whole HF models (bench model)", "modelopt_sparse.bench"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelopt-sparse",
        description="N:M structured sparse softmax attention: accuracy and speed tools.",
        epilog="Run 'modelopt-sparse COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name, summary, module in _SUBCOMMANDS:
        sub_parser = sub.add_parser(name, help=summary)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .eval.errors import EvalError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except EvalError as err:
        print(f"modelopt-sparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modelopt-sparse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
