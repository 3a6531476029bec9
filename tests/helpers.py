"""Input builders shared by the tests."""

from __future__ import annotations

import torch


def varlen(lens, device="cpu"):
    """(b_start_loc, b_seq_len, max_len, total) for packed sequences of the given lengths."""
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    starts = torch.zeros_like(lens_t)
    if len(lens) > 1:
        starts[1:] = torch.cumsum(lens_t, 0)[:-1].to(torch.int32)
    return starts, lens_t, max(max(lens), 1), int(sum(lens))


def local_key_index(lens):
    return torch.cat([torch.arange(n) for n in lens]) if lens else torch.zeros(0, dtype=torch.long)


def separated_inputs(lens_q, lens_k, hq, hkv, d, m, dtype, device="cpu", seed=0):
    """Dyadic inputs whose raw scores are exact in every dtype and never tie in a group.

    Entries are multiples of 1/4, so every product and partial sum is exact in fp32; the last
    channel adds (member + 1) / (32 M), which differs between the members of any group by less
    than the 1/16 grid of the rest: scores in a group are distinct, at least 1/(32 M) apart, and
    every backend computes exactly the same scores, hence exactly the same mask.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (sum(lens_q), hq, d), generator=g).double() / 4
    k = torch.randint(-2, 3, (sum(lens_k), hkv, d), generator=g).double() / 4
    v = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64)
    q[..., -1] = 1.0
    member = local_key_index(lens_k) % m
    k[..., -1] = ((member + 1).double() / (32 * m))[:, None]
    return [t.to(dtype).to(device) for t in (q, k, v)]


def tied_inputs(lens_q, lens_k, hq, hkv, d, dtype, device="cpu", seed=0, levels=2):
    """Integer-valued scores from a tiny alphabet: ties inside groups are everywhere."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (sum(lens_q), hq, d), generator=g).double()
    k = torch.randint(0, levels, (sum(lens_k), hkv, d), generator=g).double()
    v = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def rel_err(a, b, floor=1e-30):
    """||a - b|| / ||b||, with ||b|| raised to ``floor`` when b (nearly) vanishes."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()
