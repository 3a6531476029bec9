"""Fused N:M sparse flash attention in Triton: forward, backward and a mask probe.

The rule itself (docs/semantics.md) lives in ``rule._allowed_scores``, ``rule._dense_region``
and ``rule._selection_exponent``; ``tiles._key_tile_segments`` and
``tiles._query_block_segments`` split the tiles into interior ones, which provably need
neither of the first two tests and run a loop body without them, and edge ones. The forward,
both backward kernels and the mask probe share all of these.

The package, one idea per module, in dependency order (none imports a later one):

* ``network``: register-level group selection (the sorting network over a group's members,
  in the permuted column layout the module describes);
* ``rule``: the rule per score (masks, dense region, soft cap, N:M selection);
* ``tiles``: tile classification (interior or edge, visited or not) and the tile loads;
* ``forward``: the forward kernel ``_attn_fwd``;
* ``backward``: the backward kernels ``_attn_bwd_delta``, ``_attn_bwd_dkdv``, ``_attn_bwd_dq``;
* ``probe``: the mask probe kernel and :func:`kernel_kept_mask`;
* ``configs``: launch configs, autotune pruning and the tuned kernels ``_fwd``, ``_dkdv``,
  ``_dq`` (``MODELOPT_SPARSE_DIRECT_LAUNCH`` is read at its import), and the forward's
  launch plans, which are cleared with the chosen configs;
* ``tma``: whether the dK/dV kernel uses tensor descriptors, and their allocator;
* ``launch``: the host side (forward and backward launches, the traced forward);
* ``ops``: the torch.library custom ops (registered at its import), the eager
  autograd.Function and :func:`triton_attention`.

Triton resolves the globals a ``@triton.jit`` function reads (helpers, constexprs such as
``rule.PTX``) in the module that defines it: each module imports the helpers its kernels
call under their own names.

This module re-exports the entry points and the internals other modules import from here.
A test that replaces a name must replace it in the module that looks it up (e.g.
``ops._forward_launch`` for the eager path, ``configs.interpreting`` for the autotune
configs, ``launch._FORWARD_PLANS`` for the forward's plan lookups), not here: the package's
copy is not the one its callers read.
"""

from __future__ import annotations

from .launch import _forward_launch, _launch_backward
from .ops import _NoSecondDerivative, triton_attention
from .probe import kernel_kept_mask
from .rule import _tanh

__all__ = [
    "triton_attention",
    "kernel_kept_mask",
    # Internals that other modules import from here (triton_decode, hopper_attention.engine,
    # tests); patch a name in the module that looks it up, not here.
    "_NoSecondDerivative",
    "_forward_launch",
    "_launch_backward",
    "_tanh",
]
