"""Launch-config pruning (pure Python: runs without a GPU)."""

import itertools

import pytest
import torch
import triton

from modelopt_sparse.kernels import triton_attention as ta


def _all_configs():
    shapes = sorted({s for v in ta._SHAPES.values() for s in v})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes]


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_pruned_configs_fit_and_hold_whole_groups(kind, autotune, monkeypatch):
    monkeypatch.setenv("MODELOPT_SPARSE_AUTOTUNE", autotune)
    for d, (n, m), dtype in itertools.product([16, 64, 128, 256], [(0, 4), (2, 4), (4, 8), (8, 16)],
                                              [torch.bfloat16, torch.float32]):
        args = {"Q": torch.empty(1, dtype=dtype), "SPARSITY_N": n, "SPARSITY_M": m, "BLOCK_D": d}
        kept = ta._prune(_all_configs(), args, kind)
        assert kept, (kind, d, n, m, dtype)
        if autotune == "0":
            assert len(kept) == 1
        for cfg in kept:
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            smem = ta._smem_bytes(kind, bm, bn, d, cfg.num_stages, dtype.itemsize)
            assert smem <= ta._SMEM_LIMIT, (kind, d, n, m, dtype, cfg)
            if n:
                # Whole groups always; groups in one thread's registers whenever any
                # listed config allows it (else the single-stage fallback).
                assert bn % m == 0, (kind, d, n, m, cfg)
                wide_fits = any(s[1] >= ta._min_block_n(kind, m) and ta._smem_bytes(kind, s[0], s[1], d, s[3], dtype.itemsize)
                                <= ta._SMEM_LIMIT and (d <= 128 or s[0] * s[1] <= 64 * 128)
                                for s in ta._SHAPES[kind if kind != "fwd" else "fwd_sparse"])
                assert bn >= ta._min_block_n(kind, m) or not wide_fits, (kind, d, n, m, dtype, cfg)


def test_defaults_follow_the_measured_order():
    args = {"Q": torch.empty(1, dtype=torch.bfloat16), "SPARSITY_M": 4, "BLOCK_D": 128}
    dense = ta._prune(_all_configs(), {**args, "SPARSITY_N": 0}, "fwd")[0]
    sparse = ta._prune(_all_configs(), {**args, "SPARSITY_N": 2}, "fwd")[0]
    assert (dense.kwargs["BLOCK_M"], dense.kwargs["BLOCK_N"], dense.num_stages) == (128, 128, 3)
    assert (sparse.kwargs["BLOCK_M"], sparse.kwargs["BLOCK_N"], sparse.num_warps) == (64, 64, 4)


@pytest.mark.parametrize("name", ["MODELOPT_SPARSE_AUTOTUNE", "MODELOPT_SPARSE_TMA"])
def test_switches_take_only_0_or_1(name, monkeypatch):
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1, got 'yes'"):
        ta._env_flag(name, False)
    monkeypatch.setenv(name, "1")
    assert ta._env_flag(name, False) is True
    monkeypatch.delenv(name)
    assert ta._env_flag(name, True) is True


def test_bad_autotune_switch_fails_before_any_launch(monkeypatch):
    monkeypatch.setenv("MODELOPT_SPARSE_AUTOTUNE", "off")
    args = {"Q": torch.empty(1, dtype=torch.bfloat16), "SPARSITY_N": 0, "SPARSITY_M": 4, "BLOCK_D": 128}
    with pytest.raises(ValueError, match="MODELOPT_SPARSE_AUTOTUNE"):
        ta._prune(_all_configs(), args, "fwd")
