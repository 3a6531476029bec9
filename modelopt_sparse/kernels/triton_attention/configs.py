"""Launch configuration: the measured config orders, the autotune pruning rule, and the
tuned kernels (``_fwd``, ``_dkdv``, ``_dq``) that remember the config chosen per launch key.

``MODELOPT_SPARSE_DIRECT_LAUNCH`` is read when this module is imported (the tuned kernels are
built here); ``MODELOPT_SPARSE_AUTOTUNE`` at each pruning.
"""

from __future__ import annotations

import itertools
import os

import triton

from ..api import interpreting
from ..switches import env_flag
from ..triton_launch import DirectLauncher, LaunchPlan
from .backward import _attn_bwd_dkdv, _attn_bwd_dq
from .forward import _attn_fwd


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------
# Launch configs (BLOCK_M, BLOCK_N, warps, stages), best first. With autotuning off the
# first one that fits is used; the order comes from sweeping every config on the H200
# (tools/sweep_configs.py, docs/performance.md): sparse forward prefers small tiles on
# one warpgroup, dense prefers 128x128 at D >= 128 and 128x64 below.
_SHAPES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2),
            (64, 32, 4, 2)],
    "fwd_sparse": [(64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                   (64, 128, 4, 1)],
    "fwd_small_d": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 32, 4, 2)],
    "dkdv": [(128, 64, 8, 2), (64, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2),
             (64, 128, 4, 1)],
    # At D <= 64 the dK/dV accumulators of a 128-key tile fit: 326 against 268 TFLOPS
    # fwd+bwd for (128, 64) (dense, S=16384, causal; 255 against 231 at 2:4).
    "dkdv_small_d": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2),
                     (64, 32, 4, 2), (64, 128, 4, 1)],
    # The index rule's int64 keys spill in 128-key tiles (175 TFLOPS, against 204 here).
    "dkdv_small_d_index": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2),
                           (64, 32, 4, 2), (64, 128, 4, 1)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2),
           (64, 128, 4, 1)],
}
# Opt-in shared memory per block on sm_90 (227 KB); kernels that need more fail to launch.
_SMEM_LIMIT = 232448


def _configs(kind: str):
    if interpreting():
        # One config: a multi-config autotune fails in the interpreter; large tiles keep
        # the number of interpreted tile operations small.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    shapes = list(dict.fromkeys(sum((v for k, v in _SHAPES.items() if k.startswith(kind)), [])))
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in shapes
    ]


def _smem_bytes(kind, bm, bn, bd, stages, elem):
    """Shared memory of a launch: resident tiles plus one buffer per pipeline stage (exact
    for the forward and dQ kernels; an upper bound for dK/dV, which also stages P and dS)."""
    if kind == "fwd":
        return (bm * bd + stages * 2 * bn * bd) * elem
    if kind == "dq":
        return (2 * bm * bd + stages * 2 * bn * bd) * elem
    return (2 * bn * bd + stages * 2 * bm * bd + 2 * bm * bn) * elem


def _min_block_n(kind, m):
    """Narrowest key tile worth launching for groups of M.

    With G = BLOCK_N / M >= 8 a group's members differ only in register bits of the
    accumulator's column index; below that, splitting the tile moves data between threads.
    The dK/dV kernel is the exception at M = 16: its 128-wide tiles spill, which costs more
    than the data movement of 64-wide ones (236 against 182 TFLOPS fwd+bwd, H200 sweep).
    """
    return 4 * m if (kind == "dkdv" and m == 16) else 8 * m


def _prune(configs, named_args, kind, **kwargs):
    args = {**named_args, **kwargs}
    m, sparse, d = args["SPARSITY_M"], args["SPARSITY_N"] > 0, args["BLOCK_D"]
    elem = args["Q"].element_size()
    if kind == "fwd":
        order = _SHAPES["fwd_sparse"] if sparse else (_SHAPES["fwd_small_d"] if d <= 64 else _SHAPES["fwd"])
    elif kind == "dkdv" and d <= 64:
        order = _SHAPES["dkdv_small_d_index" if args.get("TIE_INDEX") else "dkdv_small_d"]
    else:
        order = _SHAPES[kind]
    rank = {shape: i for i, shape in enumerate(order)}

    def shape(cfg):
        return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages

    def fits(cfg):
        bm, bn, _, stages = shape(cfg)
        if sparse and bn < _min_block_n(kind, m):
            return False
        if _smem_bytes(kind, bm, bn, d, stages, elem) > _SMEM_LIMIT:
            return False
        # The widest tiles spill at the largest head dims.
        return d <= 128 or bm * bn <= 64 * 128

    kept = sorted((c for c in configs if fits(c)), key=lambda c: rank.get(shape(c), len(rank)))
    if not kept:
        # Any tile whose width is a multiple of M is correct, just slower: take the
        # widest single-stage tile that fits.
        for bn, bm in itertools.product((8 * m, 4 * m, 2 * m, 64, 32, 16), (64, 32)):
            if bn >= (m if sparse else 16) and _smem_bytes(kind, bm, bn, d, 1, elem) <= _SMEM_LIMIT:
                kept = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
                break
    if not env_flag("MODELOPT_SPARSE_AUTOTUNE", True):
        # Tests compile many shape/pattern combinations; tuning each would take minutes.
        return kept[:1]
    return kept


_SHARED_KEYS = ["GROUPS", "HEAD_DIM", "IS_CAUSAL", "SPARSITY_N", "SPARSITY_M", "TIE_INDEX", "HAS_WINDOW", "SOFTCAP",
                "DOT_PRECISION"]


class _TunedKernel:
    """An autotuned kernel that remembers the config chosen for each launch key.

    The first launch of a key goes through ``triton.autotune`` (which tunes, or takes the
    pruned default); later ones call the JIT function with that config directly. The
    autotuner's own per-call bookkeeping over some forty arguments cost about as much host
    time as the rest of the launch, which shows on short sequences (docs/performance.md,
    item 21). ``key`` must determine the config: it holds the autotune key's values, the
    dtype and the device.
    """

    def __init__(self, kernel, kind, length_key, extra_keys=()):
        self.autotuner = triton.autotune(
            _configs(kind),
            key=[length_key, *_SHARED_KEYS, *extra_keys],
            prune_configs_by={
                "early_config_prune": lambda configs, named_args, **kw: _prune(configs, named_args, kind, **kw)
            },
        )(kernel)
        self._chosen = {}
        self.kind = kind
        # MODELOPT_SPARSE_DIRECT_LAUNCH=0 (read at import) keeps every launch on JITFunction.run.
        direct = not interpreting() and os.environ.get("MODELOPT_SPARSE_DIRECT_LAUNCH", "1").strip() != "0"
        self.launcher = DirectLauncher(kernel) if direct else None

    def __call__(self, grid, key, *args, **kwargs):
        config = self._chosen.get(key)
        if config is None:
            self.autotuner[grid](*args, **kwargs)
            self._chosen[key] = self.autotuner.best_config
        elif self.launcher is None:
            self.autotuner.fn[grid](*args, **kwargs, **config.all_kwargs())
        else:
            self.launcher(grid(config.kwargs), key, args, {**kwargs, **config.all_kwargs()})

    def config_for(self, key, q, kwargs):
        """The config a launch with this key runs: the one chosen before, else the rule's
        first (what an untuned launch takes). Compiled graphs launch with it directly."""
        config = self._chosen.get(key)
        if config is None:
            config = _prune(self.autotuner.configs, {"Q": q}, self.kind, **kwargs)[0]
        return config

    def plan(self, grid, key, args, kwargs, pointer_slots, plan_args=None):
        """A :class:`LaunchPlan` of this launch, if it went direct before (else None).
        ``plan_args``: the arguments the plan keeps (default ``args``), e.g. with a tensor
        outside ``pointer_slots`` replaced by its address."""
        config = self._chosen.get(key)
        if config is None or self.launcher is None:
            return None
        entry = self.launcher.compiled(key, args)
        if entry is None:
            return None
        kernel, tail = entry
        return LaunchPlan(kernel, grid(config.kwargs), args if plan_args is None else plan_args, tail, pointer_slots)

    def verify_plan(self, plan, key, args, kwargs) -> None:
        """``MODELOPT_SPARSE_VERIFY_LAUNCH=1``: the plan's kernel must be Triton's pick."""
        if self.launcher is not None and self.launcher._verify:
            self.launcher.verify(plan.kernel, plan.grid, args, {**kwargs, **self._chosen[key].all_kwargs()})

    def forget(self):
        """Drop every chosen config (after the autotuner's configs were changed)."""
        self._chosen.clear()
        self.autotuner.cache.clear()
        if self.launcher is not None:
            self.launcher.clear()
        _FORWARD_PLANS.clear()


# Launch plans of the forward kernel (inference calls without statistics), by everything
# that fixes the launch except the tensors' addresses. Cleared with the chosen configs.
_FORWARD_PLANS: dict = {}


_fwd = _TunedKernel(_attn_fwd, "fwd", "max_q_bucket", ["WITH_STATS", "HAS_LEARNED_SINKS"])
_dkdv = _TunedKernel(_attn_bwd_dkdv, "dkdv", "max_k_bucket", ["TMA"])  # correct given lse: no sink input
_dq = _TunedKernel(_attn_bwd_dq, "dq", "max_q_bucket", ["HAS_LEARNED_SINKS"])
