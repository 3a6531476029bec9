"""The ``modelopt-sparse finetune`` subcommand: sparse-aware fine-tuning against a dense control."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from . import options
from .corpus import DEFAULT_TRAIN_DATA, GUARD_TOKENS, build_corpus, train_data_option
from .data import load_text, split_tokens, split_windows, tokenize
from .errors import EvalError
from .job import offline_and_quiet, open_model, prepare_out_dir, resolve_backend, run_meta, say_written
from .models import DEFAULT_MODEL_LABEL, INSTALL_DEFAULT_MODEL
from .perplexity import apply_setting
from .sweep import DENSE, Setting

DEFAULT_PATTERN = "2:4"
# 250 x 8 x 1024 = 2.05M tokens: under one pass over the default corpus (the split and the
# standard library's sources hold ~2.3M tokens on Python 3.11 and 3.12).
DEFAULT_STEPS = 250
DEFAULT_BATCH = 8
DEFAULT_SEQ_LEN = 1024
DEFAULT_LR = 1e-4
DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_CPU_EVAL_WINDOWS = 2
DEFAULT_OUT = "modelopt-sparse-finetune"

DESCRIPTION = f"""\
Fine-tune a causal language model with N:M sparse attention and measure how much of the
perplexity gap to dense attention the training recovers.

The text is cut once: the last --heldout-fraction is held out, the rest trains. With
--train-data stdlib (the default) the Python standard library's own sources follow that
training split, file by file in sorted path order, as far as the steps need (steps x
batch x seq-len tokens, the last file cut there): training sees each token about once,
so the runs measure adaptation, not memorization of a small split. A file that shares a
run of {GUARD_TOKENS} tokens with the held-out split is left out. Training takes non-overlapping
windows of the corpus in a seeded order. Two runs start from the same weights and train
on the same windows in the same order with the same optimizer (AdamW, warm-up then
cosine decay):
  * sparse: the model converted with --pattern (and --sink, --window);
  * dense control: the same kernel with N=0 (exact dense attention).
Held-out perplexity is measured before and after each run (and every --eval-every steps,
for the curve only: the result is the last step's, no step is picked by its held-out
perplexity). The gap is sparse / dense - 1 at the same point; the report gives it before
and after training and the share of it that training closed. The sparse run is saved
with modelopt_sparse.save and restored into a fresh copy of the model, whose held-out
perplexity is measured again.

Runs on accelerate: one process on the CPU or one GPU as it is, several GPUs with
'accelerate launch --num_processes N -m modelopt_sparse.cli finetune ...' (DDP; --batch-size
is the global batch and is split over the processes). Writes finetune.json and
finetune.png (training loss, held-out perplexity and the gap against steps) to --out,
the checkpoint to --checkpoint.
"""

EPILOG = f"""\
defaults:
  model  {DEFAULT_MODEL_LABEL};
         install it with: {INSTALL_DEFAULT_MODEL}
  text   CPython's own documentation topics (pydoc_data.topics), the text of 'eval'
  training data  its training split, then the standard library's .py sources (without
         test/, tests/, idlelib/, pydoc_data/, encodings/, site-packages/)
  sparsity  {DEFAULT_PATTERN} with no sinks and no dense window: the whole gap comes from the
         pattern, the setting with the most to recover (--window 64 for the package default)

examples:
  modelopt-sparse finetune --device cuda
      {DEFAULT_STEPS} steps of {DEFAULT_BATCH} x {DEFAULT_SEQ_LEN} tokens per run, lr {DEFAULT_LR:g}, bf16 autocast
  accelerate launch --num_processes 2 -m modelopt_sparse.cli finetune --device cuda
  modelopt-sparse finetune --pattern 8:16 --window 64 --steps 100 --checkpoint /tmp/ckpt
  modelopt-sparse finetune --train-data my_corpus.txt --text-file my_eval.txt
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    options.add_model_options(parser)
    sparse = parser.add_argument_group("sparse attention")
    sparse.add_argument("--pattern", type=options.sparse_pattern, default=options.sparse_pattern(DEFAULT_PATTERN),
                        metavar="N:M", help=f"the N:M pattern to fine-tune with (default: {DEFAULT_PATTERN})")
    sparse.add_argument("--sink", type=options.non_negative_int, default=0, metavar="N",
                        help="first tokens kept dense (default: 0)")
    sparse.add_argument("--window", type=options.non_negative_int, default=0, metavar="N",
                        help="local window kept dense (default: 0)")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=options.positive_int, default=DEFAULT_STEPS, metavar="N",
                       help=f"optimizer steps per run (default: {DEFAULT_STEPS})")
    train.add_argument("--batch-size", type=options.positive_int, default=DEFAULT_BATCH, metavar="N",
                       help=f"windows per step over all processes (default: {DEFAULT_BATCH})")
    train.add_argument("--seq-len", type=options.positive_int, default=DEFAULT_SEQ_LEN, metavar="N",
                       help=f"tokens per window, at most the model's max_position_embeddings "
                            f"(default: {DEFAULT_SEQ_LEN})")
    train.add_argument("--lr", type=lambda v: options.float_in(v, 0.0, 1.0), default=DEFAULT_LR, metavar="LR",
                       help=f"peak learning rate, in (0, 1] (default: {DEFAULT_LR:g})")
    train.add_argument("--warmup-steps", type=options.non_negative_int, metavar="N",
                       help="linear warm-up steps (default: a tenth of --steps)")
    train.add_argument("--weight-decay", type=lambda v: options.float_in(v, 0.0, 1.0, low_open=False),
                       default=0.0, metavar="W", help="AdamW weight decay (default: 0)")
    train.add_argument("--max-grad-norm", type=lambda v: options.float_in(v, 0.0, 1e6, low_open=False),
                       default=1.0, metavar="X", help="gradient clipping, 0 for none (default: 1)")
    train.add_argument("--seed", type=options.non_negative_int, default=0, metavar="N",
                       help="seed of the training windows' order (default: 0)")
    train.add_argument("--train-data", type=train_data_option, default=train_data_option(DEFAULT_TRAIN_DATA),
                       metavar="split|stdlib|PATH",
                       help="what trains: 'split', the text's training split alone (a small text is "
                            "passed over many times); 'stdlib', the split followed by the Python standard "
                            "library's sources; or PATH, the split followed by a UTF-8 text file (./split "
                            "for a file of that name). Only as much as the steps need is read; parts that "
                            "hold held-out text are left out (default: stdlib)")
    data = parser.add_argument_group("held-out data")
    data.add_argument("--heldout-fraction", type=lambda v: options.float_in(v, 0.0, 0.5),
                      default=DEFAULT_HELDOUT_FRACTION, metavar="F",
                      help=f"share of the text, at its end, never trained on (default: {DEFAULT_HELDOUT_FRACTION})")
    data.add_argument("--eval-every", type=options.non_negative_int, default=0, metavar="N",
                      help="also measure held-out perplexity every N steps of both runs, for a curve of the "
                           "gap against training steps (default: 0, before and after only)")
    data.add_argument("--eval-windows", type=options.max_windows, metavar="N|all",
                      help=f"held-out windows of --seq-len tokens to measure (default: all on a GPU, "
                           f"{DEFAULT_CPU_EVAL_WINDOWS} on the CPU)")
    run = parser.add_argument_group("how to run")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto (cuda if available), cpu or cuda; under 'accelerate launch' each process "
                          "takes its own GPU (default: auto)")
    run.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                     help="attention kernel: triton (GPU), torch (the PyTorch reference, with autograd) or "
                          "auto (default: auto)")
    run.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                     help="float32 weights with bf16 autocast, or none; auto is bf16 on CUDA, no on the "
                          "CPU (default: auto)")
    run.add_argument("--checkpoint", metavar="DIR",
                     help="where mts.save writes the fine-tuned sparse model (default: --out/checkpoint)")
    run.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                     help=f"directory for finetune.json and finetune.png (default: ./{DEFAULT_OUT})")
    parser.set_defaults(handler=run_command)


def make_accelerator(device: str, mixed_precision: str):
    import torch

    try:
        from accelerate import Accelerator
    except ImportError:
        raise EvalError("finetune needs accelerate (pip install accelerate)") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: CUDA is not available here; use --device cpu")
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "no" if on_cpu else "bf16"
    return Accelerator(cpu=on_cpu, mixed_precision=mixed_precision)


def _reset_accelerate(accelerator) -> None:
    """accelerate keeps its state in a process-wide singleton that refuses other settings;
    a single-process run gives it back so that in-process callers (tests, notebooks) can
    run again with other options. Under 'accelerate launch' the process ends anyway."""
    if accelerator is not None and accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def run_finetune(args: argparse.Namespace, stdout=None) -> dict | None:
    """Run the job described by parsed ``finetune`` options; returns the finetune.json
    document on the main process (None on the others)."""
    accelerator = None
    try:
        accelerator = make_accelerator(args.device, args.mixed_precision)
        return _run(args, accelerator, stdout if stdout is not None else sys.stdout)
    finally:
        _reset_accelerate(accelerator)


def _run(args: argparse.Namespace, accelerator, stdout) -> dict | None:
    import torch
    from tqdm.auto import tqdm

    import modelopt_sparse as mts

    from .finetune import TrainSettings, heldout_ppl, train

    main = accelerator.is_main_process
    say = (lambda *a: print(*a, file=stdout, flush=True)) if main else (lambda *a: None)  # noqa: E731
    started = time.time()
    device = accelerator.device
    backend = resolve_backend(args.backend, device)
    if args.seq_len < 2:
        raise EvalError("--seq-len must be at least 2 (a window predicts seq_len - 1 tokens)")
    if args.batch_size % accelerator.num_processes:
        raise EvalError(f"--batch-size {args.batch_size} is not a multiple of the {accelerator.num_processes} "
                        "processes")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    if warmup > args.steps:
        raise EvalError(f"--warmup-steps {warmup} is more than --steps {args.steps}")
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                             warmup_steps=warmup, weight_decay=args.weight_decay,
                             max_grad_norm=args.max_grad_norm, seed=args.seed)
    sparse_setting = Setting(args.pattern[0], args.pattern[1], args.sink, args.window)
    out_dir = prepare_out_dir(args.out)
    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else out_dir / "checkpoint"
    if checkpoint.exists() and not checkpoint.is_dir():
        raise EvalError(f"--checkpoint {checkpoint}: exists and is not a directory")

    # float32 weights: the optimizer's master copy; --mixed-precision bf16 autocasts the compute.
    loaded = open_model(args.model, args.text_file, {"--seq-len": args.seq_len}, device, torch.float32, say)
    base = loaded.model
    text = load_text(args.text_file)
    ids = tokenize(loaded.tokenizer, text.text)
    train_ids, heldout_ids = split_tokens(ids, args.heldout_fraction)
    eval_windows = args.eval_windows if args.eval_windows is not None else (
        "all" if device.type == "cuda" else DEFAULT_CPU_EVAL_WINDOWS)
    heldout = split_windows(heldout_ids, args.seq_len, None if eval_windows == "all" else eval_windows, "held-out")
    if train_ids.numel() < args.seq_len:
        raise EvalError(f"the training split has {train_ids.numel():,} tokens, fewer than --seq-len {args.seq_len}")
    say(f"text: {text.label}: {ids.numel():,} tokens; training split {train_ids.numel():,} tokens, held-out "
        f"{heldout.shape[0]} x {args.seq_len} (of the last {heldout_ids.numel():,} tokens)")
    trained_tokens = args.steps * args.batch_size * args.seq_len
    corpus = build_corpus(loaded.tokenizer, train_ids, heldout_ids, args.train_data, trained_tokens)
    passes = corpus.passes(trained_tokens)
    say(f"training data ({args.train_data.name}): {corpus.label}: {corpus.ids.numel():,} tokens"
        + (f", {len(corpus.documents)} document(s) after the split" if corpus.documents else "")
        + (f"; {len(corpus.skipped)} left out for sharing {GUARD_TOKENS} tokens with the held-out split"
           if corpus.skipped else ""))
    say(f"device: {device} x {accelerator.num_processes} process(es), mixed precision "
        f"{accelerator.mixed_precision}, attention backend: {backend}")
    say(f"training: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens per run "
        f"({passes:.2f} passes over the training data), lr {args.lr:g}, warm-up {warmup}")
    if passes > 1.05:
        why = ("the source ran out" if corpus.exhausted else "--train-data split")
        say(f"note: training sees each token ~{passes:.1f} times ({why}): the held-out result then mixes "
            "adaptation with memorization of the training data")

    runs: dict[str, dict] = {}
    progress_kwargs = dict(file=sys.stderr, dynamic_ncols=True, disable=not main)
    for name, setting in (("sparse", sparse_setting), ("dense", DENSE)):
        model = copy.deepcopy(base)
        apply_setting(model, setting, backend)
        label = f"{setting.label} fine-tune" if name == "sparse" else "dense control"
        with tqdm(total=heldout.shape[0], desc=f"{label}: held-out before", unit="window", **progress_kwargs) as bar:
            before = heldout_ppl(accelerator, model, heldout, bar)
        curve: list[dict] = [{"step": 0, "heldout_ppl": before}]
        eval_seconds = 0.0

        def after_step(step: int, run_model=model) -> None:
            nonlocal eval_seconds
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                eval_start = time.time()
                curve.append({"step": step, "heldout_ppl": heldout_ppl(accelerator, run_model, heldout)})
                eval_seconds += time.time() - eval_start

        run_start = time.time()
        with tqdm(total=args.steps, desc=f"{label}: training", unit="step", **progress_kwargs) as bar:
            losses = train(accelerator, model, corpus.ids, settings, bar, after_step)
        seconds = time.time() - run_start - eval_seconds
        with tqdm(total=heldout.shape[0], desc=f"{label}: held-out after", unit="window", **progress_kwargs) as bar:
            after = heldout_ppl(accelerator, model, heldout, bar)
        curve.append({"step": args.steps, "heldout_ppl": after})
        record = {"label": label, "setting": setting.label, "heldout_ppl_before": before, "heldout_ppl_after": after,
                  "heldout_curve": curve, "train_loss": losses, "train_seconds": round(seconds, 2),
                  "train_tokens_per_s": args.steps * args.batch_size * args.seq_len / seconds if seconds else None}
        if name == "sparse":
            # The same fine-tuned weights with dense attention: did training for the
            # pattern cost the dense model anything?
            mts.disable(model)
            record["heldout_ppl_after_evaluated_dense"] = heldout_ppl(accelerator, model, heldout)
            mts.enable(model)
            if main:
                mts.save(model, str(checkpoint))
            record["checkpoint"] = str(checkpoint)
        runs[name] = record
        say(f"{label}: held-out ppl {before:.4f} -> {after:.4f} ({seconds:.0f} s)")
        del model
    accelerator.wait_for_everyone()

    doc = None
    if main:
        restored = copy.deepcopy(base)
        mts.restore(restored, str(checkpoint))
        restored_ppl = _local_ppl(accelerator, restored, heldout)
        del restored
        sparse_after = runs["sparse"]["heldout_ppl_after"]
        runs["sparse"]["restored_heldout_ppl"] = restored_ppl
        runs["sparse"]["restored_matches"] = abs(restored_ppl / sparse_after - 1) < 1e-3
        gap_before = runs["sparse"]["heldout_ppl_before"] / runs["dense"]["heldout_ppl_before"] - 1
        gap_after = sparse_after / runs["dense"]["heldout_ppl_after"] - 1
        dense_curve = {point["step"]: point["heldout_ppl"] for point in runs["dense"]["heldout_curve"]}
        summary = {
            "gap_before_pct": 100 * gap_before,
            "gap_after_pct": 100 * gap_after,
            # The gap at every measured step (both runs are measured at the same steps).
            "gap_curve": [
                {"step": point["step"], "gap_pct": 100 * (point["heldout_ppl"] / dense_curve[point["step"]] - 1)}
                for point in runs["sparse"]["heldout_curve"] if point["step"] in dense_curve
            ],
            # Share of the before-gap that training removed; None when there was no gap.
            "gap_closed_fraction": (gap_before - gap_after) / gap_before if gap_before > 0 else None,
        }
        meta = run_meta("finetune", getattr(args, "argv", None), loaded, device, torch.float32, backend, started)
        meta.update({
            "text": text.label, "text_tokens": int(ids.numel()), "train_split_tokens": int(train_ids.numel()),
            # What trained: the corpus (name, size, documents, passes; the split is its start).
            "train_data": args.train_data.name, "train_tokens": int(corpus.ids.numel()),
            "trained_tokens": trained_tokens, "train_passes": passes, "train_corpus": corpus.meta(trained_tokens),
            "heldout_tokens": int(heldout_ids.numel()), "heldout_windows": int(heldout.shape[0]),
            "heldout_fraction": args.heldout_fraction, "seq_len": args.seq_len, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": warmup,
            "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm, "seed": args.seed,
            "eval_every": args.eval_every, "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "pattern": sparse_setting.label,
        })
        doc = {"meta": meta, "runs": runs, "summary": summary}
        from .finetune_report import format_report, write_json, write_plot

        say("")
        say(format_report(doc))
        write_json(out_dir / "finetune.json", doc)
        title = (f"{loaded.source.label} | {text.label} | train data {args.train_data.name}, {passes:.2f} passes | "
                 f"{args.steps} steps x {args.batch_size} x {args.seq_len} | "
                 f"{device} {accelerator.mixed_precision} {backend}")
        skipped = write_plot(out_dir / "finetune.png", doc, title)
        say_written(say, out_dir, ["finetune.json"], "finetune.png", skipped, extra=f"; checkpoint {checkpoint}")
    accelerator.wait_for_everyone()
    return doc


def _local_ppl(accelerator, model, windows) -> float:
    """Held-out perplexity on this process alone (the restored copy exists on the main one only)."""
    import math

    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(windows.shape[0]):
            ids = windows[i : i + 1].to(accelerator.device)
            with accelerator.autocast():
                logits = model(input_ids=ids, use_cache=False).logits
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def run_command(args: argparse.Namespace) -> int:
    with offline_and_quiet():
        run_finetune(args)
    return 0
