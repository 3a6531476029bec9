"""Environment switches of the kernel engines (``MODELOPT_SPARSE_*``)."""

from __future__ import annotations

import os

# Some switches are read on every attention call (backend="auto" asks MODELOPT_SPARSE_HOPPER,
# the launch path TRITON_INTERPRET). ``os.environ.get`` encodes the key and decodes the value
# each time (~1 µs); the mapping underneath (CPython's ``os.environ._data``, which every
# ``os.environ[...] = ...`` and ``monkeypatch.setenv`` updates) answers in ~0.1 µs. Platforms
# without it take os.environ.get.
_ENVIRON = os.environ
_RAW = getattr(_ENVIRON, "_data", None)
_ENCODE = getattr(_ENVIRON, "encodekey", None)
_DECODE = getattr(_ENVIRON, "decodevalue", None)
_KEYS: dict = {}


def env_value(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, cheaper (and exactly that when os.environ was
    replaced by another mapping, as a test harness may)."""
    if _RAW is None or _ENCODE is None or _DECODE is None or os.environ is not _ENVIRON:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _ENCODE(name)
    raw = _RAW.get(key)
    return default if raw is None else _DECODE(raw)


def env_flag(name: str, default: bool) -> bool:
    """A 0/1 environment switch: unset or empty gives ``default``; anything other than 0 or
    1 is a mistake worth hearing about (ValueError)."""
    value = env_value(name).strip()
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"
