"""The ``modelopt-sparse search`` subcommand: per-layer N:M patterns within a perplexity budget."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from . import options
from .data import load_text, split_tokens, split_windows, tokenize
from .errors import EvalError
from .job import offline_and_quiet, open_model, prepare_out_dir, resolve_backend, resolve_device, run_meta, say_written
from .layer_search import Trial, assignment_config, candidate_order, greedy_search, module_order
from .models import DEFAULT_MODEL_LABEL, INSTALL_DEFAULT_MODEL, resolve_dtype
from .perplexity import apply_setting, perplexity
from .search_report import format_layer_table, write_json, write_plot
from .sweep import DENSE, Setting

DEFAULT_CANDIDATES = "2:4,4:8,8:16"
DEFAULT_BUDGET = "0.5%"
DEFAULT_SEQ_LEN = 1024
DEFAULT_HELDOUT_FRACTION = 0.5
DEFAULT_CALIB_WINDOWS = (16, 2)  # GPU, CPU
DEFAULT_HELDOUT_WINDOWS = ("all", 2)
DEFAULT_OUT = "modelopt-sparse-search"

DESCRIPTION = """\
Choose an N:M pattern (or dense) for every attention layer so that perplexity stays
within a budget of the dense model's.

The text is cut once: the first part calibrates, the last --heldout-fraction is held out.
1. Sensitivity, on the calibration split: every layer's dropped softmax mass under each
   candidate pattern (modelopt_sparse.collect_stats, all layers sparse), and, with
   --rank-by ppl (the default), the perplexity with only that one layer sparse.
2. Greedy choice, on the held-out split: layers are taken least sensitive first; each
   gets the sparsest candidate (equal sparsity: the least sensitive) for which the
   perplexity of everything chosen so far plus this layer stays within
   dense * (1 + budget); a layer no candidate fits stays dense.
The job writes sparse_config.json (a SparseAttentionConfig: modelopt_sparse.sparsify(model,
json.load(f)) applies it, mts.save records it and mts.restore brings it back), search.json
(every measurement and trial) and search.png (sensitivity and chosen pattern per layer).
"""

EPILOG = f"""\
defaults:
  model  {DEFAULT_MODEL_LABEL};
         install it with: {INSTALL_DEFAULT_MODEL}
  text   CPython's own documentation topics (pydoc_data.topics), the text of 'eval'

examples:
  modelopt-sparse search --budget 0.5% --device cuda
      candidates {DEFAULT_CANDIDATES}, sink 0, window 64, {DEFAULT_SEQ_LEN}-token windows
  modelopt-sparse search --budget 1% --patterns 1:4,2:4,3:4 --sink 4 --window 64 --device cuda
  modelopt-sparse search --rank-by mass --budget 0.25%
      rank layers by dropped softmax mass alone: no one-layer perplexity runs (faster)

using the result:
  import json, modelopt_sparse as mts
  mts.sparsify(model, json.load(open("modelopt-sparse-search/sparse_config.json")))
"""


def budget_pct(text: str) -> float:
    """``0.5%`` or ``0.5``: a percentage in (0, 100]."""
    value = text.strip()
    value = value[:-1].strip() if value.endswith("%") else value
    return options.float_in(value, 0.0, 100.0, what="a percentage such as 0.5%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    options.add_model_options(parser)
    sparse = parser.add_argument_group("candidates and budget")
    sparse.add_argument("--budget", type=budget_pct, default=budget_pct(DEFAULT_BUDGET), metavar="PCT",
                        help=f"allowed perplexity increase over dense on the held-out split, in percent "
                             f"('0.5%%' or '0.5'; in (0, 100]; default: {DEFAULT_BUDGET.replace('%', '%%')})")
    sparse.add_argument("--patterns", type=options.patterns, default=options.patterns(DEFAULT_CANDIDATES),
                        metavar="LIST",
                        help=f"candidate N:M patterns, comma-separated, M in 2/4/8/16 and 0 < N < M; dense is "
                             f"every layer's fallback and is not listed (default: {DEFAULT_CANDIDATES})")
    sparse.add_argument("--sink", type=options.non_negative_int, default=0, metavar="N",
                        help="first tokens kept dense in every sparse layer (default: 0)")
    sparse.add_argument("--window", type=options.non_negative_int, default=64, metavar="N",
                        help="local window kept dense in every sparse layer (default: 64)")
    sparse.add_argument("--rank-by", choices=("ppl", "mass"), default="ppl",
                        help="layer sensitivity: perplexity with only that layer sparse (ppl), or its dropped "
                             "softmax mass (mass: no one-layer runs) (default: ppl)")
    data = parser.add_argument_group("data")
    data.add_argument("--seq-len", type=options.positive_int, default=DEFAULT_SEQ_LEN, metavar="N",
                      help=f"tokens per window, at most the model's max_position_embeddings "
                           f"(default: {DEFAULT_SEQ_LEN})")
    data.add_argument("--heldout-fraction", type=lambda v: options.float_in(v, 0.0, 0.9), metavar="F",
                      default=DEFAULT_HELDOUT_FRACTION,
                      help=f"share of the text, at its end, held out for the budget check; the rest "
                           f"calibrates (default: {DEFAULT_HELDOUT_FRACTION})")
    data.add_argument("--calib-windows", type=options.max_windows, metavar="N|all",
                      help=f"calibration windows (default: {DEFAULT_CALIB_WINDOWS[0]} on a GPU, "
                           f"{DEFAULT_CALIB_WINDOWS[1]} on the CPU)")
    data.add_argument("--heldout-windows", type=options.max_windows, metavar="N|all",
                      help=f"held-out windows (default: {DEFAULT_HELDOUT_WINDOWS[0]} on a GPU, "
                           f"{DEFAULT_HELDOUT_WINDOWS[1]} on the CPU)")
    options.add_run_options(parser, DEFAULT_OUT)
    parser.set_defaults(handler=run_command)


def _window_count(value, defaults, device) -> int | None:
    chosen = value if value is not None else defaults[0 if device.type == "cuda" else 1]
    return None if chosen == "all" else chosen


def run_search(args: argparse.Namespace, stdout=None) -> dict:
    """Run the job described by parsed ``search`` options; returns the search.json document.

    Raises:
        EvalError: for anything the user can fix, before the model is loaded when possible.
    """
    import torch
    from tqdm.auto import tqdm

    from ..config import SparseAttentionConfig
    from ..conversion import check_convertible
    from ..stats import collect_stats

    stdout = stdout if stdout is not None else sys.stdout
    say = lambda *a: print(*a, file=stdout, flush=True)  # noqa: E731
    started = time.time()

    if any(n == 0 for n, _ in args.patterns):
        raise EvalError("--patterns: 'dense' is every layer's fallback; list only N:M candidates, e.g. 2:4,8:16")
    candidates = [Setting(n, m, args.sink, args.window) for n, m in args.patterns]
    if args.seq_len < 2:
        raise EvalError("--seq-len must be at least 2 (a window predicts seq_len - 1 tokens)")
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device)
    dtype = resolve_dtype(args.dtype, device)
    out_dir = prepare_out_dir(args.out)

    loaded = open_model(args.model, args.text_file, {"--seq-len": args.seq_len}, device, dtype, say)
    model = loaded.model
    text = load_text(args.text_file)
    ids = tokenize(loaded.tokenizer, text.text)
    calib_ids, heldout_ids = split_tokens(ids, args.heldout_fraction)
    calib = split_windows(calib_ids, args.seq_len, _window_count(args.calib_windows, DEFAULT_CALIB_WINDOWS, device),
                          "calibration")
    heldout = split_windows(heldout_ids, args.seq_len,
                            _window_count(args.heldout_windows, DEFAULT_HELDOUT_WINDOWS, device), "held-out")
    modules = [name for name, _ in check_convertible(model)]
    say(f"text: {text.label}: {ids.numel():,} tokens; calibration {calib.shape[0]} x {args.seq_len} "
        f"(first {calib_ids.numel():,} tokens), held-out {heldout.shape[0]} x {args.seq_len} "
        f"(last {heldout_ids.numel():,} tokens)")
    say(f"device: {device}, dtype: {str(dtype).removeprefix('torch.')}, attention backend: {backend}")
    if args.window >= args.seq_len - 1:
        say(f"note: --window {args.window} covers every key of a {args.seq_len}-token window: the patterns "
            "change nothing (use a smaller --window or a longer --seq-len)")
    say(f"candidates: {', '.join(c.pattern for c in candidates)} (sink {args.sink}, window {args.window}); "
        f"{len(modules)} attention layers; budget +{args.budget:g}%")

    def measure(assignment, windows, progress=None) -> float:
        import modelopt_sparse as mts

        mts.sparsify(model, assignment_config(assignment, backend))
        return perplexity(model, windows, progress)

    # Dense baseline and each candidate on every layer at once (which also gives the
    # per-layer dropped mass), on both splits.
    uniform: dict[Setting, dict] = {}
    with tqdm(total=(1 + len(candidates)) * (calib.shape[0] + heldout.shape[0]), unit="window",
              desc="baselines", file=sys.stderr, dynamic_ncols=True) as progress:
        apply_setting(model, DENSE, backend)
        dense_calib = perplexity(model, calib, progress)
        dense_heldout = perplexity(model, heldout, progress)
        for setting in candidates:
            apply_setting(model, setting, backend)
            with torch.no_grad(), collect_stats(model) as stats:
                calib_ppl = perplexity(model, calib, progress)
            mass = {row["module"]: row["dropped_mass"] for row in stats.per_layer()}
            uniform[setting] = {"calib_ppl": calib_ppl, "heldout_ppl": perplexity(model, heldout, progress),
                                "dropped_mass": mass}
    limit = dense_heldout * (1 + args.budget / 100)
    say(f"dense: calibration ppl {dense_calib:.4f}, held-out ppl {dense_heldout:.4f}; limit {limit:.4f}")
    for setting, u in uniform.items():
        say(f"all layers {setting.pattern}: held-out ppl {u['heldout_ppl']:.4f} "
            f"({100 * (u['heldout_ppl'] / dense_heldout - 1):+.3f}%)")

    single: dict[str, dict[Setting, float]] = {m: {} for m in modules}
    if args.rank_by == "ppl":
        with tqdm(total=len(modules) * len(candidates) * calib.shape[0], unit="window", desc="one layer sparse",
                  file=sys.stderr, dynamic_ncols=True) as progress:
            for module in modules:
                for setting in candidates:
                    ppl = measure({module: setting}, calib, progress)
                    single[module][setting] = 100 * (ppl / dense_calib - 1)
        sensitivity = single
    else:
        sensitivity = {m: {s: uniform[s]["dropped_mass"][m] for s in candidates} for m in modules}

    with tqdm(total=len(modules) * len(candidates), unit="trial", desc="greedy", file=sys.stderr,
              dynamic_ncols=True) as progress:
        accepted: list[Trial] = []

        def on_trial(trial: Trial) -> None:
            accepted.extend([trial] if trial.accepted else [])
            progress.update(1)
            progress.set_postfix_str(f"{len(accepted)} sparse")

        outcome = greedy_search(modules, candidates, sensitivity, lambda a: measure(a, heldout), limit, on_trial)

    # The final assignment measured once more (it is the last accepted trial): the model is
    # left converted with it, and the number reported is one measurement of exactly it.
    config = assignment_config(outcome.assignment, "auto")
    SparseAttentionConfig.model_validate(config)  # what sparsify will accept
    final_ppl = measure(outcome.assignment, heldout) if outcome.assignment else dense_heldout
    # Sink and window are the same for every candidate: the pattern names a candidate.
    labels = [c.pattern for c in candidates]
    layers = []
    for position, module in enumerate(modules):
        chosen = outcome.assignment.get(module)
        layers.append({
            "module": module,
            "layer": position,
            "rank": outcome.order.index(module),
            "chosen": chosen.pattern if chosen else "dense",
            "candidates": {
                s.pattern: {
                    "single_layer_delta_ppl_pct": single[module].get(s),
                    "dropped_mass": uniform[s]["dropped_mass"].get(module),
                } for s in candidates
            },
            "tried_order": [s.pattern for s in candidate_order(candidates, sensitivity[module])],
        })
    counts = Counter(layer["chosen"] for layer in layers if layer["chosen"] != "dense")
    result = {
        "sparse_layers": outcome.sparse_count(),
        "layers": len(modules),
        "patterns": dict(counts),
        "heldout_ppl": final_ppl,
        "dense_heldout_ppl": dense_heldout,
        "delta_ppl_pct": 100 * (final_ppl / dense_heldout - 1),
        "limit_ppl": limit,
        "within_budget": final_ppl <= limit,
        "at_least_half_sparse": 2 * outcome.sparse_count() >= len(modules),
    }
    meta = run_meta("search", getattr(args, "argv", None), loaded, device, dtype, backend, started)
    meta.update({
        "text": text.label, "text_tokens": int(ids.numel()), "seq_len": args.seq_len,
        "heldout_fraction": args.heldout_fraction, "calib_windows": int(calib.shape[0]),
        "heldout_windows": int(heldout.shape[0]), "budget_pct": args.budget, "rank_by": args.rank_by,
        "sink": args.sink, "window": args.window,
    })
    doc = {
        "meta": meta,
        "candidates": [{"pattern": s.pattern, "sparsity_n": s.n, "sparsity_m": s.m,
                        "sink": s.sink, "window": s.window, "all_layers_calib_ppl": uniform[s]["calib_ppl"],
                        "all_layers_heldout_ppl": uniform[s]["heldout_ppl"]} for s in candidates],
        "dense": {"calib_ppl": dense_calib, "heldout_ppl": dense_heldout},
        "layers": layers,
        "trials": [{"module": t.module, "pattern": t.setting.pattern, "heldout_ppl": t.ppl,
                    "delta_ppl_pct": 100 * (t.ppl / dense_heldout - 1), "accepted": t.accepted}
                   for t in outcome.trials],
        "result": result,
        "config": config,
    }
    say("")
    say(format_layer_table(layers, labels, args.rank_by))
    say("")
    say(_summary(result, args.budget, module_order(modules, sensitivity), sensitivity, args.rank_by))
    write_json(out_dir / "sparse_config.json", config)
    write_json(out_dir / "search.json", doc)
    title = (f"{loaded.source.label} | {text.label} | {args.seq_len}-token windows | {device} {meta['dtype']} "
             f"{backend}")
    skipped = write_plot(out_dir / "search.png", doc, title)
    say_written(say, out_dir, ["sparse_config.json", "search.json"], "search.png", skipped)
    return doc


def _summary(result: dict, budget: float, order: list[str], sensitivity, rank_by: str) -> str:
    patterns = ", ".join(f"{label} x{count}" for label, count in result["patterns"].items()) or "none"
    lines = [
        f"sparse layers: {result['sparse_layers']} of {result['layers']} ({patterns}); held-out ppl "
        f"{result['heldout_ppl']:.4f} vs dense {result['dense_heldout_ppl']:.4f} "
        f"({result['delta_ppl_pct']:+.3f}%, budget +{budget:g}%)",
    ]
    if not result["at_least_half_sparse"]:
        # Say why with numbers: what the layers cost one at a time, in the order tried.
        half = order[: (result["layers"] + 1) // 2]
        unit = "% Δppl alone" if rank_by == "ppl" else " dropped mass"
        costs = ", ".join(f"{m}: {min(sensitivity[m].values()):.3g}" for m in half[:8])
        lines.append(f"fewer than half of the layers fit the budget; the {len(half)} least sensitive layers "
                     f"cost ({unit}, cheapest candidate) {costs}" + (" ..." if len(half) > 8 else ""))
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    with offline_and_quiet():
        run_search(args)
    return 0
