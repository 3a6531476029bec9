"""The Hopper engine's developer tools: ``python -m modelopt_sparse.kernels.hopper_attention``.

``precompile`` (:func:`_precompile`: compile the standard variants into the cubin cache and
print ptxas's register / spill report; no GPU), ``smoke`` (:func:`_smoke`: a few small calls
against the reference, with diagnostics; GPU), ``sass`` (:func:`_sass`: static SASS counts of
the consumers' tile loop per variant, :func:`count_main_loop`; no GPU) and ``bench``
(:func:`_bench`: forward TFLOPS of the schedules against Triton and SDPA, each row checked
against the float32 reference; GPU) and ``ab`` (ab_table.py: chosen kernels timed against each
other in repeated rotating rounds; GPU). tools/device_hopper.sh runs them. :func:`_main` is the
command line (``__main__.py`` calls it). Not imported by ``attention()``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..reference import SparseParams
from .build import (NVCC_FLAGS, SOURCE_DIR, cache_dir, compile_variant, find_nvcc, nvcc_version, ptxas_summary,
                    source_digest)
from .engine import LOG2E, forward, forward_with_lse
from .variant_sets import (MID_WAIT_TESTS, SPLIT_LOOP_BENCH, BENCH_NM, BENCH_SCHEDULES, BENCH_SCHEDULES_SHORT,
                           BENCH_SCHEDULES_SPARSE_PV, BENCH_SCHEDULES_TMA3D, BENCH_SCHEDULES_WG3, TEST_SCHEDULES,
                           _sched, standard_variants)
from .ab_table import main as ab_main
from .ab_table import SWITCH_NAMES, schedule_switches
from .variants import SCHEDULE_FIELDS, Variant, _parse_tag, schedule_env


def _precompile(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    schedule = "env" if args.schedule_from_env else None
    variants = standard_variants(probe=not args.no_probe, schedule=schedule)
    if args.test_schedules:  # the carried test sets of every TEST_SCHEDULES entry as well
        for t in TEST_SCHEDULES:
            variants += [v for v in standard_variants(probe=not args.no_probe, schedule=_sched(t)) if v not in variants]
    print(f"cache: {cache_dir()}  nvcc: {find_nvcc()}  variants: {len(variants)}"
          f"{'  schedule: from the environment' if schedule else ''}", flush=True)
    digest = source_digest()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        paths = list(pool.map(compile_variant, variants))
    if source_digest() != digest:
        print("the CUDA sources changed during this precompile: its cubins belong to more than one version of "
              "them; run it again on the final sources")
        return 1
    if args.no_report:
        print(f"{len(paths)} cubins ready")
        return 0
    print(f"{'variant':<22} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}")
    for v, path in zip(variants, paths):
        s = ptxas_summary(path.with_suffix(".log").read_text())
        print(f"{v.tag:<22} {s.get('registers', '?'):>5} {s.get('stack', '?'):>6} {s.get('spill_stores', '?'):>9} "
              f"{s.get('spill_loads', '?'):>9}{'  SERIALIZED WGMMA' if s.get('serialized_wgmma') else ''}")
    return 0


def find_nvdisasm() -> str | None:
    """nvdisasm for the SASS counts: $MODELOPT_SPARSE_NVDISASM, PATH, beside nvcc, or the copy
    Triton ships (triton/backends/nvidia/bin)."""
    explicit = os.environ.get("MODELOPT_SPARSE_NVDISASM")
    if explicit:
        return explicit
    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = find_nvcc()
    if nvcc and (Path(nvcc).parent / "nvdisasm").is_file():
        return str(Path(nvcc).parent / "nvdisasm")
    try:
        import triton  # noqa: PLC0415

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        return str(p) if p.is_file() else None
    except ImportError:
        return None


# Opcode classes of the SASS counts (the pipe they issue to, roughly: MUFU = the SFU's 16
# lanes/clk/SM; FMNMX/FSETP/FSEL/SEL/LOP3/ISETP = the half-rate ALU pipe; FFMA/FADD/FMUL = FMA).
SASS_CLASSES = ("HGMMA", "MUFU", "FFMA", "FADD", "FMUL", "FMNMX", "HMNMX2", "FSETP", "FSEL", "SEL", "F2FP", "SHFL", "LOP3",
                "ISETP", "MOV", "BAR", "SYNCS")
# Instructions of the 16-lane ALU pipe, which hold a scheduler's dispatch for two cycles: measured
# for the min/max forms, LOP3 and integer adds (benchmarks/hopper_select: with eight warps per
# scheduler, 126 FFMA beside a 126-FMNMX network add 126 cycles, so no other warp's FFMA issues in
# an FMNMX's second cycle); the compares and selects by the pipe they share.
HALF_RATE = frozenset({"FMNMX", "HMNMX2", "VHMNMX", "IMNMX", "VIMNMX", "VIMNMX3", "FSETP", "ISETP", "FSEL", "SEL", "LOP3",
                       "IADD3", "VIADD", "SHF", "PRMT", "LEA"})


def count_main_loop(sass: str) -> dict:
    """Static instruction counts of the consumers' tile loop in ``sass`` (nvdisasm -c output):
    the backward branch whose body holds the most HGMMA, less the nested barrier-retry loops.
    Compile with -DNMH_SASS_INTERIOR=1 so that the body is the interior-tile path. With
    ``nvdisasm -hex`` output, ``stall`` is the sum of the body's stall counts (bits 41-44 of each
    instruction's upper word): ptxas's own estimate of one warp's issue cycles for a tile, without
    the waits for variable-latency results (MUFU, shuffles, barriers, the MMAs). ``dispatch`` is
    the scheduler cycles the body holds, whatever the order: one per instruction, two per
    :data:`HALF_RATE` one. A scheduler serves one warp of each consumer warpgroup, so two
    warpgroups need twice this per tile step, however well their phases interleave."""
    ins, labels, stalls = [], {}, []
    lines = sass.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(2))
            hi = re.fullmatch(r"\s*/\* 0x([0-9a-f]{16}) \*/\s*", lines[i + 1]) if i + 1 < len(lines) else None
            stalls.append((int(hi.group(1), 16) >> 41) & 15 if hi else 0)
    loops = []
    for k, text in enumerate(ins):
        m = re.search(r"BRA\b.*`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), k + 1) <= k:
            loops.append((labels[m.group(1)], k))
    if not loops:
        return {}
    lo, hi = max(loops, key=lambda r: (sum("HGMMA" in t for t in ins[r[0]:r[1] + 1]), r[1] - r[0]))
    skip = set()
    for a, b in loops:
        if lo < a and b < hi and not any("HGMMA" in t for t in ins[a:b + 1]):
            skip.update(range(a, b + 1))
    body = [i for i in range(lo, hi + 1) if i not in skip]
    ops = [re.sub(r"^@!?U?P\w+\s+", "", ins[i]).split()[0] for i in body]
    out = {"total": len(ops), "dispatch": len(ops) + sum(op.split(".")[0] in HALF_RATE for op in ops),
           "stall": sum(stalls[i] for i in body)}
    for c in SASS_CLASSES:
        out[c] = sum(op.split(".")[0] == c for op in ops)
    return out


def _sass(args) -> int:
    """Inner-loop SASS counts per variant (no GPU): compile with NMH_SASS_INTERIOR, disassemble."""
    nvcc, nvdisasm = find_nvcc(), find_nvdisasm()
    if nvcc is None or nvdisasm is None:
        print("needs nvcc and nvdisasm")
        return 1
    if args.variants:
        variants = [_parse_tag(t) for t in args.variants]
    else:
        variants = [Variant(**_sched(t)) for t in BENCH_SCHEDULES]
        variants += [Variant(sparsity_n=n, sparsity_m=m, **_sched(t)) for n, m in BENCH_NM
                     for t in BENCH_SCHEDULES_SHORT]
        variants += [Variant(head_dim=64, **_sched(t)) for t in BENCH_SCHEDULES_SHORT]
        variants += [Variant(head_dim=64, consumers=3, **_sched(t)) for t in BENCH_SCHEDULES_WG3]
        variants += [Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, **_sched(t)) for t in BENCH_SCHEDULES_SPARSE_PV]
    columns = ("total", "dispatch", "stall") + SASS_CLASSES
    widths = [max(7, len(c) + 1) for c in columns]
    print(f"{'variant':<24}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths)) + "   regs spill", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            v = v.canonical()
            cubin = Path(tmp) / f"{v.tag}.cubin"
            cmd = [nvcc, *NVCC_FLAGS, *v.defines(), "-DNMH_SASS_INTERIOR=1", "-o", str(cubin),
                   str(SOURCE_DIR / "nm_attention_fwd.cu")]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                print(f"{v.tag:<24} nvcc failed: {res.stderr[-300:]}")
                continue
            summary = ptxas_summary(res.stderr + res.stdout)
            dis = subprocess.run([nvdisasm, "-c", "-hex", str(cubin)], capture_output=True, text=True,
                                 timeout=120).stdout
            counts = count_main_loop(dis)
            print(f"{v.tag:<24}" + "".join(f"{counts.get(c, 0):>{w}}" for c, w in zip(columns, widths)) +
                  f"   {summary.get('registers', '?')} {summary.get('spill_stores', '?')}/{summary.get('spill_loads', '?')}",
                  flush=True)
    return 0


def _smoke(args) -> int:
    """A few small calls with diagnostics that say *how* a result is wrong (first run on a GPU)."""
    import time

    os.environ["MODELOPT_SPARSE_HOPPER_CHECK"] = "1"
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)} sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))}"
          f"  torch {torch.__version__}  nvcc {nvcc_version(find_nvcc()) if find_nvcc() else None}", flush=True)
    failures = 0
    cases = [
        ("dense noncausal 1x256 D128", dict(is_causal=False), [256], 128),
        ("dense causal 1x256 D128", dict(), [256], 128),
        ("dense causal varlen D64", dict(), [1, 130, 257], 64),
        ("2:4 causal varlen D128 sinks+window", dict(sparsity_n=2, num_sink_tokens=4, dense_window_size=16),
         [5, 300], 128),
        ("8:16 index causal D128", dict(sparsity_n=8, sparsity_m=16, tie_break="index"), [300], 128),
    ]
    g = torch.Generator().manual_seed(0)
    for name, kw, lens, d in cases:
        params = SparseParams(**{"is_causal": True, "softmax_scale": d ** -0.5, "sparsity_n": 0, "sparsity_m": 4,
                                 "num_sink_tokens": 0, "dense_window_size": 0, "tie_break": "threshold", **kw})
        total = sum(lens)
        q, k, v = (torch.randn(total, 4, d, generator=g).to(dev, torch.bfloat16) for _ in range(3))
        k, v = k[:, :2], v[:, :2]  # GQA 4:2 (strided views, as a fused projection gives them)
        starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], dtype=torch.int32, device=dev)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        t0 = time.perf_counter()
        try:
            out, lse = forward_with_lse(q, k, v, starts, lens_t, max(lens), starts, lens_t, params, covered=True)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and go on with the next case
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            continue
        from ..reference import Segment, reference_attention

        segs = [Segment(int(st), n, int(st), n) for st, n in zip(starts.tolist(), lens)]
        ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), segs, params, None)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        lse2 = ref_lse * LOG2E  # the reference's lse is natural-log; the kernels store log2
        finite = torch.isfinite(lse2)
        lse_err = (lse.double()[finite] - lse2[finite]).abs().max().item() if finite.any() else 0.0
        bad_rows = ((out.double() - ref).abs().amax(dim=(1, 2)) > 0.05).nonzero().flatten()
        ok = err < 2e-2 and lse_err < 1e-2 and torch.isfinite(out).all()
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: rel L2 {err:.2e}, max |lse - ref| {lse_err:.2e}, "
              f"non-finite {int((~torch.isfinite(out)).sum())}, rows off {bad_rows.numel()}/{total}"
              f"{' first ' + str(bad_rows[:8].tolist()) if bad_rows.numel() else ''}, "
              f"{1e3 * (time.perf_counter() - t0):.0f} ms (incl. load)", flush=True)
    return 1 if failures else 0


def _sched_label(sched: dict) -> str:
    names = (("pingpong", "pp"), ("late_rescale", "late"), ("tma", "tma"), ("lean", "lean"))
    parts = [short for f, short in names if sched[f]] + ([] if sched["overlap"] else ["no-ovl"]) + \
        (["3wg"] if sched.get("wg3") else []) + (["sparse-pv"] if sched.get("sparse_pv") else []) + \
        (["tma3d"] if sched.get("tma3d") else []) + (["split"] if sched.get("split_loop") else []) + \
        (["mid-wait"] if sched.get("mid_wait") else [])
    return " ".join(parts) or "base"  # the first verified schedule (overlap only), not the measured default


_TAIL_ROWS = 256


def _exact_tail(api_attention, q, k, v, params: SparseParams) -> torch.Tensor:
    """The float32 reference (backend="torch") of the last rows of a one-sequence call: those
    rows as a chunk against every key (causal alignment puts them at the sequence's end)."""
    rows, keys = min(_TAIL_ROWS, q.shape[0]), k.shape[0]
    dev = q.device
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    return api_attention(q[-rows:].float(), k.float(), v.float(), zero, torch.tensor([rows], dtype=torch.int32, device=dev),
                         rows, b_start_loc_k=zero, b_seq_len_k=torch.tensor([keys], dtype=torch.int32, device=dev),
                         max_input_len_k=keys, is_causal=params.is_causal, softmax_scale=params.softmax_scale, sparsity_n=params.sparsity_n,
                         sparsity_m=params.sparsity_m, dense_window_size=params.dense_window_size,
                         tie_break=params.tie_break, backend="torch")


def event_ms(fn, iters: int, dev: torch.device) -> float:
    """Milliseconds of one ``fn()``: one untimed call, then the median of ``iters`` calls
    between CUDA events (on the CPU, for the tests of the tables' own code: one wall-clock
    call, meaningless as a number)."""
    import time

    fn()
    if dev.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return sorted(times)[len(times) // 2]


def _bench(args) -> int:
    """Causal/non-causal forward TFLOPS at S x H (batch 1): the engine's schedules against the
    Triton forward and SDPA. Every engine and Triton row also reports the relative L2 distance
    of its last rows to the float32 reference ("vs fp32": bf16 rounding gives ~2e-3; a variant
    that computes something else shows here at once). Rows are skipped once the time budget is
    spent. The last line names the fastest dense D=128 causal schedule whose output agrees
    (BEST_SCHEDULE, read by tools/device_hopper.sh)."""
    import time

    from ..api import attention as api_attention

    # device "cpu" only for the CPU test of the table's own code (a stubbed forward); every
    # number it prints there is meaningless.
    dev = torch.device(getattr(args, "device", "cuda"))
    s_len, heads = args.seq_len, args.heads
    start = time.perf_counter()
    rows = []

    def timed(fn):
        return event_ms(fn, args.iters, dev)

    # (d, causal, n, m, tie, impl, schedule)
    plan = []
    for t in BENCH_SCHEDULES:
        plan.append((128, True, 0, 4, "threshold", "hopper", _sched(t)))
    plan.append((128, True, 0, 4, "threshold", "sdpa", None))
    # The split tile loop (SPLIT_LOOP_BENCH), each kernel without and with it, back to back.
    for v in SPLIT_LOOP_BENCH:
        sched = dict(((f, getattr(v, f)) for f in SCHEDULE_FIELDS), wg3=v.consumers == 3, tma3d=v.tma3d)
        for split in (False, True):
            plan.append((v.head_dim, True, v.sparsity_n, v.sparsity_m, "threshold", "hopper",
                         dict(sched, split_loop=split)))
    for n, m in BENCH_NM:
        for t in BENCH_SCHEDULES_SHORT:
            plan.append((128, True, n, m, "threshold", "hopper", _sched(t)))
    plan.append((128, True, 8, 16, "index", "hopper", _sched(BENCH_SCHEDULES[0])))
    # 8:16 through the grouped 4-D TMA maps (compare with the 8:16 rows of the same schedule above).
    for t in BENCH_SCHEDULES_TMA3D:
        plan.append((128, True, 8, 16, "threshold", "hopper", dict(_sched(t), tma3d=True)))
    # Stage 3: 2:4 with P.V through wgmma.sp (both tie rules), against the rows above (the
    # index rule's default row first: it is the reference of the index rows).
    plan.append((128, True, 2, 4, "index", "hopper", _sched(BENCH_SCHEDULES[0])))
    for t in BENCH_SCHEDULES_SPARSE_PV:
        for tie in ("threshold", "index"):
            plan.append((128, True, 2, 4, tie, "hopper", dict(_sched(t), sparse_pv=True)))
    for t in BENCH_SCHEDULES_SHORT:
        plan.append((64, True, 0, 4, "threshold", "hopper", _sched(t)))
    plan.append((64, True, 0, 4, "threshold", "sdpa", None))
    for t in BENCH_SCHEDULES_SHORT:
        plan.append((128, False, 0, 4, "threshold", "hopper", _sched(t)))
    plan.append((128, False, 0, 4, "threshold", "sdpa", None))
    plan += [(128, True, 0, 4, "threshold", "triton", None), (128, True, 2, 4, "threshold", "triton", None),
             (128, True, 4, 8, "threshold", "triton", None),
             (128, True, 8, 16, "threshold", "triton", None), (64, True, 0, 4, "threshold", "triton", None)]
    # Session 16: the wait for P.V(j-1) inside the softmax (MID_WAIT_TESTS: each overlapped
    # measured kernel with the wait at the softmax's end and inside it, back to back). Every other
    # row runs the wait at the end (schedule_switches: an absent switch is off).
    for v in MID_WAIT_TESTS:
        sched = dict(((f, getattr(v, f)) for f in SCHEDULE_FIELDS), wg3=v.consumers == 3, tma3d=v.tma3d)
        plan.append((v.head_dim, True, v.sparsity_n, v.sparsity_m, "threshold", "hopper",
                     dict(sched, mid_wait=v.mid_wait)))
    # Last: the three-warpgroup ring is the one new named-barrier protocol, and a named-barrier
    # deadlock cannot be caught by the in-kernel watchdog (the step's timeout ends it).
    for t in BENCH_SCHEDULES_WG3:
        plan.append((64, True, 0, 4, "threshold", "hopper", dict(_sched(t), wg3=True)))
    g = torch.Generator(device=dev).manual_seed(0)
    tensors, reference = {}, {}
    saved_env = {name: os.environ.get(name) for name in SWITCH_NAMES + ("MODELOPT_SPARSE_HOPPER_CHECK",)}
    best = fastest = None
    announced = False
    for d, causal, n, m, tie, impl, sched in plan:
        if not announced and not (d == 128 and causal and n == 0 and impl == "hopper") and best is not None:
            # As soon as the dense D=128 causal rows are done, so that a later hang cannot lose it.
            print(f"BEST_SCHEDULE {schedule_env(best[1])}  # {_sched_label(best[1])}, {best[0]:.3f} ms", flush=True)
            announced = True
        label = (f"D={d:<3} {'causal' if causal else 'noncausal':<9} {'dense' if n == 0 else f'{n}:{m}':<5}"
                 f"{' idx' if tie == 'index' else '    '} {impl:<6} {_sched_label(sched) if sched else ''}")
        if time.perf_counter() - start > args.budget:
            rows.append((label, None, "skipped (time budget)"))
            continue
        if d not in tensors:
            tensors[d] = [torch.randn(s_len, heads, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)]
        q, k, v = tensors[d]
        lens = torch.tensor([s_len], dtype=torch.int32, device=dev)
        zero = torch.zeros(1, dtype=torch.int32, device=dev)
        params = SparseParams(causal, d ** -0.5, n, m, 0, 64 if n else 0, tie)
        flops = 4.0 * s_len * s_len * heads * d / (2 if causal else 1)
        check = ""
        try:
            if impl == "hopper":
                os.environ.update(schedule_switches(sched))

                def run():
                    return forward(q, k, v, zero, lens, s_len, zero, lens, params, q_covered=True, with_lse=False)[0]

                # First a checked call: a barrier wait that times out in the kernel raises here
                # (the row says ERROR) instead of hanging the table; then the timing, unchecked.
                os.environ["MODELOPT_SPARSE_HOPPER_CHECK"] = "1"
                try:
                    out = run()
                finally:
                    os.environ.pop("MODELOPT_SPARSE_HOPPER_CHECK", None)
                ms = timed(run)
                key = (d, causal, n, m, tie)
                if key not in reference:
                    reference[key] = _exact_tail(api_attention, q, k, v, params)
                ref = reference[key]
                err = ((out[-ref.shape[0]:].float() - ref).norm() / ref.norm()).item()
                # bf16 output rounding alone is ~2e-3 (every correct variant, and the Triton
                # forward); a wrong kernel is off by 0.1 or more.
                ok = err < 5e-3
                check = f"  vs fp32 {err:.1e}{'' if ok else '  WRONG'}"
                if ok:
                    if d == 128 and causal and n == 0:
                        if fastest is None or ms < fastest[0]:
                            fastest = (ms, sched)
                        if tuple(sched[f] for f in SCHEDULE_FIELDS) in TEST_SCHEDULES and (best is None or ms < best[0]):
                            best = (ms, sched)
                del out
            elif impl == "triton":
                def run():
                    return api_attention(q, k, v, zero, lens, s_len, is_causal=causal, sparsity_n=n, sparsity_m=m,
                                         dense_window_size=params.dense_window_size, tie_break=tie, backend="triton",
                                         check_metadata=False, rows_covered=True)

                ms = timed(run)
                key = (d, causal, n, m, tie)
                if key not in reference:
                    reference[key] = _exact_tail(api_attention, q, k, v, params)
                ref = reference[key]
                err = ((run()[-ref.shape[0]:].float() - ref).norm() / ref.norm()).item()
                check = f"  vs fp32 {err:.1e}{'' if err < 5e-3 else '  WRONG'}"
            else:
                qt, kt, vt = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
                ms = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            rows.append((label, ms, f"{flops / ms / 1e9:7.1f} TFLOPS{check}"))
        except Exception as e:  # noqa: BLE001 - a broken row must not hide the others
            rows.append((label, None, f"ERROR {type(e).__name__}: {str(e)[:120]}"))
        print(f"  {rows[-1][0]}  {rows[-1][2]}", flush=True)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    print(f"\nforward, S={s_len}, H={heads}, bf16, batch 1 (dense-equivalent FLOPs; N:M rows count the same FLOPs "
          f"as dense, so their TFLOPS compare directly; N:M rows: dense window 64; 'vs fp32': relative L2 "
          f"distance of the last {_TAIL_ROWS} rows to the float32 reference, WRONG above 5e-3)")
    for label, ms, text in rows:
        print(f"{label:<60} {'' if ms is None else f'{ms:8.3f} ms'}  {text}")
    if fastest is not None:
        print(f"FASTEST {_sched_label(fastest[1])}, {fastest[0]:.3f} ms (dense D=128 causal, output agrees)")
    if best is not None:  # the fastest whose test set is carried (TEST_SCHEDULES), again at the end
        print(f"BEST_SCHEDULE {schedule_env(best[1])}  # {_sched_label(best[1])}, {best[0]:.3f} ms")
    return 0


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modelopt_sparse.kernels.hopper_attention",
                                     description="The Hopper engine's tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("precompile", help="compile the standard variants into the cubin cache (no GPU needed) "
                                            "and print ptxas's register / spill report")
    pre.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    pre.add_argument("--no-probe", action="store_true", help="skip the mask-probe builds")
    pre.add_argument("--schedule-from-env", action="store_true",
                     help="only the GPU tests' kernels, under the schedule the MODELOPT_SPARSE_HOPPER_* switches select")
    pre.add_argument("--no-report", action="store_true", help="skip ptxas's register / spill table")
    pre.add_argument("--test-schedules", action="store_true",
                     help="also the GPU tests' kernels under every schedule in TEST_SCHEDULES (what the device run carries)")
    sub.add_parser("smoke", help="a few small calls against the reference, with diagnostics (GPU)")
    sass = sub.add_parser("sass", help="static SASS counts of the consumers' tile loop (interior path) per variant "
                                       "(no GPU)")
    sass.add_argument("variants", nargs="*", help="variant tags (default: the timed schedules)")
    bench = sub.add_parser("bench", help="forward TFLOPS against Triton and SDPA (GPU)")
    bench.add_argument("--seq-len", type=int, default=16384)
    bench.add_argument("--heads", type=int, default=32)
    bench.add_argument("--iters", type=int, default=5)
    bench.add_argument("--budget", type=float, default=70.0, help="seconds; later rows are skipped")
    ab = sub.add_parser("ab", help="kernels named by their tags timed against each other in rotating, repeated "
                                   "rounds, each checked against the float32 reference (GPU)")
    ab.add_argument("tags", nargs="+", help="variant tags, e.g. d64_dense_pormz3 d64_dense_prmz3 (the first is the "
                                            "baseline of the speed-ups)")
    ab.add_argument("--seq-len", type=int, default=16384)
    ab.add_argument("--heads", type=int, default=32)
    ab.add_argument("--iters", type=int, default=5, help="launches per timing (their median)")
    ab.add_argument("--repeats", type=int, default=5, help="timings per kernel, in rotating order")
    ab.add_argument("--noncausal", action="store_true")
    ab.add_argument("--against", metavar="DIR",
                    help="also time each tag built from the CUDA sources in DIR (e.g. an older checkout's "
                         "modelopt_sparse/kernels/hopper), as the row TAG@DIR")
    ph = sub.add_parser("phases", help="cycles per tile step of each phase (data wait, ping-pong turn, issue, "
                                       "Q.K^T wait, softmax, tail), from the kernels' clock-stamp builds (GPU)")
    ph.add_argument("tags", nargs="+", help="variant tags as for ab (each runs with its clock stamps, tag flag c)")
    ph.add_argument("--seq-len", type=int, default=16384)
    ph.add_argument("--heads", type=int, default=32)
    ph.add_argument("--noncausal", action="store_true")
    ph.add_argument("--out", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.cmd == "phases":
        from .phases import main as phases_main

        return phases_main(args)
    return {"precompile": _precompile, "smoke": _smoke, "bench": _bench, "sass": _sass, "ab": ab_main}[args.cmd](args)
