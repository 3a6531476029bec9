"""Per-CTA fixed cost of the Hopper engine: one 128-row query block per sequence and per head,
non-causal, K/V of n tiles (128 keys each); B = 132 x waves sequences of one head, so each wave is
one CTA per SM. Time = a + b n per wave; the intercept a is what a CTA costs beyond its tiles
(launch, barriers, Q and the first K/V, pipeline fill and drain, epilogue). Triton beside it."""
import json, os
import torch
import modelopt_sparse as mts
from modelopt_sparse.kernels.hopper_attention.tools import event_ms

dev = torch.device("cuda")
D, WAVES = 128, 4
B = 132 * WAVES
rows = []
for n_tiles in (1, 2, 4, 8, 16, 32):
    kv = 128 * n_tiles
    g = torch.Generator(device=dev).manual_seed(n_tiles)
    q = torch.randn(B * 128, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B * kv, 1, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    sq = torch.arange(B, device=dev, dtype=torch.int32) * 128
    lq = torch.full((B,), 128, device=dev, dtype=torch.int32)
    sk = torch.arange(B, device=dev, dtype=torch.int32) * kv
    lk = torch.full((B,), kv, device=dev, dtype=torch.int32)
    for n, m in ((0, 4), (2, 4)):
        r = {"tiles": n_tiles, "pattern": "dense" if n == 0 else f"{n}:{m}"}
        for backend in ("hopper", "triton"):
            fn = lambda: mts.attention(q, k, v, sq, lq, 128, False, None, sk, lk, kv, sparsity_n=n, sparsity_m=m,
                                       backend=backend, check_metadata=False, rows_covered=True)
            r[backend + "_us_per_wave"] = event_ms(fn, 20, dev) * 1e3 / WAVES
        rows.append(r)
        print(r, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "cta_overhead.json"), "w"), indent=1)
print("\nus per wave (one CTA per SM, 128 query rows, non-causal, D=128 bf16) by K/V tiles per CTA")
print(f"{'tiles':>6}" + "".join(f"{h:>14}" for h in ("engine dense", "Triton dense", "engine 2:4", "Triton 2:4")))
for t in (1, 2, 4, 8, 16, 32):
    d = [r for r in rows if r["tiles"] == t]
    print(f"{t:>6}" + "".join(f"{r[b + '_us_per_wave']:>14.2f}" for r in d for b in ("hopper", "triton")))
import numpy as np
for p in ("dense", "2:4"):
    for b in ("hopper", "triton"):
        xs = [r["tiles"] for r in rows if r["pattern"] == p]
        ys = [r[b + "_us_per_wave"] for r in rows if r["pattern"] == p]
        slope, icpt = np.polyfit(xs, ys, 1)
        print(f"fit {p:<6}{b:<7} per tile {slope:6.2f} us, per CTA (intercept) {icpt:6.2f} us")
