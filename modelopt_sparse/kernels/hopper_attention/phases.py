"""Where a consumer warpgroup's tile step spends its cycles, measured on the GPU.

``python -m modelopt_sparse.kernels.hopper_attention phases TAG...`` runs each kernel's
clock-stamp build (``Variant.phase_clocks``, tag flag ``c``: the same kernel plus one predicated
store of the SM clock at each phase boundary of each tile step; nm_attention_fwd.cu,
NMH_PHASE_CLOCKS) once on the A/B command's problem and prints, per kernel, the mean cycles per
tile step of each phase. The stamps add ~80 instructions to a step, so a stamped kernel runs a
few per cent slower than the kernel itself: read the shares, and time speed with ``ab``.

The phases, in a step's order (stamp k to stamp k + 1):

- ``data``: waiting for K(i) and V(i-1) to arrive (split into ``k_wait`` and ``v_wait``);
- ``turn``: waiting for the ping-pong turn (the other warpgroup's MMAs are issued first);
- ``issue``: issuing Q.K^T(i) and P.V(i-1) (and, with late rescale, O's rescale);
- ``qk_wait``: waiting for Q.K^T(i) (without overlap also for P.V(i-1));
- ``softmax``: the selection, row max, kept tests and exponentials (with MID_WAIT also the wait
  for P.V(i-1) inside it);
- ``tail``: the wait for P.V(i-1) (overlap without MID_WAIT), O's rescale, P into the operand;
- ``loop``: from the end of one step to the start of the next.

``mma_bound`` is the step a tensor-bound kernel would take: the MMAs of one tile (64 query rows
x ``keys``, 128 or 64 with BN64) of every consumer warpgroup of the CTA at the H200's dense bf16
rate (4096 FLOP per clock per SM).
"""
from __future__ import annotations

import dataclasses
import json

import torch

from .ab_table import call_params, parse_variants, switched, variant_env

PHASES = ("data", "turn", "issue", "qk_wait", "softmax", "tail")
FLOP_PER_CLOCK = 4096  # H100 / H200 SM, dense bf16 / fp16 wgmma


def summarize(stamps: torch.Tensor) -> dict:
    """Mean cycles per tile step of each phase from stamps ``[warpgroups, tiles, 8]`` (uint32
    values in int64; 0 = not recorded): only steps with every stamp 0..6 recorded count, and the
    ``loop`` gap and the ``period`` (start to start) only between two recorded consecutive steps.
    Differences are taken modulo 2^32 (the counter wraps)."""
    s = stamps.to(torch.int64) & 0xFFFFFFFF
    done = (s[..., :7] != 0).all(dim=-1)
    steps = int(done.sum())
    if steps == 0:
        raise ValueError("no tile step was recorded (a kernel without the clock stamps?)")
    out = {"steps": steps}
    for k, name in enumerate(PHASES):
        d = (s[..., k + 1] - s[..., k]) % 2**32
        out[name] = float(d[done].double().mean())
    k_done = done & (s[..., 7] != 0)  # stamp 7: K(i) arrived, between stamps 0 and 1
    if bool(k_done.any()):
        out["k_wait"] = float(((s[..., 7] - s[..., 0]) % 2**32)[k_done].double().mean())
        out["v_wait"] = float(((s[..., 1] - s[..., 7]) % 2**32)[k_done].double().mean())
    pair = done[:, 1:] & done[:, :-1]
    if bool(pair.any()):
        out["loop"] = float(((s[:, 1:, 0] - s[:, :-1, 6]) % 2**32)[pair].double().mean())
        out["period"] = float(((s[:, 1:, 0] - s[:, :-1, 0]) % 2**32)[pair].double().mean())
    else:
        out["loop"] = out["period"] = float("nan")
    return out


def measure(tag: str, *, seq_len: int = 16384, heads: int = 32, causal: bool = True) -> dict:
    """The phase summary of the kernel ``tag`` (its clock-stamp build) on the A/B problem. Only the
    first CLOCK_TILES (128) tile steps of each CTA are stamped: at seq_len > 16384 the causal
    diagonal's far tiles are not in the means."""
    from . import engine, tools

    if seq_len < 1 or heads < 1:
        raise ValueError(f"seq_len and heads must be at least 1, got {seq_len} and {heads}")
    (v,) = parse_variants([tag])
    stamped = dataclasses.replace(v, phase_clocks=True).canonical()
    params, dtype = call_params(v, causal)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v_in = (torch.randn(seq_len, heads, v.head_dim, device="cuda", generator=g).to(dtype) for _ in range(3))
    zero = torch.zeros(1, dtype=torch.int32, device="cuda")
    lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    with switched(variant_env(stamped)):
        for _ in range(2):  # the first call loads the module; the second is the one read
            tools.forward(q, k, v_in, zero, lens, seq_len, zero, lens, params, q_covered=True, with_lse=False)
        torch.cuda.synchronize()
    buf, grid, consumers = engine.last_phase_clocks
    stamps = buf.view(-1, engine.PHASE_CLOCK_TILES, engine.PHASE_CLOCK_STAMPS).cpu()
    out = summarize(stamps)
    out["tag"] = v.tag
    out["keys"] = 64 if v.bn64 else 128  # keys per tile step
    out["mma_bound"] = consumers * 4 * 64 * out["keys"] * v.head_dim / FLOP_PER_CLOCK
    return out


def print_table(rows) -> None:
    cols = ("keys", "period", "mma_bound") + PHASES + ("loop",)
    print("\nCycles per tile step of one consumer warpgroup (mean over recorded steps; clock-stamp builds)")
    print(f"{'kernel':<24}" + "".join(f"{c:>10}" for c in cols))
    for r in rows:
        print(f"{r['tag']:<24}" + "".join(f"{r[c]:>10.0f}" for c in cols))
    print(f"{'(share of period)':<24}")
    for r in rows:
        print(f"{r['tag']:<24}{'':>30}" + "".join(f"{r[c] / r['period']:>10.1%}" for c in PHASES + ("loop",)))
    print("data = k_wait + v_wait (K(i) arriving, then V(i-1)):")
    for r in rows:
        if "k_wait" in r:
            print(f"{r['tag']:<24} k_wait {r['k_wait']:>8.0f}   v_wait {r['v_wait']:>8.0f}")


def main(args) -> int:
    rows = [measure(t, seq_len=args.seq_len, heads=args.heads, causal=not args.noncausal) for t in args.tags]
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
