"""Checks of device values that never block the host.

Some inputs can only be validated by looking at their values: a padding mask with holes,
``cu_seq_lens`` that do not rise. Reading a CUDA tensor on the host waits for the GPU to
finish everything queued before it, which made every layer of a small model host-bound.
So a check is a device flag instead:

* on the CPU (nothing to wait for) it is read at once and raises right there;
* on CUDA the flag is copied to pinned host memory behind an event, without waiting, and
  :func:`raise_failed` (called at the start of the next attention or mask call) raises
  for the first flag whose event has completed and that came out false. The call that
  received the bad input has then already returned; the error says so.
* while Dynamo traces or a CUDA graph is being captured nothing can be read back, and the
  check is skipped: compiled and captured code trusts its inputs, as FlashAttention does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = ["require", "raise_failed", "pending"]

_lock = threading.Lock()
_pending: list[tuple[torch.cuda.Event, torch.Tensor, Callable[[], str], type[Exception]]] = []


def require(ok: torch.Tensor | bool, message: Callable[[], str], error: type[Exception] = ValueError) -> None:
    """Raise ``error(message())`` if ``ok`` (or any element of it) is false, now (CPU, Python
    bools) or at the next :func:`raise_failed` once the GPU has computed it (CUDA)."""
    if isinstance(ok, bool):
        if not ok:
            raise error(message())
        return
    if torch.compiler.is_compiling():
        return
    ok = ok.all() if ok.dim() else ok
    if ok.device.type != "cuda":
        if not bool(ok):
            raise error(message())
        return
    if torch.cuda.is_current_stream_capturing():
        return
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(ok, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    with _lock:
        _pending.append((done, host, message, error))


def raise_failed() -> None:
    """Raise for the first completed check that failed; drop completed ones. Never waits."""
    # is_compiling first: Dynamo must never look into _pending. Tracing `not _pending` made it
    # register the pending checks' torch.cuda.Event objects as graph inputs, and the compiled
    # code's prologue then weak-referenced Events that had since been dropped: a segfault in
    # torch._dynamo.graph_bytecode_inputs (H200, torch 2.11, static-cache generate in bf16).
    if torch.compiler.is_compiling() or not _pending:
        return
    failed = None
    with _lock:
        keep = []
        for entry in _pending:
            done, host, message, error = entry
            if not done.query():
                keep.append(entry)
            elif not bool(host) and failed is None:
                failed = (message, error)
        _pending[:] = keep
    if failed is not None:
        message, error = failed
        raise error(f"{message()} (found by a device-side check after an earlier call had returned; "
                         "that call's output is not valid)")


def pending() -> int:
    """How many checks wait for the GPU (for tests)."""
    return len(_pending)


def wait_and_raise() -> None:
    """Wait for every pending check, then :func:`raise_failed` (tests, and code that wants the
    errors of what it just ran)."""
    for done, *_ in list(_pending):
        done.synchronize()
    raise_failed()
