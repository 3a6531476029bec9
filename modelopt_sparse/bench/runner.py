"""The kernel benchmark's loop: one row per (case, implementation), failures included."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace
from typing import Callable

import torch

from .cases import DTYPES, OUR_VARIANTS, BenchConfig, Case, cases, implementations, resolve_config
from .errors import detail, short, warning_texts
from .prepare import prepare
from .timing import host_enqueue_ms, release, time_ms


def new_row(case: Case, impl: str, cfg: BenchConfig) -> dict:
    return {
        "mode": case.mode,
        "causal": case.causal,
        "seq_len": case.seq_len,
        "head_dim": case.head_dim,
        "heads": case.heads,
        "kv_heads": case.kv_heads,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "impl": impl,
        "kind": "ours" if impl in OUR_VARIANTS else "peer",
        "backend": cfg.backend if impl in OUR_VARIANTS else None,
        "flops": case.flops,
        "status": "n/a",
        "ms": None,
        "host_ms": None,  # CUDA: host time to enqueue one call (see timing.HOST_BOUND_SHARE)
        "tflops": None,
        "reason": None,
        "detail": None,
        "note": None,
        "warnings": [],
    }


def measure(case: Case, impl: str, cfg: BenchConfig, device, dtype) -> tuple[dict, str | None]:
    """One row, and why the CUDA context is lost afterwards (None while it is usable)."""
    row = new_row(case, impl, cfg)
    prep = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(cfg.seed)
            prep = prepare(impl, case, cfg, device, dtype)
            grad_mode = torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()
            with prep.context(), grad_mode:
                ms = time_ms(prep, cfg, device)
                # A few reps suffice for long calls, which no host path comes near.
                host_ms = host_enqueue_ms(prep, 20 if ms < 5 else 3) if device.type == "cuda" else None
            if not (math.isfinite(ms) and ms > 0):
                raise RuntimeError(f"the timer returned {ms} ms")
            row.update(status="ok", ms=ms, host_ms=host_ms, tflops=case.flops / (ms * 1e-3) / 1e12,
                       note=prep.note)
        except Exception as exc:
            row["reason"] = short(exc)
            row["detail"] = detail(exc)
        # SDPA explains why a backend refused only in warnings, so keep them with the row.
        row["warnings"] = warning_texts(caught)
    del prep
    return row, release(device)


def run_benchmarks(config: BenchConfig | None = None, *, on_row: Callable[[dict], None] | None = None,
                   **overrides) -> list[dict]:
    """Time every (configuration, implementation) pair; return one dict per pair.

    ``overrides`` are :class:`BenchConfig` fields, e.g.
    ``run_benchmarks(quick=True, device="cpu", modes=("fwd",))``. Each row holds the
    configuration, ``impl``, ``status`` ("ok" or "n/a"), ``ms`` and ``tflops`` (None when
    n/a) and ``reason``. ``on_row`` is called after each measurement (progress, partial saves).
    """
    cfg = resolve_config(replace(config or BenchConfig(), **overrides))
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    rows: list[dict] = []
    lost: str | None = None
    for case in cases(cfg):
        for impl in implementations(cfg):
            if lost is None:
                row, lost = measure(case, impl, cfg, device, dtype)
            else:
                row = new_row(case, impl, cfg)
                row["reason"] = f"not run: the CUDA context was lost earlier ({lost})"
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
