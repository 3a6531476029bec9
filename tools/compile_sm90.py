"""Compile the Triton kernels for sm_90 on any machine (no GPU needed) and summarise SASS.

Catches compile-only errors before spending device time, and counts instructions,
tensor-core ops, shared-memory traffic and local-memory spills per kernel variant, and
the instructions of each loop that issues tensor-core ops (``loops=size/hgmma``: the
interior loop body first, then the edge loop), which is what a tile costs:

    python tools/compile_sm90.py              # every kernel, a few N:M variants
    HEAD_DIM=64 python tools/compile_sm90.py
    TMA=1 python tools/compile_sm90.py      # dK/dV with tensor-descriptor loads

Each variant is compiled with the config a launch would take with autotuning off. Register
allocation depends on the Triton version: to see what the H200 (triton 3.6) runs, install
that version beside the project's (``python -m venv --system-site-packages /tmp/t36 &&
/tmp/t36/bin/pip install triton==3.6.0``) and run this file with that interpreter.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modelopt_sparse.kernels.triton_attention import backward, configs, forward  # noqa: E402

FLOAT_PTRS = {"LSE", "STATS", "DELTA"}
INT_PTRS = {"Q_START", "Q_LEN", "K_START", "K_LEN"}
DATA_PTRS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
FLOAT_SCALARS = {"qk_scale", "softmax_scale"}


def compile_kernel(kernel, constexprs: dict, num_warps: int, num_stages: int):
    fn = kernel  # a JITFunction (the undecorated-by-autotune kernel)
    # A constexpr with a default that a launch does not pass compiles as that default, as in
    # JITFunction.run (without this it would be typed as a runtime argument).
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and getattr(p, "has_default", False)}
    constexprs = {**defaults, **constexprs}
    names = list(inspect.signature(fn.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in DATA_PTRS:
            signature[name] = "*bf16"
        elif name in FLOAT_PTRS:
            signature[name] = "*fp32"
        elif name in INT_PTRS:
            signature[name] = "*i32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # A real launch specialises pointers and strides that are multiples of 16 (every
    # bf16 tensor we launch on); without that hint Triton can neither vectorise the
    # loads nor pipeline them, and the SASS would not be the one the GPU runs.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
               if signature[name].startswith("*") or name.startswith("stride_")}
    src = triton.compiler.ASTSource(
        fn=fn, signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=aligned,
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def sass_summary(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    count = len(re.findall(r"^\s+/\*[0-9a-f]{4,6}\*/", sass, re.M))
    return (f"instr={count:5d} hgmma={sass.count('HGMMA'):3d} lds={sass.count('LDS'):3d} "
            f"sts={sass.count('STS'):3d} spills(ldl/stl)={sass.count('LDL')}/{sass.count('STL')}"
            f" loops={_mma_loops(sass)}")


def _mma_loops(sass: str) -> str:
    """Instruction counts of the loops that issue tensor-core ops (a loop: a branch back to
    an earlier address), innermost first, as size/hgmma; these bodies are what a tile costs."""
    instrs = [(int(a, 16), text) for a, text in re.findall(r"^\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);", sass, re.M)]
    address = [a for a, _ in instrs]
    loops = []
    for i, (a, text) in enumerate(instrs):
        m = re.search(r"\bBRA\b[^0-9]*0x([0-9a-f]+)", text)
        if not m:
            continue
        t = int(m.group(1), 16)
        if t < a and t in address:
            body = instrs[address.index(t): i + 1]
            mma = sum("HGMMA" in x for _, x in body)
            if mma:
                loops.append((len(body), mma))
    return ",".join(f"{n}/{h}" for n, h in sorted(set(loops))) or "-"


def default_config(kind, n, m, head_dim, tie_index):
    """The config a launch with autotuning off would take (the kernels' own pruning)."""
    import torch

    os.environ["MODELOPT_SPARSE_AUTOTUNE"] = "0"
    args = {"Q": torch.empty(1, dtype=torch.bfloat16), "SPARSITY_N": n, "SPARSITY_M": m, "BLOCK_D": head_dim,
            "TIE_INDEX": tie_index}
    cfg = configs._prune(configs._configs(kind), args, kind)[0]
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages


def main():
    head_dim = int(os.environ.get("HEAD_DIM", 128))
    base = dict(GROUPS=1, HEAD_DIM=head_dim, BLOCK_D=head_dim, IS_CAUSAL=True, TIE_INDEX=False,
                HAS_WINDOW=False, SOFTCAP=False, UPCAST=False, DOT_PRECISION="tf32")
    variants = [(0, 4, False), (2, 4, False), (4, 8, False), (8, 16, False), (2, 4, True)]
    plans = [
        ("fwd", forward._attn_fwd, dict(WITH_STATS=False)),
        ("dkdv", backward._attn_bwd_dkdv, dict(TMA=os.environ.get("TMA", "0") == "1")),
        ("dq", backward._attn_bwd_dq, {}),
    ]
    for kind, kernel, extra in plans:
        for n, m, tie in variants:
            bm, bn, warps, stages = default_config(kind, n, m, head_dim, tie)
            consts = dict(base, **extra, SPARSITY_N=n, SPARSITY_M=m, TIE_INDEX=tie, BLOCK_M=bm, BLOCK_N=bn)
            compiled = compile_kernel(kernel, consts, warps, stages)
            label = f"{kind:<5} {n}:{m}{' index' if tie else '      '} {bm}x{bn} w{warps} s{stages}"
            print(f"{label:<36} {sass_summary(compiled)}")


if __name__ == "__main__":
    main()
