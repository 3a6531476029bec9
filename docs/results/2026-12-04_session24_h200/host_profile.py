"""cProfile of the engine's host path (the 1-tile case of cta_overhead.py: ~255 us per call)."""
import cProfile, pstats, time
import torch
import modelopt_sparse as mts
from modelopt_sparse.kernels.hopper_attention import engine as he

dev = torch.device("cuda")
B, D, kv = 528, 128, 128
q = torch.randn(B * 128, 1, D, device=dev, dtype=torch.bfloat16)
k, v = (torch.randn(B * kv, 1, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
sq = torch.arange(B, device=dev, dtype=torch.int32) * 128
lq = torch.full((B,), 128, device=dev, dtype=torch.int32)
sk, lk = sq.clone(), lq.clone()
fn = lambda: mts.attention(q, k, v, sq, lq, 128, False, None, sk, lk, kv, backend="hopper", check_metadata=False,
                           rows_covered=True)
for _ in range(10):
    fn()
torch.cuda.synchronize()
pr = cProfile.Profile()
pr.enable()
for _ in range(100):
    fn()
pr.disable()
torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
# single pieces
mod = None
for name, f in [("torch.cuda.device ctx", lambda: torch.cuda.device(0).__enter__()),
                ("current_stream", lambda: torch.cuda.current_stream(0).cuda_stream),
                ("new_empty", lambda: q.new_empty(q.shape)),
                ("variant_for", lambda: he.variant_for(mts.kernels.api._params(False, 0.088, 0, 4, 0, 64, "threshold", 0, 0.0), torch.bfloat16, 128))]:
    t = time.perf_counter()
    for _ in range(1000):
        f()
    print(f"{name:<24} {(time.perf_counter() - t) * 1e3:8.2f} us")
