"""Where a host-bound model forward spends its host time (GPU machine).

Builds the SmolLM2-135M shape (random weights, bf16), runs SDPA and our dense / 2:4
conversions eagerly, and reports per implementation: the wall time of one forward, the
host time spent inside the attention function per layer call (perf_counter around the
registered function), and the aten ops it issues; then a cProfile of our attention
function. Usage:

    python tools/profile_model_host.py [--batch 1] [--length 1024] [--forwards 20]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--forwards", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--decode", action="store_true", help="profile generate() (512 + 32 tokens) instead")
    args = parser.parse_args()

    from modelopt_sparse.bench.model import measure
    from transformers import AttentionInterface
    from torch.utils._python_dispatch import TorchDispatchMode

    device = torch.device("cuda")
    base = measure.build_model("smollm2", False, device, torch.bfloat16, 0)
    ids = torch.randint(3, 1000, (args.batch, args.length), device=device)
    mapping = AttentionInterface._global_mapping

    class OpCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func).removeprefix("aten.")] += 1
            return func(*args, **(kwargs or {}))

    rows = []
    for impl in ("sdpa", "dense", "2:4"):
        model = measure.implementation(base, impl)
        name = "sdpa" if impl == "sdpa" else "modelopt_sparse"
        original = mapping[name]
        spent = [0.0, 0]

        def timed(*a, _f=original, **kw):
            t0 = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0
                spent[1] += 1

        def run():
            with torch.no_grad():
                if args.decode:
                    model.generate(ids[:, :512], attention_mask=torch.ones_like(ids[:, :512]), max_new_tokens=32,
                                   min_new_tokens=32, do_sample=False)
                else:
                    model(ids, use_cache=False)

        for _ in range(3):
            run()
        torch.cuda.synchronize()
        mapping[name] = timed
        start = time.perf_counter()
        for _ in range(args.forwards):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.forwards * 1e3
        per_call = spent[0] / max(spent[1], 1) * 1e6
        calls = []

        def counted(*a, _f=original, **kw):
            with OpCount() as c:
                r = _f(*a, **kw)
            calls.append(c.ops)
            return r

        mapping[name] = counted
        run()
        mapping[name] = original
        ops = calls[len(calls) // 2] if calls else collections.Counter()
        rows.append((impl, wall, per_call, spent[1] // args.forwards, sum(ops.values()), dict(ops)))
        if impl == "dense":
            prof = cProfile.Profile()
            prof.enable()
            run()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        model = None  # freed before the next implementation is built (not `del`: run() reads it)
    print(f"{'impl':6s} {'ms/forward':>10s} {'attn us/call':>12s} {'calls':>6s} {'aten ops/call':>13s}  ops")
    for impl, wall, per_call, calls_per, nops, ops in rows:
        print(f"{impl:6s} {wall:10.2f} {per_call:12.1f} {calls_per:6d} {nops:13d}  {ops}")


if __name__ == "__main__":
    main()
