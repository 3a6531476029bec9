"""Compile every kernel a benchmark run will launch, in parallel, before it starts.

Triton compiles on first launch, one kernel at a time; on the 16-core H200 host a pool of
processes fills the on-disk cache in a fraction of that time. Run it with the same
MODELOPT_SPARSE_AUTOTUNE setting as the benchmark (0: the default config of each case):

    MODELOPT_SPARSE_AUTOTUNE=0 python tools/precompile.py --head-dims 64 128 --causal both
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modelopt_sparse.bench import OUR_VARIANTS  # noqa: E402


def _compile(job):
    import torch

    from modelopt_sparse.kernels import attention

    variant, head_dim, causal, heads, gqa = job
    seq = 512  # specialises like any multiple of 16; small enough to launch in no time
    q = torch.randn(seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(seq, heads // gqa, head_dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    start = torch.tensor([0], dtype=torch.int32, device="cuda")
    length = torch.tensor([seq], dtype=torch.int32, device="cuda")
    try:
        out = attention(q, k, v, start, length, seq, is_causal=causal, **OUR_VARIANTS[variant])
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # reported, and the benchmark will report it again
        return f"{job}: {type(exc).__name__}: {str(exc)[:200]}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--causal", choices=("both", "causal", "noncausal"), default="both")
    p.add_argument("--variants", nargs="+", default=list(OUR_VARIANTS), choices=list(OUR_VARIANTS))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--gqa", type=int, default=1)
    p.add_argument("--workers", type=int, default=14)
    args = p.parse_args()
    causal = {"both": (True, False), "causal": (True,), "noncausal": (False,)}[args.causal]
    jobs = list(itertools.product(args.variants, args.head_dims, causal, [args.heads], [args.gqa]))
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        errors = [e for e in pool.map(_compile, jobs) if e]
    print(f"precompiled {len(jobs) - len(errors)}/{len(jobs)} cases", *errors, sep="\n")


if __name__ == "__main__":
    main()
