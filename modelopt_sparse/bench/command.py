"""``modelopt-sparse bench`` (the kernel benchmark): options, and the run that prints and saves."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .cases import DEFAULT_PEERS, DTYPES, MODES, OUR_VARIANTS, PEERS, QUICK_SHAPES, BenchConfig, Case, cases
from .cases import implementations, resolve_config, resolve_device
from .env import collect_env
from .report import compute_ratios, fmt_tflops, format_report, reasons, save_plot
from .runner import run_benchmarks

DESCRIPTION = (
            "Forward and forward+backward effective TFLOPS of modelopt_sparse N:M sparse "
            "attention (dense, 2:4, 4:8, 8:16, 2:4 index tie-break) against PyTorch SDPA "
            "(flash, cuDNN), compiled FlexAttention and FlashAttention-4 (when installed), "
            "on one varlen-packed sequence. "
            "FLOPs = 4*S^2*H*D, /2 when causal, x3.5 for fwd+bwd, the same for every "
            "implementation, so TFLOPS ratios are speed ratios."
)
EPILOG = (
    "Lists take commas or spaces: --seq-lens 4096,16384. Examples:\n"
    "  modelopt-sparse bench --out bench_out                    # the full H200 sweep\n"
    "  modelopt-sparse bench --modes fwd --causal causal --head-dims 128\n"
    "  modelopt-sparse bench --quick --device cpu               # smoke test, no GPU\n"
    "Without CUDA, --quick is the default (--full forces the full sweep: hours on a CPU).\n"
    "Whole models (SmolLM2, Llama-8B, generate) against SDPA: modelopt-sparse bench model --help"
)


def build_parser(prog: str = "modelopt-sparse bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fill_parser(p)
    p.set_defaults(handler=lambda args: run_from_args(args, p))
    return p


def _list_arg(convert):
    def parse(text: str):
        return [convert(x) for x in text.replace(",", " ").split() if x]

    return parse


def _flatten(values) -> list:
    return [x for chunk in values for x in chunk] if values else []


def fill_parser(p: argparse.ArgumentParser) -> None:
    shapes = p.add_argument_group("shapes")
    shapes.add_argument("--seq-lens", nargs="+", type=_list_arg(int), metavar="S",
                        help="sequence lengths (default 4096,16384; --quick: 256)")
    shapes.add_argument("--head-dims", nargs="+", type=_list_arg(int), metavar="D",
                        help="head dims (default 64,128; --quick: 64)")
    shapes.add_argument("--heads", type=int, help="query heads H (default 32; --quick: 2)")
    shapes.add_argument("--gqa", type=int, default=1, metavar="R",
                        help="query heads per K/V head: Hkv = H / R (default 1, i.e. MHA)")
    shapes.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="default bf16")

    what = p.add_argument_group("what to run")
    what.add_argument("--modes", nargs="+", type=_list_arg(str), metavar="MODE",
                      help="fwd, fwdbwd or both (default fwd,fwdbwd)")
    what.add_argument("--causal", choices=("both", "causal", "noncausal"), default="both",
                      help="default both")
    what.add_argument("--variants", nargs="+", type=_list_arg(str), metavar="V",
                      help=f"our variants, a subset of {','.join(OUR_VARIANTS)} (default all); 'none' for none")
    what.add_argument("--peers", nargs="+", type=_list_arg(str), metavar="P",
                      help=f"peers, a subset of {','.join(PEERS)}; default {','.join(DEFAULT_PEERS['cuda'])} "
                           "on CUDA (fa4: FlashAttention-4's CuTe kernel, flash_attn.cute; reported n/a with "
                           "the reason when flash-attn-4 is not installed or this GPU is unsupported) and "
                           f"{','.join(DEFAULT_PEERS['cpu'])} (flex reported n/a) on CPU; 'none' for none")
    what.add_argument("--backend", choices=("triton", "torch", "auto", "hopper"),
                      help="backend= for our attention() (default triton on CUDA, torch on CPU; hopper: the "
                           "sm_90 CUDA forward engine, docs/hopper_engine.md, with Triton's backward)")
    what.add_argument("--dense-window-size", type=int, default=64, help="default 64")
    what.add_argument("--num-sink-tokens", type=int, default=0, help="default 0")
    what.add_argument("--sliding-window", type=int, default=0, metavar="W",
                      help="sliding-window attention for ours, FlexAttention and FA4 (keys W or more positions "
                           "behind the query are out; SDPA reported n/a); FLOPs stay those of full causal "
                           "attention, so compare TFLOPS with a run without it (default 0: off)")
    what.add_argument("--flex-compile-mode", default=None,
                      help="torch.compile mode for FlexAttention, e.g. max-autotune-no-cudagraphs "
                           "(default: torch.compile's default)")

    run = p.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="tiny shapes (S=256, H=2, D=64) and short timing: a smoke test, not a measurement "
                           "(the default without CUDA)")
    size.add_argument("--full", action="store_true",
                      help="the full-size defaults even on a CPU (hours there; the default on CUDA)")
    run.add_argument("--warmup-ms", type=float, help="do_bench warmup in ms (default 100; --quick: 25)")
    run.add_argument("--rep-ms", type=float, help="do_bench repetition time in ms (default 500; --quick: 100)")
    run.add_argument("--cpu-reps", type=int, default=5, help="timed repetitions per measurement on CPU (default 5)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, metavar="DIR",
                     help="write DIR/results.json (updated after every measurement) and DIR/tflops.png")


def _subset(values, allowed, what, parser) -> tuple[str, ...] | None:
    if not values:
        return None
    if values == ["none"]:
        return ()
    bad = [v for v in values if v not in allowed]
    if bad:
        parser.error(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    variants = _subset(_flatten(args.variants), tuple(OUR_VARIANTS), "variants", parser)
    return BenchConfig(
        seq_lens=tuple(_flatten(args.seq_lens)) or None,
        head_dims=tuple(_flatten(args.head_dims)) or None,
        heads=args.heads,
        gqa=args.gqa,
        modes=_subset(_flatten(args.modes), MODES, "modes", parser) or MODES,
        causal={"both": (True, False), "causal": (True,), "noncausal": (False,)}[args.causal],
        variants=tuple(OUR_VARIANTS) if variants is None else variants,
        peers=_subset(_flatten(args.peers), PEERS, "peers", parser),
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        dense_window_size=args.dense_window_size,
        num_sink_tokens=args.num_sink_tokens,
        sliding_window=args.sliding_window,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        cpu_reps=args.cpu_reps,
        flex_compile_mode=args.flex_compile_mode,
        seed=args.seed,
        quick=args.quick,
    )


def _cpu_default_to_quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Without CUDA the full sweep runs the PyTorch reference for hours: make --quick the
    default there, and say so in one line."""
    if args.quick or args.full:
        return
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if torch.device(device).type == "cuda":
        return
    args.quick = True
    print(f"note: no CUDA device: running the quick smoke test (--quick: S={QUICK_SHAPES['seq_lens'][0]}, "
          f"H={QUICK_SHAPES['heads']}, D={QUICK_SHAPES['head_dims'][0]}); --full runs the full sweep "
          "(hours on a CPU)", file=sys.stderr, flush=True)


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _cpu_default_to_quick(args, parser)
    try:
        cfg = resolve_config(config_from_args(args, parser))
    except ValueError as exc:
        parser.error(str(exc))
    on_cpu = torch.device(cfg.device).type != "cuda"
    if on_cpu and not cfg.quick:
        print("note: full-size shapes on CPU run the PyTorch reference and can take hours; "
              "use --quick for a smoke test", file=sys.stderr)
    env = collect_env(cfg.device)
    total = len(cases(cfg)) * len(implementations(cfg))
    results_path = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        results_path = args.out / "results.json"

    def dump(rows, ratios, complete):
        if results_path is None:
            return
        doc = {"complete": complete, "env": env, "settings": asdict(cfg), "rows": rows, "ratios": ratios}
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(results_path)  # a reader never sees half a file

    done: list[dict] = []

    def progress(row):
        done.append(row)
        what = (f"{fmt_tflops(row['tflops']):>8} TFLOPS ({row['ms']:.3f} ms)" if row["status"] == "ok"
                else f"n/a: {row['reason']}")
        print(f"[{len(done)}/{total}] {Case.of_row(row).label}  {row['impl']:<10} {what}", file=sys.stderr,
              flush=True)
        dump(done, None, False)  # a crash midway still leaves what was measured

    fa4 = f", flash-attn-4 {env.get('flash_attn_4') or 'not installed'}" if "fa4" in cfg.peers else ""
    print(f"benchmarking on {env['gpu'] or 'CPU'}: torch {env['torch']}, triton {env['triton']}{fa4}, "
          f"commit {(env['git_commit'] or 'unknown')[:12]}", file=sys.stderr, flush=True)
    rows = run_benchmarks(cfg, on_row=progress)
    ratios = compute_ratios(rows, gpu=not on_cpu)
    dump(rows, ratios, True)

    notes = []
    if results_path is not None:
        notes.append(f"wrote {results_path}")
        skipped = save_plot(rows, cfg, args.out / "tflops.png")
        notes.append(skipped or f"wrote {args.out / 'tflops.png'}")
    why = reasons(rows)
    if why:
        notes.append("n/a reasons:")
        notes.extend(why)
    if on_cpu:
        notes.append("NOTE: CPU run: these numbers only prove that the script works end to end; they say "
                     "nothing about GPU kernel speed.")
    print("\n".join(notes))
    print()
    print(format_report(rows, ratios, cfg, env))
    return 0
