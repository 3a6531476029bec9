"""torch.compile users: causal forward TFLOPS of attention() inside a compiled function, with the
Hopper engine as a custom op (auto, session 24) against the same graph on Triton
(MODELOPT_SPARSE_HOPPER=0, what every compiled graph ran before) and the eager engine.
S=16384, H=32, D=128, bf16. Prints a table; writes JSON to $OUT/compiled_bench.json."""
import json, os, sys
import torch
import modelopt_sparse as mts
from modelopt_sparse.kernels.hopper_attention.tools import event_ms

S, H, D = 16384, 32, 128
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
st = torch.zeros(1, dtype=torch.int32, device=dev)
ln = torch.full((1,), S, dtype=torch.int32, device=dev)
flops = 4 * S * S * D * H / 2
rows = []
for n, m in ((0, 4), (2, 4), (4, 8), (8, 16)):
    def call(q, k, v):
        return mts.attention(q, k, v, st, ln, S, sparsity_n=n, sparsity_m=m, backend="auto", check_metadata=False)
    res = {"pattern": "dense" if n == 0 else f"{n}:{m}"}
    for name, hopper in (("compiled_hopper", "1"), ("compiled_triton", "0"), ("eager_hopper", "1")):
        os.environ["MODELOPT_SPARSE_HOPPER"] = hopper
        torch._dynamo.reset()
        fn = call if name.startswith("eager") else torch.compile(call, fullgraph=True)
        out = fn(q, k, v)
        ms = event_ms(lambda: fn(q, k, v), 20, dev)
        res[name] = flops / ms / 1e9
        res[name + "_out"] = out.float()
    same = torch.equal(res["compiled_hopper_out"], res["eager_hopper_out"])
    err = float((res["compiled_triton_out"] - res["compiled_hopper_out"]).norm() / res["compiled_hopper_out"].norm())
    for key in [k for k in res if k.endswith("_out")]:
        del res[key]
    res["compiled_equals_eager_engine"], res["rel_diff_vs_triton"] = same, err
    rows.append(res)
    print(res, flush=True)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "compiled_bench.json"), "w"), indent=1)
print("\ncompiled graphs, causal fwd S=16384 H=32 D=128 bf16, TFLOPS")
print(f"{'pattern':<8}{'compiled+engine':>16}{'compiled+Triton':>16}{'speedup':>9}{'eager engine':>14}  bitwise=eager")
for r in rows:
    print(f"{r['pattern']:<8}{r['compiled_hopper']:>16.1f}{r['compiled_triton']:>16.1f}"
          f"{r['compiled_hopper'] / r['compiled_triton']:>8.2f}x{r['eager_hopper']:>14.1f}  {r['compiled_equals_eager_engine']}")
