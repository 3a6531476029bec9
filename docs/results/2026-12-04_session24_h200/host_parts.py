"""Host time of each piece of an engine call (perf_counter wrappers, no profiler)."""
import time, collections
import torch
import modelopt_sparse as mts
from modelopt_sparse.kernels.hopper_attention import engine as he, driver as hd
import modelopt_sparse.kernels.hopper_attention as ha

acc = collections.defaultdict(float)
def timed(name, f):
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[name] += time.perf_counter() - t
    return w
he.variant_for = timed("variant_for", he.variant_for)
he._module = timed("_module", he._module)
he.unsupported_reason = timed("unsupported_reason", he.unsupported_reason)
he.forward = timed("forward (all)", he.forward)
ha.choose = timed("choose", ha.choose)
ha.hopper_attention = timed("hopper_attention (all)", ha.hopper_attention)
hd._Driver.encode_tma = timed("encode_tma", hd._Driver.encode_tma)
hd._Module.launch = timed("launch", hd._Module.launch)
dev = torch.device("cuda")
cases = {}
q = torch.randn(528 * 128, 1, 128, device=dev, dtype=torch.bfloat16)
sq = torch.arange(528, device=dev, dtype=torch.int32) * 128
lq = torch.full((528,), 128, device=dev, dtype=torch.int32)
cases["B=528 x 128, H=1"] = lambda: mts.attention(q, q, q, sq, lq, 128, False, backend="hopper", check_metadata=False,
                                                   rows_covered=True)
q2 = torch.randn(4096, 32, 128, device=dev, dtype=torch.bfloat16)
st, ln = torch.zeros(1, dtype=torch.int32, device=dev), torch.full((1,), 4096, dtype=torch.int32, device=dev)
cases["S=4096, H=32"] = lambda: mts.attention(q2, q2, q2, st, ln, 4096, backend="hopper", check_metadata=False)
for name, fn in cases.items():
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    acc.clear()
    t = time.perf_counter()
    for _ in range(50):
        fn()
    total = (time.perf_counter() - t) / 50 * 1e6
    torch.cuda.synchronize()
    print(f"== {name}: {total:.1f} us per call")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"   {k:<24}{v / 50 * 1e6:8.1f} us")
