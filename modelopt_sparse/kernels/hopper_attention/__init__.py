"""The Hopper (sm_90) forward engine: ``attention(..., backend="hopper")``.

A warp-specialized CUDA C++ kernel (``kernels/hopper/nm_attention_fwd.cu``, inline PTX, no
CUTLASS) for the forward pass of the same rule as every other backend (docs/semantics.md):
dense and N:M (M in 2/4/8/16, both tie rules), varlen, GQA, causal or not, sinks, dense
window, decode rows, sliding window, learned sinks, D = 64 or 128, fp16 or bf16. It stores the
same log2-domain LSE as the Triton forward, so the Triton backward runs on its output.
docs/hopper_engine.md has the design and the status (tested and timed on the H200 since
session 10). Eager calls launch it directly; ``torch.compile`` graphs call it as one custom op
(``ops``).

How it runs, without a PyTorch C++ extension (so it works the same on any torch version):

* nvcc compiles the variant a call needs (head dim, N:M pattern, tie rule, dtype, schedule)
  into a cubin at first use; cubins are cached on disk under
  ``$MODELOPT_SPARSE_HOPPER_CACHE`` (default ``~/.cache/modelopt_sparse/hopper``), keyed by
  a hash of the CUDA sources, the variant and the nvcc version, so an edited source or
  another nvcc never reuses a stale binary;
* the CUDA driver API (``libcuda`` through ctypes) loads it (``cuModuleLoadData``) into
  PyTorch's context and launches it on PyTorch's current stream (``cuLaunchKernel``).

The toolchain is optional (``pip install modelopt-sparse[hopper]`` or any CUDA 12.4+
toolkit; ``$MODELOPT_SPARSE_NVCC`` names an nvcc explicitly). :func:`unsupported_reason`
says why a call cannot run here; ``backend="hopper"`` raises :class:`HopperUnavailable`
with it, ``backend="auto"`` (when it considers this engine) logs it once and uses Triton.

The package, one idea per module (imported in this order; none imports a later one):

* ``variants``: :class:`~.variants.Variant` (a kernel's template parameters, its tag and
  ``-D`` flags), the measured schedules and ``variant_for`` (the kernel a call runs, with the
  environment's switches);
* ``build``: nvcc, the compile command and the on-disk cubin cache (``compile_variant``,
  ``cache_key``), and :class:`HopperUnavailable`;
* ``driver``: the CUDA driver API through ctypes (argument structs, tensor maps, loading and
  launching a cubin);
* ``engine``: what can run here (``unsupported_reason``, ``choose``), the launch
  (``forward``) and autograd (``hopper_attention``);
* ``ops``: the custom op that ``torch.compile`` graphs call (``traced_attention``), with the
  Triton backward as its gradient;
* ``variant_sets``: the kernels precompiled, timed and tested (``standard_variants``);
* ``tools``: the developer commands behind ``python -m modelopt_sparse.kernels.hopper_attention
  {precompile,smoke,sass,bench}`` (``__main__``); never imported on the ``attention()`` path.

This module re-exports the engine's entry points only (what ``kernels/api.py`` calls and what
a caller catches). Everything else is reached through its module, and a test that replaces a
name must replace it in the module that looks it up (e.g. ``engine.find_nvcc`` for
``unsupported_reason``, ``build.find_nvcc`` for ``compile_variant``).
"""

from .build import HopperUnavailable
from .engine import (auto_enabled, below_auto_threshold, choose, forward_with_lse, hopper_attention, kept_mask_probe,
                     log_fallback_once, unsupported_reason)
from .ops import traced_attention

__all__ = ["HopperUnavailable", "auto_enabled", "below_auto_threshold", "choose", "forward_with_lse",
           "hopper_attention", "kept_mask_probe", "log_fallback_once", "traced_attention", "unsupported_reason"]
