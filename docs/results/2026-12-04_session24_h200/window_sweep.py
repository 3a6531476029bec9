"""Where does the Hopper engine stop paying with a sliding window? Causal forward S=16384, bf16,
engine against Triton (eager), per window; D=128 (32 heads) and D=64 (64 query / 8 KV heads).
Prints a table; JSON to $OUT/window_sweep.json."""
import json, os
import torch
import modelopt_sparse as mts
from modelopt_sparse.kernels.hopper_attention.tools import event_ms

S = 16384
dev = torch.device("cuda")
st = torch.zeros(1, dtype=torch.int32, device=dev)
ln = torch.full((1,), S, dtype=torch.int32, device=dev)
rows = []
for d, hq, hkv in ((128, 32, 32), (64, 64, 8)):
    g = torch.Generator(device=dev).manual_seed(d)
    q = torch.randn(S, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    for window in (128, 256, 512, 1024, 2048, 4096, None):
        for n, m in ((0, 4), (2, 4)):
            kw = dict(sparsity_n=n, sparsity_m=m, sliding_window=window, check_metadata=False)
            ms = {b: event_ms(lambda: mts.attention(q, k, v, st, ln, S, backend=b, **kw), 10, dev)
                  for b in ("hopper", "triton")}
            r = dict(d=d, window=window or "full", pattern="dense" if n == 0 else f"{n}:{m}", hopper_ms=ms["hopper"],
                     triton_ms=ms["triton"], speedup=ms["triton"] / ms["hopper"])
            rows.append(r)
            print(r, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "window_sweep.json"), "w"), indent=1)
print("\nsliding window, causal fwd S=16384 bf16: engine speedup over Triton (time ratio)")
print("D    pattern " + "".join(f"{str(w):>7}" for w in (128, 256, 512, 1024, 2048, 4096, "full")))
for d in (128, 64):
    for p in ("dense", "2:4"):
        sel = [r for r in rows if r["d"] == d and r["pattern"] == p]
        print(f"{d:<5}{p:<8}" + "".join(f"{r['speedup']:>7.2f}" for r in sel))
