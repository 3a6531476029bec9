"""Quick causal-forward TFLOPS of our kernel vs SDPA at one shape (first look only)."""
import sys, torch, triton
from torch.nn.attention import sdpa_kernel, SDPBackend
from modelopt_sparse.kernels import attention
S, H, D = int(sys.argv[1]) if len(sys.argv) > 1 else 16384, 32, 128
q, k, v = (torch.randn(S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
st = torch.tensor([0], dtype=torch.int32, device="cuda"); ln = torch.tensor([S], dtype=torch.int32, device="cuda")
flops = 4 * S * S * H * D / 2
def tf(ms, mult=1.0): return flops * mult / ms / 1e9
rows = []
for name, kw in [("dense", dict(sparsity_n=0)), ("2:4", dict(sparsity_n=2, sparsity_m=4)), ("4:8", dict(sparsity_n=4, sparsity_m=8)),
                 ("8:16", dict(sparsity_n=8, sparsity_m=16)), ("2:4 index", dict(sparsity_n=2, sparsity_m=4, tie_break="index"))]:
    fn = lambda: attention(q, k, v, st, ln, S, **kw)
    ms = triton.testing.do_bench(fn, warmup=100, rep=300, return_mode="median")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v)); do = torch.randn_like(q)
    def fb():
        o = attention(qg, kg, vg, st, ln, S, **kw); o.backward(do)
    ms2 = triton.testing.do_bench(fb, warmup=50, rep=200, grad_to_none=[qg, kg, vg], return_mode="median")
    rows.append((name, tf(ms), tf(ms2, 3.5)))
qs, ks, vs = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
for be, nm in [(SDPBackend.FLASH_ATTENTION, "sdpa-flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn")]:
    try:
        with sdpa_kernel(be):
            ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True), return_mode="median")
        rows.append((nm, tf(ms), float("nan")))
    except Exception as e:
        rows.append((nm + " n/a " + type(e).__name__, float("nan"), float("nan")))
print(f"S={S} H={H} D={D} bf16 causal")
for r in rows: print(f"{r[0]:<28} fwd {r[1]:7.1f} TF   fwd+bwd {r[2]:7.1f} TF")
