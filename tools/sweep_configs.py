"""Time every launch config of every kernel on the GPU, one at a time (device-time tool).

The autotuner only reports the winner; this prints the whole grid so that the defaults and
the pruning rules can be chosen from numbers. Forward configs are timed on the forward
alone; a backward config is timed as fwd+bwd (and fwd+bwd minus the forward), with the
forward and the other backward kernel on the configs they take with autotuning off.

Compilation dominates a cold run, so phase 1 compiles every (kernel, variant, config) in a
pool of processes on a small problem (same specialisation as the large one), and phase 2
times them serially on the real shape:

    python tools/sweep_configs.py --seq-len 16384 --head-dim 128 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "dense": dict(sparsity_n=0),
    "2:4": dict(sparsity_n=2, sparsity_m=4),
    "4:8": dict(sparsity_n=4, sparsity_m=8),
    "8:16": dict(sparsity_n=8, sparsity_m=16),
    "2:4-index": dict(sparsity_n=2, sparsity_m=4, tie_break="index"),
}
GRID = {
    "fwd": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
    "dkdv": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2)],
}


def _pin(kind, shape):
    import triton
    from modelopt_sparse.kernels.triton_attention import configs

    tuner = {"fwd": configs._fwd, "dkdv": configs._dkdv, "dq": configs._dq}[kind]
    bm, bn, w, s = shape
    tuner.autotuner.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    tuner.forget()


def _pin_defaults():
    """Every kernel back on the configs a launch with autotuning off would take (the
    kernels' own preference order and pruning, which depend on head dim and pattern)."""
    from modelopt_sparse.kernels.triton_attention import configs

    for kind, tuner in (("fwd", configs._fwd), ("dkdv", configs._dkdv), ("dq", configs._dq)):
        tuner.autotuner.configs = configs._configs(kind)
        tuner.forget()


def _inputs(seq, heads, head_dim, causal, train):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(train)
    start = torch.tensor([0], dtype=torch.int32, device="cuda")
    length = torch.tensor([seq], dtype=torch.int32, device="cuda")
    return q, k, v, start, length


NARROW = False  # --narrow: also time sparse tiles with BLOCK_N < 8*M (correct, usually slower)


def _fits(kind, variant, shape):
    m = VARIANTS[variant].get("sparsity_m", 4)
    sparse = VARIANTS[variant]["sparsity_n"] > 0
    return not (sparse and shape[1] < (m if NARROW else 8 * m))


def _jobs():
    for kind, shapes in GRID.items():
        for variant in VARIANTS:
            for shape in shapes:
                if _fits(kind, variant, shape):
                    yield kind, variant, shape


def _run(kind, variant, shape, seq, heads, head_dim, causal, time_it):
    import torch
    import triton
    from modelopt_sparse.kernels import attention

    _pin_defaults()
    if shape is not None:
        _pin(kind, shape)
    train = kind != "fwd"
    q, k, v, start, length = _inputs(seq, heads, head_dim, causal, train)
    kw = dict(VARIANTS[variant], is_causal=causal)
    do = torch.randn_like(q)

    def fwd():
        return attention(q, k, v, start, length, seq, **kw)

    def fwd_bwd():
        fwd().backward(do)

    fn = fwd_bwd if train else fwd
    fn()
    torch.cuda.synchronize()
    if not time_it:
        return None
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=[q, k, v] if train else None,
                                   return_mode="median")


def _compile(job, args):
    kind, variant, shape = job
    try:
        _run(kind, variant, shape, 512, 2, args.head_dim, args.causal, False)
        return None
    except Exception as exc:  # reported in phase 2
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--kinds", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--narrow", action="store_true", help="also sparse tiles with BLOCK_N < 8*M")
    p.add_argument("--tma", action="store_true",
                   help="dK/dV with tensor-descriptor loads (experimental, MODELOPT_SPARSE_TMA=1)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    global NARROW
    NARROW = args.narrow
    os.environ["MODELOPT_SPARSE_AUTOTUNE"] = "0"
    os.environ["MODELOPT_SPARSE_TMA"] = "1" if args.tma else "0"
    jobs = [j for j in _jobs() if j[0] in args.kinds and j[1] in args.variants]
    import multiprocessing as mp

    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        errors = dict(zip(jobs, pool.map(_compile, jobs, [args] * len(jobs))))
    flops = 4 * args.seq_len**2 * args.heads * args.head_dim * (0.5 if args.causal else 1.0)
    base_fwd = {}
    rows = []
    for variant in args.variants:
        base_fwd[variant] = _run("fwd", variant, None, args.seq_len, args.heads, args.head_dim, args.causal, True)
    for job in jobs:
        kind, variant, shape = job
        row = dict(kind=kind, variant=variant, shape=shape)
        if errors[job]:
            row["error"] = errors[job]
        else:
            try:
                ms = _run(kind, variant, shape, args.seq_len, args.heads, args.head_dim, args.causal, True)
                row["ms"] = ms
                if kind == "fwd":
                    row["tflops"] = flops / ms / 1e9
                else:
                    row["bwd_ms"] = ms - base_fwd[variant]
                    row["fwdbwd_tflops"] = 3.5 * flops / ms / 1e9
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nS={args.seq_len} H={args.heads} D={args.head_dim} causal={args.causal}  (BM, BN, warps, stages)")
    for kind in args.kinds:
        for variant in args.variants:
            cells = [r for r in rows if r["kind"] == kind and r["variant"] == variant]
            text = "  ".join(
                f"{r['shape']}: " + (f"{r.get('tflops', r.get('fwdbwd_tflops')):.0f}" if "ms" in r else "err")
                for r in cells)
            print(f"{kind:5} {variant:10} {text}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
