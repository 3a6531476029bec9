"""Where do the engine's ~100 us per wave go in cta_overhead.py's 1-tile case? torch.profiler:
kernel durations on the GPU against the host-side time of the call."""
import os, time
import torch
import modelopt_sparse as mts
from torch.profiler import profile, ProfilerActivity

dev = torch.device("cuda")
B, D = 528, 128
for n_tiles in (1, 32):
    kv = 128 * n_tiles
    q = torch.randn(B * 128, 1, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(B * kv, 1, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    sq = torch.arange(B, device=dev, dtype=torch.int32) * 128
    lq = torch.full((B,), 128, device=dev, dtype=torch.int32)
    sk = torch.arange(B, device=dev, dtype=torch.int32) * kv
    lk = torch.full((B,), kv, device=dev, dtype=torch.int32)
    for backend in ("hopper", "triton"):
        fn = lambda: mts.attention(q, k, v, sq, lq, 128, False, None, sk, lk, kv, backend=backend,
                                   check_metadata=False, rows_covered=True)
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        host = (time.perf_counter() - t) / 20 * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 20 * 1e6
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"== tiles {n_tiles} {backend}: host {host:.1f} us/call (enqueue), wall {wall:.1f} us/call")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=60))
