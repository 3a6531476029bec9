"""Do cubins of the pip toolchain (nvidia-cuda-nvcc 13.5.37, what `pip install
modelopt-sparse[hopper]` resolves today) load and run on the H200's driver (580, CUDA 13.0)?

  python build/s24/pip_nvcc_check.py compile NVCC   # CPU: build the variants into build/pip_nvcc_cubins
  python build/s24/pip_nvcc_check.py run            # GPU: only those cubins (a stand-in nvcc that
                                                # compiles nothing), each against the reference
"""
import os, sys, json, stat, itertools
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "pip_nvcc_cubins"
os.environ["MODELOPT_SPARSE_HOPPER_CACHE"] = str(CACHE)
import torch  # noqa: E402
from modelopt_sparse.kernels.reference import SparseParams  # noqa: E402
from modelopt_sparse.kernels.hopper_attention import build, variants  # noqa: E402

PATTERNS = [(0, 4, "threshold"), (2, 4, "threshold"), (2, 4, "index"), (4, 8, "threshold"), (4, 8, "index"),
            (8, 16, "threshold"), (8, 16, "index")]
CASES = [(d, dt, causal, n, m, tie) for d in (128, 64) for dt in (torch.bfloat16, torch.float16)
         for causal in (True, False) for n, m, tie in PATTERNS]


def params(causal, n, m, tie, d):
    return SparseParams(causal, d ** -0.5, n, m, 2, 16, tie, 0, 0.0)


if sys.argv[1] == "compile":
    nvcc = sys.argv[2]
    (HERE / "pip_nvcc_version.txt").write_text(build.nvcc_version(nvcc) + "\n")
    vs = {variants.variant_for(params(c, n, m, t, d), dt, d).canonical() for d, dt, c, n, m, t in CASES}
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as ex:
        paths = list(ex.map(lambda v: build.compile_variant(v, nvcc), sorted(vs, key=lambda v: v.tag)))
    print(len(paths), "cubins", sum(p.stat().st_size for p in paths) // 1024, "KiB")
else:
    fake = HERE / "fake_nvcc.sh"
    version = (HERE / "pip_nvcc_version.txt").read_text().strip()
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
                    'echo "cache miss: this check runs only the pip nvcc cubins" >&2; exit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    os.environ["MODELOPT_SPARSE_NVCC"] = str(fake)
    import modelopt_sparse as mts
    rows, worst = [], 0.0
    g = torch.Generator().manual_seed(0)
    lens = [700, 300, 1]
    st = torch.tensor([0, 700, 1000], dtype=torch.int32, device="cuda")
    ln = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for d, dt, causal, n, m, tie in CASES:
        q, k, v = (torch.randn(sum(lens), h, d, generator=g) for h in (8, 2, 2))
        kw = dict(is_causal=causal, sparsity_n=n, sparsity_m=m, num_sink_tokens=2, dense_window_size=16,
                  tie_break=tie)
        out = mts.attention(*(x.to("cuda", dt) for x in (q, k, v)), st, ln, 700, backend="hopper", **kw)
        ref = mts.attention(*(x.to("cuda", dt).double() for x in (q, k, v)), st, ln, 700, backend="torch", **kw)
        err = float((out.double() - ref).norm() / ref.norm())
        worst = max(worst, err)
        rows.append((d, str(dt)[6:], causal, f"{n}:{m}", tie, err))
    torch.cuda.synchronize()
    print("pip nvcc:", version, "| driver CUDA", torch.version.cuda, "| cubins", len(list(CACHE.glob("*.cubin"))))
    for r in rows:
        print("  D=%d %-8s causal=%-5s %-5s %-9s rel err %.2e" % r)
    print(f"PIP_NVCC_CHECK {len(rows)} calls, worst rel err {worst:.2e}", "PASS" if worst < 2e-2 else "FAIL")
