"""``modelopt-sparse bench model``: options, checks, and the run that prints and saves."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .cases import CASES, DEFAULT_CASES, GROUPS, IMPLS, estimate_s, expand_cases

DESCRIPTION = """\
Whole-model speed: HuggingFace LlamaForCausalLM with random weights (SmolLM2-135M and a
4-layer Llama-3-8B shape), SDPA against the same weights converted by mts.sparsify (dense:
N=0 through our kernel; 2:4: mts.SPARSE_SOFTMAX_DEFAULT), bf16, all in one process: eager,
torch.compile and CUDA-graph forwards, generate (eager, and static cache + compile), and the
host cost of one attention call. Writes DIR/model_results.json, DIR/model_speed.png and
DIR/model_table.md (for docs/performance.md); prints the target lines last."""


def _epilog() -> str:
    width = max(len(n) for n in CASES)
    cases = "\n".join(f"  {name:<{width}}  {spec.help}" for name, spec in CASES.items())
    groups = "\n".join(f"  {name:<{width}}  {' '.join(members)}" for name, members in GROUPS.items())
    default_min = estimate_s(list(DEFAULT_CASES), IMPLS) / 60
    compiled_min = estimate_s(list(GROUPS["compiled"]), IMPLS) / 60
    return (
        f"cases:\n{cases}\n\ngroups (usable in --cases):\n{groups}\n\n"
        f"The default (--cases default) takes ~{default_min:.0f} min on an H200. The compiled cases compile the\n"
        f"30-layer model once per implementation and shape (30-90 s each, ~{compiled_min:.0f} min for both):\n"
        "run them separately, one case per call if calls are capped at 10 minutes, e.g.\n"
        "  modelopt-sparse bench model                                   # default cases\n"
        "  modelopt-sparse bench model --cases smollm2-compiled --time-budget 540\n"
        "  modelopt-sparse bench model --cases generate-static --time-budget 540\n"
        "  modelopt-sparse bench model --device cpu                      # tiny smoke test, no GPU\n"
        "  modelopt-sparse bench model --dry-run --cases all             # the plan and its estimate\n"
        "Lists take commas or spaces. Autotuning of our kernels is off (MODELOPT_SPARSE_AUTOTUNE=0)\n"
        "unless the environment sets it, as in docs/performance.md."
    )


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _names(text: str) -> list[str]:
    return [x for x in text.replace(",", " ").split() if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Fill the ``modelopt-sparse bench model`` subparser."""
    p.description, p.epilog = DESCRIPTION, _epilog()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--cases", nargs="+", type=_names, metavar="CASE",
                   help="cases or groups to run (default: default); listed below. They run in the order "
                        "listed below (cheap first, compiling cases last), whatever the order given, "
                        "so a --time-budget cuts the last of that order")
    p.add_argument("--impls", nargs="+", type=_names, metavar="IMPL",
                   help=f"implementations, a subset of {','.join(IMPLS)} (default all)")
    p.add_argument("--out", type=Path, default=Path("modelopt-sparse-bench-model"), metavar="DIR",
                   help="output folder (default ./modelopt-sparse-bench-model); the JSON is rewritten "
                        "after every measurement")
    p.add_argument("--warmup", type=_non_negative_int,
                   help="untimed calls before timing (default 5; --tiny: 1); generate: 1 (0 if this is 0)")
    p.add_argument("--reps", type=_positive_int,
                   help="timed calls, median reported (default 30; --tiny: 3); compiled and CUDA-graph forwards: reps "
                        "rounds of 3 back-to-back calls per implementation; generate: reps/5 rounds of one call, "
                        "at least 1 (host-bound calls seconds long: eager rounds read up to 25 %% apart at 3)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available; without CUDA the command refuses), cuda, cuda:N, or cpu "
                        "(a tiny smoke test)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes (2 layers, 64-128 tokens): the CPU smoke test, implied by --device cpu; "
                        "not accepted on CUDA")
    p.add_argument("--compile-backend", metavar="NAME",
                   help="torch.compile backend of the compiled cases (default inductor on CUDA; on a CPU they "
                        "are skipped unless this is given, e.g. eager for Dynamo's capture alone)")
    p.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                   help="skip (and record) every measurement that would end past this many seconds after the "
                        "first one started, by the H200 estimate (default: no limit)")
    p.add_argument("--use-cache", action="store_true",
                   help="forward cases call model(ids) with its default DynamicCache instead of use_cache=False. "
                        "Without a cache and a mask, transformers detects packed sequences from position_ids; "
                        "under torch.compile and CUDA-graph capture it cannot, and hands every attention a "
                        "materialized 4-D mask (SDPA then runs its masked kernel, ours its packed-sequence path)")
    p.add_argument("--host-calls", type=_positive_int,
                   help="back-to-back calls timed in the host case (default 2000; --tiny: 200)")
    p.add_argument("--seed", type=int, default=0, help="weights and token ids (default 0)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its H200 estimate, run nothing")
    p.set_defaults(handler=lambda args: run_from_args(args, p))


def _flatten(values) -> list[str]:
    return [x for chunk in values for x in chunk] if values else []


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """A checked :class:`~.runner.ModelBenchConfig`; every bad option ends in ``parser.error``
    (exit status 2, the message on stderr)."""
    import torch

    from .runner import ModelBenchConfig

    try:
        cases = expand_cases(_flatten(args.cases) or list(DEFAULT_CASES))
    except ValueError as exc:
        parser.error(f"argument --cases: {exc}")
    impls = tuple(dict.fromkeys(_flatten(args.impls))) or IMPLS
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        parser.error(f"argument --impls: unknown {bad}; choose from {', '.join(IMPLS)}")
    impls = tuple(i for i in IMPLS if i in impls)  # SDPA first: ours are compared with it

    device = args.device
    try:
        dev = torch.device("cuda" if device == "auto" else device)
    except RuntimeError:
        parser.error(f"argument --device: {device!r} is not a device; use auto, cuda, cuda:N or cpu")
    if dev.type not in ("cuda", "cpu"):
        parser.error(f"argument --device: {device!r}: this benchmark runs on cuda or, as a smoke test, cpu")
    # A dry run only prints the plan: it may describe the CUDA run on a machine without one.
    cuda_ok = torch.cuda.is_available() or args.dry_run
    if device == "auto" and not cuda_ok:
        if not args.tiny:
            parser.error("no CUDA device: this benchmark measures GPU speed. --device cpu runs every case on "
                         "tiny shapes as a smoke test")
        dev = torch.device("cpu")
    if dev.type == "cuda":
        if not cuda_ok:
            parser.error(f"argument --device: {device!r} asked for, but CUDA is not available")
        if dev.index is not None and torch.cuda.is_available() and dev.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {device!r}, but there are {torch.cuda.device_count()} CUDA devices")
        if args.tiny:
            parser.error("argument --tiny: the tiny shapes are the CPU smoke test (--device cpu); on CUDA the "
                         "real shapes run (choose fewer with --cases, or cap the run with --time-budget)")
    tiny = dev.type == "cpu"

    backend = args.compile_backend
    if backend is not None:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            parser.error(f"argument --compile-backend: unknown backend {backend!r}; choose from {', '.join(known)}")
    elif dev.type == "cuda":
        backend = "inductor"
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a directory")

    warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    reps = args.reps if args.reps is not None else (3 if tiny else 30)
    return ModelBenchConfig(
        cases=tuple(cases), impls=impls, device=str(dev), tiny=tiny, warmup=warmup, reps=reps,
        gen_warmup=1 if warmup else 0, gen_reps=max(1, reps // 5),
        host_calls=args.host_calls or (200 if tiny else 2000), compile_backend=backend,
        time_budget_s=args.time_budget, use_cache=args.use_cache, seed=args.seed,
    )


def _plan(cfg, detailed: bool = False) -> list[str]:
    est = estimate_s(list(cfg.cases), cfg.impls)
    left_out = [c for c in CASES if c not in cfg.cases]
    lines = [f"cases: {', '.join(cfg.cases)}; implementations: {', '.join(cfg.impls)}"
             + ("; tiny CPU shapes" if cfg.tiny else "") + f"; forward cases call model(ids, use_cache={cfg.use_cache})"]
    if detailed:
        for name in cfg.cases:
            spec = CASES[name]
            shapes = ", ".join(s.label for s in spec.settings(cfg.tiny))
            cost = "" if cfg.tiny else f"~{spec.est_s * len(cfg.impls):.0f} s on an H200"
            lines.append(f"  {name:<18} {shapes:<22} {cost}".rstrip())
    if not cfg.tiny:
        lines.append(f"estimate: ~{est / 60:.1f} min on an H200 (a rough guess, compiles dominate; the JSON "
                     "records the real time of every measurement)"
                     + (f"; --time-budget {cfg.time_budget_s:.0f} s" if cfg.time_budget_s else ""))
    if left_out:
        lines.append(f"not selected: {', '.join(left_out)} (--cases all runs everything)")
    return lines


def _progress_line(n: int, total: int, row: dict) -> str:
    head = f"[{n:>{len(str(total))}}/{total}] {row['case']:<18} {row['setting']:<10} {row['mode']:<16} {row['impl']:<5}"
    if row["status"] == "skipped":
        return f"{head} skipped: {row['reason']}"
    if row["status"] != "ok":
        return f"{head} ERROR ({row['elapsed_s']:.1f} s): {row['reason']}"
    from .report import metric

    unit, value = metric(row)
    text = f"{head} {value:10.3f} {unit}" if unit != "tok/s" else f"{head} {value:10.1f} {unit}"
    if row.get("ratio_vs_sdpa") is not None:
        text += f"  {row['ratio_vs_sdpa']:.2f}x SDPA"
    extras = []
    if row.get("compile_s") is not None:
        extras.append(f"compile {row['compile_s']:.1f} s, fullgraph={row['fullgraph']}, "
                      f"graph breaks {row['graph_breaks']}")
    if row.get("tokens_equal") is not None:
        extras.append(f"tokens equal to SDPA: {row['tokens_equal']}")
    extras.append(f"{row['elapsed_s']:.1f} s")
    return f"{text}  ({'; '.join(extras)})"


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg = config_from_args(args, parser)
    for line in _plan(cfg, detailed=args.dry_run):
        print(line, file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    # The tuned launch configs take minutes of compiling per shape; the documented numbers
    # use each kernel's first config. A caller who wants tuning sets the variable.
    os.environ.setdefault("MODELOPT_SPARSE_AUTOTUNE", "0")

    from ..env import collect_env
    from ..errors import short
    from .cases import CASES as SPECS
    from .report import annotate, markdown_report, public, results_table, save_plot, summary, summary_table
    from .runner import _jobs, run_model_bench, skip_reason

    env = collect_env(cfg.device)
    on_gpu = env["gpu"] is not None
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path, md_path = out / "model_results.json", out / "model_speed.png", out / "model_table.md"
    settings = dict(asdict(cfg), autotune=os.environ.get("MODELOPT_SPARSE_AUTOTUNE"),
                    estimate_s=None if cfg.tiny else round(estimate_s(list(cfg.cases), cfg.impls)))
    rows: list[dict] = []
    started = time.perf_counter()
    total = sum(len(_jobs(SPECS[c], cfg)) for c in cfg.cases)

    def document(complete: bool) -> dict:
        annotate(rows)
        case_records = {}
        for name in cfg.cases:
            mine = [r for r in rows if r["case"] == name]
            statuses = {r["status"] for r in mine}
            status = (statuses.pop() if len(statuses) == 1 else "partial") if mine else "pending"
            reasons = [r["reason"] for r in mine if r["reason"]]
            case_records[name] = {"status": status, "rows": len(mine),
                                  "elapsed_s": round(sum(r["elapsed_s"] or 0 for r in mine), 3),
                                  "reason": reasons[0] if reasons else skip_reason(SPECS[name], cfg)}
        return {"complete": complete, "env": env, "settings": settings,
                "elapsed_s": round(time.perf_counter() - started, 1),
                # A run killed mid-measurement (a per-call time limit) says where it was.
                "running": dict(running) or None, "cases": case_records,
                "rows": [public(r) for r in rows],
                "summary": summary(rows, list(cfg.cases), cfg.tiny, on_gpu)}

    def dump(complete: bool) -> dict:
        doc = document(complete)
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(json_path)  # a reader never sees half a file
        return doc

    def on_case(spec):
        print(f"-- {spec.name}: {spec.help}", file=sys.stderr, flush=True)

    running: dict = {}

    def on_start(row):
        running.clear()
        running.update({k: row[k] for k in ("case", "setting", "mode", "impl")},
                       started_at_s=round(time.perf_counter() - started, 1))
        dump(False)

    def on_row(row):
        running.clear()
        rows.append(row)
        annotate(rows)
        print(_progress_line(len(rows), total, row), file=sys.stderr, flush=True)
        dump(False)  # a crash or a killed run still leaves what was measured

    print(f"model benchmark on {env['gpu'] or 'CPU'}: torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}, commit {(env['git_commit'] or 'unknown')[:12]}",
          file=sys.stderr, flush=True)
    run_model_bench(cfg, on_row=on_row, on_case=on_case, on_start=on_start)
    doc = dump(True)
    notes = [f"wrote {json_path}"]
    # The measurements are saved by now: a failure in the extras below must not cost the
    # tables printed after them.
    try:
        md_path.write_text(markdown_report(doc))
        notes.append(f"wrote {md_path}")
    except Exception as exc:
        notes.append(f"the markdown table failed: {short(exc)}")
    try:
        title = (f"{env['gpu'] or 'CPU (tiny shapes, smoke test)'}: torch {env['torch']}, "
                 f"transformers {env['transformers']}, commit {(env['git_commit'] or 'unknown')[:12]}")
        notes.append(save_plot(rows, cfg.impls, png_path, title) or f"wrote {png_path}")
    except Exception as exc:
        notes.append(f"the plot failed: {short(exc)}")
    notes.append(f"took {doc['elapsed_s']:.0f} s")
    if cfg.tiny:
        notes.append("NOTE: CPU smoke run on tiny shapes: the numbers prove the harness works end to end; "
                     "they say nothing about GPU speed, and the targets get no verdict here.")
    print("\n".join(notes))
    print()
    print(results_table(rows, cfg.impls))
    print()
    print("Summary (ours/SDPA; time ratios: lower is faster, tok/s ratios: higher is faster)")
    print(summary_table(doc["summary"]))
    return 0
