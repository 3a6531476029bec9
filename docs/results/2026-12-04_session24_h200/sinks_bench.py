"""GPT-OSS-shaped prefill with learned sinks: the Hopper engine (session 24) against the Triton
kernels (what such calls ran before), causal forward, S=16384, 64 query / 8 KV heads, D=64, bf16.
Full attention and the sliding-window layer (128 keys); dense and 2:4. Prints a table; JSON to $OUT."""
import json, os
import torch
import modelopt_sparse as mts
from modelopt_sparse.kernels.hopper_attention.tools import event_ms

S, HQ, HKV, D = 16384, 64, 8, 64
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
q = torch.randn(S, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
k, v = (torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
sinks = torch.randn(HQ, device=dev, dtype=torch.bfloat16, generator=g)
st = torch.zeros(1, dtype=torch.int32, device=dev)
ln = torch.full((1,), S, dtype=torch.int32, device=dev)
rows = []
for window in (None, 128):
    for n, m in ((0, 4), (2, 4)):
        kw = dict(sparsity_n=n, sparsity_m=m, sliding_window=window, learned_sinks=sinks, check_metadata=False)
        allowed = S * (S + 1) / 2 if window is None else S * window - window * (window - 1) / 2
        flops = 4 * allowed * D * HQ
        res = {"window": window or "full", "pattern": "dense" if n == 0 else f"{n}:{m}"}
        outs = {}
        for backend in ("hopper", "triton"):
            fn = lambda: mts.attention(q, k, v, st, ln, S, backend=backend, **kw)
            outs[backend] = fn().float()
            res[backend] = flops / event_ms(fn, 20, dev) / 1e9
        res["rel_diff"] = float((outs["hopper"] - outs["triton"]).norm() / outs["triton"].norm())
        rows.append(res)
        print(res, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "sinks_bench.json"), "w"), indent=1)
print("\nlearned sinks, causal fwd S=16384 Hq=64 Hkv=8 D=64 bf16, TFLOPS (allowed entries only)")
print(f"{'window':<7}{'pattern':<8}{'engine':>9}{'Triton':>9}{'speedup':>9}{'rel diff':>10}")
for r in rows:
    print(f"{str(r['window']):<7}{r['pattern']:<8}{r['hopper']:>9.1f}{r['triton']:>9.1f}"
          f"{r['hopper'] / r['triton']:>8.2f}x{r['rel_diff']:>10.1e}")
