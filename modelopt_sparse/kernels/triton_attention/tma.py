"""Tensor-descriptor (TMA) loads of the dK/dV kernel: whether a launch uses them, and the
Triton allocator they need on the GPU."""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton

from ..api import interpreting
from ..switches import env_flag


def _use_tma(*tensors) -> bool:
    """On by default on the GPU (``MODELOPT_SPARSE_TMA=0`` turns it off; in the interpreter
    ``=1`` turns it on): the dK/dV kernel loads its interior Q and dO blocks through tensor
    descriptors (+7.6 % fwd+bwd dense at D=128 on the H200). Needs sm_90+ (or the
    interpreter) and 16-byte aligned bases, head offsets and row strides; otherwise the
    pointer loads run, with a warning (once per reason) if ``MODELOPT_SPARSE_TMA=1`` asked
    for descriptors explicitly. On the GPU the descriptors need a Triton allocator: a caller's own
    (``triton.set_allocator``) is used as it is, else one backed by PyTorch's caching
    allocator is installed."""
    if not env_flag("MODELOPT_SPARSE_TMA", not interpreting()):
        return False
    if not interpreting() and torch.cuda.get_device_capability(tensors[0].device) < (9, 0):
        return _tma_declined("it needs compute capability 9.0 or newer")
    for t in tensors:
        elem = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * elem) % 16 or (t.stride(1) * elem) % 16 or t.stride(2) != 1:
            return _tma_declined("q or grad_out is not 16-byte aligned (base, head or row stride)")
    if not interpreting():
        _ensure_allocator()
    return True


try:  # the context variable behind triton.set_allocator (triton 3.6 to 3.9)
    from triton.runtime._allocation import NullAllocator as _NullAllocator
    from triton.runtime._allocation import _allocator as _triton_allocator
except ImportError:
    _triton_allocator = None


def _ensure_allocator():
    """Install ``_descriptor_scratch`` unless the caller set a Triton allocator already."""
    if _triton_allocator is None or isinstance(_triton_allocator.get(), _NullAllocator):
        triton.set_allocator(_descriptor_scratch)


def _tma_declined(reason: str) -> bool:
    if os.environ.get("MODELOPT_SPARSE_TMA", "").strip() == "1":
        _warn_tma_declined(reason)
    return False


@functools.lru_cache(maxsize=None)
def _warn_tma_declined(reason: str) -> bool:
    warnings.warn(f"MODELOPT_SPARSE_TMA=1 ignored: {reason}; the dK/dV kernel uses pointer loads",
                  RuntimeWarning, stacklevel=5)
    return False


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")
