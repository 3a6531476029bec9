"""The Hopper engine's kernel variants: what one call compiles and runs.

:class:`Variant` is everything that is a template parameter of the CUDA source (head dim,
N:M pattern, tie rule, dtype, schedule switches), with its canonical form, its tag (the
cubin's name) and its ``-D`` flags. :func:`variant_for` picks the variant of a call: the
schedule measured fastest on the H200 (:func:`measured_schedule`, :func:`measured_consumers`,
:func:`measured_tma3d`), each switch overridable through the environment
(:func:`schedule_from_env`) so that the device script can time the alternatives. Pure Python:
no compiler, no driver, no GPU.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..reference import SparseParams
from ..switches import env_flag

HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: everything that is a template parameter of the CUDA source."""

    head_dim: int = 128
    sparsity_n: int = 0
    sparsity_m: int = 4
    tie_index: bool = False
    fp16: bool = False
    pingpong: bool = False
    overlap: bool = True
    probe: bool = False
    # Variants added after the first H200 run (compile-checked only, not yet run on a GPU):
    late_rescale: bool = False  # FA3's order: O rescaled under Q.K^T(i), before P.V(i-1) is issued
    tma: bool = False  # TMA producer (one thread) instead of cp.async (128 threads); dense and M <= 8
    lean: bool = False  # FA4's conditional O rescale (slack 2^8) and the two-instruction kept test
    consumers: int = 2  # 3: three consumer warpgroups, 192 query rows per CTA (D = 64 only)
    # Stage 3: 2:4 P.V through wgmma.sp (2:4 only). V in its own row order: by cp.async, or
    # with tma through a 5-D map (since session 11). With overlap since session 12.
    sparse_pv: bool = False
    # With tma, M = 16: the group permutation through a 4-D tensor map's dimensions {D, heads,
    # group, member} instead of element strides (<= 8), so M = 16 gets the TMA producer too.
    # The default for M = 16 since session 11 (measured_tma3d; MODELOPT_SPARSE_HOPPER_TMA3D=0 opts out).
    tma3d: bool = False
    # The tile loop split into an edge-tile loop and an interior-tile loop, each with one
    # softmax path (session 13; timed in session 14: within noise of one loop, so off;
    # MODELOPT_SPARSE_HOPPER_SPLIT_LOOP=1, tag flag "l"). Same results tile for tile: every
    # tile is classified as before.
    split_loop: bool = False
    # With overlap and dense P.V: the wait for P.V(j-1) inside the softmax of tile j, after its
    # first 16 exponentials, and P(j) converted into the operand between the remaining ones
    # (FlashAttention-4's sm90 order; session 16; MODELOPT_SPARSE_HOPPER_MID_WAIT=1, tag flag "w").
    mid_wait: bool = False
    # The producer suspends between polls for a free stage instead of polling in a tight loop
    # (MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS=1, tag flag "n"; session 16: 0.986-1.009x, A/B only).
    producer_suspends: bool = False
    # The row sums of P by the tensor core (session 18): P.V as m64n(D+8)k16 against V followed
    # by a swizzle atom of ones, instead of 64 FADDs per thread and tile (dense P.V only;
    # MODELOPT_SPARSE_HOPPER_MMA_ROWSUM, tag flag "u"; default: measured_mma_rowsum).
    mma_rowsum: bool = False
    # Tiles of 64 keys with three consumer warpgroups at D = 128 (session 18): one warpgroup's
    # softmax and selection under two others' MMAs; TMA producer, dense or M <= 8
    # (MODELOPT_SPARSE_HOPPER_BN64=1, tag flag "k"). A/B only: measured 0.925x dense, 0.909x
    # 2:4, 0.76-0.78x 4:8 against the measured kernels.
    bn64: bool = False
    # M = 16: Parberry's pairwise sorting network instead of Batcher's (88 instead of 92 FMNMX
    # per group, the same sorted values; session 18; MODELOPT_SPARSE_HOPPER_PAIRWISE, tag flag "q";
    # default: measured_pairwise).
    pairwise: bool = False
    # M = 16: the selection network on f16 copies of the scores, two groups per register
    # (HMNMX2), with an exact f32 threshold derived from it and the f32 network for a group its
    # f16 copy cannot decide (session 21; MODELOPT_SPARSE_HOPPER_HALF_SELECT, tag flag "v";
    # default: measured_half_select).
    half_select: bool = False
    # N:M, threshold rule: interior tiles select, exponentiate and sum row by row, so that the
    # second row's selection network runs beside the first row's exponentials (session 21;
    # MODELOPT_SPARSE_HOPPER_ROW_PIPE, tag flag "e"; default: measured_row_pipe).
    row_pipe: bool = False
    # Measurement only: SM clock stamps at each tile step's phase boundaries, for the `phases`
    # command (session 23; MODELOPT_SPARSE_HOPPER_PHASE_CLOCKS=1, tag flag "c"; never in a probe
    # build, never chosen by default).
    phase_clocks: bool = False
    # K(i+1) and V(i) tested (non-blocking) right after the softmax of tile i, so that the next
    # step skips its two blocking waits when both had arrived (session 23;
    # MODELOPT_SPARSE_HOPPER_KV_PRETEST, tag flag "j"; default: measured_kv_pretest).
    kv_pretest: bool = False
    # Learned sinks (GPT-OSS's per-head logit, no value row) folded into each row's sum and lse
    # in the epilogue (session 24; tag flag "a"): chosen by the call (``learned_sinks=``), not
    # by the environment, and its own variant so that the kernels without sinks keep their code.
    learned_sinks: bool = False

    def __post_init__(self):
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        if self.sparsity_n and self.sparsity_m not in (2, 4, 8, 16):
            raise ValueError(f"sparsity_m must be 2, 4, 8 or 16, got {self.sparsity_m}")
        if not 0 <= self.sparsity_n < max(self.sparsity_m, 1):
            raise ValueError(f"need 0 <= sparsity_n < sparsity_m, got {self.sparsity_n}:{self.sparsity_m}")

    def canonical(self) -> "Variant":
        """Dense kernels ignore M and the tie rule: one cubin serves all of them. TMA's element
        stride is at most 8, so an N:M variant with M = 16 keeps the cp.async producer unless
        ``tma3d`` (grouped 4-D maps, M = 16 only, two consumer warpgroups) asks for TMA."""
        v = self
        if v.consumers not in (2, 3):
            raise ValueError(f"consumers must be 2 or 3, got {v.consumers}")
        # 64-key tiles: D = 128, dense or M <= 8, never with the sparse P.V; always with three
        # consumer warpgroups and the TMA producer (element-strided maps, not the grouped ones).
        if v.bn64 and (v.head_dim != 128 or v.sparse_pv or (v.sparsity_n and v.sparsity_m > 8)):
            v = dataclasses.replace(v, bn64=False)
        if v.bn64:
            v = dataclasses.replace(v, consumers=3, tma=True, tma3d=False)
        # Three consumer warpgroups only at D = 64 and only with the TMA producer: the cp.async
        # producer needs 40 registers, which leaves the consumers 152, and ptxas then spills
        # and serializes the wgmma (C7512); so M = 16 (no TMA) keeps two warpgroups.
        if v.consumers == 3 and not v.bn64 and (v.head_dim != 64 or (v.sparsity_n and v.sparsity_m > 8)):
            v = dataclasses.replace(v, consumers=2)
        if v.consumers == 3:
            v = dataclasses.replace(v, tma=True)
        # Sparse P.V: 2:4 only (the hardware's format), two consumer warpgroups, not in probe
        # builds. With TMA, V goes through its own 5-D map (_Driver.encode_tma_sparse_pv).
        if v.sparse_pv and ((v.sparsity_n, v.sparsity_m) != (2, 4) or v.probe):
            v = dataclasses.replace(v, sparse_pv=False)
        if v.sparse_pv:
            v = dataclasses.replace(v, consumers=2)
        if v.sparsity_n == 0:
            v = dataclasses.replace(v, sparsity_m=4, tie_index=False)
        # Grouped 4-D maps: only where the element-strided map cannot go (M = 16), with TMA, two
        # consumer warpgroups, no sparse P.V; everywhere else the flag is dropped (one cubin).
        if v.tma3d and not (v.tma and v.sparsity_n and v.sparsity_m == 16 and v.consumers == 2 and not v.sparse_pv):
            v = dataclasses.replace(v, tma3d=False)
        if v.tma and v.sparsity_n and v.sparsity_m > 8 and not v.tma3d:
            v = dataclasses.replace(v, tma=False)
        # The wait inside the softmax exists only where a P.V runs during it (overlap), on the
        # dense P.V path.
        if v.mid_wait and (not v.overlap or v.sparse_pv):
            v = dataclasses.replace(v, mid_wait=False)
        # The ones columns extend the dense P.V only (wgmma.sp keeps its FADDs: one cubin).
        if v.mma_rowsum and v.sparse_pv:
            v = dataclasses.replace(v, mma_rowsum=False)
        # The pairwise network is built for M = 16 only (at M = 4 and 8 it needs as many FMNMX).
        if v.pairwise and not (v.sparsity_n and v.sparsity_m == 16):
            v = dataclasses.replace(v, pairwise=False)
        # The f16 network pairs a thread's two groups per row: M = 16 only.
        if v.half_select and not (v.sparsity_n and v.sparsity_m == 16):
            v = dataclasses.replace(v, half_select=False)
        # Row by row: N:M with the threshold rule and dense P.V.
        if v.row_pipe and not (v.sparsity_n and not v.tie_index and not v.sparse_pv):
            v = dataclasses.replace(v, row_pipe=False)
        # The clock stamps use the probe's buffer.
        if v.phase_clocks and v.probe:
            v = dataclasses.replace(v, phase_clocks=False)
        return v

    @property
    def tag(self) -> str:
        pattern = f"{self.sparsity_n}of{self.sparsity_m}{'i' if self.tie_index else 't'}" if self.sparsity_n else "dense"
        flags = "".join(c for c, on in (("h", self.fp16), ("p", self.pingpong), ("o", self.overlap),
                                        ("r", self.late_rescale), ("m", self.tma), ("z", self.lean),
                                        ("3", self.consumers == 3), ("s", self.sparse_pv), ("g", self.tma3d),
                                        ("l", self.split_loop), ("w", self.mid_wait), ("u", self.mma_rowsum),
                                        ("k", self.bn64), ("q", self.pairwise), ("v", self.half_select), ("e", self.row_pipe),
                                        ("n", self.producer_suspends), ("c", self.phase_clocks), ("j", self.kv_pretest),
                                        ("a", self.learned_sinks), ("x", self.probe))
                        if on)
        return f"d{self.head_dim}_{pattern}_{flags or '-'}"

    def defines(self) -> list[str]:
        v = self.canonical()
        return [f"-DNMH_HEAD_DIM={v.head_dim}", f"-DNMH_SPARSITY_N={v.sparsity_n}",
                f"-DNMH_SPARSITY_M={v.sparsity_m}", f"-DNMH_TIE_INDEX={int(v.tie_index)}",
                f"-DNMH_FP16={int(v.fp16)}", f"-DNMH_PINGPONG={int(v.pingpong)}",
                f"-DNMH_OVERLAP={int(v.overlap)}", f"-DNMH_PROBE={int(v.probe)}"] + \
            [f for f, on in (("-DNMH_LATE_RESCALE=1", v.late_rescale), ("-DNMH_TMA=1", v.tma),
                             ("-DNMH_LEAN=1", v.lean), ("-DNMH_CONSUMERS=3", v.consumers == 3),
                             ("-DNMH_SPARSE_PV=1", v.sparse_pv), ("-DNMH_TMA3D=1", v.tma3d),
                             ("-DNMH_SPLIT_LOOP=1", v.split_loop), ("-DNMH_MID_WAIT=1", v.mid_wait),
                             ("-DNMH_MMA_ROWSUM=1", v.mma_rowsum), ("-DNMH_BN64=1", v.bn64),
                             ("-DNMH_PAIRWISE=1", v.pairwise), ("-DNMH_HALF_SELECT=1", v.half_select),
                             ("-DNMH_ROW_PIPE=1", v.row_pipe), ("-DNMH_PHASE_CLOCKS=1", v.phase_clocks),
                             ("-DNMH_KV_PRETEST=1", v.kv_pretest), ("-DNMH_LEARNED_SINKS=1", v.learned_sinks),
                             ("-DNMH_PRODUCER_SUSPENDS=1", v.producer_suspends)) if on]


def measured_schedule(head_dim: int, sparsity_n: int, sparsity_m: int) -> dict:
    """The schedule a kernel runs unless the environment overrides a switch: the fastest one
    whose output matched on the H200 (docs/hopper_engine.md, session 10 table). Ping-pong
    consumers, FA3's late rescale, the TMA producer and FA4's conditional rescale everywhere;
    overlap of the next Q.K^T with this tile's softmax except at M = 8: there the selection's
    registers make the overlapped variant slower
    (4:8 454 vs 489 TFLOPS; session 14: 451-460 vs 471-486); at dense and 2:4 it is faster
    (660 vs 613, 558 vs 519). 8:16 at D = 128 (grouped 4-D maps) overlaps since session 14:
    455-473 against 439-446 without, same run (with cp.async, session 10: 338 vs 379).
    M = 8 at D = 128 also runs without ping-pong since session 20: the two consumer warpgroups
    issue their MMAs as their softmax ends instead of taking turns (A/B on the H200, median of
    13 paired rounds, two calls each: 4:8 without ping-pong 1.046x / 1.040x and 1.022x / 1.032x
    of the ping-pong kernel, with the tensor-core row sums 1.045x / 1.055x; 2:4 and 8:16 without
    ping-pong 0.88-0.97x, 2:4 with overlap and the row sums 0.98x / 1.02x: they keep it).
    M = 16 at D = 64 overlaps since session 21 (first timed then: 8:16 1.052x / 1.050x of the
    kernel without overlap, median of 9 paired rounds in each of two calls; 8:16 index with the
    f16 network 1.028x / 1.029x, 3:16 index 1.063x / 1.068x)."""
    if measured_consumers(head_dim, sparsity_n, sparsity_m) == 3:
        # Dense D = 64 runs three consumer warpgroups (440 TFLOPS against 388 for two, session
        # 10), with overlap and late rescale since session 14: 443-446 against 415-431 without
        # (same run); ptxas spilled 144 B in the tile loop until session 17 (none since the
        # warpgroup index is uniform and the edge masks are branch-free).
        return dict(pingpong=True, overlap=True, late_rescale=True, tma=True, lean=True)
    no_overlap = bool(sparsity_n) and sparsity_m == 8
    free_running = bool(sparsity_n) and sparsity_m == 8 and head_dim == 128
    return dict(pingpong=not free_running, overlap=not no_overlap, late_rescale=True, tma=True, lean=True)


def measured_tma3d(sparsity_n: int, sparsity_m: int) -> bool:
    """M = 16 loads K and V through the grouped 4-D maps unless MODELOPT_SPARSE_HOPPER_TMA3D=0:
    8:16 463 TFLOPS against 374 with the cp.async producer (session 11, H200; tests 22/23 and
    the whole GPU file pass with it). Other patterns ignore the flag (Variant.canonical)."""
    return bool(sparsity_n) and sparsity_m == 16


def measured_consumers(head_dim: int, sparsity_n: int, sparsity_m: int) -> int:
    """Consumer warpgroups unless MODELOPT_SPARSE_HOPPER_D64_WG3 says otherwise: three for dense
    D = 64 (192 query rows per CTA; measured 1.13x two), two everywhere else (N:M at D = 64
    was not timed with three, and 4:8 spills there)."""
    return 3 if head_dim == 64 and sparsity_n == 0 else 2


def measured_mid_wait(head_dim: int, sparsity_n: int, sparsity_m: int) -> bool:
    """The wait for P.V(j-1) inside the softmax unless MODELOPT_SPARSE_HOPPER_MID_WAIT says
    otherwise: on for dense D = 128 and for N:M (A/B on the H200, median of 7 paired rounds;
    session 16: dense D = 128 1.016x, 2:4 D = 128 1.023x, 2:4 D = 64 1.031x; session 17, after
    the uniform warpgroup index and branch-free edge masks: 8:16 D = 128 1.028x, where session
    16 had read 0.997x); off for dense D = 64 (three consumer warpgroups: 0.988x in session 16,
    0.987x on top of the split loop in session 17). M = 8 runs without overlap, where there is no
    P.V to wait for (Variant.canonical)."""
    if sparsity_n:
        return True
    return head_dim == 128


def measured_split_loop(consumers: int, head_dim: int = 128, sparsity_n: int = 0, sparsity_m: int = 4) -> bool:
    """Separate edge and interior tile loops unless MODELOPT_SPARSE_HOPPER_SPLIT_LOOP says
    otherwise: on for a kernel with three consumer warpgroups (dense D = 64), which since session
    17 spills nothing: A/B on the H200, median of 7 paired rounds, 1.055x, 1.067x and 1.060x
    (three calls; MID_WAIT there 1.048x / 1.051x, both 1.043x). Off with two (timed in the same
    calls): dense D = 128 0.992x, 2:4 0.957x, 4:8 1.009x, 8:16 1.003x; D = 64 2:4 0.933x, 4:8
    0.914x; except at M = 8 with D = 128 since session 20, under its schedule without ping-pong
    (13 paired rounds: 1.053x / 1.050x, then 1.034x / 1.016x over one loop; 8:16 and 2:4 with one
    loop stay faster: 0.89-0.94x split). Keyed on the consumer count the kernel really has, so
    that two warpgroups at dense D = 64 (MODELOPT_SPARSE_HOPPER_D64_WG3=0) keep one loop."""
    return consumers == 3 or (bool(sparsity_n) and sparsity_m == 8 and head_dim == 128)


def measured_mma_rowsum(head_dim: int, sparsity_n: int, sparsity_m: int) -> bool:
    """P's row sums by the tensor core unless MODELOPT_SPARSE_HOPPER_MMA_ROWSUM says otherwise:
    on for dense D = 128 and for M = 16 (A/B on the H200, median of 7 paired rounds, session 18:
    dense D = 128 1.030x (1.019-1.122), 8:16 1.018x (1.003-1.026)) and, since session 20, for M = 8
    at D = 128 under its schedule without ping-pong (1.022x / 1.022x over the FADD sum, two
    calls); off elsewhere (dense D = 64 1.003x, 2:4 0.986x; 4:8 with ping-pong 0.978x), although
    every loop issues 58-59 fewer instructions per tile with it."""
    return head_dim == 128 and (sparsity_n == 0 or sparsity_m in (8, 16))


def measured_pairwise(sparsity_n: int, sparsity_m: int) -> bool:
    """Parberry's pairwise network for M = 16 unless MODELOPT_SPARSE_HOPPER_PAIRWISE says
    otherwise (A/B on the H200, median of 9 paired rounds, session 18: 8:16 1.016x (1.002-1.034),
    3:16 index 1.038x (1.022-1.072); outputs bit for bit Batcher's, test_gpu_31). Other M have
    no cheaper network (Variant.canonical drops the flag there)."""
    return bool(sparsity_n) and sparsity_m == 16


def measured_half_select(head_dim: int, sparsity_n: int, sparsity_m: int, tie_index: bool) -> bool:
    """The selection network on f16 copies at M = 16 unless MODELOPT_SPARSE_HOPPER_HALF_SELECT
    says otherwise: on at D = 64 with the index tie rule. A/B on the H200, median of 9 paired
    rounds per call (session 21): without overlap, D = 64 8:16 index 1.093x / 1.104x; with overlap
    (the D = 64 M = 16 schedule since session 21), 8:16 index 1.116x / 1.118x over the same kernel
    without it, 3:16 index with overlap 1.063x / 1.068x over the kernel with neither. Off for the
    threshold rule (D = 64 8:16 with overlap 0.990x / 0.987x; without 1.00-1.04x) and at D = 128
    (8:16 threshold 0.94x, and 0.92-0.93x under five other schedules; 8:16 index 1.01-1.07x;
    3:16 index 0.92x, 5:16 0.85-0.87x). Nsight Compute (D = 128 8:16): instructions 472 M -> 430 M
    and the ALU pipe 49 % -> 35 % busy, but more time stalled on dependencies: the f16 path's
    chain (pack, network, floor) and its fallback branch, which ends the basic block, keep ptxas
    from running one row's network under the other row's exponentials (docs/hopper_engine.md,
    "Session 21")."""
    return head_dim == 64 and bool(sparsity_n) and sparsity_m == 16 and tie_index


def measured_row_pipe(head_dim: int, sparsity_n: int, sparsity_m: int) -> bool:
    """Row-by-row selection and exponentials unless MODELOPT_SPARSE_HOPPER_ROW_PIPE says
    otherwise: off. A/B on the H200 (session 21, median of 9 paired rounds per call): D = 128 2:4
    0.995x / 0.967x, 4:8 0.990x / 0.992x, 8:16 0.991x / 0.979x (with the f16 network 1.02x / 1.00x
    in one call, 0.95x / 0.93x in the next); D = 64 8:16 without overlap 1.045x / 1.050x, but with
    overlap (its schedule since session 21) 0.945x / 0.945x of the overlapped kernel; D = 64 2:4
    0.97x. ptxas already runs the second row's network under the first row's exponentials when
    both rows are selected first (the SASS of the two orders differs little)."""
    return False


def measured_kv_pretest(head_dim: int, sparsity_n: int, sparsity_m: int) -> bool:
    """The early non-blocking test of K(i+1) and V(i) unless MODELOPT_SPARSE_HOPPER_KV_PRETEST says
    otherwise: on for dense, for M = 16 at D = 128 and for M = 4 and 8 at D = 64 (session 23). A/B
    on the H200 (two calls of 9 paired rounds, the second with the vote at the next step's start,
    the form built): D = 128 dense 1.012x / 1.013x, 8:16 1.012x / 1.010x; D = 64 dense 1.015x /
    1.009x, 4:8 1.018x / 1.018x, 2:4 1.007x / 1.015x. Off where it did not pay: D = 128 2:4
    0.997x / 1.000x, 4:8 0.959x / 0.966x (no overlap: its softmax phase grew), D = 64 8:16 0.995x /
    1.002x; M = 2 (not timed) keeps the blocking waits too."""
    if not sparsity_n:
        return True
    return (head_dim == 128 and sparsity_m == 16) or (head_dim == 64 and sparsity_m in (4, 8))


def variant_for(params: SparseParams, dtype: torch.dtype, head_dim: int, *, probe: bool = False,
                learned_sinks: bool = False) -> Variant:
    """The kernel a call runs: :func:`measured_schedule`, where the environment can override
    each switch so that the device script can time the alternatives:
    MODELOPT_SPARSE_HOPPER_PINGPONG, _OVERLAP, _LATE_RESCALE, _TMA (ignored for M = 16) and
    _LEAN (0 or 1; unset: the measured schedule), MODELOPT_SPARSE_HOPPER_D64_WG3 (three
    consumer warpgroups at D = 64; unset: :func:`measured_consumers`) and
    MODELOPT_SPARSE_HOPPER_SPARSE_PV (default 0: 2:4 P.V through wgmma.sp) and
    MODELOPT_SPARSE_HOPPER_TMA3D (with _TMA, M = 16 through the grouped 4-D maps; unset:
    :func:`measured_tma3d`, on for M = 16) and MODELOPT_SPARSE_HOPPER_SPLIT_LOOP (separate edge and
    interior tile loops; unset: :func:`measured_split_loop`, on with three consumer warpgroups and at M = 8, D = 128) and
    MODELOPT_SPARSE_HOPPER_MID_WAIT (with overlap: the wait for P.V(j-1) inside the softmax;
    unset: :func:`measured_mid_wait`) and MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS (default 0: the
    producer polls for a free stage in a tight loop; 1: it suspends between polls) and
    MODELOPT_SPARSE_HOPPER_MMA_ROWSUM (P's row sums by the tensor core; unset:
    :func:`measured_mma_rowsum`) and MODELOPT_SPARSE_HOPPER_BN64 (default 0: 128-key tiles; 1:
    64-key tiles with three consumer warpgroups at D = 128, dense or M <= 8) and
    MODELOPT_SPARSE_HOPPER_PAIRWISE (the pairwise selection network at M = 16 instead of
    Batcher's; unset: :func:`measured_pairwise`) and MODELOPT_SPARSE_HOPPER_HALF_SELECT (M = 16:
    the network on f16 copies, two groups per register; unset: :func:`measured_half_select`) and
    MODELOPT_SPARSE_HOPPER_ROW_PIPE (N:M, threshold rule: selection and exponentials row by row;
    unset: :func:`measured_row_pipe`) and MODELOPT_SPARSE_HOPPER_PHASE_CLOCKS (measurement only,
    default 0: the clock-stamp build the ``phases`` command reads) and
    MODELOPT_SPARSE_HOPPER_KV_PRETEST (the next tile's K and V tested right after the softmax;
    unset: :func:`measured_kv_pretest`)."""
    consumers = 3 if env_flag("MODELOPT_SPARSE_HOPPER_D64_WG3",
                              measured_consumers(head_dim, params.sparsity_n, params.sparsity_m) == 3) else 2
    return Variant(
        head_dim=head_dim,
        sparsity_n=params.sparsity_n,
        sparsity_m=params.sparsity_m,
        tie_index=params.tie_break == "index",
        fp16=dtype == torch.float16,
        **schedule_from_env(head_dim, params.sparsity_n, params.sparsity_m),
        consumers=consumers,
        sparse_pv=env_flag("MODELOPT_SPARSE_HOPPER_SPARSE_PV", False),
        tma3d=env_flag("MODELOPT_SPARSE_HOPPER_TMA3D", measured_tma3d(params.sparsity_n, params.sparsity_m)),
        split_loop=env_flag("MODELOPT_SPARSE_HOPPER_SPLIT_LOOP",
                            measured_split_loop(consumers, head_dim, params.sparsity_n, params.sparsity_m)),
        mid_wait=env_flag("MODELOPT_SPARSE_HOPPER_MID_WAIT",
                          measured_mid_wait(head_dim, params.sparsity_n, params.sparsity_m)),
        producer_suspends=env_flag("MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS", False),
        mma_rowsum=env_flag("MODELOPT_SPARSE_HOPPER_MMA_ROWSUM",
                            measured_mma_rowsum(head_dim, params.sparsity_n, params.sparsity_m)),
        bn64=env_flag("MODELOPT_SPARSE_HOPPER_BN64", False),
        pairwise=env_flag("MODELOPT_SPARSE_HOPPER_PAIRWISE", measured_pairwise(params.sparsity_n, params.sparsity_m)),
        half_select=env_flag("MODELOPT_SPARSE_HOPPER_HALF_SELECT",
                             measured_half_select(head_dim, params.sparsity_n, params.sparsity_m,
                                                  params.tie_break == "index")),
        row_pipe=env_flag("MODELOPT_SPARSE_HOPPER_ROW_PIPE",
                          measured_row_pipe(head_dim, params.sparsity_n, params.sparsity_m)),
        phase_clocks=env_flag("MODELOPT_SPARSE_HOPPER_PHASE_CLOCKS", False),
        kv_pretest=env_flag("MODELOPT_SPARSE_HOPPER_KV_PRETEST",
                            measured_kv_pretest(head_dim, params.sparsity_n, params.sparsity_m)),
        learned_sinks=learned_sinks,
        probe=probe,
    ).canonical()


# The schedule switches (a schedule tuple's order) and the environment variables that override
# them (variant_for, the device script).
SCHEDULE_FIELDS = ("pingpong", "overlap", "late_rescale", "tma", "lean")
_SCHEDULE_ENV = {"pingpong": "MODELOPT_SPARSE_HOPPER_PINGPONG",
                 "overlap": "MODELOPT_SPARSE_HOPPER_OVERLAP",
                 "late_rescale": "MODELOPT_SPARSE_HOPPER_LATE_RESCALE",
                 "tma": "MODELOPT_SPARSE_HOPPER_TMA",
                 "lean": "MODELOPT_SPARSE_HOPPER_LEAN"}


def schedule_from_env(head_dim: int = 128, sparsity_n: int = 0, sparsity_m: int = 4) -> dict:
    """The schedule fields for a kernel: :func:`measured_schedule`, each switch overridden by
    its environment variable when that is set (variant_for's switches)."""
    measured = measured_schedule(head_dim, sparsity_n, sparsity_m)
    return {f: env_flag(name, measured[f]) for f, name in _SCHEDULE_ENV.items()}


def schedule_env(schedule: dict) -> str:
    """``NAME=0/1 ...`` for a schedule (what the device script exports for the test run)."""
    return " ".join(f"{_SCHEDULE_ENV[f]}={int(bool(schedule[f]))}" for f in SCHEDULE_FIELDS)


def _parse_tag(tag: str) -> Variant:
    """``d128_4of8t_pr`` -> Variant (the inverse of Variant.tag, for the sass command)."""
    m = re.fullmatch(r"d(\d+)_(dense|(\d+)of(\d+)([ti]))_([a-z3-]+)", tag)
    if not m:
        raise ValueError(f"not a variant tag: {tag}")
    flags = m.group(6)
    return Variant(head_dim=int(m.group(1)), sparsity_n=int(m.group(3) or 0), sparsity_m=int(m.group(4) or 4),
                   tie_index=m.group(5) == "i", fp16="h" in flags, pingpong="p" in flags, overlap="o" in flags,
                   late_rescale="r" in flags, tma="m" in flags, lean="z" in flags,
                   consumers=3 if "3" in flags else 2, sparse_pv="s" in flags, tma3d="g" in flags,
                   split_loop="l" in flags, mid_wait="w" in flags,
                   producer_suspends="n" in flags, mma_rowsum="u" in flags, bn64="k" in flags,
                   pairwise="q" in flags, half_select="v" in flags, row_pipe="e" in flags,
                   phase_clocks="c" in flags, kv_pretest="j" in flags, learned_sinks="a" in flags,
                   probe="x" in flags)
