"""Where the time of a static-cache compiled generate() goes, ours vs SDPA (issue 14).

`bench model --cases generate-static` reports tokens/s over whole calls: the eager prefill,
then per decode step the eager host work of generate() (including transformers building
the next step's mask with the model's mask function, outside the compiled call) and the
compiled forward (CUDA graph replays under mode="reduce-overhead"). This script builds the
same SmolLM2-135M shape (random bf16 weights), compiles as the bench does, and for one
call per implementation reports:

* the wall time of the call, of its prefill (the first forward) and per decode step;
* the host time spent in ``create_masks_for_generate`` per step (our mask function runs
  there eagerly every step) and in the compiled forward call per step;
* GPU kernel time per decode step, top kernels by total time (torch.profiler), and the
  decode kernel's launches per step (split or not);
* Dynamo recompiles, graph breaks and Inductor's CUDA-graph skips, which would turn graph
  replays into per-kernel launches.

Usage (GPU machine):

    python tools/profile_generate_static.py [--batch 1] [--prompt 512] [--new 128] \
        [--impls sdpa dense] [--trace DIR] [--old-split-rule]

On the CPU (smoke test only): ``--device cpu --backend aot_eager --tiny``.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--impls", nargs="+", default=["sdpa", "dense"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (CompileConfig)")
    parser.add_argument("--tiny", action="store_true", help="the bench's tiny SmolLM2 shape")
    parser.add_argument("--warmup", type=int, default=2, help="generate calls before the profiled one")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--trace", default=None, help="write a Chrome trace per implementation into DIR")
    parser.add_argument("--old-split-rule", action="store_true",
                        help="compiled decode launches split as eager ones do (the rule before issue 14's change)")
    args = parser.parse_args()
    if args.old_split_rule:
        from modelopt_sparse.kernels import triton_decode as td

        td.GRAPH_SINGLE_PASS_MAX_KEYS, td.GRAPH_MIN_KEYS_PER_SPLIT = td.SINGLE_PASS_MAX_KEYS, td.MIN_KEYS_PER_SPLIT

    import transformers.generation.utils as gen_utils
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import CompileConfig, GenerationConfig

    from modelopt_sparse.bench.model import measure

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base = measure.build_model("smollm2", args.tiny, device, torch.bfloat16, 0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    mask = torch.ones_like(ids)

    timings: dict = collections.defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **k):
            if torch.compiler.is_compiling():  # model.forward inside the compiled call
                return fn(*a, **k)
            with record_function(name):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    timings[name].append(time.perf_counter() - start)
        return wrapper

    gen_utils.create_masks_for_generate = timed("mts::create_masks_for_generate", gen_utils.create_masks_for_generate)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for impl in args.impls:
        model = measure.implementation(base, impl)
        compile_config = CompileConfig(fullgraph=True, backend=args.backend)
        if not cuda:
            compile_config._compile_all_devices = True
        config = GenerationConfig(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, num_beams=1,
                                  eos_token_id=None, pad_token_id=0, cache_implementation="static",
                                  compile_config=compile_config)
        torch._dynamo.reset()
        counters.clear()
        model.generate(ids, attention_mask=mask, generation_config=config)  # compiles the decode step
        compiled = vars(model).get("_compiled_call")
        starts = []
        if compiled is None:
            print(f"{impl}: transformers did not compile the decode step")
        else:  # times the compiled call itself (graph replay + its Python wrapper)
            timed_call = timed("mts::compiled_forward", compiled)

            def compiled_call(*a, **k):
                starts.append(time.perf_counter())
                return timed_call(*a, **k)

            model._compiled_call = compiled_call
        for _ in range(max(1, args.warmup - 1)):  # the same objects as the profiled call
            model.generate(ids, attention_mask=mask, generation_config=config)
        sync()
        warm_counters = {k: dict(v) for k, v in counters.items()}
        timings.clear()
        starts.clear()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model.generate(ids, attention_mask=mask, generation_config=config)
            sync()
            wall = time.perf_counter() - start
        steps = len(timings["mts::compiled_forward"]) or max(1, args.new - 1)
        masks = timings["mts::create_masks_for_generate"]
        # The call's start to the first compiled step: setup, the eager prefill, the first mask.
        prefill = [starts[0] - start] if starts else [0.0]
        print(f"\n=== {impl}, batch {args.batch}, {args.prompt} + {args.new} tokens: {wall * 1e3:.1f} ms per call, "
              f"{args.batch * args.new / wall:.1f} tok/s")
        print(f"  before the first decode step (setup + eager prefill): {sum(prefill) * 1e3:.2f} ms")
        print(f"  decode steps: {steps}; per step: wall {(wall - sum(prefill)) / steps * 1e3:.3f} ms, "
              f"compiled call {sum(timings['mts::compiled_forward']) / steps * 1e3:.3f} ms (host), "
              f"mask building {sum(masks) / max(1, len(masks)) * 1e3:.3f} ms x {len(masks)} calls")
        events = prof.key_averages()
        gpu = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        gpu_total = sum(e.self_device_time_total for e in gpu)
        print(f"  GPU kernel time per decode step (whole call / steps): {gpu_total / steps:.1f} us")
        for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"    {e.self_device_time_total / steps:9.2f} us/step  {e.count / steps:6.2f} launches/step  "
                  f"{e.key[:90]}")
        api = {e.key: e for e in events if e.key in ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel",
                                                     "cuLaunchKernelEx", "cudaMemcpyAsync", "cudaEventRecord",
                                                     "cudaEventQuery", "cudaHostAlloc")}
        for name, e in sorted(api.items()):
            print(f"    host API {name}: {e.count / steps:.2f} per step, {e.cpu_time_total / steps:.1f} us/step")
        print(f"  dynamo/inductor counters after warm-up: "
              f"recompiles {sum(warm_counters.get('recompiles', {}).values())}, "
              f"graph breaks {sum(warm_counters.get('graph_break', {}).values())}, "
              f"cudagraph skips {dict(warm_counters.get('inductor', {})).get('cudagraph_skips', 0)}; "
              f"during the profiled call: recompiles {sum(counters['recompiles'].values())}, "
              f"unique graphs {counters['stats'].get('unique_graphs', 0)}")
        if args.trace:
            prof.export_chrome_trace(f"{args.trace}/generate_static_{impl}_b{args.batch}.json")
        del model
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
