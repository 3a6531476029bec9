"""The model benchmark's loop: every case, implementation and setting becomes one row.

One process measures everything, SDPA beside ours on the same weights. A row that fails
records its error and the run goes on; a row that cannot run here (CUDA graphs on a CPU),
or that would overrun ``time_budget_s``, records why it was skipped. Rows are handed to
``on_row`` as they finish, so a caller can save partial results.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import detail, short, warning_texts
from ..timing import release
from . import measure
from .cases import CASES, IMPLS, MODELS, CaseSpec, Setting


@dataclass
class ModelBenchConfig:
    cases: tuple[str, ...]
    impls: tuple[str, ...] = IMPLS
    device: str = "cuda"  # resolved: "cuda", "cuda:N" or "cpu"
    tiny: bool = False
    warmup: int = 5
    reps: int = 30
    gen_warmup: int = 1
    gen_reps: int = 6
    host_calls: int = 2000
    compile_backend: str | None = "inductor"  # None: compiled cases are skipped
    time_budget_s: float | None = None
    use_cache: bool = False  # forward cases: model(ids, use_cache=...) (see command.py, --use-cache)
    seed: int = 0
    dtype: str = "bf16"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def new_row(spec: CaseSpec, impl: str, setting: Setting, mode: str) -> dict:
    return {
        "case": spec.name, "model": spec.model, "kind": spec.kind, "mode": mode,
        "setting": setting.label, "batch": setting.batch, "length": setting.length,
        "new_tokens": setting.new_tokens or None, "impl": impl,
        "status": "skipped", "ms": None, "tokens_per_s": None, "us_per_call": None,
        "compile_s": None, "fullgraph": None, "fullgraph_error": None, "graph_breaks": None, "graphs": None,
        "note": None, "reason": None, "detail": None, "warnings": [], "elapsed_s": None,
    }


def _jobs(spec: CaseSpec, cfg: ModelBenchConfig) -> list[tuple[str, Setting, str]]:
    """(impl, setting, mode) in run order: per implementation, all its settings, so that one
    converted copy of the model serves them all."""
    settings = spec.settings(cfg.tiny)
    if spec.kind == "host":
        return [(impl, s, mode) for mode in ("no_grad", "autograd") for impl in cfg.impls for s in settings]
    return [(impl, s, spec.mode) for impl in cfg.impls for s in settings]


def skip_reason(spec: CaseSpec, cfg: ModelBenchConfig) -> str | None:
    on_cuda = torch.device(cfg.device).type == "cuda"
    if spec.needs_cuda and not on_cuda:
        return "CUDA graphs need a CUDA device"
    if spec.compiles and cfg.compile_backend is None:
        return ("torch.compile runs on CUDA only by default (minutes on a CPU); "
                "--compile-backend eager runs Dynamo's capture alone")
    return None


class _Models:
    """Base models by name, built on first use and dropped after the last case using them."""

    def __init__(self, cfg: ModelBenchConfig, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.left = Counter(CASES[c].model for c in cfg.cases if CASES[c].model)
        self.built: dict[str, object] = {}

    def get(self, name: str):
        if name not in self.built:
            self.built[name] = measure.build_model(name, self.cfg.tiny, self.device, self.dtype, self.cfg.seed)
        return self.built[name]

    def done_with(self, name: str | None) -> None:
        if name is None:
            return
        self.left[name] -= 1
        if self.left[name] <= 0:
            self.built.pop(name, None)


def _forward_call_kw(spec: CaseSpec, cfg: ModelBenchConfig) -> dict:
    call_kw = {"use_cache": cfg.use_cache}
    if spec.prefill:
        call_kw["logits_to_keep"] = 1
    return call_kw


def _run_one(spec: CaseSpec, impl_model, impl: str, setting: Setting, mode: str, cfg: ModelBenchConfig,
             device) -> dict:
    """The measured fields of one forward row (raises on failure)."""
    vocab = MODELS[spec.model]["tiny" if cfg.tiny else "full"]["vocab_size"]
    ids = measure.token_ids(setting, vocab, device, cfg.seed)
    call_kw = _forward_call_kw(spec, cfg)
    if mode == "eager":  # one implementation alone; the other modes are timed side by side
        with torch.no_grad():
            return measure.forward_eager(impl_model, ids, call_kw, device, cfg.warmup, cfg.reps)
    raise ValueError(f"{spec.name}: mode {mode!r} is not timed one implementation at a time")


def run_model_bench(cfg: ModelBenchConfig, *, on_row: Callable[[dict], None] | None = None,
                    on_case: Callable[[CaseSpec], None] | None = None,
                    on_start: Callable[[dict], None] | None = None) -> list[dict]:
    """Every row of ``cfg.cases`` in order. ``on_case`` is called before a case, ``on_start``
    with a row about to be measured (a run killed mid-measurement can then say which one it
    was in), ``on_row`` with each finished row."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    started = time.perf_counter()
    models = _Models(cfg, device, dtype)
    rows: list[dict] = []
    lost: str | None = None  # why the CUDA context became unusable

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for name in cfg.cases:
        spec = CASES[name]
        if on_case is not None:
            on_case(spec)
        skip = skip_reason(spec, cfg)
        if spec.kind == "host" and skip is None and lost is None:
            for row in _interleaved_host(spec, cfg, device, on_start):
                emit(row)
            lost = release(device)
            continue
        if _side_by_side(spec, cfg) and skip is None and lost is None:
            for row in _interleaved_case(spec, cfg, device, models, started, on_start):
                emit(row)
            models.done_with(spec.model)
            lost = release(device)
            continue
        jobs = _jobs(spec, cfg)
        per_job_s = spec.est_s * len(cfg.impls) / max(1, len(jobs))
        current = (None, None)  # (impl, its converted model)
        for impl, setting, mode in jobs:
            row = new_row(spec, impl, setting, mode)
            elapsed = time.perf_counter() - started
            if lost is not None:
                row["reason"] = f"not run: the CUDA context was lost earlier ({lost})"
            elif skip is not None:
                row["reason"] = skip
            elif cfg.time_budget_s is not None and not cfg.tiny and elapsed + per_job_s > cfg.time_budget_s:
                row["reason"] = (f"not run: --time-budget {cfg.time_budget_s:.0f} s (elapsed {elapsed:.0f} s, "
                                 f"this one takes ~{per_job_s:.0f} s)")
            else:
                if on_start is not None:
                    on_start(row)
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        model = None
                        if spec.model is not None:
                            if current[0] != impl:
                                current = (None, None)
                                release(device)
                                current = (impl, measure.implementation(models.get(spec.model), impl))
                            model = current[1]
                        row.update(_run_one(spec, model, impl, setting, mode, cfg, device))
                        row["status"] = "ok"
                    except Exception as exc:
                        row.update(status="error", reason=short(exc), detail=detail(exc))
                    row["warnings"] = warning_texts(caught)
                row["elapsed_s"] = round(time.perf_counter() - t0, 3)
                if row["status"] != "ok":
                    current = (None, None)  # a failure may leave the copy half-converted or mid-capture
                lost = release(device)
            emit(row)
        current = (None, None)
        models.done_with(spec.model)
        lost = lost or release(device)
    return rows


def _side_by_side(spec: CaseSpec, cfg: ModelBenchConfig) -> bool:
    """Whether a case converts its implementations side by side and times them in rounds:
    eager forwards (of more than one implementation), and every compiled, CUDA-graph and
    generate case, whose rounds serve one implementation alone as well."""
    if spec.kind == "generate":
        return True
    if spec.kind != "forward":
        return False
    return spec.mode in ("compiled", "cudagraphs") or (spec.mode == "eager" and len(cfg.impls) > 1)


def _measure_side_by_side(spec: CaseSpec, converted: dict, setting: Setting, cfg: ModelBenchConfig,
                          device) -> dict:
    """impl -> fields of its row, all of ``converted`` (impl -> model) timed in rounds."""
    vocab = MODELS[spec.model]["tiny" if cfg.tiny else "full"]["vocab_size"]
    ids = measure.token_ids(setting, vocab, device, cfg.seed)
    if spec.kind == "generate" and spec.mode == "static-compiled":
        return measure.generate_static_interleaved(converted, ids, setting, device, cfg.gen_warmup, cfg.gen_reps,
                                                   cfg.compile_backend)
    if spec.kind == "generate":
        return measure.generate_eager_interleaved(converted, ids, setting, device, cfg.gen_warmup, cfg.gen_reps)
    call_kw = _forward_call_kw(spec, cfg)
    with torch.no_grad():
        if spec.mode == "eager":
            return measure.forward_eager_interleaved(converted, ids, call_kw, device, cfg.warmup, cfg.reps)
        if spec.mode == "compiled":
            return measure.forward_compiled_interleaved(converted, ids, call_kw, device, cfg.warmup, cfg.reps,
                                                        cfg.compile_backend)
        if spec.mode == "cudagraphs":
            return measure.forward_cudagraphs_interleaved(converted, ids, call_kw, device, cfg.warmup, cfg.reps)
    raise ValueError(f"{spec.name}: mode {spec.mode!r} is not timed side by side")


def _interleaved_case(spec: CaseSpec, cfg: ModelBenchConfig, device, models: _Models, started: float,
                      on_start) -> list[dict]:
    """The rows of a case timed side by side (:func:`_side_by_side`): per setting, every
    implementation converted and timed in interleaved rounds (host-bound calls drift with
    the host; static-cache compiled generate, timed one implementation after another,
    read 0.72 and 0.97 of SDPA for two identical decode graphs). A compiled or CUDA-graph
    setting compiles or captures every implementation before its rounds; one that fails
    there gets its error row and the others go on. ``--time-budget`` skips whole settings
    (the estimate of all implementations of one), each row with the reason."""
    rows = []
    settings = spec.settings(cfg.tiny)
    per_setting_s = spec.est_s * len(cfg.impls) / max(1, len(settings))
    for setting in settings:
        group = {impl: new_row(spec, impl, setting, spec.mode) for impl in cfg.impls}
        elapsed = time.perf_counter() - started
        if cfg.time_budget_s is not None and not cfg.tiny and elapsed + per_setting_s > cfg.time_budget_s:
            for row in group.values():
                row["reason"] = (f"not run: --time-budget {cfg.time_budget_s:.0f} s (elapsed {elapsed:.0f} s, "
                                 f"this one takes ~{per_setting_s:.0f} s)")
            rows.extend(group.values())
            continue
        t0 = time.perf_counter()
        converted = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for impl, row in group.items():
                if on_start is not None:
                    on_start(row)
                try:
                    converted[impl] = measure.implementation(models.get(spec.model), impl)
                except Exception as exc:
                    row.update(status="error", reason=short(exc), detail=detail(exc))
            if converted:
                try:
                    measured = _measure_side_by_side(spec, converted, setting, cfg, device)
                    for impl, fields in measured.items():
                        # A row of its own failure (a static compile) brings its status along.
                        group[impl].update({"status": "ok", **fields})
                except Exception as exc:
                    for impl in converted:
                        group[impl].update(status="error", reason=short(exc), detail=detail(exc))
        texts = warning_texts(caught)
        for row in group.values():
            row["warnings"] = texts
            row["elapsed_s"] = round((time.perf_counter() - t0) / len(group), 3)
        converted.clear()
        release(device)
        rows.extend(group.values())
    return rows


def _interleaved_host(spec: CaseSpec, cfg: ModelBenchConfig, device, on_start) -> list[dict]:
    """The rows of the host case: per mode, every implementation timed in turns."""
    rows = []
    for mode in ("no_grad", "autograd"):
        for setting in spec.settings(cfg.tiny):
            group = {impl: new_row(spec, impl, setting, mode) for impl in cfg.impls}
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    for row in group.values():
                        if on_start is not None:
                            on_start(row)
                    measured = measure.host_calls_interleaved(cfg.impls, mode == "autograd", device, cfg.host_calls,
                                                              warmup=max(10, cfg.host_calls // 20))
                    for impl, fields in measured.items():
                        group[impl].update(fields)
                        group[impl]["status"] = "ok"
                except Exception as exc:
                    for row in group.values():
                        row.update(status="error", reason=short(exc), detail=detail(exc))
            texts = warning_texts(caught)
            for row in group.values():
                row["warnings"] = texts
                row["elapsed_s"] = round((time.perf_counter() - t0) / len(group), 3)
            rows.extend(group.values())
    return rows
