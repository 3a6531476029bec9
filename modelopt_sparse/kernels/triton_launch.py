"""Launching a compiled Triton kernel directly, without ``JITFunction.run``'s per-call work.

``JITFunction.run`` binds some forty arguments, works out how each one specializes the
kernel (dtype, 16-byte alignment, 32/64-bit, the value 1), hashes that into a cache key
and checks the kernel's globals, every launch. For a small layer that host work is a
large part of the call. :class:`DirectLauncher` does it once per (launch key, argument
signature): the first launch goes through ``run`` and returns the compiled kernel, later
ones call its launcher with the same arguments in the same order.

The argument signature below is at least as fine as Triton's specialization (it splits on
everything Triton splits on, sometimes more), so a hit never reuses a kernel compiled for
other assumptions. ``MODELOPT_SPARSE_VERIFY_LAUNCH=1`` makes every hit also ask
``JITFunction.run(..., warmup=True)`` for its kernel and raise if it differs (the GPU
tests run with it). Anything unusual (launch hooks installed, the interpreter, an API
this Triton does not have) takes the ordinary path.
"""

from __future__ import annotations

import os

import torch

_I32 = (-(2**31), 2**31 - 1)
_current_device = torch._C._cuda_getDevice if hasattr(torch._C, "_cuda_getDevice") else torch.cuda.current_device
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


_INT_SIGNATURES: dict[int, tuple] = {}


def _arg_signature(args) -> tuple:
    """What Triton may specialize on, per runtime argument: a tensor's dtype and 16-byte
    alignment; an int's value 1, divisibility by 16 and width; a bool or float's type.
    Exact-type tests first: ``isinstance(x, torch.Tensor)`` goes through a metaclass hook
    and this runs for every argument of every launch."""
    sig = []
    ints = _INT_SIGNATURES
    for a in args:
        kind = type(a)
        if kind is int:
            known = ints.get(a)
            if known is None:
                known = (a == 1, a % 16 == 0, _I32[0] <= a <= _I32[1], a >= 2**63)
                if len(ints) < 4096:  # strides and lengths repeat; the cap bounds odd workloads
                    ints[a] = known
            sig.append(known)
        elif kind is torch.Tensor:
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        elif kind is float or kind is bool:
            sig.append(kind)
        elif isinstance(a, torch.Tensor):
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and not isinstance(a, bool):
            sig.append((a == 1, a % 16 == 0, _I32[0] <= a <= _I32[1], a >= 2**63))
        else:
            sig.append((kind, a))
    return tuple(sig)


try:
    from triton import knobs as _knobs
except ImportError:  # Triton without knobs: never take the direct path
    _knobs = None


def _hook_set(hook) -> bool:
    # Triton 3.6 keeps the hooks as HookChain objects, empty unless someone added a hook.
    return hook is not None and bool(getattr(hook, "calls", True))


def _runtime_hooks_set() -> bool:
    if _knobs is None:
        return True
    runtime = _knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


class DirectLauncher:
    """``launcher(grid, key, args, kwargs)`` launches ``fn[grid](*args, **kwargs)``.

    ``args`` are the kernel's leading runtime parameters, positionally; ``kwargs`` the rest
    (constexprs and launch options such as ``num_warps``). ``key`` must determine every
    value in ``kwargs`` and the device.
    """

    def __init__(self, fn):
        self.fn = fn
        self._entries: dict = {}
        self._verify = os.environ.get("MODELOPT_SPARSE_VERIFY_LAUNCH", "0") == "1"
        self.direct_launches = 0

    def __call__(self, grid, key, args, kwargs) -> None:
        if _runtime_hooks_set():
            self.fn[grid](*args, **kwargs)
            return
        entry_key = (key, _arg_signature(args))
        entry = self._entries.get(entry_key)
        if entry is None:
            kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
            tail = self._tail(len(args), kwargs)
            if tail is not None and hasattr(kernel, "packed_metadata") and not hasattr(kernel, "result"):
                self._entries[entry_key] = (kernel, tail)
            return
        kernel, tail = entry
        self.verify(kernel, grid, args, kwargs)
        stream = _current_stream(_current_device())
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *tail)
        self.direct_launches += 1

    def compiled(self, key, args):
        """``(compiled kernel, constexpr tail)`` of an earlier direct-launchable call with this
        key and these arguments' signature, or None."""
        return self._entries.get((key, _arg_signature(args)))

    def verify(self, kernel, grid, args, kwargs) -> None:
        """With ``MODELOPT_SPARSE_VERIFY_LAUNCH=1``: raise unless ``kernel`` is what
        ``JITFunction.run`` picks for these arguments."""
        if self._verify and self.fn.run(*args, grid=grid, warmup=True, **kwargs) is not kernel:
            raise RuntimeError(f"direct launch of {self.fn.__name__} would run another kernel than Triton picks")

    def _tail(self, n_args, kwargs):
        """The values of the parameters after the runtime ones, in signature order (None if a
        parameter has neither a value nor a default: then the ordinary path stays)."""
        tail = []
        for param in self.fn.params[n_args:]:
            name = param.name
            if name in kwargs:
                tail.append(kwargs[name])
            elif getattr(param, "has_default", False):
                tail.append(param.default)
            else:
                return None
        return tuple(tail)

    def clear(self) -> None:
        self._entries.clear()


class LaunchPlan:
    """One compiled kernel with every argument but its tensor pointers fixed.

    Made from a launch that went through :class:`DirectLauncher`, for a caller whose key
    determines everything except the tensors' addresses (shapes, strides, dtypes, scalars,
    alignment): a call then costs one C launch with the pointers passed as integers (no
    ``data_ptr()`` lookups or pointer-attribute queries in Triton's launcher).
    ``pointer_slots`` are the positions of the pointer arguments among the runtime ones.
    """

    __slots__ = ("kernel", "grid", "_function", "_metadata", "_before", "_after", "_slots", "launches")

    def __init__(self, kernel, grid, args, tail, pointer_slots):
        self.kernel, self.grid = kernel, tuple(grid)
        self._function, self._metadata = kernel.function, kernel.packed_metadata
        first, last = min(pointer_slots), max(pointer_slots)
        if list(pointer_slots) != list(range(first, last + 1)):
            raise ValueError("LaunchPlan needs the pointer arguments next to each other")
        self._before, self._after = tuple(args[:first]), (*args[last + 1:], *tail)
        self._slots = last - first + 1
        self.launches = 0

    def __call__(self, pointers) -> None:
        if len(pointers) != self._slots:
            raise ValueError(f"expected {self._slots} pointers, got {len(pointers)}")
        stream = _current_stream(_current_device())
        g0, g1, g2 = self.grid
        self.kernel.run(g0, g1, g2, stream, self._function, self._metadata, None, None, None,
                        *self._before, *pointers, *self._after)
        self.launches += 1


def hooks_allow_plans() -> bool:
    """Plans bypass Triton's launch hooks: only use them while none is installed."""
    return not _runtime_hooks_set()
