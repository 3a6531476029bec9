"""An independent float64 oracle, written straight from docs/semantics.md.

It shares no code with the package: plain Python loops decide every (query, key) pair,
and dense float64 attention with the materialized mask gives outputs and, through
autograd, gradients. Only for small shapes.
"""

from __future__ import annotations

import math

import torch


def oracle_mask(qk, q_len, kv_len, *, causal, n, m, sink, window, tie_break):
    """qk: [q_len, kv_len] float64 raw dot products -> bool kept mask."""
    kept = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = i + (kv_len - q_len)
        allowed = [j < kv_len and (not causal or j <= p) for j in range(kv_len)]
        for j in range(kv_len):
            if not allowed[j]:
                continue
            if n == 0 or q_len == 1:
                kept[i, j] = True
                continue
            dense = j < sink or 0 <= p - j < window
            g0 = (j // m) * m
            members = [jj for jj in range(g0, min(g0 + m, kv_len))]
            score = lambda jj: float(qk[i, jj]) if allowed[jj] else -math.inf  # noqa: E731
            if tie_break == "threshold":
                ranked = sorted((score(jj) for jj in members), reverse=True)
                ranked += [-math.inf] * (m - len(ranked))  # keys past kv_len count as -inf
                selected = score(j) >= ranked[n - 1]
            else:
                rank = sum(
                    1 for jj in members
                    if score(jj) > score(j) or (score(jj) == score(j) and jj < j)
                )
                selected = rank < n
            kept[i, j] = dense or selected
    return kept


def oracle_attention(q, k, v, lens_q, lens_k, *, causal, scale, n, m, sink, window, tie_break):
    """Packed [T, H, D] inputs (float64, requires_grad allowed) -> (out, masks, stats)."""
    hq, hkv = q.shape[1], k.shape[1]
    outs, masks = [], []
    stats = {"allowed": [0] * hq, "kept": [0] * hq, "rows": [0] * hq, "dropped_mass": [0.0] * hq}
    qs = ks = 0
    for lq, lk in zip(lens_q, lens_k):
        seq_out = []
        for h in range(hq):
            qh = q[qs : qs + lq, h].double()
            kh = k[ks : ks + lk, h // (hq // hkv)].double()
            vh = v[ks : ks + lk, h // (hq // hkv)].double()
            qk = qh @ kh.T
            mask = oracle_mask(qk.detach(), lq, lk, causal=causal, n=n, m=m, sink=sink,
                               window=window, tie_break=tie_break)
            allowed = oracle_mask(qk.detach(), lq, lk, causal=causal, n=0, m=m, sink=0,
                                  window=0, tie_break=tie_break)
            masks.append(mask)
            s = (qk * scale).masked_fill(~mask, -math.inf)
            row_has = mask.any(-1, keepdim=True)
            p = torch.softmax(s.masked_fill(~row_has, 0.0), -1) * row_has
            seq_out.append(p @ vh)
            with torch.no_grad():
                scaled = qk * scale
                row_max = scaled.masked_fill(~allowed, -math.inf).amax(-1, keepdim=True)
                e = torch.exp(scaled - torch.where(torch.isfinite(row_max), row_max, 0.0))
                has = allowed.any(-1)
                z_all, z_kept = (e * allowed).sum(-1), (e * mask).sum(-1)
                stats["allowed"][h] += int(allowed.sum())
                stats["kept"][h] += int(mask.sum())
                stats["rows"][h] += int(has.sum())
                stats["dropped_mass"][h] += float((1 - z_kept[has] / z_all[has]).sum())
        outs.append(torch.stack(seq_out, 1))
        qs += lq
        ks += lk
    return torch.cat(outs, 0), masks, stats
