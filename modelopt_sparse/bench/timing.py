"""Timers shared by the benchmarks, and what to do with the GPU between measurements.

On CUDA a measurement is a median of many calls after a warm-up: ``triton.testing.do_bench``
for the kernel benchmark (it flushes L2 between calls), CUDA events around each call for
whole models (:func:`median_ms`). On the CPU it is a ``time.perf_counter`` median.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from .errors import short

# A row whose host side takes this share of its measured time or more is host-bound: the
# GPU waits for launches, and the kernel itself is faster than the number shows.
HOST_BOUND_SHARE = 0.9


def time_ms(prep, cfg, device) -> float:
    """Median ms of one call of ``prep.fn`` (a :class:`~.prepare.Prepared`), kernel-benchmark settings."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                prep.fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms,
                grad_to_none=prep.grads or None, return_mode="median",
            )
        )
    times = []
    for i in range(cfg.cpu_warmup + cfg.cpu_reps):
        for t in prep.grads:
            t.grad = None
        t0 = time.perf_counter()
        prep.fn()
        if i >= cfg.cpu_warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def host_enqueue_ms(prep, reps: int = 20) -> float:
    """Host time to issue one call on CUDA, without waiting for the GPU (the queue holds far
    more than ``reps`` calls' launches, so nothing blocks)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        for t in prep.grads:
            t.grad = None
        prep.fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / reps * 1e3


def host_bound(row: dict) -> bool:
    return row.get("host_ms") is not None and row["ms"] and row["host_ms"] >= HOST_BOUND_SHARE * row["ms"]


def interleaved_median_ms(fns: dict, device, warmup: int, reps: int) -> dict:
    """Median ms per call of each of ``fns`` (name -> callable), timed in rounds that call
    each once in turn, as :func:`median_ms` times one.

    Host-bound calls drift with the host (frequency, other processes): timed one after
    another, two implementations of the same speed read 20-40 % apart between runs. In
    rounds, every implementation sees the same host.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(device)
        return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def median_ms(fn: Callable[[], object], device, warmup: int, reps: int) -> float:
    """Median ms per call of ``fn`` after ``warmup`` calls.

    On CUDA each call sits between two CUDA events and the calls go back to back, as in
    ``do_bench``: a host-bound call then measures its host time, which is what a user of
    that call waits for. There is no L2 flush: a model's weights do not fit L2 anyway.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def wall_ms(fn: Callable[[], object], device, reps: int) -> list[float]:
    """Wall-clock ms of each of ``reps`` calls, synchronised before and after each (for calls
    that synchronise inside anyway, like ``generate``)."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release(device) -> str | None:
    """Free what the last measurement held; return why the CUDA context is unusable, if it is."""
    gc.collect()
    if torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as exc:  # an illegal address or the like poisons the whole context
        return short(exc)
    return None
