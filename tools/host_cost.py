"""Where the host time of one small ``mts.attention`` call goes (GPU machine).

Times N back-to-back calls at a tiny shape (host-bound: the GPU finishes each kernel long
before the next launch is issued), for SDPA and for our call with parts of the path
switched off, then prints the top functions of a cProfile run. Usage:

    python tools/host_cost.py [--calls 2000] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def _per_call_us(fn, calls):
    """The fastest of 20 blocks of back-to-back calls, µs per call (gc off inside a block):
    on a shared host the minimum repeats from run to run, medians drift."""
    import gc

    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    per_block, best = max(1, calls // 20), float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            start = time.perf_counter()
            for _ in range(per_block):
                fn()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / per_block)
    finally:
        gc.enable()
    return best * 1e6


def _profiled(fn, calls) -> cProfile.Profile:
    """A cProfile run of ``calls`` back-to-back calls of ``fn``."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    return profiler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import modelopt_sparse as mts
    from modelopt_sparse.kernels import api
    from modelopt_sparse.kernels import triton_attention as ta
    from modelopt_sparse.kernels.triton_attention import configs, launch
    from modelopt_sparse.kernels.reference import SparseParams

    q, k, v = (torch.randn(16, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    starts = torch.zeros(1, dtype=torch.int32, device="cuda")
    lens = torch.full((1,), 16, dtype=torch.int32, device="cuda")
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    params = SparseParams(True, 0.125, 0, 4, 0, 64, "threshold")
    fwd_args = (q, k, v, starts, lens, starts, lens, 16, 16, True, True, False,
                True, 0.125, 0, 4, 0, 64, "threshold")
    rows = []
    with torch.no_grad():
        rows.append(("sdpa", _per_call_us(
            lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True), args.calls)))
        rows.append(("mts.attention dense", _per_call_us(
            lambda: mts.attention(q, k, v, starts, lens, 16), args.calls)))
        rows.append(("mts.attention dense, check_metadata=False", _per_call_us(
            lambda: mts.attention(q, k, v, starts, lens, 16, check_metadata=False), args.calls)))
        rows.append(("mts.attention 2:4", _per_call_us(
            lambda: mts.attention(q, k, v, starts, lens, 16, sparsity_n=2, sparsity_m=4), args.calls)))
        rows.append(("triton_attention (after validation)", _per_call_us(
            lambda: ta.triton_attention(q, k, v, starts, lens, 16, starts, lens, 16, params), args.calls)))
        rows.append(("_launch_forward", _per_call_us(lambda: launch._launch_forward(*fwd_args), args.calls)))
        launcher, configs._fwd.launcher = configs._fwd.launcher, None  # as MODELOPT_SPARSE_DIRECT_LAUNCH=0
        rows.append(("_launch_forward, JITFunction.run", _per_call_us(lambda: launch._launch_forward(*fwd_args),
                                                                        args.calls)))
        configs._fwd.launcher = launcher
        rows.append(("validation only (api checks)", _per_call_us(lambda: (
            api._check_tensors(q, k, v), api._check_metadata(q, k, starts, lens, 16, starts, lens, 16)), args.calls)))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        q4g, k4g, v4g = (t.transpose(0, 1)[None] for t in (qg, kg, vg))
        kept = []
        with torch.enable_grad():  # autograd records the call (the model benchmark's host case, autograd)
            rows.append(("sdpa, q/k/v require grad", _per_call_us(
                lambda: torch.nn.functional.scaled_dot_product_attention(q4g, k4g, v4g, is_causal=True),
                args.calls)))
            rows.append(("mts.attention dense, q/k/v require grad", _per_call_us(
                lambda: mts.attention(qg, kg, vg, starts, lens, 16), args.calls)))
            rows.append(("  same, outputs kept (no graph teardown)", _per_call_us(
                lambda: kept.append(mts.attention(qg, kg, vg, starts, lens, 16)), args.calls)))
            kept.clear()
            rows.append(("  triton_attention (after validation)", _per_call_us(
                lambda: ta.triton_attention(qg, kg, vg, starts, lens, 16, starts, lens, 16, params), args.calls)))
            rows.append(("  _forward_launch with lse (no node)", _per_call_us(
                lambda: launch._forward_launch(q, k, v, starts, lens, starts, lens, 16, 16, True, False, params,
                                               True), args.calls)))

            class _Identity(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, y, z):
                    ctx.save_for_backward(x, y, z)
                    return x.view_as(x)

                @staticmethod
                def backward(ctx, g):
                    return g, None, None

            from modelopt_sparse.kernels.triton_attention import ops as ta_ops

            fwd_call = (starts, lens, starts, lens, (16, 16, True, True, False, params))

            class _LaunchOnly(torch.autograd.Function):
                """The eager Function's forward without its save_for_backward."""

                @staticmethod
                def forward(ctx, q_, k_, v_, sinks, call):
                    return launch._forward_launch(q_, k_, v_, *call[:4], 16, 16, True, False, params, True)[0]

                @staticmethod
                def backward(ctx, g):
                    return g, None, None, None, None

            rows.append(("  _EagerAttention.apply direct", _per_call_us(
                lambda: ta_ops._EagerAttention.apply(qg, kg, vg, None, fwd_call), args.calls)))
            rows.append(("  a Function that launches, saves nothing", _per_call_us(
                lambda: _LaunchOnly.apply(qg, kg, vg, None, fwd_call), args.calls)))
            rows.append(("  an empty autograd.Function (3 inputs)", _per_call_us(
                lambda: _Identity.apply(qg, kg, vg), args.calls)))
            rows.append(("  qg * 1 (one aten op with a node)", _per_call_us(lambda: qg * 1, args.calls)))
            graph_profiler = _profiled(lambda: mts.attention(qg, kg, vg, starts, lens, 16), args.calls)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as torch_prof:
                for _ in range(50):
                    mts.attention(qg, kg, vg, starts, lens, 16)
                for _ in range(50):
                    torch.nn.functional.scaled_dot_product_attention(q4g, k4g, v4g, is_causal=True)
                torch.cuda.synchronize()
        print(torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        print("cProfile of the autograd path:")
        pstats.Stats(graph_profiler).sort_stats("tottime").print_stats(args.top)
        profiler = _profiled(lambda: mts.attention(q, k, v, starts, lens, 16), args.calls)
    print("cProfile of the inference path:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    print(f"{'path':45s} {'us/call':>8s}")
    for name, us in rows:
        print(f"{name:45s} {us:8.1f}")


if __name__ == "__main__":
    main()
