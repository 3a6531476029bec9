"""After the host-cost fix (the nvcc search remembered): host enqueue per call, the sliding-window
sweep again, and a size sweep of full causal calls (engine over Triton, eager, event timing with a
sync per call as window_sweep.py). JSON to $OUT/resweep.json."""
import json, os, time
import torch
import modelopt_sparse as mts
from modelopt_sparse.kernels.hopper_attention.tools import event_ms

dev = torch.device("cuda")
out = {"host_us": {}, "window": [], "size": []}
# 1. host enqueue per call (tiny problem: the GPU is never the bottleneck)
q = torch.randn(528 * 128, 1, 128, device=dev, dtype=torch.bfloat16)
sq = torch.arange(528, device=dev, dtype=torch.int32) * 128
lq = torch.full((528,), 128, device=dev, dtype=torch.int32)
for backend in ("hopper", "triton"):
    fn = lambda: mts.attention(q, q, q, sq, lq, 128, False, backend=backend, check_metadata=False, rows_covered=True)
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        fn()
    out["host_us"][backend] = (time.perf_counter() - t) / 50 * 1e6
    torch.cuda.synchronize()
print("host us per call", out["host_us"], flush=True)
st = torch.zeros(1, dtype=torch.int32, device=dev)
for d, hq, hkv in ((128, 32, 32), (64, 64, 8)):
    S = 16384
    g = torch.Generator(device=dev).manual_seed(d)
    q = torch.randn(S, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    ln = torch.full((1,), S, dtype=torch.int32, device=dev)
    for window in (128, 512, 1024, 2048, 4096):
        for n in (0, 2):
            kw = dict(sparsity_n=n, sparsity_m=4, sliding_window=window, check_metadata=False)
            ms = {b: event_ms(lambda: mts.attention(q, k, v, st, ln, S, backend=b, **kw), 10, dev)
                  for b in ("hopper", "triton")}
            out["window"].append(dict(d=d, window=window, n=n, speedup=ms["triton"] / ms["hopper"], **ms))
            print(out["window"][-1], flush=True)
    for S in (512, 1024, 2048, 4096, 8192):
        q2, k2, v2 = q[:S], k[:S], v[:S]
        ln = torch.full((1,), S, dtype=torch.int32, device=dev)
        for n in (0, 2):
            kw = dict(sparsity_n=n, sparsity_m=4, check_metadata=False)
            ms = {b: event_ms(lambda: mts.attention(q2, k2, v2, st, ln, S, backend=b, **kw), 10, dev)
                  for b in ("hopper", "triton")}
            out["size"].append(dict(d=d, heads=hq, S=S, n=n, speedup=ms["triton"] / ms["hopper"], **ms))
            print(out["size"][-1], flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "resweep.json"), "w"), indent=1)
print("\nhost us per call: engine %.1f, Triton %.1f" % (out["host_us"]["hopper"], out["host_us"]["triton"]))
print("window (S=16384) speedup engine/Triton:  D n | 128 512 1024 2048 4096")
for d in (128, 64):
    for n in (0, 2):
        print(f"  {d} {n} |" + " ".join(f"{r['speedup']:.2f}" for r in out["window"] if r["d"] == d and r["n"] == n))
print("size (causal, no window) speedup:  D n | S=512 1024 2048 4096 8192")
for d in (128, 64):
    for n in (0, 2):
        print(f"  {d} {n} |" + " ".join(f"{r['speedup']:.2f}" for r in out["size"] if r["d"] == d and r["n"] == n))
