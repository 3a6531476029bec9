"""Interleaved, repeated A/B timing of engine kernels: ``python -m
modelopt_sparse.kernels.hopper_attention ab TAG TAG [...]`` (GPU).

The engine table (``bench``) times each kernel once, and within one run the same kernel read
up to 8 % apart (session 14: 2:4 at 502-542 TFLOPS), so a single-row difference under ~3 %
decides nothing. Here each kernel, named by its :attr:`Variant.tag` (``d64_dense_pormz3``),
is timed ``repeats`` times in rotating order (each time the median of ``iters`` launches,
event timing), and every later tag is compared with the first by the median of the
per-repeat time ratios: a drift of the clock or of the GPU's temperature moves both sides of
a pair alike. Each kernel's output is also checked once against the float32 reference.

``--against DIR`` also times each tag built from the CUDA sources in DIR (e.g. an older
checkout's ``modelopt_sparse/kernels/hopper``), in the same rotation, as the row ``TAG@DIR``:
a change to the kernel's source compared with the source before it, in one process. Both
sources must take the same kernel arguments (the module checks the parameter block's size).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..reference import SparseParams
from .variants import _SCHEDULE_ENV, Variant, _parse_tag, variant_for

# The switches besides the schedule's that select a kernel (variant_for), by the key a
# schedule dict of the engine table gives them.
_OTHER_SWITCHES = {
    "wg3": "MODELOPT_SPARSE_HOPPER_D64_WG3",
    "sparse_pv": "MODELOPT_SPARSE_HOPPER_SPARSE_PV",
    "tma3d": "MODELOPT_SPARSE_HOPPER_TMA3D",
    "split_loop": "MODELOPT_SPARSE_HOPPER_SPLIT_LOOP",
    "mid_wait": "MODELOPT_SPARSE_HOPPER_MID_WAIT",
    "producer_suspends": "MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS",
    "mma_rowsum": "MODELOPT_SPARSE_HOPPER_MMA_ROWSUM",
    "bn64": "MODELOPT_SPARSE_HOPPER_BN64",
    "pairwise": "MODELOPT_SPARSE_HOPPER_PAIRWISE",
    "half_select": "MODELOPT_SPARSE_HOPPER_HALF_SELECT",
    "row_pipe": "MODELOPT_SPARSE_HOPPER_ROW_PIPE",
    "phase_clocks": "MODELOPT_SPARSE_HOPPER_PHASE_CLOCKS",
    "kv_pretest": "MODELOPT_SPARSE_HOPPER_KV_PRETEST",
}


# Every switch that selects a kernel (what a table saves before it sets them, and restores).
SWITCH_NAMES = tuple(_SCHEDULE_ENV.values()) + tuple(_OTHER_SWITCHES.values())


def schedule_switches(sched: dict) -> dict:
    """The MODELOPT_SPARSE_HOPPER_* switches of a schedule dict (the engine table's rows: every
    SCHEDULE_FIELDS key, and ``wg3``, ``sparse_pv``, ``tma3d``, ``split_loop``, ``mid_wait``,
    ``producer_suspends``, ``mma_rowsum``, ``bn64``, ``pairwise``, ``half_select``, ``row_pipe``, ``phase_clocks``, ``kv_pretest``, off when absent)."""
    env = {name: str(int(bool(sched[field]))) for field, name in _SCHEDULE_ENV.items()}
    env.update({name: str(int(bool(sched.get(key, False)))) for key, name in _OTHER_SWITCHES.items()})
    return env


def variant_env(v: Variant) -> dict:
    """The switches under which a call with ``v``'s head dim, pattern, tie rule and dtype runs
    ``v``."""
    sched = {field: getattr(v, field) for field in _SCHEDULE_ENV}
    return schedule_switches(dict(sched, wg3=v.consumers == 3, sparse_pv=v.sparse_pv, tma3d=v.tma3d,
                                  split_loop=v.split_loop, mid_wait=v.mid_wait,
                                  producer_suspends=v.producer_suspends, mma_rowsum=v.mma_rowsum,
                                  bn64=v.bn64, pairwise=v.pairwise, half_select=v.half_select,
                                  row_pipe=v.row_pipe, phase_clocks=v.phase_clocks, kv_pretest=v.kv_pretest))


@contextlib.contextmanager
def switched(env: dict):
    """Set ``env`` in os.environ within, and put back what was there."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def call_params(v: Variant, causal: bool) -> tuple[SparseParams, torch.dtype]:
    """The call that runs ``v``: the engine table's (dense window 64 with N:M, no sinks)."""
    params = SparseParams(causal, v.head_dim ** -0.5, v.sparsity_n, v.sparsity_m, 0, 64 if v.sparsity_n else 0,
                          "index" if v.tie_index else "threshold")
    return params, (torch.float16 if v.fp16 else torch.bfloat16)


def parse_variants(tags) -> list[Variant]:
    """Each tag as the kernel that runs (canonical); a tag the switches cannot select (a
    mask-probe build) or that names one kernel twice raises ValueError before any launch."""
    variants = []
    for tag in tags:
        v = _parse_tag(tag)
        if v.probe:
            raise ValueError(f"{tag}: mask-probe builds are not timed")
        v = v.canonical()
        params, dtype = call_params(v, True)
        with switched(variant_env(v)):
            chosen = variant_for(params, dtype, v.head_dim)
        if chosen != v:
            raise ValueError(f"{tag}: the switches select {chosen.tag}, not {v.tag}")
        if v in variants:
            raise ValueError(f"{tag}: the same kernel as an earlier tag ({v.tag})")
        variants.append(v)
    return variants


def run_ab(tags, *, seq_len: int = 16384, heads: int = 32, iters: int = 5, repeats: int = 5, causal: bool = True,
           device: str = "cuda", against: str | None = None) -> list[dict]:
    """Time the kernels named by ``tags`` (rows in tag order, each followed by its build from
    the sources in ``against`` when given; see the module docstring). ``device="cpu"`` only
    serves the CPU test of this code (with a stubbed forward)."""
    from ..api import attention as api_attention
    from . import tools

    if repeats < 1 or iters < 1:
        raise ValueError(f"repeats and iters must be at least 1, got {repeats} and {iters}")
    variants = parse_variants(tags)
    if against is not None and not os.path.isfile(os.path.join(against, "nm_attention_fwd.cu")):
        raise ValueError(f"--against {against}: no nm_attention_fwd.cu there")
    sources = [None] if against is None else [None, against]
    variants = [(v, src) for v in variants for src in sources]
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    lens = torch.tensor([seq_len], dtype=torch.int32, device=dev)
    inputs, runs, rows = {}, [], []
    for v, src in variants:
        params, dtype = call_params(v, causal)
        if (v.head_dim, dtype) not in inputs:
            inputs[v.head_dim, dtype] = [torch.randn(seq_len, heads, v.head_dim, device=dev, generator=g).to(dtype)
                                         for _ in range(3)]
        q, k, v_in = inputs[v.head_dim, dtype]

        def run(q=q, k=k, v_in=v_in, params=params, src=src):
            extra = {} if src is None else {"source_dir": src}
            return tools.forward(q, k, v_in, zero, lens, seq_len, zero, lens, params, q_covered=True,
                                 with_lse=False, **extra)[0]

        with switched(dict(variant_env(v), MODELOPT_SPARSE_HOPPER_CHECK="1")):  # a deadlock raises here
            out = run()
        ref = tools._exact_tail(api_attention, q, k, v_in, params)
        err = ((out[-ref.shape[0]:].float() - ref).norm() / ref.norm()).item()
        flops = 4.0 * seq_len * seq_len * heads * v.head_dim / (2 if causal else 1)
        runs.append(run)
        rows.append({"tag": v.tag if src is None else f"{v.tag}@{src}", "error": err, "ok": err < 5e-3,
                     "flops": flops, "ms": []})
    for r in range(repeats):
        for i in _rotated(len(variants), r):
            with switched(variant_env(variants[i][0])):
                rows[i]["ms"].append(tools.event_ms(runs[i], iters, dev))
    for row in rows:
        times = sorted(row["ms"])
        row["median_ms"] = times[len(times) // 2]
        row["tflops"] = row["flops"] / row["median_ms"] / 1e9
        ratios = sorted(b / a for a, b in zip(row["ms"], rows[0]["ms"]))  # first's time / this one's: speed-up
        row["speedup_vs_first"] = ratios[len(ratios) // 2]
        row["speedup_range"] = (ratios[0], ratios[-1])
    return rows


def _rotated(n: int, round_index: int) -> list[int]:
    """0..n-1 rotated by one per round: no kernel always runs first or after the same other."""
    shift = round_index % n
    return list(range(shift, n)) + list(range(shift))


def print_table(rows, seq_len: int, heads: int, causal: bool) -> None:
    print(f"\nA/B, S={seq_len}, H={heads}, {'causal' if causal else 'non-causal'} forward, "
          f"{len(rows[0]['ms'])} repeats in rotating order; speed-up: the first tag's time / this one's, "
          f"median (range) over the repeats; 'vs fp32' as in the engine table")
    print(f"{'kernel':<24} {'median ms':>10} {'TFLOPS':>8} {'min-max TFLOPS':>17} {'speed-up vs first':>24}  vs fp32")
    for row in rows:
        lo, hi = row["flops"] / max(row["ms"]) / 1e9, row["flops"] / min(row["ms"]) / 1e9
        rng = row["speedup_range"]
        print(f"{row['tag']:<24} {row['median_ms']:>10.3f} {row['tflops']:>8.1f} {lo:>8.1f}-{hi:<8.1f} "
              f"{row['speedup_vs_first']:>10.3f} ({rng[0]:.3f}-{rng[1]:.3f})  {row['error']:.1e}"
              f"{'' if row['ok'] else '  WRONG'}")


def main(args) -> int:
    rows = run_ab(args.tags, seq_len=args.seq_len, heads=args.heads, iters=args.iters, repeats=args.repeats,
                  causal=not args.noncausal, device=getattr(args, "device", "cuda"),
                  against=getattr(args, "against", None))
    print_table(rows, args.seq_len, args.heads, not args.noncausal)
    return 0 if all(row["ok"] for row in rows) else 1
