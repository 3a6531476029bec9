"""Where one benchmark case spends its time: GPU kernels against host enqueue.

For each variant it prints the do_bench median (as the benchmark measures it), the host
time to enqueue one call (no synchronisation; if it reaches the median, the case is
host-bound and kernel work does not show), the GPU time of each kernel from
torch.profiler, and any host-device synchronisation seen in one call.

    python tools/profile_case.py --seq-len 4096 --head-dim 64 --causal --mode fwdbwd
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from modelopt_sparse.bench import OUR_VARIANTS  # noqa: E402
from modelopt_sparse.kernels import attention  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ", "cudaMemcpyAsync",
              "cudaEventSynchronize")


def _case(variant, s, d, heads, causal, mode):
    train = mode == "fwdbwd"
    q, k, v = (torch.randn(s, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=train)
               for _ in range(3))
    start = torch.zeros(1, dtype=torch.int32, device="cuda")
    length = torch.full((1,), s, dtype=torch.int32, device="cuda")
    grad_out = torch.randn_like(q)

    def fn(split=None):
        t0 = time.perf_counter()
        out = attention(q, k, v, start, length, s, is_causal=causal, **OUR_VARIANTS[variant])
        t1 = time.perf_counter()
        if train:
            out.backward(grad_out)
        if split is not None:
            split.append((t1 - t0, time.perf_counter() - t1))

    return fn, ([q, k, v] if train else [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd")
    p.add_argument("--variants", nargs="+", default=["dense", "2:4", "8:16"], choices=list(OUR_VARIANTS))
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="also print the N Python functions with the most cumulative host time per call")
    a = p.parse_args()
    flops = 4.0 * a.seq_len**2 * a.heads * a.head_dim * (0.5 if a.causal else 1) * (3.5 if a.mode == "fwdbwd" else 1)
    print(f"{a.mode} {'causal' if a.causal else 'noncausal'} S={a.seq_len} D={a.head_dim} H={a.heads} bf16")
    for variant in a.variants:
        fn, grads = _case(variant, a.seq_len, a.head_dim, a.heads, a.causal, a.mode)
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, grad_to_none=grads or None, return_mode="median")
        torch.cuda.synchronize()
        reps = 30
        split = []
        t0 = time.perf_counter()
        for _ in range(reps):
            for g in grads:
                g.grad = None
            fn(split)
        host_ms = (time.perf_counter() - t0) / reps * 1e3
        host_fwd_ms, host_bwd_ms = (sum(x) / reps * 1e3 for x in zip(*split))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            for g in grads:
                g.grad = None
            fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / reps * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                for g in grads:
                    g.grad = None
                fn()
            torch.cuda.synchronize()
        gpu = collections.Counter()
        syncs = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                gpu[e.name[:60]] += e.device_time / 5 / 1e3
            elif any(e.name.startswith(s.strip()) for s in SYNC_CALLS):
                syncs[e.name] += 1 / 5
        print(f"\n[{variant}] do_bench {ms:.3f} ms ({flops / ms / 1e9:.1f} TF)   host enqueue {host_ms:.3f} ms/call"
              f" (forward {host_fwd_ms:.3f}, backward {host_bwd_ms:.3f})"
              f"   back-to-back wall {wall_ms:.3f} ms/call   GPU kernels {sum(gpu.values()):.3f} ms")
        for name, t in gpu.most_common(8):
            print(f"    {t:8.3f} ms  {name}")
        print("    syncs per call:", dict(syncs) or "none")
        if a.host_profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(reps):
                for g in grads:
                    g.grad = None
                fn()
            prof.disable()
            torch.cuda.synchronize()
            stats = pstats.Stats(prof)
            print("    host profile, cumulative us per call (profiler overhead included):")
            for (file, line, name), (_cc, _nc, tt, ct, _callers) in sorted(
                    stats.stats.items(), key=lambda kv: -kv[1][3])[: a.host_profile]:
                print(f"    {ct / reps * 1e6:8.1f} cum {tt / reps * 1e6:8.1f} own  {os.path.basename(file)}:{line}({name})")


if __name__ == "__main__":
    main()
