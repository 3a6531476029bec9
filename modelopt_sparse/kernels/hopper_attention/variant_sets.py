"""The sets of Hopper kernels that are precompiled, timed and tested.

The schedule tuples (pingpong, overlap, late_rescale, tma, lean) the timing table compares
(``BENCH_SCHEDULES*``), the schedules whose GPU test set the device run carries
(:data:`TEST_SCHEDULES`), the variants the GPU tests run (``NEW_VARIANT_*``,
:data:`TMA3D_TEST_SCHEDULES`, ``_test_set``), and :func:`standard_variants` /
:func:`bench_variants`: what ``python -m modelopt_sparse.kernels.hopper_attention precompile``
compiles and tools/device_hopper.sh carries. Nothing here is on the path of an
``attention()`` call.
"""

from __future__ import annotations

import dataclasses

from .variants import (HEAD_DIMS, SCHEDULE_FIELDS, Variant, measured_consumers, measured_half_select, measured_kv_pretest,
                       measured_mid_wait,
                       measured_mma_rowsum, measured_pairwise, measured_schedule, measured_split_loop, measured_tma3d,
                       schedule_from_env)


def _as_measured(v: Variant) -> Variant:
    """``v`` with every switch as variant_for picks it when none is set (the measured schedule,
    consumers, grouped maps, split loop, MID_WAIT and the row sums' form of its head dim and pattern)."""
    d, n, m = v.head_dim, v.sparsity_n, v.sparsity_m
    consumers = measured_consumers(d, n, m)
    return dataclasses.replace(v, **measured_schedule(d, n, m), consumers=consumers, tma3d=measured_tma3d(n, m),
                               split_loop=measured_split_loop(consumers, d, n, m),
                               mid_wait=measured_mid_wait(d, n, m),
                               mma_rowsum=measured_mma_rowsum(d, n, m), pairwise=measured_pairwise(n, m),
                               half_select=measured_half_select(d, n, m, v.tie_index),
                               kv_pretest=measured_kv_pretest(d, n, m)).canonical()


def _test_set(probe: bool) -> list[Variant]:
    """Every kernel the GPU tests run (the measured schedule, as variant_for picks with no
    switch set), the probe builds optional."""
    return [_as_measured(v) for v in _test_set_base(probe)]


def _test_set_base(probe: bool) -> list[Variant]:
    out = []
    for d in HEAD_DIMS:
        for fp16 in (False, True):
            out.append(Variant(head_dim=d, fp16=fp16))
        for n, m in ((1, 2), (2, 4), (3, 4), (4, 8), (8, 16), (3, 16)):
            for tie in (False, True):
                out.append(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, tie_index=tie))
        out.append(Variant(head_dim=d, sparsity_n=2, sparsity_m=4, fp16=True))
        out.append(Variant(head_dim=d, sparsity_n=8, sparsity_m=16, fp16=True))
    if probe:
        for n, m in ((0, 4), (1, 2), (2, 4), (4, 8), (8, 16), (3, 16), (5, 16)):
            for tie in ((False, True) if n else (False,)):
                out.append(Variant(head_dim=128, sparsity_n=n, sparsity_m=m, tie_index=tie, probe=True))
    return out


# The schedules the timing table compares (pingpong, overlap, late_rescale, tma, lean); the
# first is the verified default. Rows past the first four are compile-checked only until a GPU run.
F, T = False, True
BENCH_SCHEDULES = [
    (F, T, F, F, F), (T, T, F, F, F), (T, F, F, F, F), (F, F, F, F, F),
    (F, T, T, F, F), (T, T, T, F, F), (T, F, T, F, F),
    (T, F, F, T, F), (T, F, T, T, F), (T, T, T, T, F), (F, T, T, T, F),
    (T, F, F, F, T), (T, F, T, F, T), (T, F, T, T, T), (T, T, T, T, T),
]
# The schedules timed for N:M, non-causal and D = 64 (fewer rows: the dense D = 128 causal rows
# decide the schedule).
BENCH_SCHEDULES_SHORT = [(F, T, F, F, F), (T, F, F, F, F), (T, F, F, F, T), (T, F, T, T, T), (T, T, T, T, T)]
BENCH_NM = ((2, 4), (4, 8), (8, 16))


def _sched(t) -> dict:
    return dict(zip(SCHEDULE_FIELDS, t))


# The schedules whose whole GPU test set is precompiled and carried (tools/device_hopper.sh runs
# the test file once, with the fastest of these in the environment): ping-pong without overlap
# (the fastest measured so far) and the new schedule most likely to beat it (TMA producer, late
# rescale, lean softmax). Two, because the probe builds take minutes to compile on 2 cores.
TEST_SCHEDULES = [(T, F, F, F, F), (T, F, T, T, T)]
# Three consumer warpgroups at D = 64 (192 query rows per CTA), timed with these schedules.
# TMA (the shape requires it), no overlap. The measured schedule since session 14 overlaps with
# late rescale (P(j-1) stays alive: ptxas spills 144 B at 160 registers, and it is still faster);
# SPLIT_LOOP_BENCH times it, the measured-schedule GPU tests run it.
BENCH_SCHEDULES_WG3 = [(T, F, F, T, F), (T, F, F, T, T), (T, F, T, T, T)]
# The GPU tests of three warpgroups (test_gpu_19, NEW_VARIANT_TESTS) also run the measured
# schedule's overlapped form, with every pattern.
TEST_SCHEDULES_WG3 = BENCH_SCHEDULES_WG3 + [(T, T, T, T, T)]


# Stage 3 (2:4 P.V through wgmma.sp), timed and tested with these schedules: the cp.async
# producer (V in its second row order), the TMA producer (V through its 5-D map; session 11:
# 472 TFLOPS without overlap, against 554 for the masked 2:4 with overlap), and the TMA producer
# with overlap (the compressed P staged in registers while P.V(j-1) runs; session 12).
BENCH_SCHEDULES_SPARSE_PV = [(T, F, F, F, T), (T, F, T, T, T), (T, F, F, T, T), (T, T, T, T, T), (T, T, F, T, T)]
# 8:16 through the grouped 4-D TMA maps (tma3d), against the 8:16 rows of the same schedules
# (where TMA falls back to cp.async): 8:16's measured schedule and the same without late rescale.
BENCH_SCHEDULES_TMA3D = [(T, F, T, T, T), (T, F, F, T, T)]


def bench_variants() -> list[Variant]:
    """The kernels the timing table runs (bench)."""
    out = [Variant(**_sched(t)) for t in BENCH_SCHEDULES]
    out += [Variant(sparsity_n=2, sparsity_m=4, tie_index=tie, sparse_pv=True, **_sched(t))
            for t in BENCH_SCHEDULES_SPARSE_PV for tie in (False, True)]
    out.append(Variant(sparsity_n=2, sparsity_m=4, tie_index=True))
    out += [Variant(head_dim=64, consumers=3, **_sched(t)) for t in BENCH_SCHEDULES_WG3]
    for t in BENCH_SCHEDULES_SHORT:
        out.append(Variant(head_dim=64, **_sched(t)))
        for n, m in BENCH_NM:
            out.append(Variant(sparsity_n=n, sparsity_m=m, **_sched(t)))
    out.append(Variant(sparsity_n=8, sparsity_m=16, tie_index=True))
    out += [Variant(sparsity_n=8, sparsity_m=16, tma3d=True, **_sched(t)) for t in BENCH_SCHEDULES_TMA3D]
    out += [dataclasses.replace(v, split_loop=split) for v in SPLIT_LOOP_BENCH for split in (False, True)]
    return out


# The split tile loop (split_loop: an edge-tile loop and an interior-tile loop), timed beside
# the same kernels with one loop: every pattern under its measured schedule (dense D = 64 with
# three consumer warpgroups overlaps since session 14; with one loop it spills 144 B inside the
# loop, split 5 spill instructions remain in the interior loop), and the alternatives below.
SPLIT_LOOP_BENCH = [
    Variant(**measured_schedule(128, 0, 4)),
    Variant(sparsity_n=2, sparsity_m=4, **measured_schedule(128, 2, 4)),
    Variant(sparsity_n=4, sparsity_m=8, **measured_schedule(128, 4, 8)),
    Variant(sparsity_n=8, sparsity_m=16, tma3d=True, **measured_schedule(128, 8, 16)),
    Variant(head_dim=64, consumers=3, **measured_schedule(64, 0, 4)),
    # The schedules before session 14 (D = 64 three warpgroups and 8:16 without overlap), and
    # 4:8 with overlap (slower than without in one loop, sessions 10 and 14).
    Variant(head_dim=64, consumers=3, pingpong=True, overlap=False, late_rescale=False, tma=True, lean=True),
    Variant(sparsity_n=4, sparsity_m=8, pingpong=True, overlap=True, late_rescale=True, tma=True, lean=True),
    Variant(sparsity_n=8, sparsity_m=16, tma3d=True, pingpong=True, overlap=False, late_rescale=True, tma=True,
            lean=True),
]


def standard_variants(probe: bool = True, schedule: dict | str | None = None) -> list[Variant]:
    """The variants the GPU tests and the timing table use (tools/device_hopper.sh carries
    them precompiled). With ``schedule``: the test set under that schedule only (what a test
    run with those switches in the environment loads); ``"env"``: each kernel's schedule as
    the environment gives it (:func:`schedule_from_env`)."""
    if schedule is not None:
        def sched(v):  # "env": each kernel's schedule as variant_for reads it from the environment
            return schedule_from_env(v.head_dim, v.sparsity_n, v.sparsity_m) if schedule == "env" else schedule

        out = [dataclasses.replace(v, **sched(v)) for v in _test_set_base(probe)]
        # test_gpu_11 sets ping-pong and overlap itself; the other switches come from the schedule.
        out += [dataclasses.replace(v, **dict(sched(v), pingpong=pp, overlap=ov))
                for v in (Variant(sparsity_n=0, sparsity_m=4), Variant(sparsity_n=4, sparsity_m=8))
                for pp, ov in ((True, True), (True, False), (False, False))]
    else:
        out = _test_set(False)
        # The alternative schedules the schedule tests run side by side.
        for d in HEAD_DIMS:
            for n, m in ((0, 4), (4, 8), (8, 16)):
                for pingpong, overlap in ((True, True), (True, False), (False, False)):
                    out.append(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, pingpong=pingpong, overlap=overlap))
        out += NEW_VARIANT_TESTS + MID_WAIT_TESTS + PRODUCER_SUSPENDS_TESTS + MMA_ROWSUM_TESTS + BN64_TESTS + \
            PAIRWISE_TESTS + HALF_SELECT_TESTS + ROW_PIPE_TESTS + KV_PRETEST_TESTS + LEARNED_SINKS_TESTS + \
            bench_variants()
        if probe:
            out += [v for v in _test_set(True) if v.probe]
            # The TMA producer's element-strided boxes (the group permutation), bit for bit.
            out += [Variant(sparsity_n=n, sparsity_m=m, tie_index=tie, probe=True, tma=True)
                    for n, m, tie in ((0, 4, False), (1, 2, False), (2, 4, True), (4, 8, False))]
            # The grouped 4-D maps (M = 16), bit for bit (test_gpu_22).
            out += [Variant(sparsity_n=n, sparsity_m=16, tie_index=tie, probe=True, tma=True, tma3d=True)
                    for n, tie in ((8, False), (3, True))]
    # A test that sets only the schedule switches runs MID_WAIT's, the split loop's, the row
    # sums', the selection network's and the early K/V test's measured defaults: each kernel is
    # carried in that form too.
    out += [dataclasses.replace(v, mid_wait=measured_mid_wait(v.head_dim, v.sparsity_n, v.sparsity_m),
                                split_loop=v.split_loop or measured_split_loop(v.consumers, v.head_dim, v.sparsity_n,
                                                                               v.sparsity_m),
                                mma_rowsum=v.mma_rowsum or measured_mma_rowsum(v.head_dim, v.sparsity_n, v.sparsity_m),
                                pairwise=v.pairwise or measured_pairwise(v.sparsity_n, v.sparsity_m),
                                half_select=v.half_select or measured_half_select(v.head_dim, v.sparsity_n, v.sparsity_m,
                                                                                  v.tie_index),
                                kv_pretest=v.kv_pretest or measured_kv_pretest(v.head_dim, v.sparsity_n, v.sparsity_m))
            for v in out]
    seen, unique = set(), []
    for v in out:
        if v.canonical() not in seen:
            seen.add(v.canonical())
            unique.append(v.canonical())
    return unique


# What test_gpu_22 runs with MODELOPT_SPARSE_HOPPER_TMA3D=1 (M = 16 through the grouped 4-D maps):
# the 8:16 measured schedule before session 14 (no overlap; the overlapped one since then is what
# the measured-schedule tests run), and TMA with overlap and ping-pong off.
TMA3D_TEST_SCHEDULES = [(T, F, T, T, T), (F, T, F, T, F)]

# What tests/test_kernel_hopper.py's new-variant tests run (test_gpu_14/15).
NEW_VARIANT_SCHEDULES = [(F, T, T, F, F), (T, F, T, F, F), (T, F, F, T, F), (T, T, T, T, F), (T, F, F, F, T),
                         (T, T, T, T, T)]
NEW_VARIANT_PATTERNS = ((0, 4), (2, 4), (4, 8), (8, 16))
NEW_VARIANT_TESTS = [Variant(head_dim=128, sparsity_n=n, sparsity_m=m, **_sched(t))
                     for t in NEW_VARIANT_SCHEDULES for n, m in NEW_VARIANT_PATTERNS] + \
                    [Variant(head_dim=64, fp16=h, **_sched(t)) for t in NEW_VARIANT_SCHEDULES
                     for h in (False, True)] + \
                    [Variant(head_dim=64, fp16=h, consumers=3, **_sched(t)) for t in TEST_SCHEDULES_WG3
                     for h in (False, True)] + \
                    [Variant(head_dim=64, sparsity_n=n, sparsity_m=m, fp16=True, consumers=3, **_sched(t))
                     for t in TEST_SCHEDULES_WG3 for n, m in ((0, 4), (2, 4), (4, 8), (8, 16))] + \
                    [Variant(sparsity_n=n, sparsity_m=4 if n == 0 else 8, lean=True) for n in (0, 4)] + \
                    [Variant(head_dim=d, sparsity_n=2, sparsity_m=4, tie_index=tie, fp16=h, sparse_pv=True, **_sched(t))
                     for t in BENCH_SCHEDULES_SPARSE_PV for d in HEAD_DIMS for tie in (False, True)
                     for h in (False, True)] + \
                    [Variant(head_dim=d, sparsity_n=n, sparsity_m=16, tie_index=tie, fp16=h, tma3d=True, **_sched(t))
                     for t in TMA3D_TEST_SCHEDULES for d in HEAD_DIMS for n, tie in ((8, False), (3, True))
                     for h in (False, True)]

# The wait for P.V(j-1) inside the softmax (mid_wait, session 16), against the end-of-softmax wait
# of the same overlapped schedule (test_gpu_26; timed by the A/B command): both kernels of each
# pair are carried.
MID_WAIT_TESTS = [Variant(head_dim=d, sparsity_n=n, sparsity_m=m, consumers=3 if wg3 else 2, tma3d=m == 16,
                          mid_wait=mid, **_sched((T, T, T, T, T)))
                  for n, m, d, wg3 in ((0, 4, 128, False), (2, 4, 128, False), (8, 16, 128, False), (0, 4, 64, True),
                                       (2, 4, 64, False))
                  for mid in (False, True)]

# The suspending producer (producer_suspends, session 16) beside the polling one, each pattern's
# measured kernel: test_gpu_27 and the A/B command.
PRODUCER_SUSPENDS_TESTS = [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=m)),
                                               producer_suspends=sleeps)
                           for d, n, m in ((128, 0, 4), (128, 2, 4), (128, 4, 8), (128, 8, 16), (64, 0, 4))
                           for sleeps in (False, True)]

# P's row sums by the tensor core (mma_rowsum, session 18) and by FADD, on each pattern's
# measured kernel: test_gpu_28 (bf16 and fp16) and the A/B command.
MMA_ROWSUM_TESTS = [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, fp16=h)),
                                        mma_rowsum=on)
                    for d, n, m in ((128, 0, 4), (128, 2, 4), (128, 4, 8), (128, 8, 16), (64, 0, 4), (64, 2, 4))
                    for h in (False, True) for on in (False, True)]

# 64-key tiles with three consumer warpgroups at D = 128 (bn64, session 18): each pattern's
# measured kernel with the flag (test_gpu_29's mask probes, test_gpu_30 in both dtypes) and,
# for the A/B command, with overlap and MID_WAIT where the measured schedule has none (4:8) and
# without overlap where it has it.
BN64_PATTERNS = ((0, 4), (1, 2), (2, 4), (3, 4), (4, 8))
BN64_TESTS = [dataclasses.replace(_as_measured(Variant(sparsity_n=n, sparsity_m=m, tie_index=tie, fp16=h, probe=probe)),
                                  bn64=True).canonical()
              for n, m in BN64_PATTERNS for tie in (False, True) for h in (False, True) for probe in (False, True)
              if not (probe and h)] + \
             [dataclasses.replace(_as_measured(Variant(sparsity_n=n, sparsity_m=m)), bn64=True, overlap=ov,
                                  mid_wait=ov).canonical()
              for n, m in ((0, 4), (2, 4), (4, 8)) for ov in (False, True)]

# Parberry's pairwise network at M = 16 (pairwise, session 18) beside Batcher's, each measured
# M = 16 kernel test_gpu_31 runs (both tie rules, both head dims): bit for bit the same outputs.
PAIRWISE_TESTS = [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=16, tie_index=tie)),
                                      pairwise=on)
                  for d in (128, 64) for n, tie in ((8, False), (3, True)) for on in (False, True)]

# The selection network on f16 copies at M = 16 (half_select, session 21) beside the f32 one, on
# each measured M = 16 kernel (both tie rules, both head dims, both dtypes): test_gpu_34's outputs
# and the A/B command; its mask probes (test_gpu_34, the probe cases of test_gpu_9 at M = 16).
HALF_SELECT_PATTERNS = ((8, False), (8, True), (3, True), (5, False))
HALF_SELECT_TESTS = [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=16, tie_index=tie,
                                                              fp16=h)), half_select=on).canonical()
                     for d in (128, 64) for n, tie in HALF_SELECT_PATTERNS for h in (False, True) for on in (False, True)] + \
                    [dataclasses.replace(_as_measured(Variant(sparsity_n=n, sparsity_m=16, tie_index=tie, probe=True)),
                                         half_select=True).canonical()
                     for n, tie in HALF_SELECT_PATTERNS]

# Row-by-row selection and exponentials (row_pipe, session 21) beside the measured kernels of the
# threshold-rule patterns (both head dims, both dtypes): test_gpu_36 and the A/B command; its mask
# probes (the threshold-rule probe cases of test_gpu_9).
ROW_PIPE_PATTERNS = ((1, 2), (2, 4), (3, 4), (4, 8), (8, 16), (5, 16))
ROW_PIPE_TESTS = [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, fp16=h)),
                                      row_pipe=on).canonical()
                  for d in (128, 64) for n, m in ROW_PIPE_PATTERNS for h in (False, True) for on in (False, True)] + \
                 [dataclasses.replace(_as_measured(Variant(sparsity_n=n, sparsity_m=m, probe=True)), row_pipe=True).canonical()
                  for n, m in ROW_PIPE_PATTERNS] + \
                 [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=16, fp16=h, probe=probe)),
                                      row_pipe=True, half_select=True).canonical()
                  for d in (128, 64) for n in (8, 5) for h in (False, True) for probe in (False, True)
                  if not (probe and (h or d == 64))]

# The next tile's K and V tested right after the softmax (kv_pretest, session 23) beside the
# measured kernels (dense and N:M, both tie rules, both head dims, both dtypes): test_gpu_38 and
# the A/B command.
KV_PRETEST_PATTERNS = ((0, 4, False), (2, 4, False), (2, 4, True), (4, 8, False), (8, 16, False), (8, 16, True))
KV_PRETEST_TESTS = [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, tie_index=tie,
                                                             fp16=h)), kv_pretest=on).canonical()
                    for d in (128, 64) for n, m, tie in KV_PRETEST_PATTERNS for h in (False, True) for on in (False, True)]

# Learned sinks (session 24): the measured kernels with the sink folded into the epilogue, the
# patterns test_gpu_40 runs (both head dims, both dtypes).
LEARNED_SINKS_PATTERNS = ((0, 4), (2, 4), (8, 16))
LEARNED_SINKS_TESTS = [dataclasses.replace(_as_measured(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, fp16=h)),
                                           learned_sinks=True).canonical()
                       for d in (128, 64) for n, m in LEARNED_SINKS_PATTERNS for h in (False, True)]
