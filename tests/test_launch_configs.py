"""Launch-config pruning (pure Python: runs without a GPU)."""

import itertools

import pytest
import torch
import triton

from modelopt_sparse.kernels.triton_attention import configs
from modelopt_sparse.kernels.triton_attention.forward import _attn_fwd


def _all_configs():
    shapes = sorted({s for v in configs._SHAPES.values() for s in v})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes]


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_pruned_configs_fit_and_hold_whole_groups(kind, autotune, monkeypatch):
    monkeypatch.setenv("MODELOPT_SPARSE_AUTOTUNE", autotune)
    for d, (n, m), dtype in itertools.product([16, 64, 128, 256], [(0, 4), (2, 4), (4, 8), (8, 16)],
                                              [torch.bfloat16, torch.float32]):
        args = {"Q": torch.empty(1, dtype=dtype), "SPARSITY_N": n, "SPARSITY_M": m, "BLOCK_D": d}
        kept = configs._prune(_all_configs(), args, kind)
        assert kept, (kind, d, n, m, dtype)
        if autotune == "0":
            assert len(kept) == 1
        for cfg in kept:
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            smem = configs._smem_bytes(kind, bm, bn, d, cfg.num_stages, dtype.itemsize)
            assert smem <= configs._SMEM_LIMIT, (kind, d, n, m, dtype, cfg)
            if n:
                # Whole groups always; groups in one thread's registers whenever any
                # listed config allows it (else the single-stage fallback).
                assert bn % m == 0, (kind, d, n, m, cfg)
                wide_fits = any(s[1] >= configs._min_block_n(kind, m)
                                and configs._smem_bytes(kind, s[0], s[1], d, s[3], dtype.itemsize) <= configs._SMEM_LIMIT
                                and (d <= 128 or s[0] * s[1] <= 64 * 128)
                                for s in configs._SHAPES[kind if kind != "fwd" else "fwd_sparse"])
                assert bn >= configs._min_block_n(kind, m) or not wide_fits, (kind, d, n, m, dtype, cfg)


def test_defaults_follow_the_measured_order():
    args = {"Q": torch.empty(1, dtype=torch.bfloat16), "SPARSITY_M": 4, "BLOCK_D": 128}
    dense = configs._prune(_all_configs(), {**args, "SPARSITY_N": 0}, "fwd")[0]
    sparse = configs._prune(_all_configs(), {**args, "SPARSITY_N": 2}, "fwd")[0]
    assert (dense.kwargs["BLOCK_M"], dense.kwargs["BLOCK_N"], dense.num_stages) == (128, 128, 3)
    assert (sparse.kwargs["BLOCK_M"], sparse.kwargs["BLOCK_N"], sparse.num_warps) == (64, 64, 4)
    # dK/dV: 128-key tiles at D <= 64, 64-key tiles above (H200 sweeps).
    for d, want in [(64, (128, 128, 2)), (32, (128, 128, 2)), (128, (128, 64, 2))]:
        for n in (0, 2):
            cfg = configs._prune(_all_configs(), {**args, "BLOCK_D": d, "SPARSITY_N": n}, "dkdv")[0]
            assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages) == want, (d, n)
    index = configs._prune(_all_configs(), {**args, "BLOCK_D": 64, "SPARSITY_N": 2, "TIE_INDEX": True}, "dkdv")[0]
    assert (index.kwargs["BLOCK_M"], index.kwargs["BLOCK_N"], index.num_stages) == (128, 64, 3)


@pytest.mark.parametrize("name", ["MODELOPT_SPARSE_AUTOTUNE", "MODELOPT_SPARSE_TMA"])
def test_switches_take_only_0_or_1(name, monkeypatch):
    from modelopt_sparse.kernels.switches import env_flag

    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1, got 'yes'"):
        env_flag(name, False)
    monkeypatch.setenv(name, "1")
    assert env_flag(name, False) is True
    monkeypatch.delenv(name)
    assert env_flag(name, True) is True


def test_bad_autotune_switch_fails_before_any_launch(monkeypatch):
    monkeypatch.setenv("MODELOPT_SPARSE_AUTOTUNE", "off")
    args = {"Q": torch.empty(1, dtype=torch.bfloat16), "SPARSITY_N": 0, "SPARSITY_M": 4, "BLOCK_D": 128}
    with pytest.raises(ValueError, match="MODELOPT_SPARSE_AUTOTUNE"):
        configs._prune(_all_configs(), args, "fwd")


class _RecordingJit:
    """Stands in for the compiled kernel: records the meta-parameters of every launch."""

    def __init__(self, arg_names):
        self.arg_names, self.launches = arg_names, []

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


def test_tuned_kernel_launches_the_autotuners_choice_per_key(monkeypatch):
    """After the first launch of a key, ``_TunedKernel`` skips triton.autotune's per-call
    bookkeeping; it must launch exactly the config the autotuner chose for that key, keep
    keys apart, and start over after ``forget()`` (tools/sweep_configs.py pins configs)."""
    monkeypatch.setenv("MODELOPT_SPARSE_AUTOTUNE", "0")
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # the GPU's multi-config autotuner
    tuned = configs._TunedKernel(_attn_fwd, "fwd", "max_q_bucket", ["WITH_STATS"])
    jit = tuned.autotuner.fn = _RecordingJit(tuned.autotuner.fn.arg_names)
    tuned.launcher = None  # launches after the first go through autotuner.fn (the direct path: GPU tests)
    # Triton 3.6 times even a single remaining config (3.9 does not); nothing to time here.
    monkeypatch.setattr(tuned.autotuner, "_bench", lambda *args, config, **meta: [1.0, 1.0, 1.0])
    q = torch.empty(64, 2, 128, dtype=torch.bfloat16)
    pointers = [q] * 10  # Q .. K_LEN: only Q's dtype matters to the pruning
    scalars = [1.0, 0, 0] + [1] * 10 + [16384]

    def launch(n, m):
        consts = dict(GROUPS=1, HEAD_DIM=128, BLOCK_D=128, IS_CAUSAL=True, SPARSITY_N=n, SPARSITY_M=m,
                      TIE_INDEX=False, UPCAST=False, DOT_PRECISION="tf32", WITH_STATS=False)
        tuned(lambda cfg: (1, 1, 1), ("key", n, m), *pointers, *scalars, **consts)
        return jit.launches[-1]

    def expected(n, m):
        args = {"Q": q, "SPARSITY_N": n, "SPARSITY_M": m, "BLOCK_D": 128}
        cfg = configs._prune(configs._configs("fwd"), args, "fwd")[0]
        return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages

    dense, sparse = expected(0, 4), expected(2, 4)
    assert dense != sparse
    assert [launch(0, 4), launch(2, 4), launch(0, 4), launch(2, 4)] == [dense, sparse, dense, sparse]
    assert set(tuned._chosen) == {("key", 0, 4), ("key", 2, 4)}
    tuned.autotuner.configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    tuned.forget()
    assert launch(0, 4) == (32, 64, 4, 1)


def _defaulted_params(kernel):
    import inspect

    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn"):  # autotuner / heuristics wrappers
        fn = fn.fn
    return {n for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_launches_pass_every_defaulted_constexpr():
    """torch 2.11's Inductor builds a traced kernel's launcher from the full signature and
    drops nothing the caller left to a default: an omitted defaulted constexpr shifted the
    grid into its slot ('launcher() missing 3 required positional arguments: _grid_0...',
    seen on the H200 for the decode kernel). So every launch names each defaulted
    constexpr, on or off."""
    from modelopt_sparse.kernels.triton_attention import launch
    from modelopt_sparse.kernels import triton_decode as td
    from modelopt_sparse.kernels.reference import SparseParams

    for sinks in (None, torch.zeros(4)):
        q = torch.randn(8, 4, 64)
        k = v = torch.randn(8, 2, 64)
        start, lens = torch.zeros(1, dtype=torch.int32), torch.full((1,), 8, dtype=torch.int32)
        params = SparseParams(True, 0.125, 2, 4, 0, 4, "threshold", 0, 0.0)
        _, args, kwargs = launch._forward_args(q, k, v, torch.empty_like(q), None, None, start, lens, start, lens, 8,
                                               params, False, sinks)
        assert _defaulted_params(_attn_fwd) <= set(kwargs), "forward launch leaves a constexpr to its default"
    for on in (False, True):
        cfg = td._config(torch.float16, 64, 2, False, False, 0, on, on, on)
        for (_key, kwargs) in cfg[2:]:
            assert _defaulted_params(td._decode_kernel) <= set(kwargs)
