"""The Python-side host cost of one small ``mts.attention`` call, without a GPU (or with one).

tools/host_cost.py times real launches on a GPU. Here the forward kernel is stubbed out
(:func:`stub_forward_kernel`: the tuned kernel ``launch._fwd`` becomes one whose launches
and launch plans do nothing), so what is timed is everything Python and PyTorch do around
the launch: validation, argument packing, the plan lookup, output allocations and, when
autograd records the call, its node. The call is the model benchmark's host case (1x16
tokens, 4 heads, D=64, bf16, backend="triton"), timed under no_grad and with q, k, v
requiring grad. On a CPU-only machine it runs on CPU tensors (TRITON_INTERPRET=1 lets
backend="triton" take them; nothing is interpreted: the kernel is stubbed).

    python tools/host_cost_cpu.py [--calls 5000] [--top 25] [--profile]

Prints µs per call (the fastest of 50 blocks: on a shared machine medians drift), the aten
ops of one call (TorchDispatchMode) and, with ``--profile``, the top functions of a
cProfile run of the autograd path. tests/test_host_path.py uses :func:`stub_forward_kernel`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import pstats
import time

import torch

if not torch.cuda.is_available():  # backend="triton" on CPU tensors; before any kernel import (as tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _NoopPlan:
    """A launch plan that launches nothing."""

    def __init__(self):
        self.launches = 0

    def __call__(self, pointers):
        self.launches += 1


class _NoopLauncher:
    _verify = False


class StubForwardKernel:
    """Stands in for ``configs._fwd``: launches nothing and hands out no-op launch plans, so
    the plan fast path of ``_forward_launch`` is taken as on a GPU after the first call."""

    def __init__(self):
        self.launcher = _NoopLauncher()
        self.launches = 0
        self.plans = []

    def __call__(self, grid, key, *args, **kwargs):
        self.launches += 1

    def plan(self, grid, key, args, kwargs, pointer_slots, plan_args=None):
        plan = _NoopPlan()
        self.plans.append(plan)
        return plan

    def plan_launches(self) -> int:
        return sum(p.launches for p in self.plans)


@contextlib.contextmanager
def stub_forward_kernel():
    """Within: the forward kernel is a :class:`StubForwardKernel` (yielded) and, without a
    GPU, CPU tensors count as being on the current device, so launch plans are made and used."""
    from modelopt_sparse.kernels.triton_attention import configs, launch

    saved = launch._fwd, launch._current_cuda_device, dict(configs._FORWARD_PLANS)
    stub = StubForwardKernel()
    configs._FORWARD_PLANS.clear()
    launch._fwd = stub
    if DEVICE == "cpu":
        launch._current_cuda_device = lambda: -1  # CPU tensors: get_device() == -1
    try:
        yield stub
    finally:
        launch._fwd, launch._current_cuda_device = saved[0], saved[1]
        configs._FORWARD_PLANS.clear()
        configs._FORWARD_PLANS.update(saved[2])


def host_case(grad: bool, pattern: int = 0):
    """The host case's call (modelopt_sparse.bench.model.measure.host_call_fn) with
    backend="triton", on the GPU if there is one: (zero-argument callable, (q, k, v)); the
    callable's ``metadata`` is its (b_start_loc, b_seq_len)."""
    import modelopt_sparse as mts

    s, h, d, dtype = 16, 4, 64, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, h, d, generator=gen).to(DEVICE, dtype).requires_grad_(grad) for _ in range(3))
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    lens = torch.full((1,), s, dtype=torch.int32, device=DEVICE)

    def call():
        return mts.attention(q, k, v, start, lens, s, is_causal=True, sparsity_n=pattern, sparsity_m=4,
                             num_sink_tokens=0, dense_window_size=64, backend="triton")

    call.metadata = (start, lens)
    return call, (q, k, v)


def aten_ops(fn) -> list[str]:
    """The aten ops one call of ``fn`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        fn()
    return ops.names


def per_call_us(fn, calls: int, rounds: int = 50) -> float:
    """The fastest of ``rounds`` blocks, in µs per call (garbage collection off, as timeit):
    on a shared CPU the minimum is what repeats from run to run; medians drift by 30 %."""
    for _ in range(max(50, calls // 20)):
        fn()
    per_block = max(1, calls // rounds)
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            for _ in range(per_block):
                fn()
            times.append((time.perf_counter_ns() - t0) / per_block / 1e3)
    finally:
        gc.enable()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--profile", action="store_true", help="cProfile the grad path")
    args = parser.parse_args()

    rows = []
    with stub_forward_kernel() as stub:
        for grad in (False, True):
            call, _ = host_case(grad)
            with torch.set_grad_enabled(grad):
                call()  # records the launch plan
                ops = aten_ops(call)
                us = per_call_us(call, args.calls)
            rows.append(("autograd" if grad else "no_grad", us, ops))
        if args.profile:
            call, _ = host_case(True)
            call()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                call()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        print(f"kernel launches outside plans: {stub.launches}, plan launches: {stub.plan_launches()}")
    print(f"{'mode':10s} {'us/call':>8s}  aten ops of one call")
    for mode, us, ops in rows:
        print(f"{mode:10s} {us:8.1f}  {len(ops)}: {', '.join(ops)}")
    print(f"autograd - no_grad: {rows[1][1] - rows[0][1]:.1f} us")


if __name__ == "__main__":
    main()
