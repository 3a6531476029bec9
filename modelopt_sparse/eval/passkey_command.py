"""The ``modelopt-sparse passkey`` subcommand: retrieval of a hidden key under sparse attention."""

from __future__ import annotations

import argparse
import sys
import time

from . import options
from .data import load_text, tokenize
from .job import offline_and_quiet, open_model, prepare_out_dir, resolve_backend, resolve_device, run_meta, say_written
from .models import DEFAULT_MODEL_LABEL, INSTALL_DEFAULT_MODEL, resolve_dtype
from .passkey import FORMATS, build_prompts, greedy_generator, score
from .passkey_report import format_table, setting_record, write_csv, write_heatmaps, write_json
from .perplexity import apply_setting
from .sweep import DEFAULT_PATTERNS, build_settings

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_CPU_LENGTHS = (1024, 2048)  # the PyTorch reference prefills 8k tokens slowly
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_TRIALS = 5
DEFAULT_MAX_NEW_TOKENS = 8
DEFAULT_OUT = "modelopt-sparse-passkey"

DESCRIPTION = """\
Passkey retrieval with N:M sparse softmax attention.

A 5-digit pass key is hidden in filler text (slices of the evaluation text) at each
--depths percentage of the prompt, for each --lengths context length, --trials times;
the question comes at the end. Keys and filler offsets are drawn from --seed, so the
same options give the same prompts, for every configuration alike. The model answers
by greedy decoding (the prompt is prefilled through the sparse kernel; decode steps are
dense by the kernel's rule) and is scored by exact match of the first number it writes.

Configurations are those of 'modelopt-sparse eval': dense, then each of --patterns with
every --sink and --window value. The job prints accuracy per context length and writes
passkey.json (every prompt's key, answer and verdict), passkey.csv (accuracy per cell)
and passkey.png (a depth x length heat map per configuration) to --out. The context
length counts the prompt and the --max-new-tokens answer budget, so a length equal to
the model's max_position_embeddings fits.
"""

EPILOG = f"""\
prompt (plain format):
  There is a pass key hidden inside a lot of irrelevant text. [...] <filler>
  The pass key is 12345. Remember it. 12345 is the pass key. <filler>
  What is the pass key? The pass key is
--format chat puts everything before the last sentence into one user turn of the
tokenizer's chat template and starts the assistant's turn with 'The pass key is'.

defaults:
  model  {DEFAULT_MODEL_LABEL};
         install it with: {INSTALL_DEFAULT_MODEL}
  text   CPython's own documentation topics (pydoc_data.topics), the text of 'eval'

examples:
  modelopt-sparse passkey --device cuda
      dense, {DEFAULT_PATTERNS.removeprefix('dense,')} at {', '.join(map(str, DEFAULT_LENGTHS))} tokens, depths \
{', '.join(map(str, DEFAULT_DEPTHS))} %, {DEFAULT_TRIALS} trials
  modelopt-sparse passkey --patterns 2:4 --sink 0 4 --window 0 64 256 --lengths 2048 --device cuda
  modelopt-sparse passkey --format chat --trials 10 --lengths 1024,2048 --out runs/passkey-chat
"""


def _depths(value: str) -> list[int]:
    depths = options.int_list(value)
    bad = [d for d in depths if d > 100]
    if bad:
        raise argparse.ArgumentTypeError(f"depths are percentages in 0..100, got {bad[0]}")
    return depths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    options.add_model_options(parser)
    options.add_sparsity_options(parser, DEFAULT_PATTERNS)
    task = parser.add_argument_group("the test")
    task.add_argument("--lengths", type=options.positive_int_list, nargs="+", metavar="N",
                      help="context lengths in tokens, prompt plus answer budget (default: "
                           f"{','.join(map(str, DEFAULT_LENGTHS))} on a GPU, "
                           f"{','.join(map(str, DEFAULT_CPU_LENGTHS))} on the CPU)")
    task.add_argument("--depths", type=_depths, nargs="+", metavar="PCT",
                      help=f"where the key sits, in percent of the filler (default: "
                           f"{','.join(map(str, DEFAULT_DEPTHS))})")
    task.add_argument("--trials", type=options.positive_int, default=DEFAULT_TRIALS, metavar="N",
                      help=f"prompts per (length, depth) cell, each with its own key and filler "
                           f"(default: {DEFAULT_TRIALS})")
    task.add_argument("--seed", type=options.non_negative_int, default=0, metavar="N",
                      help="seed of the keys and filler offsets (default: 0)")
    task.add_argument("--max-new-tokens", type=options.positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                      help=f"answer budget of greedy decoding (default: {DEFAULT_MAX_NEW_TOKENS}; a "
                           "tokenizer that splits digits needs 6 for ' 12345')")
    task.add_argument("--format", choices=FORMATS, default="plain",
                      help="plain text, or wrapped in the tokenizer's chat template (default: plain)")
    options.add_run_options(parser, DEFAULT_OUT)
    parser.set_defaults(handler=run_command)


def run_passkey(args: argparse.Namespace, stdout=None) -> dict:
    """Run the job described by parsed ``passkey`` options; returns the passkey.json document.

    Raises:
        EvalError: for anything the user can fix, before the model is loaded when possible.
    """
    stdout = stdout if stdout is not None else sys.stdout
    say = lambda *a: print(*a, file=stdout, flush=True)  # noqa: E731
    started = time.time()

    settings = build_settings(args.patterns, options.flatten(args.sink, [0]), options.flatten(args.window, [64]))
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device)
    dtype = resolve_dtype(args.dtype, device)
    default_lengths = DEFAULT_LENGTHS if device.type == "cuda" else DEFAULT_CPU_LENGTHS
    lengths = list(dict.fromkeys(options.flatten(args.lengths, list(default_lengths))))
    depths = list(dict.fromkeys(options.flatten(args.depths, list(DEFAULT_DEPTHS))))
    out_dir = prepare_out_dir(args.out)

    loaded = open_model(args.model, args.text_file, {"--lengths": max(lengths)}, device, dtype, say)
    text = load_text(args.text_file)
    filler = tokenize(loaded.tokenizer, text.text)
    prompts = build_prompts(loaded.tokenizer, filler, lengths, depths, args.trials, args.seed,
                            args.max_new_tokens, args.format)
    say(f"text: {text.label}: {filler.numel():,} tokens of filler")
    say(f"prompts: {len(prompts)} ({len(lengths)} lengths x {len(depths)} depths x {args.trials} trials), "
        f"format {args.format}, seed {args.seed}")
    say(f"device: {device}, dtype: {str(dtype).removeprefix('torch.')}, attention backend: {backend}")
    say(f"configurations: {len(settings)} ({', '.join(s.label for s in settings)})")

    from tqdm.auto import tqdm

    generate = greedy_generator(loaded.model, loaded.tokenizer, args.max_new_tokens)
    records = []
    with tqdm(total=len(settings) * len(prompts), unit="prompt", file=sys.stderr, dynamic_ncols=True) as progress:
        for setting in settings:
            apply_setting(loaded.model, setting, backend)
            progress.set_description(setting.label)
            results = score(prompts, generate, progress)
            records.append(setting_record(setting, results, lengths, depths))
            progress.write(f"{setting.label}: {100 * records[-1]['accuracy']:.0f}% correct", file=stdout)

    meta = run_meta("passkey", getattr(args, "argv", None), loaded, device, dtype, backend, started)
    meta.update({
        "text": text.label,
        "filler_tokens": int(filler.numel()),
        "lengths": lengths,
        "depths": depths,
        "trials": args.trials,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "format": args.format,
        "example_prompt": loaded.tokenizer.decode(list(prompts[0].ids)),
    })
    doc = {"meta": meta, "results": records}
    say("")
    say(format_table(records, lengths))
    say("\naccuracy: exact match of the first number of the greedy answer, over all depths and trials "
        "of a length ('all': every prompt).")
    write_json(out_dir / "passkey.json", doc)
    write_csv(out_dir / "passkey.csv", records)
    title = f"{loaded.source.label} | {text.label} | {args.trials} trials/cell | {device} {meta['dtype']} {backend}"
    skipped = write_heatmaps(out_dir / "passkey.png", records, lengths, depths, title)
    say_written(say, out_dir, ["passkey.json", "passkey.csv"], "passkey.png", skipped)
    return doc


def run_command(args: argparse.Namespace) -> int:
    with offline_and_quiet():
        run_passkey(args)
    return 0
