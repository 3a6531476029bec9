"""Full causal calls by size, engine over Triton, timed two ways: one synchronized call per timing
(the host fully exposed) and 50 calls back to back (the host running ahead, as in a GPU-bound
model). JSON to $OUT/size_async.json."""
import json, os, time
import torch
import modelopt_sparse as mts

dev = torch.device("cuda")
st = torch.zeros(1, dtype=torch.int32, device=dev)
rows = []


def timed(fn, calls):
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(calls):
            fn()
        e1.record()
        e1.synchronize()
        best.append(e0.elapsed_time(e1) / calls)
    return sorted(best)[2]


for d, hq, hkv in ((128, 32, 32), (64, 64, 8)):
    g = torch.Generator(device=dev).manual_seed(d)
    for S in (1024, 2048, 4096, 8192):
        q = torch.randn(S, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
        ln = torch.full((1,), S, dtype=torch.int32, device=dev)
        for n in (0, 2):
            r = dict(d=d, S=S, n=n)
            for b in ("hopper", "triton"):
                fn = lambda: mts.attention(q, k, v, st, ln, S, sparsity_n=n, backend=b, check_metadata=False)
                r[b + "_sync"], r[b + "_async"] = timed(fn, 1), timed(fn, 50)
            rows.append(r)
            print({k2: (round(x, 4) if isinstance(x, float) else x) for k2, x in r.items()}, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "size_async.json"), "w"), indent=1)
print("\nengine over Triton (Triton time / engine time): synchronized | back to back")
print("D   n  " + "".join(f"{S:>14}" for S in (1024, 2048, 4096, 8192)))
for d in (128, 64):
    for n in (0, 2):
        sel = [r for r in rows if r["d"] == d and r["n"] == n]
        print(f"{d:<4}{n:<3}" + "".join(f"{r['triton_sync'] / r['hopper_sync']:>7.2f}|{r['triton_async'] / r['hopper_async']:<6.2f}"
                                       for r in sel))
